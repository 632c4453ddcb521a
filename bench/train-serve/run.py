"""Serving while training (bench/train-serve/run.sh).

For each `kiln up` (1 or 2 workers; training slices at the default budget, or whole
batches): the demo model at concurrency 4 and 32 (one row a request, `kiln-bench oip`, the
same closed loop as the serving benchmark) idle, then while a job trains a
10→512→512→1 network (batch 256, 50,000 rows); requests/s, p50, p99, max. From the
workers' metrics over the busy cells: the training share of the device and how long
inference batches waited behind training. Targets (docs/benchmarks.md): with 2 workers,
p99 within 2× idle and at least 70% of idle throughput; with 1, p99 within idle p99 + 5 ms.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "python"))
from docs_section import write_section  # noqa: E402
from conftest import free_port, long_training_job  # noqa: E402

KILN = os.environ["KILN_BIN"]
KILN_BENCH = os.environ["KILN_BENCH_BIN"]
CONCURRENCY = [4, 32]


def kiln(addr, *args):
    out = subprocess.run([KILN, *args, "--addr", addr], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def up(work, tag, workers, slice_ms):
    data = work / f"data-{tag}"
    addr_file = work / f"{tag}.addr"
    metrics = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [KILN, "up", "--grpc-addr", "127.0.0.1:0", "--workers", str(workers), "--device",
         "cpu", "--data-dir", str(data), "--addr-file", str(addr_file), "--auth", "off",
         "--metrics-addr", metrics, "--training-slice-ms", str(slice_ms)],
        stdout=subprocess.DEVNULL, stderr=open(work / f"{tag}.log", "wb"))
    deadline = time.monotonic() + 60
    while not addr_file.exists() or not addr_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "kiln up failed"
        time.sleep(0.05)
    return proc, addr_file.read_text().strip(), metrics


def load(addr, concurrency, seconds):
    out = subprocess.run([KILN_BENCH, "oip", "--addr", addr, "--model", "demo-mlp",
                          "--concurrency", str(concurrency), "--batch", "1",
                          "--seconds", str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def scrape(metrics):
    return urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()


def summed(text, name):
    return sum(float(v) for v in re.findall(r"^%s(?:\{[^}]*\})? (\S+)$" % name, text, re.M))


def run_one(work, workers, slice_ms, seconds):
    tag = f"w{workers}-s{slice_ms}"
    proc, addr, metrics = up(work, tag, workers, slice_ms)
    cells = []
    try:
        load(addr, 4, 1)  # the demo model is ready and warm
        for c in CONCURRENCY:
            cells.append({"phase": "idle", **load(addr, c, seconds)})
        kiln(addr, "models", "create", "--spec", str(work / "h.json"), "--seed", "1")
        job = kiln(addr, "train", str(work / "job.json"), "--detach").split()[-1]
        deadline = time.monotonic() + 120
        while not any(w.get("training_runs", 0) for w in
                      json.loads(kiln(addr, "status", "--json"))["workers"]):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        time.sleep(2)
        before, t0 = scrape(metrics), time.monotonic()
        for c in CONCURRENCY:
            cells.append({"phase": "training", **load(addr, c, seconds)})
        after, wall = scrape(metrics), time.monotonic() - t0
        kiln(addr, "jobs", "cancel", job)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    trained = summed(after, "kiln_worker_training_seconds_total") - summed(
        before, "kiln_worker_training_seconds_total")
    waited = summed(after, "kiln_worker_inference_training_wait_seconds_sum") - summed(
        before, "kiln_worker_inference_training_wait_seconds_sum")
    batches = summed(after, "kiln_worker_inference_training_wait_seconds_count") - summed(
        before, "kiln_worker_inference_training_wait_seconds_count")
    run = {"workers": workers, "slice_ms": slice_ms, "cells": cells,
           "training_share": trained / wall / workers,
           "batches_behind_training": batches,
           "mean_wait_behind_training_ms": 1e3 * waited / batches if batches else 0.0}
    print(json.dumps(run), flush=True)
    return run


def verdicts(runs, default_slice):
    lines = []
    for r in (r for r in runs if r["slice_ms"] == default_slice):
        for c in CONCURRENCY:
            idle = next(x for x in r["cells"] if x["phase"] == "idle" and x["concurrency"] == c)
            busy = next(x for x in r["cells"] if x["phase"] == "training"
                        and x["concurrency"] == c)
            if r["workers"] == 2:
                ok = busy["p99_ms"] <= 2 * idle["p99_ms"] and \
                    busy["requests_per_s"] >= 0.7 * idle["requests_per_s"]
                target = "p99 ≤ 2× idle, ≥ 70% of idle requests/s"
            else:
                ok = busy["p99_ms"] <= idle["p99_ms"] + 5
                target = "p99 ≤ idle p99 + 5 ms"
            lines.append(
                f"| {r['workers']} | {c} | {target} | p99 {idle['p99_ms']:.2f} → "
                f"{busy['p99_ms']:.2f} ms, {idle['requests_per_s']:,.0f} → "
                f"{busy['requests_per_s']:,.0f} req/s | {'met' if ok else 'missed'} |")
    return lines


def report(runs, meta, default_slice):
    out = [f"## Serving while training ({meta['date']})", "",
           f"`bench/train-serve/run.sh`, {meta['machine']}. `kiln up --device cpu --auth off`; "
           "the demo model (10→16→1), one row a request, `kiln-bench oip`, "
           f"{meta['seconds']} s a cell; the job trains 10→512→512→1 (batch 256, 50,000 "
           "rows). *Share*: the training share of the workers' device time over the busy "
           "cells; *wait*: inference batches that waited behind training, and their mean "
           "wait (the workers' own metrics).", "",
           "| workers | slices | conc | idle req/s | idle p50 / p99 / max ms | training "
           "req/s | training p50 / p99 / max ms | share | waits (mean) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        slices = "whole batches" if r["slice_ms"] == 0 else f"{r['slice_ms']} ms"
        for c in CONCURRENCY:
            i = next(x for x in r["cells"] if x["phase"] == "idle" and x["concurrency"] == c)
            b = next(x for x in r["cells"] if x["phase"] == "training" and x["concurrency"] == c)
            out.append(
                f"| {r['workers']} | {slices} | {c} | {i['requests_per_s']:,.0f} | "
                f"{i['p50_ms']:.2f} / {i['p99_ms']:.2f} / {i['max_ms']:.1f} | "
                f"{b['requests_per_s']:,.0f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} / "
                f"{b['max_ms']:.1f} | {100 * r['training_share']:.0f}% | "
                f"{r['batches_behind_training']:,.0f} ({r['mean_wait_behind_training_ms']:.1f} ms) |")
    out += ["", f"Targets, at the default slice ({default_slice} ms):", "",
            "| workers | conc | target | idle → training | |", "|---|---|---|---|---|",
            *verdicts(runs, default_slice), ""]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--slice-ms", type=int, default=5, help="the slice budget measured")
    p.add_argument("--out", default=str(ROOT / "bench" / "train-serve" / "results.json"))
    args = p.parse_args()
    meta = {"date": datetime.date.today().isoformat(), "seconds": args.seconds,
            "machine": f"{os.cpu_count()} cores, {platform.machine()}"}
    work = Path(tempfile.mkdtemp(prefix="kiln-train-serve-"))
    long_training_job(work, 50_000, 256, 1000)
    try:
        runs = [run_one(work, w, s, args.seconds)
                for w in (1, 2) for s in (args.slice_ms, 0)]
    except BaseException:
        print(f"kept the logs in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    write_section("train-serve", report(runs, meta, args.slice_ms))


if __name__ == "__main__":
    main()
