"""`jaxalign report RUN_OR_PIPELINE_DIR`: report.md and PNG plots, read from run files only.

A run dir is anything holding metrics.jsonl (any recipe), eval.json (an eval) or stats.json
(the data stage); a pipeline dir is a folder of them (pipeline.json gives the stage order,
else the folder names in order). Per run, from what it has:
  metrics.jsonl   curves, one panel per group (loss, eval metrics, reward, KL, entropy,
                  accuracy / margin, optimisation); the group of a key is read from its name
  perf.jsonl      step / iteration time and tokens/s; the run's wall time is their sum
  samples.jsonl   the last samples (RL runs); eval.json / generations: the eval's numbers
  memory.json     the RL driver's memory report; stats.md: the data stage's table
  run.json / config.yaml   the algorithm
Importing no JAX, it works on a run dir from any machine. matplotlib is an extra (`report`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jaxalign.config import JaxalignError

# Columns of the per-policy eval table (jaxalign eval's eval_summary.json), in this order.
EVAL_COLUMNS = ("ppl/perplexity", "gen/rouge_l", "gen/exact_match", "gen/reward", "winrate",
                "kl/sequence", "dpo/accuracy", "dpo/margin", "gen/length")
# Panel groups: (title, predicate on a metric key). A key goes to its first matching group.
GROUPS = (
    ("loss", lambda k: k.endswith("loss")),
    ("accuracy / margin", lambda k: "accura" in k or "margin" in k),
    ("reward", lambda k: "reward" in k or k in ("score", "win_rate") or k.startswith("winrate")),
    ("KL", lambda k: "kl" in k.lower()),
    ("entropy", lambda k: "entropy" in k),
    ("eval metrics", lambda k: k.startswith("eval/")),
    ("optimisation", lambda k: k in ("grad_norm", "lr", "clipfrac", "approx_kl", "skipped")),
)
# The summary table: the first of each row's keys that the run logged.
HEADLINES = (("loss", ("loss",)), ("eval loss", ("eval/loss",)),
             ("eval accuracy", ("eval/accuracy", "eval/rm_accuracy")),
             ("reward", ("reward_mean", "reward")), ("KL", ("kl",)), ("entropy", ("entropy",)),
             ("win rate", ("winrate/policy_vs_reference",)))


class ReportError(JaxalignError):
    """A directory with no run files, or an unreadable one."""


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("jaxalign report needs matplotlib: pip install 'jaxalign[report]'") from None
    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt
    return plt


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}: line {n}: malformed JSON ({e.msg})") from None
    return rows


def _json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: malformed JSON ({e.msg})") from None


def is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in ("metrics.jsonl", "eval.json", "stats.json"))


def find_runs(path: Path) -> list[Path]:
    """The run itself, or a pipeline's stage dirs in stage order."""
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    if is_run(path):
        return [path]
    state = _json(path / "pipeline.json") or {}
    order = state.get("order") or list(state.get("stages", {}))
    subdirs = [p for p in sorted(path.iterdir()) if p.is_dir() and is_run(p)
               and (not order or p.name in order)]  # a stage dropped from the config: not shown
    subdirs.sort(key=lambda p: list(order).index(p.name) if p.name in order else len(order))
    if not subdirs:
        raise ReportError(f"{path}: no run files (metrics.jsonl, eval.json, stats.json) here "
                          "or in its folders")
    return subdirs


def algorithm(run: Path) -> str:
    meta = _json(run / "run.json") or {}
    if meta.get("algorithm"):
        return meta["algorithm"]
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml
        raw = yaml.safe_load(cfg.read_text()) or {}
        if isinstance(raw, dict) and raw.get("algorithm"):
            return str(raw["algorithm"])
    if (run / "stats.json").is_file():
        return "data"
    if (run / "eval.json").is_file():
        return "eval"
    return "run"


def load_run(run: Path) -> dict[str, Any]:
    metrics = _jsonl(run / "metrics.jsonl")
    perf = _jsonl(run / "perf.jsonl")
    wall = sum(r.get("step_s", r.get("iteration_s", 0.0)) for r in perf)
    return dict(path=run, name=run.name, algorithm=algorithm(run), metrics=metrics, perf=perf,
                samples=_jsonl(run / "samples.jsonl"), memory=_json(run / "memory.json"),
                eval=_json(run / "eval.json"), wall_s=wall, stats_json=_json(run / "stats.json"),
                eval_table=(_json(run / "eval_summary.json") or {}).get("table") or {},
                eval_diffs=(_json(run / "eval_summary.json") or {}).get("differences") or [],
                stats=(run / "stats.md").read_text() if (run / "stats.md").is_file() else None,
                generations=sorted(run.glob("*generations*.jsonl")))


