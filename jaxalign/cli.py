"""Command line: parse, then call the library. Logs go to stderr, results to stdout.

  jaxalign convert HF_DIR_OR_HUB_ID OUT_DIR [--revision R]
  jaxalign export MODEL OUT_HF_DIR [--revision R]
  jaxalign generate MODEL (--prompt TEXT | --prompts FILE [--out FILE] [--batch-size B])
                    [--chat] [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
  jaxalign sft CONFIG.yaml [key=value ...]
  jaxalign rm  CONFIG.yaml [key=value ...]
  jaxalign dpo CONFIG.yaml [key=value ...]
  jaxalign kto CONFIG.yaml [key=value ...]
  jaxalign ppo CONFIG.yaml [key=value ...]     (algorithm: a row of train/rl/objectives.py)
  jaxalign plan CONFIG.yaml [key=value ...] --devices N [--meshes M] [--device-memory-gb G]
  jaxalign prepare CONFIG.yaml [key=value ...] (data stage: dedup, mix, split)
  jaxalign report RUN_OR_PIPELINE_DIR [--out DIR]
  jaxalign pipeline CONFIG.yaml [key=value ...] (data, sft, rm, ppo/dpo/kto, eval, export, report)
  jaxalign config NAME | --markdown            every key of a command's config

Every command takes --mesh and --dtype (jaxalign.reference.RUNTIME_FLAGS: on the YAML-driven
commands they set config keys). Exit codes: 0 done, 1 bad input (one line naming the file,
row, key or tensor; a traceback only with --verbose), 2 bad usage, 3 preempted (SIGTERM /
SIGINT: checkpoint saved, rerunning the same command continues).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

log = logging.getLogger("jaxalign")
EXIT_PREEMPTED = 3   # stopped by SIGTERM / SIGINT with its checkpoint saved; rerun continues


class _Parser(argparse.ArgumentParser):
    config_name: str | None = None  # a YAML-driven command: --help lists its config sections

    def error(self, message):  # one line, exit 2 (the CLI contract)
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)

    def format_help(self):
        if self.config_name is not None and self.epilog is None:
            # Built only when asked for: it imports the config classes (and with them JAX).
            from jaxalign import reference
            rows = reference.sections(self.config_name)
            width = max(len(k) for k, _ in rows)
            self.epilog = "config sections (`jaxalign config %s` lists every key):\n%s" % (
                self.config_name, "\n".join(f"  {k:<{width}}  {m}" for k, m in rows))
        return super().format_help()


def _number(kind: type, rule: str, ok):
    """An argparse type: a number of `kind` satisfying `ok` (a usage error, exit 2, if not)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {rule}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form key=value")
    return text


def _mesh_arg(text: str):
    import dataclasses
    from jaxalign.config import ConfigError, MeshConfig
    axes = [f.name for f in dataclasses.fields(MeshConfig)]
    sizes = {}
    for part in text.split(","):
        axis, sep, size = (s.strip() for s in part.partition("="))
        if not sep or axis not in axes or not size.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} in {text!r}: want AXIS=SIZE with AXIS one of {', '.join(axes)}, "
                f"e.g. --mesh data=1,fsdp=-1,tensor=1")
        sizes[axis] = int(size)
    try:
        return MeshConfig(**sizes)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_runtime(p: argparse.ArgumentParser, configured: bool = False) -> None:
    """--mesh and --dtype. `configured`: a YAML-driven command, where they set config keys
    (jaxalign.reference.RUNTIME_FLAGS) and default to the config's values."""
    from jaxalign.reference import RUNTIME_FLAGS
    for flag, kw in (("--mesh", dict(type=_mesh_arg)),
                     ("--dtype", dict(choices=("float32", "bfloat16")))):
        key, meaning = RUNTIME_FLAGS[flag]
        where = f" (sets {key})" if configured else ""
        p.add_argument(flag, default=None if configured or flag == "--mesh" else "float32",
                       help=meaning.replace("%", "%%") + where, **kw)


def _config_overrides(args, config_cls) -> list[str]:
    """--mesh / --dtype as key=value overrides, before the user's own."""
    from jaxalign import reference
    try:
        flags = reference.flag_overrides(config_cls, mesh=args.mesh, dtype=args.dtype)
    except ValueError as e:
        args.parser.error(str(e))
    return flags + list(args.overrides)


def _add_revision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None,
                   help="hub ids only: branch, tag or commit (default main); honours "
                        "HF_HUB_CACHE / HF_HOME and HF_HUB_OFFLINE=1")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    """Several processes as one run (jaxalign/distributed.py; SLURM / MPI / TPU pods are
    detected without these)."""
    p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="process 0's address, for a run over several processes / hosts")
    p.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    p.add_argument("--process-id", type=int, default=None, help="this process's id, 0-based")


