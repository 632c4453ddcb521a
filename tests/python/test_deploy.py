"""The Kubernetes manifests of deploy/kubernetes, as `kubectl kustomize` renders each
overlay: valid against the Kubernetes API schemas, following the operating policy
(probes, resources, non-root, read-only root filesystem, disruption budgets, GPUs only for
GPU workers), and using only `kiln` subcommands, flags and KILN_* variables that exist in
the built binary."""

import copy
import os
import pathlib
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from conftest import KILN

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = ["dev", "cpu", "gpu", "gpu-cpu"]
# The Kubernetes version the manifests are written for (the preStop `sleep` action needs
# 1.30 or later).
KUBERNETES = "1.32.0"
KUBECTL = os.environ.get("KILN_KUBECTL", str(pathlib.Path(sys.executable).parent / "kubectl"))
WORKLOADS = ("Deployment", "StatefulSet")


def render(overlay):
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered():
    return {overlay: render(overlay) for overlay in OVERLAYS}


def containers(doc):
    return doc["spec"]["template"]["spec"]["containers"]


def test_every_overlay_renders_the_whole_cluster(rendered):
    for overlay, docs in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for wanted in [("StatefulSet", "kiln-etcd"), ("Deployment", "kiln-scheduler"),
                       ("StatefulSet", "kiln-worker"), ("Deployment", "kiln-gateway"),
                       ("Service", "kiln"), ("HorizontalPodAutoscaler", "kiln-gateway"),
                       ("ConfigMap", "kiln")]:
            assert wanted in kinds, (overlay, wanted)
    assert ("StatefulSet", "kiln-worker-gpu") in {
        (d["kind"], d["metadata"]["name"]) for d in rendered["gpu-cpu"]}
    dev = {d["metadata"]["name"]: d for d in rendered["dev"] if d["kind"] in WORKLOADS}
    assert all(d["spec"]["replicas"] == 1 for d in dev.values())


def test_every_object_validates_against_the_kubernetes_api_schemas(rendered):
    for overlay, docs in rendered.items():
        for d in docs:
            try:
                kubernetes_validate.validate(d, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {d['kind']}/{d['metadata']['name']}: {e.message} "
                            f"at {list(e.path)}")


def test_the_schema_check_catches_a_misspelt_field(rendered):
    gateway = next(d for d in rendered["cpu"] if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "kiln-gateway")
    typo = copy.deepcopy(gateway)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES, strict=True)


def test_every_workload_follows_the_operating_policy(rendered):
    for overlay, docs in rendered.items():
        budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
        for d in (d for d in docs if d["kind"] in WORKLOADS):
            name = f"{overlay}: {d['metadata']['name']}"
            pod = d["spec"]["template"]["spec"]
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            for c in containers(d):
                assert "readinessProbe" in c and "livenessProbe" in c, name
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, name
                assert sc["allowPrivilegeEscalation"] is False, name
                assert sc["capabilities"]["drop"] == ["ALL"], name
                if c["image"].startswith("kiln"):
                    # A grace period longer than the 30 s drain plus the preStop pause.
                    assert "preStop" in c["lifecycle"], name
                    assert pod["terminationGracePeriodSeconds"] > 30 + 5, name
            assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items()
                       for b in budgets), f"{name} has no PodDisruptionBudget"


def test_gpus_are_requested_by_gpu_workers_only(rendered):
    for overlay, docs in rendered.items():
        asking = set()
        for d in (d for d in docs if d["kind"] in WORKLOADS):
            for c in containers(d):
                gpus = {k for part in ("requests", "limits")
                        for k in c["resources"].get(part, {}) if k == "nvidia.com/gpu"}
                if gpus:
                    asking.add(d["metadata"]["name"])
                    assert "wgpu" in c["args"], (overlay, d["metadata"]["name"])
        expected = {"gpu": {"kiln-worker"}, "gpu-cpu": {"kiln-worker-gpu"}}.get(overlay, set())
        assert asking == expected, (overlay, asking)


