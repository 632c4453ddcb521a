"""OpenTelemetry tracing across a multi-process cluster: etcd, a scheduler, a worker and a
gateway, each exporting its spans over OTLP/gRPC to a receiver this harness runs
(tests/python/otlp.py implements the collector's trace service)."""

import json
import os
import queue
import secrets
import shutil
import socket
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import Multi, ready_holders, wait_ready
from otlp import Receiver

DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    receiver = Receiver()
    dir = tmp_path_factory.mktemp("traced")
    # Export every 100 ms instead of every 5 s, so the test need not wait.
    m = Multi(dir, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                        "OTEL_BSP_SCHEDULE_DELAY": "100",
                        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
                        "KILN_LOG_FORMAT": "json"})
    try:
        m.start("scheduler", "scheduler", "--id", "s1")
        m.start("w0", "worker", "--id", "w0", "--device", DEVICE)
        m.gateway = m.start("gateway", "gateway")
        (dir / "m.json").write_text(json.dumps({"name": "m", "spec": {"mlp": {
            "input_width": 10, "hidden": [8], "output_width": 1,
            "task": "binary_classification"}}}))
        m.kiln("models", "create", "--spec", str(dir / "m.json"), "--seed", "3")
        m.kiln("models", "deploy", "m", "--replicas", "1")
        deadline = time.monotonic() + 60
        while ready_holders(m, "m", 1) != ["w0"]:
            assert time.monotonic() < deadline, m.records("workers/")
            time.sleep(0.1)
        m.client = m.triton()
        wait_ready(m.client, "m")
        m.receiver = receiver
        yield m
    finally:
        m.stop()
        receiver.stop()


