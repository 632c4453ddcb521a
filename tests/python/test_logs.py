"""Logs: human-readable by default, one JSON object a line with `--log-format json`."""

import json
import os
import re
import signal
import subprocess
import time

from conftest import KILN
from otlp import Receiver


def run_up(tmp_path, *flags, env=None):
    addr_file = tmp_path / "addr"
    err = open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen(
        [KILN, "up", "--grpc-addr", "127.0.0.1:0", "--workers", "1", "--device",
         os.environ.get("KILN_TEST_DEVICE", "cpu"), "--data-dir", str(tmp_path / "data"),
         "--addr-file", str(addr_file), *flags],
        stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while not addr_file.exists() or not addr_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "kiln up did not start"
        time.sleep(0.05)
    # The demo model is loaded once the worker logged it.
    while b"model loaded" not in (tmp_path / "stderr").read_bytes():
        assert time.monotonic() < deadline, (tmp_path / "stderr").read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    return (tmp_path / "stderr").read_text().splitlines()


def test_json_logs_are_one_object_a_line_with_level_target_and_fields(tmp_path):
    lines = run_up(tmp_path, "--log-format", "json")
    # Graphics drivers (Mesa, under --device wgpu:cpu) write their own lines to the same
    # stderr; none of Kiln's may escape the JSON format.
    ours = [line for line in lines if line.startswith("{") or "kiln" in line]
    records = [json.loads(line) for line in ours]  # each is one whole JSON object
    assert records, "no log lines"
    for r in records:
        assert r["level"] in ("TRACE", "DEBUG", "INFO", "WARN", "ERROR"), r
        assert r["target"] and r["timestamp"], r
    loaded = [r for r in records if r["fields"].get("message") == "model loaded"]
    assert loaded and loaded[0]["fields"]["version"] == "demo-mlp:1", records


def test_text_logs_are_for_people(tmp_path):
    lines = run_up(tmp_path)
    assert any("model loaded" in line and "demo-mlp:1" in line for line in lines), lines
    assert not any(line.startswith("{") for line in lines), lines
    # Written to a file, not a terminal: no colour codes, in the line or its span fields.
    assert not any("\x1b[" in line for line in lines), lines


def test_text_lines_inside_a_traced_span_end_with_its_ids(tmp_path):
    receiver = Receiver()
    try:
        lines = run_up(tmp_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    finally:
        receiver.stop()
    (loaded,) = [line for line in lines if "model loaded" in line]
    ids = re.search(r" trace_id=([0-9a-f]{32}) span_id=([0-9a-f]{16})$", loaded)
    assert ids, loaded
    # The process flushed its spans on the way out: the line's span is among them.
    (span,) = [s for s in receiver.spans if s.span_id == ids.group(2)]
    assert (span.name, span.trace_id) == ("model load", ids.group(1))
