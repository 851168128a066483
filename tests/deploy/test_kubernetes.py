"""The Kubernetes manifests in deploy/kubernetes/: every document valid against the
Kubernetes API's schemas (kubernetes-validate, offline, strict: an unknown or misspelt
field is an error), the configuration they mount valid for the relay with the secrets
they provide, and the two agreeing on ports, probes, paths and the variables used."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tagrelay.config.loader import parse_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"
"""The API version validated against: a release current clusters run."""


def documents(folder: Path = MANIFESTS) -> list[tuple[str, dict[str, Any]]]:
    """Every document of the manifests in ``folder`` (not below it), named for test ids."""
    found = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                name = f"{path.relative_to(MANIFESTS)}:{doc['kind']}/{doc['metadata']['name']}"
                found.append((name, doc))
    return found


def one(kind: str, folder: Path = MANIFESTS) -> dict[str, Any]:
    (doc,) = [doc for _, doc in documents(folder) if doc["kind"] == kind]
    return doc


def test_the_manifests_are_there() -> None:
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
    ]


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[name for name, _ in documents()])
def test_every_document_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    """So that the test above can fail."""
    broken = one("StatefulSet")
    broken = {**broken, "spec": {**broken["spec"], "replicaz": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def container() -> dict[str, Any]:
    (main,) = one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return main


def secret_env() -> dict[str, str]:
    env: dict[str, str] = one("Secret")["stringData"]
    return env


def relay_config_text() -> str:
    text: str = one("ConfigMap")["data"]["tagrelay.yaml"]
    return text


def test_the_mounted_configuration_is_valid_with_the_secrets_provided() -> None:
    config = parse_config(relay_config_text(), "configmap.yaml", env=secret_env())
    assert str(config.data_dir) == "/data"
    (warehouse,) = config.forwarders
    assert warehouse.type == "warehouse" and warehouse.dialect == "postgres"  # type: ignore[attr-defined]


def test_every_variable_the_configuration_uses_is_provided() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", relay_config_text()))
    main = container()
    assert [source["secretRef"]["name"] for source in main["envFrom"]] == [
        one("Secret")["metadata"]["name"]
    ]
    provided = set(secret_env()) | {e["name"] for e in main.get("env", [])}
    assert used and used <= provided


def test_ports_probes_and_paths_agree_with_the_configuration() -> None:
    config = parse_config(relay_config_text(), "configmap.yaml", env=secret_env())
    main = container()
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["http"] == config.server.port
    assert config.admin.listen is not None
    assert ports["admin"] == int(str(config.admin.listen).rsplit(":", 1)[1])
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts["data"] == str(config.data_dir)
    env = {e["name"]: e["value"] for e in main["env"]}
    assert Path(env["TAGRELAY_CONFIG"]).parent == Path(mounts["config"])
    spec = one("StatefulSet")["spec"]
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.server.shutdown_timeout_secs
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # the pods run as the image's user, which owns /data
    assert spec["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    assert "useradd --system --uid 10001" in (ROOT / "Dockerfile").read_text()


def test_services_select_the_pods() -> None:
    labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for name, doc in documents():
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert selector.items() <= labels.items(), name


# --- the JetStream-backed Deployment (deploy/kubernetes/jetstream/) -----------------------

JETSTREAM = MANIFESTS / "jetstream"


def jetstream_documents() -> list[tuple[str, dict[str, Any]]]:
    return documents(JETSTREAM)


def jetstream_one(kind: str) -> dict[str, Any]:
    return one(kind, JETSTREAM)


def test_the_jetstream_manifests_are_there() -> None:
    kinds = sorted(doc["kind"] for _, doc in jetstream_documents())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]


@pytest.mark.parametrize(
    ("name", "doc"), jetstream_documents(), ids=[name for name, _ in jetstream_documents()]
)
def test_every_jetstream_document_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def jetstream_config_text() -> str:
    text: str = jetstream_one("ConfigMap")["data"]["tagrelay.yaml"]
    return text


def test_the_deployment_runs_on_the_jetstream_spool_and_the_postgres_warehouse() -> None:
    config = parse_config(jetstream_config_text(), "jetstream/configmap.yaml", env=secret_env())
    assert config.spool.type == "jetstream"
    assert config.spool.replicas == 3  # the stream survives the loss of a NATS server
    (warehouse,) = config.forwarders
    assert warehouse.dialect == "postgres"  # type: ignore[attr-defined]
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", jetstream_config_text()))
    assert used <= set(secret_env())
    # nothing that must survive the pod lives on it
    spec = jetstream_one("Deployment")["spec"]
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert volumes["config"]["configMap"]["name"] == jetstream_one("ConfigMap")["metadata"]["name"]


def test_the_deployment_probes_ports_and_paths_agree_with_its_configuration() -> None:
    config = parse_config(jetstream_config_text(), "jetstream/configmap.yaml", env=secret_env())
    spec = jetstream_one("Deployment")["spec"]
    (main,) = spec["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["http"] == config.server.port
    assert ports["admin"] == int(str(config.admin.listen).rsplit(":", 1)[1])
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts["data"] == str(config.data_dir)
    env = {e["name"]: e["value"] for e in main["env"]}
    assert Path(env["TAGRELAY_CONFIG"]).parent == Path(mounts["config"])
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.server.shutdown_timeout_secs
    # a rolling update never takes a replica away before its successor is ready
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert main["resources"]["requests"]["cpu"]  # what the autoscaler's utilisation is of


def test_the_autoscaler_budget_and_service_point_at_the_deployment() -> None:
    deployment = jetstream_one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = jetstream_one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    pdb = jetstream_one("PodDisruptionBudget")["spec"]
    assert pdb["minAvailable"] < hpa["minReplicas"]  # a node drain can always proceed
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert jetstream_one("Service")["spec"]["selector"].items() <= labels.items()
    # the SQLite StatefulSet's pods are not selected by the Deployment's objects, nor
    # the other way round
    assert labels != one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
