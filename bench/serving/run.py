"""Kiln against Seldon MLServer, NVIDIA Triton (PyTriton) and a bare tonic floor, serving
one network with one client on one machine; then Kiln's sharding and data-parallel
training. Writes results.json and the report section of docs/benchmarks.md.

Run by bench/serving/run.sh, which sets up the virtualenvs and builds Kiln; arguments are
read from the environment it exports (see there).
"""

import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from docs_section import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KILN = os.environ["KILN_BIN"]
KILN_BENCH = os.environ["KILN_BENCH_BIN"]
# Set by run.sh; ab.sh, which reuses this module's helpers, runs neither.
MLSERVER_PY = os.environ.get("KILN_BENCH_MLSERVER_PY", "")
PYTRITON_PY = os.environ.get("KILN_BENCH_PYTRITON_PY", "")
SECONDS = int(os.environ.get("KILN_BENCH_SECONDS", "5"))
CONCURRENCY = [1, 8, 32]
BATCH = [1, 32]
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(root_pid):
    """utime + stime of a process and all its descendants, in clock ticks."""
    children, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class Server:
    def __init__(self, name, argv, addr, log, env=None, cwd=None):
        self.name, self.addr = name, addr
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd, start_new_session=True)

    def wait_ready(self, model, timeout=180):
        client = grpcclient.InferenceServerClient(self.addr)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"{self.name} exited"
            try:
                if client.is_model_ready(model):
                    return
            except Exception:
                pass
            assert time.monotonic() < deadline, f"{self.name} not ready in {timeout} s"
            time.sleep(0.2)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def check_answers(server, model_dir, output=None, column=0):
    """The server computes the benchmark network: its answer on the probe rows."""
    probe = np.load(model_dir / "probe.npy")
    expected = np.load(model_dir / "expected.npy")
    client = grpcclient.InferenceServerClient(server.addr)
    inp = grpcclient.InferInput("input", list(probe.shape), "FP32")
    inp.set_data_from_numpy(probe)
    outputs = [grpcclient.InferRequestedOutput(output)] if output else None
    got = client.infer("mlp", [inp], outputs=outputs).as_numpy(output or "output")
    np.testing.assert_allclose(got[:, column], expected, rtol=1e-4, atol=1e-5)


def load(server, output=None, concurrency=CONCURRENCY, batch=BATCH, seconds=SECONDS):
    """One `kiln-bench oip` run per cell, with the server's CPU time over the cell."""
    cells = []
    for b in batch:
        for c in concurrency:
            argv = [KILN_BENCH, "oip", "--addr", server.addr, "--model", "mlp",
                    "--concurrency", str(c), "--batch", str(b), "--seconds", str(seconds)]
            if output:
                argv += ["--output", output]
            before, t0 = cpu_ticks(server.proc.pid), time.monotonic()
            out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
            wall, used = time.monotonic() - t0, cpu_ticks(server.proc.pid) - before
            assert out.returncode == 0, out.stderr
            cell = json.loads(out.stdout.strip().splitlines()[-1])
            cell["server_cpu_percent"] = 100.0 * used / TICK / wall
            cell["server"] = server.name
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    return cells


def serve_kiln(work, model_dir, tag, workers=1, binary=KILN, weights=True):
    data = work / f"kiln-data-{tag}"
    addr_file = work / f"kiln-{tag}.addr"
    server = Server("Kiln", [binary, "up", "--grpc-addr", "127.0.0.1:0", "--workers",
                             str(workers), "--device", "cpu", "--data-dir", str(data),
                             "--addr-file", str(addr_file)],
                    None, open(work / f"kiln-{tag}.log", "wb"))
    deadline = time.monotonic() + 60
    while not addr_file.exists() or not addr_file.read_text():
        assert server.proc.poll() is None and time.monotonic() < deadline, "kiln up failed"
        time.sleep(0.05)
    server.addr = addr_file.read_text().strip()
    create = [binary, "models", "create", "--spec", str(model_dir / "spec.json"),
              "--addr", server.addr]
    if weights:
        create += ["--weights", str(model_dir / "weights.safetensors")]
    subprocess.run(create, check=True, capture_output=True)
    server.wait_ready("mlp")
    return server


