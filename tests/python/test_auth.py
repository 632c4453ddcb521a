"""Tokens and roles. Every public RPC — found through the gateway's own reflection, so a new
RPC is covered the day it is added — refuses a call with no token, with a revoked token or
with a token of another role, before doing anything, and serves a token of its role.
Tokens are stored hashed, never logged, and revoked on every gateway within a second."""

import base64
import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import KILN, Cluster, Multi, token_in, triton, wait_ready

OPEN = {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection"}
CSV = "a,b,c,d,e,f,g,h,i,j,label\n" + "".join(
    ",".join(f"{(r * 7 + c) % 10 / 10:.1f}" for c in range(10)) + f",{r % 2}\n"
    for r in range(16))


def role_of(service, method):
    """The role each RPC needs, as docs/security.md states it (written out here, not read
    from Kiln)."""
    if service == "inference.GRPCInferenceService":
        return "admin" if method in ("RepositoryModelLoad", "RepositoryModelUnload") else "infer"
    if service == "kiln.v1.Generation":
        return "infer"
    if service == "kiln.v1.Models":
        return "infer" if method in ("ListModels", "GetModelVersion") else "admin"
    if service == "kiln.v1.Training":
        return "train"
    if service in ("kiln.v1.Cluster", "kiln.v1.Tokens"):
        return "admin"
    raise AssertionError(f"{service}/{method} is new: give it a role here and in the docs")


class Api:
    """Every public RPC of a gateway, with message classes from its reflection."""

    def __init__(self, addr):
        self.channel = grpc.insecure_channel(addr)
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = DescriptorPool(self.db)
        self.methods = []
        for name in self.db.get_services():
            if name in OPEN:
                continue
            for m in self.pool.FindServiceByName(name).methods:
                self.methods.append((name, m))

    def message(self, descriptor, fields=None):
        cls = message_factory.GetMessageClass(descriptor)
        return json_format.ParseDict(fields or {}, cls())

    def call(self, service, method, requests, token, timeout=30):
        """Make the call; returns (code, details, answers)."""
        path = f"/{service}/{method.name}"
        out_cls = message_factory.GetMessageClass(method.output_type)
        kwargs = dict(request_serializer=lambda m: m.SerializeToString(),
                      response_deserializer=out_cls.FromString)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            if method.client_streaming and method.server_streaming:
                answers = list(self.channel.stream_stream(path, **kwargs)(
                    iter(requests), metadata=metadata, timeout=timeout))
            elif method.client_streaming:
                answers = [self.channel.stream_unary(path, **kwargs)(
                    iter(requests), metadata=metadata, timeout=timeout)]
            elif method.server_streaming:
                answers = list(self.channel.unary_stream(path, **kwargs)(
                    requests[0], metadata=metadata, timeout=timeout))
            else:
                answers = [self.channel.unary_unary(path, **kwargs)(
                    requests[0], metadata=metadata, timeout=timeout)]
            return grpc.StatusCode.OK, "", answers
        except grpc.RpcError as e:
            return e.code(), e.details(), []


def harmful(api, dataset_id):
    """For the RPCs that change something or do work: a request that does it when allowed
    (the right-role pass checks that it did), so a refusal that let it through would show
    in the state afterwards. Every other RPC gets an empty request."""
    infer = {"model_name": "demo-mlp", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 10],
         "contents": {"fp32_contents": [0.5] * 10}}]}
    job = {"spec": {"model_name": "intruder-job", "continue_from": "demo-mlp",
                    "dataset_id": dataset_id, "epochs": 1, "batch_size": 8}}
    # (Other bytes than the fixture's dataset, whose id comes from its content.)
    upload = CSV + "0,0,0,0,0,0,0,0,0,0,1\n"
    return {
        "ModelInfer": [infer],
        "ModelStreamInfer": [infer],
        "RepositoryModelUnload": [{"model_name": "demo-mlp"}],
        "CreateModel": [{"name": "intruder", "seed": "1", "spec": {"mlp": {
            "input_width": 4, "hidden": [4], "output_width": 1,
            "task": "TASK_BINARY_CLASSIFICATION"}}}],
        "SetAlias": [{"name": "demo-mlp", "alias": "hijacked", "version": "1"}],
        "ExportWeights": [{"name": "demo-mlp"}],
        "CreateToken": [{"name": "intruder", "role": "admin"}],
        "RevokeToken": [{"name": "trainer"}],
        "UploadDataset": [{"header": {"name": "intruder-data", "label_column": "label",
                                      "size_bytes": str(len(upload))}},
                          {"data": base64.b64encode(upload.encode()).decode()}],
        "DeleteDataset": [{"id": dataset_id}],
        "SubmitTrainingJob": [job],
    }


