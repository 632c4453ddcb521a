"""Fixtures that run a real `kiln up` (the built binary) on a free loopback port."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import pytest
import tritonclient.grpc as grpcclient

KILN = os.environ.get("KILN_BIN", "kiln")

# --- every error text the suites provoke, scanned for leaks at the end -------------------
#
# Kiln's error messages go to callers who must not learn its internals: no file path, no
# address, no source position or stack trace, no token. Every error a test meets — from
# tritonclient, from grpcio, from the kiln CLI — is collected here and scanned when the
# session ends (docs/reliability.md).

ERRORS = []
LEAKS = [
    ("a file path", re.compile(r"(?<![\w.:])/(?:tmp|var|home|root|work|usr|etc|proc|srv|opt)/")),
    ("a source position", re.compile(r"\.rs:\d+")),
    ("a socket address", re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}:\d+\b|\[[0-9a-fA-F:]+\]:\d+")),
    ("a stack trace", re.compile(r"panicked|stack backtrace|RUST_BACKTRACE")),
    ("a token", re.compile(r"kiln_[0-9a-f]{64}")),
    ("an artifact location", re.compile(r"file://|s3://")),
]
# Texts grpc-core makes on the client's side (about the address the client dialled).
CLIENT_SIDE = re.compile(r"failed to connect to all addresses|ipv4:|ipv6:|Socket closed|"
                         r"Connection reset|Deadline Exceeded|Cancelled$|cannot reach|"
                         r"is not a gRPC address")


SERVER_ERROR = re.compile(
    r"^error: (?:Cancelled|Unknown|InvalidArgument|DeadlineExceeded|NotFound|AlreadyExists|"
    r"PermissionDenied|ResourceExhausted|FailedPrecondition|Aborted|OutOfRange|"
    r"Unimplemented|Internal|Unavailable|DataLoss|Unauthenticated): (.*)")


def record_error(source, text):
    if text and not CLIENT_SIDE.search(str(text)):
        ERRORS.append((source, str(text)))


def _collect_errors():
    from tritonclient.utils import InferenceServerException
    import grpc._channel as channel

    init = InferenceServerException.__init__

    def exception_init(self, msg, status=None, debug_details=None):
        init(self, msg, status, debug_details)
        record_error("tritonclient", msg)

    InferenceServerException.__init__ = exception_init
    for cls in (channel._InactiveRpcError, channel._MultiThreadedRendezvous):
        original = cls.details

        def details(self, original=original):
            text = original(self)
            record_error("grpc", text)
            return text

        cls.details = details
    run = subprocess.run

    def recorded_run(args, *a, **kw):
        out = run(args, *a, **kw)
        if (isinstance(args, (list, tuple)) and args and str(args[0]) == KILN
                and args[1:2] != ["up"] and out.returncode != 0 and isinstance(out.stderr, str)):
            # The CLI prints a server's answer as `error: Code: the server's message`
            # (its own complaints, about files and addresses the user gave, otherwise).
            for line in out.stderr.splitlines():
                served = SERVER_ERROR.match(line)
                if served:
                    record_error("kiln CLI", served.group(1))
        return out

    subprocess.run = recorded_run


_collect_errors()


def pytest_sessionfinish(session, exitstatus):
    leaks = [(source, what, text) for source, text in ERRORS
             for what, pattern in LEAKS if pattern.search(text)]
    report = pathlib.Path(os.environ.get("KILN_ERROR_REPORT", "/tmp/kiln-test-errors.txt"))
    try:
        report.write_text("".join(f"{s}\t{t}\n" for s, t in ERRORS))
    except OSError:
        pass
    print(f"\nerror texts scanned for internal details: {len(ERRORS)} "
          f"(all of them in {report})")
    if leaks:
        for source, what, text in leaks:
            print(f"LEAK ({what}) from {source}: {text}")
        session.exitstatus = 1
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


def long_training_job(dir, rows, batch_size, epochs):
    """Files for a job that trains 10→512→512→1 (model `h`) on `rows` random rows for
    minutes: `dir/h.json` (the model's spec) and `dir/job.json`. Serving-while-training
    tests and bench/train-serve share it."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 10)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.float32)
    np.save(dir / "x.npy", x)
    np.save(dir / "y.npy", y)
    (dir / "h.json").write_text(json.dumps({"name": "h", "spec": {"mlp": {
        "input_width": 10, "hidden": [512, 512], "output_width": 1,
        "task": "binary_classification"}}}))
    (dir / "job.json").write_text(json.dumps({
        "model_name": "h", "epochs": epochs, "batch_size": batch_size,
        "data": {"npy": {"features": str(dir / "x.npy"), "labels": str(dir / "y.npy")}}}))
