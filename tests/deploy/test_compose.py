"""docker-compose.yml: valid against the vendored Compose Specification schema, and wired as documented."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from .support import DEPLOY, GATEWAY, GATEWAY_VAR, REPO, SECRET_SETTINGS, VERSION, known_setting, parse_settings

SCHEMA = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
REQUIRED_FROM_ENV = re.compile(r"^\$\{(DELTASERVE_[A-Z_]+):\?[^}]+\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _errors(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_specification(compose: dict) -> None:
    assert _errors(compose) == []


def test_schema_rejects_what_compose_rejects(compose: dict) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["deltaserve"]["depends_on"]["redis"]["condition"] = "service_ready"
    broken["services"]["redis"]["helthcheck"] = {}
    assert len(_errors(broken)) == 2


def test_images_are_pinned_to_versions(compose: dict) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.match(r"\d", tag), f"{name}: {image} is not pinned"


def test_redis_persists_to_a_volume(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]


def test_server_waits_for_redis_and_the_provisioned_model(compose: dict) -> None:
    depends = compose["services"]["deltaserve"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["model-init"]["condition"] == "service_completed_successfully"
    assert compose["services"]["model-init"]["command"] == ["models", "pull", "smollm2"]
    assert compose["services"]["gateway"]["depends_on"]["deltaserve"]["condition"] == "service_healthy"


def test_model_init_and_server_share_the_model_volume(compose: dict) -> None:
    init = compose["services"]["model-init"]["volumes"]
    server = compose["services"]["deltaserve"]["volumes"]
    assert "models:/data/models" in init and "models:/data/models:ro" in server
    assert compose["services"]["deltaserve"]["environment"]["DELTASERVE_MODEL_CACHE"] == "/data/models"


def test_every_long_running_service_has_a_healthcheck(compose: dict) -> None:
    for name in ("redis", "deltaserve", "gateway"):
        assert compose["services"][name]["healthcheck"]["test"][0] == "CMD", name
    assert "/ready" in compose["services"]["deltaserve"]["healthcheck"]["test"]


def test_server_settings_are_real_settings_and_keys_come_from_the_environment(compose: dict) -> None:
    env = compose["services"]["deltaserve"]["environment"]
    assert env["DELTASERVE_HOST"] == "0.0.0.0" and env["DELTASERVE_REGISTRY"] == "redis"
    assert all(known_setting(name) for name in env), [n for n in env if not known_setting(n)]
    for secret in SECRET_SETTINGS:
        match = REQUIRED_FROM_ENV.match(env[secret])
        assert match and match.group(1) == secret, f"{secret} must be required from the environment"


def test_server_environment_parses_into_the_server_settings(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in compose["services"]["deltaserve"]["environment"].items() if k not in SECRET_SETTINGS}
    settings = parse_settings(env, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.redis_url == "redis://redis:6379/0"
    assert "redis" in compose["services"]


def test_gateway_gets_every_template_variable_and_its_files(compose: dict) -> None:
    gateway = compose["services"]["gateway"]
    used = {m for t in (GATEWAY / "templates").glob("*.template") for m in GATEWAY_VAR.findall(t.read_text())}
    assert used <= set(gateway["environment"])
    assert gateway["environment"]["NGINX_ENVSUBST_FILTER"] == "^GATEWAY_"
    for volume in gateway["volumes"]:
        assert (REPO / volume.split(":")[0]).exists(), volume


def test_build_uses_the_cpu_dockerfile(compose: dict) -> None:
    build = compose["services"]["deltaserve"]["build"]
    assert compose["services"]["deltaserve"]["image"] == f"deltaserve:{VERSION}-cpu"
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    assert Path(build["dockerfile"]).name == "Dockerfile.cpu"


def test_gateway_ring_has_one_name_per_scaled_container(compose: dict) -> None:
    """nginx places ring points by server name; compose names scaled containers <project>-<service>-N."""
    servers = compose["services"]["gateway"]["environment"]["GATEWAY_UPSTREAM_SERVERS"]
    names = re.findall(r"server (\S+) resolve ", servers)
    port = compose["services"]["deltaserve"]["environment"]["DELTASERVE_PORT"]
    assert names == [f"{compose['name']}-deltaserve-{i}:{port}" for i in range(1, len(names) + 1)]
    assert len(names) >= 2
