"""`jaxalign pipeline CONFIG.yaml [key=value ...]`: data -> sft -> rm -> ppo / dpo / kto ->
eval -> export -> report from one YAML, each stage an ordinary run dir under `out_dir`.

The YAML has `out_dir` (the pipeline dir), `model` (the starting model), optionally `stages`
(the order; default: the sections present, in ORDER), and one section per stage holding
exactly the keys of that stage's own command (`jaxalign prepare | sft | rm | ppo | dpo | kto |
eval`, and the export and report commands' options) except `out_dir`, which the pipeline sets
to OUT/STAGE. Outputs are wired by path:
  - any string containing `{stage}` (e.g. "{data}/sft/train.jsonl", "{rm}") becomes that
    earlier stage's run dir;
  - left unset, model.path of sft is `model`; of rm, dpo, kto and ppo the sft run (else
    `model`); ppo's reward.model the rm run (when there is one and no reward.functions);
    eval's models.policies every policy stage (sft, ppo, dpo, kto) by name, its
    models.reference the sft run, its models.reward_model the rm run; export's model the
    last policy stage. The training stages are the rows of `train/recipes.py` RECIPES, and
    what each takes from earlier stages is its row's `inputs`.
A placeholder must be quoted in YAML ("{data}/sft/train.jsonl"): bare, {x} is a mapping.
Stage i's fingerprint is a hash of its wired section chained with stage i-1's, kept in
OUT/pipeline.json. A stage whose fingerprint is recorded as done is skipped; recorded but not
done (interrupted) is rerun in its dir, which resumes from its latest checkpoint; a changed
fingerprint (its section or any earlier one changed) clears the dir and reruns it, and so
every stage after it. The plan is logged before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

from jaxalign import rundir, runtime
from jaxalign.config import ConfigError, from_dict
from jaxalign.train.recipes import RECIPES

log = logging.getLogger(__name__)

# Every training recipe is a stage, in the table's order, between data and eval.
ORDER = ("data", *RECIPES, "eval", "export", "report")
POLICY_STAGES = tuple(name for name, r in RECIPES.items() if r.policy)  # runs that are policies
STATE_FILE = "pipeline.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """The export stage: `jaxalign export MODEL OUT` options; the HF dir is OUT/STAGE/hf."""
    out_dir: str
    model: str                      # a run dir, checkpoint or HF dir (default: last policy stage)
    adapter: bool = False           # LoRA runs: a PEFT adapter instead of merged weights
    max_shard_gb: float = 5.0
    dtype: Literal["float32", "bfloat16"] | None = None  # written tensors (None: the model's own)

    def __post_init__(self):
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"export.dtype {self.dtype!r}: expected float32, bfloat16 or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """The report stage: `jaxalign report PIPELINE_DIR --out OUT/STAGE`."""
    out_dir: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """out_dir   the pipeline dir (one run dir per stage inside)
    model     the starting model (HF dir, checkpoint or run dir)
    stages    the stage order (default: the sections present, in ORDER)
    data, sft, rm, ppo, dpo, kto, eval, export, report: each stage's own command config."""
    out_dir: str                    # the pipeline dir: one run dir per stage, pipeline.json
    model: str                      # the starting model (HF dir, hub id, checkpoint or run dir)
    stages: tuple[str, ...] = ()    # the order (default: the sections present, in ORDER)
    data: dict | None = None        # `jaxalign prepare` keys (PrepareConfig)
    sft: dict | None = None         # `jaxalign sft` keys
    rm: dict | None = None          # `jaxalign rm` keys
    ppo: dict | None = None         # `jaxalign ppo` keys (any algorithm: ppo, grpo, rloo)
    dpo: dict | None = None         # `jaxalign dpo` keys (any loss_type: orpo, simpo, ...)
    kto: dict | None = None         # `jaxalign kto` keys
    eval: dict | None = None        # `jaxalign eval` keys (models, data, eval, lm_eval)
    export: dict | None = None      # ExportConfig keys: model, adapter, max_shard_gb
    report: dict | None = None      # ReportConfig keys (none but out_dir, which is set)

    def __post_init__(self):
        present = tuple(s for s in ORDER if getattr(self, s) is not None)
        order = tuple(self.stages) or present
        unknown = [s for s in order if s not in ORDER]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; expected some of {list(ORDER)}")
        if len(set(order)) != len(order):
            raise ConfigError(f"stages: a stage is listed twice in {list(order)}")
        missing = [s for s in order if getattr(self, s) is None]
        if missing:
            raise ConfigError(f"stages: {missing} listed without a section of their own "
                              f"(an empty one is `{missing[0]}: {{}}`)")
        if not order:
            raise ConfigError(f"pipeline: no stage sections ({', '.join(ORDER)})")
        for s in order:
            if not isinstance(getattr(self, s), dict):
                raise ConfigError(f"{s}: expected a mapping of the `{s}` command's keys")
            if "out_dir" in getattr(self, s):
                raise ConfigError(f"{s}.out_dir: the pipeline sets it ({self.out_dir}/{s}); remove it")
        object.__setattr__(self, "stages", order)


