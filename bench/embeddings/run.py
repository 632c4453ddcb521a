"""Kiln's encoder against candle-transformers on all-MiniLM-L6-v2, same machine, same run:
sentences per second and latency for short (~12-token) sentences and ~128-token passages,
at batch 1 and 32, and for mixed batches of 32 (31 sentences and a passage: what padding
to the longest text costs). Kiln is measured through the gateway (`kiln up --workers 1 --device
cpu`, tritonclient over gRPC, closed loops of 1, 8 and 32 callers); candle in-process (its
own program, one caller). Writes bench/embeddings/results.json and the "Sentence
embeddings" section of docs/benchmarks.md.

Run by bench/embeddings/run.sh, which builds both and exports what this reads.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from docs_section import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench/embeddings/results.json"
KILN = os.environ.get("KILN_BIN", "kiln")
CANDLE = os.environ.get("KILN_BENCH_CANDLE_BIN", "")
MODEL = Path(os.environ.get("KILN_BENCH_MINILM_DIR", "."))
SECONDS = float(os.environ.get("KILN_BENCH_SECONDS", "5"))
PROFILE = os.environ.get("KILN_BENCH_PROFILE", "release")

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches in old harbour towns near bright mountain lakes every summer").split()


def texts():
    """Short sentences (~12 tokens with [CLS]/[SEP]), passages (~128 tokens), and a mixed
    pool in which every window of 32 consecutive texts holds one passage."""
    rng = np.random.default_rng(3)
    short = [" ".join(rng.choice(WORDS, 10)).capitalize() + "." for _ in range(256)]
    passage = [" ".join(rng.choice(WORDS, 120)).capitalize() + "." for _ in range(64)]
    mixed = [passage[i // 32] if i % 32 == 0 else short[i] for i in range(256)]
    return {"short": short, "passage": passage, "mixed": mixed}


CELLS = [(kind, batch) for kind in ("short", "passage") for batch in (1, 32)] + [("mixed", 32)]


def kiln_cells(addr, pool):
    cells = []
    for kind, batch in CELLS:
        for concurrency in (1, 8, 32):
            latencies, count, stop = [], [0], time.monotonic() + 0.3 + SECONDS
            errors = []
            lock = threading.Lock()
            measure_from = time.monotonic() + 0.3

            def caller(seed):
                client = grpcclient.InferenceServerClient(addr)
                i = seed
                while True:
                    chunk = [pool[kind][(i + j) % len(pool[kind])] for j in range(batch)]
                    i += batch * 7
                    inp = grpcclient.InferInput("text", [batch], "BYTES")
                    inp.set_data_from_numpy(np.array([t.encode() for t in chunk], dtype=object))
                    t0 = time.monotonic()
                    if t0 >= stop:
                        return
                    try:
                        client.infer("minilm", [inp])
                    except Exception as e:  # counted and reported, not fatal
                        with lock:
                            errors.append(str(e)[:120])
                        time.sleep(0.01)
                        continue
                    t1 = time.monotonic()
                    if measure_from <= t1 <= stop:
                        with lock:
                            latencies.append((t1 - t0) * 1e3)
                            count[0] += batch

            threads = [threading.Thread(target=caller, args=(k * 31,)) for k in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            lat = np.array(latencies)
            # Requests that end in the window count (latency and sentences); a cell in
            # which none ends in the window reports none.
            cell = {"peer": "kiln", "kind": kind, "batch": batch, "concurrency": concurrency,
                    "sentences_per_s": count[0] / SECONDS,
                    "requests": len(lat), "errors": len(errors),
                    "first_error": errors[0] if errors else None,
                    "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                    "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    return cells


def main():
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-embeddings-"))
    pool = texts()
    (work / "texts.json").write_text(json.dumps(pool))
    out = subprocess.run([CANDLE, str(MODEL), str(work / "texts.json"), str(SECONDS)],
                         capture_output=True, text=True, check=True)
    candle = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for c in candle:
        print(json.dumps(c), flush=True)
    addr_file = work / "addr"
    proc = subprocess.Popen([KILN, "up", "--grpc-addr", "127.0.0.1:0", "--workers", "1",
                             "--device", "cpu", "--data-dir", str(work / "data"),
                             "--addr-file", str(addr_file)],
                            stdout=open(work / "kiln.log", "wb"), stderr=subprocess.STDOUT)
    try:
        while not addr_file.exists() or not addr_file.read_text():
            assert proc.poll() is None, "kiln up exited"
            time.sleep(0.05)
        addr = addr_file.read_text().strip()
        subprocess.run([KILN, "models", "import", str(MODEL), "--name", "minilm", "--addr", addr],
                       check=True, capture_output=True)
        client = grpcclient.InferenceServerClient(addr)
        while not client.is_model_ready("minilm"):
            time.sleep(0.2)
        kiln = kiln_cells(addr, pool)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    results = {"date": time.strftime("%Y-%m-%d"), "seconds_per_cell": SECONDS,
               "kiln_profile": PROFILE, "candle": candle, "kiln": kiln}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    render(results)


def render(results):
    """Write the results as the "Sentence embeddings" section of docs/benchmarks.md."""
    seconds, candle, kiln = results["seconds_per_cell"], results["candle"], results["kiln"]
    lines = [f"Run {results['date']} by `bench/embeddings/run.sh`, {seconds:g} s per cell, "
             f"all-MiniLM-L6-v2 (FP32) on this machine's CPU, Kiln's {results['kiln_profile']} "
             "build. Raw numbers: `bench/embeddings/results.json`.\n",
             "| texts | batch | candle sentences/s (1 caller, in-process) | candle p50 / p99 ms "
             "| Kiln sentences/s at 1 / 8 / 32 callers "
             "| Kiln p50 / p99 ms at 1 caller | at 8 callers | at 32 callers |",
             "|---|---|---|---|---|---|---|---|"]

    def rate(cell):
        if cell["requests"] == 0:
            return "— (none within %gs)" % seconds
        return "%.0f" % cell["sentences_per_s"]

    def latency(cell):
        return "%.1f / %.1f" % (cell["p50_ms"], cell["p99_ms"]) if cell["requests"] else "—"

    for kind, batch in CELLS:
        c = next(x for x in candle if x["kind"] == kind and x["batch"] == batch)
        k = {x["concurrency"]: x for x in kiln if x["kind"] == kind and x["batch"] == batch}
        rates = " / ".join(rate(k[n]) for n in (1, 8, 32))
        lines.append(
            f"| {kind} | {batch} | {c['sentences_per_s']:.0f} | {c['p50_ms']:.1f} / {c['p99_ms']:.1f} "
            f"| {rates} | {latency(k[1])} | {latency(k[8])} | {latency(k[32])} |")
    failed = [x for x in kiln if x["errors"]]
    if failed:
        lines.append("\nErrors: " + "; ".join(
            f"{x['kind']} batch {x['batch']} × {x['concurrency']} callers: {x['errors']} "
            f"({x['first_error']})" for x in failed))
    section = "\n".join(lines) + "\n"
    write_section("embeddings", section)
    print(section)


if __name__ == "__main__":
    # `run.py --render`: rewrite the section from results.json without measuring.
    if sys.argv[1:] == ["--render"]:
        render(json.loads(RESULTS.read_text()))
    else:
        sys.exit(main())
