"""Data formats users bring from TRL: paired preference rows for KTO (unpaired as TRL's
`unpair_preference_dataset` does, row for row), `format: unpaired` by name, and a per-row
`margin` column for reward models (TRL's RewardTrainer.compute_loss itself as the reference)."""

import json
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import ConfigError, from_dict
from jaxalign.data.config import DataConfig, DatasetSpec
from jaxalign.data.pairs import normalise_pairs
from jaxalign.data.preference import build_preference_data
from jaxalign.data.sources import DataError, load_rows
from jaxalign.data.unpaired import build_unpaired_data, unpair
from jaxalign.train.kto import KTOConfig, run_kto
from conftest import pref_config, read_metrics

PAIRS = [{"prompt": "add 2 and 3", "chosen": "five", "rejected": "six", "id": 0},
         {"prompt": "say hi", "chosen": "hello there", "rejected": "go away", "id": 1},
         {"prompt": "name a fruit", "chosen": "a pear", "rejected": "a brick", "id": 2}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paired_rows_unpaired_as_trl(tmp_path):
    """Our labelled rows from {prompt, chosen, rejected} equal TRL's unpair_preference_dataset
    on the same rows: same prompt, completion, label, extra column, in the same order, also
    across TRL's 1000-row map batches."""
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    rows = [dict(r, id=i, prompt=f"{r['prompt']} #{i}") for i in range(1205)
            for r in PAIRS[i % 3:i % 3 + 1]]
    source = load_rows(DatasetSpec(path=str(_write(tmp_path / "p.jsonl", rows))))
    pairs, _ = normalise_pairs(source, "preference")
    ours = [(x.plain[0], x.plain[1], x.label, rows[x.row]["id"]) for x in unpair(pairs)]
    theirs = [(r["prompt"], r["completion"], r["label"], r["id"])
              for r in unpair_preference_dataset(Dataset.from_list(rows))]
    assert len(ours) == 2 * len(rows) and ours == theirs
    assert ours[1000] == ("add 2 and 3 #0", "six", False, 0)   # block 1: its rejected rows


def test_kto_data_from_paired_and_named_unpaired(tmp_path):
    """`jaxalign kto`'s data from a paired file (auto-detected, or format: preference) and
    from unpaired rows named `format: unpaired`: labels and completions as expected."""
    from make_tiny_model import make_tiny_tokenizer
    from transformers import AutoTokenizer
    make_tiny_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    paired = _write(tmp_path / "pairs.jsonl", PAIRS)
    unpaired = _write(tmp_path / "unpaired.jsonl",
                      [{"prompt": "q", "completion": "yes", "label": True},
                       {"prompt": "q", "completion": "no", "label": False}])
    for spec in ({"path": str(paired)}, {"path": str(paired), "format": "preference"}):
        cfg = from_dict(DataConfig, {"train": [spec], "eval": [spec], "seq_len": 64,
                                     "pack": False})
        data = build_unpaired_data(cfg, tok, batch_size=6)
        batch = next(iter(data.eval))
        np.testing.assert_array_equal(batch["label"], [1, 1, 1, 0, 0, 0])
        done = [tok.decode(batch["targets"][r, 0][batch["loss_mask"][r, 0] > 0]) for r in range(6)]
        assert done == [f"{c}<|im_end|>" for c in ("five", "hello there", "a pear", "six",
                                                   "go away", "a brick")]
        assert data.stats.sources[0].format == "preference -> unpaired"
    spec = {"path": str(unpaired), "format": "unpaired"}
    cfg = from_dict(DataConfig, {"train": [spec], "eval": [spec], "seq_len": 64, "pack": False})
    batch = next(iter(build_unpaired_data(cfg, tok, batch_size=2).eval))
    np.testing.assert_array_equal(batch["label"], [1, 0])
    with pytest.raises(ConfigError, match="format 'unpaired_rows' is not one of"):
        from_dict(DataConfig, {"train": [{"path": "x", "format": "unpaired_rows"}]})


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_kto_trains_from_paired_rows(prefs, tmp_path):  # noqa: F811
    """`jaxalign kto` on the synthetic *paired* preference set, no conversion by the user:
    it trains and the held-out desirable / undesirable margin moves up from 0."""
    cfg = pref_config(KTOConfig, prefs, tmp_path, steps=6, batch_size=8, eval_every=3,
                  eval_batches=2)
    run_kto(cfg, devices=jax.devices()[:1])
    rows = read_metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(0.5, rel=1e-6)    # policy == reference
    assert rows[-1]["eval/rewards/margins"] > 0


def _trl_compute_loss(r_chosen, r_rejected, margin=None, center=None):
    """TRL 1.16's RewardTrainer.compute_loss, unbound, on given scores: the model returns
    logits = [chosen; rejected], as TRL's collator stacks them."""
    import torch
    from trl import RewardTrainer

    logits = torch.tensor(np.concatenate([r_chosen, r_rejected]), dtype=torch.float64)[:, None]
    model = lambda **kw: types.SimpleNamespace(logits=logits)
    ident = lambda x: x
    me = types.SimpleNamespace(model=types.SimpleNamespace(training=False),
                               args=types.SimpleNamespace(center_rewards_coefficient=center),
                               accelerator=types.SimpleNamespace(gather=ident,
                                                                 gather_for_metrics=ident),
                               _metrics=defaultdict(lambda: defaultdict(list)),
                               _total_train_tokens=0)
    inputs = {"input_ids": None, "attention_mask": None}
    if margin is not None:
        inputs["margin"] = torch.tensor(margin, dtype=torch.float64)
    return float(RewardTrainer.compute_loss(me, model, inputs))


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_rm_margin_column_is_trls_formula(prefs, tmp_path):  # noqa: F811
    """A preference file with a `margin` column: the batches carry it, and our reward-model
    loss on a real tiny reward model equals TRL's compute_loss on the same scores and margins
    (-logsigmoid(r_c - r_r - margin)); without the column it is TRL's plain loss. A
    non-numeric margin is refused naming the row."""
    from jaxalign import checkpoint
    from jaxalign.train.rm import RMOptions, rm_loss_fn
    from jaxalign.data.layout import branch_layout
    from jaxalign.models import heads

    rows = [dict(r, margin=m) for r, m in zip(PAIRS, (0.5, 0.0, 2.25))]
    path = _write(tmp_path / "m.jsonl", rows)
    cfg_data = from_dict(DataConfig, {"train": [str(path)], "eval": [str(path)], "seq_len": 64,
                                      "pack": False})
    data = build_preference_data(cfg_data, prefs["tok"], batch_size=4)
    batch = next(iter(data.eval))
    np.testing.assert_array_equal(batch["margin"], [0.5, 0.0, 2.25, 0.0])   # 4th: a filler
    cfg, params, _, _ = checkpoint.load_model(prefs["model_dir"], num_labels=1, seed=3)
    rr = {k: jnp.asarray(batch[k].reshape(-1, batch[k].shape[-1]))
          for k in ("tokens", "segment_ids", "positions")}
    # The loss reads the pairs laid out as one row each, as training does.
    dev = {k: jnp.asarray(v) for k, v in branch_layout(batch, share=True,
                                                        pad_id=data.pad_id).items()}
    r = np.asarray(heads.score(cfg, params, rr["tokens"], rr["segment_ids"], rr["positions"]),
                   np.float64).reshape(-1, 2)[:3]
    assert np.ptp(r) > 1e-3   # the scores differ: the margin really shifts each pair
    for opts, margin in ((RMOptions(), [0.5, 0.0, 2.25]),
                         (RMOptions(margin=1.0, center_coef=0.01), [1.5, 1.0, 3.25])):
        loss, _ = rm_loss_fn(cfg, opts)(params, {}, dev, jax.random.key(0))
        want = _trl_compute_loss(r[:, 0], r[:, 1], margin, opts.center_coef or None)
        assert float(loss) == pytest.approx(want, rel=2e-5, abs=1e-6)
    plain = dict(dev, margin=jnp.zeros_like(dev["margin"]))
    loss, _ = rm_loss_fn(cfg, RMOptions())(params, {}, plain, jax.random.key(0))
    assert float(loss) == pytest.approx(_trl_compute_loss(r[:, 0], r[:, 1]), rel=2e-5)
    _write(path, [dict(PAIRS[0], margin="big")])
    with pytest.raises(DataError, match=r"m.jsonl.*row 0.*'margin' must be a number"):
        build_preference_data(cfg_data, prefs["tok"], batch_size=4)
