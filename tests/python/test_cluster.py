"""Cluster mode from the built binary: a real etcd, a scheduler, three workers and a gateway,
each its own process on loopback ports, driven by tritonclient and checked with etcdctl.

The tests run in order on one cluster: each leaves it as the next expects.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file

from conftest import KILN, PREFIX, TTL, Multi, free_port, ready_holders, wait_ready

DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    m = Multi(tmp_path_factory.mktemp("cluster"))
    try:
        m.metrics = {name: f"127.0.0.1:{free_port()}" for name in ("scheduler", "w0", "gateway")}
        m.start("scheduler-1", "scheduler", "--id", "s1", "--metrics-addr", m.metrics["scheduler"])
        for i in range(3):
            extra = ["--metrics-addr", m.metrics["w0"]] if i == 0 else []
            m.start(f"w{i}", "worker", "--id", f"w{i}", "--device", DEVICE, *extra)
        m.gateway = m.start("gateway-1", "gateway", "--metrics-addr", m.metrics["gateway"])
        yield m
    finally:
        m.stop()


def infer(multi, x, model="m"):
    client = multi.triton()
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], client_timeout=10).as_numpy("output")


def test_tritonclient_infers_and_etcd_holds_the_documented_keys(multi, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"name": "m", "spec": {"mlp": {
        "input_width": 10, "hidden": [16], "output_width": 1, "task": "binary_classification"}}}))
    multi.kiln("models", "create", "--spec", str(tmp_path / "m.json"), "--seed", "7")
    assert "2 replicas" in multi.kiln("models", "deploy", "m", "--replicas", "2")
    deadline = time.monotonic() + 30
    while len(ready_holders(multi, "m", 1)) != 2:
        assert time.monotonic() < deadline, multi.records("workers/")
        time.sleep(0.1)
    wait_ready(multi.triton(), "m")

    multi.kiln("models", "export", "m:1", "-o", str(tmp_path / "m.safetensors"))
    w = load_file(str(tmp_path / "m.safetensors"))
    x = np.random.default_rng(1).random((8, 10), dtype=np.float32)
    h = np.maximum(x @ w["layers.0.weight"] + w["layers.0.bias"], 0)
    expected = 1 / (1 + np.exp(-(h @ w["layers.1.weight"] + w["layers.1.bias"])))
    np.testing.assert_allclose(infer(multi, x), expected, rtol=1e-5, atol=1e-6)

    keys = set(multi.etcdctl("get", "--prefix", PREFIX, "--keys-only").stdout.split())
    for key in ["leader/scheduler", "models/m", "models/m/versions/1", "deployments/m",
                "workers/w0", "workers/w1", "workers/w2",
                "placements/w0", "placements/w1", "placements/w2"]:
        assert PREFIX + key in keys, (key, sorted(keys))
    leader = multi.records("leader/scheduler")[0]
    assert leader["id"] == "s1"

    # `kiln status` shows the same cluster: three workers with their device, the version on two.
    status = json.loads(multi.kiln("status", "--json"))
    assert status["scheduler"] == "s1"
    assert sorted(w["id"] for w in status["workers"]) == ["w0", "w1", "w2"]
    assert all(w["reachable"] and w["backend"] in ("cpu", "wgpu") for w in status["workers"])
    (m1,) = [v for v in status["versions"] if v["model"] == "m"]
    assert (m1["state"], len(m1["ready_on"]), sorted(m1["placed_on"])) == \
        ("READY", 2, sorted(m1["ready_on"]))


def scrape(addr):
    """The samples at http://addr/metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def families(addr):
    """The metric families at http://addr/metrics, samples or not."""
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    return {family.name for family in text_string_to_metric_families(text)}


