"""Model checkpoints in our own format, training checkpoints, and one loader for every
model source.

A jaxalign model directory (`jaxalign convert`) holds:
  jaxalign.json      {"format": "jaxalign-model", "version": 1, "hf_config": {...}}
  params/            orbax checkpoint of the param tree (restored straight onto shardings)
  tokenizer files, generation_config.json (copied from the HF source)

A training run directory describes itself (`describe_run`, called by every algorithm when
it starts):
  run.json           {"format": "jaxalign-run", "version": 2, "algorithm", "hf_config",
                      "lora": {rank, alpha, dropout, targets}, "policy_path", "base",
                      "base_revision"}  (base: an absolute path, or a hub id pinned to the
                      commit hash it resolved to)
  model/             the tokenizer files and generation_config.json of the starting model
  checkpoints/       orbax TrainStates; the model's trained params sit in state.params at
                     `policy_path` (PPO: ["policy"], beside the value head / critic)
`load_model(run_dir)` restores only that subtree (an orbax partial restore: no optimizer
state, no value head, no reward model or critic is built) and imports nothing from
`jaxalign.train`. A full fine-tune needs nothing else: its checkpoint holds every weight.
A LoRA run saves only what trained (adapters, and a fresh score head); like a PEFT adapter
it reads its frozen base weights from `base`, which must still exist (a hub base: in the
hub cache or on the hub, at `base_revision`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxalign import faults, manifest, rundir, sharding
from jaxalign.config import JaxalignError, MeshConfig, ModelConfig
from jaxalign.convert import hf, hub
from jaxalign.models import functional, heads, lora

log = logging.getLogger(__name__)

MODEL_FORMAT = "jaxalign-model"
MARKER = "jaxalign.json"


class ModelSourceError(JaxalignError):
    """A path is neither an HF model directory nor a jaxalign checkpoint."""


def save_model(out_dir: str | Path, cfg: ModelConfig, params: functional.Params,
               hf_config: dict[str, Any] | None, source_dir: str | Path | None = None) -> Path:
    """A jaxalign model directory (module docstring). `out_dir` is replaced whole, and
    refused when it holds files jaxalign did not write (`rundir.replacing`)."""
    out = Path(out_dir).expanduser().absolute()
    with rundir.replacing(out, "jaxalign model", sources=[source_dir]) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params, force=True)
        if jax.process_index() == 0:
            meta = {"format": MODEL_FORMAT, "version": 1,
                    "hf_config": hf.hf_config_for(cfg, hf_config)}
            hf.copy_side_files(source_dir, tmp, meta["hf_config"])
            (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def is_jaxalign_model(path: str | Path) -> bool:
    p = Path(path) / MARKER
    return p.exists() and json.loads(p.read_text()).get("format") == MODEL_FORMAT


def load_model(path: str | Path, mesh: Mesh | None = None, *, num_labels: int | None = None,
               seed: int = 0, revision: str | None = None, **runtime):
    """Any model source -> (cfg, params, hf_config, dir holding the tokenizer files).

    Sources: an HF directory, a jaxalign model checkpoint, a training run directory
    (latest checkpoint; LoRA runs come back with adapters, see `lora.merge`), or a hub id
    `org/name` at `revision` (`convert.hub`: from the hub cache, fetched when online).

    `num_labels` asks for a classifier / reward model: a source that is one already must
    have that many labels; a causal LM gets its LM head dropped and a fresh score head
    (`heads.add_score_head`, initialised from `seed`), and the returned hf_config becomes a
    classifier's (`hf.hf_config_for`).
    `runtime` overrides how the model runs (dtype, scan_layers, remat), never its shape.
    """
    cfg, params, hf_config, src = _load_any(hub.resolve(path, revision), mesh, **runtime)
    if num_labels is not None and num_labels != cfg.num_labels:
        if cfg.num_labels > 0:
            raise ModelSourceError(f"{path}: is a classifier with {cfg.num_labels} label(s), "
                                   f"not {num_labels}")
        cfg, params = heads.add_score_head(cfg, params, num_labels, mesh, seed)
        hf_config = hf.hf_config_for(cfg, hf_config)
        log.info("%s: causal LM -> classifier with %d label(s) (LM head dropped, score head "
                 "initialised)", path, num_labels)
    if cfg.num_labels > 0 and cfg.pad_token_id is None:
        cfg, hf_config = _with_tokenizer_pad(cfg, hf_config, src)
    return cfg, params, hf_config, src


def _with_tokenizer_pad(cfg: ModelConfig, hf_config: dict[str, Any], tok_dir: Path):
    """A classifier whose config.json names no pad id scores by its tokenizer's pad (the one
    the data pipeline pads with; eos when the tokenizer has none), and its config says so,
    so that training, eval, RL and an HF export all score the same token."""
    if not (Path(tok_dir) / "tokenizer.json").exists():
        return cfg, hf_config
    from jaxalign.tokenizer import load_tokenizer
    pad = load_tokenizer(tok_dir).pad_token_id
    if pad is None:
        return cfg, hf_config
    log.info("%s: config.json names no pad_token_id; the classifier scores by the tokenizer's "
             "pad id %d", tok_dir, pad)
    return cfg.replace(pad_token_id=int(pad)), {**hf_config, "pad_token_id": int(pad)}


def _load_any(path: Path, mesh: Mesh | None, **runtime):
    if is_jaxalign_model(path):
        meta = json.loads((path / MARKER).read_text())
        cfg = ModelConfig.from_hf(meta["hf_config"], **runtime)
        target = functional.abstract_params(cfg)
        if mesh is not None:
            target = _sharded(target, functional.param_shardings(cfg, mesh))
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path.absolute() / "params", target)
        return cfg, params, meta["hf_config"], path
    if (path / "checkpoints").is_dir() and (path / "config.yaml").exists():
        return load_run(path, mesh, **runtime)
    if (path / "config.json").exists():
        cfg, params, hf_config = hf.load(path, mesh, **runtime)
        return cfg, params, hf_config, path
    raise ModelSourceError(f"{path}: not a model (expected an HF directory with config.json, "
                           f"or a jaxalign checkpoint with {MARKER})")


def _step_dirs(ckpt_dir: Path):
    """(step, path) of every step directory orbax finalised (temporary ones are not ints)."""
    if not ckpt_dir.is_dir():
        return
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.isdigit():
            yield int(p.name), p


def _free_name(path: Path) -> Path:
    n, out = 1, path
    while out.exists():
        out, n = path.with_name(f"{path.name}-{n}"), n + 1
    return out


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _sharded(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


# ----------------------------------------------------------------------------- training runs

RUN_FORMAT = "jaxalign-run"
RUN_MARKER = "run.json"
LORA_FIELDS = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "targets": "lora_targets"}


def describe_run(run_dir: str | Path, *, algorithm: str, cfg: ModelConfig,
                 hf_config: dict[str, Any], base: str | None, tokenizer_dir: str | Path | None,
                 policy_path: tuple[str, ...] = (), base_revision: str | None = None) -> None:
    """Writes run.json and model/ (see the module docstring). `cfg`: the trained model
    (LoRA settings included); `hf_config`: its config.json as `ModelConfig.from_hf` reads it;
    `base`: the starting model's path or hub id (at `base_revision`: a hub id is recorded
    with the commit hash it resolves to, so a later load reads the same weights);
    `policy_path`: the model's key path in state.params."""
    if jax.process_index() != 0:
        return
    run_dir = Path(run_dir)
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    hf.copy_side_files(tokenizer_dir, run_dir / "model", hf_config)
    meta = {"format": RUN_FORMAT, "version": 2, "algorithm": algorithm,
            "hf_config": hf.hf_config_for(cfg, hf_config),
            "lora": {k: getattr(cfg, f) for k, f in LORA_FIELDS.items()},
            "policy_path": list(policy_path), "base": None, "base_revision": None}
    if base is not None and hub.is_hub_id(base):
        meta.update(base=str(base), base_revision=hub.commit_of(base, base_revision))
    elif base is not None:
        meta["base"] = str(Path(base).expanduser().absolute())
        meta["base_fingerprint"] = fingerprint(base)
    rundir.write_atomic(run_dir / RUN_MARKER, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def fingerprint(path: str | Path) -> str | None:
    """What identifies the model in directory `path` cheaply, without reading its weights:
    the bytes of its descriptions (config.json, jaxalign.json, run.json, the safetensors
    index), the name and size of every top-level weight file, and a run's newest step.
    None for a hub id (pinned by its commit instead)."""
    import hashlib
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.name == RUN_MARKER:      # what the run trains, not how run.json is laid out
            meta = read_run(path) or {}
            what = {k: meta.get(k) for k in ("algorithm", "hf_config", "lora", "policy_path")}
            h.update(json.dumps(what, sort_keys=True).encode() + b"\0")
        elif p.name in ("config.json", MARKER, "model.safetensors.index.json"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        elif p.suffix in (".safetensors", ".bin") and p.is_file():
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    steps = [s for s, _ in _step_dirs(path / "checkpoints")]
    if steps:
        h.update(f"step {max(steps)}".encode())
    return h.hexdigest()[:16]


def read_run(run_dir: str | Path) -> dict | None:
    """run.json of `run_dir`, or None when it is missing, empty or torn."""
    meta = rundir.read_json(Path(run_dir) / RUN_MARKER)
    return meta if meta is not None and meta.get("format") == RUN_FORMAT else None


def has_checkpoints(run_dir: str | Path) -> bool:
    return any(_step_dirs(Path(run_dir) / "checkpoints"))


def run_base(run_dir: str | Path) -> tuple[str | None, str | None] | None:
    """A run directory's starting model as run.json records it: (path or hub id, commit of a
    hub id); None when `run_dir` is no run (or its run.json is unreadable)."""
    meta = read_run(run_dir)
    if meta is None:
        return None
    base, revision = meta.get("base"), meta.get("base_revision")
    if base and revision and not base.startswith(hub.HUB_PREFIX) and not Path(base).is_absolute():
        base = hub.HUB_PREFIX + base   # run.json before hub ids were written hf://org/name
    return base, revision


def _subtree(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _nest(path, tree):
    for key in reversed(path):
        tree = {key: tree}
    return tree


def _restrict(tree: dict, keys: dict, keep: bool) -> dict:
    """The part of nested dict `tree` whose leaves are (keep) or are not (not keep) in `keys`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _restrict(v, keys.get(k) or {}, keep) if (k in keys or not keep) else {}
            if sub:
                out[k] = sub
        elif (k in keys) == keep:
            out[k] = v
    return out


def load_run(run_dir: Path, mesh: Mesh | None = None, **runtime):
    """A training run directory -> (cfg, params, hf_config, tokenizer dir), from its latest
    checkpoint; LoRA runs come back with base weights and adapters (merge to export)."""
    meta = read_run(run_dir)
    if meta is None:
        raise ModelSourceError(f"{run_dir}: a run directory without a readable model "
                               f"description ({RUN_MARKER} missing, empty, torn or of an older "
                               f"version); rerun its training command (it resumes and writes one)")
    lora_cfg = {f: meta["lora"][k] for k, f in LORA_FIELDS.items()}
    lora_cfg["lora_targets"] = tuple(lora_cfg["lora_targets"])   # a JSON list
    cfg = ModelConfig.from_hf(meta["hf_config"], **runtime).replace(**lora_cfg)
    if mesh is None:
        mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    target = _sharded(functional.abstract_params(cfg), functional.param_shardings(cfg, mesh))
    ckpts = TrainCheckpoints(run_dir)
    step = ckpts.latest_step()
    if step is None:
        ckpts.close()
        raise ModelSourceError(f"{run_dir}: a run directory without checkpoints")
    policy_path = ("params", *meta["policy_path"])
    saved = _subtree(ckpts.state_metadata(step), policy_path)
    trained = ckpts.restore_subtree(step, policy_path, _restrict(target, saved, keep=True))
    ckpts.close()
    if _restrict(target, saved, keep=False):  # a LoRA run: the frozen base from its source
        base, revision = run_base(run_dir)
        if base is None or not (Path(base).exists() or hub.is_hub_id(base)):
            raise ModelSourceError(f"{run_dir}: a LoRA run saves only its adapters; its base "
                                   f"model {base} is needed and does not exist")
        base_cfg, base_params, _, _ = load_model(base, mesh, num_labels=cfg.num_labels or None,
                                                 revision=revision, **runtime)
        if base_cfg.lora_rank > 0 and lora.split(base_params)[0]:
            # The base is itself a LoRA run (e.g. RL or a reward model on an SFT run): training
            # started from its adapters folded in (`setup.load_policy`); without this its own
            # adapters' names would drop them and leave the untuned weights under this run's.
            _, base_params = lora.merge(base_cfg, base_params)
        trained = lora.combine(trained, _restrict(base_params, saved, keep=False))
    log.info("loaded %s run %s at step %d", meta["algorithm"], run_dir, step)
    return cfg, trained, meta["hf_config"], run_dir / "model"


class TrainCheckpoints:
    """Orbax CheckpointManager over `run_dir/checkpoints`: the TrainState (restored straight
    onto its shardings) plus JSON metadata (data-loader position, controller state...).

    Every step gets an integrity manifest once orbax finished it (`jaxalign.manifest`);
    `latest_step` is the newest *complete* step: a newer one that is half written, truncated
    or corrupted is skipped with a warning and, with `set_aside_incomplete` (a run that will
    write on), moved to `run_dir/checkpoints.incomplete/` so that orbax never sees it."""

    def __init__(self, run_dir: str | Path, keep: int = 3, *, set_aside_incomplete: bool = False):
        self.dir = Path(run_dir).absolute() / "checkpoints"
        self.keep = keep
        self.saved_t = time.monotonic()     # for time-based saves (train.save_every_minutes)
        fresh = not any(_step_dirs(self.dir))
        self._latest = self._newest_complete(set_aside_incomplete)
        # max_to_keep=None: orbax would delete the previous step inside save(), before this
        # step's manifest exists; a kill there would leave no complete checkpoint. We delete
        # old steps ourselves, after the manifest (`_retire`).
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=options)
        if fresh and jax.process_index() == 0:
            manifest.mark_dir(self.dir)

    def _newest_complete(self, set_aside: bool) -> int | None:
        if not set_aside:
            return self._scan(False)
        # Process 0 moves what is incomplete; the others scan once it is done (not while
        # directories move under them), and find the same step.
        found = self._scan(True) if jax.process_index() == 0 else None
        _barrier("jaxalign_checkpoints_scanned")
        return found if jax.process_index() == 0 else self._scan(False)

    def _scan(self, set_aside: bool) -> int | None:
        strict = manifest.requires_manifests(self.dir)
        skipped = False
        for step, path in sorted(_step_dirs(self.dir), reverse=True):
            problem = manifest.problem(path)
            if problem is None:
                if skipped:
                    log.warning("%s: using checkpoint %d, the newest complete one", self.dir, step)
                return step
            if not strict and not (path / manifest.MANIFEST).exists():
                log.warning("%s: checkpoint %d has no integrity manifest (written before "
                            "jaxalign checked them); trusting orbax's copy", self.dir, step)
                return step
            skipped = True
            if set_aside:
                dest = _free_name(self.dir.parent / "checkpoints.incomplete" / str(step))
                dest.parent.mkdir(parents=True, exist_ok=True)
                path.rename(dest)
                os.utime(dest)            # its mtime now says when it was set aside
                trim_set_aside(dest.parent)
                log.warning("%s: skipping checkpoint %d: %s; moved to %s", self.dir, step,
                            problem, dest)
            else:
                log.warning("%s: skipping checkpoint %d: %s", self.dir, step, problem)
        if skipped:
            log.warning("%s: no complete checkpoint left; the run starts from step 0", self.dir)
        return None

    def latest_step(self) -> int | None:
        return self._latest

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        faults.point("checkpoint")
        try:
            with rundir.quiet_writer_threads():
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
                self.manager.wait_until_finished()
            faults.point("manifest")
            # Written last: a step is complete exactly when its manifest exists and matches.
            if jax.process_index() == 0:
                manifest.write(self.dir / str(step))
        except Exception as e:
            if not (why := rundir.disk_full(e)):
                raise
            self._drop_partial(step)
            kept = (f"checkpoint {self._latest} is intact" if self._latest
                    else "no earlier checkpoint exists")
            raise rundir.DiskFullError(
                f"{self.dir}: writing checkpoint {step} failed: {why}; {kept}; free space and "
                f"rerun the same command to resume") from None
        _barrier(f"jaxalign_manifest_{step}")
        self._latest = step
        self.saved_t = time.monotonic()
        self._retire()

    def due(self, minutes: float) -> bool:
        """Whether `minutes` of training passed since the last save (0: never due). Several
        processes take process 0's clock: they must all save at the same step."""
        if minutes <= 0:
            return False
        late = time.monotonic() - self.saved_t >= minutes * 60
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            late = bool(multihost_utils.broadcast_one_to_all(int(late)))
        return late

    def _retire(self) -> None:
        """Deletes the oldest steps beyond `keep`, now that the newest is complete."""
        steps = sorted(self.manager.all_steps())
        for old in steps[:-self.keep]:
            self.manager.delete(old)

    def _drop_partial(self, step: int) -> None:
        """A step whose write ran out of space: what orbax left of it (its temporary
        directory, or a step without manifest) goes, to give the space back; the earlier
        steps stay."""
        if jax.process_index() != 0:
            return
        for p in self.dir.iterdir():
            if p.name == str(step) or p.name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(p, ignore_errors=True)
        self.manager.reload()

    def restore(self, step: int, abstract_state, shardings=None):
        """-> (state, meta). `abstract_state`: ShapeDtypeStructs (or arrays) of the state."""
        if shardings is not None:
            abstract_state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def state_metadata(self, step: int):
        """The saved TrainState's tree (array metadata at the leaves), read from disk."""
        with ocp.PyTreeCheckpointer() as reader:
            tree = reader.metadata(self.dir / str(step) / "state").item_metadata
        return tree.tree if hasattr(tree, "tree") else tree

    def restore_subtree(self, step: int, path: tuple[str, ...], target):
        """Only the state's subtree at `path`, onto `target`'s ShapeDtypeStructs (orbax
        partial restore: nothing else is read)."""
        item = _nest(path, target)
        args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding,
                                                           global_shape=a.shape, dtype=a.dtype),
                            item)
        # A fresh manager: this one registered StandardSave for 'state', which does not
        # take a partial PyTreeRestore.
        reader = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            create=False, enable_async_checkpointing=False))
        try:
            out = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True)))
        finally:
            reader.close()
        return _subtree(out["state"], path)

    def close(self) -> None:
        self.manager.close()


KEEP_SET_ASIDE = 3   # checkpoints.incomplete/ keeps the newest N set-aside steps (for a post-mortem)


def trim_set_aside(folder: Path, keep: int = KEEP_SET_ASIDE) -> None:
    """Deletes all but the `keep` newest entries of checkpoints.incomplete/, so that a run
    killed again and again does not fill the disk with broken copies."""
    import shutil
    entries = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        log.info("%s: deleted the set-aside %s (keeping the newest %d)", folder, old.name, keep)
