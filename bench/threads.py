"""CPU time by thread, from /proc: what the throughput benches read to say
where each frame's CPU went (on a 2-core machine, extra CPU is lost frames)."""

from __future__ import annotations

import os

# tid -> (thread name, CPU nanoseconds so far)
Threads = dict[int, tuple[str, int]]


def threads_of(pid: int) -> Threads:
    """Name and CPU nanoseconds so far of every live thread of ``pid``.
    Codec threads end with their session: take it before that."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue                    # a thread that ended in between
        found[int(tid)] = (name, ns)
    return found


def roles_line(used: dict[str, float]) -> str:
    """``{role: microseconds per frame}`` as one printable line."""
    return ", ".join(f"{role} {us:.0f}" for role, us in used.items())
