"""Triton's Performance Analyzer against `kiln up`, unchanged: it reads ServerMetadata,
ModelMetadata and ModelConfig, drives ModelInfer over gRPC, reads ModelStatistics for its
server-side breakdown, and reports throughput and latency.

The binary ships inside the tritonclient 2.51.0 wheel; scripts/test.sh installs it in a
virtualenv of its own and names it in KILN_PERF_ANALYZER.
"""

import csv
import os
import subprocess

import pytest

from conftest import Cluster, wait_ready

PERF_ANALYZER = os.environ.get("KILN_PERF_ANALYZER", "")


def run_perf_analyzer(addr, tmp_path, *args):
    assert PERF_ANALYZER and os.access(PERF_ANALYZER, os.X_OK), (
        "KILN_PERF_ANALYZER must name perf_analyzer (scripts/test.sh installs it)")
    report = tmp_path / "report.csv"
    out = subprocess.run(
        [PERF_ANALYZER, "-m", "demo-mlp", "-u", addr, "-i", "grpc",
         "--measurement-mode", "count_windows", "--measurement-request-count", "200",
         "--max-trials", "5", "--stability-percentage", "999", "-f", str(report), *args],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(report) as f:
        rows = list(csv.DictReader(f))
    return out.stdout, rows


@pytest.fixture(scope="module")
def open_cluster(tmp_path_factory):
    """perf_analyzer's gRPC client sends no custom headers (its -H is for HTTP only), so it
    meets Kiln as on a trusted network: `--auth off`, which `kiln up` announces loudly."""
    c = Cluster(tmp_path_factory.mktemp("kiln-open"))
    c.extra = ["--auth", "off"]
    c.start()
    yield c
    c.stop()


def test_perf_analyzer_reports_throughput_and_latency(open_cluster, tmp_path):
    cluster = open_cluster
    assert cluster.token is None and not (cluster.data_dir / "admin.token").exists()
    log = (cluster.data_dir / "kiln.log").read_text()
    assert "AUTHENTICATION IS OFF" in log and "authentication: OFF" in log, log[-2000:]
    client = cluster.triton()
    wait_ready(client, "demo-mlp")
    before = client.get_inference_statistics("demo-mlp", as_json=True)
    stdout, rows = run_perf_analyzer(cluster.addr, tmp_path, "-b", "4",
                                     "--concurrency-range", "2")
    assert "Throughput:" in stdout, stdout
    assert len(rows) == 1, rows
    row = rows[0]
    assert float(row["Inferences/Second"]) > 0, row
    assert float(row["p99 latency"]) >= float(row["p50 latency"]) > 0, row
    # Its server-side columns come from ModelStatistics: they must be filled in.
    assert float(row["Server Queue"]) >= 0 and float(row["Server Compute Infer"]) > 0, row
    after = client.get_inference_statistics("demo-mlp", as_json=True)
    # (JSON leaves out zero fields.)
    count = lambda s: int(s["model_stats"][0].get("inference_count", 0))  # noqa: E731
    # Every inference perf_analyzer made was counted by the server: 4 rows per request.
    served = count(after) - count(before)
    assert served >= 4 * 200 and served % 4 == 0, (count(before), count(after))
