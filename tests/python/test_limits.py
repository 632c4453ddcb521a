"""Limits: a full replica refuses at once instead of queueing without end; one token over
its rate cannot slow another down; per-token limits, request sizes and upload sizes are
refused with RESOURCE_EXHAUSTED naming the limit, before any work."""

import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from conftest import KILN, Bearer, Cluster, token_in, wait_ready

DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def aio(addr, token):
    client = aioclient.InferenceServerClient(addr)
    client.register_plugin(Bearer(token))
    return client


def ones(rows):
    x = grpcclient.InferInput("input", [rows, 10], "FP32")
    x.set_data_from_numpy(np.ones((rows, 10), np.float32))
    return x


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("kiln-limits"), workers=1)
    c.extra = ["--max-request-elements", "100000", "--max-rows", "100"]
    c.start()
    yield c
    c.stop()


async def flood(addr, token, model, callers, rows):
    """`callers` requests at once; returns [(ok, status, seconds)]."""
    client = aio(addr, token)
    x = ones(rows)

    async def one():
        t0 = time.perf_counter()
        try:
            await client.infer(model, [x], client_timeout=60)
            return True, "OK", time.perf_counter() - t0
        except InferenceServerException as e:
            return False, e.status(), time.perf_counter() - t0

    try:
        return await asyncio.gather(*[one() for _ in range(callers)])
    finally:
        await client.close()


@pytest.mark.skipif(DEVICE != "cpu", reason="a timing of the CPU backend: one batch must "
                    "outlast the flood's arrival (the queue logic is the same on every device)")
def test_fifty_callers_against_capacity_four_and_queue_four(limited, tmp_path):
    # A network whose batch of 512 rows takes a good part of a second on the CPU: four
    # callers of 128 rows fill a batch, four more the queue.
    (tmp_path / "h.json").write_text('{"name": "heavy", "spec": {"mlp": {"input_width": 10, '
                                     '"hidden": [4000, 4000], "output_width": 1, '
                                     '"task": "regression"}}}')
    limited.kiln("models", "create", "--spec", str(tmp_path / "h.json"), "--seed", "1")
    out = limited.kiln("models", "deploy", "heavy", "--max-batch-size", "512",
                       "--max-queue-size", "4", "--max-queue-delay-us", "100000")
    assert "512 rows a batch, 4 queued requests" in out, out
    client = limited.triton()
    # The batching applies to versions loaded after the change: reload.
    wait_ready(client, "heavy")
    client.unload_model("heavy")
    client.load_model("heavy")
    wait_ready(client, "heavy")
    client.infer("heavy", [ones(128)])
    rss = []
    for round in range(5):
        answers = asyncio.run(flood(limited.addr, limited.token, "heavy", 50, 128))
        admitted = [a for a in answers if a[0]]
        refused = [a for a in answers if not a[0]]
        assert 1 <= len(admitted) <= 8, [a[:2] for a in answers]
        assert {a[1] for a in refused} == {"StatusCode.RESOURCE_EXHAUSTED"}, refused
        # Refused at once, not after waiting for the work before them.
        slowest_refusal = max(a[2] for a in refused)
        fastest_admitted = min(a[2] for a in admitted)
        assert slowest_refusal < 0.25 and slowest_refusal < fastest_admitted, (
            slowest_refusal, fastest_admitted)
        rss.append(rss_kib(limited.proc.pid))
    # Memory is flat: rounds after the first grow the process by less than 16 MiB.
    assert rss[-1] - rss[1] < 16 * 1024, rss


def paced(addr, token, rate, windows, start, queue, index):
    """From its own process: requests at `rate` per second during each (from, to) window,
    in seconds after the wall-clock time `start`; puts (index, [(sent at, latency or
    None)], failure statuses)."""
    async def run():
        client = aio(addr, token)
        x = ones(1)
        samples, failures = [], []
        pending = set()

        async def one(at):
            t0 = time.perf_counter()
            try:
                await client.infer("demo-mlp", [x], client_timeout=10)
                samples.append((at, time.perf_counter() - t0))
            except InferenceServerException as e:
                failures.append(e.status())

        for begin, end in windows:
            await asyncio.sleep(max(0, start + begin - time.time()))
            n = 0
            while time.time() < start + end:
                task = asyncio.ensure_future(one(time.time() - start))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
                await asyncio.sleep(max(0, start + begin + n / rate - time.time()))
        await asyncio.gather(*pending)
        await client.close()
        return samples, failures

    queue.put((index, asyncio.run(run())))


