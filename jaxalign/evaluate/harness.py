"""Optional lm-evaluation-harness run (the `lmeval` extra): one task from a local task file on
an HF export of a policy, through the harness' own `hf` model (transformers, on CPU). Its
scores are folded into the eval results as `lm_eval/<policy>/<task>/<metric>`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jaxalign.config import ConfigError, JaxalignError

log = logging.getLogger("jaxalign.eval")

INSTALL = "pip install 'jaxalign[lmeval]'"


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise JaxalignError(f"lm_eval: lm-evaluation-harness is not installed ({INSTALL})") from None
    return lm_eval


def task_name(task_file: str, task: str | None) -> str:
    """The task to run: `task`, else the `task:` key of the file."""
    import yaml
    path = Path(task_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"lm_eval.task_file: {task_file} does not exist")
    if task:
        return task
    try:
        # The harness' own YAML tags (!function) are not plain YAML; read them as strings.
        loader = type("TaskLoader", (yaml.SafeLoader,), {})
        loader.add_multi_constructor("!", lambda l, suffix, node: None)
        name = (yaml.load(path.read_text(), Loader=loader) or {}).get("task")
    except yaml.YAMLError as e:
        raise ConfigError(f"lm_eval.task_file: {task_file}: invalid YAML ({e})") from None
    if not isinstance(name, str):
        raise ConfigError(f"lm_eval.task_file: {task_file} has no `task:` name; set lm_eval.task")
    return name


def run_task(hf_dir: str | Path, task_file: str, task: str | None = None, *, limit=None,
             num_fewshot=None, batch_size: int = 8) -> dict[str, float]:
    """{metric: value} of the task on the HF model in hf_dir (stderr entries left out)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    name = task_name(task_file, task)
    manager = TaskManager(include_path=str(Path(task_file).expanduser().resolve().parent))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                                  tasks=[name], num_fewshot=num_fewshot, limit=limit,
                                  batch_size=batch_size, device="cpu", task_manager=manager)
    if out is None or name not in out.get("results", {}):
        raise JaxalignError(f"lm_eval: task {name!r} gave no results")
    scores = {}
    for key, value in out["results"][name].items():
        metric = key.split(",")[0]  # "acc,none": metric, filter
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not metric.endswith("_stderr") and metric != "sample_len":
            scores[key.replace(",none", "").replace(",", "/")] = float(value)
    log.info("lm_eval %s on %s: %s", name, hf_dir, scores)
    return scores
