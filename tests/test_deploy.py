"""deploy/ checked offline by the real tools: docker-compose, hadolint, kubernetes-validate, shellcheck."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from test_cli import assert_one_line_error
from test_simulate import run_cli

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / name, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_the_compose_file_runs_a_broker_a_server_an_executor_and_agents_that_use_them() -> None:
    done = tool("docker-compose", "-f", DEPLOY / "compose.yaml", "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert {"mosquitto", "server", "executor", "agent-1", "agent-2"} <= set(services)
    assert "--mqtt=mosquitto:8883" in services["server"]["command"]
    assert "--server=https://server:8443" in services["executor"]["command"]
    for agent in ("agent-1", "agent-2"):
        assert services[agent]["environment"]["FEDGE_BROKER"] == "mosquitto:8883"
        # Each agent's own volume holds what `enroll` wrote: no credentials come from the host.
        assert [v["target"] for v in services[agent]["volumes"]] == ["/data/data.npz", "/var/lib/fedge-agent"]


def test_each_image_the_build_script_makes_has_a_dockerfile_and_the_script_passes_shellcheck() -> None:
    for script in (DEPLOY / "images.sh", DEPLOY / "docker" / "broker-entrypoint.sh"):
        done = tool("shellcheck", script)
        assert done.returncode == 0, done.stdout
    script = (DEPLOY / "images.sh").read_text()
    for image in ("server", "agent", "executor", "broker"):
        assert (DEPLOY / "docker" / f"{image}.Dockerfile").exists()
        assert image in script
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["mosquitto"]["image"].startswith("fedge/broker:")


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")), ids=lambda p: p.stem)
def test_each_dockerfile_passes_hadolint_and_takes_its_base_image_as_an_argument(dockerfile: Path) -> None:
    done = tool("hadolint", dockerfile)
    assert done.returncode == 0, done.stdout
    assert "ARG BASE=" in dockerfile.read_text()


def test_the_kubernetes_manifests_validate_strictly() -> None:
    manifests = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    done = tool("kubernetes-validate", "--strict", *manifests)
    assert done.returncode == 0, done.stdout + done.stderr
    resources = sum(len([d for d in yaml.safe_load_all(m.read_text()) if d]) for m in manifests)
    assert done.stdout.count("passed") == resources


def test_the_knative_pod_spec_validates_strictly_and_serves_one_invocation_at_a_time(tmp_path: Path) -> None:
    service = yaml.safe_load((DEPLOY / "knative" / "service.yaml").read_text())
    assert service["apiVersion"] == "serving.knative.dev/v1"
    spec = dict(service["spec"]["template"]["spec"])
    assert spec.pop("containerConcurrency") == 1
    spec.pop("timeoutSeconds")
    spec["containers"] = [{"name": "function", **c} for c in spec["containers"]]
    pod = tmp_path / "pod.yaml"  # Knative's pod spec is Kubernetes' own, less a few fields
    pod.write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "f"}, "spec": spec})
    )
    done = tool("kubernetes-validate", "--strict", pod)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_openfaas_function_runs_the_image_knative_runs_with_the_watchdog_upstream() -> None:
    stack = yaml.safe_load((DEPLOY / "openfaas" / "stack.yml").read_text())
    assert stack["provider"]["name"] == "openfaas"
    (function,) = stack["functions"].values()
    knative = yaml.safe_load((DEPLOY / "knative" / "service.yaml").read_text())
    assert function["image"] == knative["spec"]["template"]["spec"]["containers"][0]["image"]
    dockerfile = (DEPLOY / "docker" / "function.Dockerfile").read_text()
    assert f"upstream_url={function['environment']['upstream_url']}" in dockerfile


def test_the_install_script_passes_shellcheck_and_installs_what_the_unit_runs() -> None:
    done = tool("shellcheck", DEPLOY / "install.sh")
    assert done.returncode == 0, done.stdout
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "fedge-agent.service")
    assert unit["Service"]["ExecStart"].startswith("/opt/fedge/venv/bin/fedge agent run")
    assert unit["Service"]["KillMode"] == "mixed"
    assert 'prefix="${root}/opt/fedge"' in (DEPLOY / "install.sh").read_text()


def test_broker_config_for_a_container_names_only_paths_inside_it(tmp_path: Path, pki_dir: Path) -> None:
    out = tmp_path / "broker"
    done = run_cli(
        "broker", "config", "--pki", str(pki_dir), "--out", str(out), "--host", "mosquitto",
        "--mount", "/mosquitto/config", "--persistence", "/mosquitto/data",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths = [line.split()[1] for line in (out / "mosquitto.conf").read_text().splitlines() if "/" in line]
    assert paths
    assert all(p.startswith("/mosquitto/") for p in paths)


def test_a_server_that_cannot_read_its_key_says_which_file_and_uid_in_one_line(
    tmp_path: Path, pki_dir: Path
) -> None:
    """The non-root container over root-owned 0600 keys: one line, a non-zero exit, no traceback loop."""
    shared = Path(tempfile.mkdtemp(prefix="fedge-keys-"))  # a uid that is not ours must reach it
    try:
        shared.chmod(0o755)
        pki_copy = shared / "pki"
        shutil.copytree(pki_dir, pki_copy)
        for path in [pki_copy, *pki_copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        key = pki_copy / "server" / "server.key"
        key.chmod(0o600 if os.geteuid() == 0 else 0o000)
        as_other = (
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if os.geteuid() == 0 else []
        )
        done = subprocess.run(
            [*as_other, sys.executable, "-m", "fedge", "server", "--pki", str(pki_copy), "--data",
             str(shared / "data"), "--port", "0"],
            capture_output=True, text=True, timeout=120, cwd=shared,
        )  # fmt: skip
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        assert_one_line_error(done, f"cannot read {key} as uid {uid}")
        assert len(done.stderr.strip().splitlines()) <= 2
    finally:
        shutil.rmtree(shared)


def test_the_kubernetes_server_gets_the_whole_pki_in_its_writable_state_volume() -> None:
    """Clients', admins' certificates and the CRL too (else every client is an unknown certificate), and
    writable, where enrollment signs and spends tokens: the secret seeds the volume the server runs on."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "server.yaml").read_text()) if d]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (seed,) = pod["initContainers"]
    (server,) = pod["containers"]
    pki_arg = next(a for a in server["args"] if a.startswith("--pki="))
    state = next(m for m in server["volumeMounts"] if m["name"] == "state")
    assert pki_arg.removeprefix("--pki=").startswith(state["mountPath"] + "/")
    assert not state.get("readOnly")
    assert "tar -C " + pki_arg.removeprefix("--pki=") in seed["command"][-1]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "seed"]
    assert volume["secret"]["items"] == [{"key": "pki.tar", "path": "pki.tar"}]


def test_the_kubernetes_server_runs_replicas_over_one_store_and_one_shared_volume() -> None:
    """Replicas need the round state in PostgreSQL, the blobs and PKI on a volume they all mount, and a
    --data of each pod's own (its lock would otherwise keep all but one from starting)."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "server.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in server["args"])
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert deployment["spec"]["replicas"] > 1
    (store,) = [e for e in server["env"] if e["name"] == "FEDGE_STORE"]
    assert store["valueFrom"]["secretKeyRef"]["name"] == "fedge-store"
    shared = volumes[mounts["/var/lib/fedge"]]
    assert shared["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for shared_path in (args["blobs"], args["pki"]):
        assert shared_path.startswith("/var/lib/fedge/")
    assert "emptyDir" in volumes[mounts[args["data"]]], "each replica's --data is its pod's own"
