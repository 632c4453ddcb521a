"""Train the benchmark network once with scikit-learn and write it in every side's format.

An sklearn MLPClassifier with one hidden layer of 64 (ReLU) on 10 inputs, a logistic
output: model.joblib for MLServer's sklearn runtime, weights.npz for the Triton (PyTriton)
side, weights.safetensors and spec.json for Kiln. Run with the MLServer virtualenv's
Python (it has scikit-learn).
"""

import json
import struct
import sys
from pathlib import Path

import joblib
import numpy as np
from sklearn.neural_network import MLPClassifier

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
x = rng.random((4000, 10), dtype=np.float32)
y = (x.sum(1) > 5).astype(np.int64)
clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(x, y)
joblib.dump(clf, out / "model.joblib")
w1, w2 = (c.astype(np.float32) for c in clf.coefs_)
b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
np.savez(out / "weights.npz", w1=w1, b1=b1, w2=w2, b2=b2)

# safetensors, written by hand: an 8-byte little-endian header length, a JSON header of
# tensor names, dtypes, shapes and byte offsets, then the raw little-endian bytes.
tensors = {"layers.0.weight": w1, "layers.0.bias": b1, "layers.1.weight": w2, "layers.1.bias": b2}
header, blobs, offset = {}, [], 0
for name, t in tensors.items():
    raw = np.ascontiguousarray(t, dtype="<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
head = json.dumps(header).encode()
head += b" " * (-len(head) % 8)
(out / "weights.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
(out / "spec.json").write_text(json.dumps({"name": "mlp", "spec": {"mlp": {
    "input_width": 10, "hidden": [64], "activation": "relu", "output_width": 1,
    "task": "binary_classification"}}}))
# The answer every side must give for the probe rows (the positive class's probability).
probe = rng.random((4, 10), dtype=np.float32)
np.save(out / "probe.npy", probe)
np.save(out / "expected.npy", clf.predict_proba(probe)[:, 1].astype(np.float32))
print(f"trained: accuracy {clf.score(x, y):.3f}")
