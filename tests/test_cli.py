"""The command line's contract: one set of runtime flags on every command, and every error a
user can cause as one line (exit 1 bad input, 2 bad usage), a traceback only with --verbose."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jaxalign import cli
from jaxalign.config import from_dict, load_yaml

ROOT = Path(__file__).parents[1]
MESH = "data=2,fsdp=-1,tensor=2"
POSITIONAL = {"convert": ["hf", "out"], "export": ["run", "out"], "generate": ["m", "--prompt", "hi"],
              "eval": [str(ROOT / "configs" / "smollm2_eval.yaml")],
              "plan": [str(ROOT / "configs" / "plan_llama8b.yaml"), "--devices", "8"]}


def _commands():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    # `config` prints the reference and runs nothing: it has no mesh or dtype to set.
    return [name for name in sub.choices if name != "config"]


@pytest.mark.parametrize("command", _commands())
def test_runtime_flags_on_every_command(command):
    from jaxalign import reference
    argv = [command, *POSITIONAL.get(command, [str(ROOT / "configs" / f"tiny_{command}.yaml")])]
    args = cli.build_parser().parse_args(argv + ["--mesh", MESH, "--dtype", "bfloat16"])
    assert args.mesh.shape == (2, -1, 2) and args.dtype == "bfloat16"
    if command not in reference.CONFIGS or command in ("prepare", "pipeline"):
        # prepare computes nothing on devices; the pipeline hands the flags to each stage
        # that has the keys (tests/test_pipeline.py checks that).
        return
    # On YAML-driven commands the flags are the config keys (reference.RUNTIME_FLAGS); a
    # key=value override given too comes after them and wins.
    cls = reference.config_class(command)
    if "mesh.data" not in {k.name for k in reference.keys(cls)}:  # refused: a usage error
        with pytest.raises(SystemExit) as e:
            cli._config_overrides(args, cls)
        assert e.value.code == 2
        args.mesh = None
    overrides = cli._config_overrides(args, cls)
    cfg = from_dict(cls, load_yaml(args.config, overrides))
    dtype_key = next(o for o in overrides if o.endswith("=bfloat16")).partition("=")[0]
    assert dtype_key == "model.dtype" or dtype_key.endswith("dtype")
    node = cfg
    for part in dtype_key.split("."):
        node = getattr(node, part)
    assert node == "bfloat16"
    if args.mesh is not None:
        assert cfg.mesh.shape == (2, -1, 2)
        args.overrides = ["mesh.tensor=1"]
        assert from_dict(cls, load_yaml(args.config, cli._config_overrides(args, cls))).mesh.shape == (2, -1, 1)
    # Without the flags the YAML's own values stand.
    plain = cli.build_parser().parse_args(argv)
    assert cli._config_overrides(plain, cls) == []


def test_training_help_lists_config_sections(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["dpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--mesh" in out and "--dtype" in out and "config sections" in out
    for section in ("out_dir", "model", "data", "train", "optim", "lora", "mesh", "dpo"):
        assert f"\n  {section} " in out, section


@pytest.mark.parametrize("argv, message", [
    (["sft", "C", "--mesh", "data=two"], "argument --mesh: 'data=two' in 'data=two': want AXIS=SIZE"),
    (["sft", "C", "--mesh", "pipe=2"], "argument --mesh: 'pipe=2'"),
    (["sft", "C", "--mesh", "data=-1,fsdp=-1"], "at most one mesh axis may be -1"),
    (["dpo", "C", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["rm", "C", "train.steps"], "'train.steps' is not of the form key=value"),
    (["ppo", "C", "--bogus"], "unrecognized arguments: --bogus"),
    (["kto"], "the following arguments are required: config"),
    (["generate", "m"], "--prompt"),  # no prompt given
    (["generate", "m", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: '0': must be >= 1"),
    (["generate", "m", "--prompt", "hi", "--top-p", "2"], "--top-p: '2': must be in (0, 1]"),
    (["generate", "m", "--prompt", "hi", "--temperature", "hot"], "--temperature: 'hot' is not a number"),
    (["export", "m", "out", "--max-shard-gb", "0"], "--max-shard-gb: '0': must be > 0"),
    (["config"], "give a command name or --markdown"),
    (["config", "nope"], "argument name: invalid choice: 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_flags_are_one_line_usage_errors(argv, message, capsys):
    argv = [str(ROOT / "configs" / "tiny_sft.yaml") if a == "C" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_eval_refuses_mesh_as_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", POSITIONAL["eval"][0], "--mesh", MESH])
    assert e.value.code == 2
    assert "--mesh: this command's config has no mesh section" in capsys.readouterr().err


def test_missing_extra_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whatever the venv has
    for command in ("sft", "ppo"):
        argv = [command, str(ROOT / "configs" / f"tiny_{command}.yaml"), "train.wandb_project=x"]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["jaxalign: error: train.wandb_project=x needs the wandb package, which is "
                       "not installed: pip install 'jaxalign[wandb]'"], err
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "\nwandb = [" in pyproject  # the extra the message names exists


@pytest.mark.parametrize("override, message", [
    ("train=null", "train: expected a section of keys, got null"),
    ("train.batch_size=null", "train.batch_size: null is not allowed here"),
    ("data.seq_len=many", "data.seq_len: expected a number, got 'many'"),
    ("train.bogus=1", "unknown config key 'train.bogus'"),
    ("model.path=/no/such/model", "/no/such/model"),
    ("model.remat=half", "model.remat 'half' is not one of"),   # named as the key, before loading
    ("train.batch_size=1e400", "train.batch_size: expected a finite number"),
    ("model=foo", "model: expected a section of keys, got 'foo'"),
    ("data.train.path=x", "override 'data.train.path=x': data.train is [{'path': "),
])
def test_bad_input_is_one_line_exit_1(override, message, tmp_path, capsys):
    argv = ["sft", str(ROOT / "configs" / "tiny_sft.yaml"), f"out_dir={tmp_path}", override]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxalign: error: ") and message in err[0], err


def test_verbose_adds_the_traceback(tmp_path, capsys):
    argv = ["sft", str(ROOT / "configs" / "tiny_sft.yaml"), "model.path=/no/such/model"]
    assert cli.main(argv) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert cli.main(["-v"] + argv) == 1
    assert "Traceback" in capsys.readouterr().err


def test_verbose_before_or_after_the_command():
    parse = cli.build_parser().parse_args
    assert parse(["-v", "sft", "c.yaml"]).verbose and parse(["sft", "c.yaml", "-v"]).verbose
    assert not parse(["sft", "c.yaml"]).verbose
