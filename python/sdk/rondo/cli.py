"""``rondo``: the operator's command line for a running federation.

    rondo status http://coordinator:8081
    rondo history http://coordinator:8081 --csv > rounds.csv
    rondo model download http://aggregator:8091 final.safetensors
    rondo download-model http://coordinator:8081 round-3.safetensors --round 3

It reads what the services publish for anyone (the coordinator's ``/v1/status``,
``/v1/history`` and ``/v1/history.csv``, the aggregator's ``/v1/model`` and its model store's
``/v1/models`` and ``/v1/rounds/{r}/...``) with the SDK's own
:class:`rondo.transport.HttpClient`, so TLS options and proxy variables work as they do for
participants. Exit codes: 0 done, 1 the service refused or could not be reached (the message
says which), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ApiError, ChecksumMismatch, ModelNotAvailable, NetworkError
from .model_store import download_model
from .transport import HttpClient

EXIT_FAILED = 1

_DESCRIPTION = """\
Look at a running Rondo federation: its status and round history (from the coordinator) and
its global model (from the aggregator). Nothing here changes the federation."""

_EPILOG = """\
examples:
  rondo status http://127.0.0.1:8081
  rondo status http://127.0.0.1:8081 --json | jq .counts
  rondo history http://127.0.0.1:8081
  rondo history http://127.0.0.1:8081 --csv > rounds.csv
  rondo model download http://127.0.0.1:8091 model.safetensors
  rondo model download http://127.0.0.1:8091 model.safetensors --round 5
  rondo download-model http://127.0.0.1:8081 model.safetensors
  rondo download-model http://127.0.0.1:8081 round-2.safetensors --round 2

The status page for people is the coordinator's own root URL, e.g. http://127.0.0.1:8081/.
Exit codes: 0 done, 1 the service refused or was unreachable, 2 usage error."""


def _url(text: str) -> str:
    """A service's base URL, as an argparse type: a usage error (exit 2) when it is not one."""
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text.rstrip("/")


