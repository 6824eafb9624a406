"""Static checks of docker/ and deploy/k8s/: no Docker engine and no cluster needed.

Compose (docker/):

- Every ``RONDO__SECTION__KEY`` override in the compose files names a real key of the service's
  dev config (configs/dev-<service>.toml): a service stops at start-up on an unknown key, so a
  renamed key would take the deployment down.
- Every combination of the base file with the overlays (release, valgrind, both) passes
  ``docker-compose config`` (Compose v1) or ``docker compose config`` (v2), when either is
  installed (`scripts/setup --test-tools`); skipped otherwise.
- In the rendered base: each service's healthcheck and published port are its configured API
  port, Prometheus scrapes exactly the services' API ports at /metrics, and Grafana's
  provisioning mounts the datasource and the dashboard the dashboard JSON refers to.
- Every path the Dockerfile COPYs from the build context exists and is not excluded by
  docker/Dockerfile.dockerignore, and the copies cover every file the crates include_str!;
  every compose build target is a Dockerfile stage; the runtime image EXPOSEs the dev configs'
  ports.

Kubernetes (deploy/k8s/, rendered with ``kubectl kustomize``; skipped without kubectl):

- base and every overlay render; every ``RONDO__`` variable is a real config key; the ports, the
  probes (/healthz on the API port), the Prometheus annotations and the Services agree with the
  config each service runs with (its dev defaults, the ConfigMap's file, then its environment);
  the addresses the services hand each other are the Services'; the aggregator's memory request
  covers the measured bound for the model size it is sized for; the secret is mounted; the
  rendered configs are accepted by the real binaries.

    .venv/bin/python -m pytest tests/test_docker_files.py
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
BASE = DOCKER / "docker-compose.yml"
RELEASE = DOCKER / "docker-compose-release.yml"
VALGRIND = DOCKER / "docker-compose-valgrind.yml"
OVERLAYS = [RELEASE, VALGRIND]
COMPOSE_FILES = [BASE, *OVERLAYS]

# Service name -> the dev config whose keys its RONDO__ overrides must name.
SERVICE_CONFIGS = {
    "coordinator": ROOT / "configs" / "dev-coordinator.toml",
    "aggregator": ROOT / "configs" / "dev-aggregator.toml",
}

_SERVICE_LINE = re.compile(r"^  ([A-Za-z0-9_.-]+):\s*(#.*)?$")
_RONDO_VAR = re.compile(r"\bRONDO__[A-Z0-9_]+")


def rondo_overrides(path: Path) -> list[tuple[str | None, str]]:
    """(service, variable) for every RONDO__ variable set in a compose file (not in comments).

    The service is the entry of the top-level ``services:`` mapping the line sits in, or None
    outside it (e.g. in an ``x-`` extension field).
    """
    found: list[tuple[str | None, str]] = []
    in_services = False
    service: str | None = None
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0] if line.lstrip().startswith("#") else line.split(" #", 1)[0]
        if not code.strip():
            continue
        if not code[0].isspace():  # a top-level key
            in_services = code.rstrip() == "services:"
            service = None
            continue
        if in_services and (m := _SERVICE_LINE.match(code)):
            service = m.group(1)
            continue
        found.extend((service, var) for var in _RONDO_VAR.findall(code))
    return found


def config_keys(path: Path) -> set[tuple[str, str]]:
    config = tomllib.loads(path.read_text())
    return {
        (section, key)
        for section, table in config.items()
        if isinstance(table, dict)
        for key in table
    }


def _override_cases() -> list[object]:
    cases = []
    for path in COMPOSE_FILES:
        for service, var in rondo_overrides(path):
            cases.append(pytest.param(service, var, id=f"{path.name}:{service}:{var}"))
    return cases


def test_compose_files_exist() -> None:
    for path in [*COMPOSE_FILES, DOCKERFILE, DOCKERIGNORE, DOCKER / "valgrind.supp"]:
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


def test_override_parser_finds_the_wiring() -> None:
    """Guards the line parser: the base file's essential overrides are seen, per service."""
    found = set(rondo_overrides(BASE))
    for expected in [
        ("aggregator", "RONDO__API__HOST"),
        ("aggregator", "RONDO__API__PUBLIC_URL"),
        ("coordinator", "RONDO__RPC__HOST"),
        ("coordinator", "RONDO__AGGREGATOR__RPC_ADDRESS"),
    ]:
        assert expected in found, f"{expected} not found in {BASE.name}: {sorted(found)}"


