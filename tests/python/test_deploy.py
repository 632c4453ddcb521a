"""The Kubernetes manifests of deploy/kubernetes, as `kubectl kustomize` renders each
overlay: valid against the Kubernetes API schemas, following the operating policy
(probes, resources, non-root, read-only root filesystem, disruption budgets, GPUs only for
GPU workers), and using only `kiln` subcommands, flags and KILN_* variables that exist in
the built binary. The autoscaling components: the KEDA ScaledObject valid against KEDA's
CRD schema, the worker HPA against Kubernetes', scale-down paced for drains, and both
queries evaluated by a real Prometheus over a real worker's metrics. The image:
deploy/Dockerfile's stages, user and runtime libraries."""

import copy
import json
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
    return render_dir(DEPLOY / "overlays" / overlay)


def render_dir(directory):
    out = subprocess.run([KUBECTL, "kustomize", str(directory)],
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


# Autoscaling: the components an overlay adds (deploy/kubernetes/components).

COMPONENTS = DEPLOY / "components"
# The prometheus trigger's parameters, as KEDA documents them (keda.sh/docs/scalers/prometheus);
# the CRD types trigger metadata as a map of strings, so its schema cannot catch a typo here.
PROMETHEUS_TRIGGER = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                      "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl",
                      "timeout", "authModes"}


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory):
    """The cpu overlay with both autoscaling components, rendered as an overlay of a user's
    would be (kustomize takes only relative paths to other kustomizations)."""
    where = tmp_path_factory.mktemp("autoscaled")
    up = os.path.relpath(DEPLOY, where)
    (where / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{up}/overlays/cpu"],
        "components": [f"{up}/components/keda", f"{up}/components/worker-hpa"]}))
    docs = render_dir(where)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    return by_kind


def unknown_fields(model, data, path=()):
    """The paths in `data` that `model` (pydantic, generated from a CRD's openAPIV3Schema)
    has no field for: the API server would refuse them under kubectl's strict field
    validation; pydantic alone ignores them."""
    import types
    import typing

    import pydantic

    origin, args = typing.get_origin(model), typing.get_args(model)
    if origin is typing.Annotated:
        return unknown_fields(args[0], data, path)
    if origin in (typing.Union, types.UnionType):
        options = [unknown_fields(a, data, path) for a in args if a is not type(None)]
        return min(options, key=len) if options else []
    if origin is list and isinstance(data, list):
        return [p for i, item in enumerate(data) for p in unknown_fields(args[0], item, path + (i,))]
    if origin is dict and isinstance(data, dict):
        return [p for k, v in data.items() for p in unknown_fields(args[1], v, path + (k,))]
    if isinstance(model, type) and issubclass(model, pydantic.RootModel):
        return unknown_fields(model.model_fields["root"].annotation, data, path)
    if isinstance(model, type) and issubclass(model, pydantic.BaseModel) and isinstance(data, dict):
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        return [p for k, v in data.items()
                for p in ([path + (k,)] if k not in fields
                          else unknown_fields(fields[k].annotation, v, path + (k,)))]
    return []


def validate_scaled_object(doc):
    """Validate against KEDA 2.16's ScaledObject schema (cloudcoil-models-keda), strictly."""
    from cloudcoil.models.keda import v1alpha1 as keda

    keda.ScaledObject.model_validate(doc)
    extra = unknown_fields(keda.ScaledObject, doc)
    assert not extra, f"fields KEDA's ScaledObject does not have: {extra}"


def test_the_scaled_object_validates_against_kedas_crd_schema(autoscaled):
    (so,) = autoscaled["ScaledObject"].values()
    validate_scaled_object(so)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) <= PROMETHEUS_TRIGGER, set(trigger["metadata"])
    assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
    float(trigger["metadata"]["threshold"])
    # Per worker: KEDA divides the query's value by the replicas running.
    assert trigger["metricType"] == "AverageValue"
    target = so["spec"]["scaleTargetRef"]
    assert target["name"] in autoscaled[target["kind"]], target
    assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]


def test_the_keda_schema_check_catches_mistakes(autoscaled):
    import pydantic

    (so,) = autoscaled["ScaledObject"].values()
    typo = copy.deepcopy(so)
    typo["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behaviour"] = typo["spec"][
        "advanced"]["horizontalPodAutoscalerConfig"].pop("behavior")
    with pytest.raises(AssertionError, match="behaviour"):
        validate_scaled_object(typo)
    wrong = copy.deepcopy(so)
    wrong["spec"]["maxReplicaCount"] = "ten"
    with pytest.raises(pydantic.ValidationError):
        validate_scaled_object(wrong)
    missing = copy.deepcopy(so)
    del missing["spec"]["scaleTargetRef"]["name"]
    with pytest.raises(pydantic.ValidationError):
        validate_scaled_object(missing)


