"""Models by hub id (jaxalign.convert.hub): a hub cache laid out on disk by the test itself
(huggingface_hub's layout: models--org--name/snapshots/<commit>/, refs/<branch or tag>),
HF_HUB_OFFLINE=1 throughout, so nothing here touches the network. Loading by id, at a
revision; a local directory winning over an id; the offline-miss error; what would be
fetched; a run pinning the commit of its hub base; the README tour by hub id."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hub_cache import lay_out
from jaxalign import checkpoint, cli
from jaxalign.convert import hf, hub
from jaxalign.models import lora

REPO = "org/tiny"
ID = "hf://" + REPO        # hub models are named explicitly


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    """Two tiny models (same tokenizer, other weights): main -> a, tag v1 -> b."""
    from make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("hub")
    a = make_tiny_model(root / "a", seed=0)
    b = make_tiny_model(root / "b", tokenizer_dir=a, seed=1)
    cache = root / "cache"
    sha_a = lay_out(a, cache, REPO, ref="main", copy=True).name
    sha_b = lay_out(b, cache, REPO, ref="v1", copy=True).name
    assert sha_a != sha_b and len(sha_a) == 40
    return dict(root=root, a=a, b=b, cache=cache, sha_a=sha_a, sha_b=sha_b)


@pytest.fixture
def offline(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_env["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_cache()
    yield hub_env
    hub.clear_cache()


def assert_same_params(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_hub_id_loads_from_the_offline_cache(offline):
    env = offline
    _, params_a, _ = hf.load(env["a"])
    _, params_b, _ = hf.load(env["b"])
    assert np.abs(np.asarray(params_a["embed"]) - np.asarray(params_b["embed"])).max() > 0
    for revision, params, sha in [(None, params_a, env["sha_a"]), ("main", params_a, env["sha_a"]),
                                  ("v1", params_b, env["sha_b"]), (env["sha_b"], params_b, env["sha_b"])]:
        cfg, got, hf_config, tok_dir = checkpoint.load_model(ID, revision=revision)
        assert_same_params(got, params)
        assert Path(tok_dir) == env["cache"] / "models--org--tiny" / "snapshots" / sha
        assert (Path(tok_dir) / "tokenizer.json").exists()
        assert hub.commit_of(ID, revision) == sha


def test_offline_miss_is_one_error_naming_id_and_revision(offline, tmp_path, capsys):
    with pytest.raises(hub.HubError) as err:
        hub.resolve("hf://org/absent")
    msg = str(err.value)
    for part in ("hf://org/absent", "revision main", "HF_HUB_OFFLINE=1", str(offline["cache"])):
        assert part in msg, msg
    with pytest.raises(hub.HubError, match=r"hf://org/tiny \(revision v9\)"):
        hub.resolve(ID, "v9")

    capsys.readouterr()
    rc = cli.main(["convert", "hf://org/absent", str(tmp_path / "out"), "--revision", "v2"])
    assert rc == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("jaxalign: error: "), errors
    assert "hf://org/absent (revision v2)" in errors[0] and "not in the hub cache" in errors[0]
    assert not (tmp_path / "out").exists()


def test_bare_name_is_a_local_path_never_the_hub(offline, tmp_path, monkeypatch, capsys):
    """`org/tiny` is a local path: loaded when it exists, refused in one line naming it (and
    the explicit hf:// form) when it does not, even though the hub cache holds org/tiny."""
    import shutil
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.HubError, match=r"org/tiny: no such local directory .* hf://org/tiny"):
        hub.resolve(REPO)
    assert cli.main(["generate", REPO, "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "jaxalign: error: org/tiny: no such local directory" in err and "Traceback" not in err
    shutil.copytree(offline["b"], tmp_path / "org" / "tiny")   # main is a; this is b
    assert hub.resolve(REPO) == Path(REPO) and not hub.is_hub_id(REPO)
    _, params, _, _ = checkpoint.load_model(REPO)
    _, params_b, _ = hf.load(offline["b"])
    assert_same_params(params, params_b)
    with pytest.raises(hub.HubError, match="local path"):
        hub.resolve(REPO, "main")
    with pytest.raises(hub.HubError, match="not a hub model id"):
        hub.resolve("hf://../etc")


def test_fetch_reads_config_first_then_only_the_indexed_weights(tmp_path, monkeypatch):
    """Online path, with huggingface_hub's snapshot_download replaced by a local 'hub' that
    applies the same allow_patterns filter (huggingface_hub's filter_repo_objects): the first
    call fetches config.json alone (checked before anything else), the second the tokenizer
    and index, the third exactly the shards the index names, at the commit the first resolved. A stray top-level *.safetensors and every subfolder
    (original/, onnx/) are never fetched."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    remote = {"config.json": config.to_json_string(), "tokenizer.json": "{}", "README.md": "",
              "model.safetensors.index.json": json.dumps({"weight_map": {
                  "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}),
              "model-00001-of-00002.safetensors": "", "model-00002-of-00002.safetensors": "",
              "consolidated.safetensors": "", "original/model.safetensors": "",
              "onnx/model.safetensors": "", "pytorch_model.bin": ""}
    sha = "1" * 40
    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, local_files_only=False,
                      allow_patterns=None):
        kept = sorted(filter_repo_objects(list(remote), allow_patterns=allow_patterns))
        calls.append((revision, kept))
        snap = tmp_path / "snap" / sha
        for name in kept:
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            (snap / name).write_text(remote[name])
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    hub.clear_cache()
    try:
        snap = hub.resolve("hf://org/sharded")
    finally:
        hub.clear_cache()
    assert calls[0] == (None, ["config.json"])
    assert calls[1] == (sha, ["config.json", "model.safetensors.index.json", "tokenizer.json"])
    assert calls[2] == (sha, ["model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors"])
    assert len(calls) == 3 and not (snap / "original").exists() \
        and not (snap / "consolidated.safetensors").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "original/x.safetensors"}}))
    with pytest.raises(hub.HubError, match="only top-level .safetensors"):
        hub._weight_files(bad, "hub model x")


def test_reward_model_by_hub_id(offline, tmp_path):
    """reward.model: an RM exported by jaxalign, found by id; a causal LM id is refused by
    kind before its weights are read; the pad id it scores by comes along."""
    from jaxalign.tokenizer import load_tokenizer
    from jaxalign.train.rl.rewards import RewardModelError, check_reward_model_dir, \
        load_frozen_reward_model
    cfg, params, hf_config, tok_dir = checkpoint.load_model(offline["a"], num_labels=1, seed=3)
    rm_dir = hf.save(tmp_path / "rm", cfg, params, hf_config=hf_config, source_dir=tok_dir)
    sha = lay_out(rm_dir, offline["cache"], "org/tiny-rm", copy=True).name
    with pytest.raises(RewardModelError, match="hf://org/tiny: wrong kind of model: a causal LM"):
        check_reward_model_dir(ID)
    check_reward_model_dir("hf://org/tiny-rm", sha)
    got_cfg, got, judge = load_frozen_reward_model("hf://org/tiny-rm", None, load_tokenizer(offline["a"]),
                                            revision=sha)
    assert got_cfg.num_labels == 1 and got_cfg.pad_token_id == cfg.pad_token_id is not None
    assert judge is None   # the policy's tokenizer: scored on the policy's ids in the rollout
    assert_same_params(got, params)


@pytest.mark.slow  # CLI runs end to end
def test_run_pins_the_commit_of_its_hub_base(offline, tmp_path):
    """A LoRA SFT run from `model.path: org/tiny` records the commit main resolved to; moving
    main afterwards does not change the base its adapters are loaded onto."""
    from conftest import sft_config, write_tasks
    from jaxalign.train.sft import run_sft
    env = offline
    tiny = dict(model_dir=ID, data=write_tasks(tmp_path / "tasks.jsonl", 16))
    out = tmp_path / "run"
    cfg = sft_config(tiny, out, steps=2, batch_size=8, save_every=2)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=2))
    run_sft(cfg, devices=jax.devices()[:1])
    meta = json.loads((out / "run.json").read_text())
    assert meta["base"] == ID and meta["base_revision"] == env["sha_a"]
    # A PEFT adapter names the same base, as PEFT reads it (id + revision).
    assert cli.main(["export", str(out), str(tmp_path / "adapter"), "--adapter"]) == 0
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (REPO, env["sha_a"])

    refs_main = env["cache"] / "models--org--tiny" / "refs" / "main"
    refs_main.write_text(env["sha_b"])
    hub.clear_cache()
    try:
        assert hub.commit_of(ID) == env["sha_b"]
        run_cfg, params, _, _ = checkpoint.load_model(out)
        _, base = lora.split(params)
        _, params_a, _ = hf.load(env["a"], scan_layers=run_cfg.scan_layers)
        assert_same_params(base, _flat_like(params_a, base))
        # Resuming by rerunning the same config keeps the commit the run started from.
        run_sft(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3)),
                devices=jax.devices()[:1])
        assert json.loads((out / "run.json").read_text())["base_revision"] == env["sha_a"]
        _, params, _, _ = checkpoint.load_model(out)
        assert_same_params(lora.split(params)[1], _flat_like(params_a, base))
    finally:
        refs_main.write_text(env["sha_a"])


def _flat_like(full, part):
    """The leaves of `full` at the paths of `part` (nested dicts)."""
    out = {}
    for k, v in part.items():
        out[k] = _flat_like(full[k], v) if isinstance(v, dict) else full[k]
    return out


@pytest.mark.slow  # CLI runs end to end
def test_readme_tour_by_hub_id(offline, tmp_path, capsys):
    """The README's five-minute tour with a hub id in place of the directory: convert,
    generate, export, verify_export --reference ID, all offline from the cache."""
    import verify_export
    smol, smol_hf = tmp_path / "runs" / "smol", tmp_path / "runs" / "smol-hf"
    assert cli.main(["convert", ID, str(smol)]) == 0
    prompt = ["--chat", "--prompt", "What is 2 plus 3?", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert cli.main(["generate", str(smol)] + prompt) == 0
    from_ckpt = capsys.readouterr().out
    assert cli.main(["generate", ID] + prompt) == 0
    from_id = capsys.readouterr().out
    assert from_ckpt == from_id   # (a random model: its 6 tokens may be blanks)
    assert cli.main(["export", str(smol), str(smol_hf)]) == 0
    assert verify_export.main([str(smol_hf), "--reference", ID, "--max-new-tokens", "4"]) == 0
    report = capsys.readouterr().out
    assert f"tensors bitwise equal to {ID}: True" in report and report.rstrip().endswith("OK")


def test_plan_reads_the_shape_of_a_hub_id(offline):
    """`jaxalign plan` needs only config.json; by id it reads the cached snapshot's."""
    from jaxalign.train.plan import model_config
    cfg, _, _ = hf.load(offline["b"])
    assert model_config(ID, "v1") == cfg
