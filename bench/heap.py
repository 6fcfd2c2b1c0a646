"""QEMU's memory as the benches see it: RSS from /proc, and, with the heap
probe (bench/heap_probe/sitecustomize.py) loaded into QEMU's Python, what
malloc and the Python heap hold, to tell a leak from an allocator keeping
pages.

RSS of a process whose devices come and go saws: freed memory goes back to
the kernel in lumps (arena trims, unplugged devices' memory after RCU and
garbage collection).  Growth is judged on the floor (the lowest sample) of
each quarter of a run, and on malloc's bytes in use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROBE_DIR = Path(__file__).resolve().parent / "heap_probe"
REPO = PROBE_DIR.parents[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def probe_env(out: Path) -> dict[str, str]:
    """Environment for a QEMU whose embedded Python should run the probe."""
    path = os.pathsep.join(p for p in (str(PROBE_DIR), str(REPO),
                                       os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "PYEMB_HEAP_PROBE": str(out)}


def latest(out: Path) -> dict[str, float] | None:
    """The probe's last complete sample, or None before its first."""
    try:
        lines = out.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:        # a line being written
            continue
    return None


def quarter_floors(values: list[float]) -> list[float]:
    """The lowest sample of each quarter of a series, in order."""
    n = len(values) // 4
    if n == 0:
        return []
    return [min(values[i * n:(i + 1) * n]) for i in range(3)] + [min(values[3 * n:])]


def growth_line(name: str, values: list[float], unit: str = "MB") -> str:
    """The floors of the four quarters, and the last floor against the second's
    (the first quarter is caches and allocators warming up)."""
    floors = quarter_floors(values)
    if not floors:
        return f"{name}: too few samples"
    shown = "  ".join(f"{f:.1f}" for f in floors)
    return (f"{name} floor by quarter {shown} {unit}: last against second "
            f"{floors[3] - floors[1]:+.1f} {unit}")