def test_the_worker_hpa_validates_and_asks_for_the_adapters_metric(autoscaled):
    hpa = autoscaled["HorizontalPodAutoscaler"]["kiln-worker"]
    kubernetes_validate.validate(hpa, KUBERNETES, strict=True)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "AverageValue"
    rules = yaml.safe_load((COMPONENTS / "worker-hpa" / "prometheus-adapter-rules.yaml").read_text())
    served = {r["name"]["as"] for r in rules["externalRules"]}
    assert metric["external"]["metric"]["name"] in served
    target = hpa["spec"]["scaleTargetRef"]
    assert target["name"] in autoscaled[target["kind"]], target


def test_scaling_down_goes_one_drained_worker_at_a_time(autoscaled):
    """Work is not lost when the autoscaler removes workers: each one removed drains within
    its grace period, and the next goes only after the placement controller has had time to
    reload the versions it held elsewhere."""
    worker = autoscaled["StatefulSet"]["kiln-worker"]
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    (so,) = autoscaled["ScaledObject"].values()
    behaviors = [so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
                 autoscaled["HorizontalPodAutoscaler"]["kiln-worker"]["spec"]["behavior"]]
    for behavior in behaviors:
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 60, down
        assert down["selectPolicy"] == "Min", down
        for policy in down["policies"]:
            assert policy["type"] == "Pods" and policy["value"] == 1, policy
            assert policy["periodSeconds"] > grace, (policy, grace)
    assert so["spec"]["minReplicaCount"] >= 1  # never to zero: models stay loaded


PROMETHEUS = os.environ.get("KILN_PROMETHEUS", "/var/tmp/kiln-prometheus/prometheus")


@pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                    reason="no Prometheus binary (scripts/test.sh installs one: kiln_prometheus)")
def test_the_autoscaling_queries_follow_a_real_workers_queue(autoscaled, tmp_path):
    """Prometheus scrapes a worker (labelled as deploy/observability's scrape config labels
    a pod); the KEDA trigger's query and the prometheus-adapter rule's query, exactly as
    written, read 0 when idle and rise past the threshold while requests queue."""
    import threading
    import time
    import urllib.parse
    import urllib.request

    import numpy as np
    import tritonclient.grpc as grpcclient

    from conftest import Cluster, free_port

    c = Cluster(tmp_path / "kiln", workers=1)
    c.data_dir.mkdir()
    metrics = f"127.0.0.1:{free_port()}"
    c.extra = ["--metrics-addr", metrics]
    c.start()
    web = f"127.0.0.1:{free_port()}"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kiln", "static_configs": [{
            "targets": [metrics],
            "labels": {"namespace": "kiln", "pod": "kiln-worker-0", "component": "kiln-worker"},
        }]}]}))
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    stop = threading.Event()
    try:
        (so,) = autoscaled["ScaledObject"].values()
        trigger = so["spec"]["triggers"][0]["metadata"]
        keda_query, threshold = trigger["query"], float(trigger["threshold"])
        rule = yaml.safe_load((COMPONENTS / "worker-hpa" / "prometheus-adapter-rules.yaml")
                              .read_text())["externalRules"][0]
        series = rule["name"]["as"]

        def adapter_query(namespace):
            # What the adapter sends for an HPA in `namespace` (its template filled in).
            return (rule["metricsQuery"].replace("<<.Series>>", series)
                    .replace("<<.LabelMatchers>>", f'namespace="{namespace}"'))

        def query(q):
            url = f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            body = json.loads(urllib.request.urlopen(url, timeout=5).read())
            assert body["status"] == "success", body
            return [float(r["value"][1]) for r in body["data"]["result"]]

        def eventually(q, ok, what, timeout=30):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    values = query(q)
                except OSError:
                    values = None
                if values is not None and ok(values):
                    return values
                assert time.monotonic() < deadline, f"{what}: {q} gave {values}"
                time.sleep(0.5)

        # A model whose batches wait 300 ms to fill: every caller's request queues.
        (tmp_path / "m.json").write_text(json.dumps({"name": "m", "spec": {"mlp": {
            "input_width": 4, "hidden": [8], "output_width": 1, "task": "regression"}}}))
        c.kiln("models", "create", "--spec", str(tmp_path / "m.json"), "--seed", "1")
        c.kiln("models", "deploy", "m", "--max-batch-size", "64", "--max-queue-delay-us", "300000")
        client = c.triton()
        from conftest import wait_ready
        wait_ready(client, "m")
        client.unload_model("m")
        client.load_model("m")
        wait_ready(client, "m")

        # Idle: one sample, 0 (a series even with nothing queued, so that KEDA's
        # ignoreNullValues=false reads a broken scrape as a failure, not an empty queue).
        assert eventually(keda_query, lambda v: v == [0.0], "idle") == [0.0]
        assert query(adapter_query("kiln")) == [0.0]
        assert query(adapter_query("elsewhere")) == [], "the adapter's namespace matcher"

        def caller():
            x = grpcclient.InferInput("input", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            own = c.triton()
            while not stop.is_set():
                own.infer("m", [x], client_timeout=10)

        callers = [threading.Thread(target=caller, daemon=True) for _ in range(32)]
        for t in callers:
            t.start()
        # 32 callers, each request queued ~300 ms: about 32 queued on one worker, so the
        # per-worker value (KEDA and the HPA divide by the replicas, here 1) passes 8.
        (busy,) = eventually(keda_query, lambda v: v and v[0] > threshold, "under load")
        (adapter,) = eventually(adapter_query("kiln"), lambda v: v and v[0] > threshold,
                                "adapter under load")
        assert busy <= 32 and adapter <= 32, (busy, adapter)
        stop.set()
        for t in callers:
            t.join(timeout=15)
        # The queue empties as soon as the callers stop.
        eventually(series, lambda v: v == [0.0], "after the load", timeout=15)
    finally:
        stop.set()
        prometheus.terminate()
        prometheus.wait(timeout=30)
        c.stop()


# The image.

DOCKERFILE = DEPLOY.parent / "Dockerfile"


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=open(DOCKERFILE, "rb"))
    stages, current = [], None
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            current = {"from": instruction["value"], "steps": []}
            stages.append(current)
        elif current is not None:
            current["steps"].append((instruction["instruction"], instruction["value"]))
    return stages