def run_paced(addr, jobs):
    """Run each (token, rate, windows) in a process of its own, from one start time."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start = time.time() + 3  # after every process has started
    procs = [ctx.Process(target=paced, args=(addr, *job, start, queue, i))
             for i, job in enumerate(jobs)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return [results[i] for i in range(len(jobs))]


def p99(latencies):
    return sorted(latencies)[int(len(latencies) * 0.99) - 1]


def test_a_noisy_neighbour_does_not_slow_another_token(limited):
    calm = token_in(limited.kiln("tokens", "create", "--name", "calm", "--role", "infer",
                                 "--requests-per-second", "50"))
    noisy = token_in(limited.kiln("tokens", "create", "--name", "noisy", "--role", "infer",
                                  "--requests-per-second", "20"))
    wait_ready(limited.triton(), "demo-mlp")
    # The calm token sends 40/s for 18 s; the noisy one, at ten times its limit, in three
    # windows of 3 s between solo windows — so slow drifts of the machine hit both sides.
    noisy_windows = [(3, 6), (9, 12), (15, 18)]
    (calm_samples, calm_failures), (noisy_ok, noisy_refused) = run_paced(
        limited.addr, [(calm, 40, [(0, 18)]), (noisy, 200, noisy_windows)])
    assert not calm_failures, calm_failures
    # (A margin of 0.3 s around each window's edges belongs to neither side.)
    def near(t, edges):
        return any(abs(t - e) < 0.3 for e in edges)
    edges = [e for w in noisy_windows for e in w]
    busy = lambda t: any(b <= t < e for b, e in noisy_windows)  # noqa: E731
    shared = [lat for t, lat in calm_samples if busy(t) and not near(t, edges)]
    solo = [lat for t, lat in calm_samples if not busy(t) and not near(t, edges)]
    assert len(shared) >= 250 and len(solo) >= 250, (len(shared), len(solo))
    # The noisy token got about its rate (20/s over 9 s, plus its burst each window) and
    # the rest was refused.
    assert len(noisy_ok) <= 20 * 9 + 3 * 20 + 10, len(noisy_ok)
    assert set(noisy_refused) == {"StatusCode.RESOURCE_EXHAUSTED"}
    assert len(noisy_refused) > 1200
    assert p99(shared) <= 1.5 * p99(solo), (p99(solo), p99(shared),
                                           statistics.median(solo), statistics.median(shared))


def test_a_token_over_its_limits_is_refused_naming_them(limited):
    one = token_in(limited.kiln("tokens", "create", "--name", "one-at-a-time", "--role",
                                "infer", "--max-in-flight", "1", "--requests-per-second", "500"))
    listing = limited.kiln("tokens", "list")
    assert "500/s, 1 in flight" in listing, listing
    client = grpcclient.InferenceServerClient(limited.addr)
    client.register_plugin(Bearer(one))
    wait_ready(client, "demo-mlp")
    # A stream holds its place for as long as it is open.
    answers = []
    client.start_stream(callback=lambda result, error: answers.append(error))
    client.async_stream_infer("demo-mlp", [ones(1)])
    deadline = time.monotonic() + 10
    while not answers:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert answers == [None]
    with pytest.raises(InferenceServerException) as e:
        client.infer("demo-mlp", [ones(1)])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert '"one-at-a-time"' in e.value.message() and "1 calls in flight" in e.value.message()
    client.stop_stream()
    deadline = time.monotonic() + 10
    while True:
        try:
            client.infer("demo-mlp", [ones(1)])
            break
        except InferenceServerException:
            assert time.monotonic() < deadline, "the stream's place was never given back"
            time.sleep(0.05)


def test_request_and_upload_sizes_are_refused_naming_the_limit(limited, tmp_path):
    client = limited.triton()
    wait_ready(client, "demo-mlp")
    # 10,001 rows of 10: past --max-request-elements 100000, refused before decoding.
    with pytest.raises(InferenceServerException) as e:
        client.infer("demo-mlp", [ones(10001)])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "100010 tensor elements" in e.value.message()
    assert "--max-request-elements" in e.value.message()
    # Bad names never reach the store.
    for name in ["../etc", "a/b", "tab\there", "x" * 65]:
        (tmp_path / "bad.json").write_text('{"name": %s, "spec": {"mlp": {"input_width": 2, '
                                           '"output_width": 1, "task": "regression"}}}'
                                           % json.dumps(name))
        out = subprocess.run([KILN, "models", "create", "--spec", str(tmp_path / "bad.json"),
                              "--seed", "1", "--addr", limited.addr], capture_output=True,
                             text=True, timeout=60, env=limited.env)
        assert out.returncode != 0 and "InvalidArgument" in out.stderr, out.stderr
        assert "[A-Za-z0-9_.-]" in out.stderr
    assert "etc" not in limited.kiln("models", "list")
    # An upload past --max-rows.
    (tmp_path / "big.csv").write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(101)))
    out = subprocess.run([KILN, "datasets", "upload", str(tmp_path / "big.csv"), "--label",
                          "label", "--addr", limited.addr], capture_output=True, text=True,
                         timeout=60, env=limited.env)
    assert out.returncode != 0 and "ResourceExhausted" in out.stderr, out.stderr
    assert "101 rows" in out.stderr and "--max-rows" in out.stderr
    assert "big" not in limited.kiln("datasets", "list")
