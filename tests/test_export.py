"""One export for `jaxalign export` and the pipeline's export stage: a LoRA policy and a LoRA
reward model, exported through both, give the same files; the PEFT adapters name the run's
starting model as their base (not the run's tokenizer folder) and load in peft onto it; the
reward model's adapter keeps its trained score head, so that transformers + peft score
padded pairs as we do."""

import json

import jax
import numpy as np
import pytest

from conftest import assert_bitwise_equal, pref_config, read_tensors
from jaxalign import checkpoint, cli, pipeline
from jaxalign.config import from_dict
from jaxalign.data.preference import build_preference_data
from jaxalign.models import functional, heads, lora
from jaxalign.train.dpo import DPOConfig, run_dpo
from jaxalign.train.rm import RMConfig, run_rm

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # trains two LoRA runs, then exports each four times

LORA = {"lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "down_proj"]}}


@pytest.fixture(scope="module")
def runs(prefs):
    """A LoRA DPO policy and a LoRA reward model, 3 steps each from the tiny HF model."""
    one = jax.devices()[:1]
    policy, rm = prefs["root"] / "policy_lora", prefs["root"] / "rm_lora"
    run_dpo(pref_config(DPOConfig, prefs, policy, LORA, steps=3, batch_size=8), devices=one)
    run_rm(pref_config(RMConfig, prefs, rm, LORA, steps=3, batch_size=8), devices=one)
    return {"policy": policy, "rm": rm}


def _both(run, out, *flags, dtype=None):
    """The run exported by the CLI and by the pipeline's export stage."""
    dtype_flags = ["--dtype", dtype] if dtype else []
    assert cli.main(["export", str(run), str(out / "cli"), *flags, *dtype_flags]) == 0
    stage = from_dict(pipeline.ExportConfig, {"out_dir": str(out / "stage"), "model": str(run),
                                              "adapter": "--adapter" in flags, "dtype": dtype})
    pipeline.STAGES["export"][1](stage, {}, None)
    return out / "cli", out / "stage" / "hf"


def _same_export(a, b):
    assert_bitwise_equal(read_tensors(a), read_tensors(b))
    for name in ("adapter_config.json", "config.json"):
        if (a / name).exists():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())


def _batch(prefs):
    cfg = pref_config(RMConfig, prefs, prefs["root"] / "unused")
    data = build_preference_data(cfg.data, prefs["tok"], batch_size=4)
    batch = next(iter(data.eval))
    tokens, seg = batch["tokens"].reshape(8, -1), batch["segment_ids"].reshape(8, -1)
    return np.where(seg > 0, tokens, data.pad_id), seg, data.pad_id


def test_lora_policy_adapter_agrees_and_loads_onto_its_base(runs, prefs, tmp_path):
    from transformers import AutoModelForCausalLM
    cli_dir, stage_dir = _both(runs["policy"], tmp_path, "--adapter")
    _same_export(cli_dir, stage_dir)
    config = json.loads((cli_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config.get("modules_to_save")
    assert config["base_model_name_or_path"] == str(prefs["model_dir"].resolve())

    tokens, seg, _ = _batch(prefs)
    cfg, params, _, _ = checkpoint.load_model(runs["policy"])
    cfg, merged = lora.merge(cfg, params)
    ours, _, _ = functional.apply(cfg, merged, tokens, segment_ids_BT=seg)
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"],
                                                dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(stage_dir)).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens), attention_mask=torch.tensor(seg > 0)).logits.numpy()
    real = seg > 0
    np.testing.assert_allclose(theirs[real], np.asarray(ours)[real], atol=1e-4)

    # Merged, both ways: the same LlamaForCausalLM files, in fp32 and cast to bf16.
    _same_export(*_both(runs["policy"], tmp_path / "merged"))
    bf16_cli, bf16_stage = _both(runs["policy"], tmp_path / "bf16", dtype="bfloat16")
    _same_export(bf16_cli, bf16_stage)
    assert {t.dtype for t in read_tensors(bf16_stage).values()} == {torch.bfloat16}


def test_lora_reward_model_adapter_keeps_its_score_head(runs, prefs, tmp_path):
    from transformers import AutoModelForSequenceClassification
    cli_dir, stage_dir = _both(runs["rm"], tmp_path, "--adapter")
    _same_export(cli_dir, stage_dir)
    config = json.loads((cli_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert config["base_model_name_or_path"] == str(prefs["model_dir"].resolve())
    assert "base_model.model.score.weight" in read_tensors(cli_dir)

    tokens, seg, pad = _batch(prefs)
    cfg, params, _, _ = checkpoint.load_model(runs["rm"])
    assert cfg.num_labels == 1 and cfg.lora_rank == 4
    ours = np.asarray(heads.score(*lora.merge(cfg, params), tokens, seg))
    base = AutoModelForSequenceClassification.from_pretrained(
        config["base_model_name_or_path"], num_labels=1, pad_token_id=pad, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(stage_dir)).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens),
                       attention_mask=torch.tensor(seg > 0)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert np.ptp(ours) > 0  # scores differ by row: the trained head, not a dropped one

    # Merged, both ways: the same LlamaForSequenceClassification files.
    merged_cli, merged_stage = _both(runs["rm"], tmp_path / "merged")
    _same_export(merged_cli, merged_stage)
    assert json.loads((merged_cli / "config.json").read_text())["architectures"] == \
        ["LlamaForSequenceClassification"]
