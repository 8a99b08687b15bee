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
    checkpoint it resumes from does not contain."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


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


class Progress:
    """One refreshing status line on stderr (rich), or, when stderr is not a terminal, a log
    line at most every `log_seconds` (and at the last step)."""

    def __init__(self, total: int, start: int, enabled: bool = True, log_seconds: float = 10.0):
        self.total, self.start = total, start
        self.enabled = enabled and jax.process_index() == 0
        self._t0 = self._last_log = time.perf_counter()
        self._log_seconds = log_seconds
        self._bar = None
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, \
                TextColumn, TimeRemainingColumn
            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, metrics: Mapping[str, float], perf: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start
        eta = (time.perf_counter() - self._t0) / max(done, 1) * (self.total - step)
        info = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                        if k in ("loss", "eval/loss", "lr", "grad_norm"))
        info += f" tok/s {perf.get('tokens_per_s', 0):.0f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step == self.total or time.perf_counter() - self._last_log >= self._log_seconds:
            self._last_log = time.perf_counter()
            log.info("step %d/%d %s eta %.0fs", step, self.total, info, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
