"""Training as an ML engineer meets it: `kiln train` job files, checked against NumPy.

The optimizer steps and losses are recomputed here with a NumPy implementation written for
this test (forward pass, backpropagation, Adam, SGD with momentum) from weights this test
chose, never from Kiln's own output.
"""

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file, save_file

from conftest import wait_ready


def create(cluster, tmp, name, spec, layers):
    weights = {}
    for i, (w, b) in enumerate(layers):
        weights[f"layers.{i}.weight"] = np.asarray(w, np.float32)
        weights[f"layers.{i}.bias"] = np.asarray(b, np.float32)
    save_file(weights, str(tmp / f"{name}.safetensors"))
    (tmp / f"{name}.json").write_text(json.dumps({"name": name, "spec": {"mlp": spec}}))
    cluster.kiln("models", "create", "--spec", str(tmp / f"{name}.json"),
                 "--weights", str(tmp / f"{name}.safetensors"))


def train(cluster, tmp, job):
    path = tmp / f"job-{job['model_name']}.json"
    path.write_text(json.dumps(job))
    out = cluster.kiln("train", str(path))
    job_id = out.splitlines()[0].split()[-1]
    assert "completed" in out, out
    return json.loads(cluster.kiln("jobs", "show", job_id, "--json"))


def exported(cluster, tmp, ref):
    path = tmp / (ref.replace(":", "_") + ".safetensors")
    cluster.kiln("models", "export", ref, "-o", str(path))
    return load_file(str(path))


def inline(x, y):
    return {"inline": {"features": np.asarray(x).tolist(), "labels": np.asarray(y).tolist()}}


# --- the NumPy reference ---

def forward(x, w0, b0, w1, b1):
    h = x @ w0 + b0
    a = np.maximum(h, 0)
    z = a @ w1 + b1
    return h, a, z


def bce_and_grads(x, y, w0, b0, w1, b1):
    h, a, z = forward(x, w0, b0, w1, b1)
    p = 1 / (1 + np.exp(-z))
    n = len(x)
    loss = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    dz = (p - y) / n
    dw1, db1 = a.T @ dz, dz.sum(0)
    dh = (dz @ w1.T) * (h > 0)
    dw0, db0 = x.T @ dh, dh.sum(0)
    return loss, [dw0, db0, dw1, db1]


X = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-0.2, 0.8, 0.9], [1.0, 1.0, -1.2], [0.1, -0.4, 0.6]])
Y = np.array([[1.0], [0.0], [1.0], [0.0], [1.0]])
W0 = np.array([[0.2, -0.3, 0.5, 0.1], [0.4, 0.1, -0.2, 0.3], [-0.1, 0.2, 0.3, -0.4]])
B0 = np.array([0.05, 0.1, -0.05, 0.2])
W1 = np.array([[0.3], [-0.2], [0.5], [0.1]])
B1 = np.array([0.02])
BINARY = {"input_width": 3, "hidden": [4], "activation": "relu", "output_width": 1,
          "task": "binary_classification"}


def one_batch_job(name, epochs, optimizer):
    return {"model_name": name, "continue_from": f"{name}:1", "data": inline(X, Y),
            "optimizer": optimizer, "epochs": epochs, "batch_size": len(X), "no_shuffle": True}


