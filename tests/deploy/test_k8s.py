"""The Kubernetes manifests: both overlays render with kustomize, pass strict schema validation
against a recent Kubernetes offline, and are wired together (selectors, names, probes, volumes, keys).
"""

from __future__ import annotations

import copy
import re
import socket
import subprocess
from functools import cache

import kubernetes_validate
import pytest
import yaml

from .support import DEPLOY, GATEWAY, GATEWAY_VAR, SECRET_SETTINGS, VERSION, known_setting, parse_settings, tool

K8S_VERSION = "1.37.0"
OVERLAYS = ["cpu", "gpu"]
WORKLOADS = {"Deployment", "StatefulSet"}


@cache
def _render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict]:
    return copy.deepcopy(list(_render(request.param)))


def _find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = _find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pods(docs: list[dict]) -> list[dict]:
    return [d["spec"]["template"] for d in docs if d["kind"] in WORKLOADS]


def _containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def _server(docs: list[dict]) -> dict:
    pod = _one(docs, "StatefulSet", "deltaserve")["spec"]["template"]
    return next(c for c in pod["spec"]["containers"] if c["name"] == "server")


def _settings(docs: list[dict]) -> dict[str, str]:
    name = _server(docs)["envFrom"][0]["configMapRef"]["name"]
    return _one(docs, "ConfigMap", name)["data"]


def test_validator_knows_the_pinned_kubernetes_version() -> None:
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()