def test_each_process_serves_prometheus_metrics(multi):
    key = ("kiln_gateway_requests_total", (("model", "m"), ("outcome", "success"), ("version", "1")))
    before = scrape(multi.metrics["gateway"]).get(key, 0)
    x = np.ones((1, 10), np.float32)
    for _ in range(17):
        infer(multi, x)
    durations = ("kiln_gateway_request_duration_seconds_count",
                 (("model", "m"), ("outcome", "success"), ("version", "1")))
    before_histogram = scrape(multi.metrics["gateway"]).get(durations, 0)
    for _ in range(17):
        infer(multi, x)
    after = scrape(multi.metrics["gateway"])
    assert after[key] - before == 34
    # The histogram saw every request, its buckets are cumulative and end at its count.
    assert after[durations] - before_histogram == 17
    labels = (("model", "m"), ("outcome", "success"), ("version", "1"))
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                     if k[0] == "kiln_gateway_request_duration_seconds_bucket"
                     and tuple(p for p in k[1] if p[0] != "le") == labels)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), buckets
    assert buckets[-1] == (float("inf"), after[durations])
    assert after[("kiln_gateway_in_flight_requests", (("model", "m"), ("version", "1")))] == 0
    assert after[("kiln_gateway_rows_total", (("model", "m"), ("version", "1")))] >= 17
    worker = scrape(multi.metrics["w0"])
    assert worker[("kiln_worker_registered", ())] == 1
    assert worker[("kiln_worker_versions", (("state", "READY"),))] >= 0
    assert worker[("kiln_worker_device_info", (("adapter", worker_adapter(worker)),
                                                ("backend", "wgpu" if DEVICE.startswith("wgpu") else "cpu")))] == 1
    loads = ("kiln_worker_model_load_duration_seconds_count", (("outcome", "success"),))
    if "w0" in ready_holders(multi, "m", 1):
        # m is 10→16→1: 193 FP32 parameters.
        assert worker[("kiln_worker_model_weight_bytes", ())] == 193 * 4
        assert worker[loads] >= 1
    assert worker[("kiln_worker_resident_memory_bytes", ())] > 0
    scheduler = scrape(multi.metrics["scheduler"])
    assert scheduler[("kiln_scheduler_leader", ())] == 1

    # Every metric the Grafana dashboard charts is served by some process.
    served = set().union(*(families(multi.metrics[p]) for p in ("gateway", "w0", "scheduler")))
    dashboard = (ROOT / "deploy/observability/grafana-dashboard.json").read_text()
    charted = {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"kiln_[a-z_]+", dashboard)}
    charted = {re.sub(r"_total$", "", m) for m in charted}
    assert charted and charted <= served, charted - served


def worker_adapter(samples):
    (adapter,) = [dict(k[1])["adapter"] for k in samples if k[0] == "kiln_worker_device_info"]
    return adapter


def test_a_killed_worker_loses_no_request_and_its_replica_moves(multi):
    holders = ready_holders(multi, "m", 1)
    x = np.ones((1, 10), np.float32)
    expected = infer(multi, x)
    failures, answers, stop = [], [0], threading.Event()

    def load():
        client = multi.triton()
        inp = grpcclient.InferInput("input", [1, 10], "FP32")
        inp.set_data_from_numpy(x)
        while not stop.is_set():
            try:
                out = client.infer("m", [inp], client_timeout=5).as_numpy("output")
                np.testing.assert_array_equal(out, expected)
                answers[0] += 1
            except Exception as e:  # every failure is a finding
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    victim = holders[0]
    killed_at = time.monotonic()
    multi.kill(victim)
    # Back to two ready replicas, on live workers, within the lease TTL + 2 s.
    while True:
        now = ready_holders(multi, "m", 1)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() - killed_at < TTL + 2, now
        time.sleep(0.05)
    recovered = time.monotonic() - killed_at
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert answers[0] > 20, answers
    status = json.loads(multi.kiln("status", "--json"))
    assert victim not in [w["id"] for w in status["workers"]]
    (m1,) = [v for v in status["versions"] if v["model"] == "m"]
    assert len(m1["ready_on"]) == 2 and victim not in m1["ready_on"], m1
    print(f"replica back {recovered:.2f} s after SIGKILL; {answers[0]} requests, none failed")


def infer_many(client, x, model):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], client_timeout=20).as_numpy("output")


