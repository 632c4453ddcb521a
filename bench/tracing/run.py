"""The tracing benchmark (run by bench/tracing/run.sh): `kiln up` with one worker serves
the demo model; `kiln-bench oip` loads it at concurrency 32, batch 1, with tracing off,
at 1% and at 100% sampling, in alternating rounds; an OTLP sink counts the spans that
arrive. Standard library only."""

import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KILN = os.environ["KILN_BIN"]
KILN_BENCH = os.environ["KILN_BENCH_BIN"]
SECONDS = int(os.environ.get("KILN_BENCH_SECONDS", "10"))
ROUNDS = int(os.environ.get("KILN_BENCH_ROUNDS", "3"))
CONCURRENCY, BATCH = 32, 1
# valgrind's version, when it is installed: the instruction counts need it.
VALGRIND = next(iter(subprocess.run(["sh", "-c", "valgrind --version 2>/dev/null"],
                                    capture_output=True, text=True).stdout.split()), "")
MODES = {
    "off": {},
    "1%": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100%": {"OTEL_TRACES_SAMPLER": "always_on"},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_file(path, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        assert proc.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.05)
    return path.read_text().strip()


def cpu_seconds(pid):
    """User and system CPU time of one process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def run(work, mode, sink, sink_pid, count_file):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if mode != "off":
        env.update(MODES[mode], OTEL_EXPORTER_OTLP_ENDPOINT=sink, OTEL_BSP_SCHEDULE_DELAY="500")
    tag = f"{mode.rstrip('%')}-{time.monotonic_ns()}"
    addr_file = work / f"{tag}.addr"
    up = subprocess.Popen([KILN, "up", "--grpc-addr", "127.0.0.1:0", "--workers", "1",
                           "--device", "cpu", "--data-dir", str(work / tag),
                           "--addr-file", str(addr_file)],
                          stdout=subprocess.DEVNULL, stderr=open(work / f"{tag}.log", "wb"), env=env)
    try:
        addr = wait_file(addr_file, up, "kiln up")
        before = int(count_file.read_text() or 0)
        cpu_before = cpu_seconds(up.pid)
        sink_before = cpu_seconds(sink_pid)
        out = subprocess.run([KILN_BENCH, "oip", "--addr", addr, "--model", "demo-mlp",
                              "--concurrency", str(CONCURRENCY), "--batch", str(BATCH),
                              "--seconds", str(SECONDS)],
                             capture_output=True, text=True, timeout=SECONDS + 120)
        assert out.returncode == 0, out.stderr
        cell = json.loads(out.stdout.strip().splitlines()[-1])
        # Kiln's own CPU per request: what tracing costs it, whatever the sink and the
        # client (on the same cores) take.
        used = cpu_seconds(up.pid) - cpu_before
        served = max(1.0, cell["requests_per_s"] * SECONDS)
        cell["server_cpu_us_per_request"] = 1e6 * used / served
        # The sink's decoding: a collector's work, here on the serving cores.
        cell["sink_cpu_us_per_request"] = 1e6 * (cpu_seconds(sink_pid) - sink_before) / served
    finally:
        stop(up)  # flushes what its exporter still holds
    time.sleep(0.5)
    cell["spans"] = int(count_file.read_text() or 0) - before
    cell["mode"] = mode
    print(json.dumps(cell), flush=True)
    return cell


CALLGRIND_SECONDS, CALLGRIND_CONCURRENCY = 15, CONCURRENCY


def instructions(work, mode, sink):
    """Kiln's instructions per request, counted by callgrind (valgrind): the same for the
    same binary and load whatever else the machine does, unlike its timings. `kiln up`
    runs under callgrind (about 50 times slower); counting starts after a warm-up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if mode != "off":
        env.update(MODES[mode], OTEL_EXPORTER_OTLP_ENDPOINT=sink, OTEL_BSP_SCHEDULE_DELAY="500")
    tag = f"cg-{mode.rstrip('%')}-{time.monotonic_ns()}"
    addr_file, out_file = work / f"{tag}.addr", work / f"{tag}.callgrind"
    up = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
                           "--dump-instr=no", KILN, "up", "--grpc-addr", "127.0.0.1:0",
                           "--workers", "1", "--device", "cpu", "--data-dir", str(work / tag),
                           "--addr-file", str(addr_file)],
                          stdout=subprocess.DEVNULL, stderr=open(work / f"{tag}.log", "wb"),
                          env=env)

    def load(seconds):
        return subprocess.run([KILN_BENCH, "oip", "--addr", addr, "--model", "demo-mlp",
                               "--concurrency", str(CALLGRIND_CONCURRENCY), "--batch", "1",
                               "--seconds", str(seconds)],
                              capture_output=True, text=True, timeout=seconds + 300)
    try:
        addr = wait_file(addr_file, up, "kiln up under callgrind", timeout=300)
        deadline = time.monotonic() + 300
        while load(3).returncode != 0:  # the model loads slowly under callgrind
            assert time.monotonic() < deadline, "the model did not load under callgrind"
            time.sleep(2)
        subprocess.run(["callgrind_control", "--zero", str(up.pid)], check=True,
                       capture_output=True)
        out = load(CALLGRIND_SECONDS)
        assert out.returncode == 0, out.stderr
        time.sleep(1.5)  # the batch processor's last export of the run
        subprocess.run(["callgrind_control", "--dump", str(up.pid)], check=True,
                       capture_output=True)
        served = json.loads(out.stdout.strip().splitlines()[-1])["requests_per_s"] * CALLGRIND_SECONDS
    finally:
        stop(up)
    dumps = sorted(work.glob(f"{tag}.callgrind.*"))
    total = 0
    for line in dumps[0].read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            total = int(line.split()[1])
    cell = {"mode": mode, "instructions_per_request": total / served, "requests": served}
    print(json.dumps(cell), flush=True)
    return cell


