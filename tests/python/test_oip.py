"""The embedded cluster as an application developer meets it: through tritonclient.

Every expected output is recomputed with NumPy from the weights exported through Kiln's
own API, so a wrong forward pass, a mixed-up batch or a lossy codec shows up here.
"""

import json
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file
from tritonclient.utils import InferenceServerException

from conftest import Cluster, wait_ready

MODEL = "demo-mlp"


def reference(weights, x, hidden_activation="relu", head="sigmoid"):
    """The MLP forward pass in NumPy (float64, then compared at float32 tolerance)."""
    n = len([k for k in weights if k.endswith(".weight")])
    h = x.astype(np.float64)
    for i in range(n):
        h = h @ weights[f"layers.{i}.weight"].astype(np.float64) + weights[f"layers.{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0) if hidden_activation == "relu" else np.tanh(h)
    if head == "sigmoid":
        return 1 / (1 + np.exp(-h))
    if head == "softmax":
        e = np.exp(h - h.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return h


@pytest.fixture(scope="module")
def client(cluster):
    c = cluster.triton()
    wait_ready(c, MODEL)
    return c


@pytest.fixture(scope="module")
def weights(cluster, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "demo.safetensors"
    cluster.kiln("models", "export", MODEL, "-o", str(path))
    return load_file(str(path))


def infer(client, x, model=MODEL, name="input"):
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("output")


def test_health_metadata_and_config(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "1"]}]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert int(config["max_batch_size"]) == 64
    assert config["input"][0]["dims"] == ["10"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "kiln"
    assert "statistics" in server["extensions"]


# 1000 rows: above max_batch_size (64), split across the replicas and gathered in order.
@pytest.mark.parametrize("rows", [1, 64, 1000])
def test_infer_matches_numpy(client, weights, rows):
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 10)).astype(np.float32)
    got = infer(client, x)
    assert got.shape == (rows, 1)
    np.testing.assert_allclose(got, reference(weights, x), rtol=1e-5, atol=1e-6)


def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(client, weights):
    cases = {
        "wrong width": ("input", np.ones((1, 9), np.float32), "FP32"),
        "batch above max_batch_size × max_queue_size": (
            "input", np.ones((64 * 1024 + 1, 10), np.float32), "FP32"),
        "unknown input": ("features", np.ones((1, 10), np.float32), "FP32"),
        "BYTES datatype": ("input", np.array([[b"x"] * 10], dtype=np.object_), "BYTES"),
    }
    for what, (name, x, dtype) in cases.items():
        inp = grpcclient.InferInput(name, list(x.shape), dtype)
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [inp])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", what
        assert name in err.value.message(), f"{what}: {err.value.message()}"
    # Wrong datatype declared for the bytes sent: the byte count no longer matches.
    # (tritonclient checks this itself, so its private buffer is swapped after the check.)
    inp = grpcclient.InferInput("input", [1, 10], "FP64")
    inp.set_data_from_numpy(np.ones((1, 10), np.float64))
    inp._raw_content = np.ones((1, 10), np.float32).tobytes()
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    # Still serving, and still right.
    x = np.full((1, 10), 0.5, np.float32)
    np.testing.assert_allclose(infer(client, x), reference(weights, x), rtol=1e-5, atol=1e-6)


def test_other_numeric_datatypes_are_converted_losslessly(client, weights):
    x = np.arange(20, dtype=np.int32).reshape(2, 10) - 10
    inp = grpcclient.InferInput("input", [2, 10], "INT32")
    inp.set_data_from_numpy(x)
    got = client.infer(MODEL, [inp]).as_numpy("output")
    np.testing.assert_allclose(got, reference(weights, x.astype(np.float32)), rtol=1e-5, atol=1e-6)


def test_64_concurrent_callers_each_get_their_own_answer(client, cluster, weights):
    results = {}
    errors = []

    def call(i):
        try:
            c = cluster.triton()
            x = np.full((1, 10), i / 10.0, np.float32) * np.linspace(-1, 1, 10, dtype=np.float32)
            results[i] = (x, infer(c, x))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 64
    for i, (x, got) in results.items():
        np.testing.assert_allclose(got, reference(weights, x), rtol=1e-5, atol=1e-6, err_msg=f"caller {i}")
    # Distinct inputs gave distinct outputs: nobody received someone else's row.
    assert len({float(got[0, 0]) for _, got in results.values()}) > 32


def test_stream_infer_answers_every_request_in_order(client, cluster, weights):
    answers = []
    done = threading.Event()

    def callback(result, error):
        answers.append((result, error))
        if len(answers) == 5:
            done.set()

    c = cluster.triton()
    c.start_stream(callback=callback)
    xs = [np.full((2, 10), i, np.float32) for i in range(5)]
    for i, x in enumerate(xs):
        inp = grpcclient.InferInput("input", [2, 10], "FP32")
        inp.set_data_from_numpy(x)
        c.async_stream_infer(MODEL, [inp], request_id=str(i))
    assert done.wait(30)
    c.stop_stream()
    for i, (result, error) in enumerate(answers):
        assert error is None
        assert result.get_response().id == str(i)
        np.testing.assert_allclose(result.as_numpy("output"), reference(weights, xs[i]), rtol=1e-5, atol=1e-6)


def test_repository_index_and_statistics(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": MODEL, "version": "1", "state": "READY"} in index
    before = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    before_ok = int(before["inference_stats"]["success"].get("count", 0))
    for _ in range(3):
        infer(client, np.zeros((1, 10), np.float32))
    after = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(after["inference_stats"]["success"]["count"]) == before_ok + 3


def test_unload_then_load(client):
    client.unload_model(MODEL)
    assert not client.is_model_ready(MODEL)
    with pytest.raises(InferenceServerException) as err:
        infer(client, np.zeros((1, 10), np.float32))
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    client.load_model(MODEL)
    assert client.is_model_ready(MODEL)


def test_models_survive_a_restart(tmp_path):
    spec = {
        "name": "iris",
        "spec": {"mlp": {"input_width": 4, "hidden": [8], "activation": "tanh",
                          "output_width": 3, "task": "multiclass_classification"}},
        "description": "restart test",
    }
    (tmp_path / "iris.json").write_text(json.dumps(spec))
    first = Cluster(tmp_path, workers=1).start()
    first.kiln("models", "create", "--spec", str(tmp_path / "iris.json"), "--seed", "7")
    first.kiln("models", "export", "iris", "-o", str(tmp_path / "iris.safetensors"))
    first.stop()

    second = Cluster(tmp_path, workers=1).start()
    try:
        listing = second.kiln("models", "list")
        assert "iris" in listing and "demo-mlp" in listing
        c = second.triton()
        wait_ready(c, "iris")
        x = np.array([[0.1, -0.2, 0.3, 0.4]], np.float32)
        w = load_file(str(tmp_path / "iris.safetensors"))
        np.testing.assert_allclose(infer(c, x, model="iris"), reference(w, x, "tanh", "softmax"),
                                   rtol=1e-5, atol=1e-6)
    finally:
        second.stop()
