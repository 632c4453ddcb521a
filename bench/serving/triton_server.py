"""Serve the benchmark network on NVIDIA Triton (PyTriton: tritonserver with its Python
backend calling this process), CPU only. Args: weights.npz GRPC_PORT HTTP_PORT METRICS_PORT."""

import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

weights = np.load(sys.argv[1])
w1, b1, w2, b2 = (weights[k] for k in ("w1", "b1", "w2", "b2"))


@batch
def infer(input):
    hidden = np.maximum(input @ w1 + b1, 0.0)
    output = 1.0 / (1.0 + np.exp(-(hidden @ w2 + b2)))
    return {"output": output.astype(np.float32)}


config = TritonConfig(grpc_address="127.0.0.1", grpc_port=int(sys.argv[2]),
                      http_address="127.0.0.1", http_port=int(sys.argv[3]),
                      metrics_address="127.0.0.1", metrics_port=int(sys.argv[4]))
with Triton(config=config) as triton:
    triton.bind(
        model_name="mlp",
        infer_func=infer,
        inputs=[Tensor(name="input", dtype=np.float32, shape=(10,))],
        outputs=[Tensor(name="output", dtype=np.float32, shape=(1,))],
        config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher()),
    )
    triton.serve()
