"""Model checkpoints in our own format, and one loader for every model source.

A jaxalign model directory (`jaxalign convert`) holds:
  jaxalign.json      {"format": "jaxalign-model", "version": 1, "hf_config": {...}}
  params/            orbax checkpoint of the param tree (restored straight onto shardings)
  tokenizer files, generation_config.json (copied from the HF source)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxalign.config import JaxalignError, ModelConfig
from jaxalign.convert import hf
from jaxalign.models import functional

log = logging.getLogger(__name__)

MODEL_FORMAT = "jaxalign-model"
MARKER = "jaxalign.json"


class ModelSourceError(JaxalignError):
    """A path is neither an HF model directory nor a jaxalign checkpoint."""


def save_model(out_dir: str | Path, cfg: ModelConfig, params: functional.Params,
               hf_config: dict[str, Any] | None, source_dir: str | Path | None = None) -> Path:
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params, force=True)
    if jax.process_index() == 0:
        meta = {"format": MODEL_FORMAT, "version": 1,
                "hf_config": hf.hf_config_for(cfg, hf_config)}
        hf.copy_side_files(source_dir, out, meta["hf_config"])
        (out / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def is_jaxalign_model(path: str | Path) -> bool:
    p = Path(path) / MARKER
    return p.exists() and json.loads(p.read_text()).get("format") == MODEL_FORMAT


def load_model(path: str | Path, mesh: Mesh | None = None, *, num_labels: int | None = None,
               seed: int = 0, **runtime):
    """Any model source -> (cfg, params, hf_config, dir holding the tokenizer files).

    Sources: an HF directory, a jaxalign model checkpoint, or a training run directory
    (latest checkpoint; LoRA runs come back with adapters, see `lora.merge`).

    `num_labels` asks for a classifier / reward model: a source that is one already must
    have that many labels; a causal LM gets its LM head dropped and a fresh score head
    (`heads.add_score_head`, initialised from `seed`), and the returned hf_config becomes a
    classifier's (`hf.hf_config_for`).
    `runtime` overrides how the model runs (dtype, scan_layers, remat), never its shape.
    """
    cfg, params, hf_config, src = _load_any(Path(path).expanduser(), mesh, **runtime)
    if num_labels is not None and num_labels != cfg.num_labels:
        if cfg.num_labels > 0:
            raise ModelSourceError(f"{path}: is a classifier with {cfg.num_labels} label(s), "
                                   f"not {num_labels}")
        from jaxalign.models import heads
        cfg, params = heads.add_score_head(cfg, params, num_labels, mesh, seed)
        hf_config = hf.hf_config_for(cfg, hf_config)
        log.info("%s: causal LM -> classifier with %d label(s) (LM head dropped, score head "
                 "initialised)", path, num_labels)
    return cfg, params, hf_config, src


def _load_any(path: Path, mesh: Mesh | None, **runtime):
    if is_jaxalign_model(path):
        meta = json.loads((path / MARKER).read_text())
        cfg = ModelConfig.from_hf(meta["hf_config"], **runtime)
        abstract = functional.abstract_params(cfg)
        if mesh is not None:
            shardings = functional.param_shardings(cfg, mesh)
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
        else:
            target = abstract
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path.absolute() / "params", target)
        return cfg, params, meta["hf_config"], path
    if (path / "config.yaml").exists() and (path / "checkpoints").is_dir():
        from jaxalign.train.runs import load_trained  # a training run: its latest checkpoint
        return load_trained(path, mesh, **runtime)
    if (path / "config.json").exists():
        cfg, params, hf_config = hf.load(path, mesh, **runtime)
        return cfg, params, hf_config, path
    raise ModelSourceError(f"{path}: not a model (expected an HF directory with config.json, "
                           f"or a jaxalign checkpoint with {MARKER})")


# ----------------------------------------------------------------------------- training runs

class TrainCheckpoints:
    """Orbax CheckpointManager over `run_dir/checkpoints`: the TrainState (restored straight
    onto its shardings) plus JSON metadata (data-loader position, controller state...)."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.dir = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state, shardings=None):
        """-> (state, meta). `abstract_state`: ShapeDtypeStructs (or arrays) of the state."""
        if shardings is not None:
            abstract_state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()
