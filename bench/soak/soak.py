"""Soak: mixed inference and training on a multi-process cluster (etcd, two schedulers, a
gateway, three workers) while a worker is killed every 20 s and started again.

Checks, and exits non-zero unless all hold:
- inference success >= 99.9% within each call's deadline;
- every training job submitted completes (SUCCEEDED);
- the resident memory of the long-lived processes (gateway, schedulers) does not grow:
  the last minute's samples stay within 10% + 16 MiB of the first minute's after warm-up.

Usage: bench/soak/run.sh [--seconds 300] [--out results.json]
(`tests/python/test_soak.py` runs a 60-second version in CI.)
"""

import argparse
import asyncio
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests" / "python"))
from conftest import KILN, Bearer, Multi, ready_holders, wait_ready  # noqa: E402

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as aioclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")
WORKERS = ["w0", "w1", "w2"]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return None


async def inference_load(addr, token, seconds, rate, deadline_s, stats):
    client = aioclient.InferenceServerClient(addr)
    client.register_plugin(Bearer(token))
    x = grpcclient.InferInput("input", [4, 10], "FP32")
    x.set_data_from_numpy(np.random.default_rng(1).random((4, 10), dtype=np.float32))
    pending = set()

    async def one():
        t0 = time.perf_counter()
        try:
            await client.infer("m", [x], client_timeout=deadline_s)
            ok = time.perf_counter() - t0 <= deadline_s
            stats["ok" if ok else "late"] += 1
        except InferenceServerException as e:
            stats["failed"] += 1
            stats["failures"].append(f"{e.status()}: {e.message()}"[:200])

    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        task = asyncio.ensure_future(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
        await asyncio.sleep(max(0, start + n / rate - time.perf_counter()))
    await asyncio.gather(*pending)
    await client.close()


def job_state(m, job_id):
    out = subprocess.run([KILN, "jobs", "show", job_id, "--json", "--addr", m.gateway],
                         capture_output=True, text=True, timeout=60, env=m.env)
    return json.loads(out.stdout) if out.returncode == 0 else None


def run(seconds, out_path=None, kill_every=20.0):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kiln-soak-"))
    m = Multi(tmp)
    report = {"seconds": seconds, "device": DEVICE, "kill_every_s": kill_every}
    try:
        m.start("scheduler-1", "scheduler", "--id", "s1")
        m.start("scheduler-2", "scheduler", "--id", "s2")
        for w in WORKERS:
            m.start(w, "worker", "--id", w, "--device", DEVICE)
        m.gateway = m.start("gateway", "gateway")
        (tmp / "m.json").write_text(json.dumps({"name": "m", "spec": {"mlp": {
            "input_width": 10, "hidden": [32], "output_width": 1,
            "task": "binary_classification"}}}))
        m.kiln("models", "create", "--spec", str(tmp / "m.json"), "--seed", "1")
        m.kiln("models", "deploy", "m", "--replicas", "2")
        client = m.triton()
        wait_ready(client, "m")
        deadline = time.monotonic() + 60
        while len(ready_holders(m, "m", 1)) < 2:
            assert time.monotonic() < deadline, "two replicas never became ready"
            time.sleep(0.1)
        rng = np.random.default_rng(3)
        x = rng.random((2000, 10)).astype(np.float32)
        np.save(tmp / "x.npy", x)
        np.save(tmp / "y.npy", (x.sum(1) > 5).astype(np.int64))

        stats = {"ok": 0, "late": 0, "failed": 0, "failures": []}
        jobs, kills, memory = [], [], {"gateway": [], "scheduler-1": [], "scheduler-2": []}
        stop = threading.Event()

        def chaos():
            start = time.monotonic()
            while not stop.wait(1.0):
                elapsed = time.monotonic() - start
                if elapsed >= kill_every * (len(kills) + 1) and elapsed < seconds - 5:
                    victim = random.Random(len(kills)).choice(WORKERS)
                    if victim in m.procs:
                        m.kill(victim)
                        kills.append((round(elapsed, 1), victim))
                        time.sleep(2)
                        m.start(victim, "worker", "--id", victim, "--device", DEVICE)
                for name in memory:
                    proc = m.procs.get(name)
                    if proc is not None:
                        memory[name].append((round(elapsed, 1), rss_mib(proc.pid)))
                # A training job every 15 s, each long enough to meet a kill.
                if elapsed >= 15 * len(jobs) and elapsed < seconds - 20:
                    spec = tmp / f"job{len(jobs)}.json"
                    spec.write_text(json.dumps({
                        "model_name": f"t{len(jobs)}",
                        "spec": {"mlp": {"input_width": 10, "hidden": [16], "output_width": 1,
                                         "task": "binary_classification"}},
                        "data": {"npy": {"features": "x.npy", "labels": "y.npy"}},
                        "epochs": 6, "batch_size": 16, "seed": len(jobs),
                        "checkpoint_every": 1}))
                    out = subprocess.run([KILN, "train", str(spec), "--detach",
                                          "--addr", m.gateway], capture_output=True,
                                         text=True, timeout=60, env=m.env, cwd=tmp)
                    jobs.append(out.stdout.split()[-1] if out.returncode == 0
                                else f"refused: {out.stderr.strip()[:200]}")

        chaos_thread = threading.Thread(target=chaos)
        chaos_thread.start()
        asyncio.run(inference_load(m.gateway, m.token, seconds, rate=40, deadline_s=5.0,
                                   stats=stats))
        stop.set()
        chaos_thread.join()

        # Every job runs to its end.
        outcomes = {}
        deadline = time.monotonic() + 240
        for job in jobs:
            if job.startswith("refused"):
                outcomes[job] = job
                continue
            while True:
                j = job_state(m, job)
                if j and j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    outcomes[job] = j["state"] if j["state"] == "SUCCEEDED" \
                        else f'{j["state"]}: {j["reason"]}'
                    break
                if time.monotonic() > deadline:
                    outcomes[job] = "did not finish within 240 s after the load"
                    break
                time.sleep(0.5)

        total = stats["ok"] + stats["late"] + stats["failed"]
        success = stats["ok"] / total if total else 0.0
        growth = {}
        for name, samples in memory.items():
            values = [v for t, v in samples if v is not None]
            if len(values) < 6:
                continue
            warm = values[len(values) // 6: len(values) // 6 * 2 or None] or values[:1]
            last = values[-max(1, len(values) // 6):]
            growth[name] = {"first_mib": round(max(warm), 1), "last_mib": round(max(last), 1),
                            "grew": max(last) > max(warm) * 1.10 + 16}
        report.update({
            "requests": total, "ok": stats["ok"], "late": stats["late"],
            "failed": stats["failed"], "success": round(success, 5),
            "failures": stats["failures"][:10], "kills": kills,
            "jobs": outcomes, "memory": growth,
        })
        report["passed"] = (success >= 0.999
                            and all(v == "SUCCEEDED" for v in outcomes.values())
                            and len(outcomes) > 0
                            and not any(g["grew"] for g in growth.values()))
    finally:
        m.stop()
    if out_path:
        pathlib.Path(out_path).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.seconds, args.out)
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["passed"] else 1)