def _round(text: str) -> int:
    """A round number, as an argparse type."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a round number (0, 1, 2, ...)")
    return int(text)


def _base(url: str) -> str:
    return url.rstrip("/")


def _client(args: argparse.Namespace) -> HttpClient:
    return HttpClient(
        connect_timeout=args.timeout,
        ca_file=args.ca_file,
        client_cert=args.client_cert,
        client_key=args.client_key,
    )


def _get_json(args: argparse.Namespace, path: str) -> Any:
    with _client(args) as client:
        return client.call("GET", _base(args.url) + path, timeout=args.timeout)


def _get_bytes(args: argparse.Namespace, url: str) -> bytes:
    with _client(args) as client:
        return client.download(url, timeout=args.timeout).tobytes()


def _number(value: Any, digits: int = 6) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.{digits}g}"


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _table(rows: list[list[str]], out) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


# --- commands ----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, out) -> int:
    status = _get_json(args, "/v1/status")
    if args.json:
        json.dump(status, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"phase        {status['phase']}\n")
    out.write(
        f"round        {status['round']} of {status['rounds']} (attempt {status['attempt']})\n"
    )
    counts = status.get("counts", {})
    states = ["available", "selected", "training", "delivered", "dropped"]
    by_state = ", ".join(f"{counts.get(s, 0)} {s}" for s in states)
    out.write(f"participants {len(status['participants'])}: {by_state}\n")
    health = status.get("aggregator") or {}
    link = "connected" if health.get("connected") else "NOT connected"
    seen = health.get("last_answer_secs_ago")
    seen_text = f", last answer {_seconds(seen)} ago" if seen is not None else ""
    model = health.get("model_round")
    model_text = f", model of round {model}" if model is not None else ", no model yet"
    out.write(
        f"aggregator   {status.get('aggregator_url') or '-'}: {link}{seen_text}{model_text}\n"
    )
    if health.get("last_error"):
        out.write(f"             last error: {health['last_error']}\n")
    closed = [r for r in status["history"] if r.get("outcome")]
    if closed:
        last = closed[-1]
        # The code tells kinds of close apart at a glance; the reason says it in words.
        code = f" ({last['close_reason']})" if last.get("close_reason") else ""
        out.write(
            f"last round   {last['round']} (attempt {last['attempt']}) {last['outcome']}{code}: "
            f"{last.get('reason') or '-'}\n"
        )
    running = status["history"][-1] if status["history"] else None
    if running and running.get("outcome") is None:
        out.write(
            f"running      round {running['round']}: {len(running['delivered'])} of "
            f"{len(running['selected'])} selected have delivered\n"
        )
    return 0


def cmd_history(args: argparse.Namespace, out) -> int:
    if args.csv:
        out.write(_get_bytes(args, _base(args.url) + "/v1/history.csv").decode("utf-8"))
        return 0
    rounds = _get_json(args, "/v1/history")["rounds"]
    if args.json:
        json.dump(rounds, out, indent=2)
        out.write("\n")
        return 0
    if not rounds:
        out.write("no round has closed yet\n")
        return 0
    rows = [
        [
            "round",
            "attempt",
            "outcome",
            "duration",
            "delivered",
            "samples",
            "train loss",
            "eval loss",
            "closed by",
            "reason",
        ]
    ]
    for r in rounds:
        evaluation = r.get("evaluation") or {}
        rows.append(
            [
                str(r["round"]),
                str(r["attempt"]),
                r.get("outcome") or "-",
                _seconds(r.get("duration_secs")),
                f"{r['delivered']}/{r['selected']}",
                str(r["total_samples"]),
                _number((r.get("training_metrics") or {}).get("loss")),
                _number(evaluation.get("loss")),
                r.get("close_reason") or "-",
                r.get("reason") or "-",
            ]
        )
    _table(rows, out)
    return 0


def _header(data: bytes) -> dict[str, Any]:
    """The safetensors header of a model file (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError(f"its header claims {length} bytes, more than the file has")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header


def cmd_model_download(args: argparse.Namespace, out) -> int:
    data = _get_bytes(args, _base(args.url) + "/v1/model")
    try:
        header = _header(data)
    except ValueError as exc:
        raise NetworkError(f"the aggregator's answer is not a safetensors file: {exc}") from exc
    metadata = header.get("__metadata__") or {}
    round_ = metadata.get("rondo.round")
    if args.round is not None and round_ != str(args.round):
        out.write(
            f"rondo: the aggregator's model is that of round {round_}, not {args.round} "
            "(it keeps only the latest; nothing written)\n"
        )
        return EXIT_FAILED
    target = Path(args.output)
    if target.exists() and not args.force:
        out.write(f"rondo: {target} exists (use --force to replace it); nothing written\n")
        return EXIT_FAILED
    # Written next to the target and renamed over it: a reader never sees half a model.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    tensors = [k for k in header if k != "__metadata__"]
    out.write(
        f"wrote {target}: the global model of round {round_}, {len(tensors)} tensors, "
        f"{len(data):,} bytes\n"
    )
    return 0


def cmd_download_model(args: argparse.Namespace, out) -> int:
    target = Path(args.output)
    if target.exists() and not args.force:
        out.write(f"rondo: {target} exists (use --force to replace it); nothing written\n")
        return EXIT_FAILED
    try:
        with _client(args) as client:
            manifest = download_model(
                args.url, target, args.round, client=client, timeout=args.timeout
            )
    except (ModelNotAvailable, ChecksumMismatch) as exc:
        out.write(f"rondo: {exc}; nothing written\n")
        return EXIT_FAILED
    contributors = manifest.get("contributors") or {}
    out.write(
        f"wrote {target}: the global model of round {manifest['round']} (attempt "
        f"{manifest.get('attempt', '-')}, {manifest.get('source', '-')}), "
        f"{len(contributors)} contributors, {manifest.get('total_samples', 0)} samples, "
        f"{manifest['bytes']:,} bytes, SHA-256 {manifest['sha256']} (checked)\n"
    )
    return 0


# --- the parser --------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECS",
        help="seconds to wait for the service (default: %(default)s)",
    )
    group.add_argument("--ca-file", metavar="PEM", help="CA certificates to trust for https")
    group.add_argument("--client-cert", metavar="PEM", help="client certificate (mutual TLS)")
    group.add_argument("--client-key", metavar="PEM", help="its key, when in a file of its own")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = argparse.ArgumentParser(
        prog="rondo",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rondo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = commands.add_parser(
        "status",
        parents=[common],
        help="the federation's phase, round, participants and aggregator",
        description="Print the federation's phase, round, participants by state, the "
        "aggregator's health as the coordinator sees it, and the last round's outcome "
        "(GET COORDINATOR_URL/v1/status).",
    )
    status.add_argument(
        "url", type=_url, metavar="COORDINATOR_URL", help="e.g. http://127.0.0.1:8081"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(run=cmd_status)

    history = commands.add_parser(
        "history",
        parents=[common],
        help="every closed round: outcome, why it closed, samples, loss",
        description="Print every closed round attempt: its outcome and why it closed, how "
        "long it took, who delivered, the samples, the training and evaluation loss "
        "(GET COORDINATOR_URL/v1/history).",
    )
    history.add_argument(
        "url", type=_url, metavar="COORDINATOR_URL", help="e.g. http://127.0.0.1:8081"
    )
    form = history.add_mutually_exclusive_group()
    form.add_argument(
        "--csv",
        action="store_true",
        help="print the coordinator's CSV (one row per attempt, a column per metric)",
    )
    form.add_argument("--json", action="store_true", help="print the history as JSON")
    history.set_defaults(run=cmd_history)

    model = commands.add_parser(
        "model",
        help="the global model",
        description="The aggregator's global model.",
    )
    model_commands = model.add_subparsers(dest="model_command", metavar="download", required=True)
    download = model_commands.add_parser(
        "download",
        parents=[common],
        help="save the latest global model as a safetensors file",
        description="Save the aggregator's latest global model (GET AGGREGATOR_URL/v1/model) "
        "to OUTPUT, a safetensors file that safetensors, PyTorch, Keras or numpy can load. The "
        "file is written whole and then renamed into place.",
    )
    download.add_argument(
        "url", type=_url, metavar="AGGREGATOR_URL", help="e.g. http://127.0.0.1:8091"
    )
    download.add_argument(
        "output", metavar="OUTPUT", help="where to write it, e.g. model.safetensors"
    )
    download.add_argument(
        "--round",
        type=int,
        metavar="R",
        help="fail unless the model is that of round R (this reads only the latest; "
        "`rondo download-model` gets any round the model store keeps)",
    )
    download.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    download.set_defaults(run=cmd_model_download)

    stored = commands.add_parser(
        "download-model",
        parents=[common],
        help="save a round's model from the model store, checked against its manifest",
        description="Save the model of round R (default: the newest kept) from the "
        "aggregator's model store (store.data_dir) to OUTPUT: its manifest first (GET "
        "URL/v1/rounds/R/manifest, or the newest of URL/v1/models), then the file, streamed to "
        "a temporary file next to OUTPUT, its SHA-256 and length checked against the manifest, "
        "then renamed into place. URL is the coordinator's (it redirects to the aggregator) or "
        "the aggregator's.",
    )
    stored.add_argument(
        "url", type=_url, metavar="URL", help="e.g. http://127.0.0.1:8081 (the coordinator)"
    )
    stored.add_argument(
        "output", metavar="OUTPUT", help="where to write it, e.g. model.safetensors"
    )
    stored.add_argument(
        "--round", type=_round, metavar="R", help="the round (default: the newest kept)"
    )
    stored.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    stored.set_defaults(run=cmd_download_model)
    return parser


def main(argv: Sequence[str] | None = None, out=None) -> int:
    """The ``rondo`` command; returns its exit code."""
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return args.run(args, out)
    except ApiError as exc:
        print(f"rondo: the service refused: {exc}", file=sys.stderr)
    except NetworkError as exc:
        print(f"rondo: {exc}", file=sys.stderr)
    except BrokenPipeError:  # e.g. `rondo history URL --csv | head`
        sys.stderr.close()
        return 0
    return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
