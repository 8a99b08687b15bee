"""`jaxalign eval`: generation-based and likelihood-based evaluation of named policies.

`run_eval(load_config(path))` (or `run_eval(from_raw(mapping))`) -> flat metrics dict, and
with out_dir: eval.json (the same dict), eval_summary.json (per-model table, models, files),
samples.jsonl and generations_<name>.jsonl. See `run` for the metrics and `config` for the
YAML shape.
"""

from jaxalign.evaluate.config import (EvalConfig, EvalData, EvalModels, EvalOptions, LMEvalConfig,
                                      from_raw, load_config)
from jaxalign.evaluate.run import run_eval

__all__ = ["EvalConfig", "EvalData", "EvalModels", "EvalOptions", "LMEvalConfig", "from_raw",
           "load_config", "run_eval"]
