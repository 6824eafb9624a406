#!/usr/bin/env python3
"""How much moving bytes over loopback TCP costs on this machine: the floor under a round.

A federated round moves the model down to every participant and back up, over TCP. This
sends ``--streams`` streams of ``--size`` bytes each over loopback, one connection and one
sending and one receiving thread per stream, with plain blocking sockets (``sendall`` from a
memoryview, ``recv_into`` a preallocated buffer: no copy beyond the kernel's own two) and
reports, per repetition, the wall time and the CPU time of the whole process (both ends). The
buffers are touched before the clock starts, so first-touch page faults are not counted.

    .venv/bin/python bench/loopback_floor.py --streams 10 --size 10MB
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import threading
import time

from rondo.util import parse_size


def transfer(
    streams: int, size: int, receive_buffers: list[bytearray], payload: memoryview
) -> None:
    """One repetition: every stream sends ``payload`` once, received into its own buffer."""
    with socket.create_server(("127.0.0.1", 0), backlog=streams) as server:
        port = server.getsockname()[1]
        senders = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
        receivers = [server.accept()[0] for _ in range(streams)]

    def receive(sock: socket.socket, buffer: bytearray) -> None:
        with memoryview(buffer) as view:
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if not n:
                    raise ConnectionError(f"stream closed after {got} of {size} bytes")
                got += n

    threads = [threading.Thread(target=s.sendall, args=(payload,)) for s in senders]
    threads += [
        threading.Thread(target=receive, args=(r, b))
        for r, b in zip(receivers, receive_buffers, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in senders + receivers:
        sock.close()


def cpu_secs() -> float:
    """CPU time of this process so far, user and system, in microsecond resolution."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--size", type=parse_size, default=parse_size("10MB"), help="per stream")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    payload = memoryview(bytearray(b"\1") * args.size)
    buffers = [bytearray(b"\0") * args.size for _ in range(args.streams)]
    walls, cpus = [], []
    for _ in range(args.repeat):
        before_wall, before = time.perf_counter(), cpu_secs()
        transfer(args.streams, args.size, buffers, payload)
        walls.append(time.perf_counter() - before_wall)
        cpus.append(cpu_secs() - before)
    total = args.streams * args.size
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f"{args.streams} streams x {args.size / 1e6:.0f} MB over loopback, {args.repeat} runs")
    print(f"  wall ms: {', '.join(f'{1e3 * w:.0f}' for w in walls)}; median {1e3 * wall:.0f}")
    print(
        f"  CPU ms (both ends): {', '.join(f'{1e3 * c:.0f}' for c in cpus)}; median {1e3 * cpu:.0f}"
    )
    print(
        f"  median: {total / wall / 1e9:.2f} GB/s, "
        f"{1e3 * cpu / (total / 1e8):.0f} CPU-ms per 100 MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
