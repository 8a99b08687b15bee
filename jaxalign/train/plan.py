"""`jaxalign plan`: what a training run needs on each mesh of N devices, before renting them.

For a run config and a device count, every (data, fsdp, tensor) mesh that divides the batch
and the heads is tried: the recipe's own jitted train step (`step.jit_train_step` on the
recipe's loss, with the loop's state and batch shardings) is lowered from abstract shapes and
compiled by XLA for that mesh, so nothing is allocated and no weights are read (only the
model's config.json). Per mesh it reports what XLA's memory analysis of the compiled program
says one device holds (arguments: params + optimizer state + batch; temporaries: activations
and gradients), the compile time, and the bytes each collective moves per step, read from the
optimised HLO with loop trip counts applied.

On a CPU host the N devices are fake (`--xla_force_host_platform_device_count`), so the
compile is the CPU backend's: the memory of the arrays and the collectives are those of the
sharded program on any backend; temporaries and fusion follow the CPU compiler and are an
estimate for an accelerator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Any, Callable

import jax

from jaxalign import sharding
from jaxalign.config import ConfigError, MeshConfig, ModelConfig
from jaxalign.convert import hf, hub
from jaxalign.models import functional, lora
from jaxalign.precision import rounds_stochastically
from jaxalign.train.optim import make_optimizer
from jaxalign.train.preflight import per_device_bytes
from jaxalign.train.step import init_state, jit_train_step, make_train_step, state_shardings

GiB, MiB = 2**30, 2**20
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


# ----------------------------------------------------------------------------- the models

def model_config(path: str, revision: str | None = None, **runtime) -> ModelConfig:
    """The model's shape from its description alone: an HF dir's config.json (a hub id's:
    only that file is fetched), a jaxalign model's jaxalign.json or a run dir's run.json.
    No weights are read."""
    p = hub.resolve(path, revision, config_only=True)
    for name, key in (("jaxalign.json", "hf_config"), ("run.json", "hf_config")):
        if (p / name).exists():
            meta = json.loads((p / name).read_text())
            cfg = ModelConfig.from_hf(meta[key], **runtime)
            lora_meta = meta.get("lora") or {}
            if lora_meta.get("rank"):
                cfg = cfg.replace(lora_rank=lora_meta["rank"], lora_alpha=lora_meta["alpha"],
                                  lora_dropout=lora_meta.get("dropout", 0.0),
                                  lora_targets=tuple(lora_meta["targets"]))
            return cfg
    return ModelConfig.from_hf(hf.read_hf_config(p), **runtime)


@dataclasses.dataclass
class Abstract:
    """A recipe's models as shapes: the trained and frozen trees (ShapeDtypeStructs that carry
    their shardings) and the configs its loss needs."""
    cfg: ModelConfig
    trainable: Any
    frozen: Any
    ref_cfg: ModelConfig | None = None


def _placed(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def _params(cfg: ModelConfig, mesh) -> Any:
    return _placed(functional.abstract_params(cfg), functional.param_shardings(cfg, mesh))


def _policy(run_cfg, mesh, num_labels: int = 0) -> Abstract:
    """As `setup.load_policy` (and `rm.init_reward_model` for num_labels=1) would build it."""
    cfg = model_config(run_cfg.model.path, run_cfg.model.revision, **run_cfg.model.runtime())
    if num_labels and cfg.num_labels != num_labels:
        cfg = cfg.replace(num_labels=num_labels)   # `heads.add_score_head`: LM head -> score
    cfg = run_cfg.lora.apply_to(cfg)
    params = _params(cfg, mesh)
    if not cfg.lora_rank:
        return Abstract(cfg, params, {})
    trainable, frozen = lora.split(params)
    if num_labels:  # the fresh score head trains beside the adapters (`rm.split_trainable`)
        trainable["score"] = frozen.pop("score")
    return Abstract(cfg, trainable, frozen)


def _with_reference(run_cfg, mesh, section: str) -> Abstract:
    """As `dpo.load_dpo_models`: frozen = {'base', 'ref'}."""
    opts = getattr(run_cfg, section)
    policy = _policy(run_cfg, mesh)
    ref_cfg, ref = None, {}
    if opts.uses_reference and (opts.reference is not None or not policy.cfg.lora_rank):
        ref_cfg = model_config(opts.reference or run_cfg.model.path,
                               None if opts.reference else run_cfg.model.revision,
                               **run_cfg.model.runtime())
        ref_cfg = ref_cfg.replace(lora_rank=0)  # a LoRA reference is merged before use
        ref = _params(ref_cfg, mesh)
    return Abstract(policy.cfg, policy.trainable, {"base": policy.frozen, "ref": ref}, ref_cfg)


# ----------------------------------------------------------------------------- the recipes

@dataclasses.dataclass(frozen=True)
class Planner:
    """How to build one recipe's step from shapes: its models, its loss on them, and one
    global batch as its loader would produce it (host arrays of the right shapes)."""
    models: Callable[[Any, Any], Abstract]
    loss: Callable[[Any, Abstract], Callable]
    batch: Callable[[Any], dict]


def _sft_loss(run_cfg, m: Abstract):
    from jaxalign.train.sft import sft_loss_fn
    return sft_loss_fn(m.cfg, run_cfg.train.logits_chunk)


def _rm_loss(run_cfg, m: Abstract):
    from jaxalign.train.rm import rm_loss_fn
    return rm_loss_fn(m.cfg, run_cfg.rm)


def _dpo_loss(run_cfg, m: Abstract):
    from jaxalign.train.dpo import dpo_loss_fn
    return dpo_loss_fn(m.cfg, run_cfg.dpo, ref_cfg=m.ref_cfg, chunk=run_cfg.train.logits_chunk)


def _kto_loss(run_cfg, m: Abstract):
    from jaxalign.train.kto import kto_loss_fn
    return kto_loss_fn(m.cfg, run_cfg.kto, ref_cfg=m.ref_cfg, chunk=run_cfg.train.logits_chunk)


def _empty(module: str, name: str, layout: bool = False):
    """The recipe's batch of the run's shape; `layout`: a preference layout batch at its
    longest (`jaxalign.data.layout`: both responses of seq_len, every position trained)."""
    def batch(run_cfg):
        import importlib
        make = getattr(importlib.import_module(module), name)
        seq_len = run_cfg.data.seq_len
        out = make(run_cfg.train.batch_size, seq_len, 0)
        if not layout:
            return out
        from jaxalign.data.layout import branch_layout, bucket
        share = run_cfg.data.share_prompt
        return branch_layout(out, share=share, pad_id=0, gather_len=bucket(2 * seq_len),
                             row_len=bucket(2 * seq_len) if share else None)
    return batch


# Each recipe's row in jaxalign.train.recipes.RECIPES names its planner (or none: not planned).
SFT_PLANNER = Planner(lambda c, mesh: _policy(c, mesh), _sft_loss,
                      _empty("jaxalign.data.packing", "empty_batch"))
RM_PLANNER = Planner(lambda c, mesh: _policy(c, mesh, num_labels=1), _rm_loss,
                     _empty("jaxalign.data.preference", "empty_pair_batch", True))
DPO_PLANNER = Planner(lambda c, mesh: _with_reference(c, mesh, "dpo"), _dpo_loss,
                      _empty("jaxalign.data.preference", "empty_pair_batch", True))
KTO_PLANNER = Planner(lambda c, mesh: _with_reference(c, mesh, "kto"), _kto_loss,
                      _empty("jaxalign.data.unpaired", "empty_unpaired_batch", True))


def planner(recipe: str) -> Planner:
    """The recipe's planner, from its row of RECIPES; a recipe without one is refused."""
    from jaxalign.train.recipes import RECIPES, attr
    if recipe not in RECIPES:
        raise ConfigError(f"jaxalign plan: recipe {recipe!r} is not one of {list(RECIPES)}")
    if RECIPES[recipe].planner is None:
        planned = [n for n, r in RECIPES.items() if r.planner]
        raise ConfigError(f"jaxalign plan: {recipe} is not planned yet; plan {', '.join(planned)}")
    return attr(RECIPES[recipe].planner)


