"""``run_participant``: the network side of a participant.

Two threads cooperate. A background thread heartbeats and records the coordinator's latest
answer; the calling thread acts on that answer (join again, train a round, finish). Heartbeats
therefore keep flowing while a round trains, which is what keeps a slow participant from being
declared dead.

Heartbeats are long polls: each one tells the coordinator the ``state`` of the previous answer
(``since``) and asks it to hold the request until something changes (``wait_secs``, at most
``LONG_POLL_SECS``; the coordinator caps the hold at half its heartbeat timeout, so a held
request still proves the participant alive). A participant therefore hears of a new round at
once, and while nothing happens sends one request per hold rather than one per period: with a
hundred participants in one process, that is what keeps the GIL free for training. The calling
thread sleeps until the heartbeat thread has news (waking now and then for the stop event).

Both threads share one transport (an :class:`~rondo.transport.HttpClient` unless the caller
passes its own, whose pool of kept-alive connections gives each thread its own). The transport
re-sends only what is idempotent (heartbeats, ``start_training``, downloads); an upload that
failed on the network is sent again here, a bounded number of times: the aggregator accepts
one update per token, so a retry of an upload that did get through is refused (as
``duplicate_update``, or as ``token_expired`` when it closed the round, which the coordinator's
history then confirms), and the update is counted once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any, NamedTuple

import numpy as np

from .errors import ApiError, CoordinatorUnavailable, NetworkError, RondoError
from .participant import Participant, ParticipantReport
from .safetensors_io import SafetensorsStream, decode, encode_stream
from .transport import HttpClient, Transport
from .types import Weights
from .util import Backoff

CONTROL_TIMEOUT = 10.0
"""Seconds to wait for the coordinator's small JSON answers."""
DATA_TIMEOUT = 600.0
"""Seconds without progress after which a model download or upload is given up."""
LONG_POLL_SECS = 30.0
"""Longest hold asked of the coordinator per heartbeat (it applies its own, shorter, cap)."""
MAX_BACKOFF = 2.0
"""Longest pause between two join attempts while the coordinator is unreachable."""
STOP_CHECK_SECS = 0.25
"""How often the main thread, while waiting for a heartbeat answer, looks at the stop event."""
UPLOAD_RETRIES = 2
"""How many times an update is sent again after a network failure."""
UPLOAD_RETRY_DELAY = 0.5
"""First pause before sending an update again (doubling, jittered, up to ``MAX_BACKOFF``)."""
HISTORY_WAIT_SECS = 2.0
"""How long to look for a round in the coordinator's history, when a retried upload finds the
round closed, to tell whether the first attempt had got in."""

# Answers to a retried upload that say something about the attempt before it: it got in
# (`duplicate_update`), it may have (`token_expired`: the round closed), it is still being read
# (`upload_in_progress`).
_RETRY_ANSWERS = ("duplicate_update", "token_expired", "upload_in_progress")

# Refusals of a service at one of its limits, before it read or changed anything: the request
# is sent again after a while, as after a network failure.
_BUSY_ANSWERS = (
    "too_many_connections",
    "too_many_uploads",
    "too_many_joins",
    "federation_full",
    "store_unavailable",
)

# Heartbeat errors that mean the coordinator does not know this identity (any more): the
# participant must join again, exactly as after a `rejected` answer.
_IDENTITY_ERRORS = ("unknown_participant", "invalid_secret", "credential_expired")


class _Identity(NamedTuple):
    participant_id: str
    secret: str


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class _Link:
    """State shared by the heartbeat thread and the main thread, guarded by ``cond``."""

    def __init__(self, identity: _Identity) -> None:
        self.cond = threading.Condition()
        self.identity = identity
        self.action: dict[str, Any] = {}
        self.seq = 0  # bumped on every heartbeat answer
        # Bumped whenever a `train` answer differs from the previous answer, so that each
        # selection is handled once even though heartbeats repeat `train r` until it closes,
        # while a new attempt of the same round (after a `standby`) is handled again.
        self.episode = 0
        self.last_answer: tuple[Any, Any, Any] | None = None
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def shutdown(self) -> None:
        self.halt.set()
        with self.cond:
            self.cond.notify_all()


