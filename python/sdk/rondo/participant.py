"""The participant interface that user code implements, and the report of a run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .types import Weights


class Participant(ABC):
    """A federated-learning participant: trains on its own data, never ships it anywhere.

    Subclass it and implement two methods; :func:`rondo.run_participant` does all the network
    work (joining, heartbeats, downloads, uploads)::

        class MyParticipant(rondo.Participant):
            def initial_weights(self) -> rondo.Weights:
                return {"dense/kernel": np.zeros((4, 1), np.float32)}

            def train_round(self, weights, round):
                new = {k: v - 0.1 * grad(k, v) for k, v in weights.items()}
                return new, len(self.data), {"loss": 0.3}
    """

    @abstractmethod
    def initial_weights(self) -> Weights:
        """Return the model to start from.

        Called only when this participant is selected for round 0, which establishes the initial
        global model (when the aggregator was not started with one). The tensor names, dtypes
        and shapes returned here define the model every later update must match.
        """

    @abstractmethod
    def train_round(self, weights: Weights, round: int) -> tuple[Weights, int, dict[str, float]]:
        """Train on local data, starting from the global model ``weights``, for round ``round``.

        ``weights`` are the downloaded global model: writable arrays, views of the download
        buffer (no copy was made), so they may be modified in place and returned. Return
        ``(new_weights, n_samples, metrics)``: the trained model, with the same tensor names,
        dtypes and shapes as ``weights``; how many samples it was trained on (>= 1, the weight of
        this update in the federated average); and metrics such as ``{"loss": 0.31}``.
        """

    def evaluate(self, weights: Weights, round: int) -> tuple[float, int, dict[str, float]]:
        """Score the global model of round ``round`` on local data (federated evaluation).

        Optional: a participant that overrides it tells the coordinator at join that it can
        evaluate, and is then asked to (``federation.evaluate_every``, ``evaluate_fraction``):
        before training a round, on the model it was given to train from, and once the last
        round closed, on the final model. ``weights`` must not be modified (training starts
        from the same arrays). Return ``(loss, n_samples, metrics)``: the loss on the data it
        scored, how many samples that was (>= 1, its weight in the federation's mean), and
        other metrics such as ``{"rmse": 0.12}``.
        """
        raise NotImplementedError

    @classmethod
    def can_evaluate(cls) -> bool:
        """Whether this class implements :meth:`evaluate`."""
        return cls.evaluate is not Participant.evaluate


@dataclass
class ParticipantReport:
    """What happened during one :func:`rondo.run_participant` call."""

    participant_ids: list[str] = field(default_factory=list)
    """Every id the coordinator gave this participant, in order (a rejection means a new one)."""
    rounds_trained: list[int] = field(default_factory=list)
    """Rounds whose update was accepted by the aggregator (round 0: the initial weights)."""
    evaluated: list[int] = field(default_factory=list)
    """Rounds whose global model this participant scored and reported (federated evaluation)."""
    rejected_uploads: dict[int, str] = field(default_factory=dict)
    """Rounds whose update was not accepted -> error code (e.g. ``"token_expired"``, or
    ``"network_error"`` when the aggregator could not be reached)."""
    final_action: str | None = None
    """``"finish"`` when the coordinator said all rounds are done, ``"stopped"`` when the
    caller's ``stop_event`` ended the run."""