def _mesh(args):
    from jaxalign import sharding
    from jaxalign.config import MeshConfig
    return sharding.make_mesh(args.mesh or MeshConfig())


def cmd_convert(args) -> int:
    from jaxalign import checkpoint
    from jaxalign.convert import hf, hub

    t0 = time.perf_counter()
    src = hub.resolve(args.hf_dir, args.revision)
    cfg, params, hf_config = hf.load(src, _mesh(args))
    out = checkpoint.save_model(args.out_dir, cfg, params, hf_config, source_dir=src)
    log.info("converted %s -> %s (%.1fM params, %.1fs)", args.hf_dir, out,
             hf.num_params(params) / 1e6, time.perf_counter() - t0)
    print(out)
    return 0


def cmd_export(args) -> int:
    from jaxalign.export import export
    print(export(args.model, args.out_dir, _mesh(args), adapter=args.adapter,
                 revision=args.revision, max_shard_bytes=int(args.max_shard_gb * 2**30),
                 dtype=args.dtype))
    return 0


def cmd_generate(args) -> int:
    from jaxalign.tokenizer import load_tokenizer
    from jaxalign import checkpoint
    from jaxalign.generate import generate_text

    if args.out and not args.prompts:
        raise SystemExit(_usage("generate", "--out needs --prompts FILE"))
    # Scanned layers keep the prefill one small program; the decode steps read per-layer
    # weights either way (generate.py). --dtype bfloat16 decodes from bf16 copies of the
    # weights (half the bytes a step reads).
    cfg, params, _, tok_dir = checkpoint.load_model(args.model, _mesh(args), dtype=args.dtype,
                                                    scan_layers=True, revision=args.revision)
    tokenizer = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.prompts:
        from jaxalign.evaluate.generation import generate_file, write_jsonl
        rows = generate_file(cfg, params, tokenizer, args.prompts, chat=args.chat,
                             batch_size=args.batch_size, **sampling)
        log.info("generated %d completions in %.1fs (compile included)", len(rows),
                 time.perf_counter() - t0)
        if args.out:
            print(write_jsonl(args.out, rows))
        else:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False, default=str))
        return 0
    (completion,) = generate_text(cfg, params, tokenizer, [args.prompt], chat=args.chat,
                                  **sampling)
    log.info("generated in %.1fs (compile included)", time.perf_counter() - t0)
    print(completion)
    return 0


def _usage(command: str, message: str) -> int:
    sys.stderr.write(f"jaxalign {command}: error: {message} (see `jaxalign {command} --help`)\n")
    return 2


def cmd_train(args) -> int:
    """Any recipe of `jaxalign.train.recipes.RECIPES`: YAML + overrides -> config -> run."""
    from jaxalign.config import from_dict, load_yaml
    from jaxalign.train.recipes import RECIPES

    config_cls, run_fn = RECIPES[args.command].load()
    raw = load_yaml(args.config, _config_overrides(args, config_cls))
    cfg = from_dict(config_cls, raw)
    metrics = run_fn(cfg, raw)
    print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
    return 0


def cmd_eval(args) -> int:
    from jaxalign.evaluate import EvalConfig, load_config, run_eval
    results = run_eval(load_config(args.config, _config_overrides(args, EvalConfig)))
    print(json.dumps({k: round(v, 6) for k, v in results.items()}))
    return 0


def cmd_prepare(args) -> int:
    from jaxalign.config import from_dict, load_yaml
    from jaxalign.data.prepare import PrepareConfig, run_prepare
    from jaxalign import distributed
    raw = load_yaml(args.config, args.overrides)
    distributed.check_same_run(raw)
    totals = run_prepare(from_dict(PrepareConfig, raw), raw)
    print(json.dumps({k: int(v) for k, v in totals.items()}))
    return 0


def cmd_report(args) -> int:
    from jaxalign.report import write_report
    result = write_report(args.run, args.out)
    log.info("wrote %s and %d plot(s)", result["report"], len(result["plots"]))
    print(result["summary"], end="")
    return 0


def cmd_pipeline(args) -> int:
    from jaxalign.config import from_dict, load_yaml
    from jaxalign.pipeline import PipelineConfig, run_pipeline, runtime_overrides
    overrides = list(args.overrides)
    if args.mesh is not None or args.dtype is not None:  # onto every stage that has the key
        overrides = runtime_overrides(load_yaml(args.config, overrides), args.mesh,
                                      args.dtype) + overrides
    # A stage stopped by SIGTERM / SIGINT raises Preempted after its checkpoint: main() exits
    # EXIT_PREEMPTED as for any training command, and rerunning the pipeline resumes that stage.
    run_pipeline(from_dict(PipelineConfig, load_yaml(args.config, overrides)))
    return 0