def steps(stage, name):
    return [value for instruction, value in stage["steps"] if instruction == name]


def test_the_image_builds_the_release_binary_in_its_own_stage(dockerfile):
    build, runtime = dockerfile
    image, _, alias = build["from"].partition(" AS ")
    assert alias.strip() == "build"
    # The build stage's Rust is at least the workspace's floor.
    cargo = (DEPLOY.parents[1] / "Cargo.toml").read_text()
    floor = next(line.split('"')[1] for line in cargo.splitlines()
                 if line.startswith("rust-version"))
    version = image.split(":")[1].split("-")[0]
    assert tuple(map(int, version.split("."))) >= tuple(map(int, floor.split("."))), (image, floor)
    runs = " ".join(steps(build, "RUN"))
    assert "cargo build --release --locked --bin kiln" in runs
    # Only the binary crosses into the runtime stage.
    assert steps(runtime, "COPY") == ["--from=build /usr/local/bin/kiln /usr/local/bin/kiln"]


def test_the_runtime_image_runs_as_the_manifests_user_with_vulkan(dockerfile, rendered):
    _, runtime = dockerfile
    user = steps(runtime, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert int(uid) != 0 and int(gid) != 0, user
    # Numeric, so that runAsNonRoot can check it, and the user the pods run as.
    for docs in rendered.values():
        for d in (d for d in docs if d["kind"] in WORKLOADS):
            if any(c["image"].startswith("kiln") for c in containers(d)):
                assert d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    installs = " ".join(steps(runtime, "RUN"))
    for package in ("libvulkan1", "mesa-vulkan-drivers", "ca-certificates"):
        assert package in installs, package
    assert json.loads(steps(runtime, "ENTRYPOINT")[-1]) == ["kiln"]


def test_the_binary_needs_no_library_the_runtime_image_lacks():
    """The release binary links only what Debian slim has (libc, libm, libgcc_s); Vulkan is
    opened at run time (libvulkan1 in the image). A new linked library would build here and
    fail in the image."""
    out = subprocess.run(["readelf", "-d", KILN], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    needed = {line.split("[")[1].rstrip("]") for line in out.stdout.splitlines() if "NEEDED" in line}
    assert needed <= {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2",
                      "libdl.so.2", "libpthread.so.0", "librt.so.1"}, needed