class _Run:
    """One ``run_participant`` call."""

    def __init__(
        self,
        participant: Participant,
        coordinator_url: str,
        name: str | None,
        connect_timeout: float,
        log: logging.Logger,
        stop: threading.Event,
        transport: Transport,
    ) -> None:
        self.participant = participant
        self.base = coordinator_url.rstrip("/")
        self.name = name
        self.connect_timeout = connect_timeout
        self.log = log
        self.stop = stop
        self.http = transport  # shared by the main thread and the heartbeat thread
        self.report = ParticipantReport()
        self.label = name or "participant"
        # The previous round's download buffer, when nothing of it outlived the round: the
        # next download of the same size is read into it (no new allocation to fault in).
        self.spare: np.ndarray | None = None
        self.training_as = ""  # the participant id of the round being trained
        self.join_secret: str | None = None  # presented at join, as the bearer token

    # --- joining -------------------------------------------------------------------------------

    def join(self) -> tuple[_Identity, float] | None:
        """Join, retrying with backoff while the coordinator is unreachable; None if stopped."""
        deadline = time.monotonic() + self.connect_timeout
        backoff = Backoff(0.1, MAX_BACKOFF)
        body: dict[str, Any] = {"name": self.name} if self.name else {}
        if self.participant.can_evaluate():
            body["can_evaluate"] = True
        while True:
            remaining = deadline - time.monotonic()
            try:
                answer = self.http.call(
                    "POST",
                    f"{self.base}/v1/participants",
                    body=body or None,
                    headers=_bearer(self.join_secret) if self.join_secret else None,
                    timeout=max(0.1, min(CONTROL_TIMEOUT, remaining)),
                )
                identity = _Identity(str(answer["participant_id"]), str(answer["secret"]))
                period = float(answer["heartbeat_period_secs"])
                break
            except NetworkError as exc:
                failure: Exception = exc
            except ApiError as exc:
                if exc.status < 500 and exc.code not in _BUSY_ANSWERS:
                    raise
                failure = exc  # e.g. a restarting coordinator behind a proxy, or a full one
            except (ValueError, KeyError, TypeError) as exc:
                raise RondoError(f"unexpected answer to join: {exc!r}") from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CoordinatorUnavailable(
                    f"coordinator at {self.base} not reachable within "
                    f"{self.connect_timeout:g} s: {failure}"
                ) from failure
            self.log.info("%s: coordinator not reachable yet (%s)", self.label, failure)
            if self.stop.wait(min(backoff.next_delay() or MAX_BACKOFF, remaining)):
                return None
        if not self.name:
            self.label = identity.participant_id
        self.report.participant_ids.append(identity.participant_id)
        self.log.info("%s: joined as %s", self.label, identity.participant_id)
        return identity, period

    # --- heartbeats (background thread) -------------------------------------------------------

    def heartbeat_loop(self, link: _Link, period: float) -> None:
        try:
            self._heartbeat_loop(self.http, link, period)
        except BaseException as exc:  # surfaced to the main thread, which raises it
            with link.cond:
                link.error = exc
                link.cond.notify_all()

    def _heartbeat_loop(self, http: Transport, link: _Link, period: float) -> None:
        failing = False
        since: str | None = None  # the `state` of the previous answer to this identity
        asked: _Identity | None = None
        while not (self.stop.is_set() or link.halt.is_set()):
            started = time.monotonic()
            with link.cond:
                identity = link.identity
            if identity is not asked:  # first call, or joined again: nothing to compare with
                asked, since = identity, None
            url = f"{self.base}/v1/participants/{identity.participant_id}/heartbeat"
            params: dict[str, str | float] = {"wait_secs": max(period, LONG_POLL_SECS)}
            if since is not None:
                params["since"] = since
            sent_since, since = since, None
            answer: dict[str, Any] | None = None
            try:
                answer = http.call(
                    "POST",
                    url,
                    params=params,
                    headers=_bearer(identity.secret),
                    # The coordinator may hold the answer for up to `wait_secs`.
                    timeout=max(period, LONG_POLL_SECS) + CONTROL_TIMEOUT,
                    # A heartbeat seen twice only refreshes `last_seen` twice.
                    idempotent=True,
                )
            except (ApiError, NetworkError, ValueError) as exc:
                if isinstance(exc, ApiError) and exc.code in _IDENTITY_ERRORS:
                    answer = {"action": "rejected", "round": None, "reason": str(exc)}
                else:
                    # Log the first failure of a streak only: a coordinator hiccup of a few
                    # seconds must not flood the log, and the participant just keeps trying.
                    level = logging.DEBUG if failing else logging.WARNING
                    self.log.log(level, "%s: heartbeat failed, will retry: %s", self.label, exc)
                    failing = True
            if answer is not None:
                if failing:
                    self.log.info("%s: coordinator reachable again", self.label)
                    failing = False
                if self._record(link, identity, answer):
                    return
                state = answer.get("state") if isinstance(answer, dict) else None
                if isinstance(state, str):
                    since = state
                    if state != sent_since or time.monotonic() - started >= period:
                        continue  # news, or the coordinator held the request: ask again now
                # No `state` (a coordinator without long polls), or an answer that came back
                # early and unchanged: heartbeat once per period, as plain polling does.
            link.halt.wait(max(0.0, period - (time.monotonic() - started)))

    def _record(self, link: _Link, identity: _Identity, answer: dict[str, Any]) -> bool:
        """Publish a heartbeat answer; True when heartbeats must end (``finish``)."""
        action = answer.get("action")
        self.log.debug("%s: heartbeat -> %s %s", self.label, action, answer.get("round"))
        with link.cond:
            # `attempt` tells a rerun of a failed round from the run before it.
            key = (action, answer.get("round"), answer.get("attempt"))
            if action in ("train", "evaluate") and key != link.last_answer:
                link.episode += 1
            link.last_answer = key
            link.action = answer
            link.seq += 1
            link.cond.notify_all()
            if action == "rejected":
                # Stay quiet until the main thread has joined again under a new identity.
                while link.identity is identity and not link.halt.is_set():
                    link.cond.wait()
                link.last_answer = None
        return action == "finish"

    # --- main loop ----------------------------------------------------------------------------

    def run(self, heartbeat_period: float | None) -> ParticipantReport:
        joined = self.join()
        if joined is None:
            self.report.final_action = "stopped"
            return self.report
        identity, default_period = joined
        period = heartbeat_period if heartbeat_period is not None else default_period
        link = _Link(identity)
        thread = threading.Thread(
            target=self.heartbeat_loop,
            args=(link, period),
            name=f"rondo-heartbeat-{self.label}",
            daemon=True,  # never keeps the interpreter alive; it is also halted explicitly
        )
        thread.start()
        try:
            self._main_loop(link)
        finally:
            link.shutdown()
            # A heartbeat may be in flight (held up to a period by the coordinator); the halted
            # thread sends no other and ends when it returns. It is a daemon: no need to wait.
            thread.join(timeout=0.1)
        return self.report

    def _main_loop(self, link: _Link) -> None:
        seen_seq = handled_episode = 0
        while True:
            with link.cond:
                # Sleep until the heartbeat thread has news; wake now and then only to notice
                # the caller's stop_event (an Event cannot notify this condition).
                while link.seq == seen_seq and link.error is None and not self.stop.is_set():
                    link.cond.wait(STOP_CHECK_SECS)
                if link.error is not None:
                    raise RondoError("heartbeat thread failed") from link.error
                if self.stop.is_set():
                    self.report.final_action = "stopped"
                    return
                seen_seq, action, episode = link.seq, dict(link.action), link.episode
                identity = link.identity
            kind = action.get("action")
            if kind == "finish":
                self.log.info("%s: finished", self.label)
                self.report.final_action = "finish"
                return
            if kind == "rejected":
                self.log.warning(
                    "%s: rejected by the coordinator (%s); joining again",
                    self.label,
                    action.get("reason"),
                )
                joined = self.join()
                if joined is None:
                    self.report.final_action = "stopped"
                    return
                with link.cond:
                    link.identity = joined[0]
                    link.cond.notify_all()
            elif kind == "evaluate" and episode != handled_episode:
                # The final model: heartbeats repeat `evaluate` until the report is in.
                handled_episode = episode
                self._evaluate_final(identity, int(action["round"]), str(action["model_url"]))
            elif kind == "train" and episode != handled_episode:
                handled_episode = episode
                if not self._train(identity, int(action["round"])):
                    handled_episode = 0  # start_training did not get through: try again
                if self.stop.is_set():
                    self.report.final_action = "stopped"
                    return

    # --- one round ----------------------------------------------------------------------------

    def _train(self, identity: _Identity, round_: int) -> bool:
        """Handle a `train` selection; False when start_training should be retried."""
        self.training_as = identity.participant_id
        try:
            ticket = self.http.call(
                "POST",
                f"{self.base}/v1/participants/{identity.participant_id}/start_training",
                headers=_bearer(identity.secret),
                timeout=CONTROL_TIMEOUT,
                # The coordinator answers it again with the same token, changing nothing else.
                idempotent=True,
            )
        except ApiError as exc:
            if exc.code in _BUSY_ANSWERS:
                self.log.warning("%s: start_training for round %d: %s", self.label, round_, exc)
                return False
            # e.g. not_selected: the round closed between the heartbeat and this call.
            self.log.warning("%s: start_training for round %d refused: %s", self.label, round_, exc)
            return True
        except NetworkError as exc:
            self.log.warning("%s: start_training for round %d failed: %s", self.label, round_, exc)
            return False
        round_ = int(ticket["round"])
        token = str(ticket["token"])
        upload_url = str(ticket["upload_url"])
        try:
            if ticket.get("model_url") is None:
                # Round 0: this participant's initial weights become the global model.
                weights = self.participant.initial_weights()
                if not self.stop.is_set():  # a set stop event plays a crash: no upload
                    self._upload(upload_url, token, round_, weights, 1, {})
            else:
                evaluate = ticket.get("evaluate_round")
                self._train_on(
                    str(ticket["model_url"]),
                    upload_url,
                    token,
                    round_,
                    (identity, int(evaluate)) if evaluate is not None else None,
                )
        except ApiError as exc:
            if exc.code not in _BUSY_ANSWERS:
                self.log.warning("%s: round %d: %s", self.label, round_, exc)
                self.report.rejected_uploads[round_] = exc.code
                return True
            self.log.warning("%s: round %d: %s; trying the round again", self.label, round_, exc)
            self.report.rejected_uploads[round_] = exc.code
            return False
        except NetworkError as exc:
            # The aggregator may be restarting: while the coordinator still says "train", the
            # round is tried again (start_training answers the same token; an update that did
            # get in is then answered as such, never counted twice).
            self.log.warning(
                "%s: round %d: aggregator not reachable (%s); trying the round again",
                self.label,
                round_,
                exc,
            )
            self.report.rejected_uploads[round_] = "network_error"
            return False
        else:
            # A try of this round that failed on the network earlier is behind it now.
            self.report.rejected_uploads.pop(round_, None)
        return True

    def _train_on(
        self,
        model_url: str,
        upload_url: str,
        token: str,
        round_: int,
        evaluate: tuple[_Identity, int] | None = None,
    ) -> None:
        """Download the global model, let the participant train on it, upload the result; when
        ``evaluate`` says so, score the downloaded model first and report it."""
        data = self.http.download(
            model_url, headers=_bearer(token), timeout=DATA_TIMEOUT, into=self.spare
        )
        self.spare = None
        try:
            # Zero-copy: the arrays are writable views of `data`, which they keep alive. A BF16
            # model without ml_dtypes raises DTypeUnavailable here, before any training.
            weights, _ = decode(data)
        except ValueError as exc:
            raise NetworkError(f"download of {model_url} is not a valid model: {exc}") from exc
        if evaluate is not None:
            self._evaluate(evaluate[0], evaluate[1], weights)
        new_weights, n_samples, metrics = self.participant.train_round(weights, round_)
        del weights
        if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"train_round must return n_samples >= 1, got {n_samples!r}")
        if self.stop.is_set():
            return  # a set stop event plays a crash: no upload
        self._upload(upload_url, token, round_, new_weights, int(n_samples), metrics)
        del new_weights
        # References left: this frame's `data` and getrefcount's argument. Any more means an
        # array of this round (a view of `data`) is still held, by the participant or anyone:
        # then the buffer is theirs, and the next download gets a new one.
        if getattr(sys, "getrefcount", lambda _: 0)(data) == 2:
            self.spare = data

    # --- federated evaluation -----------------------------------------------------------------

    def _evaluate_final(self, identity: _Identity, round_: int, model_url: str) -> None:
        """Download the final global model and score it."""
        try:
            data = self.http.download(model_url, timeout=DATA_TIMEOUT)
            weights, _ = decode(data)
        except (ApiError, NetworkError, ValueError) as exc:
            self.log.warning("%s: final model not downloaded for evaluation: %s", self.label, exc)
            return
        self._evaluate(identity, round_, weights)

    def _evaluate(self, identity: _Identity, round_: int, weights: Weights) -> None:
        """Let the participant score ``weights`` (the model of ``round_``) and report it. A
        failure is logged, never raised: evaluation must not cost the round."""
        try:
            loss, n_samples, metrics = self.participant.evaluate(weights, round_)
            body = {
                "round": round_,
                "loss": float(loss),
                "n_samples": int(n_samples),
                "metrics": {str(k): float(v) for k, v in metrics.items()},
            }
        except Exception as exc:  # the participant's code: report nothing, keep training
            self.log.warning("%s: evaluate(round %d) failed: %r", self.label, round_, exc)
            return
        try:
            self.http.call(
                "POST",
                f"{self.base}/v1/participants/{identity.participant_id}/evaluation",
                body=body,
                headers=_bearer(identity.secret),
                timeout=CONTROL_TIMEOUT,
                # A second copy is refused as already_reported: safe to send again.
                idempotent=True,
            )
        except (ApiError, NetworkError) as exc:
            self.log.warning("%s: evaluation of round %d not reported: %s", self.label, round_, exc)
            return
        self.report.evaluated.append(round_)
        self.log.info("%s: evaluated the model of round %d: loss %.4g", self.label, round_, loss)

    def _upload(
        self,
        upload_url: str,
        token: str,
        round_: int,
        weights: Weights,
        n_samples: int,
        metrics: dict[str, float],
    ) -> None:
        metadata = {"rondo.n_samples": str(n_samples)}
        finite = {}
        for key, value in metrics.items():
            if math.isfinite(float(value)):
                finite[str(key)] = float(value)
            else:
                self.log.warning("%s: metric %r is %s; not sent", self.label, key, value)
        if finite:
            metadata["rondo.metrics"] = json.dumps(finite)
        # Sent straight from the arrays' memory, with a Content-Length.
        self._send_update(upload_url, token, round_, encode_stream(weights, metadata))
        self.report.rounds_trained.append(round_)
        what = "uploaded initial weights" if round_ == 0 else "trained"
        self.log.info("%s: %s round %d", self.label, what, round_)

    def _send_update(
        self, upload_url: str, token: str, round_: int, stream: SafetensorsStream
    ) -> None:
        """Upload, and after a network failure upload again (the stream starts over).

        The transport never re-sends an upload by itself: bytes of it may have reached the
        aggregator. Here that is safe, as the aggregator accepts one update per token. When an
        earlier attempt did get through, the next one is refused as ``duplicate_update`` (the
        update is in), or, if that update was the round's last and the round closed at once,
        as ``token_expired``: then the coordinator's history tells whether this participant
        delivered. ``upload_in_progress`` means the aggregator is still reading an earlier
        attempt (it drops it when it notices the broken connection): wait, and send again.

        Raises:
            NetworkError: every attempt failed on the network, or a retry found the round
                closed without this update.
            ApiError: the aggregator refused the update.
        """
        headers = {
            **_bearer(token),
            "Content-Type": "application/octet-stream",
            # The aggregator then takes the token only from the participant it was issued to.
            "X-Rondo-Participant": self.training_as,
        }
        backoff = Backoff(UPLOAD_RETRY_DELAY, MAX_BACKOFF, attempts=UPLOAD_RETRIES)
        failure: RondoError | None = None  # the network failure that led to retrying
        while True:
            try:
                self.http.upload(upload_url, stream, headers=headers, timeout=DATA_TIMEOUT)
                return
            except NetworkError as exc:
                failure = retrying_for = exc
            except ApiError as exc:
                if exc.code in _BUSY_ANSWERS:
                    # Refused before the body was read: nothing of this attempt got in.
                    retrying_for = exc
                else:
                    if failure is None or exc.code not in _RETRY_ANSWERS:
                        raise
                    if exc.code == "duplicate_update" or (
                        exc.code == "token_expired" and self._delivered(round_)
                    ):
                        self.log.info(
                            "%s: round %d: an earlier attempt of the upload had got in (%s)",
                            self.label,
                            round_,
                            exc.code,
                        )
                        return
                    if exc.code == "token_expired":
                        raise failure from exc  # the round closed without it: that lost attempt
                    retrying_for = failure
            delay = backoff.next_delay()
            if delay is None:
                raise retrying_for
            self.log.warning(
                "%s: round %d: upload failed (%s); sending it again in %g s",
                self.label,
                round_,
                retrying_for,
                delay,
            )
            if self.stop.wait(delay):
                raise retrying_for  # a set stop event plays a crash: no more attempts

    def _delivered(self, round_: int) -> bool:
        """Whether the coordinator's history lists this participant's update in ``round_``
        (looked for a short while: the coordinator learns that a round closed just after the
        aggregator has closed it)."""
        deadline = time.monotonic() + HISTORY_WAIT_SECS
        while True:
            try:
                status = self.http.call("GET", f"{self.base}/v1/status", timeout=CONTROL_TIMEOUT)
                history = status["history"]
                if any(
                    entry["round"] == round_ and self.training_as in entry["delivered"]
                    for entry in history
                ):
                    return True
            except (ApiError, NetworkError, ValueError, KeyError, TypeError) as exc:
                self.log.debug("%s: coordinator status unavailable: %s", self.label, exc)
            if time.monotonic() >= deadline or self.stop.wait(0.1):
                return False


