"""Fixtures that run a real `kiln up` (the built binary) on a free loopback port."""

import os
import pathlib
import signal
import subprocess
import time

import pytest

KILN = os.environ.get("KILN_BIN", "kiln")


class Cluster:
    """One `kiln up` process and how to reach it."""

    def __init__(self, data_dir: pathlib.Path, workers: int = 2):
        self.data_dir = data_dir
        self.workers = workers
        self.proc = None
        self.addr = None

    def start(self):
        addr_file = self.data_dir / "addr"
        if addr_file.exists():
            addr_file.unlink()
        log = open(self.data_dir / "kiln.log", "ab")
        self.proc = subprocess.Popen(
            [KILN, "up", "--grpc-addr", "127.0.0.1:0", "--workers", str(self.workers),
             "--data-dir", str(self.data_dir), "--device", os.environ.get("KILN_TEST_DEVICE", "cpu"),
             "--addr-file", str(addr_file)],
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
        return self

    def stop(self):
        """Stop with SIGTERM, as an orchestrator would; the exit must be clean."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        assert code == 0, f"kiln up exited with {code} on SIGTERM"

    def kiln(self, *args):
        """Run a client command against this cluster and return its stdout."""
        out = subprocess.run([KILN, *args, "--addr", self.addr], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout


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
