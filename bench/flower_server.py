"""The Flower side's server process: legacy ``start_server`` with FedAvg, timed per round.

Runs exactly ``--rounds`` rounds from an all-zero model and then writes a JSON report: the
duration of every round (from ``configure_fit``, once all clients are connected, to the end
of ``aggregate_fit``: sending the model, every client's fit, receiving the replies, averaging),
the process's own peak RSS (read before anything else is done with the final model, so the
check below does not inflate it), and the final model's value range and shapes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import flwr as fl
import workload
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts and ends, and keeps the last result."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started: dict[int, float] = {}
        self.started_unix: dict[int, float] = {}
        self.rounds: list[dict[str, Any]] = []
        self.final: Any = None  # the last aggregated Parameters (the server holds them anyway)

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        # Sampling blocks until enough clients are connected; wait for them first so that,
        # as with Rondo (whose rounds open only once min_clients are there), round 1 does not
        # include the clients' start-up.
        client_manager.wait_for(self.min_available_clients)
        self.started[server_round] = time.monotonic()
        self.started_unix[server_round] = time.time()  # comparable with the other processes
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.rounds.append(
            {
                "round": server_round,
                "duration_secs": time.monotonic() - self.started[server_round],
                "started_unix": self.started_unix[server_round],
                "ended_unix": time.time(),
                "delivered": len(results),
                "failures": len(failures),
            }
        )
        self.final = parameters
        return parameters, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="host:port to listen on")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--n-elements", type=int, required=True)
    parser.add_argument("--max-message", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_evaluate_clients=0,
        min_available_clients=args.clients,
        initial_parameters=ndarrays_to_parameters(
            list(workload.zero_model(args.n_elements).values())
        ),
    )
    fl.server.start_server(
        server_address=args.address,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        grpc_max_message_length=args.max_message,
    )
    peak = workload.peak_rss_bytes()

    report: dict[str, Any] = {
        "rounds": strategy.rounds,
        "peak_rss_bytes": peak,
    }
    if strategy.final is not None:
        arrays = parameters_to_ndarrays(strategy.final)
        # Flower keeps no names: the arrays come back in the order they were sent.
        names = list(workload.dummy().layout(args.n_elements))
        report["final_shapes"] = [list(a.shape) for a in arrays]
        report["final_dtypes"] = [str(a.dtype) for a in arrays]
        report["final_range"] = workload.value_range(dict(zip(names, arrays, strict=False)))
    args.out.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    workload.exit_now(0)
