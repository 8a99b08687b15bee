"""The README's speed table from `scripts/bench.py` outputs: reads the JSON line each output
file ends with and prints one markdown row per workload (per batch for generate).

  python scripts/bench_table.py docs/bench/2026-12-05_cpu_*.txt

Columns: ours (step time, peak RSS, compile for sft), theirs, speed = theirs' step time /
ours, memory = ours' peak RSS / theirs'. Rows of the default allocator only.

Outputs with the two baselines of a train workload (scripts/bench.py BASELINES) give the wider
table: TRL as a user runs it (its defaults) and best TRL on the same machine (gradient
checkpointing on or off, the same allocator preloaded as ours), each with its settings and
ours' speed against it; every row names its precision (bf16 / fp32).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("sft", "sft-lora", "dpo", "rm", "forward", "generate", "grpo", "ppo")
THEIRS = {"sft": "`SFTTrainer`", "sft-lora": "`SFTTrainer` + peft", "dpo": "`DPOTrainer`",
          "rm": "`RewardTrainer`", "forward": "transformers", "generate": "transformers `generate`",
          "grpo": "`GRPOTrainer`", "ppo": "none: TRL 1.16 has no PPO trainer"}


def last_json(path: Path) -> dict:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{path}: no JSON line (not a scripts/bench.py output)")


def shape(s: dict, rows: list[dict] = ()) -> str:
    """The workload's shape; RL rows whose every response ran the full length (EOS banned
    until then, on both sides) say so."""
    w = s["workload"]
    if w in ("sft", "sft-lora", "forward"):
        return f"{s['batch']} x {s['seq']}"
    if w in ("dpo", "rm"):
        return f"{s['batch']} pairs x ({s['prompt_len']} + {s['response_len']})"
    if w == "generate":
        return f"{s['prompt_tokens']} + {s['new_tokens']} tokens, batch {s['batch']}"
    lengths = [r.get("response_length") for r in rows if r.get("step_s")]
    if lengths and all(n == s["new_tokens"] for n in lengths):
        return f"{s['batch']} prompts x {s['generations']}, {s['new_tokens']} tokens each"
    return f"{s['batch']} prompts x {s['generations']}, <= {s['new_tokens']} tokens"


def ours_cell(r: dict, workload: str) -> str:
    unit = "s/step" if workload in ("sft", "sft-lora", "dpo", "rm") else "s"
    cell = f"{r['step_s']:.2f} {unit}, {r['peak_rss_gib']:.1f} GiB"
    if r.get("rollout_s") is not None:
        cell += f" (rollout {r['rollout_s']:.1f})"
    if r.get("roofline") is not None:
        cell += f", {100 * r['roofline']:.0f}% of roofline"
    if workload == "sft" and r.get("compile_s") is not None:
        cell += f", compile {r['compile_s']:.1f} s"
    return cell


def rows(doc: dict) -> list[str]:
    w = doc["workload"]
    mine = [r for r in doc["rows"] if r["allocator"] == "default"]
    out = []
    for ours in (r for r in mine if r["side"] == "ours"):
        theirs = next((r for r in mine if r["side"] == "theirs" and r["batch"] == ours["batch"]
                       and r.get("step_s")), None)
        label = f"{w} ({shape({**doc['settings'], 'batch': ours['batch']}, doc['rows'])})"
        if doc["settings"].get("precision") == "bf16":   # fp32 rows keep the older labels
            label = label[:-1] + ", bf16)"
        if theirs is None:
            out.append(f"| {label} | {ours_cell(ours, w)} | {THEIRS[w]} | | |")
            continue
        t = f"{THEIRS[w]} {theirs['step_s']:.2f} s, {theirs['peak_rss_gib']:.1f} GiB"
        if theirs.get("rollout_s") is not None:
            t += f" (rollout {theirs['rollout_s']:.1f})"
        speed = theirs["step_s"] / ours["step_s"]
        mem = ours["peak_rss_gib"] / theirs["peak_rss_gib"]
        out.append(f"| {label} | {ours_cell(ours, w)} | {t} | {speed:.2f}x | {mem:.2f}x |")
    return out


def _theirs_cell(w: str, r: dict) -> str:
    t = f"{THEIRS[w]} {r['step_s']:.2f} s, {r['peak_rss_gib']:.1f} GiB ({r['settings']})"
    if r.get("rollout_s") is not None:
        t += f" (rollout {r['rollout_s']:.1f})"
    return t


def baseline_rows(doc: dict) -> list[str]:
    """ours | TRL default | speed | best TRL | speed | memory (against TRL default)."""
    w, prec = doc["workload"], doc["settings"]["precision"]
    ours = next((r for r in doc["rows"] if r["side"] == "ours" and r.get("step_s")), None)
    label = f"{w} ({shape(doc['settings'], doc['rows'])}, {prec})"
    if ours is None:
        return [f"| {label} | failed | | | | | |"]
    default = next((r for r in doc["rows"] if r.get("baseline") == "default" and r.get("step_s")), None)
    best = min((r for r in doc["rows"] if r.get("baseline") == "best" and r.get("step_s")),
               key=lambda r: r["step_s"], default=None)
    cells = [label, ours_cell(ours, w)]
    for r in (default, best):
        cells += ([_theirs_cell(w, r), f"{r['step_s'] / ours['step_s']:.2f}x"] if r else ["", ""])
    cells.append(f"{ours['peak_rss_gib'] / default['peak_rss_gib']:.2f}x" if default else "")
    return ["| " + " | ".join(cells) + " |"]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    docs = sorted((last_json(Path(p)) for p in argv),
                  key=lambda d: ORDER.index(d["workload"]) if d["workload"] in ORDER else 99)
    if any(r.get("baseline") for d in docs for r in d["rows"]):
        print("| workload (shape, precision) | jaxalign | TRL default | speed | best TRL | speed | memory |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for doc in docs:
            has = any(r.get("baseline") for r in doc["rows"])
            print("\n".join(baseline_rows(doc) if has else rows(doc)))
    else:
        print("| workload (shape) | jaxalign | PyTorch / TRL | speed | memory |")
        print("| --- | --- | --- | --- | --- |")
        for doc in docs:
            print("\n".join(rows(doc)))
    machines = {(d["machine"]["cpu"], d["machine"]["cores"], d["settings"]["precision"]) for d in docs}
    dates = sorted({d["machine"]["date"][:10] for d in docs})
    print(f"\n({', '.join(f'{c}, {n} cores, {p}' for c, n, p in sorted(machines))}; {', '.join(dates)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
