"""Regression cases found by QEMU's generic-fuzz (ci/generic_fuzz.py, make generic-fuzz).

Each tests/fuzz-corpus/generic/<device>/<case>.qtest is the qtest trace of an input
that once crashed, hung or ran out of memory in the fuzzer build, with the
DMA the fuzzer served just in time written out as plain memory writes
before the access that read it.  It is replayed here on the build under test
(the normal one in make test, no clang needed; the ASan + UBSan one in make
sanitize) with the machine and device the fuzzer had: QEMU must answer every
command in time, stay up, and exit cleanly.  The raw input beside it
(<case>, for qemu-fuzz-x86_64) is replayed by make generic-fuzz before it fuzzes.
Beside the findings, each device has a ``sample-*`` case (``ci/generic_fuzz.py
--samples``): its fuzzer corpus's largest input, one that passed, so that a
fuzzer-made trace runs on every device and the replay itself is tested before a
finding depends on it.
"""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ci.generic_fuzz import CORPUS, DEVICES, MACHINE
from tests.hostdriver.machine import QEMU_DIR

CASES = sorted(CORPUS.glob("*/*.qtest"))
ANSWER_S = 30.0             # per command; a generic-fuzz input gets 10 s in all


def replay(trace: Path, tmp_path: Path) -> tuple[int, str]:
    """Feed the trace to QEMU's -qtest stdio; (exit status after SIGTERM, stderr)."""
    commands = [c for c in trace.read_text().splitlines() if c.strip()]
    cmd = [str(QEMU_DIR / "qemu-system-x86_64"), "-display", "none", "-machine", "accel=qtest",
           "-m", "512M", *shlex.split(f"{MACHINE} {DEVICES[trace.parent.name]}"),
           "-qtest", "stdio", "-qtest-log", "none"]
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                env=dict(os.environ, PYEMB_VENV=sys.prefix), text=True)
    answers: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("IRQ"):
                answers.put(line)
        answers.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        for i, command in enumerate(commands):
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            try:
                answer = answers.get(timeout=ANSWER_S)
            except queue.Empty:
                pytest.fail(f"QEMU did not answer command {i} ({command!r}) in {ANSWER_S} s")
            if answer is None:
                break           # QEMU went away: its status says how
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, err_path.read_text(errors="replace")


@pytest.mark.parametrize("trace", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_fuzz_regression_case(trace, tmp_path):
    rc, stderr = replay(trace, tmp_path)
    assert rc == 0, f"QEMU exited with {rc} on {trace.name}:\n{stderr[-4000:]}"