# ----------------------------------------------------------------------------- stage table

def _recipe(name: str):
    def build(section):
        from jaxalign.train.recipes import RECIPES
        return from_dict(RECIPES[name].load()[0], section)

    def run(cfg, raw, devices):
        from jaxalign.train.recipes import RECIPES
        return RECIPES[name].load()[1](cfg, raw, devices)
    return build, run


def _build_data(section):
    from jaxalign.data.prepare import PrepareConfig
    return from_dict(PrepareConfig, section)


def _run_data(cfg, raw, devices):
    from jaxalign.data.prepare import run_prepare
    return run_prepare(cfg, raw)


def _build_eval(section):
    from jaxalign.evaluate import from_raw
    return from_raw(section)


def _run_eval(cfg, raw, devices):
    from jaxalign.evaluate import run_eval
    _write_config(cfg.out_dir, raw)
    return run_eval(cfg)


def _run_export(cfg: ExportConfig, raw, devices):
    from jaxalign import sharding
    from jaxalign.config import MeshConfig
    from jaxalign.export import export
    _write_config(cfg.out_dir, raw)
    out = export(cfg.model, Path(cfg.out_dir) / "hf", sharding.make_mesh(MeshConfig(), devices),
                 adapter=cfg.adapter, max_shard_bytes=int(cfg.max_shard_gb * 2**30),
                 dtype=cfg.dtype)
    log.info("exported %s -> %s", cfg.model, out)
    return {}


def _run_report(cfg: ReportConfig, raw, devices):
    from jaxalign.report import write_report
    _write_config(cfg.out_dir, raw)
    result = write_report(Path(cfg.out_dir).parent, cfg.out_dir)
    print(result["summary"], end="", flush=True)
    return {}


# stage -> (build(section) -> its validated config, run(cfg, raw, devices))
STAGES: dict[str, tuple[Callable[[dict], Any], Callable[..., Any]]] = {
    "data": (_build_data, _run_data),
    **{name: _recipe(name) for name in RECIPES},
    "eval": (_build_eval, _run_eval),
    "export": (lambda section: from_dict(ExportConfig, section), _run_export),
    "report": (lambda section: from_dict(ReportConfig, section), _run_report),
}


def _write_config(out_dir: str, raw: dict) -> None:
    import yaml
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


# ----------------------------------------------------------------------------- wiring

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _substitute(value, dirs: dict[str, str], stage: str, key: str = ""):
    if isinstance(value, dict):
        return {k: _substitute(v, dirs, stage, f"{key}{k}.") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs, stage, key) for v in value]
    if isinstance(value, str):
        def repl(m):
            name = m.group(1)
            if name not in dirs:
                raise ConfigError(f"{stage}.{key.rstrip('.')}: {{{name}}} names no earlier stage "
                                  f"(earlier: {sorted(dirs)})")
            return dirs[name]
        return _PLACEHOLDER.sub(repl, value)
    return value