def state(cluster, triton):
    """What a refused call must not have changed."""
    stats = triton.get_inference_statistics("demo-mlp", as_json=True)["model_stats"][0]
    return {
        "models": cluster.kiln("models", "list"),
        "tokens": sorted(line.split()[0] for line in
                         cluster.kiln("tokens", "list").splitlines()[1:]),
        "datasets": cluster.kiln("datasets", "list"),
        "jobs": cluster.kiln("jobs", "list"),
        "inferences": int(stats.get("inference_count", 0)),
        "ready": triton.is_model_ready("demo-mlp"),
    }


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("kiln-auth"), workers=1).start()
    c.tokens = {"admin": c.token}
    for name, role in [("server", "infer"), ("trainer", "train"), ("gone", "admin")]:
        c.tokens[role if role != "admin" else name] = token_in(
            c.kiln("tokens", "create", "--name", name, "--role", role))
    c.kiln("tokens", "revoke", "gone")
    (c.data_dir / "d.csv").write_text(CSV)
    c.dataset = c.kiln("datasets", "upload", str(c.data_dir / "d.csv"),
                       "--label", "label").split()[1]
    wait_ready(c.triton(), "demo-mlp")
    yield c
    c.stop()


def test_every_public_rpc_checks_its_role_before_doing_anything(authed):
    api = Api(authed.addr)
    names = {(s, m.name) for s, m in api.methods}
    # The whole public API is here (reflection lists what the port serves).
    assert ("kiln.v1.Tokens", "CreateToken") in names and len(names) == 32, sorted(names)
    requests = harmful(api, authed.dataset)
    triton = authed.triton()
    before = state(authed, triton)
    refusals = set()
    for service, method in api.methods:
        needed = role_of(service, method.name)
        body = [api.message(method.input_type, r)
                for r in requests.get(method.name, [{}])]
        wrong = [authed.tokens[r] for r in ("infer", "train") if r != needed]
        cases = [(None, grpc.StatusCode.UNAUTHENTICATED),
                 ("kiln_" + "0" * 64, grpc.StatusCode.UNAUTHENTICATED),
                 (authed.tokens["gone"], grpc.StatusCode.UNAUTHENTICATED)]
        cases += [(t, grpc.StatusCode.PERMISSION_DENIED) for t in wrong]
        for token, expected in cases:
            code, details, _ = api.call(service, method, body, token)
            assert code == expected, (service, method.name, code, details)
            refusals.add(details)
    # Nothing a refused call asked for happened.
    assert state(authed, triton) == before
    # The refusals are a handful of fixed texts: none names a model or says whether one
    # exists; the role refusals name the token and the roles.
    assert all("demo-mlp" not in d and "intruder" not in d for d in refusals), refusals
    assert len(refusals) <= 2 + 4, refusals

    # The right role is served: every harmful request really does its harm when allowed.
    # (Revoking the train token comes last.)
    last = ["DeleteDataset", "RepositoryModelUnload", "RevokeToken"]
    order = sorted(api.methods, key=lambda sm: last.index(sm[1].name) + 1
                   if sm[1].name in last else 0)
    for service, method in order:
        needed = role_of(service, method.name)
        token = authed.tokens["admin"] if needed == "admin" else authed.tokens[needed]
        body = [api.message(method.input_type, r) for r in requests.get(method.name, [{}])]
        code, details, _ = api.call(service, method, body, token)
        assert code not in (grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.PERMISSION_DENIED), (method.name, details)
        if method.name in requests:
            assert code == grpc.StatusCode.OK, (method.name, code, details)
    after = state(authed, triton)
    assert "intruder" in after["models"] and "hijacked" in after["models"]
    assert "intruder" in after["tokens"] and "trainer" not in after["tokens"]
    assert "intruder-data" in after["datasets"] and authed.dataset not in after["datasets"]
    assert "intruder-job" in after["jobs"]
    assert after["inferences"] == before["inferences"] + 2


def test_a_refusal_is_the_same_whether_the_model_exists_or_not(authed):
    x = grpcclient.InferInput("input", [1, 10], "FP32")
    x.set_data_from_numpy(np.ones((1, 10), np.float32))
    texts = []
    train = token_in(authed.kiln("tokens", "create", "--name", "trainer-2", "--role", "train"))
    for model in ["demo-mlp", "no-such-model"]:
        for client in [grpcclient.InferenceServerClient(authed.addr), triton(authed.addr, train)]:
            with pytest.raises(grpcclient.InferenceServerException) as e:
                client.infer(model, [x])
            texts.append((e.value.status(), e.value.message()))
    # The same answers whether the model exists or not.
    assert texts[0] == texts[2] and texts[1] == texts[3], texts
    assert texts[0][0] == "StatusCode.UNAUTHENTICATED", texts
    assert texts[1][0] == "StatusCode.PERMISSION_DENIED", texts
    assert "needs role infer" in texts[1][1] and '"trainer-2"' in texts[1][1], texts


