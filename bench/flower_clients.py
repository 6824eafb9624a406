"""The Flower side's clients: N legacy ``start_client`` loops in threads of this one process.

Mirrors bench/rondo_participants.py, which runs Rondo's participants the same way. Exits 0
once every client has been told to disconnect after the last round, 1 if any client failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import flwr as fl
import workload


class AddConstant(fl.client.NumPyClient):
    """Client ``index``: adds ``index + 1`` to every weight, reports 10 * (index + 1) samples."""

    def __init__(self, index: int, n_elements: int) -> None:
        self.index = index
        self.n_elements = n_elements

    def get_parameters(self, config):  # type: ignore[no-untyped-def]
        # Not called when the strategy has initial_parameters; here for completeness.
        return list(workload.zero_model(self.n_elements).values())

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        names = list(workload.dummy().layout(self.n_elements))
        trained = workload.train(dict(zip(names, parameters, strict=True)), self.index)
        return list(trained.values()), workload.n_samples(self.index), {}

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        return 0.0, workload.n_samples(self.index), {}  # fraction_evaluate=0: never called


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    workload.add_client_arguments(parser)
    parser.add_argument("--max-message", type=int, required=True)
    args = parser.parse_args()
    workload.dummy()  # import once, before the threads race to do it
    if args.import_only:
        return 0

    failures: list[int] = []

    def client(index: int) -> None:
        try:
            fl.client.start_client(
                server_address=args.address,
                client=AddConstant(index, args.n_elements).to_client(),
                grpc_max_message_length=args.max_message,
            )
        except BaseException:  # SystemExit too: flwr exits on some errors
            traceback.print_exc()
            failures.append(index)

    workload.run_clients(client, args, "flower-client")
    if failures:
        print(f"clients failed: {sorted(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    workload.exit_now(main())
