"""Fixtures that run a real `kiln up` (the built binary) on a free loopback port."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import pytest
import tritonclient.grpc as grpcclient

KILN = os.environ.get("KILN_BIN", "kiln")
TTL = 3  # seconds: lease TTL of workers and of the scheduler's lead in cluster tests
PREFIX = "/kiln/v1/"


class Bearer:
    """A tritonclient plugin that sends a Kiln token with every call."""

    def __init__(self, token):
        self.token = token

    def __call__(self, request):
        request.headers["authorization"] = f"Bearer {self.token}"


def triton(addr, token, **kwargs):
    """tritonclient's gRPC client, sending `token` (None: no token) with every call."""
    client = grpcclient.InferenceServerClient(addr, **kwargs)
    if token:
        client.register_plugin(Bearer(token))
    return client


class Cluster:
    """One `kiln up` process and how to reach it."""

    def __init__(self, data_dir: pathlib.Path, workers: int = 2):
        self.data_dir = data_dir
        self.workers = workers
        self.proc = None
        self.addr = None
        self.token = None  # the admin token `kiln up` wrote (None with --auth off)
        self.extra = []  # more `kiln up` flags

    @property
    def env(self):
        """The environment of CLI commands against this cluster (its admin token)."""
        env = {k: v for k, v in os.environ.items() if k != "KILN_TOKEN"}
        return {**env, "KILN_TOKEN": self.token} if self.token else env

    def triton(self, **kwargs):
        """A tritonclient client of this cluster with its admin token."""
        return triton(self.addr, self.token, **kwargs)

    def start(self):
        addr_file = self.data_dir / "addr"
        if addr_file.exists():
            addr_file.unlink()
        log = open(self.data_dir / "kiln.log", "ab")
        self.proc = subprocess.Popen(
            [KILN, "up", "--grpc-addr", "127.0.0.1:0", "--workers", str(self.workers),
             "--data-dir", str(self.data_dir), "--device", os.environ.get("KILN_TEST_DEVICE", "cpu"),
             "--addr-file", str(addr_file), *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not addr_file.exists() or not addr_file.read_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln up exited early; see {self.data_dir / 'kiln.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError("kiln up did not start within 60 s")
            time.sleep(0.05)
        self.addr = addr_file.read_text().strip()
        token_file = self.data_dir / "admin.token"
        self.token = token_file.read_text().strip() if token_file.exists() else None
        return self

    def stop(self):
        """Stop with SIGTERM, as an orchestrator would; the exit must be clean."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        assert code == 0, f"kiln up exited with {code} on SIGTERM"

    def kiln(self, *args):
        """Run a client command against this cluster and return its stdout."""
        out = subprocess.run([KILN, *args, "--addr", self.addr], capture_output=True, text=True,
                             timeout=60, env=self.env)
        assert out.returncode == 0, out.stderr
        return out.stdout


def token_in(text):
    """The token `kiln tokens create` printed."""
    return next(w for w in text.split() if w.startswith("kiln_"))


def wait_ready(client, model, timeout=60):
    deadline = time.monotonic() + timeout
    while not client.is_model_ready(model):
        assert time.monotonic() < deadline, f"{model} never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("kiln")).start()
    yield c
    c.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Multi:
    """etcd and Kiln processes; every process logs to its own file in `dir`."""

    def __init__(self, dir, env=None):
        self.dir = dir
        self.procs = {}
        port, peer = free_port(), free_port()
        self.etcd = f"http://127.0.0.1:{port}"
        self.procs["etcd"] = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(dir / "etcd"),
             "--listen-client-urls", self.etcd, "--advertise-client-urls", self.etcd,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"t=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=open(dir / "etcd.log", "wb"))
        deadline = time.monotonic() + 20
        while self.etcdctl("endpoint", "health", check=False).returncode != 0:
            assert time.monotonic() < deadline, "etcd did not start"
            time.sleep(0.1)
        self.env = {**os.environ, "KILN_ETCD": self.etcd,
                    "KILN_ARTIFACTS": f"file://{dir / 'artifacts'}",
                    "KILN_LEASE_TTL_SECS": str(TTL), **(env or {})}
        # The cluster's first admin token, made straight in etcd as an operator would.
        out = subprocess.run([KILN, "tokens", "create", "--name", "admin", "--role", "admin",
                              "--etcd", self.etcd], capture_output=True, text=True, timeout=60,
                             env=self.env)
        assert out.returncode == 0, out.stderr
        self.token = token_in(out.stdout)
        self.env["KILN_TOKEN"] = self.token

    def triton(self, addr=None, **kwargs):
        """A tritonclient client of the gateway (or `addr`) with the admin token."""
        return triton(addr or self.gateway, self.token, **kwargs)

    def etcdctl(self, *args, check=True):
        out = subprocess.run(["etcdctl", "--endpoints", self.etcd, *args],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "ETCDCTL_API": "3"})
        if check:
            assert out.returncode == 0, out.stderr
        return out

    def start(self, name, *args, env=None):
        """Start `kiln ARGS…` on a free port (with `env` over the cluster's environment);
        returns its bound address."""
        addr_file = self.dir / f"{name}.addr"
        if addr_file.exists():
            addr_file.unlink()
        self.procs[name] = subprocess.Popen(
            [KILN, *args, "--listen", "127.0.0.1:0", "--addr-file", str(addr_file)],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{name}.log", "ab"),
            env={**self.env, **(env or {})})
        deadline = time.monotonic() + 60
        while not addr_file.exists() or not addr_file.read_text():
            assert self.procs[name].poll() is None, f"{name} exited; see {self.dir / (name + '.log')}"
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.05)
        return addr_file.read_text().strip()

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs.pop(name)
        p.send_signal(sig)
        return p.wait(timeout=60)

    def records(self, what):
        """Every record under PREFIX + what, decoded."""
        out = self.etcdctl("get", "--prefix", PREFIX + what, "--print-value-only").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def kiln(self, *args):
        out = subprocess.run([KILN, *args, "--addr", self.gateway], capture_output=True,
                             text=True, timeout=120, env=self.env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def stop(self):
        for name in reversed([n for n in self.procs if n != "etcd"]):
            self.kill(name, signal.SIGTERM)
        self.kill("etcd")


def ready_holders(multi, model, version):
    """Workers whose record says they serve model:version."""
    return sorted(w["id"] for w in multi.records("workers/")
                  if any(l["key"] == {"model": model, "version": version} and l["state"] == "READY"
                         for l in w.get("loaded", [])))
