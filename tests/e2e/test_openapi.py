"""The OpenAPI documents in docs/openapi/ are what the services serve, and they tell the truth.

- each service serves its committed document at `GET /openapi.json`;
- every documented path and method is routed, and every route of the routers is documented;
- real answers (success and error) validate against the documented response schemas, which
  are JSON Schema 2020-12 (OpenAPI 3.1), and every error body against the shared `Error` schema.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests
from safetensors.numpy import save_file

from rondo.safetensors_io import decode, encode

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("coordinator", "aggregator")
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

# The routes that rust/rondo-<service>/src/http.rs registers.
ROUTES = {
    "coordinator": {
        ("get", "/"),
        ("get", "/static/status.js"),
        ("get", "/static/status.css"),
        ("post", "/v1/participants"),
        ("post", "/v1/participants/{id}/heartbeat"),
        ("post", "/v1/participants/{id}/start_training"),
        ("post", "/v1/participants/{id}/evaluation"),
        ("get", "/v1/status"),
        ("get", "/v1/history"),
        ("get", "/v1/history.csv"),
        ("get", "/v1/model"),
        ("get", "/v1/models"),
        ("get", "/v1/rounds/{round}/model"),
        ("get", "/v1/rounds/{round}/manifest"),
        ("get", "/openapi.json"),
        ("get", "/healthz"),
        ("get", "/metrics"),
    },
    "aggregator": {
        ("get", "/v1/rounds/{round}/model"),
        ("get", "/v1/rounds/{round}/manifest"),
        ("post", "/v1/rounds/{round}/update"),
        ("get", "/v1/model"),
        ("get", "/v1/models"),
        ("get", "/v1/status"),
        ("get", "/openapi.json"),
        ("get", "/healthz"),
        ("get", "/metrics"),
    },
}
DUMMY_PARAMS = {"id": "00000000-0000-0000-0000-000000000000", "round": "1"}


def document(service: str) -> dict:
    return json.loads((ROOT / "docs" / "openapi" / f"{service}.json").read_text())


def operations(doc: dict) -> set[tuple[str, str]]:
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def url_of(base: str, path: str) -> str:
    return base + re.sub(r"\{(\w+)\}", lambda m: DUMMY_PARAMS[m.group(1)], path)


def validate(doc: dict, schema: dict, instance: object) -> None:
    """Validates against a schema of `doc`, resolving `#/components/...` refs within `doc`."""
    root = {**schema, "components": doc["components"]}
    jsonschema.Draft202012Validator(root).validate(instance)


def check_response(doc: dict, path: str, method: str, response: requests.Response) -> None:
    """The answer's status and media type are documented for the operation, its JSON body
    validates against the documented schema, an error body against `Error`, and documented
    headers are present."""
    operation = doc["paths"][path][method]
    where = f"{method.upper()} {path} -> {response.status_code}: {response.text[:300]}"
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"undocumented status: {where}"
    media = response.headers.get("content-type", "").split(";")[0].strip()
    assert media in documented["content"], f"undocumented media type {media!r}: {where}"
    if media == "application/json":
        body = response.json()
        validate(doc, documented["content"][media]["schema"], body)
        if response.status_code >= 400:
            validate(doc, {"$ref": "#/components/schemas/Error"}, body)
    for header in documented.get("headers", {}):
        assert header in response.headers, f"missing header {header}: {where}"


@pytest.fixture
def federation(start_federation):
    return start_federation()


@pytest.mark.parametrize("service", SERVICES)
def test_documents_are_openapi_31_with_valid_schemas(service):
    doc = document(service)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == f"Rondo {service} API"
    assert doc["info"]["version"] == "0.1.0"
    assert "docs/wire-format.md" in doc["info"]["description"]
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    # Every $ref points at something that exists.
    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node = doc
        for part in ref.split("/"):
            assert part in node, f"dangling $ref #/{ref}"
            node = node[part]
    schemes = doc["components"]["securitySchemes"]
    for path, item in doc["paths"].items():
        for method in item:
            for requirement in item[method].get("security", []):
                assert set(requirement) <= set(schemes), (method, path)


def test_services_serve_their_committed_document(federation):
    for service, base in (
        ("coordinator", federation.coordinator_url),
        ("aggregator", federation.aggregator_url),
    ):
        response = requests.get(f"{base}/openapi.json", timeout=5)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == document(service), f"{service} serves a stale document"


def test_every_documented_operation_is_routed(federation):
    for service, base in (
        ("coordinator", federation.coordinator_url),
        ("aggregator", federation.aggregator_url),
    ):
        doc = document(service)
        for method, path in sorted(operations(doc)):
            # The coordinator's model routes redirect (307, documented as such): not followed.
            response = requests.request(
                method, url_of(base, path), timeout=10, allow_redirects=False
            )
            where = f"{service}: {method.upper()} {path} -> {response.status_code}"
            assert response.status_code != 405, f"method not routed: {where}"
            if response.status_code == 404:
                # Unrouted paths get `unknown_route`; a handler's own 404s carry other codes.
                assert response.json()["error"]["code"] != "unknown_route", where
            check_response(doc, path, method, response)
        # And an undocumented path or method really is refused (the check above means something).
        missing = requests.get(f"{base}/v1/no-such-route", timeout=5)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "unknown_route"
        wrong_method = requests.delete(f"{base}/v1/status", timeout=5)
        assert wrong_method.status_code == 405
        assert wrong_method.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("service", SERVICES)
def test_every_route_is_documented(service):
    assert ROUTES[service] <= operations(document(service))
    # The list above is the router's: re-read it from the source so a new route can't hide.
    # Each service's own routes, plus the ones every service gets from rondo-net.
    sources = [
        ROOT / "rust" / f"rondo-{service}" / "src" / "http.rs",
        ROOT / "rust" / "rondo-net" / "src" / "api.rs",
    ]
    pattern = r'\.route\(\s*"([^"]+)",\s*(?:axum::routing::)?(get|post|put|delete)\('
    routed = {
        (method, path)
        for source in sources
        for path, method in re.findall(pattern, source.read_text())
    }
    assert routed == ROUTES[service]


def test_real_answers_validate_against_the_documents(start_federation, tmp_path):
    coordinator, aggregator = document("coordinator"), document("aggregator")
    initial = tmp_path / "initial.safetensors"
    shapes = {"w": (4, 3), "b": (3,)}
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, str(initial))
    federation = start_federation(
        coordinator={
            "federation.rounds": 1,
            "federation.min_clients": 1,
            "federation.heartbeat_timeout_secs": 120,
        },
        aggregator={"model.initial_model": initial, "api.max_body_bytes": 4096},
    )
    c, a = federation.coordinator_url, federation.aggregator_url

    def coord(method: str, path: str, id_: str = "", secret: str | None = None, **kw):
        headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
        url = c + path.replace("{id}", id_)
        response = requests.request(method, url, headers=headers, timeout=10, **kw)
        check_response(coordinator, path, method, response)
        return response

    def agg(method: str, path: str, round_: int | str = 1, token: str | None = None, **kw):
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        url = a + path.replace("{round}", str(round_))
        response = requests.request(method, url, headers=headers, timeout=10, **kw)
        check_response(aggregator, path, method, response)
        return response

    coord("get", "/v1/status")
    agg("get", "/v1/status")
    joined = coord("post", "/v1/participants", json={"name": "alice"})
    assert joined.status_code == 201
    me, secret = joined.json()["participant_id"], joined.json()["secret"]

    federation.wait_for(lambda s: s["phase"] == "training", what="round 1 to open")
    coord("get", "/v1/status")
    hb, st = "/v1/participants/{id}/heartbeat", "/v1/participants/{id}/start_training"
    assert coord("post", hb, me, secret).json()["action"] == "train"
    state = coord("post", hb, me, secret, params={"wait_secs": 0.1}).json()["state"]
    held = coord("post", hb, me, secret, params={"since": state, "wait_secs": 0.1}).json()
    assert held == {"action": "train", "round": 1, "attempt": 0, "reason": None, "state": state}
    token = coord("post", st, me, secret).json()["token"]
    coord("get", "/v1/status")

    model = agg("get", "/v1/rounds/{round}/model", 1, token)
    assert model.status_code == 200 and model.headers["x-rondo-round"] == "0"
    body = encode(
        {k: np.ones(s, np.float32) for k, s in shapes.items()},
        {"rondo.n_samples": "3", "rondo.metrics": json.dumps({"loss": 0.5})},
    )
    update = "/v1/rounds/{round}/update"
    errors = [
        (coord("post", hb, "no-such-id", "x"), 404, "unknown_participant"),
        (coord("post", hb, me, "wrong"), 401, "invalid_secret"),
        (coord("post", hb, me, secret, params={"wait_secs": "-1"}), 400, "invalid_query"),
        (coord("post", hb, me, secret, params={"wait_secs": "soon"}), 400, "invalid_query"),
        (coord("post", hb, me, secret, params={"no_such": "1"}), 400, "invalid_query"),
        (coord("post", st, me), 401, "missing_secret"),
        (coord("post", "/v1/participants", data="{nope"), 400, "invalid_body"),
        (coord("post", "/v1/participants", data=" " * 70_000 + "x"), 413, "invalid_body"),
        (agg("get", "/v1/rounds/{round}/model", "x", token), 400, "invalid_round"),
        (agg("get", "/v1/rounds/{round}/model", 1), 401, "missing_token"),
        (agg("get", "/v1/rounds/{round}/model", 2, token), 409, "wrong_round"),
        (agg("post", update, 1, "0" * 64, data=body), 401, "invalid_token"),
        (agg("post", update, 1, token, data=body[:-4]), 400, "upload_incomplete"),
        (agg("post", update, 1, token, data=body + b"x"), 400, "malformed_safetensors"),
        (agg("post", update, 1, token, data=struct.pack("<Q", 10**6) + body[8:]), 413,
         "body_too_large"),
    ]  # fmt: skip
    for response, status, code in errors:
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)

    assert agg("post", update, 1, token, data=body).status_code == 200
    agg("get", "/v1/status")
    final = federation.wait_for(lambda s: s["phase"] == "finished", what="the federation end")
    coord("get", "/v1/status")
    assert final["history"][-1]["outcome"] == "aggregated"
    assert final["history"][-1]["deliveries"][0]["metrics"] == {"loss": 0.5}
    assert [r["reason"].split(":")[0] for r in final["history"][-1]["rejections"]] == [
        "upload_incomplete",
        "malformed_safetensors",
        "body_too_large",
    ]
    assert coord("post", hb, me, secret).json()["action"] == "finish"
    assert coord("post", st, me, secret).status_code == 409  # not_selected
    assert coord("post", "/v1/participants", data="").status_code == 201
    late = agg("post", update, 1, token, data=body)
    assert late.json()["error"]["code"] == "token_expired"
    latest = agg("get", "/v1/model")
    assert decode(latest.content)[1]["rondo.round"] == "1"
    agg("get", "/v1/status")
    coord("get", "/metrics")
    agg("get", "/healthz")


def test_round_zero_answers_validate_against_the_documents(start_federation):
    coordinator, aggregator = document("coordinator"), document("aggregator")
    federation = start_federation(coordinator={"federation.rounds": 1, "federation.min_clients": 1})
    c, a = federation.coordinator_url, federation.aggregator_url
    joined = requests.post(f"{c}/v1/participants", timeout=5)
    check_response(coordinator, "/v1/participants", "post", joined)
    me, secret = joined.json()["participant_id"], joined.json()["secret"]
    federation.wait_for(lambda s: s["phase"] == "training", what="round 0 to open")
    auth = {"Authorization": f"Bearer {secret}"}
    ticket = requests.post(f"{c}/v1/participants/{me}/start_training", headers=auth, timeout=5)
    check_response(coordinator, "/v1/participants/{id}/start_training", "post", ticket)
    assert ticket.json()["round"] == 0 and ticket.json()["model_url"] is None
    auth = {"Authorization": f"Bearer {ticket.json()['token']}"}
    no_model = requests.get(f"{a}/v1/rounds/0/model", headers=auth, timeout=5)
    check_response(aggregator, "/v1/rounds/{round}/model", "get", no_model)
    assert no_model.json()["error"]["code"] == "no_model"
    for path in ("/v1/model", "/v1/status"):
        check_response(aggregator, path, "get", requests.get(f"{a}{path}", timeout=5))
    check_response(coordinator, "/v1/status", "get", requests.get(f"{c}/v1/status", timeout=5))
