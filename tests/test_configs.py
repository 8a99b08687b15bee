"""The shipped configs: the tiny ones train on every row of the data their comments make."""

from __future__ import annotations

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
