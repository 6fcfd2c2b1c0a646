"""The sanitizer build's run-time options, and ``make sanitize``.

    .venv/bin/python ci/sanitizers.py [PYTEST ARGS]

runs the qtest tier (``pytest -k qtest``) against the ASan + UBSan build
(``ci/build-qemu.sh --sanitizers``, linked as build/qemu-sanitizers) through
PYEMB_QEMU_DIR.  Every QEMU the tests start writes its sanitizer reports to
its own file in a fresh log directory (ASan's and UBSan's ``log_path``), not
to its stderr: the tests read QEMU's stderr for their own messages, and a
report there could be missed, or fail a test for the wrong reason.
tests/conftest.py fails the test during which a report appeared
(PYEMB_SANITIZER_LOGS names the directory), and this script fails the run if
any report is there at the end (a QEMU still running after its test).

What counts as a report: ASan (memory errors, and aborts: handle_abort),
LeakSanitizer at exit, UBSan (halt_on_error: the first one stops QEMU).
ci/lsan-suppressions.txt holds the only suppressions, for CPython's own
leaks at exit, each with its reason.  ``generic_fuzz.py`` runs the fuzzer
under the same options.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "qemu-sanitizers"
SUPPRESSIONS = REPO / "ci" / "lsan-suppressions.txt"


# Tests whose point does not hold under ASan, each with the reason.
NOT_UNDER_ASAN = {
    "tests/test_encoder_qtest.py::test_resets_while_streams_run_crash_nothing_and_leak_nothing":
        "bounds QEMU's RSS growth to 2 MB over 200 resets; under ASan RSS also holds "
        "the quarantine of freed memory (up to 256 MB), which fills as the test runs "
        "(LeakSanitizer checks the same QEMU for leaks at exit instead)",
}


def environment(log_dir: str | None = None) -> dict[str, str]:
    """ASAN_OPTIONS, UBSAN_OPTIONS and LSAN_OPTIONS for the sanitizer build;
    reports go to ``log_dir``/qemu.PID, or to stderr without one."""
    asan = ["detect_leaks=1", "handle_abort=1", "print_summary=1"]
    ubsan = ["halt_on_error=1", "print_stacktrace=1", "print_summary=1"]
    if log_dir:
        # One runtime, one log: the options parsed last would win anyway.
        asan.append(f"log_path={log_dir}/qemu")
        ubsan.append(f"log_path={log_dir}/qemu")
    return {
        # CPython's small-object allocator keeps objects in arenas it maps
        # itself: ASan checks no access to them, and LeakSanitizer, which
        # scans only malloc's chunks, globals and stacks, does not see the
        # pointers they hold (a VirtQueueElement or an FFmpeg buffer owned
        # by a live Python object looked leaked).  With malloc, both see
        # every Python object, the shim's Request, GuestRegion, Device too.
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": ":".join(asan),
        "UBSAN_OPTIONS": ":".join(ubsan),
        "LSAN_OPTIONS": f"suppressions={SUPPRESSIONS}:print_suppressions=0",
    }


def is_report(text: str) -> bool:
    """A sanitizer's error report (not one of its warnings)."""
    return ("ERROR: AddressSanitizer" in text or "ERROR: LeakSanitizer" in text
            or "runtime error:" in text or "Sanitizer: failed" in text)


def log_sizes(log_dir: str) -> dict[str, int]:
    """Each log file's size: a report is appended to a QEMU's file at exit."""
    sizes = {}
    for name in os.listdir(log_dir):
        try:
            sizes[name] = os.path.getsize(os.path.join(log_dir, name))
        except FileNotFoundError:
            pass
    return sizes


def reports(log_dir: str, names: list[str] | None = None) -> list[tuple[str, str]]:
    """(file, text) of each report in ``log_dir`` (or among ``names``)."""
    found = []
    for name in sorted(names if names is not None else os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        if is_report(text):
            found.append((name, text))
    return found


def main() -> int:
    for binary in ("qemu-system-x86_64", "qemu-system-aarch64"):
        if not (BUILD / binary).exists():
            print(f"sanitizers: {BUILD / binary} is missing: run "
                  "`bash ci/build-qemu.sh --sanitizers` (make sanitize does)", file=sys.stderr)
            return 2
    log_dir = tempfile.mkdtemp(prefix="pyemb-sanitizers-")
    env = dict(os.environ, **environment(log_dir), PYEMB_QEMU_DIR=str(BUILD),
               PYEMB_SANITIZER_LOGS=log_dir)
    deselect = [arg for test in NOT_UNDER_ASAN for arg in ("--deselect", test)]
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-k", "qtest", "tests",
                          *deselect, *sys.argv[1:]], cwd=REPO, env=env)
    found = reports(log_dir)
    for name in sorted(set(os.listdir(log_dir)) - {name for name, _ in found}):
        # Warnings are shown, not failed; every QEMU says that its
        # coroutines' swapcontext is not fully supported (QEMU tells ASan
        # about each switch, __sanitizer_start_switch_fiber).
        text = Path(log_dir, name).read_text(errors="replace")
        rest = [line for line in text.splitlines()
                if line.strip() and "makecontext/swapcontext" not in line]
        if rest:
            print(f"sanitizers: {name} (a warning, not a report):\n" + "\n".join(rest))
    for name, text in found:
        print(f"sanitizers: report in {name}:\n{text}")
    print(f"sanitizers: pytest exit status {rc}; {len(found)} sanitizer report(s) "
          f"in {log_dir}")
    return rc or (1 if found else 0)


if __name__ == "__main__":
    sys.exit(main())