@pytest.mark.parametrize(("service", "var"), _override_cases())
def test_override_names_a_config_key(service: str | None, var: str) -> None:
    parts = var.removeprefix("RONDO__").split("__")
    assert len(parts) == 2 and all(parts), f"{var} is not RONDO__SECTION__KEY"
    section, key = (part.lower() for part in parts)
    if service in SERVICE_CONFIGS:
        configs = [SERVICE_CONFIGS[service]]
    else:  # outside a known service: any service's config will do
        configs = list(SERVICE_CONFIGS.values())
    if any((section, key) in config_keys(config) for config in configs):
        return
    names = ", ".join(f"configs/{c.name}" for c in configs)
    pytest.fail(f"{var} (service {service}): no key {section}.{key} in {names}")


# --- docker-compose config -----------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMBINATIONS = {
    "base": [],
    "release": [RELEASE],
    "valgrind": [VALGRIND],
    "release+valgrind": [RELEASE, VALGRIND],
}


def compose_config(overlays: list[Path]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    command = [*compose, "-f", str(BASE)]
    for overlay in overlays:
        command += ["-f", str(overlay)]
    result = subprocess.run(
        [*command, "config"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return command, result


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_compose_config_validates(combination: str) -> None:
    command, result = compose_config(COMBINATIONS[combination])
    assert result.returncode == 0, f"{shlex.join(command)} config:\n{result.stderr}"
    services = yaml.safe_load(result.stdout)["services"]
    expected = {"redis", "aggregator", "coordinator", "participants", "prometheus", "grafana"}
    assert set(services) == expected


def effective_config(service: str, file_text: str | None, env: dict[str, str]) -> dict:
    """The config a service runs with, as the binary builds it: the dev defaults, then a
    config file, then RONDO__ variables (parsed as TOML scalars where they are ones)."""
    config = tomllib.loads(SERVICE_CONFIGS[service].read_text())
    if file_text:
        for section, table in tomllib.loads(file_text).items():
            config.setdefault(section, {}).update(table)
    for var, raw in env.items():
        if not var.startswith("RONDO__"):
            continue
        section, key = (part.lower() for part in var.removeprefix("RONDO__").split("__"))
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        config.setdefault(section, {})[key] = value
    return config


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # Compose v2 may write KEY=VALUE items
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_ports_probes_and_scraping_match_the_configs() -> None:
    command, result = compose_config([])
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected_targets = set()
    for name in SERVICE_CONFIGS:
        service = services[name]
        config = effective_config(name, None, _compose_env(service))
        port = config["api"]["port"]
        assert config["api"]["host"] == "0.0.0.0", f"{name} would listen on its loopback only"
        health = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in health, f"{name} healthcheck: {health}"
        published = {str(p.get("target")) if isinstance(p, dict) else p for p in service["ports"]}
        assert any(str(port) in str(p).split(":")[-1] for p in published), (name, published)
        expected_targets.add(f"{name}:{port}")
    assert targets == expected_targets
    coordinator = effective_config("coordinator", None, _compose_env(services["coordinator"]))
    aggregator = effective_config("aggregator", None, _compose_env(services["aggregator"]))
    assert coordinator["aggregator"]["rpc_address"] == f"aggregator:{aggregator['rpc']['port']}"
    assert coordinator["rpc"]["advertise_address"] == f"coordinator:{coordinator['rpc']['port']}"
    assert aggregator["api"]["public_url"] == f"http://aggregator:{aggregator['api']['port']}"


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource() -> None:
    command, result = compose_config([])
    assert result.returncode == 0, result.stderr
    grafana = yaml.safe_load(result.stdout)["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        if isinstance(volume, dict):
            source, target = volume.get("source"), volume["target"]
        else:
            source, target = volume.split(":")[:2]
        mounts[target] = Path(source) if source and "/" in str(source) else None
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == DOCKER / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "rondo.yml").read_text())
    (provider,) = providers["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert dashboards == DOCKER / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).is_file()
    dashboard = json.loads((dashboards / "rondo.json").read_text())
    uids = {
        panel["datasource"]["uid"]
        for panel in dashboard["panels"]
        if isinstance(panel.get("datasource"), dict)
    }
    assert uids == {datasource["uid"]}, uids


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def copy_sources() -> list[str]:
    """Build-context paths of every COPY/ADD without --from."""
    sources: list[str] = []
    for instruction, args in dockerfile_instructions():
        if instruction not in {"COPY", "ADD"}:
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"COPY {args}: needs a source and a destination"
        sources.extend(paths[:-1])
    return sources


def _ignored(path: str, patterns: list[str]) -> str | None:
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


def test_dockerfile_copy_sources_exist() -> None:
    sources = copy_sources()
    assert sources, "no COPY found in the Dockerfile"
    patterns = [
        line.strip().lstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"Dockerfile copies {source}, which does not exist"
        pattern = _ignored(source, patterns)
        assert pattern is None, f"Dockerfile copies {source}, excluded by {pattern!r}"


def test_build_copies_every_included_file() -> None:
    """Files the crates pull in with include_str!/include_bytes! are in the build context."""
    sources = [Path(s.rstrip("/")) for s in copy_sources()]
    include = re.compile(r"include_(?:str|bytes)!\(\s*\"([^\"]+)\"")
    for rs in sorted((ROOT / "rust").rglob("*.rs")):
        for target in include.findall(rs.read_text()):
            path = (rs.parent / target).resolve().relative_to(ROOT)
            assert any(path == s or s in path.parents for s in sources), (
                f"{rs.relative_to(ROOT)} includes {path}, which the Dockerfile does not copy"
            )


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    for required in ["target", ".venv", "bench/.venv*", "run", ".git"]:
        assert required in patterns, f"{DOCKERIGNORE.name} should exclude {required}"


def test_compose_build_targets_are_dockerfile_stages() -> None:
    stages = {
        m.group(1)
        for instruction, args in dockerfile_instructions()
        if instruction == "FROM" and (m := re.search(r"\s+AS\s+(\S+)$", args, re.IGNORECASE))
    }
    for path in COMPOSE_FILES:
        for target in re.findall(r"^\s+target:\s*(\S+)", path.read_text(), re.MULTILINE):
            assert target in stages, f"{path.name}: target {target} is not in {sorted(stages)}"


def test_runtime_exposes_the_dev_config_ports() -> None:
    exposed = {
        int(port.split("/")[0])
        for instruction, args in dockerfile_instructions()
        if instruction == "EXPOSE"
        for port in args.split()
    }
    for config in SERVICE_CONFIGS.values():
        data = tomllib.loads(config.read_text())
        for section in ["api", "rpc"]:
            port = data[section]["port"]
            assert port in exposed, f"{config.name} {section}.port {port} is not EXPOSEd"


# --- Kubernetes (deploy/k8s) ---------------------------------------------------------------------

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    **{p.name: p for p in sorted((K8S / "overlays").iterdir()) if p.is_dir()},
}
MIB = 1 << 20


def render(kustomization: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6}
    units["G"] = 10**9
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


class Rendered:
    """One rendered kustomization: its objects by kind and name, and what each Rondo service
    runs with."""

    def __init__(self, docs: list[dict]) -> None:
        self.objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    def get(self, kind: str, name: str) -> dict:
        found = [v for (k, n), v in self.objects.items() if k == kind and n.startswith(name)]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def container(self, service: str) -> dict:
        pod = self.get("Deployment", service)["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == service]
        return container

    def env(self, service: str) -> dict[str, str]:
        return {e["name"]: str(e["value"]) for e in self.container(service).get("env", [])}

    def config_file(self, service: str) -> str:
        """The text of the file the container's `-c` names, from the ConfigMap mounted there."""
        deployment = self.get("Deployment", service)
        pod = deployment["spec"]["template"]["spec"]
        command = self.container(service)["command"]
        path = Path(command[command.index("-c") + 1])
        for mount in self.container(service)["volumeMounts"]:
            if path.parent == Path(mount["mountPath"]):
                (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
                config_map = self.get("ConfigMap", volume["configMap"]["name"])
                assert path.name in config_map["data"], f"{service}: no {path.name} in the map"
                return config_map["data"][path.name]
        pytest.fail(f"{service}: nothing is mounted at {path.parent}")

    def config(self, service: str) -> dict:
        return effective_config(service, self.config_file(service), self.env(service))


@pytest.fixture(params=list(KUSTOMIZATIONS), scope="module")
def rendered(request) -> tuple[str, Rendered]:
    return request.param, Rendered(render(KUSTOMIZATIONS[request.param]))


def test_base_configs_are_the_dev_configs() -> None:
    """kustomize reads no file outside its folder, so the base holds copies: they must not
    drift from configs/ (cp configs/dev-*.toml deploy/k8s/base/config/)."""
    for config in SERVICE_CONFIGS.values():
        copy = K8S / "base" / "config" / config.name
        assert copy.read_text() == config.read_text(), f"{copy} differs from {config}"


def test_every_rondo_variable_is_a_config_key(rendered) -> None:
    name, objects = rendered
    seen = 0
    for service in SERVICE_CONFIGS:
        keys = config_keys(SERVICE_CONFIGS[service])
        for var in objects.env(service):
            if not var.startswith("RONDO__"):
                continue
            seen += 1
            section, key = (p.lower() for p in var.removeprefix("RONDO__").split("__"))
            assert (section, key) in keys, f"{name}: {service} sets {var}, not a config key"
        # The ConfigMap's file too: the binary refuses an unknown key in it.
        for section, table in tomllib.loads(objects.config_file(service)).items():
            for key in table:
                assert (section, key) in keys, f"{name}: {service}'s file has {section}.{key}"
    assert seen >= 5


def test_ports_probes_and_scrape_annotations_match_the_configs(rendered) -> None:
    name, objects = rendered
    for service in SERVICE_CONFIGS:
        config = objects.config(service)
        deployment = objects.get("Deployment", service)
        container = objects.container(service)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": config["api"]["port"], "rpc": config["rpc"]["port"]}, name
        assert config["api"]["host"] == config["rpc"]["host"] == "0.0.0.0", name
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz", (name, service, probe)
            assert ports.get(get["port"], get["port"]) == config["api"]["port"], (name, probe)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(config["api"]["port"])
        assert annotations["prometheus.io/path"] == "/metrics"
        svc = objects.get("Service", service)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            target = ports.get(port["targetPort"], port["targetPort"])
            assert port["port"] == target == ports[port["name"]], (name, service, port)
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {
            "type": "Recreate"
        }, f"{name}: two {service}s at once would be two federations"


def test_the_services_find_each_other_through_their_services(rendered) -> None:
    name, objects = rendered
    coordinator, aggregator = objects.config("coordinator"), objects.config("aggregator")
    aggregator_svc = objects.get("Service", "aggregator")["metadata"]["name"]
    coordinator_svc = objects.get("Service", "coordinator")["metadata"]["name"]
    assert (
        coordinator["aggregator"]["rpc_address"] == f"{aggregator_svc}:{aggregator['rpc']['port']}"
    )
    assert coordinator["rpc"]["advertise_address"] == (
        f"{coordinator_svc}:{coordinator['rpc']['port']}"
    )
    public = aggregator["api"]["public_url"]
    assert public.startswith(("http://", "https://")), name
    if name == "base":
        assert public == f"http://{aggregator_svc}:{aggregator['api']['port']}"


def test_aggregator_memory_covers_the_measured_bound(rendered) -> None:
    """docs/benchmarks.md: peak RSS within 3 x model + 64 MB with 32 MiB of staging, i.e.
    3 x model + staging + 32 MiB."""
    name, objects = rendered
    deployment = objects.get("Deployment", "aggregator")
    model = int(deployment["metadata"]["annotations"]["rondo.io/model-bytes"])
    staging = objects.config("aggregator")["aggregation"]["staging_memory_bytes"]
    resources = objects.container("aggregator")["resources"]
    request = quantity_bytes(resources["requests"]["memory"])
    limit = quantity_bytes(resources["limits"]["memory"])
    bound = 3 * model + staging + 32 * MIB
    assert bound <= request <= limit, (
        f"{name}: aggregator memory request {request // MIB} MiB for a model of "
        f"{model // MIB} MiB and {staging // MIB} MiB of staging: the bound is {bound // MIB} MiB"
    )
    assert quantity_bytes(objects.container("coordinator")["resources"]["requests"]["memory"])


def test_the_secret_is_mounted_in_both_services(rendered) -> None:
    name, objects = rendered
    secret = objects.get("Secret", "rondo-secrets")
    assert set(secret["stringData"]) == {"join-secret", "link-key"}
    assert all("PLACEHOLDER" in v for v in secret["stringData"].values()), "placeholders only"
    for service in SERVICE_CONFIGS:
        pod = objects.get("Deployment", service)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = [
            m
            for m in objects.container(service)["volumeMounts"]
            if volumes[m["name"]].get("secret", {}).get("secretName") == secret["metadata"]["name"]
        ]
        assert mounted and mounted[0]["mountPath"] == "/etc/rondo/secrets", (name, service)


def test_the_production_state_is_in_redis_and_on_volumes() -> None:
    """Both production services keep their state in the base's Redis, under one namespace,
    and their files on a PersistentVolumeClaim of each one's own, mounted at data_dir."""
    objects = Rendered(render(KUSTOMIZATIONS["production"]))
    redis = objects.get("Service", "redis")
    url = f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    namespaces, claims = set(), set()
    for service in SERVICE_CONFIGS:
        store = objects.config(service)["store"]
        assert store["url"] == url, service
        namespaces.add(store["namespace"])
        pod = objects.get("Deployment", service)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [
            m
            for m in objects.container(service)["volumeMounts"]
            if m["mountPath"] == store["data_dir"]
        ]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert objects.get("PersistentVolumeClaim", claim)["spec"]["accessModes"] == [
            "ReadWriteOnce"
        ]
        claims.add(claim)
    assert len(namespaces) == 1, "the aggregator's records sit beside the coordinator's"
    assert len(claims) == 2, "a volume each"


def test_redis_is_deployed_with_a_service(rendered) -> None:
    name, objects = rendered
    redis = objects.get("StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"] and container["livenessProbe"]
    assert objects.get("Service", "redis")["spec"]["ports"][0]["port"] == 6379


@pytest.mark.parametrize("service", list(SERVICE_CONFIGS))
def test_the_rendered_config_is_accepted_by_the_binary(rendered, service, tmp_path) -> None:
    """The binary checks every key, type and range at start-up (exit code 2 on any mistake):
    start it with the config and environment the manifests give it, on loopback ports of its
    own, and see it come up."""
    name, objects = rendered
    binary = ROOT / "target" / "debug" / service
    if not binary.exists():
        pytest.skip(f"{binary} is not built (scripts/setup)")
    config = tmp_path / f"{service}.toml"
    config.write_text(objects.config_file(service))
    addresses = tmp_path / "addresses.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RONDO__")}
    env.update(objects.env(service))
    # The Secret's files (the join secret, the link key) as the pod would have them mounted.
    for key, value in list(env.items()):
        if value.startswith("/etc/rondo/secrets/"):
            secret = tmp_path / "secrets" / Path(value).name
            secret.parent.mkdir(exist_ok=True)
            secret.write_text("a-placeholder-secret-of-32-bytes")
            env[key] = str(secret)
    env.update(
        {
            "RONDO__API__HOST": "127.0.0.1",
            "RONDO__RPC__HOST": "127.0.0.1",
            "RONDO__API__PORT": "0",
            "RONDO__RPC__PORT": "0",
            "RONDO__RUNTIME__ADDRESSES_FILE": str(addresses),
        }
    )
    store = objects.config(service)["store"]
    if store["url"]:
        # The cluster's Redis and volume are not here: the binary starts on memory and a
        # directory of the test's own, the rest of the store's settings as given
        # (test_the_production_state_is_in_redis_and_on_volumes checks where they point).
        env.update({"RONDO__STORE__URL": "", "RONDO__STORE__DATA_DIR": str(tmp_path / "data")})
    process = subprocess.Popen(
        [str(binary), "-c", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not addresses.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert addresses.exists(), f"{name}: {service} did not start: {process.poll()}"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, f"{name}: {service} exited {process.returncode}:\n{output}"