def test_overlays_render_every_component(docs: list[dict]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [
        ("Namespace", "deltaserve"),
        ("StatefulSet", "deltaserve"),
        ("Deployment", "deltaserve-gateway"),
        ("StatefulSet", "deltaserve-redis"),
        ("Service", "deltaserve"),
        ("Service", "deltaserve-replicas"),
        ("Service", "deltaserve-redis"),
        ("PersistentVolumeClaim", "deltaserve-models"),
        ("Secret", "deltaserve-keys"),
        ("PodDisruptionBudget", "deltaserve"),
        ("HorizontalPodAutoscaler", "deltaserve"),
    ]:
        assert expected in kinds, expected
    assert all(d["metadata"].get("namespace") == "deltaserve" for d in docs if d["kind"] != "Namespace")


def test_every_manifest_passes_strict_validation(docs: list[dict]) -> None:
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_and_rendering_need_no_network(docs: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kustomizations = [*(DEPLOY / "k8s").rglob("kustomization.yaml"), GATEWAY / "kustomization.yaml"]
    for path in kustomizations:
        entries = yaml.safe_load(path.read_text()).get("resources", [])
        assert all("://" not in e and (path.parent / e).exists() for e in entries), f"{path}: remote resource"


def test_strict_validation_rejects_a_misspelt_field(docs: list[dict]) -> None:
    deployment = _one(docs, "StatefulSet", "deltaserve")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_server_probes_ready_for_traffic_and_health_for_liveness(docs: list[dict]) -> None:
    server = _server(docs)
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    port = server["readinessProbe"]["httpGet"]["port"]
    assert any(
        p["name"] == port and p["containerPort"] == int(_settings(docs)["DELTASERVE_PORT"]) for p in server["ports"]
    )


def test_every_container_has_cpu_and_memory_requests_and_limits(docs: list[dict]) -> None:
    for pod in _pods(docs):
        for container in _containers(pod):
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{container['name']}: {part}"


def test_images_are_pinned_and_match_the_overlay(docs: list[dict]) -> None:
    images = {c["image"] for pod in _pods(docs) for c in _containers(pod)}
    for image in images:
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest", f"{image} is not pinned"
    server_tag = _server(docs)["image"].rpartition(":")[2]
    flavour = "cuda" if _settings(docs)["DELTASERVE_DEVICE"] == "cuda" else "cpu"
    assert server_tag == f"{VERSION}-{flavour}", "the image tag follows the project version"


def test_settings_are_real_settings_and_hold_no_keys(docs: list[dict]) -> None:
    settings = _settings(docs)
    assert all(known_setting(name) for name in settings), [n for n in settings if not known_setting(n)]
    assert not SECRET_SETTINGS & set(settings)
    assert settings["DELTASERVE_HOST"] == "0.0.0.0" and settings["DELTASERVE_REGISTRY"] == "redis"
    redis_host = settings["DELTASERVE_REDIS_URL"].split("//")[1].split(":")[0]
    _one(docs, "Service", redis_host)


def test_settings_parse_into_the_server_settings(docs: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings(_settings(docs), monkeypatch)
    assert settings.host == "0.0.0.0" and settings.registry == "redis"
    assert str(settings.model_cache) == _settings(docs)["DELTASERVE_MODEL_CACHE"]


def test_keys_come_from_the_secret_which_git_leaves_empty(docs: list[dict]) -> None:
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _server(docs)["env"] if "valueFrom" in e}
    assert set(refs) == SECRET_SETTINGS
    assert all(ref["name"] == "deltaserve-keys" and ref["key"] == name for name, ref in refs.items())
    secret = _one(docs, "Secret", "deltaserve-keys")
    assert "data" not in secret and "stringData" not in secret


def test_init_container_provisions_the_model_into_the_shared_claim(docs: list[dict]) -> None:
    pod = _one(docs, "StatefulSet", "deltaserve")["spec"]["template"]["spec"]
    claim = next(
        v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "deltaserve-models"
    )
    init = pod["initContainers"][0]
    assert init["args"] == ["models", "pull", "smollm2"]
    cache = _settings(docs)["DELTASERVE_MODEL_CACHE"]
    for container in (init, _server(docs)):
        assert {"name": claim, "mountPath": cache} == {
            k: v for k, v in container["volumeMounts"][0].items() if k in ("name", "mountPath")
        }
    _one(docs, "PersistentVolumeClaim", "deltaserve-models")


def test_redis_persists_its_append_only_file(docs: list[dict]) -> None:
    redis = _one(docs, "StatefulSet", "deltaserve-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    claim = redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mounts = redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": claim, "mountPath": "/data"} in mounts
    assert _one(docs, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def _matches(selector: dict[str, str], docs: list[dict]) -> bool:
    return any(selector.items() <= pod["metadata"]["labels"].items() for pod in _pods(docs))


def test_every_selector_selects_pods(docs: list[dict]) -> None:
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "Service":
            assert _matches(spec["selector"], docs), doc["metadata"]["name"]
        if doc["kind"] in {"PodDisruptionBudget", "Deployment", "StatefulSet"}:
            assert _matches(spec["selector"]["matchLabels"], docs), doc["metadata"]["name"]
        if doc["kind"] == "NetworkPolicy":
            assert _matches(spec["podSelector"]["matchLabels"], docs)
            assert all(
                _matches(src["podSelector"]["matchLabels"], docs) for rule in spec["ingress"] for src in rule["from"]
            )


def test_autoscaler_targets_the_server_deployment(docs: list[dict]) -> None:
    hpa = _one(docs, "HorizontalPodAutoscaler", "deltaserve")["spec"]
    target = _one(docs, hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"])
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert "replicas" not in target["spec"], "kubectl apply would reset what the autoscaler chose"


def test_pods_meet_the_restricted_pod_security_standard(docs: list[dict]) -> None:
    for pod in _pods(docs):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in _containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]


def test_shutdown_grace_covers_the_drain(docs: list[dict]) -> None:
    pod = _one(docs, "StatefulSet", "deltaserve")["spec"]["template"]["spec"]
    pause = int(_server(docs)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > float(_settings(docs)["DELTASERVE_SHUTDOWN_TIMEOUT"]) + pause


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes_and_cpu_overlay_does_not() -> None:
    for overlay in OVERLAYS:
        docs = list(_render(overlay))
        pod = _one(docs, "StatefulSet", "deltaserve")["spec"]["template"]["spec"]
        resources = _server(docs)["resources"]
        gpu = overlay == "gpu"
        assert (resources["limits"].get("nvidia.com/gpu") == "1") is gpu
        assert (resources["requests"].get("nvidia.com/gpu") == "1") is gpu
        assert ("nvidia.com/gpu.present" in pod.get("nodeSelector", {})) is gpu
        assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])) is gpu
        assert _settings(docs)["DELTASERVE_DEVICE"] == ("cuda" if gpu else "cpu")


def test_gateway_gets_its_files_and_resolves_the_ready_replicas(docs: list[dict]) -> None:
    gateway = _one(docs, "Deployment", "deltaserve-gateway")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", "") for e in gateway["containers"][0]["env"]}
    used = {m for t in (GATEWAY / "templates").glob("*.template") for m in GATEWAY_VAR.findall(t.read_text())}
    assert used <= set(env)
    replicas = _one(docs, "Service", "deltaserve-replicas")
    assert replicas["spec"]["clusterIP"] == "None" and replicas["spec"]["publishNotReadyAddresses"] is False
    config = {v["name"]: v["configMap"]["name"] for v in gateway["volumes"] if "configMap" in v}
    nginx = _one(docs, "ConfigMap", config["nginx-conf"])["data"]["nginx.conf"]
    assert nginx == (GATEWAY / "nginx.conf").read_text()
    assert (
        _one(docs, "ConfigMap", config["njs"])["data"]["deltaserve.js"] == (GATEWAY / "njs/deltaserve.js").read_text()
    )


def test_gateway_ring_has_one_name_per_possible_server_replica(docs: list[dict]) -> None:
    """nginx places ring points by server name; one name per pod, up to the autoscaler's maximum."""
    server = _one(docs, "StatefulSet", "deltaserve")
    service = server["spec"]["serviceName"]
    gateway = _one(docs, "Deployment", "deltaserve-gateway")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value", "") for e in gateway["containers"][0]["env"]}
    names = re.findall(r"server (\S+) resolve ", env["GATEWAY_UPSTREAM_SERVERS"])
    port = _settings(docs)["DELTASERVE_PORT"]
    most = _one(docs, "HorizontalPodAutoscaler", "deltaserve")["spec"]["maxReplicas"]
    expected = [f"deltaserve-{i}.{service}.$(POD_NAMESPACE).svc.cluster.local:{port}" for i in range(len(names))]
    assert names == expected and len(names) >= most
    assert server["spec"]["podManagementPolicy"] == "Parallel"