def instruction_report(counted):
    if not counted:
        return ""
    off = next(c for c in counted if c["mode"] == "off")["instructions_per_request"]
    lines = [f"\nInstructions Kiln executes per request, counted by callgrind "
             f"({VALGRIND}) over {CALLGRIND_SECONDS} s at concurrency {CALLGRIND_CONCURRENCY}: "
             "a count, not a time, so it does not move with the machine's load. It includes "
             "the export thread's encoding and sending.\n",
             "| tracing | instructions a request | vs off | requests counted |",
             "|---|---:|---:|---:|"]
    for c in counted:
        n = c["instructions_per_request"]
        lines.append(f"| {c['mode']} | {n:,.0f} | {100 * (n / off - 1):+.1f}% "
                     f"| {c['requests']:,.0f} |")
    return "\n".join(lines) + "\n"


def report(meta, cells):
    by_mode = {m: [c for c in cells if c["mode"] == m] for m in MODES}
    off_of = {c.get("round"): c["requests_per_s"] for c in by_mode["off"]}
    lines = ["## Tracing overhead\n",
             f"Written by `bench/tracing/run.sh` on {meta['date']}: {meta['machine']}. `kiln up` "
             f"with one CPU worker serves the demo model (10→64→1); `kiln-bench oip` sends "
             f"ModelInfer at concurrency {CONCURRENCY}, batch {BATCH}, {SECONDS} s a run, from "
             f"the same cores; {ROUNDS} rounds of the three settings, each round starting with "
             f"the next one, each run on a fresh "
             f"`kiln up`. Spans go over OTLP/gRPC to `kiln-bench otlp-sink` on loopback (it "
             f"counts them, decoding no more than that, and keeps none), with the batch "
             f"processor's defaults but a 500 ms "
             f"schedule. The median round is reported; \"vs off\" is the median over rounds of "
             f"each round's ratio to its own untraced run, minutes apart at most. Raw numbers: "
             f"`bench/tracing/results.json`.\n",
             "| tracing | req/s (median) | rounds | p50 ms | p99 ms | vs off | Kiln CPU µs a request (median) | sink CPU µs a request | spans received a request |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for mode, runs in by_mode.items():
        tp = statistics.median(c["requests_per_s"] for c in runs)
        mid = min(runs, key=lambda c: abs(c["requests_per_s"] - tp))
        served = sum(c["requests_per_s"] * SECONDS for c in runs)
        spans = sum(c["spans"] for c in runs) / max(1.0, served)
        each = ", ".join(f"{c['requests_per_s']:,.0f}" for c in runs)
        cpu = statistics.median(c["server_cpu_us_per_request"] for c in runs)
        ratio = statistics.median(c["requests_per_s"] / off_of[c.get("round")] for c in runs)
        sink_cpu = statistics.median(c.get("sink_cpu_us_per_request", 0.0) for c in runs)
        lines.append(f"| {mode} | {tp:,.0f} | {each} "
                     f"| {mid['p50_ms']:.2f} | {mid['p99_ms']:.2f} | {100 * (ratio - 1):+.1f}% "
                     f"| {cpu:.1f} | {sink_cpu:.1f} | {spans:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-tracing-"))
    port = free_port()
    count_file = work / "spans"
    sink = subprocess.Popen([KILN_BENCH, "otlp-sink", "--listen", f"127.0.0.1:{port}",
                             "--count-file", str(count_file)],
                            stdout=subprocess.DEVNULL, stderr=open(work / "sink.log", "wb"))
    try:
        wait_file(count_file, sink, "the OTLP sink")
        # Each round starts with the next setting, so no setting always runs first.
        modes = list(MODES)
        cells = []
        for r in range(ROUNDS):
            for i in range(len(modes)):
                cell = run(work, modes[(r + i) % len(modes)], f"http://127.0.0.1:{port}",
                           sink.pid, count_file)
                cells.append(dict(cell, round=r))
        counted = ([instructions(work, mode, f"http://127.0.0.1:{port}") for mode in MODES]
                   if VALGRIND else [])
    finally:
        stop(sink)
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} vCPU ({cpu.group(1) if cpu else platform.machine()}), "
                       f"{platform.system()} {platform.release()}",
            "seconds": SECONDS, "rounds": ROUNDS}
    (ROOT / "bench/tracing/results.json").write_text(json.dumps(
        {"meta": meta, "cells": cells, "instructions": counted}, indent=1) + "\n")
    doc = ROOT / "docs/benchmarks.md"
    text = doc.read_text()
    body = report(meta, cells) + instruction_report(counted)
    section = f"<!-- tracing:begin -->\n{body}<!-- tracing:end -->"
    if "<!-- tracing:begin -->" in text:
        text = re.sub(r"<!-- tracing:begin -->.*?<!-- tracing:end -->", lambda _: section,
                      text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
    print(body)


if __name__ == "__main__":
    main()