def infer(client, rows=3, headers=None):
    x = np.random.default_rng(rows).random((rows, 10), dtype=np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = client.infer("m", [inp], headers=headers, client_timeout=10).as_numpy("output")
    assert out.shape == (rows, 1)
    return out


def wait_for(receiver, trace_id, wanted, timeout=30, also=lambda spans: True):
    """The spans of `trace_id` once every (service, name) in `wanted` is among them and
    `also` holds of them."""
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.trace(trace_id)
        have = {(s.service, s.name) for s in spans}
        if wanted <= have and also(spans):
            return spans
        assert time.monotonic() < deadline, (
            f"missing {wanted - have or 'what `also` waits for'}; got {spans}")
        time.sleep(0.1)


def one(spans, service, name):
    found = [s for s in spans if (s.service, s.name) == (service, name)]
    assert len(found) == 1, (service, name, spans)
    return found[0]


def test_a_traceparent_from_the_client_continues_through_gateway_worker_and_batch(traced):
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    infer(traced.client, rows=3, headers={"traceparent": f"00-{trace_id}-{caller}-01"})

    infer_rpc, worker_rpc = "inference.GRPCInferenceService/ModelInfer", "kiln.internal.v1.Worker/Infer"
    spans = wait_for(traced.receiver, trace_id, {
        ("kiln-gateway", infer_rpc), ("kiln-gateway", worker_rpc),
        ("kiln-worker", worker_rpc), ("kiln-worker", "queue wait"), ("kiln-worker", "batch")})

    # The caller's bearer token is in no span (it is checked and dropped before the call
    # reaches anything that records).
    assert traced.token not in repr(spans)
    assert not any(traced.token in str(v) for s in spans for v in s.attributes.values())
    # The gateway's request span continues the caller's span, with the RPC conventions.
    gateway = one([s for s in spans if s.kind == "SERVER"], "kiln-gateway", infer_rpc)
    assert gateway.parent_span_id == caller
    assert {k: gateway.attributes.get(k) for k in (
        "rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code",
        "kiln.model.name", "kiln.model.version", "kiln.batch_size")} == {
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer", "rpc.grpc.status_code": 0,
        "kiln.model.name": "m", "kiln.model.version": 1, "kiln.batch_size": 3}

    # gateway → worker: the gateway's client span is the parent of the worker's server span.
    call = one([s for s in spans if s.kind == "CLIENT"], "kiln-gateway", worker_rpc)
    assert call.parent_span_id == gateway.span_id
    assert call.attributes["rpc.grpc.status_code"] == 0
    worker = one([s for s in spans if s.kind == "SERVER"], "kiln-worker", worker_rpc)
    assert worker.parent_span_id == call.span_id
    assert worker.attributes["kiln.batch_size"] == 3

    # The request waited in the queue, then rode in a batch linked to it; the request
    # records which batch served it.
    queue = one(spans, "kiln-worker", "queue wait")
    assert queue.parent_span_id == worker.span_id
    batch = one(spans, "kiln-worker", "batch")
    assert (trace_id, worker.span_id) in batch.links
    assert batch.attributes["kiln.batch.requests"] >= 1
    assert worker.attributes["kiln.batch.span_id"] == batch.span_id

    # Every process names itself and carries the configured resource attributes.
    assert any(r.get("service.name") == "kiln-worker"
               and r.get("deployment.environment") == "test" for r in traced.receiver.resources)


def test_a_stream_is_one_span_for_its_whole_life_with_a_span_per_request(traced):
    trace_id = secrets.token_hex(16)
    answers = queue.Queue()
    c = traced.triton()
    c.start_stream(callback=lambda result, error: answers.put(error),
                   headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    opened = time.monotonic()
    for i in range(3):
        inp = grpcclient.InferInput("input", [2, 10], "FP32")
        inp.set_data_from_numpy(np.full((2, 10), i, np.float32))
        c.async_stream_infer("m", [inp], request_id=str(i))
        assert answers.get(timeout=10) is None
        time.sleep(0.3)
    c.stop_stream()
    lived = time.monotonic() - opened

    rpc = "inference.GRPCInferenceService/ModelStreamInfer"
    spans = wait_for(traced.receiver, trace_id, {("kiln-gateway", rpc)})
    call = one(spans, "kiln-gateway", rpc)
    # The call's span lasts as long as the stream (not just until its headers went out),
    # and records the status of its trailers.
    assert call.seconds >= 0.8, (call.seconds, lived)
    assert call.attributes["rpc.grpc.status_code"] == 0
    spans = wait_for(traced.receiver, trace_id, {("kiln-gateway", "ModelStreamInfer request")})
    deadline = time.monotonic() + 10
    while len([s for s in spans if s.name == "ModelStreamInfer request"]) < 3:
        assert time.monotonic() < deadline, spans
        time.sleep(0.1)
        spans = traced.receiver.trace(trace_id)
    requests = [s for s in spans if s.name == "ModelStreamInfer request"]
    assert len(requests) == 3
    for r in requests:
        assert r.parent_span_id == call.span_id
        assert r.attributes["kiln.model.name"] == "m"
        assert r.attributes["kiln.batch_size"] == 2


def test_a_caller_that_does_not_sample_gets_no_spans(traced):
    unsampled, sampled = secrets.token_hex(16), secrets.token_hex(16)
    infer(traced.client, headers={"traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"})
    infer(traced.client, headers={"traceparent": f"00-{sampled}-{secrets.token_hex(8)}-01"})
    # Once the later request's batch has arrived, the earlier one's would have too.
    wait_for(traced.receiver, sampled, {("kiln-worker", "batch")})
    assert traced.receiver.trace(unsampled) == []


def test_a_failed_request_is_a_span_with_its_status_code(traced):
    trace_id = secrets.token_hex(16)
    x = np.zeros((2, 7), dtype=np.float32)  # 7 features where the model takes 10
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(Exception, match="10"):
        traced.client.infer("m", [inp], client_timeout=10,
                            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
    rpc = "inference.GRPCInferenceService/ModelInfer"
    (span,) = wait_for(traced.receiver, trace_id, {("kiln-gateway", rpc)})
    assert span.attributes["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT
    # The caller's mistake is not the server's error.
    assert span.status_code != 2


def test_log_lines_inside_a_span_carry_its_trace_and_span_ids(traced):
    lines = [json.loads(l) for l in (traced.dir / "w0.log").read_text().splitlines()
             if l.startswith("{")]
    (loaded,) = [l for l in lines if l["fields"].get("message") == "model loaded"]
    deadline = time.monotonic() + 30
    while not (load := [s for s in traced.receiver.spans if s.span_id == loaded["span_id"]]):
        assert time.monotonic() < deadline, "the model load span never arrived"
        time.sleep(0.1)
    assert load[0].name == "model load" and load[0].trace_id == loaded["trace_id"]
    assert load[0].attributes["kiln.model.name"] == "m"


def test_a_training_job_is_a_span_with_an_event_per_epoch_in_the_submitters_trace(traced):
    rng = np.random.default_rng(5)
    x = rng.random((120, 10))
    path = traced.dir / "tj.json"
    path.write_text(json.dumps({
        "model_name": "tj",
        "spec": {"mlp": {"input_width": 10, "hidden": [4], "output_width": 1,
                         "task": "binary_classification"}},
        "data": {"inline": {"features": x.tolist(),
                            "labels": (x.sum(1) > 5).astype(int).tolist()}},
        "epochs": 3, "batch_size": 20}))
    assert "completed: tj version 1" in traced.kiln("train", str(path))
    deadline = time.monotonic() + 30
    while not (jobs := [s for s in traced.receiver.spans if s.name == "training job"
                        and s.attributes.get("kiln.model.name") == "tj"]):
        assert time.monotonic() < deadline, "the training job span never arrived"
        time.sleep(0.1)
    (job,) = jobs
    assert job.service == "kiln-scheduler" and job.events.count("epoch ended") == 3
    def parent_of(span, spans):
        return [s for s in spans if s.span_id == span.parent_span_id]

    # Each process exports on its own schedule: wait for the others' spans of the trace.
    trace = wait_for(traced.receiver, job.trace_id, {
        ("kiln-scheduler", "kiln.v1.Training/SubmitTrainingJob"),
        ("kiln-worker", "kiln.internal.v1.Worker/Train")},
        also=lambda spans: any(parent_of(submit, spans) for submit in parent_of(job, spans)))
    # Under the scheduler's SubmitTrainingJob call, which the gateway forwarded...
    (submit,) = parent_of(job, trace)
    assert (submit.service, submit.name, submit.kind) == (
        "kiln-scheduler", "kiln.v1.Training/SubmitTrainingJob", "SERVER")
    assert any(s.service == "kiln-gateway" and s.span_id == submit.parent_span_id for s in trace)
    # ...and the worker's training run is in the same trace.
    assert any(s.service == "kiln-worker" and s.name == "kiln.internal.v1.Worker/Train"
               for s in trace), trace


def rate(client, n=150):
    """Requests a second from one caller, best of three rounds of `n` (each must succeed)."""
    best = 0.0
    for _ in range(3):
        started = time.monotonic()
        for _ in range(n):
            infer(client, rows=1)
        best = max(best, n / (time.monotonic() - started))
    return best


def test_requests_succeed_at_the_same_rate_with_the_collector_down_or_hung(traced):
    up = rate(traced.client)
    port = traced.receiver.port
    traced.receiver.stop()
    down = rate(traced.client)
    # A collector that accepts connections and never answers.
    with socket.socket() as hung:
        hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hung.bind(("127.0.0.1", port))
        hung.listen(64)
        stalled = rate(traced.client)
    # Generous bounds for a shared machine; a blocking exporter would be 10x slower.
    assert down > 0.5 * up, (up, down)
    assert stalled > 0.5 * up, (up, stalled)
