"""KTO: the loss against the paper's formula by hand and against TRL 1.16's KTOTrainer on the same
log-probs; unpaired data (TRL's format) with its mismatched KL rows; `jaxalign kto` trains the
tiny model and resumes identically."""

import logging
import math
import re
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import ConfigError, from_dict
from jaxalign.losses.kto import kto_loss
from jaxalign.train.kto import KTOConfig, KTOOptions, run_kto
from conftest import pref_config, read_metrics

# Six rows: sequence log-prob sums of the policy and the reference, on each row's own completion
# and on its mismatched KL completion; labels mixed.
POL = [-10.0, -14.5, -7.0, -20.0, -3.25, -9.0]
REF = [-11.0, -13.0, -7.5, -18.0, -4.0, -9.5]
POL_KL = [-30.0, -25.0, -27.5, -31.0, -22.0, -26.0]
REF_KL = [-31.5, -25.5, -27.0, -33.0, -22.5, -26.25]
LABEL = [True, False, True, False, False, True]


def sig(x):
    return 1 / (1 + math.exp(-x))


def by_hand(beta, wd, wu, pol_kl=POL_KL):
    z = max(0.0, sum(p - r for p, r in zip(pol_kl, REF_KL)) / len(REF_KL))
    losses = [wd * (1 - sig(beta * ((p - r) - z))) if y else wu * (1 - sig(beta * (z - (p - r))))
              for p, r, y in zip(POL, REF, LABEL)]
    return sum(losses) / len(losses), z


def ours(beta, wd=1.0, wu=1.0, pol_kl=POL_KL, **kw):
    arrs = [jnp.asarray(x, jnp.float32) for x in (POL, REF, pol_kl, REF_KL, LABEL)]
    loss, m = kto_loss(*arrs, beta=beta, desirable_weight=wd, undesirable_weight=wu, **kw)
    return float(loss), {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("beta, wd, wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.75)])
def test_kto_is_eq7_with_the_batch_kl_reference_point(beta, wd, wu):
    want, z = by_hand(beta, wd, wu)
    assert z > 0
    got, m = ours(beta, wd, wu)
    assert got == pytest.approx(want, rel=1e-6)
    assert m["kl"] == pytest.approx(z, rel=1e-6)
    good = [beta * (p - r) for p, r, y in zip(POL, REF, LABEL) if y]
    bad = [beta * (p - r) for p, r, y in zip(POL, REF, LABEL) if not y]
    assert m["rewards/chosen"] == pytest.approx(sum(good) / len(good), rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx(sum(bad) / len(bad), rel=1e-6)
    assert m["weight"] == 6.0


def test_kto_kl_is_clamped_at_zero_and_detached():
    low = [x - 5.0 for x in POL_KL]  # policy below the reference on the KL rows: z = 0
    want, z = by_hand(0.2, 1.0, 1.0, pol_kl=low)
    assert z == 0.0
    got, m = ours(0.2, pol_kl=low)
    assert got == pytest.approx(want, rel=1e-6) and m["kl"] == 0.0
    grad = jax.grad(lambda x: kto_loss(jnp.asarray(POL), jnp.asarray(REF), x, jnp.asarray(REF_KL),
                                       jnp.asarray(LABEL), beta=0.2)[0])(jnp.asarray(POL_KL))
    assert not np.asarray(grad).any()  # no gradient through the reference point


def test_kto_row_mask_excludes_fillers():
    pad = lambda xs, v: jnp.asarray(xs + [v, v], jnp.float32)
    full = [pad(x, 0.0) for x in (POL, REF, POL_KL, REF_KL)] + [pad(LABEL, 1.0)]
    loss, m = kto_loss(*full, beta=0.3, row_mask_B=jnp.asarray([1] * 6 + [0, 0], jnp.float32))
    want, wm = ours(0.3)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    for k, v in wm.items():
        assert float(m[k]) == pytest.approx(v, rel=1e-6), k


def _trl_kto(beta, wd, wu):
    """TRL 1.16 KTOTrainer._compute_loss (loss_type 'kto', KL on) with a stand-in model that
    returns given per-token log-probs, and precomputed reference log-probs (as the DPO test)."""
    torch = pytest.importorskip("torch")
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    rng = np.random.default_rng(0)
    b, t = len(POL), 6

    def tokens_summing_to(sums):
        # Per-token log-probs (B, t - 1) whose row sums are `sums`: TRL sums what the model returns.
        w = rng.dirichlet(np.ones(t - 1), size=b)
        return torch.tensor(np.asarray(sums)[:, None] * w)

    main, kl = tokens_summing_to(POL), tokens_summing_to(POL_KL)
    ids, kl_ids = torch.ones((b, t), dtype=torch.long), torch.ones((b, t), dtype=torch.long)

    class FakeModel:
        training = True

        def __call__(self, input_ids, **kw):
            lp = kl if input_ids is kl_ids else main
            return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                                         mean_logits=torch.zeros_like(lp))

    trainer = object.__new__(kto.KTOTrainer)
    fields = dict(model=FakeModel(), calculate_KL=True, precompute_ref_logps=True,
                  loss_type="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu,
                  aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
                  _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                  accelerator=types.SimpleNamespace(device=torch.device("cpu"),
                                                    gather_for_metrics=lambda x: x))
    for k, v in fields.items():
        object.__setattr__(trainer, k, v)
    mask = torch.ones((b, t), dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": mask, "KL_completion_mask": mask,
              "label": torch.tensor(LABEL), "ref_logps": torch.tensor(REF, dtype=torch.float64),
              "ref_KL_logps": torch.tensor(REF_KL, dtype=torch.float64)}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta, wd, wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.75)])
