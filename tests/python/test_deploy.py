"""The Kubernetes manifests in deploy/ against the built binary: every `kiln` subcommand,
flag and KILN_* variable they use must exist, so the manifests cannot drift from the CLI."""

import pathlib
import subprocess

import yaml

from conftest import KILN

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents():
    for path in sorted(DEPLOY.glob("*.yaml")):
        yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def help_text(subcommand):
    out = subprocess.run([KILN, subcommand, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"`kiln {subcommand}` does not exist: {out.stderr}"
    return out.stdout


def test_every_flag_and_variable_the_manifests_use_exists():
    docs = list(documents())
    config = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    checked = 0
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            if not c["image"].startswith("kiln"):
                continue
            subcommand, *args = c["args"]
            text = help_text(subcommand)
            for flag in (a for a in args if a.startswith("--")):
                assert flag in text, f"{d['metadata']['name']}: kiln {subcommand} has no {flag}"
            names = [e["name"] for e in c.get("env", [])]
            for source in c.get("envFrom", []):
                names += list(config.get(source.get("configMapRef", {}).get("name"), {}))
            for name in (n for n in names if n.startswith("KILN_")):
                assert f"env: {name}=" in text, f"kiln {subcommand} does not read {name}"
            checked += 1
    assert checked == 3, "expected the scheduler, worker and gateway containers"
