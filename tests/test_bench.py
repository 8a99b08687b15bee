"""scripts/bench.py end to end on a tiny random model: the CLI row and the TRL row of `sft`,
one JSON line with every figure present and positive, and the same first-step loss on both
sides (same weights, same token ids: TRL's SFTTrainer is the reference); in its default mode
(bf16, both baselines) the TRL-default and best-TRL rows with their settings and both ratios."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_xla_flags

pytestmark = pytest.mark.slow  # runs scripts/bench.py (ours and TRL) in a subprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_sft(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    tmp = tmp_path_factory.mktemp("bench")
    model = make_tiny_model(tmp / "tiny")
    # The children get the user's environment (not the test session's 8 fake CPU devices),
    # compiled at the suite's codegen level.
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=child_xla_flags())
    out = tmp / "bench.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "sft", "--model", str(model),
                           "--steps", "1", "--warmup", "1", "--batch", "2", "--seq", "32", "--out", str(out),
                           "--precision", "fp32", "--allocator", "default"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, out.read_text()


def test_bench_sft_json(bench_sft):
    stdout, written = bench_sft
    assert written.strip() == stdout.strip()
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["workload"] == "sft" and result["machine"]["cores"] > 0 and result["machine"]["cpu"]
    assert result["probe"]["matmul_fp32_flops"] > 0 and result["probe"]["mem_read_bytes_per_s"] > 0
    rows = {r["side"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "theirs"}
    for side, r in rows.items():
        assert "error" not in r, r
        for key in ("step_s", "speed", "peak_rss_gib", "first_step_s", "mfu"):
            assert r[key] > 0, (side, key, r[key])
    ours, theirs = rows["ours"], rows["theirs"]
    assert ours["compile_s"] > 0 and ours["ratio"] > 0
    assert ours["tokens_per_step"] == 2 * 32  # full rows: nothing padded
    assert ours["loss1"] == pytest.approx(theirs["loss1"], rel=1e-4)


# The README's speed tables: each round's committed outputs.
ROUNDS = {"2026-12-05 fp32": ["2026-12-05_cpu_*.txt"],
          "2026-12-06 evening": ["2026-12-06_cpu_after_*.txt"],
          "2026-12-07 RL": ["2026-12-07_cpu_grpo.txt", "2026-12-07_cpu_ppo.txt"],
          "2026-12-07 release": ["2026-12-07_cpu_grpo_release.txt", "2026-12-07_cpu_rm_release.txt",
                                 "2026-12-07_cpu_ppo_release.txt"],
          "2026-12-07 arena": ["2026-12-07_cpu_sft_arena.txt", "2026-12-07_cpu_sft-lora_arena.txt",
                               "2026-12-07_cpu_dpo_arena.txt", "2026-12-07_cpu_rm_arena.txt"],
          "2026-12-07 unrolled": ["2026-12-07_cpu_sft_settle.txt", "2026-12-07_cpu_sft_fp32.txt",
                                  "2026-12-07_cpu_sft-lora_unrolled.txt",
                                  "2026-12-07_cpu_dpo_unrolled.txt", "2026-12-07_cpu_rm_settle.txt",
                                  "2026-12-07_cpu_grpo_unrolled.txt",
                                  "2026-12-07_cpu_ppo_settle.txt"],
          "2026-12-07 step": ["2026-12-07_cpu_sft_step.txt", "2026-12-07_cpu_sft_fp32_step.txt",
                              "2026-12-07_cpu_sft-lora_step.txt", "2026-12-07_cpu_dpo_step.txt",
                              "2026-12-07_cpu_rm_step.txt", "2026-12-07_cpu_grpo_step.txt",
                              "2026-12-07_cpu_ppo_step.txt"],
          "2026-12-07 session 8": ["2026-12-07_cpu_sft_s8.txt", "2026-12-07_cpu_sft-lora_s8.txt"],
          "2026-12-07 EPYC": ["2026-12-07_cpu_epyc_sft.txt", "2026-12-07_cpu_epyc_sft-lora.txt",
                              "2026-12-07_cpu_epyc_dpo.txt", "2026-12-07_cpu_epyc_rm.txt",
                              "2026-12-07_cpu_epyc_grpo.txt", "2026-12-07_cpu_epyc_sft_fp32.txt"]}


@pytest.mark.parametrize("round_", sorted(ROUNDS))
def test_bench_table_matches_the_committed_outputs(round_):
    """The README's speed tables are `scripts/bench_table.py` over the committed outputs: each
    row's speed is theirs' step time / ours from the JSON line, and the README holds the rows."""
    outputs = sorted(p for pattern in ROUNDS[round_] for p in (ROOT / "docs" / "bench").glob(pattern))
    assert len(outputs) == {"2026-12-05 fp32": 8, "2026-12-06 evening": 8, "2026-12-07 RL": 2,
                         "2026-12-07 release": 3, "2026-12-07 arena": 4}.get(
        round_, len(ROUNDS[round_])), \
        [p.name for p in outputs]
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_table.py"),
                            *map(str, outputs)], capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    for path in outputs:
        doc = json.loads(path.read_text().splitlines()[-1])
        for row in doc["rows"]:
            if row["side"] == "ours" and row.get("ratio"):
                assert f"| {row['ratio']:.2f}x |" in table, (path.name, row["ratio"])
    for line in table.splitlines():
        if line.startswith("| ") and "---" not in line:
            assert line in readme, f"README speed table is stale: {line}"


# How the README's opening paragraph names each workload whose ratios it quotes.
INTRO_NAMES = {"full SFT": "sft", "LoRA SFT": "sft-lora", "DPO": "dpo", "RM": "rm", "GRPO": "grpo"}
# The machines it quotes, as the opening names them, and how each names its CPU (bench JSON).
INTRO_MACHINES = {"Intel Xeon": "Intel", "AMD EPYC": "AMD EPYC"}


def test_readme_opening_ratios_are_the_latest_outputs():
    """The README's opening words on speed quote, per machine and workload, the newest committed
    bf16 output on that machine: each ratio against TRL's defaults, GRPO's against best TRL, and
    the range of the other rows against best TRL."""
    latest = {}
    for patterns in ROUNDS.values():
        for path in (p for pattern in patterns for p in (ROOT / "docs" / "bench").glob(pattern)):
            doc = json.loads(path.read_text().splitlines()[-1])
            ours = next((r for r in doc["rows"] if r["side"] == "ours" and r.get("ratio_best")), None)
            if doc["settings"]["precision"] != "bf16" or ours is None:
                continue
            machine = next(m for m, cpu in INTRO_MACHINES.items() if cpu in doc["machine"]["cpu"])
            key, date = (machine, doc["workload"]), doc["machine"]["date"]
            if key not in latest or date > latest[key][0]:
                latest[key] = (date, ours)
    opening = " ".join((ROOT / "README.md").read_text().split("## Two commands")[0].split())
    for machine in INTRO_MACHINES:
        part = opening.split(f"On a 2-core {machine}")[1].split("On a 2-core")[0]
        defaults, best = part.split("against the best")
        for name, workload in INTRO_NAMES.items():
            found = re.search(name + r" (?:is )?([0-9.]+)x", defaults)
            assert found, (machine, name)
            assert found.group(1) == f"{latest[machine, workload][1]['ratio_default']:.2f}", \
                (machine, name)
        assert re.search(r"GRPO is ([0-9.]+)x", best).group(1) == \
            f"{latest[machine, 'grpo'][1]['ratio_best']:.2f}", machine
        others = [latest[machine, w][1]["ratio_best"] for w in ("sft", "sft-lora", "dpo", "rm")]
        assert f"{min(others):.2f}-{max(others):.2f}x" in best, machine


def test_bench_baselines_trl_default_and_best(tmp_path):
    """The default mode of a train workload: bf16 on both sides (TRL's bf16=True autocast), ours
    against TRL at its defaults (gradient checkpointing on, glibc) and against best TRL (on /
    off, mimalloc preloaded as our CLI does): the faster of those two is the best, both ratios
    are theirs' step time / ours, and bench_table.py prints both with each side's settings."""
    from make_tiny_model import make_tiny_model
    model = make_tiny_model(tmp_path / "tiny")
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=child_xla_flags())
    out = tmp_path / "bench.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "sft", "--model", str(model),
                           "--steps", "1", "--warmup", "1", "--batch", "2", "--seq", "32", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text().strip().splitlines()[-1])
    assert result["settings"]["precision"] == "bf16"
    rows = result["rows"]
    assert [(r["side"], r["gc"], r["allocator"], r["baseline"]) for r in rows] == [
        ("ours", None, "default", None), ("theirs", "default", "default", "default"),
        ("theirs", "default", "mimalloc", "best"), ("theirs", "off", "mimalloc", "best")]
    for r in rows:
        assert "error" not in r and r["step_s"] > 0, r
    ours, default, *best = rows
    assert "bf16=True autocast" in default["settings"] and "glibc" in default["settings"]
    assert "gradient checkpointing off" in best[1]["settings"] and "mimalloc" in best[1]["settings"]
    assert "model.dtype=bfloat16" in ours["settings"]
    fastest = min(best, key=lambda r: r["step_s"])
    assert ours["ratio_default"] == pytest.approx(default["step_s"] / ours["step_s"])
    assert ours["ratio_best"] == pytest.approx(fastest["step_s"] / ours["step_s"])
    assert ours["best_variant"] == fastest["settings"]
    # bf16 on both sides from the same weights and tokens: the first loss agrees to bf16 rounding.
    assert ours["loss1"] == pytest.approx(default["loss1"], rel=2e-2)
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_table.py"), str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert "| TRL default | speed | best TRL | speed |" in table
    line = next(l for l in table.splitlines() if l.startswith("| sft ("))
    assert ", bf16)" in line and f"{ours['ratio_default']:.2f}x" in line and f"{ours['ratio_best']:.2f}x" in line
    assert fastest["settings"] in line


def test_preloaded_mimalloc_row_gets_the_clis_settings():
    """A bench row with mimalloc preloaded (best TRL) runs under the CLI's own mimalloc
    options, so the two sides differ in what they run, not in how their memory is kept."""
    from bench import common
    from jaxalign import runtime
    assert common.ALLOCATOR_ENV["mimalloc"] == runtime.MIMALLOC_ENV
    assert set(runtime.MIMALLOC_ENV) <= set(common._ALLOC_VARS)   # never inherited by a row
