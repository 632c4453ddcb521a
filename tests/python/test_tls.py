"""TLS and mutual TLS: tritonclient and the CLI reach a TLS gateway with its CA and not
without it; a certificate replaced on disk is served without a restart; a cluster whose
etcd and listeners require client certificates serves inference end to end, and a worker
without a certificate cannot join it."""

import os
import shutil
import signal
import ssl
import subprocess
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from certs import Ca, fingerprint
from conftest import KILN, Bearer, Cluster, free_port, token_in, wait_ready

DEVICE = os.environ.get("KILN_TEST_DEVICE", "cpu")


def served_fingerprint(addr):
    host, port = addr.rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port)), timeout=5)
    from cryptography import x509
    return fingerprint(x509.load_pem_x509_certificate(pem.encode()))


def tls_client(addr, ca, token, cert=None):
    client = grpcclient.InferenceServerClient(
        addr, ssl=True, root_certificates=str(ca),
        private_key=str(cert[1]) if cert else None,
        certificate_chain=str(cert[0]) if cert else None)
    client.register_plugin(Bearer(token))
    return client


def infer_ones(client, model="demo-mlp"):
    x = grpcclient.InferInput("input", [1, 10], "FP32")
    x.set_data_from_numpy(np.ones((1, 10), np.float32))
    return client.infer(model, [x], client_timeout=20).as_numpy("output")


@pytest.fixture(scope="module")
def tls_up(tmp_path_factory):
    dir = tmp_path_factory.mktemp("kiln-tls")
    ca = Ca(dir / "pki")
    cert, key, issued = ca.issue("gateway")
    c = Cluster(dir / "data", workers=1)
    c.data_dir.mkdir()
    c.extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
    c.start()
    c.ca, c.cert, c.key, c.issued = ca, cert, key, issued
    yield c
    c.stop()


def test_tritonclient_and_the_cli_reach_a_tls_gateway_with_its_ca(tls_up):
    client = tls_client(tls_up.addr, tls_up.ca.path, tls_up.token)
    wait_ready(client, "demo-mlp")
    assert infer_ones(client).shape == (1, 1)
    out = subprocess.run([KILN, "models", "list", "--addr", tls_up.addr,
                          "--tls-ca", str(tls_up.ca.path)],
                         capture_output=True, text=True, timeout=60, env=tls_up.env)
    assert out.returncode == 0 and "demo-mlp" in out.stdout, out.stderr


def test_without_the_ca_the_handshake_fails(tls_up, tmp_path):
    # Plaintext at a TLS port: refused.
    plain = grpcclient.InferenceServerClient(tls_up.addr)
    plain.register_plugin(Bearer(tls_up.token))
    with pytest.raises(InferenceServerException) as e:
        plain.is_server_live(client_timeout=5)
    assert "UNAVAILABLE" in e.value.status() or "UNAVAILABLE" in str(e.value), e.value
    # TLS trusting another CA: the certificate is not accepted.
    other = Ca(tmp_path / "other", name="Other CA")
    with pytest.raises(InferenceServerException):
        tls_client(tls_up.addr, other.path, tls_up.token).is_server_live(client_timeout=5)
    # The CLI says what to do.
    out = subprocess.run([KILN, "models", "list", "--addr", tls_up.addr],
                         capture_output=True, text=True, timeout=60, env=tls_up.env)
    assert out.returncode != 0 and "--tls-ca" in out.stderr, out.stderr


