"""The shipped configs: the tiny ones train on every row of the data their comments make."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import shlex
from pathlib import Path

import pytest

from jaxalign.config import from_dict, load_yaml

ROOT = Path(__file__).parents[1]
SUPERVISED = ["sft", "rm", "dpo", "kto", "orpo", "simpo"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The data every tiny config names, made by the commands in its comments."""
    from make_tiny_model import make_tiny_tokenizer
    root = tmp_path_factory.mktemp("shipped")
    done = set()
    for name in SUPERVISED:
        for line in (ROOT / "configs" / f"tiny_{name}.yaml").read_text().splitlines():
            m = re.match(r"#\s+python -m (jaxalign\.synth\.\w+) (.*)", line)
            if m and line not in done:
                done.add(line)
                args = shlex.split(m.group(2))
                args[0] = str(root / args[0])
                assert importlib.import_module(m.group(1)).main(args) == 0
    return root, make_tiny_tokenizer(root / "tok")


@pytest.mark.parametrize("name", SUPERVISED)
def test_tiny_configs_train_on_every_row(shipped, name, caplog):
    from jaxalign.train.recipes import RECIPES
    from jaxalign.data.pipeline import build_sft_data
    from jaxalign.data.preference import build_preference_data
    from jaxalign.data.unpaired import build_unpaired_data
    root, tok = shipped
    command = {"orpo": "dpo", "simpo": "dpo"}.get(name, name)
    cls, _ = RECIPES[command].load()
    cfg = from_dict(cls, load_yaml(str(ROOT / "configs" / f"tiny_{name}.yaml")))
    cwd = os.getcwd()
    os.chdir(root)  # the configs name data/... relative to where the command runs
    try:
        build = {"sft": build_sft_data, "kto": build_unpaired_data}.get(command, build_preference_data)
        with caplog.at_level(logging.WARNING):
            data = build(cfg.data.replace(cache_dir=str(root / "hf")), tok,
                         batch_size=cfg.train.batch_size)
    finally:
        os.chdir(cwd)
    total = data.stats.total()
    assert total.rows > 0 and total.kept == total.rows, data.stats.summary()
    assert total.truncated == 0, data.stats.summary()
    assert not [r for r in caplog.records if "seq_len" in r.getMessage()]


@pytest.mark.parametrize("name", ["ppo", "rloo"])
def test_tiny_rl_configs_keep_every_prompt(shipped, name, tmp_path):
    from jaxalign.synth.tasks import main as make_tasks
    from jaxalign.train.rl.config import RLConfig
    from jaxalign.train.rl.prompts import read_prompts
    root, tok = shipped
    line = next(l for l in (ROOT / "configs" / f"tiny_{name}.yaml").read_text().splitlines()
                if "python -m jaxalign.synth.tasks" in l)
    args = shlex.split(line.split("jaxalign.synth.tasks", 1)[1])
    assert make_tasks([str(tmp_path / args[0])] + args[1:]) == 0
    cfg = from_dict(RLConfig, load_yaml(str(ROOT / "configs" / f"tiny_{name}.yaml")))
    spec = cfg.data.prompts
    data = dataclasses.replace(cfg.data, prompts=dataclasses.replace(
        spec, path=str(tmp_path / spec.path)))
    prompts = read_prompts(data, tok)
    rows = (tmp_path / spec.path).read_text().count("\n")
    assert len(prompts.ids) == rows == 2000


# ---- the config reference (`jaxalign config`, docs/config.md) ----------------------------------

def _expected_keys(cls, prefix=""):
    """Every field of `cls` and of every config class reachable from it, as a dotted key; an
    independent walk of the dataclasses (not `reference.keys`)."""
    import dataclasses
    import typing
    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        hint = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            out += _expected_keys(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
            out += _expected_keys(args[0], f"{prefix}{f.name}[].")
        else:
            for a in args:
                if dataclasses.is_dataclass(a):
                    out += _expected_keys(a, f"{prefix}{f.name}.")
    return out


@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "kto", "ppo", "eval"])
def test_config_output_covers_every_field_of_every_config_class(name, capsys):
    from jaxalign import cli, reference
    assert name in reference.CONFIGS
    assert cli.main(["config", name]) == 0
    out = capsys.readouterr().out
    printed = {line.split()[0].rstrip(":") for line in out.splitlines()[2:] if line.strip()}
    expected = _expected_keys(reference.config_class(name))
    assert len(expected) > 5 and set(expected) <= printed, set(expected) - printed
    rows = {k.name: k for k in reference.keys(reference.config_class(name))}
    assert not [k for k in expected if not rows[k].meaning], "fields without a meaning"
    assert not [k for k in expected if not rows[k].type]


def test_reference_reads_types_defaults_and_section_defaults():
    from jaxalign import reference
    rows = {k.name: k for k in reference.keys(reference.config_class("ppo"))}
    assert (rows["train.iterations"].type, rows["train.iterations"].default) == ("int", "required")
    assert rows["optim.lr"].default == "1e-05"   # RLConfig's own OptimConfig(lr=1e-5)
    assert rows["optim.schedule"].type == "constant | linear | cosine"
    assert rows["ppo.kl_target"].type == "float or null"
    assert rows["reward.functions"].type == "list of str"
    assert rows["grpo.scale_rewards"].meaning.startswith("divide by the group's std (False: Dr. GRPO")
    sft = {k.name: k for k in reference.keys(reference.config_class("sft"))}
    assert sft["data.train[].path"].default == "required"
    assert sft["lora.targets"].default == "[q_proj, v_proj]"


def test_docs_config_md_is_fresh():
    from jaxalign import reference
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == reference.render_markdown(), (
        "docs/config.md is stale: run `jaxalign config --markdown > docs/config.md`")


def test_missing_required_key_is_one_line_naming_it(tmp_path, capsys):
    from jaxalign import cli
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out_dir: x\nmodel: {path: m}\ndata: {train: [a.jsonl]}\ntrain: {steps: 8}\n")
    assert cli.main(["sft", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jaxalign: error: missing required key 'train.batch_size'; `jaxalign config` "
                   "lists every key"], err
    cfg.write_text("out_dir: x\nmodel: {path: m}\ndata: {train: [a.jsonl]}\n")
    assert cli.main(["sft", str(cfg)]) == 1
    assert capsys.readouterr().err.startswith("jaxalign: error: missing required key 'train'")


def test_a_single_item_may_stand_for_a_list():
    from jaxalign.config import LoRAConfig
    assert from_dict(LoRAConfig, {"targets": "q_proj"}).targets == ("q_proj",)
    assert from_dict(LoRAConfig, {"targets": ["q_proj", "v_proj"]}).targets == ("q_proj", "v_proj")
