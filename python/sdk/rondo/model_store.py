"""The aggregator's model store: every kept round's global model, downloaded to a file and
checked against its manifest.

An aggregator with ``store.data_dir`` keeps each round's model and a manifest (round, attempt,
contributors and their sample counts, SHA-256, length, time, rule). :func:`download_model`
saves one to a file, from the coordinator's URL (which redirects to the aggregator) or the
aggregator's own::

    manifest = rondo.download_model("http://127.0.0.1:8081", "final.safetensors")
    manifest = rondo.download_model("http://127.0.0.1:8081", "r3.safetensors", round=3)

The file is streamed to a temporary file next to ``path`` (a model of any size, a megabyte in
memory at a time), its SHA-256 and length checked against the manifest, fsynced, and only then
renamed to ``path``: ``path`` is either left as it was or holds the whole, checked model.

(:func:`rondo.models.download_model`, by contrast, returns the aggregator's latest model as
arrays, in memory.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import ApiError, ChecksumMismatch, ModelNotAvailable, NetworkError
from .transport import HttpClient

__all__ = ["download_model", "list_models", "manifest"]

DOWNLOAD_TIMEOUT = 600.0
"""Seconds without progress after which an exchange is given up."""

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _base(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url.rstrip("/")


def _check_round(round: int | None) -> None:
    if round is not None and (isinstance(round, bool) or not isinstance(round, int) or round < 0):
        raise ValueError(f"round must be a non-negative integer or None, got {round!r}")


def _checked_manifest(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it has what a download is checked against, else NetworkError."""
    ok = (
        isinstance(value, dict)
        and isinstance(value.get("round"), int)
        and isinstance(value.get("bytes"), int)
        and isinstance(value.get("sha256"), str)
        and _SHA256.fullmatch(value["sha256"]) is not None
    )
    if not ok:
        raise NetworkError(f"{where} did not answer with a model manifest: {str(value)[:200]}")
    return value


def _get_json(client: HttpClient, url: str, timeout: float) -> Any:
    fetched = client.fetch(url, timeout=timeout)
    try:
        return json.loads(fetched.body or b"")
    except ValueError as exc:
        raise NetworkError(f"GET {url} did not answer with JSON: {exc}") from exc


def _not_available(exc: ApiError, url: str, round: int | None) -> ModelNotAvailable | None:
    if exc.code == "no_model_store":
        return ModelNotAvailable(
            f"the aggregator behind {url} keeps no models (its store.data_dir is not set)",
            round,
            None,
        )
    if exc.code == "model_not_stored":
        return ModelNotAvailable(f"{url}: {exc.message}", round, None)
    return None


def _store_json(
    base: str, path: str, round: int | None, client: HttpClient | None, timeout: float
) -> Any:
    """``GET base + path`` as JSON, with the store's "not kept" answers as
    :class:`ModelNotAvailable` (about ``round``, or the store as a whole)."""
    http = client if client is not None else HttpClient()
    try:
        return _get_json(http, f"{base}{path}", timeout)
    except ApiError as exc:
        missing = _not_available(exc, base, round)
        if missing is None:
            raise
        raise missing from exc
    finally:
        if client is None:
            http.close()


def list_models(
    url: str, *, client: HttpClient | None = None, timeout: float = DOWNLOAD_TIMEOUT
) -> list[dict[str, Any]]:
    """The manifests of every model the store keeps, oldest round first (``GET /v1/models``).

    Args:
        url: the coordinator's or the aggregator's base URL.
        client: the :class:`~rondo.transport.HttpClient` to use (TLS options, proxies);
            default a new one, closed afterwards.
        timeout: seconds without progress after which the request is given up.

    Raises:
        ModelNotAvailable: the aggregator has no model store.
        ApiError: any other error answer.
        NetworkError: the service could not be reached, or did not answer with manifests.
    """
    base = _base(url)
    answer = _store_json(base, "/v1/models", None, client, timeout)
    models = answer.get("models") if isinstance(answer, dict) else None
    if not isinstance(models, list):
        raise NetworkError(f"GET {base}/v1/models did not answer with a list of manifests")
    return [_checked_manifest(m, f"GET {base}/v1/models") for m in models]


