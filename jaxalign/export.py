"""Export: a trained model -> a directory that Hugging Face libraries load. One function for
`jaxalign export` and the pipeline's export stage, and the merged writer that
`train.export_hf` uses at the end of a run.

Two forms:
  merged    LoRA folded into the weights; a causal LM is written as LlamaForCausalLM, a
            reward model / classifier as LlamaForSequenceClassification (`convert/hf.py`);
            `max_shard_bytes` splits the safetensors (with an index), `dtype` casts them.
  adapter   a LoRA run as a PEFT adapter (`convert/peft.py`). Its base is the run's starting
            model as run.json records it (a directory, or a hub id pinned to the commit it
            resolved to), never the run's own folder, which holds only tokenizer files. A
            reward model's adapter is a SEQ_CLS adapter that carries the trained score head
            (`modules_to_save`).
"""

from __future__ import annotations

from pathlib import Path

from jaxalign import checkpoint
from jaxalign.config import ModelConfig
from jaxalign.convert import hf
from jaxalign.convert.peft import save_peft
from jaxalign.models import lora


def write_merged(out_dir: str | Path, cfg: ModelConfig, params, hf_config: dict, source_dir,
                 **save_kw) -> Path:
    """LoRA merged, then an HF directory that transformers loads (`hf.save`'s keywords:
    max_shard_bytes, dtype)."""
    merged_cfg, merged = lora.merge(cfg, params)
    return hf.save(out_dir, merged_cfg, merged, hf_config=hf_config, source_dir=source_dir,
                   **save_kw)


def export(model: str | Path, out_dir: str | Path, mesh=None, *, adapter: bool = False,
           revision: str | None = None, max_shard_bytes: int = 5 * 2**30,
           dtype: str | None = None) -> Path:
    """`model` (a run dir, jaxalign checkpoint, HF dir or hub id at `revision`) -> out_dir,
    merged or (`adapter`, LoRA runs only) as a PEFT adapter; returns out_dir."""
    cfg, params, hf_config, src = checkpoint.load_model(model, mesh, revision=revision)
    if not adapter:
        return write_merged(out_dir, cfg, params, hf_config, src,
                            max_shard_bytes=max_shard_bytes, dtype=dtype)
    if not cfg.lora_rank:
        raise checkpoint.ModelSourceError(f"{model}: an adapter export needs a LoRA run")
    # PEFT loads an adapter onto its base: the run's starting model, not the run's own folder.
    base, base_revision = checkpoint.run_base(model) or (str(src), None)
    return save_peft(out_dir, cfg, params, base_model_path=base, revision=base_revision)
