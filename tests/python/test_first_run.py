"""What a new user meets first: tools that discover the API, a quiet headless start, CSV
files as spreadsheets write them, and a readable training plot."""

import io
import json
import os
import re
import signal
import subprocess
import time

import grpc
import numpy as np
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from conftest import KILN

WORKER = "kiln.internal.v1.Worker"


def list_services(addr, version):
    """The services a port lists through server reflection `version` (v1 or v1alpha). The
    two versions' messages are the same on the wire, so grpcio-reflection's v1alpha
    messages serve for both."""
    with grpc.insecure_channel(addr) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        answers = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                            timeout=10))
    return sorted(s.name for s in answers[0].list_services_response.service)


def test_reflection_answers_both_protocol_versions_with_what_the_port_serves(cluster):
    # grpcio-reflection's own client speaks v1alpha, as most tools do.
    with grpc.insecure_channel(cluster.addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        alpha = sorted(s.name for s in answers[0].list_services_response.service)
        # A listed service can be described: its file comes back.
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService")]), timeout=10))
        assert answers[0].file_descriptor_response.file_descriptor_proto
    assert alpha == list_services(cluster.addr, "v1")
    for service in ["inference.GRPCInferenceService", "kiln.v1.Models", "kiln.v1.Training",
                    "kiln.v1.Cluster", "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"]:
        assert service in alpha, alpha
    # The gateway does not serve the internal worker API, so it does not list it.
    assert WORKER not in alpha

    # A worker's port lists the worker API and not the public ones.
    deadline = time.monotonic() + 60
    while not (workers := json.loads(cluster.kiln("status", "--json"))["workers"]):
        assert time.monotonic() < deadline, "no worker registered within 60 s"
        time.sleep(0.1)
    worker = workers[0]["address"]
    for version in ["v1", "v1alpha"]:
        listed = list_services(worker, version)
        assert WORKER in listed and "inference.GRPCInferenceService" not in listed, listed


def test_a_headless_start_prints_no_line_that_reads_as_an_error(tmp_path):
    # A server with no desktop session: no display, no runtime directory.
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "DISPLAY", "WAYLAND_DISPLAY")}
    addr_file = tmp_path / "addr"
    log = tmp_path / "out"
    proc = subprocess.Popen(
        [KILN, "up", "--grpc-addr", "127.0.0.1:0", "--workers", "1", "--device",
         os.environ.get("KILN_TEST_DEVICE", "cpu"), "--data-dir", str(tmp_path / "data"),
         "--addr-file", str(addr_file)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while b"model loaded" not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith("Kiln is up") for line in lines), lines
    errors = [line for line in lines if line.strip().lower().startswith("error")]
    assert not errors, errors


def test_a_csv_file_as_a_spreadsheet_saves_it_trains(cluster, tmp_path):
    # A byte-order mark, CRLF line ends, a quoted header cell holding a comma, quoted numbers.
    rows = ["\ufeff\"size, cm\",weight,label"]
    rng = np.random.default_rng(4)
    for _ in range(40):
        a, b = rng.random(2)
        rows.append(f"\"{a:.4f}\",{b:.4f},{int(a + b > 1)}")
    (tmp_path / "data.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8"))
    out = cluster.kiln("datasets", "upload", str(tmp_path / "data.csv"), "--label", "label")
    assert "40 rows" in out, out
    # The quoted header cell is one column, named as written.
    assert "size, cm" in out and "weight" in out, out


def test_a_plot_is_small_and_has_its_axes_and_legend(cluster, tmp_path):
    rng = np.random.default_rng(9)
    x = rng.random((200, 4)).astype(np.float32)
    y = (x.sum(axis=1) > 2).astype(np.float32)
    job = {"model_name": "plotted", "spec": {"mlp": {"input_width": 4, "hidden": [8],
                                                     "output_width": 1,
                                                     "task": "binary_classification"}},
           "data": {"inline": {"features": x.tolist(), "labels": y.tolist()}},
           "optimizer": {"adam": {"learning_rate": 0.02}}, "epochs": 6, "batch_size": 20,
           "validation_fraction": 0.2, "seed": 1}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = cluster.kiln("train", str(tmp_path / "job.json"))
    job_id = out.splitlines()[0].split()[-1]

    cluster.kiln("jobs", "plot", job_id, "-o", str(tmp_path / "curve.png"))
    png = (tmp_path / "curve.png").read_bytes()
    assert len(png) < 300 * 1024, len(png)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert image.shape == (520, 1200, 3)
    colours = {tuple(p) for p in image.reshape(-1, 3)[::7]}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours, "both curves drawn"
    # Text is drawn: dark anti-aliased pixels below each panel's axis (tick labels, "epoch").
    below_axes = image[440:520, :, :].min(axis=2)
    assert (below_axes < 100).sum() > 500

    cluster.kiln("jobs", "plot", job_id, "-o", str(tmp_path / "curve.svg"))
    svg = (tmp_path / "curve.svg").read_text()
    texts = {t.strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)}
    for text in ["Loss", "Accuracy", "epoch", "loss", "accuracy", "train", "validation", "6"]:
        assert text in texts, (text, texts)


def test_kiln_up_serves_every_parts_metrics_on_one_port(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    import tritonclient.grpc as grpcclient
    import urllib.request

    from conftest import Cluster, free_port, wait_ready

    port = free_port()
    cluster = Cluster(tmp_path, workers=2)
    cluster.extra = ["--metrics-addr", f"127.0.0.1:{port}"]
    cluster.start()
    try:
        client = cluster.triton()
        wait_ready(client, "demo-mlp")
        # Ready means ready on one worker; the scrape below counts both.
        deadline = time.monotonic() + 60
        while len(json.loads(cluster.kiln("status", "--json"))["versions"][0]["ready_on"]) < 2:
            assert time.monotonic() < deadline, "demo-mlp never became ready on both workers"
            time.sleep(0.1)
        x = grpcclient.InferInput("input", [1, 10], "FP32")
        x.set_data_from_numpy(np.ones((1, 10), dtype=np.float32))
        client.infer("demo-mlp", [x])
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        cluster.stop()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    # One scrape holds each family once, whatever number of workers share the process.
    assert len(names) == len(set(names)), sorted(names)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families for s in f.samples}
    demo = (("model", "demo-mlp"), ("outcome", "success"), ("version", "1"))
    assert samples[("kiln_gateway_requests_total", demo)] == 1
    for worker in ["worker-0", "worker-1"]:
        assert samples[("kiln_worker_registered", (("worker", worker),))] == 1
    ready = sum(v for (name, labels), v in samples.items()
                if name == "kiln_worker_versions" and ("state", "READY") in labels)
    assert ready == 2, "the demo model is ready on both workers"
    assert samples[("kiln_scheduler_leader", ())] == 1
    assert samples[("kiln_scheduler_training_jobs_running", ())] == 0
