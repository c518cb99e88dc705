"""The Kubernetes example is valid Kubernetes and agrees with the image it runs.

Validated offline against the Kubernetes OpenAPI schemas shipped in the `kubernetes-validate`
package (strict: an unknown or misspelt field fails), for the first version with native
sidecars and for the newest the package knows; then checked against the Dockerfile (port,
state dir, user, probes) and the shutdown arithmetic (docs/operations.md).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, latest_version, validate

from tests.test_operations import ROOT, Dockerfile

EXAMPLE = ROOT / "examples" / "kubernetes" / "sidecar.yaml"
# Native sidecars (an init container with restartPolicy: Always) are on by default from 1.29.
VERSIONS = ("1.29.0", latest_version())
APP_DRAIN = 14  # what the example's comment allows the application to drain, in seconds


def resources(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = resource["spec"]
    return spec if resource["kind"] == "Pod" else spec["template"]["spec"]


def proxy_container(spec: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c
        for c in spec.get("initContainers", []) + spec["containers"]
        if "/ctct-proxy:" in c["image"]
    ]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_sidecar_example_is_valid_kubernetes(version: str) -> None:
    found = resources(EXAMPLE)
    assert [r["kind"] for r in found] == ["Deployment"]
    for resource in found:
        validate(resource, version, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    resource = resources(EXAMPLE)[0]
    broken = copy.deepcopy(resource)
    proxy = proxy_container(pod_spec(broken))
    proxy["readinesProbe"] = proxy.pop("readinessProbe")
    with pytest.raises(ValidationError):
        validate(broken, VERSIONS[0], strict=True)


def test_the_sidecar_example_agrees_with_the_image_and_the_grace() -> None:
    docker = Dockerfile.read(ROOT / "Dockerfile")
    image_env = docker.env()
    spec = pod_spec(resources(EXAMPLE)[0])
    proxy = proxy_container(spec)
    # A native sidecar: started before the app, stopped after it.
    assert proxy in spec["initContainers"]
    assert proxy["restartPolicy"] == "Always"
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert list(ports.values()) == [int(docker.one("EXPOSE"))]

    def probe(kind: str) -> str:
        get = proxy[kind]["httpGet"]
        assert ports[get["port"]] == int(image_env["CTCT_PROXY_PORT"])
        return str(get["path"])

    assert (probe("livenessProbe"), probe("readinessProbe")) == ("/healthz", "/readyz")
    # State on a pod volume at the image's state dir.
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    state = mounts[image_env["CTCT_PROXY_STATE_DIR"]]
    assert state in {v["name"] for v in spec["volumes"]}
    # runAsNonRoot can only check a numeric USER.
    assert proxy["securityContext"]["runAsNonRoot"] is True
    assert docker.all("USER")[-1].split(":")[0].isdigit()
    # The secrets come from a Secret, never literal values.
    env = {e["name"]: e for e in proxy["env"]}
    for name in ("CTCT_API_KEY", "CTCT_ACCESS_TOKEN", "CTCT_PROXY_CLIENT_TOKENS"):
        assert "secretKeyRef" in env[name]["valueFrom"]
    # The proxy exits within its grace + 1 s once the app has drained: the pod's budget.
    set_here = env.get("CTCT_PROXY_SHUTDOWN_GRACE")
    grace = float(set_here["value"] if set_here else image_env["CTCT_PROXY_SHUTDOWN_GRACE"])
    assert spec["terminationGracePeriodSeconds"] >= APP_DRAIN + grace + 1


def test_operations_md_shows_the_example_as_it_is() -> None:
    text = EXAMPLE.read_text()
    manifest = text[text.index("apiVersion:") :]
    assert manifest in (ROOT / "docs" / "operations.md").read_text()
