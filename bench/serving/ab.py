"""Same-session A/B of two Kiln builds on the serving benchmark's network and client: a
baseline binary (KILN_BENCH_BASELINE_BIN, built from an earlier commit) against the current
one (KILN_BIN), both up at once on one worker with default batching, measured in
alternating rounds so that drift on this machine hits both alike. Writes
bench/serving/ab.json and the "A/B" section of docs/benchmarks.md.

Run by bench/serving/ab.sh, which builds both binaries.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the serving benchmark's helpers)

BASELINE = os.environ["KILN_BENCH_BASELINE_BIN"]
BASELINE_COMMIT = os.environ.get("KILN_BENCH_BASELINE_COMMIT", "baseline")
CURRENT_COMMIT = os.environ.get("KILN_BENCH_CURRENT_COMMIT", "current")
ROUNDS = int(os.environ.get("KILN_BENCH_AB_ROUNDS", "5"))
CELLS = [(1, 1), (32, 1), (8, 32)]  # (concurrency, batch)


def main():
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-ab-"))
    model_dir = work / "model"
    model_dir.mkdir()
    # The serving benchmark's network (10 → 64 → 1, ReLU, sigmoid), with seeded weights:
    # the comparison is of two Kiln builds, so no scikit-learn model is needed.
    (model_dir / "spec.json").write_text(json.dumps({"name": "mlp", "spec": {"mlp": {
        "input_width": 10, "hidden": [64], "activation": "relu", "output_width": 1,
        "task": "binary_classification"}}}))
    sides = {
        "baseline": bench.serve_kiln(work, model_dir, "baseline", binary=BASELINE, weights=False),
        "current": bench.serve_kiln(work, model_dir, "current", weights=False),
    }
    rounds = []
    try:
        for r in range(ROUNDS):
            # Alternate which side goes first in each round.
            order = ["baseline", "current"] if r % 2 == 0 else ["current", "baseline"]
            for concurrency, batch in CELLS:
                for side in order:
                    (cell,) = bench.load(sides[side], concurrency=[concurrency], batch=[batch])
                    cell["side"], cell["round"] = side, r
                    rounds.append(cell)
    finally:
        for s in sides.values():
            s.stop()
    lines = [f"A/B run by `bench/serving/ab.sh`: {BASELINE_COMMIT} (baseline) against "
             f"{CURRENT_COMMIT} (current), {ROUNDS} alternating rounds of {bench.SECONDS} s "
             "per cell, one worker, `--device cpu`, default batching. Raw numbers: "
             "`bench/serving/ab.json`.\n",
             "| concurrency | batch | baseline requests/s (median) | current requests/s (median) "
             "| current / baseline (median of rounds) | p50 ms baseline / current |",
             "|---|---|---|---|---|---|"]
    summary = []
    for concurrency, batch in CELLS:
        def cells(side):
            return [c for c in rounds if c["side"] == side and c["concurrency"] == concurrency
                    and c["batch"] == batch]
        base, cur = cells("baseline"), cells("current")
        ratios = [c["requests_per_s"] / b["requests_per_s"] for b, c in zip(base, cur)]
        row = {
            "concurrency": concurrency, "batch": batch,
            "baseline_rps": statistics.median(c["requests_per_s"] for c in base),
            "current_rps": statistics.median(c["requests_per_s"] for c in cur),
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "baseline_p50_ms": statistics.median(c["p50_ms"] for c in base),
            "current_p50_ms": statistics.median(c["p50_ms"] for c in cur),
        }
        summary.append(row)
        lines.append(f"| {concurrency} | {batch} | {row['baseline_rps']:.0f} | {row['current_rps']:.0f} "
                     f"| {row['ratio']:.3f} ({', '.join(f'{x:.2f}' for x in ratios)}) "
                     f"| {row['baseline_p50_ms']:.3f} / {row['current_p50_ms']:.3f} |")
    section = "\n".join(lines) + "\n"
    (bench.ROOT / "bench/serving/ab.json").write_text(json.dumps(
        {"machine": bench.machine(), "baseline": BASELINE_COMMIT, "current": CURRENT_COMMIT,
         "summary": summary, "cells": rounds}, indent=1) + "\n")
    bench.write_section("ab", section)
    print(section)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