def grouped(metrics: list[dict]) -> dict[str, list[str]]:
    keys = sorted({k for r in metrics for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float))})
    groups: dict[str, list[str]] = {}
    for k in keys:
        for title, match in GROUPS:
            if match(k):
                groups.setdefault(title, []).append(k)
                break
    return {title: groups[title] for title, _ in GROUPS if title in groups}


def _series(rows: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
           and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run: dict, out: Path) -> Path | None:
    """One PNG: a panel per metric group, plus the step time when perf.jsonl has it."""
    groups = grouped(run["metrics"])
    timing = [k for k in ("step_s", "iteration_s", "rollout_s", "update_s")
              if any(k in r for r in run["perf"])]
    panels = list(groups.items()) + ([("time per step (s)", timing)] if timing else [])
    if not panels:
        return None
    plt, fig, axes = _grid(len(panels), max_cols=3, panel=(4.6, 3.2))
    for ax, (title, keys) in zip(axes.flat, panels):
        source = run["perf"] if title.startswith("time") else run["metrics"]
        for k in keys[:8]:  # more lines than that are unreadable in one panel
            x, y = _series(source, k)
            if x:
                ax.plot(x, y, marker="." if len(x) < 30 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, list(axes.flat)[len(panels):], f"{run['name']} ({run['algorithm']})",
                 out / f"{run['name']}_curves.png")


def _grid(n: int, *, max_cols: int, panel: tuple[float, float]):
    """(pyplot, figure, axes) of a grid of n panels, at most max_cols a row, each panel (w, h)."""
    plt = _matplotlib()
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, unused_axes, title: str | None, path: Path) -> Path:
    """Hides the grid's unused panels, titles, lays out, writes the PNG, frees the figure."""
    for ax in unused_axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_timing(runs: list[dict], out: Path) -> Path | None:
    timed = [r for r in runs if r["wall_s"] > 0]
    if len(timed) < 2:
        return None
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(timed) + 1.5))
    ax.barh([f"{r['name']} ({r['algorithm']})" for r in timed], [r["wall_s"] for r in timed])
    ax.invert_yaxis()
    ax.set_xlabel("seconds in steps (perf.jsonl)")
    ax.set_title("time per stage")
    return _save(plt, fig, [], None, out / "timing.png")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _last(metrics: list[dict], key: str):
    for r in reversed(metrics):
        if isinstance(r.get(key), (int, float)):
            return r[key]
    return None


def summary_rows(runs: list[dict]) -> list[list[str]]:
    header = ["stage", "algorithm", "steps / rows"] + [h for h, _ in HEADLINES] + ["time (s)"]
    rows = [header]
    for r in runs:
        m = r["metrics"]
        steps = str(m[-1]["step"]) if m else ""
        if r["stats_json"]:  # the data stage: rows it kept for training
            steps = f"{sum(c.get('train', 0) for c in r['stats_json'])} rows"
        cells = [r["name"], r["algorithm"], steps]
        for _, keys in HEADLINES:
            v = next((x for x in (_last(m, k) for k in keys) if x is not None), None)
            if v is None and r["eval"]:
                v = next((r["eval"][k] for k in keys if isinstance(r["eval"].get(k), (int, float))), None)
            cells.append("" if v is None else _fmt(v))
        cells.append(f"{r['wall_s']:.1f}" if r["wall_s"] else "")
        rows.append(cells)
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |"
              for row in rows[1:]]
    return "\n".join(lines) + "\n"


def _interval(m: dict, c: str) -> tuple[float, float] | None:
    low, high = m.get(f"{c}/ci_low"), m.get(f"{c}/ci_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) \
            and math.isfinite(low) and math.isfinite(high):
        return low, high
    return None


def _with_ci(m: dict, c: str) -> str:
    if m.get(c) is None:
        return ""
    ci = _interval(m, c)
    return _fmt(m[c]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def eval_rows(table: dict[str, dict]) -> list[list[str]]:
    """Policies x the EVAL_COLUMNS they have (then any lm_eval scores), each mean with its
    bootstrap interval [low, high] where eval wrote one."""
    cols = [c for c in EVAL_COLUMNS if any(c in m for m in table.values())]
    cols += sorted({k for m in table.values() for k in m if k.startswith("lm_eval/")})
    rows = [["policy"] + cols]
    for name, m in table.items():
        rows.append([name] + [_with_ci(m, c) for c in cols])
    return rows


def diff_rows(diffs: list[dict]) -> list[list[str]]:
    """The paired differences: a - b on the same prompts, with the interval."""
    rows = [["a - b", "metric", "difference", "interval", "prompts"]]
    for d in diffs:
        ci = "" if d["ci_low"] is None or not math.isfinite(d["ci_low"]) else \
            f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]"
        rows.append([f"{d['a']} - {d['b']}", d["metric"], _fmt(d["diff"]), ci, str(d["n"])])
    return rows


def _relative(table: dict[str, dict], a: str, b: str, key: str, label: str) -> str | None:
    va, vb = table.get(a, {}).get(key), table.get(b, {}).get(key)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (va, vb)) or not vb:
        return None
    return f"{label} {_fmt(vb)} -> {_fmt(va)} ({(va - vb) / abs(vb):+.1%})"