def serving(work, model_dir):
    results = []
    # Kiln: one worker, defaults otherwise (max_batch_size 64, no queue delay); and the
    # floor: a tonic server answering canned responses of the same size. Both stay up
    # (each idle while the other is measured) for the alternating rounds below.
    kiln = serve_kiln(work, model_dir, "serving")
    port = free_port()
    floor = Server("tonic floor", [KILN_BENCH, "floor", "--listen", f"127.0.0.1:{port}",
                                   "--model", "mlp"], f"127.0.0.1:{port}",
                   open(work / "floor.log", "wb"))
    rounds = []
    try:
        check_answers(kiln, model_dir)
        floor.wait_ready("mlp")
        results += load(kiln)
        results += load(floor)
        # Runs on this machine vary by ±20%: the floor target is judged on rounds that
        # alternate the two at concurrency 32, batch 1, by the median ratio.
        for _ in range(5):
            (k,) = load(kiln, concurrency=[32], batch=[1])
            (f,) = load(floor, concurrency=[32], batch=[1])
            rounds.append({"kiln": k["requests_per_s"], "floor": f["requests_per_s"],
                           "ratio": k["requests_per_s"] / f["requests_per_s"]})
    finally:
        kiln.stop()
        floor.stop()
    results.append({"server": "alternating rounds", "rounds": rounds})

    # MLServer with its scikit-learn runtime, one inference worker (its default).
    mdir = work / "mlserver"
    (mdir / "mlp").mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "model.joblib", mdir / "mlp" / "model.joblib")
    grpc, http, metrics = free_port(), free_port(), free_port()
    (mdir / "settings.json").write_text(json.dumps(
        {"grpc_port": grpc, "http_port": http, "metrics_port": metrics, "debug": False}))
    (mdir / "mlp" / "model-settings.json").write_text(json.dumps({
        "name": "mlp", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"}}))
    mlserver_bin = str(Path(MLSERVER_PY).parent / "mlserver")
    mls = Server("MLServer", [mlserver_bin, "start", str(mdir)], f"127.0.0.1:{grpc}",
                 open(work / "mlserver.log", "wb"), cwd=mdir)
    try:
        mls.wait_ready("mlp")
        check_answers(mls, model_dir, output="predict_proba", column=1)
        results += load(mls, output="predict_proba")
    finally:
        mls.stop()

    # Triton through PyTriton: tritonserver's Python backend calling a NumPy function.
    grpc, http, metrics = free_port(), free_port(), free_port()
    triton = Server("Triton (PyTriton)", [PYTRITON_PY, str(ROOT / "bench/serving/triton_server.py"),
                                          str(model_dir / "weights.npz"), str(grpc), str(http),
                                          str(metrics)],
                    f"127.0.0.1:{grpc}", open(work / "triton.log", "wb"))
    try:
        triton.wait_ready("mlp")
        check_answers(triton, model_dir)
        results += load(triton)
    finally:
        triton.stop()
    return results


def sharding(work, model_dir):
    """One 8,192-row request across two workers, split and not."""
    kiln = serve_kiln(work, model_dir, "sharding", workers=2)
    out = []
    try:
        for label, shard_rows in (("sharded (2 replicas)", 0), ("unsharded (1 replica)", 1 << 20)):
            subprocess.run([KILN, "models", "deploy", "mlp", "--shard-rows", str(shard_rows),
                            "--addr", kiln.addr], check=True, capture_output=True)
            time.sleep(1)  # the gateway's view follows the deployment record
            (cell,) = load(kiln, concurrency=[1], batch=[8192])
            cell["mode"] = label
            out.append(cell)
    finally:
        kiln.stop()
    return out


def data_parallel(work):
    """A compute-heavy job on one and on two workers of one `kiln up`."""
    kiln_dir = work / "dp"
    kiln_dir.mkdir()
    rng = np.random.default_rng(1)
    x = rng.random((100_000, 10), dtype=np.float32)
    np.save(kiln_dir / "x.npy", x)
    np.save(kiln_dir / "y.npy", (x.sum(1) > 5).astype(np.int64))
    model_dir = work / "model"
    kiln = serve_kiln(work, model_dir, "training", workers=2)
    out = []
    try:
        for workers in (1, 2):
            job = {"model_name": f"heavy{workers}",
                   "spec": {"mlp": {"input_width": 10, "hidden": [1024, 1024],
                                    "output_width": 1, "task": "binary_classification"}},
                   "data": {"npy": {"features": "x.npy", "labels": "y.npy"}},
                   "epochs": 2, "batch_size": 512, "seed": 1, "workers": workers}
            path = kiln_dir / f"job{workers}.json"
            path.write_text(json.dumps(job))
            sub = subprocess.run([KILN, "train", str(path), "--detach", "--addr", kiln.addr],
                                 check=True, capture_output=True, text=True)
            job_id = sub.stdout.split()[-1]
            while True:
                j = json.loads(subprocess.run(
                    [KILN, "jobs", "show", job_id, "--json", "--addr", kiln.addr],
                    check=True, capture_output=True, text=True).stdout)
                if j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
                time.sleep(1)
            assert j["state"] == "SUCCEEDED", j["reason"]
            rates = [h["samples_per_second"] for h in j["history"]]
            out.append({"workers": workers, "samples_per_second": rates,
                        "data_parallel": j.get("data_parallel"),
                        "elapsed_ms": j["history"][-1]["elapsed_ms"]})
            print(json.dumps(out[-1]), flush=True)
    finally:
        kiln.stop()
    return out


def machine():
    """This machine and the Kiln under test."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{os.cpu_count()} × {cpu}",
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "os": platform.platform(),
        "kiln": subprocess.run([KILN, "--version"], capture_output=True, text=True).stdout.strip(),
        "seconds_per_cell": SECONDS,
    }


def versions():
    def pip_version(py, pkg):
        out = subprocess.run([py, "-c", f"import importlib.metadata as m; print(m.version('{pkg}'))"],
                             capture_output=True, text=True)
        return out.stdout.strip() or "?"
    return {
        **machine(),
        "mlserver": pip_version(MLSERVER_PY, "mlserver"),
        "scikit-learn": pip_version(MLSERVER_PY, "scikit-learn"),
        "nvidia-pytriton": pip_version(PYTRITON_PY, "nvidia-pytriton"),
    }


def fmt(cells, keys):
    head = "| " + " | ".join(k for k, _ in keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "".join("| " + " | ".join(f(c) for _, f in keys) + " |\n" for c in cells)


def report(meta, serve, shards, dp):
    rounds = next(c["rounds"] for c in serve if c["server"] == "alternating rounds")
    serve = [c for c in serve if c["server"] != "alternating rounds"]
    by = {(c["server"], c["concurrency"], c["batch"]): c for c in serve}
    lines = [f"Run {meta['date']} by `bench/serving/run.sh`: {meta['cpu']}, {meta['memory_gib']} GiB, "
             f"{meta['os']}; {meta['kiln']}, MLServer {meta['mlserver']} (scikit-learn "
             f"{meta['scikit-learn']}), PyTriton {meta['nvidia-pytriton']}. "
             f"{meta['seconds_per_cell']} s per cell. Raw numbers: `bench/serving/results.json`.\n"]
    lines.append("### Throughput and latency, same client (`kiln-bench oip`), same network\n")
    lines.append(fmt(serve, [
        ("server", lambda c: c["server"]), ("concurrency", lambda c: str(c["concurrency"])),
        ("batch", lambda c: str(c["batch"])),
        ("requests/s", lambda c: f"{c['requests_per_s']:.0f}"),
        ("rows/s", lambda c: f"{c['rows_per_s']:.0f}"),
        ("p50 ms", lambda c: f"{c['p50_ms']:.3f}"), ("p99 ms", lambda c: f"{c['p99_ms']:.3f}"),
        ("server CPU %", lambda c: f"{c['server_cpu_percent']:.0f}"),
        ("errors", lambda c: str(c["errors"]))]))
    k = by.get(("Kiln", 32, 1))
    targets = []
    for other, want in (("MLServer", 10.0), ("Triton (PyTriton)", 5.0)):
        o = by.get((other, 32, 1))
        if k and o and o["requests_per_s"] > 0:
            ratio = k["requests_per_s"] / o["requests_per_s"]
            verdict = "met" if ratio >= want else "NOT met"
            targets.append(f"- Kiln / {other} at concurrency 32, batch 1: **{ratio:.2f}×** "
                           f"(target {want:g}×: {verdict})")
    ratios = sorted(r["ratio"] for r in rounds)
    median = ratios[len(ratios) // 2]
    each = "; ".join(f"{r['kiln']:.0f} / {r['floor']:.0f}" for r in rounds)
    targets.append(f"- Kiln / tonic floor at concurrency 32, batch 1, median of {len(rounds)} "
                   f"alternating rounds ({each} requests/s): **{median:.2f}×** "
                   f"(target 0.6×: {'met' if median >= 0.6 else 'NOT met'})")
    lines.append("\n### Against the targets\n")
    lines.append("\n".join(targets) + "\n")
    lines.append("\n### One 8,192-row request across two workers (concurrency 1)\n")
    lines.append(fmt(shards, [
        ("mode", lambda c: c["mode"]), ("requests/s", lambda c: f"{c['requests_per_s']:.1f}"),
        ("p50 ms", lambda c: f"{c['p50_ms']:.2f}"), ("p99 ms", lambda c: f"{c['p99_ms']:.2f}")]))
    lines.append("\n### Data-parallel training, 10→1024→1024→1, 100,000 rows, batch 512, 2 epochs\n")
    lines.append(fmt(dp, [
        ("workers", lambda c: str(c["workers"])),
        ("samples/s (epoch 1, 2)", lambda c: ", ".join(f"{r:.0f}" for r in c["samples_per_second"])),
        ("job time s", lambda c: f"{c['elapsed_ms'] / 1e3:.1f}"),
        ("mean step ms", lambda c: f"{c['data_parallel']['mean_step_ms']:.1f}" if c["data_parallel"] else "-"),
        ("communication ms/step", lambda c: f"{c['data_parallel']['mean_communication_ms']:.1f}" if c["data_parallel"] else "-")]))
    if len(dp) == 2:
        speedup = dp[1]["samples_per_second"][-1] / dp[0]["samples_per_second"][-1]
        lines.append(f"\nSpeed-up of two workers over one (last epoch): **{speedup:.2f}×**.\n")
    return "\n".join(lines)


def main():
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-serving-"))
    model_dir = work / "model"
    subprocess.run([MLSERVER_PY, str(ROOT / "bench/serving/model.py"), str(model_dir)], check=True)
    meta = versions()
    serve = serving(work, model_dir)
    shards = sharding(work, model_dir)
    dp = data_parallel(work)
    (ROOT / "bench/serving/results.json").write_text(json.dumps(
        {"machine": meta, "serving": serve, "sharding": shards, "data_parallel": dp}, indent=1) + "\n")
    section = report(meta, serve, shards, dp)
    write_section("serving", section + "\n")
    print(section)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
