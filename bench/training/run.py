"""Training throughput: Kiln's CPU backend against Keras (tensorflow-cpu) and PyTorch.

The same networks, data, batch sizes, epochs, optimizer (Adam, learning rate 0.001) and loss
(binary cross-entropy) on every side, no validation split, shuffled every epoch. Each
framework runs in its own process, one after the other, so that none competes with another
for the cores. Run it with `bench/training/run.sh`, which builds Kiln and the virtualenv;
it prints a Markdown report.

    python bench/training/run.py --kiln PATH/TO/kiln [--frameworks kiln,keras,torch] [--quick]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (name, hidden layers, rows, batch size, epochs)
CASES = [
    ("brief: 10→1 (sigmoid)", [], 100, 10, 100),
    ("wide: 10→256→256→1", [256, 256], 100_000, 64, 20),
]


def data(rows, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((rows, 10), dtype=np.float32)
    y = (x.sum(axis=1) > 5).astype(np.float32)
    return x, y


def result(samples, seconds, epoch_seconds, rows):
    per_epoch = sorted(rows / s for s in epoch_seconds)
    return {
        "samples_per_s": samples / seconds,
        "median_epoch_samples_per_s": statistics.median(per_epoch),
        "seconds": seconds,
    }


def run_keras(hidden, x, y, batch, epochs):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(1)
    layers = [tf.keras.Input(shape=(10,))]
    layers += [tf.keras.layers.Dense(h, activation="relu") for h in hidden]
    layers.append(tf.keras.layers.Dense(1, activation="sigmoid"))
    model = tf.keras.Sequential(layers)
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=0.001),
                  loss="binary_crossentropy", metrics=["accuracy"])
    times = []

    class Clock(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0, callbacks=[Clock()])
    total = time.perf_counter() - start
    return {**result(len(x) * epochs, total, times, len(x)), "version": tf.__version__}


def run_torch(hidden, x, y, batch, epochs):
    import torch

    torch.manual_seed(1)
    sizes = [10, *hidden]
    modules = []
    for a, b in zip(sizes, sizes[1:]):
        modules += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    modules.append(torch.nn.Linear(sizes[-1], 1))
    model = torch.nn.Sequential(*modules)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, eps=1e-7)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).unsqueeze(1)
    times = []
    start = time.perf_counter()
    for _ in range(epochs):
        t = time.perf_counter()
        order = torch.randperm(len(xt))
        right = 0
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            xb, yb = xt[idx], yt[idx]
            optimizer.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            optimizer.step()
            # Accuracy per epoch, as Kiln and Keras report it.
            right += ((logits.detach() > 0) == (yb == 1)).sum().item()
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {**result(len(x) * epochs, total, times, len(x)), "version": torch.__version__,
            "threads": torch.get_num_threads()}


def run_kiln(kiln, hidden, x, y, batch, epochs):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "x.npy", x)
        np.save(tmp / "y.npy", y)
        job = {
            "model_name": "bench",
            "spec": {"mlp": {"input_width": 10, "hidden": hidden, "output_width": 1,
                             "task": "binary_classification"}},
            "data": {"npy": {"features": "x.npy", "labels": "y.npy"}},
            "optimizer": {"adam": {"learning_rate": 0.001}},
            "loss": "binary_cross_entropy",
            "epochs": epochs,
            "batch_size": batch,
            "seed": 1,
        }
        (tmp / "job.json").write_text(json.dumps(job))
        addr_file = tmp / "addr"
        server = subprocess.Popen(
            [kiln, "up", "--grpc-addr", "127.0.0.1:0", "--addr-file", str(addr_file),
             "--workers", "1", "--device", "cpu", "--data-dir", str(tmp / "data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not addr_file.exists() or not addr_file.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("kiln up did not start")
                time.sleep(0.05)
            addr = addr_file.read_text().strip()
            start = time.perf_counter()
            done = subprocess.run([kiln, "train", str(tmp / "job.json"), "--addr", addr],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"kiln train failed: {done.stderr}")
            out = done.stdout
            wall = time.perf_counter() - start
            job_id = out.splitlines()[0].split()[-1]
            shown = subprocess.run([kiln, "jobs", "show", job_id, "--json", "--addr", addr],
                                   capture_output=True, text=True, check=True).stdout
            history = json.loads(shown)["history"]
        finally:
            server.terminate()
            server.wait(timeout=30)
    samples = len(x) * epochs
    training = history[-1]["elapsed_ms"] / 1000
    per_epoch = [h["samples_per_second"] for h in history]
    return {
        "samples_per_s": samples / training,
        "median_epoch_samples_per_s": statistics.median(per_epoch),
        "seconds": training,
        "end_to_end_samples_per_s": samples / wall,
    }


RUNNERS = {"kiln": run_kiln, "keras": run_keras, "torch": run_torch}


def one(args):
    """Run one framework on one case in this process and print its result as JSON."""
    name, hidden, rows, batch, epochs = CASES[args.case]
    if args.quick:
        rows, epochs = min(rows, 5_000), min(epochs, 3)
    x, y = data(rows, 7)
    if args.framework == "kiln":
        r = run_kiln(args.kiln, hidden, x, y, batch, epochs)
    else:
        r = RUNNERS[args.framework](hidden, x, y, batch, epochs)
    print(json.dumps({**r, "rows": rows, "epochs": epochs}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kiln", default=os.environ.get("KILN_BIN", "kiln"))
    p.add_argument("--frameworks", default="kiln,keras,torch")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is kept")
    p.add_argument("--framework", help=argparse.SUPPRESS)
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.framework:
        return one(args)
    frameworks = args.frameworks.split(",")
    rows = []
    for case, (name, hidden, n, batch, epochs) in enumerate(CASES):
        for fw in frameworks:
            best = None
            for _ in range(args.repeat):
                cmd = [sys.executable, __file__, "--framework", fw, "--case", str(case),
                       "--kiln", args.kiln] + (["--quick"] if args.quick else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{fw} on {name} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if best is None or r["samples_per_s"] > best["samples_per_s"]:
                    best = r
            rows.append((name, best["rows"], batch, best["epochs"], fw, best))
            print(f"{name} {fw}: {best['samples_per_s']:.0f} samples/s", file=sys.stderr)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"Python {platform.python_version()}, NumPy {np.__version__}.\n")
    print("| model | rows × epochs, batch | framework | samples/s (whole run) "
          "| median epoch samples/s | training time (s) |")
    print("|---|---|---|---:|---:|---:|")
    for name, n, batch, epochs, fw, r in rows:
        label = {"kiln": "Kiln (CPU, burn flex)", "keras": f"Keras {r.get('version', '')}",
                 "torch": f"PyTorch {r.get('version', '')}"}[fw]
        print(f"| {name} | {n:,} × {epochs}, {batch} | {label} | {r['samples_per_s']:,.0f} "
              f"| {r['median_epoch_samples_per_s']:,.0f} | {r['seconds']:.2f} |")
    kiln_rows = [(name, r) for name, _, _, _, fw, r in rows if fw == "kiln"]
    for name, r in kiln_rows:
        print(f"\nKiln end to end on {name} (submit → version registered, from the CLI): "
              f"{r['end_to_end_samples_per_s']:,.0f} samples/s.")


if __name__ == "__main__":
    main()