def test_tokens_are_stored_hashed_and_never_logged(authed):
    listing = authed.kiln("tokens", "list", "--json")
    log = (authed.data_dir / "kiln.log").read_text(errors="replace")
    state_file = (authed.data_dir / "state.redb").read_bytes()
    for name, secret in authed.tokens.items():
        assert secret not in listing
        assert secret.encode() not in state_file, "a token is stored in plaintext"
        # `kiln up` prints the admin token it made once, on its standard output; no token
        # is in any log line.
        assert log.count(secret) == (1 if name == "admin" else 0), name
    # The admin token's file is for its owner only.
    assert (authed.data_dir / "admin.token").stat().st_mode & 0o077 == 0


def test_token_management_refuses_bad_input_and_other_roles(authed):
    def kiln(*args, token=None):
        env = {**authed.env, "KILN_TOKEN": token or authed.token}
        return subprocess.run([KILN, *args, "--addr", authed.addr], capture_output=True,
                              text=True, timeout=60, env=env)

    out = kiln("tokens", "create", "--name", "x", "--role", "root")
    assert out.returncode != 0 and "infer, train, admin" in out.stderr, out.stderr
    out = kiln("tokens", "create", "--name", "../etc", "--role", "infer")
    assert out.returncode != 0 and "[A-Za-z0-9_.-]" in out.stderr, out.stderr
    out = kiln("tokens", "create", "--name", "admin", "--role", "infer")
    assert out.returncode != 0 and "already exists" in out.stderr, out.stderr
    out = kiln("tokens", "revoke", "nobody")
    assert out.returncode != 0 and "not found" in out.stderr, out.stderr
    out = kiln("tokens", "create", "--name", "y", "--role", "admin", token=authed.tokens["infer"])
    assert out.returncode != 0 and "PermissionDenied" in out.stderr, out.stderr
    out = kiln("models", "list", token="kiln_not_a_token")
    assert out.returncode != 0 and "Unauthenticated" in out.stderr, out.stderr
    assert "KILN_TOKEN" in out.stderr, "the CLI says where a token goes"


def test_kiln_up_keeps_its_admin_token_and_replaces_a_lost_one(tmp_path):
    c = Cluster(tmp_path, workers=1).start()
    first = c.token
    assert first and first.startswith("kiln_")
    c.stop()
    log = (tmp_path / "kiln.log").read_text()
    assert log.count(first) == 1, "the token is printed once, on the start that made it"
    c.start()
    assert c.token == first
    c.stop()
    (tmp_path / "admin.token").unlink()
    c.start()
    try:
        assert c.token != first
        names = c.kiln("tokens", "list")
        assert "admin-2" in names, names
        # The old token still works until an admin revokes it.
        listing = subprocess.run([KILN, "models", "list", "--addr", c.addr, "--token", first],
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
    finally:
        c.stop()


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")
def test_a_revoked_token_is_refused_by_every_gateway_within_a_second(tmp_path):
    m = Multi(tmp_path)
    try:
        a = m.start("gateway-a", "gateway")
        b = m.start("gateway-b", "gateway")
        out = subprocess.run([KILN, "tokens", "create", "--name", "svc", "--role", "infer",
                              "--addr", a], capture_output=True, text=True, timeout=60,
                             env=m.env)
        assert out.returncode == 0, out.stderr
        token = token_in(out.stdout)

        def models_list(addr):
            channel = grpc.insecure_channel(addr)
            api_call = channel.unary_unary("/kiln.v1.Models/ListModels",
                                           request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
            try:
                api_call(b"", metadata=[("authorization", f"Bearer {token}")], timeout=5)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()
            finally:
                channel.close()

        deadline = time.monotonic() + 5
        while models_list(b) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "gateway b never saw the new token"
            time.sleep(0.05)
        subprocess.run([KILN, "tokens", "revoke", "svc", "--addr", a], check=True,
                       capture_output=True, timeout=60, env=m.env)
        revoked = time.monotonic()
        while models_list(b) == grpc.StatusCode.OK:
            time.sleep(0.02)
        assert time.monotonic() - revoked < 1.0
        assert models_list(b) == grpc.StatusCode.UNAUTHENTICATED
        assert models_list(a) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        m.stop()