def test_one_adam_step_and_the_bce_loss_equal_numpy(cluster, tmp_path):
    create(cluster, tmp_path, "np-adam", BINARY, [(W0, B0), (W1, B1)])
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    job = train(cluster, tmp_path, one_batch_job("np-adam", 1, {"adam": {"learning_rate": lr}}))
    loss, grads = bce_and_grads(X, Y, W0, B0, W1, B1)
    assert job["history"][0]["train_loss"] == pytest.approx(loss, abs=1e-5)
    expected = []
    for p, g in zip([W0, B0, W1, B1], grads):
        m, v = (1 - b1) * g, (1 - b2) * g * g
        expected.append(p - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps))
    got = exported(cluster, tmp_path, "np-adam:2")
    for i, name in enumerate(["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]):
        np.testing.assert_allclose(got[name], expected[i], atol=1e-5, err_msg=name)


def test_two_sgd_momentum_steps_equal_numpy(cluster, tmp_path):
    create(cluster, tmp_path, "np-sgd", BINARY, [(W0, B0), (W1, B1)])
    lr, mu = 0.1, 0.9
    train(cluster, tmp_path, one_batch_job("np-sgd", 2, {"sgd": {"learning_rate": lr, "momentum": mu}}))
    params = [W0.copy(), B0.copy(), W1.copy(), B1.copy()]
    velocity = None
    for _ in range(2):
        _, grads = bce_and_grads(X, Y, *params)
        velocity = grads if velocity is None else [mu * v + g for v, g in zip(velocity, grads)]
        params = [p - lr * v for p, v in zip(params, velocity)]
    got = exported(cluster, tmp_path, "np-sgd:2")
    for i, name in enumerate(["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]):
        np.testing.assert_allclose(got[name], params[i], atol=1e-5, err_msg=name)


def test_cross_entropy_and_mean_squared_error_equal_numpy(cluster, tmp_path):
    w = np.array([[0.2, -0.1, 0.4], [0.3, 0.5, -0.2], [-0.4, 0.1, 0.2]])
    b = np.array([0.1, -0.1, 0.0])
    classes = np.array([2, 0, 1, 1, 0])
    create(cluster, tmp_path, "np-ce", {"input_width": 3, "output_width": 3,
                                         "task": "multiclass_classification"}, [(w, b)])
    job = train(cluster, tmp_path, {**one_batch_job("np-ce", 1, {"sgd": {"learning_rate": 0.01}}),
                                    "data": inline(X, classes)})
    z = X @ w + b
    ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(X)), classes])
    assert job["history"][0]["train_loss"] == pytest.approx(ce, abs=1e-5)

    w2, b2 = w[:, :2], b[:2]
    targets = np.array([[1.0, 0.5], [-0.5, 2.0], [0.0, 0.0], [3.0, 1.0], [0.2, -0.2]])
    create(cluster, tmp_path, "np-mse", {"input_width": 3, "output_width": 2, "task": "regression"},
           [(w2, b2)])
    job = train(cluster, tmp_path, {**one_batch_job("np-mse", 1, {"sgd": {"learning_rate": 0.01}}),
                                    "data": inline(X, targets)})
    mse = np.mean((X @ w2 + b2 - targets) ** 2)
    assert job["history"][0]["train_loss"] == pytest.approx(mse, abs=1e-5)


def test_a_trained_version_serves_through_tritonclient_at_its_reported_accuracy(cluster, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((1000, 10)).astype(np.float32)
    y = (x.sum(axis=1) > 5).astype(np.float32)
    job = train(cluster, tmp_path, {
        "model_name": "sum5", "spec": {"mlp": {"input_width": 10, "hidden": [16],
                                                "output_width": 1, "task": "binary_classification"}},
        "data": inline(x, y), "standardize": True, "optimizer": {"adam": {"learning_rate": 0.01}},
        "epochs": 15, "batch_size": 32, "validation_fraction": 0.2, "seed": 5, "alias": "staging"})
    assert [h["epoch"] for h in job["history"]] == list(range(1, 16))
    reported = job["history"][-1]["validation_accuracy"]
    assert reported >= 0.9
    client = cluster.triton()
    wait_ready(client, "sum5")
    predictions = []
    for chunk in np.array_split(x, 20):
        inp = grpcclient.InferInput("input", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        predictions.append(client.infer("sum5", [inp], model_version="staging").as_numpy("output")[:, 0])
    accuracy = np.mean((np.concatenate(predictions) > 0.5) == (y == 1))
    assert abs(accuracy - reported) < 0.05, (accuracy, reported)


def test_numpy_files_and_a_yaml_job_give_test_metrics_that_serving_reproduces(cluster, tmp_path):
    rng = np.random.default_rng(11)
    x = rng.random((1200, 10))  # float64, as NumPy makes it
    y = (x.sum(axis=1) > 5).astype(np.int64)
    # Files written by NumPy itself: float64 C-order features, int64 labels, and a
    # Fortran-order float32 test set.
    np.save(tmp_path / "x.npy", x[:1000])
    np.save(tmp_path / "y.npy", y[:1000])
    np.save(tmp_path / "x_test.npy", np.asfortranarray(x[1000:].astype(np.float32)))
    np.save(tmp_path / "y_test.npy", y[1000:])
    out = cluster.kiln("datasets", "upload", str(tmp_path / "x.npy"),
                       "--labels", str(tmp_path / "y.npy"))
    dataset_id = out.split()[1]
    assert "1000 rows" in out and "x9" in out, out
    (tmp_path / "job-npy.yaml").write_text(f"""
model_name: sum5-npy
spec:
  mlp: {{input_width: 10, hidden: [16], output_width: 1, task: binary_classification}}
data:
  dataset: {{id: {dataset_id}}}
test_data:
  npy: {{features: x_test.npy, labels: y_test.npy}}
standardize: true
optimizer:
  adam: {{learning_rate: 0.01}}
epochs: 15
batch_size: 32
validation_fraction: 0.2
seed: 5
""")
    out = cluster.kiln("train", str(tmp_path / "job-npy.yaml"))
    assert "completed" in out, out
    job = json.loads(cluster.kiln("jobs", "show", out.splitlines()[0].split()[-1], "--json"))
    test = job["test"]
    assert test["rows"] == 200 and test["accuracy"] >= 0.9, test
    client = cluster.triton()
    wait_ready(client, "sum5-npy")
    served = []
    for chunk in np.array_split(x[1000:].astype(np.float32), 4):
        inp = grpcclient.InferInput("input", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        served.append(client.infer("sum5-npy", [inp]).as_numpy("output")[:, 0])
    accuracy = np.mean((np.concatenate(served) > 0.5) == (y[1000:] == 1))
    assert abs(accuracy - test["accuracy"]) <= 1 / 200 + 1e-9, (accuracy, test)
