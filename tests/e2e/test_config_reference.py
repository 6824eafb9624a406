"""docs/configuration.md documents every config key of both services, as the code has them.

The keys come from the binaries themselves, not from a list kept by hand: each config struct
refuses unknown fields (`deny_unknown_fields`) with serde's message "unknown field `x`,
expected one of `a`, `b`, … for key `section`", which names every field of that struct,
including any a later change gives a `#[serde(default)]`. Probing each section with an unknown
key through its `RONDO__` variable, and each field in turn one level down, walks the whole tree.
A key added to a config struct and not to the doc's table fails here, and so does a documented
key that no longer exists; each documented default must be the built-in one
(configs/dev-*.toml, compiled in), and each numeric key must take its `RONDO__SECTION__KEY`
override (a value of the wrong type there is refused, naming the key). A key whose default is
derived from another (`federation.training_timeout_secs`) is documented as "unset: …" and must
then be absent from the dev config.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

import pytest
from conftest import BIN_DIR, ROOT

DOC = ROOT / "docs" / "configuration.md"
SERVICES = ("coordinator", "aggregator")
PROBE = "zzprobe"
# A table of free-form names (the strategy's knobs), documented as one row.
MAPS = {"aggregation.options": "aggregation.options.<name>"}
# How the default column starts for a key with no value of its own in the dev config.
UNSET = "unset"
NUMERIC_TYPES = ("seconds", "integer", "number", "bytes")


def run(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = BIN_DIR / service
    if not binary.exists():
        pytest.skip(f"{binary} is not built (scripts/setup)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RONDO__")}
    return subprocess.run(
        [str(binary)], env={**clean, **env}, capture_output=True, text=True, timeout=30
    )


def env_name(path: str) -> str:
    return "RONDO__" + "__".join(part.upper() for part in path.split("."))


def fields_of(service: str, path: str) -> list[str] | None:
    """The fields of the struct at `path` ("" for the top level), or None when it is not a
    struct (a value, or a map that takes any name)."""
    var = env_name(f"{path}.{PROBE}" if path else PROBE)
    result = run(service, {var: "1"})
    assert result.returncode != 0, f"{service} accepted {var}: {result.stderr}"
    where = f" for key `{path}`" if path else ""
    # serde says "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, …" or
    # "there are no fields", by how many there are.
    m = re.search(
        rf"unknown field `{PROBE}`, (expected .*|there are no fields){re.escape(where)}$",
        result.stderr.strip(),
    )
    if m is None or (not path and " for key " in m.group(1)):
        return None
    return re.findall(r"`([a-z0-9_]+)`", m.group(1))


def code_keys(service: str) -> set[str]:
    """Every leaf key of the service's config, as dotted paths."""
    sections = fields_of(service, "")
    assert sections, f"{service}: the top-level probe named no section"
    keys: set[str] = set()
    todo = list(sections)
    while todo:
        path = todo.pop()
        if path in MAPS:
            keys.add(MAPS[path])
            continue
        fields = fields_of(service, path)
        if fields is None:
            keys.add(path)
        else:
            todo.extend(f"{path}.{field}" for field in fields)
    return keys


def doc_table(service: str) -> dict[str, list[str]]:
    """key -> its row's cells, from the service's table in the doc."""
    text = DOC.read_text()
    section = text.split(f"\n## {service.capitalize()}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and (m := re.fullmatch(r"`([a-z0-9_.<>]+)`", cells[0])):
            rows[m.group(1)] = cells
    return rows


def doc_rows(service: str) -> dict[str, str]:
    """key -> its default cell, from the service's table in the doc."""
    return {key: cells[2] for key, cells in doc_table(service).items()}


def dev_value(service: str, key: str):
    value = tomllib.loads((ROOT / "configs" / f"dev-{service}.toml").read_text())
    for part in key.split("."):
        value = value[part]
    return value


def in_dev_config(service: str, key: str) -> bool:
    try:
        dev_value(service, key)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("service", SERVICES)
def test_every_key_in_the_code_is_documented_and_no_other(service):
    in_code = code_keys(service)
    in_doc = set(doc_rows(service))
    assert len(in_code) >= 10
    assert in_code - in_doc == set(), f"{service}: keys not in docs/configuration.md"
    assert in_doc - in_code == set(), f"{service}: documented keys the code does not have"


@pytest.mark.parametrize("service", SERVICES)
def test_documented_defaults_are_the_built_in_ones(service):
    checked = 0
    for key, cell in doc_rows(service).items():
        if key in MAPS.values():
            continue
        if cell.startswith(UNSET):
            assert not in_dev_config(service, key), f"{service} {key}: documented {cell}"
            checked += 1
            continue
        m = re.match(r"`([^`]*)`", cell)
        assert m, f"{service} {key}: the default column should start with the value: {cell!r}"
        documented = tomllib.loads(f"v = {m.group(1)}")["v"]
        assert documented == dev_value(service, key), f"{service} {key}: documented {cell}"
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("service", SERVICES)
def test_every_numeric_key_takes_its_environment_override(service):
    checked = 0
    for key, cells in doc_table(service).items():
        if key in MAPS.values():
            continue
        if cells[2].startswith(UNSET):
            if cells[1] not in NUMERIC_TYPES:
                continue
        else:
            default = dev_value(service, key)
            if isinstance(default, bool) or not isinstance(default, int | float):
                continue
        var = env_name(key)
        result = run(service, {var: "not-a-number"})
        assert result.returncode == 2, f"{var}=not-a-number: {result.returncode} {result.stderr}"
        assert key in result.stderr, f"{var}: the refusal should name {key}: {result.stderr}"
        checked += 1
    assert checked >= 5