def test_a_sharded_request_answers_the_unsharded_bits_with_a_replica_killed(multi, tmp_path):
    # A replacement for the worker the last test killed, so the cluster keeps three.
    multi.start("w3", "worker", "--id", "w3", "--device", DEVICE)
    (tmp_path / "wide.json").write_text(json.dumps({"name": "wide", "spec": {"mlp": {
        "input_width": 10, "hidden": [64, 32], "output_width": 1,
        "task": "binary_classification"}}}))
    multi.kiln("models", "create", "--spec", str(tmp_path / "wide.json"), "--seed", "4")
    out = multi.kiln("models", "deploy", "wide", "--replicas", "2", "--shard-rows", "100")
    assert "2 replicas" in out, out
    # Created on every worker, then down to two: wait until the third has let it go.
    deadline = time.monotonic() + 30
    while len(ready_holders(multi, "wide", 1)) != 2:
        assert time.monotonic() < deadline, ready_holders(multi, "wide", 1)
        time.sleep(0.05)
    holders = ready_holders(multi, "wide", 1)
    client = multi.triton()
    # 4,099 rows: above the shard threshold, split 2,050/2,049 across the two replicas.
    x = np.random.default_rng(12).normal(size=(4099, 10)).astype(np.float32)
    # The unsharded answer: requests of 99 rows, each below the threshold.
    unsharded = np.concatenate([infer_many(client, x[i:i + 99], "wide")
                                for i in range(0, len(x), 99)])
    sharded = infer_many(client, x, "wide")
    assert sharded.shape == (4099, 1)
    assert sharded.tobytes() == unsharded.tobytes(), "sharded and unsharded bits differ"

    # Sharded requests go on while one of the replicas is killed mid-request.
    failures, answers, stop = [], [0], threading.Event()

    def load():
        c = multi.triton()
        while not stop.is_set():
            try:
                got = infer_many(c, x, "wide")
                if got.tobytes() != unsharded.tobytes():
                    failures.append("an answer differed")
                answers[0] += 1
            except Exception as e:  # every failure is a finding
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    while answers[0] < 5:
        time.sleep(0.01)
    multi.kill(holders[0])
    seen = answers[0]
    while answers[0] < seen + 10:
        assert not failures, failures[:5]
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    print(f"{answers[0]} sharded requests of 4,099 rows, none failed, {holders[0]} killed")
    # Two workers are left; the next tests expect three.
    multi.start("w4", "worker", "--id", "w4", "--device", DEVICE)


def job(tmp_path, name):
    rng = np.random.default_rng(3)
    x = rng.random((200, 10))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "model_name": name,
        "spec": {"mlp": {"input_width": 10, "hidden": [4], "output_width": 1,
                         "task": "binary_classification"}},
        "data": {"inline": {"features": x.tolist(), "labels": (x.sum(1) > 5).astype(int).tolist()}},
        "epochs": 2, "batch_size": 20}))
    return str(path)


def test_a_restarted_scheduler_rebuilds_its_state_and_reuses_no_version(multi, tmp_path):
    out = multi.kiln("train", job(tmp_path, "t"))
    assert "completed: t version 1" in out, out
    multi.kill("scheduler-1")
    multi.start("scheduler-2", "scheduler", "--id", "s2")
    # The new scheduler leads once the old lead's lease has run out.
    deadline = time.monotonic() + TTL + 10
    while not any(r.get("id") == "s2" for r in multi.records("leader/scheduler")):
        assert time.monotonic() < deadline, multi.records("leader/scheduler")
        time.sleep(0.1)
    jobs = multi.kiln("jobs", "list")
    assert "SUCCEEDED" in jobs and " t " in jobs, jobs
    out = multi.kiln("train", job(tmp_path, "t"))
    assert "completed: t version 2" in out, out
    versions = sorted(r["version"] for r in multi.records("models/t/versions/"))
    assert versions == [1, 2]


def test_another_gateway_gives_the_same_answers(multi):
    x = np.random.default_rng(5).random((4, 10), dtype=np.float32)
    before = infer(multi, x)
    multi.kill("gateway-1")
    multi.gateway = multi.start("gateway-2", "gateway")
    wait_ready(multi.triton(), "m")
    np.testing.assert_array_equal(infer(multi, x), before)


def wait_job(multi, job_id, until, what, timeout=120):
    """Poll the job until `until` holds. While schedulers fail over, training calls are
    UNAVAILABLE for up to a lease TTL: those answers are waited out."""
    deadline = time.monotonic() + timeout
    j = None
    while True:
        out = subprocess.run([KILN, "jobs", "show", job_id, "--json", "--addr", multi.gateway],
                             capture_output=True, text=True, timeout=60, env=multi.env)
        if out.returncode == 0:
            j = json.loads(out.stdout)
            if until(j):
                return j
        else:
            assert "Unavailable" in out.stderr, out.stderr
        assert time.monotonic() < deadline, f"{what}: {j and (j['state'], len(j['history']))}"
        time.sleep(0.1)


