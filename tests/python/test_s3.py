"""Artifacts on S3: a cluster (etcd, scheduler, worker, gateway as processes) whose artifact
store is an S3-compatible server on loopback (moto's), reached with the standard AWS
environment variables."""

import hashlib
import os
import shutil
import subprocess
import time

import boto3
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import wait_ready
from test_cluster import DEVICE, Multi, free_port, infer

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")

BUCKET = "kiln-artifacts"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    dir = tmp_path_factory.mktemp("s3")
    port = free_port()
    moto = shutil.which("moto_server") or os.path.join(os.path.dirname(os.sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(dir / "moto.log", "wb"))
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "kiln", "AWS_SECRET_ACCESS_KEY": "kiln-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="kiln", aws_secret_access_key="kiln-secret")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            assert proc.poll() is None, "moto_server exited"
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    yield client, env
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster_on_s3(s3, tmp_path_factory):
    client, env = s3
    m = Multi(tmp_path_factory.mktemp("s3-cluster"))
    m.env.update(env)
    m.env["KILN_ARTIFACTS"] = f"s3://{BUCKET}/artifacts"
    try:
        m.start("scheduler", "scheduler", "--id", "s1")
        m.start("w0", "worker", "--id", "w0", "--device", DEVICE)
        m.gateway = m.start("gateway", "gateway")
        yield m, client
    finally:
        m.stop()


def create(multi, tmp_path, name, seed):
    spec = tmp_path / f"{name}.json"
    spec.write_text('{"name": "%s", "spec": {"mlp": {"input_width": 10, "hidden": [8], '
                    '"output_width": 1, "task": "binary_classification"}}}' % name)
    out = multi.kiln("models", "create", "--spec", str(spec), "--seed", str(seed))
    return out.split("sha256 ")[1].rstrip(")\n")


def test_versions_live_in_the_bucket_under_their_sha256(cluster_on_s3, tmp_path):
    multi, client = cluster_on_s3
    sha = create(multi, tmp_path, "m", 1)
    body = client.get_object(Bucket=BUCKET, Key=f"artifacts/sha256/{sha}.safetensors")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha
    wait_ready(multi.triton(), "m")
    assert infer(multi, np.ones((2, 10), np.float32)).shape == (2, 1)


def test_a_corrupted_object_fails_to_load_and_says_so_while_the_worker_serves_on(cluster_on_s3, tmp_path):
    multi, client = cluster_on_s3
    triton = multi.triton()
    sha = create(multi, tmp_path, "bad", 2)
    wait_ready(triton, "bad")
    triton.unload_model("bad")
    # Someone damages the object while the model is unloaded.
    client.put_object(Bucket=BUCKET, Key=f"artifacts/sha256/{sha}.safetensors", Body=b"not weights")
    with pytest.raises(InferenceServerException) as failed:
        triton.load_model("bad")
    assert "corrupt" in str(failed.value) and sha in str(failed.value), str(failed.value)
    assert not triton.is_model_ready("bad")
    # The worker is alive and still serves the model whose object is intact.
    assert multi.procs["w0"].poll() is None
    assert infer(multi, np.ones((1, 10), np.float32)).shape == (1, 1)
    index = {m.name: m for m in triton.get_model_repository_index().models}
    assert "corrupt" in index["bad"].reason, index["bad"]