def help_text(subcommand):
    out = subprocess.run([KILN, subcommand, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"`kiln {subcommand}` does not exist: {out.stderr}"
    return out.stdout


def test_every_flag_and_variable_the_manifests_use_exists(rendered):
    checked = set()
    for overlay, docs in rendered.items():
        config = {d["metadata"]["name"]: d.get("data", {}) for d in docs
                  if d["kind"] == "ConfigMap"}
        for d in (d for d in docs if d["kind"] in WORKLOADS):
            for c in containers(d):
                if not c["image"].startswith("kiln"):
                    continue
                subcommand, *args = c["args"]
                text = help_text(subcommand)
                for flag in (a for a in args if a.startswith("--")):
                    assert flag in text, f"{overlay}: kiln {subcommand} has no {flag}"
                names = [e["name"] for e in c.get("env", [])]
                for source in c.get("envFrom", []):
                    names += list(config.get(source.get("configMapRef", {}).get("name"), {}))
                for name in (n for n in names if n.startswith("KILN_")):
                    assert f"env: {name}=" in text, f"kiln {subcommand} does not read {name}"
                checked.add(subcommand)
    assert checked == {"scheduler", "worker", "gateway"}


@pytest.mark.skipif(__import__("shutil").which("etcd") is None, reason="etcd is not installed")
def test_the_process_graph_the_manifests_describe_serves_and_survives_its_leader(rendered,
                                                                                tmp_path):
    """The cpu overlay's workloads as local processes: each replica of the schedulers,
    workers and gateways runs the container's args with the ConfigMap as its environment
    (and its own HOSTNAME, as a pod has); etcd and the artifact store are local ones."""
    import json
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient

    from conftest import Multi, wait_ready

    docs = rendered["cpu"]
    config = next(d["data"] for d in docs if d["kind"] == "ConfigMap")
    local = {k: v for k, v in config.items()
             if k not in ("KILN_ETCD", "KILN_ARTIFACTS") and not k.startswith("OTEL_")}
    local["KILN_METRICS_ADDR"] = "127.0.0.1:0"
    local["HOME"] = local["XDG_CACHE_HOME"] = str(tmp_path)
    m = Multi(tmp_path)
    try:
        m.env.pop("KILN_LEASE_TTL_SECS")  # the ConfigMap's own
        order = ["kiln-scheduler", "kiln-worker", "kiln-gateway"]
        workloads = sorted((d for d in docs if d["kind"] in WORKLOADS
                            and d["metadata"]["name"] in order),
                           key=lambda d: order.index(d["metadata"]["name"]))
        gateways = []
        for d in workloads:
            (c,) = containers(d)
            args = list(c["args"])
            at = args.index("--listen")
            del args[at:at + 2]  # the test listens on loopback ports of its own
            env = {**local, **{e["name"]: e["value"] for e in c.get("env", [])
                               if "value" in e and "$(" not in e["value"]}}
            if "--device" in args:
                args[args.index("--device") + 1] = os.environ.get("KILN_TEST_DEVICE", "cpu")
            for i in range(d["spec"]["replicas"]):
                pod = f"{d['metadata']['name']}-{i}"
                addr = m.start(pod, *args, env={**env, "HOSTNAME": pod})
                if args[0] == "gateway":
                    gateways.append(addr)
        assert len(gateways) == 2
        (tmp_path / "m.json").write_text(json.dumps({"name": "m", "spec": {"mlp": {
            "input_width": 10, "hidden": [8], "output_width": 1, "task": "regression"}}}))
        m.gateway = gateways[0]
        m.kiln("models", "create", "--spec", str(tmp_path / "m.json"), "--seed", "1")
        x = grpcclient.InferInput("input", [2, 10], "FP32")
        x.set_data_from_numpy(np.ones((2, 10), np.float32))
        answers = []
        for g in gateways:
            client = m.triton(g)
            wait_ready(client, "m")
            answers.append(client.infer("m", [x]).as_numpy("output"))
        np.testing.assert_array_equal(answers[0], answers[1])

        # The leading scheduler goes; the other takes the lead and places a new version.
        leader = m.records("leader/scheduler")[0]["id"]
        assert leader in ("scheduler-kiln-scheduler-0", "scheduler-kiln-scheduler-1"), leader
        m.kill(leader.removeprefix("scheduler-"))
        deadline = time.monotonic() + 60
        while not any(r["id"] != leader for r in m.records("leader/scheduler")):
            assert time.monotonic() < deadline, "no scheduler took the lead"
            time.sleep(0.2)
        m.kiln("models", "create", "--spec", str(tmp_path / "m.json"), "--seed", "2")
        client = m.triton(gateways[1])
        deadline = time.monotonic() + 60
        while not client.is_model_ready("m", "2"):
            assert time.monotonic() < deadline, "the new leader never placed version 2"
            time.sleep(0.2)
        assert client.infer("m", [x], model_version="2").as_numpy("output").shape == (2, 1)
    finally:
        m.stop()