def _get(section: dict, dotted: str):
    for part in dotted.split("."):
        section = section.get(part) if isinstance(section, dict) else None
    return section


def _set_default(section: dict, dotted: str, value) -> None:
    node = section
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node.setdefault(last, value)


def wire(cfg: PipelineConfig) -> list[tuple[str, dict]]:
    """Each stage's section with out_dir, the placeholders and the default paths filled in."""
    root = Path(cfg.out_dir)
    dirs: dict[str, str] = {}
    wired = []
    for stage in cfg.stages:
        section = _substitute(copy.deepcopy(getattr(cfg, stage)), dirs, stage)
        policy = next((dirs[s] for s in reversed(list(dirs)) if s in POLICY_STAGES), None)
        if stage in RECIPES:
            for i in RECIPES[stage].inputs:
                if i.stage in dirs and not (i.unless and _get(section, i.unless)):
                    _set_default(section, i.key, dirs[i.stage])
            _set_default(section, "model.path", cfg.model)
        if stage == "eval":
            models = section.setdefault("models", {})
            models.setdefault("policies", {s: d for s, d in dirs.items() if s in POLICY_STAGES})
            if "sft" in dirs and "sft" in models["policies"]:
                models.setdefault("reference", "sft")
            if "rm" in dirs:
                models.setdefault("reward_model", dirs["rm"])
        if stage == "export":
            if policy is None and "model" not in section:
                raise ConfigError("export.model: no policy stage before export to default to")
            section.setdefault("model", policy)
        section["out_dir"] = str(root / stage)
        dirs[stage] = section["out_dir"]
        wired.append((stage, section))
    return wired


# Keys that cannot change a stage's result, left out of its hash: what is displayed or logged
# (progress line, log cadence, TensorBoard, wandb), when checkpoints are written (a resumed
# run ends bit-identical to an uninterrupted one: tests/test_faults.py) and the mesh (a run
# restores onto any mesh; a different mesh changes only the order of float sums, i.e.
# rounding). model.dtype / eval.dtype (`--dtype`) change results and stay in the hash.
UNHASHED = ("train.progress", "train.log_every", "train.tensorboard", "train.wandb_project",
            "train.save_every", "train.save_every_minutes", "train.keep_checkpoints", "mesh")


def _hashed(section: dict) -> dict:
    out = copy.deepcopy(section)
    for dotted in UNHASHED:
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def fingerprints(wired: list[tuple[str, dict]]) -> list[str]:
    """Stage i's hash covers its wired section (less UNHASHED) and stage i-1's hash."""
    out, prev = [], ""
    for stage, section in wired:
        text = json.dumps({"stage": stage, "after": prev, "config": _hashed(section)},
                          sort_keys=True)
        prev = hashlib.sha256(text.encode()).hexdigest()[:16]
        out.append(prev)
    return out


def runtime_overrides(raw: dict, mesh, dtype: str | None) -> list[str]:
    """`--mesh` / `--dtype` of `jaxalign pipeline` as overrides of every stage section that
    has the key (the training stages' mesh.* and model.dtype, eval's eval.dtype)."""
    from jaxalign import reference
    out = []
    for stage in (*RECIPES, "eval"):
        if raw.get(stage) is None:
            continue
        config_cls = reference.config_class(stage)
        names = {k.name for k in reference.keys(config_cls)}
        stage_mesh = mesh if "mesh.data" in names else None
        out += [f"{stage}.{o}" for o in reference.flag_overrides(config_cls, mesh=stage_mesh,
                                                                   dtype=dtype)]
    return out


# ----------------------------------------------------------------------------- running

def _load_state(root: Path) -> dict:
    path = root / STATE_FILE
    if not path.exists():
        return {"stages": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e.msg}); remove it to rerun every stage") from None