# ----------------------------------------------------------------------------- meshes

def candidate_meshes(n_devices: int, cfg: ModelConfig, batch_size: int, grad_accum: int = 1
                     ) -> list[MeshConfig]:
    """Every data x fsdp x tensor = n_devices that the step can run on: tensor divides the
    KV heads (so attention shards by head), data x fsdp divides a micro-batch's rows."""
    micro = batch_size // grad_accum
    out = []
    for tensor in range(1, n_devices + 1):
        if n_devices % tensor or cfg.num_kv_heads % tensor:
            continue
        rest = n_devices // tensor
        for data in range(1, rest + 1):
            if rest % data == 0 and micro % rest == 0:
                out.append(MeshConfig(data=data, fsdp=rest // data, tensor=tensor))
    return out


def parse_meshes(text: str) -> list[MeshConfig]:
    """'fsdp=64;data=4,fsdp=16' -> MeshConfigs (unnamed axes are 1)."""
    meshes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        sizes = {"data": 1, "fsdp": 1, "tensor": 1}
        for item in part.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in sizes or not value.strip().isdigit():
                raise ConfigError(f"--meshes {part!r}: expected e.g. data=4,fsdp=16,tensor=1")
            sizes[key.strip()] = int(value)
        meshes.append(MeshConfig(**sizes))
    return meshes


# ----------------------------------------------------------------------------- collectives

_WHILE = re.compile(r"\bwhile\(.*?body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"\b(?:to_apply|calls|body|condition|true_computation|false_computation|"
                    r"branch_computations)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _result_bytes(result_type: str) -> int:
    return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _SHAPE.findall(result_type))


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device per step that each kind of collective produces, from optimised HLO.

    A collective inside a while loop (the scanned layers, gradient accumulation) counts once
    per iteration: each computation's multiplicity is the product of the known trip counts of
    the loops that call it. Async pairs count once (the -start op; -done moves nothing new)."""
    comps: dict[str, list[str]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        # A computation starts at an unindented line ending in '{'; its instructions are indented.
        if line[:1] not in ("", " ", "}") and line.rstrip().endswith("{"):
            head = line.split()
            current = (head[1] if head[0] == "ENTRY" else head[0]).lstrip("%")
            comps[current] = []
            if head[0] == "ENTRY":
                entry = current
        elif current is not None:
            comps[current].append(line)
    # callers: computation -> [(callee, times)]
    edges: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    for comp, lines in comps.items():
        for line in lines:
            w = _WHILE.search(line)
            if w:
                trip = _TRIP.search(line)
                edges[comp].append((w.group(1), int(trip.group(1)) if trip else 1))
            for m in _CALLS.finditer(line):
                for callee in m.group(1).split(","):
                    callee = callee.strip().lstrip("%")
                    if callee in comps and not (w and callee == w.group(1)):
                        edges[comp].append((callee, 1))
    times: dict[str, int] = {}

    def visit(comp: str, k: int):
        times[comp] = times.get(comp, 0) + k
        for callee, n in edges.get(comp, ()):
            visit(callee, k * n)

    visit(entry or next(iter(comps)), 1)
    out = {name: 0 for name in COLLECTIVES}
    for comp, lines in comps.items():
        for line in lines:
            if "=" not in line:
                continue
            lhs, _, rhs = line.partition("=")
            rhs = rhs.strip()
            for name in COLLECTIVES:
                op = re.search(rf"\s{name}(-start)?\(", " " + rhs)
                if op:
                    out[name] += times.get(comp, 0) * _result_bytes(rhs[:op.start()])
                    break
    return out


# ----------------------------------------------------------------------------- one mesh

@dataclasses.dataclass
class MeshPlan:
    mesh: MeshConfig
    params_bytes: int        # one device's share of the trained + frozen params
    optimizer_bytes: int     # one device's share of the optimizer state
    argument_bytes: int      # everything the step takes in (params, optimizer, batch, ...)
    temp_bytes: int          # activations, gradients and scratch while the step runs
    peak_bytes: int          # arguments + outputs not aliased to them + temporaries
    compile_s: float
    collectives: dict[str, int]

    def fits(self, device_bytes: int | None) -> bool | None:
        return None if device_bytes is None else self.peak_bytes <= device_bytes

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["mesh"] = {"data": self.mesh.data, "fsdp": self.mesh.fsdp, "tensor": self.mesh.tensor}
        return d


def plan_mesh(recipe: str, run_cfg, mesh_cfg: MeshConfig, devices=None) -> MeshPlan:
    """Lowers and compiles the recipe's train step for one mesh, from shapes only."""
    p = planner(recipe)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    with jax.set_mesh(mesh):
        models = p.models(run_cfg, mesh)
        rep = sharding.replicated(mesh)
        optimizer, schedule = make_optimizer(run_cfg.optim, run_cfg.train.steps)
        param_sh = jax.tree.map(lambda x: x.sharding, models.trainable)
        state_sh = state_shardings(optimizer, models.trainable, param_sh, rep)
        state = _placed(jax.eval_shape(lambda p: init_state(p, optimizer, 0), models.trainable),
                        state_sh)
        frozen_sh = jax.tree.map(lambda x: x.sharding, models.frozen)
        batch_sh = sharding.batch_sharding(mesh)   # as `loop.put_batch` places every key
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
                 for k, v in p.batch(run_cfg).items()}
        rounded = rounds_stochastically(models.cfg.dtype, models.cfg.param_dtype,
                                        run_cfg.train.stochastic_rounding)
        step = jit_train_step(make_train_step(p.loss(run_cfg, models), optimizer, schedule,
                                              grad_accum=run_cfg.train.grad_accum,
                                              round_weights=rounded),
                              state_sh, frozen_sh, batch_sh)
        t0 = time.perf_counter()
        compiled = step.lower(state, models.frozen, batch).compile()
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    return MeshPlan(mesh=mesh_cfg,
                    params_bytes=per_device_bytes(models.trainable, models.frozen),
                    optimizer_bytes=per_device_bytes(state.opt_state),
                    argument_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                    peak_bytes=peak, compile_s=compile_s,
                    collectives=collective_bytes(compiled.as_text()))


def plan(recipe: str, run_cfg, meshes: list[MeshConfig] | None = None,
         on_result: Callable[[MeshPlan], None] | None = None) -> list[MeshPlan]:
    """Plans every mesh (default: `candidate_meshes` of all devices)."""
    planner(recipe)  # refuses an unknown or unplanned recipe before any work
    n = jax.device_count()
    cfg = model_config(run_cfg.model.path, run_cfg.model.revision, **run_cfg.model.runtime())
    functional.check_positions(cfg, run_cfg.data.seq_len, "data.seq_len")
    if meshes is None:
        meshes = candidate_meshes(n, cfg, run_cfg.train.batch_size, run_cfg.train.grad_accum)
        if not meshes:
            raise ConfigError(f"no data x fsdp x tensor mesh of {n} devices divides train.batch_size"
                              f" / train.grad_accum = "
                              f"{run_cfg.train.batch_size // run_cfg.train.grad_accum} rows")
    out = []
    for mesh_cfg in meshes:
        if math.prod(mesh_cfg.shape) != n:
            raise ConfigError(f"mesh data={mesh_cfg.data} fsdp={mesh_cfg.fsdp} "
                              f"tensor={mesh_cfg.tensor} needs {math.prod(mesh_cfg.shape)} "
                              f"devices; planning for {n}")
        result = plan_mesh(recipe, run_cfg, mesh_cfg)
        if on_result is not None:
            on_result(result)
        out.append(result)
    return out


# ----------------------------------------------------------------------------- the table

TABLE_HEAD = ("| data | fsdp | tensor | params | optimizer | temporaries | peak / device | fits "
              "| all-gather | all-reduce | reduce-scatter | other | compile |\n"
              "|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|")


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def format_row(p: MeshPlan, device_bytes: int | None) -> str:
    c = p.collectives
    other = c["all-to-all"] + c["collective-permute"]
    fits = {None: "?", True: "yes", False: "no"}[p.fits(device_bytes)]
    return (f"| {p.mesh.data} | {p.mesh.fsdp} | {p.mesh.tensor} | {_size(p.params_bytes)} | "
            f"{_size(p.optimizer_bytes)} | {_size(p.temp_bytes)} | {_size(p.peak_bytes)} | {fits} | "
            f"{_size(c['all-gather'])} | {_size(c['all-reduce'])} | {_size(c['reduce-scatter'])} | "
            f"{_size(other)} | {p.compile_s:.1f} s |")


def use_fake_devices(n: int) -> None:
    """N CPU devices for planning; must run before JAX starts its backend."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    if jax.device_count() != n:  # the backend was already up with another count
        raise ConfigError(f"jaxalign plan: JAX already runs with {jax.device_count()} devices; "
                          f"plan for {n} in a fresh process")


def run_plan(config_path: str, overrides=(), *, devices: int, meshes: str | None = None,
             recipe: str = "sft", device_memory_gb: float | None = None,
             emit: Callable[[str], None] = print) -> list[MeshPlan]:
    """The `jaxalign plan` command: config -> one table row per mesh, printed as it compiles."""
    from jaxalign.config import from_dict, load_yaml
    from jaxalign.train.recipes import RECIPES

    use_fake_devices(devices)
    raw = load_yaml(config_path, list(overrides))
    planner(recipe)
    try:
        run_cfg = from_dict(RECIPES[recipe].load()[0], raw)
    except ConfigError as e:  # a section named after another recipe: say which flag plans it
        other = [name for name in RECIPES if name != recipe and name in raw]
        raise ConfigError(f"{e}; a {other[0]} config is planned with --recipe {other[0]}"
                          if other else str(e)) from None
    device_bytes = None if device_memory_gb is None else int(device_memory_gb * GiB)
    emit(f"{recipe} step of {config_path} on {devices} devices "
         f"(per-device bytes from XLA's memory analysis; collectives per step)")
    emit(TABLE_HEAD)
    return plan(recipe, run_cfg, parse_meshes(meshes) if meshes else None,
                on_result=lambda p: emit(format_row(p, device_bytes)))