def cmd_plan(args) -> int:
    from jaxalign.train.plan import run_plan
    overrides = ([f"model.dtype={args.dtype}"] if args.dtype else []) + list(args.overrides)
    meshes = args.meshes
    if args.mesh is not None:
        fixed = math.prod(n for n in args.mesh.shape if n != -1)
        sizes = [args.devices // fixed if n == -1 else n for n in args.mesh.shape]
        meshes = ",".join(f"{axis}={n}" for axis, n in zip(("data", "fsdp", "tensor"), sizes))
    results = run_plan(args.config, overrides, devices=args.devices, meshes=meshes,
                       recipe=args.recipe, device_memory_gb=args.device_memory_gb)
    if args.json:
        print(json.dumps([r.as_json() for r in results]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxalign", description="Align Hugging Face Llama models with JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_distributed(parser)
    # -v also after the command (`jaxalign sft c.yaml -v`); SUPPRESS keeps the subcommand's
    # default from overwriting a -v given before it.
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging, and a traceback with any error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add_parser(*a, parents=[verbose], **kw)

    p = sub.add_parser("convert", help="HF checkpoint -> jaxalign checkpoint")
    p.add_argument("hf_dir", help="HF directory or hub model hf://org/name")
    p.add_argument("out_dir")
    _add_revision(p)
    _add_runtime(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="run dir / jaxalign checkpoint / HF dir -> HF directory")
    p.add_argument("model", help="run dir, jaxalign checkpoint, HF directory or hub model hf://org/name")
    p.add_argument("out_dir")
    _add_revision(p)
    p.add_argument("--max-shard-gb", type=_number(float, "> 0", lambda x: x > 0), default=5.0,
                   help="split safetensors above this size, with an index (default 5)")
    p.add_argument("--adapter", action="store_true",
                   help="LoRA runs: write a PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) instead of merged weights")
    _add_runtime(p)
    # export: --dtype is the dtype of the written tensors; unset keeps the model's own.
    p.set_defaults(func=cmd_export, dtype=None)

    p = sub.add_parser("generate", help="complete one prompt (prints only the completion) or "
                                        "a file of prompts (JSONL rows)")
    p.add_argument("model", help="HF directory, jaxalign checkpoint, run dir or hub model hf://org/name")
    _add_revision(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt; stdout gets only its completion")
    what.add_argument("--prompts", metavar="FILE",
                      help="a .txt file (one prompt a line) or a dataset of prompt / messages / "
                           "pair rows; one JSON row per prompt (prompt, completion, tokens, "
                           "finished, the row's other columns) to --out or stdout")
    p.add_argument("--out", metavar="FILE", help="with --prompts: write the JSONL rows here")
    p.add_argument("--batch-size", type=_number(int, ">= 1", lambda x: x >= 1), default=8,
                   help="with --prompts: prompts per sampler call (default 8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=_number(int, ">= 1", lambda x: x >= 1), default=128)
    p.add_argument("--temperature", type=_number(float, ">= 0", lambda x: x >= 0), default=0.0,
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=_number(float, "in (0, 1]", lambda x: 0 < x <= 1), default=1.0)
    p.add_argument("--top-k", type=_number(int, ">= 0 (0: off)", lambda x: x >= 0), default=0)
    p.add_argument("--seed", type=int, default=0)
    _add_runtime(p)
    p.set_defaults(func=cmd_generate)

    from jaxalign.train.recipes import RECIPES  # strings only: no JAX import here
    for name, recipe in RECIPES.items():
        p = sub.add_parser(name, help=f"{recipe.help} (rerun on the same out_dir resumes)",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_configured(p, name, "YAML run config (see configs/)")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="data stage: empty / exact / near-duplicate (MinHash) "
                                       "removal, mixing by weights, train/eval split")
    p.add_argument("config", help="YAML data config (see configs/*data*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", type=_override)
    _add_runtime(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("report", help="report.md + PNG plots of a run or pipeline dir "
                                      "(needs the extra: pip install 'jaxalign[report]')")
    p.add_argument("run", help="run dir or pipeline dir")
    p.add_argument("--out", default=None, help="where report.md and the PNGs go (default: RUN)")
    _add_runtime(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("pipeline", help="every stage from one YAML (data, sft, rm, ppo / dpo / "
                                        "kto, eval, export, report); reruns only what changed")
    p.add_argument("config", help="YAML pipeline config (see configs/*rlhf*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. sft.train.steps=10", type=_override)
    _add_runtime(p, configured=True)  # --mesh / --dtype: each stage's own keys
    p.set_defaults(func=cmd_pipeline, parser=p)

    p = sub.add_parser("eval", help="evaluate named policies: perplexity, ROUGE-L / exact match, "
                                    "reward-model win rate and KL vs the reference, preference "
                                    "accuracy, samples, optional lm-eval task",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_configured(p, "eval", "YAML eval config, sections models, data, eval, lm_eval "
                               "(see configs/tiny_eval.yaml)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("plan", help="per-mesh memory, compile time and collectives of a run's "
                                    "train step on N devices, compiled from shapes (no weights)")
    planned = [n for n, r in RECIPES.items() if r.planner]
    p.add_argument("config", help=f"YAML run config of {' / '.join(planned)}")
    p.add_argument("overrides", nargs="*", metavar="key=value", type=_override)
    p.add_argument("--devices", type=_number(int, ">= 1", lambda x: x >= 1), required=True,
                   help="number of devices to plan for")
    p.add_argument("--meshes", default=None,
                   help="meshes to try, e.g. 'fsdp=64;data=4,fsdp=16' (default: every mesh "
                        "that divides the batch and the KV heads)")
    p.add_argument("--recipe", default="sft", choices=planned,
                   help="the config's recipe (default sft)")
    p.add_argument("--device-memory-gb", type=float, default=None,
                   help="memory of one device, for the 'fits' column")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    # --mesh: plan that one mesh (an axis of -1 takes the devices left); --dtype: model.dtype.
    _add_runtime(p, configured=True)
    p.set_defaults(func=cmd_plan)

    from jaxalign.reference import CONFIGS
    p = sub.add_parser("config", help="print every key of a command's config: type, default, "
                                      "meaning")
    p.add_argument("name", nargs="?", choices=list(CONFIGS))
    p.add_argument("--markdown", action="store_true",
                   help="every command's keys as markdown (what docs/config.md holds)")
    p.set_defaults(func=cmd_config, parser=p)
    return parser


def _add_configured(p: _Parser, name: str, what: str) -> None:
    p.config_name = name
    p.add_argument("config", help=what)
    p.add_argument("overrides", nargs="*", metavar="key=value", type=_override,
                   help="dotted overrides, e.g. train.steps=10 optim.lr=1e-4")
    _add_runtime(p, configured=True)
    p.set_defaults(parser=p)


def cmd_config(args) -> int:
    from jaxalign import reference
    if args.markdown == (args.name is not None):
        args.parser.error("give a command name or --markdown")
    print(reference.render_markdown() if args.markdown else reference.render_text(args.name),
          end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jaxalign import runtime
    if argv is None:  # a real command line: may re-execute under mimalloc (jaxalign.runtime)
        runtime.reexec_with_allocator(sys.argv[1:])
    args = build_parser().parse_args(argv)
    args.command_line = sys.argv[1:] if argv is None else None   # may be supervised
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # jax probes for a TPU on every start and logs the miss at INFO; not news on CPU/GPU.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if not args.verbose:  # orbax logs every save/restore phase through absl at INFO
        logging.getLogger("absl").setLevel(logging.WARNING)
    rc, error = 1, None
    try:
        rc = _dispatch(args)
    except BaseException as e:
        error = e
        raise
    finally:
        if "jaxalign.distributed" in sys.modules:  # several processes: tell the others
            sys.modules["jaxalign.distributed"].end(rc, error)
    return rc


def _dispatch(args) -> int:
    from jaxalign import runtime
    from jaxalign.config import JaxalignError
    from jaxalign.train.preempt import Preempted
    try:
        if args.func is not cmd_config:  # printing the reference needs no devices
            from jaxalign import distributed
            settings = runtime.configure_jax()
            log.debug("runtime settings: %s", settings)
            distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   watch=True, supervise=args.command_line)
        return args.func(args)
    except Preempted as e:
        # A scheduler's SIGTERM is not a failure: the checkpoint is written, rerun continues.
        # Not success either: a chain (`jaxalign sft ... && jaxalign export ...`, rlhf.sh)
        # must not go on to use an unfinished run, hence its own status.
        log.warning("%s; rerun the same command to continue", e)
        return EXIT_PREEMPTED
    except (JaxalignError, OSError) as e:
        # Our own errors name the file / row / key / tensor; a traceback would bury that.
        # OSError: a path the user gave that cannot be read or written.
        if "jaxalign.distributed" in sys.modules:   # our own line, not the peer watchdog's too
            sys.modules["jaxalign.distributed"].failing()
        if args.verbose:
            import traceback
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"jaxalign: error: {_one_line(e)}\n")
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
