"""What jaxalign never does: unpickle weights (only safetensors are read), run a model's or
tokenizer's own code (trust_remote_code), or write outside the paths it is given. Each has a
grep over the package and a behavioural check with a booby-trapped input.

(A reward function's exception failing the iteration with the checkpoint intact is tested
in test_ppo.py: test_bad_reward_function_keeps_last_iteration.)"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import child_xla_flags

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxalign"

# (pattern, why it is banned) over every module of the package, comments included.
BANNED = [
    (r"\bimport\s+(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\b", "unpickling"),
    (r"\bfrom\s+(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\s+import\b", "unpickling"),
    (r"\b(pickle|torch|joblib|dill)\.loads?\(", "unpickling"),
    (r"allow_pickle\s*=\s*True", "unpickling"),
    (r"trust_remote_code\s*=\s*(True|[^F\s)])", "running a model's own code"),
    (r"\bAutoModel\w*\.from_pretrained\(", "transformers model loading (torch weights)"),
    (r"\bimport\s+torch\b|\bfrom\s+torch\b", "torch (weights via safetensors only)"),
]


def test_no_pickle_no_remote_code_in_the_package():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, why in BANNED:
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {why}: {line.strip()}")
    assert not found, "\n".join(found)


class _Trap:
    """Unpickling this creates `marker`: proof that something unpickled it."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("safety")
    model = make_tiny_model(root / "model")
    data = root / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"What is {i} plus 2?",
                                "completion": f" The answer is {i + 2}."}) + "\n")
    return dict(root=root, model=model, data=data / "train.jsonl")


def test_pickled_weights_are_refused_never_unpickled(tiny, tmp_path):
    """An HF directory with only pytorch_model.bin (a pickle that would write a file when
    loaded): refused with one line naming the directory, and never unpickled."""
    from jaxalign import cli
    bad = tmp_path / "pickled"
    shutil.copytree(tiny["model"], bad)
    for f in bad.glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "UNPICKLED"
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    r = subprocess.run([sys.executable, "-m", "jaxalign.cli", "convert", str(bad),
                        str(tmp_path / "out")], capture_output=True, text=True,
                       env=dict(os.environ, JAXALIGN_COMPILE_CACHE="off"), timeout=300)
    assert r.returncode == 1
    assert "only safetensors checkpoints are read" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists()
    # The check is not vacuous: unpickling the file does write the marker.
    pickle.loads((bad / "pytorch_model.bin").read_bytes())
    assert marker.exists()
    del cli


def test_remote_code_in_a_model_dir_never_runs(tiny, tmp_path):
    """config.json and tokenizer_config.json with an auto_map to a module that writes a file
    when imported: the model and tokenizer load (by our own Llama code and the fast
    tokenizer), the module never runs."""
    from jaxalign.checkpoint import load_model
    from jaxalign.tokenizer import load_tokenizer
    d = tmp_path / "remote"
    shutil.copytree(tiny["model"], d)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                               "class EvilForCausalLM: pass\nclass EvilTokenizer: pass\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    model_cfg, params, _, _ = load_model(d)
    tok = load_tokenizer(d)
    assert model_cfg.num_layers >= 1 and tok("What is 2 plus 2?")["input_ids"]
    assert not marker.exists()
    sys.path.insert(0, str(d))
    try:                      # not vacuous: importing the module does write the marker
        __import__("evil")
    finally:
        sys.path.remove(str(d))
    assert marker.exists()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_runs_and_exports_write_only_where_told(tiny, tmp_path):
    """`jaxalign sft` (with export_hf) and `jaxalign export` from a working directory, with
    HOME in the sandbox: every file written lies in out_dir, the export directory or the
    documented caches (HOME/.cache/jaxalign compiled programs, HOME/.cache/huggingface
    datasets); the inputs and the working directory are untouched."""
    box = tmp_path / "box"
    inputs, cwd, home = box / "inputs", box / "cwd", box / "home"
    shutil.copytree(tiny["model"], inputs / "model")
    shutil.copy(tiny["data"], inputs / "train.jsonl")
    cwd.mkdir()
    home.mkdir()
    before = _snapshot(box)
    time.sleep(0.01)
    env = dict(os.environ, HOME=str(home),
               XLA_FLAGS=child_xla_flags("--xla_force_host_platform_device_count=1"))
    env.pop("JAXALIGN_CACHE", None)
    env.pop("HF_HOME", None)
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("JAXALIGN_COMPILE_CACHE", None)
    run, export = box / "out" / "run", box / "out" / "export"
    cmds = [["sft", str(ROOT / "configs" / "tiny_sft.yaml"), f"out_dir={run}",
             f"model.path={inputs / 'model'}", f"data.train=[{{path: {inputs / 'train.jsonl'}}}]",
             "train.steps=2", "train.batch_size=8", "train.export_hf=true",
             "train.progress=false"],
            ["export", str(run), str(export)]]
    for cmd in cmds:
        r = subprocess.run([sys.executable, "-m", "jaxalign.cli", *cmd], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    after = _snapshot(box)
    changed = {k for k, v in after.items() if before.get(k) != v}
    allowed = ("out/run/", "out/export/", "home/.cache/jaxalign/", "home/.cache/huggingface/")
    assert {k for k in changed if not k.startswith(allowed)} == set()
    assert any(k.startswith("out/run/checkpoints/") for k in changed)
    assert any(k.startswith("out/export/") for k in changed) and (run / "hf").is_dir()
    assert not list(cwd.iterdir())