def manifest(
    url: str,
    round: int,
    *,
    client: HttpClient | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> dict[str, Any]:
    """The manifest of round ``round``'s stored model (``GET /v1/rounds/{round}/manifest``).

    Raises:
        ModelNotAvailable: the store does not keep that round, or there is no store.
        ApiError, NetworkError: as :func:`list_models`.
    """
    _check_round(round)
    base = _base(url)
    answer = _store_json(base, f"/v1/rounds/{round}/manifest", round, client, timeout)
    return _checked_manifest(answer, f"GET {base}/v1/rounds/{round}/manifest")


class _HashingWriter:
    """Writes to a file and hashes what it wrote."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.written = 0

    def write(self, data: memoryview, /) -> object:
        self.sha256.update(data)
        self.file.write(data)
        self.written += len(data)
        return len(data)


def download_model(
    url: str,
    path: str | os.PathLike[str],
    round: int | None = None,
    *,
    client: HttpClient | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> dict[str, Any]:
    """Save a stored round's global model (default: the newest kept) to ``path``, checked.

    The manifest comes first (``GET /v1/rounds/{round}/manifest``, or the newest of
    ``GET /v1/models``), then the model (``GET /v1/rounds/{round}/model`` without credentials),
    streamed to a temporary file in ``path``'s directory while its SHA-256 is computed. Only a
    file whose SHA-256 and length are the manifest's (and the ``X-Rondo-Sha256`` the
    aggregator sent) is fsynced and renamed to ``path``, replacing what was there; otherwise
    ``path`` is left as it was and the temporary file removed.

    Args:
        url: the coordinator's base URL (its model routes redirect to the aggregator, which
            this follows) or the aggregator's, e.g. ``http://127.0.0.1:8081``.
        path: where to write the safetensors file; its directory must exist.
        round: the round whose model is wanted; None for the newest the store keeps.
        client: the :class:`~rondo.transport.HttpClient` to use (TLS options, proxies);
            default a new one, closed afterwards.
        timeout: seconds without progress after which an exchange is given up.

    Returns:
        The model's manifest, as the store keeps it: ``round``, ``attempt``, ``source``,
        ``strategy``, ``contributors`` (participant id -> ``n_samples``), ``total_samples``,
        ``file``, ``sha256``, ``bytes``, ``written_at``, ``rondo_version``.

    Raises:
        ModelNotAvailable: no store, the store keeps no model yet, or not that round.
        ChecksumMismatch: what came is not the file the manifest describes.
        ApiError: any other error answer (e.g. 500 ``stored_model_corrupted``: the
            aggregator's own check of its file failed).
        NetworkError: a service could not be reached, or the download broke off.
        OSError: ``path`` could not be written.
    """
    _check_round(round)
    base = _base(url)
    target = Path(path)
    own = client is None
    http = client if client is not None else HttpClient()
    try:
        if round is None:
            kept = list_models(base, client=http, timeout=timeout)
            if not kept:
                raise ModelNotAvailable(
                    f"the model store behind {base} keeps no model yet", None, None
                )
            wanted = max(kept, key=lambda m: m["round"])
        else:
            wanted = manifest(base, round, client=http, timeout=timeout)
        model_url = f"{base}/v1/rounds/{wanted['round']}/model"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                writer = _HashingWriter(file)
                try:
                    fetched = http.fetch(model_url, timeout=timeout, sink=writer)
                except ApiError as exc:
                    missing = _not_available(exc, base, wanted["round"])
                    if missing is None:
                        raise
                    raise missing from exc
                sha256 = writer.sha256.hexdigest()
                sent = fetched.headers.get("x-rondo-sha256")
                problems = []
                if writer.written != wanted["bytes"]:
                    problems.append(f"{writer.written} bytes, the manifest says {wanted['bytes']}")
                if sha256 != wanted["sha256"]:
                    problems.append(f"SHA-256 {sha256}, the manifest says {wanted['sha256']}")
                if sent is not None and sent != wanted["sha256"]:
                    problems.append(f"the aggregator sent it as {sent}")
                if problems:
                    raise ChecksumMismatch(
                        f"{model_url} is not the model its manifest describes: "
                        + "; ".join(problems),
                        expected=wanted["sha256"],
                        actual=sha256,
                    )
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename is durable once the directory is.
        dir_fd = os.open(target.parent if str(target.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if own:
            http.close()
    return wanted