def run_participant(
    participant: Participant,
    coordinator_url: str,
    heartbeat_period: float | None = None,
    name: str | None = None,
    connect_timeout: float = 60.0,
    log: logging.Logger | None = None,
    stop_event: threading.Event | None = None,
    *,
    transport: Transport | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
    join_secret: str | None = None,
) -> ParticipantReport:
    """Take part in federated learning until the coordinator says all rounds are done.

    Joins the coordinator at ``coordinator_url`` (retrying with exponential backoff, at most
    2 s apart, while it is unreachable), then heartbeats from a background thread (each one a
    long poll that the coordinator answers as soon as there is news, and otherwise holds for up
    to half its heartbeat timeout) and, in the calling
    thread, trains each round it is selected for: downloads the global model, calls
    :meth:`Participant.train_round` with it (writable arrays, views of the downloaded buffer)
    and uploads the result. Round 0 uploads :meth:`Participant.initial_weights` instead.

    Failures are survived, not raised: a rejected upload is logged, recorded in the report and
    not retried (an upload that failed on the network is sent again, twice at most: the
    aggregator takes one update per token); heartbeats that fail are retried; a ``rejected``
    answer (or a coordinator that forgot this participant) leads to joining again under a new
    id.

    ``https://`` URLs (the coordinator's, and the aggregator's that it hands out) are verified
    against the system's certificate authorities, or ``ca_file``; proxies are taken from
    ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` (see :class:`rondo.transport.HttpClient`).

    Args:
        participant: the user's training code.
        coordinator_url: base URL of the coordinator, e.g. ``http://127.0.0.1:8081``.
        heartbeat_period: seconds between heartbeats when the coordinator does not hold them
            (an older coordinator, or one that answers early); ``None`` uses the
            coordinator's.
        name: a label shown in the coordinator's status and used in log messages.
        connect_timeout: how long to keep trying to join, in seconds.
        log: where to log; default the ``"rondo"`` logger.
        stop_event: when set (from any thread), no further heartbeat is sent and the call
            returns promptly with ``final_action == "stopped"``. A round in progress is not
            uploaded. ``train_round`` runs in the calling thread and is not interrupted, so
            to simulate a participant that dies mid-round, set the event inside
            ``train_round`` and return (or block): heartbeats stop at once, nothing is uploaded.
        transport: what to speak HTTP with instead of an :class:`~rondo.transport.HttpClient`:
            any object with the methods of the :class:`~rondo.transport.Transport` protocol
            (``call``, ``download``, ``upload``), used from two threads at once. It is not
            closed here; ``ca_file`` and the client certificate do not apply to it.
        ca_file: PEM file of the certificate authorities to trust for ``https`` URLs instead of
            the system's.
        client_cert: PEM certificate (chain) to present for mutual TLS; it may include the key.
        client_key: PEM private key of ``client_cert``, when it is a file of its own.
        join_secret: the federation's join secret, when it has one (``federation.join_secret``);
            ``None`` reads ``$RONDO_JOIN_SECRET`` (unset: none). A wrong or missing one is
            refused at join with :class:`~rondo.errors.ApiError` (``invalid_join_secret``,
            ``missing_join_secret``), and so is a name the federation does not allow
            (``not_allowed``).

    Returns:
        A :class:`ParticipantReport` of what happened.

    Raises:
        CoordinatorUnavailable: the coordinator could not be reached within
            ``connect_timeout`` (also when joining again after a rejection).
        ApiError: the coordinator refused to let this participant join.
        DTypeUnavailable: the global model has a tensor this Python cannot represent (BF16
            without the ``ml_dtypes`` package); raised when the model is downloaded, before
            ``train_round`` is called.
        ValueError: ``transport`` given together with TLS files.
        TypeError: ``transport`` does not have the methods of the Transport protocol.
        OSError, ssl.SSLError: the TLS files cannot be loaded.
        Exception: whatever ``initial_weights`` or ``train_round`` raised.
    """
    stop = stop_event if stop_event is not None else threading.Event()
    owned: HttpClient | None = None
    if transport is None:
        transport = owned = HttpClient(
            ca_file=ca_file, client_cert=client_cert, client_key=client_key
        )
    elif ca_file is not None or client_cert is not None or client_key is not None:
        raise ValueError(
            "ca_file, client_cert and client_key configure the SDK's own transport; "
            "with transport=..., configure that transport instead"
        )
    elif not isinstance(transport, Transport):
        raise TypeError(
            f"transport {transport!r} lacks the methods of rondo.transport.Transport "
            "(call, download, upload)"
        )
    run = _Run(participant, coordinator_url, name, connect_timeout, log or _LOG, stop, transport)
    run.join_secret = (
        join_secret if join_secret is not None else os.environ.get("RONDO_JOIN_SECRET")
    )
    try:
        return run.run(heartbeat_period)
    finally:
        if owned is not None:
            owned.close()


_LOG = logging.getLogger("rondo")
