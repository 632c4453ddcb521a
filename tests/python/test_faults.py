"""Faults, and what Kiln promises under each (docs/reliability.md): a deadline shorter than
the queue is answered in time and never computed; health answers while the worker is
saturated; a worker stopped with SIGTERM leaves the routing table first, finishes its
work and exits; a gateway cut off from etcd serves on from its watched view and sees the
changes made meanwhile once etcd is back."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from conftest import Bearer, Cluster, Multi, free_port, ready_holders, wait_ready

DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")
HEAVY = {"name": "heavy", "spec": {"mlp": {"input_width": 10, "hidden": [4000, 4000],
                                           "output_width": 1, "task": "regression"}}}
needs_cpu = pytest.mark.skipif(
    DEVICE != "cpu", reason="a timing of the CPU backend: the queued work must take about a "
    "second (the deadline logic is the same on every device)")
needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")


def ones(rows):
    x = grpcclient.InferInput("input", [rows, 10], "FP32")
    x.set_data_from_numpy(np.ones((rows, 10), np.float32))
    return x


def make_heavy(target, tmp_path, client):
    """The heavy network with batches of one 512-row request each, reloaded so the
    batching applies."""
    (tmp_path / "heavy.json").write_text(json.dumps(HEAVY))
    target.kiln("models", "create", "--spec", str(tmp_path / "heavy.json"), "--seed", "1")
    target.kiln("models", "deploy", "heavy", "--max-batch-size", "512", "--max-queue-size", "64")
    wait_ready(client, "heavy")
    client.unload_model("heavy")
    client.load_model("heavy")
    wait_ready(client, "heavy")
    client.infer("heavy", [ones(512)])


def rows_computed(metrics_addr, model):
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    found = re.findall(r'kiln_worker_rows_computed_total\{[^}]*model="%s"[^}]*\} (\d+)' % model,
                       text)
    return sum(int(n) for n in found)


async def queue_work(addr, token, n, rows=512, timeout=60):
    client = aioclient.InferenceServerClient(addr)
    client.register_plugin(Bearer(token))
    try:
        return await asyncio.gather(*[client.infer("heavy", [ones(rows)], client_timeout=timeout)
                                      for _ in range(n)], return_exceptions=True)
    finally:
        await client.close()


def health(addr, timeout=1.0):
    """grpc.health.v1 Check; returns (status byte string, seconds)."""
    t0 = time.perf_counter()
    with grpc.insecure_channel(addr) as channel:
        answer = channel.unary_unary("/grpc.health.v1.Health/Check",
                                     request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(b"", timeout=timeout)
    return answer, time.perf_counter() - t0


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("kiln-faults"), workers=1)
    c.metrics = f"127.0.0.1:{free_port()}"
    c.extra = ["--metrics-addr", c.metrics]
    c.start()
    client = c.triton()
    make_heavy(c, c.data_dir, client)
    yield c, client
    c.stop()


@needs_cpu
def test_a_deadline_shorter_than_the_queue_is_answered_in_time_and_never_computed(busy):
    c, client = busy
    before = rows_computed(c.metrics, "heavy")

    async def scenario():
        work = asyncio.ensure_future(queue_work(c.addr, c.token, 8))
        await asyncio.sleep(0.1)
        late = grpcclient.InferenceServerClient(c.addr)
        late.register_plugin(Bearer(c.token))

        def call():
            try:
                late.infer("heavy", [ones(3)], client_timeout=0.2)
                return "answered", ""
            except InferenceServerException as e:
                return e.status(), e.message()

        t0 = time.perf_counter()
        outcome = await asyncio.get_running_loop().run_in_executor(None, call)
        took = time.perf_counter() - t0
        done = await work
        return outcome, took, done, time.perf_counter() - t0

    outcome, took, done, queued_for = asyncio.run(scenario())
    assert outcome[0] == "StatusCode.DEADLINE_EXCEEDED" and took < 0.3, (outcome, took)
    assert all(not isinstance(d, Exception) for d in done), done
    assert queued_for > 0.5, "the queue held more work than the deadline"
    # The eight 512-row requests were computed; the 3-row one never reached the engine.
    deadline = time.monotonic() + 5
    while rows_computed(c.metrics, "heavy") - before < 8 * 512:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert rows_computed(c.metrics, "heavy") - before == 8 * 512


def test_health_answers_within_a_second_while_the_worker_is_saturated(busy):
    c, client = busy
    worker = json.loads(c.kiln("status", "--json"))["workers"][0]["address"]
    answers = []

    def probe():
        time.sleep(0.1)
        for _ in range(10):
            answers.append(("gateway", *health(c.addr)))
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    done = asyncio.run(queue_work(c.addr, c.token, 12))
    prober.join()
    assert all(not isinstance(d, Exception) for d in done)
    assert len(answers) == 10
    for name, answer, took in answers:
        assert answer == b"\x08\x01" and took < 1.0, (name, answer, took)  # SERVING
    # The worker's own port, too (kiln up's workers are served in-process and on it).
    answer, took = health(worker)
    assert answer == b"\x08\x01" and took < 1.0


@needs_cpu
@needs_etcd
def test_a_worker_stopped_with_sigterm_leaves_routing_first_and_loses_no_request(tmp_path):
    m = Multi(tmp_path)
    try:
        m.start("scheduler", "scheduler", "--id", "s1")
        m.start("w0", "worker", "--id", "w0", "--device", DEVICE)
        m.gateway = m.start("gateway", "gateway")
        client = m.triton()
        make_heavy(m, tmp_path, client)
        deadline = time.monotonic() + 30
        while ready_holders(m, "heavy", 1) != ["w0"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)

        async def scenario():
            work = asyncio.ensure_future(queue_work(m.gateway, m.token, 8))
            await asyncio.sleep(0.2)
            proc = m.procs["w0"]
            stopped_at = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            # The record leaves etcd (its lease revoked) before the queued work is done.
            while any(w["id"] == "w0" for w in m.records("workers/")):
                assert time.perf_counter() - stopped_at < 2.0, "w0 stayed in the routing table"
                await asyncio.sleep(0.02)
            left_routing = time.perf_counter() - stopped_at
            done = await work
            finished = time.perf_counter() - stopped_at
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 60)
            return left_routing, finished, done, code, time.perf_counter() - stopped_at

        left_routing, finished, done, code, exited = asyncio.run(scenario())
        assert left_routing < finished, (left_routing, finished)
        assert all(not isinstance(d, Exception) for d in done), [str(d) for d in done]
        assert code == 0 and exited < 30, (code, exited)
        m.procs.pop("w0")
    finally:
        m.stop()


class Proxy:
    """A loopback TCP proxy the test can cut: all connections closed, new ones refused."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.cut = threading.Event()
        self.conns = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    def pipe(self, src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def sever(self):
        self.cut.set()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns.clear()

    def restore(self):
        self.cut.clear()


@needs_etcd
def test_a_gateway_cut_off_from_etcd_serves_on_and_sees_the_changes_after(tmp_path):
    m = Multi(tmp_path)
    try:
        proxy = Proxy(int(m.etcd.rsplit(":", 1)[1]))
        m.start("scheduler", "scheduler", "--id", "s1")
        m.start("w0", "worker", "--id", "w0", "--device", DEVICE)
        # Gateway a reaches etcd through the proxy; gateway b directly.
        a = m.start("gateway-a", "gateway",
                    env={"KILN_ETCD": f"http://127.0.0.1:{proxy.port}"})
        m.gateway = m.start("gateway-b", "gateway")
        (tmp_path / "m.json").write_text(json.dumps(
            {"name": "m", "spec": {"mlp": {"input_width": 10, "hidden": [8],
                                           "output_width": 1, "task": "regression"}}}))
        m.kiln("models", "create", "--spec", str(tmp_path / "m.json"), "--seed", "3")
        client_a = m.triton(a)
        wait_ready(client_a, "m")
        x = grpcclient.InferInput("input", [1, 10], "FP32")
        x.set_data_from_numpy(np.ones((1, 10), np.float32))
        expected = client_a.infer("m", [x]).as_numpy("output")

        proxy.sever()
        cut_at = time.monotonic()
        changed = False
        served = 0
        while time.monotonic() - cut_at < 5:
            np.testing.assert_array_equal(client_a.infer("m", [x], client_timeout=2)
                                          .as_numpy("output"), expected)
            served += 1
            if not changed:
                # Meanwhile, through the other gateway: a second version and an alias.
                m.kiln("models", "create", "--spec", str(tmp_path / "m.json"), "--seed", "4")
                m.kiln("models", "alias", "m", "production", "2")
                changed = True
            time.sleep(0.05)
        assert served >= 50
        # Gateway a still routes from the view it had: version 1 answers unqualified calls.
        assert client_a.infer("m", [x]).get_response().model_version == "1"
        proxy.restore()
        deadline = time.monotonic() + 15
        while client_a.infer("m", [x]).get_response().model_version != "2":
            assert time.monotonic() < deadline, "gateway a never saw the alias set meanwhile"
            time.sleep(0.1)
    finally:
        m.stop()