def test_a_certificate_replaced_on_disk_is_served_without_a_restart(tls_up):
    before = served_fingerprint(tls_up.addr)
    assert before == fingerprint(tls_up.issued)
    client = tls_client(tls_up.addr, tls_up.ca.path, tls_up.token)
    # Renewal as cert-manager does it: new files in place.
    _, _, renewed = tls_up.ca.issue("gateway", cert_path=tls_up.cert, key_path=tls_up.key)
    deadline = time.monotonic() + 10
    while served_fingerprint(tls_up.addr) != fingerprint(renewed):
        assert time.monotonic() < deadline, "the renewed certificate was never served"
        time.sleep(0.2)
    # Same process, new certificate, clients carry on.
    assert tls_up.proc.poll() is None
    assert infer_ones(client).shape == (1, 1)
    assert infer_ones(tls_client(tls_up.addr, tls_up.ca.path, tls_up.token)).shape == (1, 1)
    # A broken renewal keeps the last good certificate.
    tls_up.cert.write_text("not a certificate")
    time.sleep(2.5)
    assert served_fingerprint(tls_up.addr) == fingerprint(renewed)
    log = (tls_up.data_dir / "kiln.log").read_text()
    assert "TLS certificate reloaded" in log and "do not load" in log


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")
def test_a_mutual_tls_cluster_serves_and_refuses_peers_without_a_certificate(tmp_path):
    ca = Ca(tmp_path / "pki")
    issued = {name: ca.issue(name)[:2] for name in
              ["etcd", "admin", "scheduler", "w0", "gateway"]}
    port, peer = free_port(), free_port()
    etcd_url = f"https://127.0.0.1:{port}"
    procs = {}
    procs["etcd"] = subprocess.Popen(
        ["etcd", "--name", "t", "--data-dir", str(tmp_path / "etcd"),
         "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"t=http://127.0.0.1:{peer}",
         "--cert-file", str(issued["etcd"][0]), "--key-file", str(issued["etcd"][1]),
         "--trusted-ca-file", str(ca.path), "--client-cert-auth"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "etcd.log", "wb"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    base.update({"KILN_ETCD": etcd_url, "KILN_ETCD_CA": str(ca.path),
                 "KILN_ARTIFACTS": f"file://{tmp_path / 'artifacts'}",
                 "KILN_LEASE_TTL_SECS": "3", "KILN_TLS_CA": str(ca.path)})

    def env_of(name):
        cert, key = issued[name]
        return {**base, "KILN_ETCD_CERT": str(cert), "KILN_ETCD_KEY": str(key),
                "KILN_TLS_CERT": str(cert), "KILN_TLS_KEY": str(key)}

    def start(name, identity, *args, env=None):
        addr_file = tmp_path / f"{name}.addr"
        procs[name] = subprocess.Popen(
            [KILN, *args, "--listen", "127.0.0.1:0", "--addr-file", str(addr_file)],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"),
            env=env or env_of(identity))
        deadline = time.monotonic() + 60
        while not addr_file.exists() or not addr_file.read_text():
            assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return addr_file.read_text().strip()

    try:
        # The first admin token, straight in etcd with a client certificate.
        deadline = time.monotonic() + 30
        while True:
            out = subprocess.run([KILN, "tokens", "create", "--name", "admin", "--role",
                                  "admin", "--etcd", etcd_url], capture_output=True,
                                 text=True, timeout=60, env=env_of("admin"))
            if out.returncode == 0:
                break
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.2)
        token = token_in(out.stdout)
        # Every listener asks for a client certificate from the CA, but the gateway's
        # public one (its clients hold tokens, not certificates).
        mtls = ["--tls-client-ca", str(ca.path)]
        start("scheduler", "scheduler", "scheduler", "--id", "s1", *mtls)
        worker = start("w0", "w0", "worker", "--id", "w0", "--device", DEVICE, *mtls)
        gateway = start("gateway", "gateway", "gateway")
        cli = {**env_of("admin"), "KILN_TOKEN": token}
        (tmp_path / "m.json").write_text('{"name": "m", "spec": {"mlp": {"input_width": 10, '
                                         '"hidden": [8], "output_width": 1, '
                                         '"task": "binary_classification"}}}')
        for args in (["models", "create", "--spec", str(tmp_path / "m.json"), "--seed", "3"],
                     ["models", "deploy", "m", "--replicas", "1"]):
            out = subprocess.run([KILN, *args, "--addr", gateway], capture_output=True,
                                 text=True, timeout=60, env=cli)
            assert out.returncode == 0, out.stderr
        client = tls_client(gateway, ca.path, token)
        wait_ready(client, "m")
        # Gateway → worker over mutual TLS: the answer is the model's.
        assert infer_ones(client, "m").shape == (1, 1)

        # The worker's port refuses a caller without a client certificate, and answers one
        # with a certificate from the CA.
        def health(cert):
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca.path.read_bytes(),
                private_key=cert[1].read_bytes() if cert else None,
                certificate_chain=cert[0].read_bytes() if cert else None)
            with grpc.secure_channel(worker, creds) as channel:
                call = channel.unary_unary("/grpc.health.v1.Health/Check",
                                           request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
                try:
                    call(b"", timeout=5)
                    return "ok"
                except grpc.RpcError as e:
                    return e.code()
        assert health(issued["admin"]) == "ok"
        assert health(None) == grpc.StatusCode.UNAVAILABLE

        # A worker without a certificate cannot join: etcd refuses it, it registers nothing.
        no_cert = {**base}
        out = subprocess.run([KILN, "worker", "--id", "intruder", "--device", DEVICE,
                              "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                             timeout=60, env=no_cert)
        assert out.returncode != 0 and "etcd" in out.stderr, out.stderr
        status = subprocess.run([KILN, "status", "--json", "--addr", gateway],
                                capture_output=True, text=True, timeout=60, env=cli)
        assert status.returncode == 0, status.stderr
        assert "intruder" not in status.stdout and '"w0"' in status.stdout, status.stdout
    finally:
        for name in reversed(list(procs)):
            procs[name].send_signal(signal.SIGTERM if name != "etcd" else signal.SIGKILL)
            procs[name].wait(timeout=60)