def test_a_training_job_outlives_its_worker_and_its_scheduler(multi, tmp_path):
    if DEVICE != "cpu":
        pytest.skip("the resume path is the same on every device; on lavapipe this job "
                    "would take minutes (training on wgpu is covered by test_training.py)")
    rng = np.random.default_rng(8)
    x = rng.random((20_000, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x.sum(1) > 5).astype(np.int64))
    (tmp_path / "long.json").write_text(json.dumps({
        "model_name": "long",
        "spec": {"mlp": {"input_width": 10, "hidden": [64], "output_width": 1,
                         "task": "binary_classification"}},
        "data": {"npy": {"features": "x.npy", "labels": "y.npy"}},
        "epochs": 30, "batch_size": 4, "seed": 2, "checkpoint_every": 1}))
    out = multi.kiln("train", str(tmp_path / "long.json"), "--detach")
    job_id = out.split()[-1]

    # The worker dies mid-run: the job goes on elsewhere from its checkpoint.
    j = wait_job(multi, job_id, lambda j: j["checkpoint_epoch"] >= 2, "first checkpoints")
    first = j["worker"]
    multi.kill(first)
    j = wait_job(multi, job_id, lambda j: j["worker"] not in ("", first)
                 and j["checkpoint_epoch"] >= j["history"][-1]["epoch"] - 1
                 and len(j["history"]) >= 5, "resumed on another worker")
    second = j["worker"]

    # Then its scheduler dies: the next one to lead picks the job up.
    leader = multi.records("leader/scheduler")[0]["id"]
    multi.kill({"s2": "scheduler-2", "s1": "scheduler-1"}[leader])
    multi.start("scheduler-3", "scheduler", "--id", "s3")
    j = wait_job(multi, job_id, lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
                 "the end", timeout=180)
    assert j["state"] == "SUCCEEDED", j["reason"]
    # Every epoch once, in order, though parts of the run were done three times.
    assert [h["epoch"] for h in j["history"]] == list(range(1, 31))
    assert j["worker"] != first and second != first
    assert j["result_version"] == 1
    # The result serves.
    client = multi.triton()
    wait_ready(client, "long")
    predictions = infer(multi, x[:64], model="long")[:, 0] > 0.5
    assert np.mean(predictions == (x[:64].sum(1) > 5)) > 0.9


def test_a_data_parallel_job_goes_on_with_the_workers_left(multi, tmp_path):
    if DEVICE != "cpu":
        pytest.skip("the data-parallel path is the same on every device; on lavapipe this "
                    "job would take minutes")
    # Exactly three live workers, so that after the loss the job has two.
    for name in ("w5", "w6", "w7"):
        if sum(1 for n in multi.procs if n.startswith("w")) < 3:
            multi.start(name, "worker", "--id", name, "--device", DEVICE)
    deadline = time.monotonic() + TTL + 10
    while len(multi.records("workers/")) != 3:  # a killed worker's lease lapses meanwhile
        assert time.monotonic() < deadline, multi.records("workers/")
        time.sleep(0.05)
    rng = np.random.default_rng(9)
    x = rng.random((12_000, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", (x.sum(1) > 5).astype(np.int64))
    (tmp_path / "dp.json").write_text(json.dumps({
        "model_name": "dp",
        "spec": {"mlp": {"input_width": 10, "hidden": [32], "output_width": 1,
                         "task": "binary_classification"}},
        "data": {"npy": {"features": "x.npy", "labels": "y.npy"}},
        "epochs": 12, "batch_size": 32, "seed": 2, "checkpoint_every": 1, "workers": 3}))
    out = multi.kiln("train", str(tmp_path / "dp.json"), "--detach")
    job_id = out.split()[-1]
    j = wait_job(multi, job_id, lambda j: j["checkpoint_epoch"] >= 2, "first checkpoints")
    first = j["worker"].split(",")
    assert len(first) == 3 and j["workers"] == 3, j["worker"]
    victim = first[1]
    multi.kill(victim)  # worker processes are named by their ids
    j = wait_job(multi, job_id, lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
                 "the end", timeout=240)
    assert j["state"] == "SUCCEEDED", j["reason"]
    assert [h["epoch"] for h in j["history"]] == list(range(1, 13))
    after = j["worker"].split(",")
    assert len(after) == 2 and victim not in after, j["worker"]
    assert j["data_parallel"]["workers"] == 2 and j["data_parallel"]["steps"] > 0, j
    assert j["history"][-1]["train_accuracy"] > 0.9, j["history"][-1]
    client = multi.triton()
    wait_ready(client, "dp")
    predictions = infer(multi, x[:64], model="dp")[:, 0] > 0.5
    assert np.mean(predictions == (x[:64].sum(1) > 5)) > 0.9