def _save_state(root: Path, state: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    # atomic: a kill or a full disk never leaves half a state file
    rundir.write_atomic(root / STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")


def plan(cfg: PipelineConfig) -> list[dict]:
    """Per stage: name, dir, hash, the validated config and action: 'skip' (done), 'resume'
    (interrupted), 'rerun' (changed, or after a changed stage) or 'run' (new)."""
    wired = wire(cfg)
    hashes = fingerprints(wired)
    recorded = _load_state(Path(cfg.out_dir))["stages"]
    steps, changed_at = [], None
    for (stage, section), h in zip(wired, hashes):
        build, _ = STAGES[stage]
        try:
            stage_cfg = build(section)
        except ConfigError as e:
            raise ConfigError(f"{stage}: {e}") from None
        rec = recorded.get(stage)
        if changed_at is not None:
            action, why = ("rerun" if rec else "run"), f"after {changed_at}"
        elif rec is None:
            action, why = "run", "new"
        elif rec["hash"] != h:
            action, why = "rerun", "config changed"
        elif not Path(section["out_dir"]).exists():
            action, why = "run", "its dir is gone"
        elif rec.get("done"):
            action, why = "skip", "done"
        else:
            action, why = "resume", "interrupted"
        if action != "skip" and changed_at is None:
            changed_at = stage   # everything after it runs again
        steps.append(dict(stage=stage, dir=section["out_dir"], hash=h, action=action, why=why,
                          config=stage_cfg, raw=section))
    return steps


def run_pipeline(cfg: PipelineConfig, devices=None,
                 after_stage: Callable[[str], None] | None = None) -> list[dict]:
    """Runs the plan; returns it. `after_stage(name)` is called when a stage has finished.
    The pipeline dir is locked while it runs (`rundir.locked`)."""
    root = Path(cfg.out_dir)
    rundir.check_apart(root, cfg.model, "model")
    steps = plan(cfg)
    log.info("pipeline %s:\n%s", root, "\n".join(
        f"  {s['stage']:<7} {s['action']:<6} ({s['why']}) -> {s['dir']}" for s in steps))
    state = _load_state(root)
    # A dir the pipeline has not recorded and jaxalign did not write is the user's: refused
    # before any stage runs, never deleted.
    for s in steps:
        if s["action"] == "run" and s["stage"] not in state["stages"]:
            rundir.refuse_foreign(s["dir"], f"pipeline stage {s['stage']}")
    with rundir.locked(root):
        return _run_steps(cfg, root, steps, state, devices, after_stage)


def _run_steps(cfg, root, steps, state, devices, after_stage):
    import jax
    writer = jax.process_index() == 0
    state["stages"] = {k: v for k, v in state["stages"].items() if k in cfg.stages}
    state["order"] = list(cfg.stages)
    for i, s in enumerate(steps):
        if s["action"] == "skip":
            continue
        stage = s["stage"]
        if s["action"] in ("run", "rerun") and Path(s["dir"]).exists() and writer:
            shutil.rmtree(s["dir"])  # a changed config must not resume the old run's checkpoints
        if writer:
            rundir.mark(s["dir"], "pipeline stage")
        state["stages"][stage] = {"hash": s["hash"], "done": False}
        # Later stages read this one's output: until they run again, none of them is done
        # (a stop here must not leave an earlier run's export or report marked finished).
        for later in steps[i + 1:]:
            if later["stage"] in state["stages"]:
                state["stages"][later["stage"]]["done"] = False
        if writer:
            _save_state(root, state)
        log.info("pipeline: stage %s (%s)", stage, s["dir"])
        try:
            STAGES[stage][1](s["config"], s["raw"], devices)
        except KeyboardInterrupt:
            log.error("pipeline: stage %s interrupted; the same command resumes it (finished "
                      "stages are not rerun)", stage)
            raise
        state["stages"][stage]["done"] = True
        if jax.process_index() == 0:
            _save_state(root, state)
        # The stage's arrays are gone; what the allocator kept of them goes back to the system,
        # so the next stage starts from what is live, not from this stage's high-water mark.
        gc.collect()
        released = runtime.release_free_memory()
        if released is not None:
            log.info("pipeline: stage %s done; %.2f GiB of freed memory returned "
                     "(resident %.2f GiB)", stage, released, runtime.rss_gib())
        if after_stage is not None:
            after_stage(stage)
    return steps