def gain_lines(table: dict[str, dict], diffs: list[dict], metric: str = "gen/exact_match") -> str:
    """One line per policy pair: a's gain over b in `metric` on the same prompts with its
    paired interval and whether the interval is above zero, then a's perplexity and length
    relative to b's (what the gain may not cost)."""
    lines = []
    for d in diffs:
        if d["metric"] != metric:
            continue
        low, high = d.get("ci_low"), d.get("ci_high")
        has_ci = isinstance(low, (int, float)) and math.isfinite(low)
        verdict = ("" if not has_ci else " (interval above zero)" if low > 0
                   else " (interval below zero)" if high < 0 else " (interval includes zero)")
        ci = f" [{low:+.3f}, {high:+.3f}]" if has_ci else ""
        extra = [x for x in (_relative(table, d["a"], d["b"], "ppl/perplexity", "perplexity"),
                             _relative(table, d["a"], d["b"], "gen/length", "length")) if x]
        lines.append(f"- {d['a']} - {d['b']}, held-out {metric.split('/')[-1].replace('_', ' ')}: "
                     f"{d['diff']:+.3f}{ci} on {d['n']} prompts{verdict}"
                     + ("; " + "; ".join(extra) if extra else ""))
    return "\n".join(lines) + ("\n" if lines else "")


def _bars(ax, names: list[str], values: list[float], cis: list) -> None:
    """Bars with error bars from the intervals (where given)."""
    if any(ci is not None for ci in cis):
        lo = [v - ci[0] if ci else 0.0 for v, ci in zip(values, cis)]
        hi = [ci[1] - v if ci else 0.0 for v, ci in zip(values, cis)]
        ax.bar(names, values, color="tab:blue", yerr=[lo, hi], capsize=4, ecolor="black")
    else:
        ax.bar(names, values, color="tab:blue")


def plot_eval(run: dict, out: Path) -> Path | None:
    """Bars: each eval metric per policy, error bars its bootstrap interval; then a panel per
    paired-difference metric (a - b, with its interval)."""
    table, diffs = run["eval_table"], run.get("eval_diffs") or []
    cols = [c for c in EVAL_COLUMNS if any(c in m for m in table.values())]
    metrics = sorted({d["metric"] for d in diffs})
    if not cols and not metrics:
        return None
    n = len(cols) + len(metrics)
    plt, fig, axes = _grid(n, max_cols=4, panel=(3.4, 2.8))
    flat = list(axes.flat)
    for ax, c in zip(flat, cols):
        names = [k for k, m in table.items() if c in m]
        _bars(ax, names, [table[k][c] for k in names], [_interval(table[k], c) for k in names])
        ax.set_title(c, fontsize=9)
    for ax, metric in zip(flat[len(cols):], metrics):
        rows = [d for d in diffs if d["metric"] == metric]
        cis = [(d["ci_low"], d["ci_high"]) if d["ci_low"] is not None
               and math.isfinite(d["ci_low"]) else None for d in rows]
        _bars(ax, [f"{d['a']} - {d['b']}" for d in rows], [d["diff"] for d in rows], cis)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"difference: {metric}", fontsize=9)
    for ax in flat[:n]:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    has_ci = bool(diffs) or any(_interval(m, c) for m in table.values() for c in cols)
    title = f"{run['name']}: per policy" + (" (error bars: bootstrap intervals)" if has_ci else "")
    return _save(plt, fig, flat[n:], title, out / f"{run['name']}_policies.png")


def _memory_md(memory: dict) -> str:
    rows = [["part", "MiB"]] + [[k, f"{v / 2**20:.1f}"] for k, v in memory.get("params_bytes", {}).items()]
    md = "Parameter bytes (global):\n\n" + markdown_table(rows)
    progs = memory.get("programs") or {}
    if progs:
        cols = ["argument", "output", "alias", "temp", "peak_estimate"]
        prow = [["program"] + [f"{c} MiB" for c in cols]]
        prow += [[name] + [f"{s.get(c, 0) / 2**20:.1f}" for c in cols] for name, s in progs.items()]
        md += "\nCompiled programs (per device):\n\n" + markdown_table(prow)
    return md