def test_kto_matches_trl(beta, wd, wu):
    want, trl_m = _trl_kto(beta, wd, wu)
    got, m = ours(beta, wd, wu)
    assert got == pytest.approx(want, abs=1e-6, rel=1e-6)
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert m[k] == pytest.approx(trl_m[k], abs=1e-5, rel=1e-6), k


def test_kto_options_are_validated():
    with pytest.raises(ConfigError, match="kto.beta"):
        KTOOptions(beta=0)
    with pytest.raises(ConfigError, match="kto.undesirable_weight"):
        KTOOptions(undesirable_weight=-1)


# ---- unpaired data ---------------------------------------------------------------------------

def test_unpaired_rows_and_kl_completions(tmp_path):
    """TRL's {prompt, completion, label} rows: string and conversational forms, response-only
    masks, and row r's KL side = row r's prompt + row r-1's completion (cyclic), as TRL builds it."""
    from make_tiny_model import make_tiny_tokenizer
    from transformers import AutoTokenizer
    from jaxalign.data.config import DataConfig
    from jaxalign.synth.tasks import write_jsonl
    from jaxalign.data.unpaired import build_unpaired_data
    make_tiny_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    # One file per form: a JSON column mixing strings and lists is not one type for `datasets`.
    strings = [{"prompt": "add 2 and 3", "completion": "five", "label": True},
               {"prompt": "say hi", "completion": "hello there", "label": True},
               {"prompt": "empty", "completion": " ", "label": False}]  # dropped: empty response
    chats = [{"prompt": [{"role": "user", "content": "name a fruit"}],
              "completion": [{"role": "assistant", "content": "a pear"}], "label": False}]
    paths = [write_jsonl(tmp_path / "s.jsonl", strings), write_jsonl(tmp_path / "c.jsonl", chats)]
    specs = [{"path": str(p)} for p in paths]
    cfg = from_dict(DataConfig, {"train": specs, "eval": specs, "seq_len": 64, "pack": False})
    data = build_unpaired_data(cfg, tok, batch_size=4)
    assert data.stats.sources[0].dropped_empty == 1 and data.stats.total().kept == 3
    batch = next(iter(data.eval))
    assert batch["tokens"].shape == (4, 2, 64)
    np.testing.assert_array_equal(batch["label"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch["pair_mask"], [1, 1, 1, 0])

    def text(r, side, trained):
        seg = batch["segment_ids"][r, side] > 0
        if trained:
            return tok.decode(batch["targets"][r, side][batch["loss_mask"][r, side] > 0])
        return tok.decode(batch["tokens"][r, side][seg])

    completions = ["five<|im_end|>", "hello there<|im_end|>", "a pear<|im_end|>"]
    for r in range(3):
        assert text(r, 0, True) == completions[r]
        assert text(r, 1, True) == completions[r - 1]  # the previous row's completion
        p = batch["prompt_len"][r]
        np.testing.assert_array_equal(batch["tokens"][r, 1, :p], batch["tokens"][r, 0, :p])
    assert "add 2 and 3" in text(0, 1, False) and "a pear" in text(0, 1, False)


# ---- training --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unpaired(prefs, tmp_path_factory):  # noqa: F811
    from jaxalign.synth import prefs as gen
    root = tmp_path_factory.mktemp("unpaired")
    train, evals = gen.write_splits(root, 256, 32, 0, kinds=("format", "concise"), unpaired=True)
    return dict(prefs, train=train, eval=evals, root=root)


@pytest.mark.slow  # trains and resumes whole runs
def test_kto_trains_and_resumes_exactly(unpaired, tmp_path):
    """6 steps straight vs 3, then the same command resumed to 6: identical metrics.jsonl; the
    held-out reward margin between desirable and undesirable completions grows from ~0."""
    kw = dict(eval_every=3, eval_batches=2, steps=6)
    straight = pref_config(KTOConfig, unpaired, unpaired["root"] / "kto", **kw)
    run_kto(straight, devices=jax.devices()[:1])
    run_kto(pref_config(KTOConfig, unpaired, tmp_path / "b", **dict(kw, steps=3)),
            devices=jax.devices()[:1])
    run_kto(pref_config(KTOConfig, unpaired, tmp_path / "b", **kw), devices=jax.devices()[:1])
    a = (unpaired["root"] / "kto" / "metrics.jsonl").read_text()
    assert a == (tmp_path / "b" / "metrics.jsonl").read_text()
    rows = read_metrics(unpaired["root"] / "kto")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["loss"] == pytest.approx(0.5, rel=1e-6)  # policy == reference: 1 - sigmoid(0)
    assert rows[0]["kl"] == 0.0
    assert rows[-1]["eval/rewards/margins"] > rows[2]["eval/rewards/margins"] > 0
    assert rows[-1]["eval/loss"] < rows[2]["eval/loss"] < 0.5


@pytest.mark.slow  # trains and resumes whole runs
def test_kto_cli_and_config(unpaired, tmp_path, caplog):
    """configs/tiny_kto.yaml parses; `jaxalign kto` runs it, shows KTO's progress line and
    prints the final metrics."""
    import json
    from pathlib import Path
    from jaxalign import cli
    from jaxalign.config import load_yaml
    path = Path(__file__).parents[1] / "configs" / "tiny_kto.yaml"
    assert from_dict(KTOConfig, load_yaml(str(path))).kto.beta == 0.1
    overrides = [f"out_dir={tmp_path}", f"model.path={unpaired['model_dir']}",
                 f"data.train=[{{path: {unpaired['train']}}}]",
                 f"data.eval=[{{path: {unpaired['eval']}}}]", "train.steps=2", "train.batch_size=8",
                 "train.eval_every=0", "train.eval_batches=1", "train.tensorboard=false"]
    with caplog.at_level(logging.INFO, logger="jaxalign.metrics"):
        assert cli.main(["kto", str(path)] + overrides) == 0
    shown = [r.getMessage() for r in caplog.records if r.name == "jaxalign.metrics"]
    assert re.fullmatch(r"step 2/2 loss \S+ acc \S+ margin \S+ kl \S+ \| eval loss .* eta 0s",
                        shown[-1]), shown
    assert json.loads((tmp_path / "run.json").read_text())["algorithm"] == "kto"
    from jaxalign.checkpoint import load_model
    cfg, _, _, _ = load_model(tmp_path)  # a KTO run dir is a model source, like a DPO one
    assert cfg.vocab_size > 0 and not cfg.lora_rank
    with pytest.raises(SystemExit) as usage:  # no config: one-line usage error, exit 2
        cli.main(["kto"])
    assert usage.value.code == 2
