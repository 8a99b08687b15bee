"""Where training numbers go: metrics.jsonl, TensorBoard, optional wandb, a progress line.

metrics.jsonl holds only what the computation determines (loss, grad norm, lr, eval
results), one JSON object per logged step, so a resumed run reproduces it byte for byte.
Wall-clock figures (step time, tokens/s) go to perf.jsonl, TensorBoard and the display.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import jax

log = logging.getLogger(__name__)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops records past `last_step`: a killed run may have logged steps that the
    checkpoint it resumes from does not contain. A torn record (a kill or a full disk in the
    middle of a line) is dropped with a warning. Rewritten atomically: a kill here leaves
    the old file or the new one."""
    if not path.exists():
        return
    from jaxalign.rundir import write_atomic
    keep = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: dropping a torn record (%r)", path, n, line[:80])
            continue
        if step <= last_step:
            keep.append(line)
    write_atomic(path, "".join(line + "\n" for line in keep))


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True,
                 wandb_project: str | None = None, run_config: Mapping | None = None):
        self.enabled = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self._tb = self._wandb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "perf.jsonl"):
            truncate_jsonl(self.run_dir / name, resume_step)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._perf = open(self.run_dir / "perf.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb_project:
            import wandb  # optional dependency: only when asked for
            self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir),
                                     config=dict(run_config or {}), resume="allow")

    def write(self, step: int, metrics: Mapping[str, float], perf: Mapping[str, float] = ()) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if perf:
            self._perf.write(json.dumps({"step": step, **{k: float(v) for k, v in perf.items()}}) + "\n")
            self._perf.flush()
        both = {**metrics, **dict(perf)}
        if self._tb is not None:
            for k, v in both.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log(dict(both), step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._perf.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# What the progress line shows is each recipe's `progress` (jaxalign.train.recipes.RECIPES),
# which it hands to the loop (`Task.progress`); eval/ versions are shown when present. The
# short names those keys get on the line:
LABELS = {"token_accuracy": "acc", "tokens_per_s": "tok/s", "accuracy": "acc",
          "rewards/accuracies": "acc", "rewards/margins": "margin", "reward_mean": "reward",
          "response_length": "len"}


def progress_text(fields, metrics: Mapping[str, float], perf: Mapping[str, float]) -> str:
    """`loss 0.6931 acc 0.5 margin 0 | eval loss ...` for the given keys (those present)."""
    def show(key, value):
        return f"{LABELS.get(key, key)} {value:.0f}" if key == "tokens_per_s" \
            else f"{LABELS.get(key, key)} {value:.4g}"
    parts = [show(k, v) for k in fields
             if (v := metrics.get(k, perf.get(k))) is not None]
    evals = [show(k, metrics[f"eval/{k}"]) for k in fields if f"eval/{k}" in metrics]
    return " ".join(parts) + (" | eval " + " ".join(evals) if evals else "")


class Progress:
    """One refreshing status line on stderr (rich), or, when stderr is not a terminal, a log
    line at most every `log_seconds` (and after the first and the last step).

    `fields`: the metric keys that matter for the recipe (its row's `progress`). The ETA
    counts only the steps after the first: the first one compiles the programs, and on a
    short run its time would dominate the estimate."""

    def __init__(self, total: int, start: int, enabled: bool = True, log_seconds: float = 10.0,
                 fields=("loss",), unit: str = "step"):
        self.total, self.start, self.fields, self.unit = total, start, tuple(fields), unit
        self.enabled = enabled and jax.process_index() == 0
        self._t0 = self._last_log = time.perf_counter()
        self._t_first = None  # when the first step (compilation included) ended
        self._log_seconds = log_seconds
        self._bar = None
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, \
                TextColumn
            self._bar = RichProgress(TextColumn(f"[bold]{unit}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"),
                                     console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task(unit, total=total, completed=start, info="")
            self._bar.start()

    def eta(self, step: int, now: float | None = None) -> float | None:
        """Seconds left, from the mean time of the steps after the first; None until then."""
        now = time.perf_counter() if now is None else now
        timed = step - self.start - 1
        if self._t_first is None or timed < 1:
            return None
        return (now - self._t_first) / timed * (self.total - step)

    def update(self, step: int, metrics: Mapping[str, float], perf: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        first = self._t_first is None
        if first:
            self._t_first = now
        eta = self.eta(step, now)
        info = progress_text(self.fields, metrics, perf)
        info += (f" eta {eta:.0f}s" if eta is not None
                 else f" (first {self.unit} took {now - self._t0:.1f}s; eta from the next)")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif first or step == self.total or now - self._last_log >= self._log_seconds:
            self._last_log = now
            log.info("%s %d/%d %s", self.unit, step, self.total, info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
