"""Static checks of docker/: no Docker engine, no extra packages.

- Every ``RONDO__SECTION__KEY`` override in the compose files names a real key of the service's
  dev config (configs/dev-<service>.toml), so that a renamed key cannot silently stop applying
  (the services ignore unknown keys).
- Every compose file, alone or as an overlay, passes ``docker-compose config`` (Compose v1) or
  ``docker compose config`` (v2), when either is installed; skipped otherwise.
- Every path the Dockerfile COPYs from the build context exists and is not excluded by
  docker/Dockerfile.dockerignore, and the copies cover every file the crates include_str!;
  every compose build target is a Dockerfile stage; the runtime image EXPOSEs the dev configs'
  ports.

The compose files are read line by line (they are written in a plain block style for that):
PyYAML is not a dependency of this repository.

    .venv/bin/python -m pytest tests/test_docker_files.py
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
BASE = DOCKER / "docker-compose.yml"
OVERLAYS = [DOCKER / "docker-compose.release.yml", DOCKER / "docker-compose.valgrind.yml"]
COMPOSE_FILES = [BASE, *OVERLAYS]

# Service name -> the dev config whose keys its RONDO__ overrides must name.
SERVICE_CONFIGS = {
    "coordinator": ROOT / "configs" / "dev-coordinator.toml",
    "aggregator": ROOT / "configs" / "dev-aggregator.toml",
}

# Overrides the compose files set ahead of the config key they need.
PENDING = {
    "RONDO__RPC__ADVERTISE_ADDRESS": (
        "pending: the coordinator has no rpc.advertise_address key yet, so it announces its "
        "bound RPC address (0.0.0.0:8082 in compose) to the aggregator; "
        "RONDO__RPC__ADVERTISE_ADDRESS=coordinator:8082 is ignored until the key exists"
    ),
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
    if var in PENDING:
        pytest.xfail(PENDING[var])
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


@pytest.mark.parametrize(
    "overlay", [None, *OVERLAYS], ids=["base", *(p.stem.split(".")[-1] for p in OVERLAYS)]
)
def test_compose_config_validates(overlay: Path | None) -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    command = [*compose, "-f", str(BASE)]
    if overlay is not None:
        command += ["-f", str(overlay)]
    result = subprocess.run(
        [*command, "config", "-q"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{shlex.join(command)} config -q:\n{result.stderr}"


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