def _samples_md(samples: list[dict], n: int = 4) -> str:
    if not samples:
        return ""
    first = ("step", "prompt", "answer", "reference")
    keys = [k for k in first if k in samples[0]]
    keys += [k for k in samples[0] if k not in first and k.startswith(("completion", "reward"))]
    rows = [keys] + [[_fmt(s.get(k, ""))[-160:] if k == "prompt" else _fmt(s.get(k, ""))[:200]
                      for k in keys] for s in samples[-n:]]
    return markdown_table(rows)


def run_section(r: dict, out: Path, plots: list[Path]) -> str:
    md = [f"## {r['name']} ({r['algorithm']})\n", f"`{r['path']}`\n"]
    png = plot_run(r, out)
    if png is not None:
        plots.append(png)
        md.append(f"![{r['name']}]({png.name})\n")
    if r["metrics"]:
        last = r["metrics"][-1]
        md.append(f"Last logged step {last['step']}:\n\n" + markdown_table(
            [["metric", "value"]] + [[k, _fmt(v)] for k, v in sorted(last.items()) if k != "step"]))
    if r["perf"]:
        steps = [p.get("step_s", p.get("iteration_s")) for p in r["perf"]]
        steps = [s for s in steps if s is not None]
        if steps:
            later = steps[1:] or steps
            md.append(f"Timing: {len(steps)} logged steps, {sum(steps):.1f} s in all; first "
                      f"{steps[0]:.2f} s (compilation included), then median "
                      f"{sorted(later)[len(later) // 2]:.2f} s.\n")
    if r["eval_table"]:
        png = plot_eval(r, out)
        if png is not None:
            plots.append(png)
            md.append(f"![{r['name']} per policy]({png.name})\n")
        md.append("Per policy (mean [bootstrap interval]):\n\n"
                  + markdown_table(eval_rows(r["eval_table"])))
        if r.get("eval_diffs"):
            md.append("Paired differences (same prompts):\n\n"
                      + markdown_table(diff_rows(r["eval_diffs"])))
    elif r["eval"]:
        flat = {k: v for k, v in r["eval"].items() if isinstance(v, (int, float, str))}
        md.append("Evaluation:\n\n" + markdown_table([["metric", "value"]] +
                                                   [[k, _fmt(v)] for k, v in sorted(flat.items())]))
    if r["stats"]:
        md.append("Rows kept and dropped:\n\n" + r["stats"])
    if r["memory"]:
        md.append("Memory report:\n\n" + _memory_md(r["memory"]))
    if r["samples"]:
        md.append("Samples:\n\n" + _samples_md(r["samples"]))
    for g in r["generations"]:
        md.append(f"Samples from {g.name}:\n\n" + _samples_md(_jsonl(g)))
    return "\n".join(md)


def write_report(path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Writes report.md and the PNGs into `out` (default: the dir itself); returns
    {'report': path, 'plots': [...], 'summary': markdown table}."""
    path = Path(path)
    runs = [load_run(p) for p in find_runs(path)]
    if out is not None and Path(out).resolve() != path.resolve():
        from jaxalign import rundir
        out = rundir.claim(out, "report")     # never over someone else's report.md
    out = Path(out) if out is not None else path
    out.mkdir(parents=True, exist_ok=True)
    _matplotlib()  # fail early, with the extra's name, before writing anything
    plots: list[Path] = []
    summary = markdown_table(summary_rows(runs))
    for r in runs:
        if r["eval_table"]:
            summary += f"\n{r['name']}, per policy:\n\n" + markdown_table(eval_rows(r["eval_table"]))
            if r.get("eval_diffs"):
                summary += "\nPaired differences:\n\n" + markdown_table(diff_rows(r["eval_diffs"]))
                gains = gain_lines(r["eval_table"], r["eval_diffs"])
                if gains:
                    summary += "\nGain over the reference (paired bootstrap interval):\n\n" + gains
    sections = [run_section(r, out, plots) for r in runs]
    timing = plot_timing(runs, out)
    md = [f"# Report: {path.name}\n", summary]
    if timing is not None:
        plots.append(timing)
        md.append(f"![time per stage]({timing.name})\n")
    md += sections
    report = out / "report.md"
    report.write_text("\n".join(md))
    (out / "summary.md").write_text(summary)
    return {"report": report, "plots": plots, "summary": summary}
