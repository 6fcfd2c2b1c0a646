"""The project's own protocol fuzzer over each pyemb device (``make fuzz``).

    .venv/bin/python -m bench.protocol_fuzz [--seconds 300] [--seed S] [DEVICE ...]

For each device (tests/protocol_fuzz.py: DEVICES), inputs 0, 1, 2, ... of
one seed through a fresh QEMU under qtest for ``--seconds`` (FUZZ_SECONDS in
``make fuzz``), with the oracles of tests/protocol_fuzz.py at every
checkpoint.  When one trips, the range is minimised (the failing batch
alone, then bisected from both ends, ``--minimise`` seconds at most) and
kept as a JSON case in tests/fuzz-corpus/protocol/ (device, seed, index
range, what tripped), which ``make test`` replays
(tests/test_protocol_fuzz.py); the run goes on from the next batch in a new
QEMU.  A finding like one already kept in this run is counted, not kept
again.

Prints, per device: inputs, inputs per second, findings, QEMU's anonymous
RSS after the warm-up and at the end, its stderr in bytes, how often each
command got a success reply (how deep the inputs reach), and how long
10^6 inputs would take at that rate.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + \
    os.environ.get("PYTHONPATH", "")

from tests.protocol_fuzz import (  # noqa: E402
    BATCH,
    CORPUS,
    DEVICES,
    WARMUP,
    Report,
    StartError,
    minimise,
    run,
    save_case,
)

OK = re.compile(r"^(0x8000|OK.*|0x0)$")        # a success status of each protocol


def signature(kind: str, detail: str) -> str:
    """What makes two findings the same bug: the kind and, numbers left out,
    a traceback's last frame and exception, or else the first line."""
    lines = [line for line in detail.splitlines() if line.strip()]
    frames = [line for line in lines if line.lstrip().startswith("File ")]
    key = (frames[-1] + lines[-1]) if frames else (lines[0] if lines else "")
    return kind + ":" + re.sub(r"0x[0-9a-f]+|\d+", "#", key)[:200]


def coverage(statuses: Counter) -> str:
    total: Counter = Counter()
    ok: Counter = Counter()
    for (kind, status), n in statuses.items():
        total[kind] += n
        if OK.match(status):
            ok[kind] += n
    return ", ".join(f"{k} {ok[k]}/{total[k]}" for k in sorted(total))


def fuzz_device(device: str, seed: int, seconds: float, batch: int, minimise_s: float,
                save: bool, corpus: Path) -> dict:
    deadline = time.monotonic() + seconds
    index, inputs, busy = 0, 0, 0.0
    statuses: Counter = Counter()
    findings, kept, seen = [], [], set()
    rss: list[int] = []
    stderr = 0
    while time.monotonic() < deadline:
        try:
            report: Report = run(device, seed, index, 1 << 40, deadline, batch)
        except StartError as e:
            print(f"  {device}: {e}; this device stops here", flush=True)
            break
        inputs += report.inputs
        busy += report.seconds
        statuses += report.statuses
        stderr += report.stderr_bytes
        if len(report.rss_kb) > WARMUP:
            rss += [max(report.rss_kb[:WARMUP]), report.rss_kb[-1]]
        if not report.findings:
            break
        f = report.findings[0]
        findings.append(f)
        print(f"  {device}: {f.kind} at input {f.index}: {f.detail[:3000]}", flush=True)
        sig = signature(f.kind, f.detail)
        if sig in seen:
            print("    (like one found before in this run: not kept again)")
        else:
            seen.add(sig)
            try:
                lo, hi, reproduced = minimise(device, seed, f, index, batch, minimise_s,
                                              log=print)
            except StartError as e:
                print(f"    not minimised: {e}")
                lo, hi, reproduced = index, f.index + 1, False
            print(f"    minimised to inputs [{lo}, {hi})"
                  + ("" if reproduced else " (not reproduced by a replay)"))
            if save:
                try:
                    path = save_case(device, seed, lo, hi, f, reproduced, corpus)
                except StartError as e:
                    print(f"    not kept: {e}")
                else:
                    kept.append(path)
                    print(f"    kept as {path}")
        index = (f.index // batch + 1) * batch
    rate = inputs / busy if busy else 0.0
    line = (f"{device}: {inputs} inputs in {busy:.0f} s = {rate:.0f} inputs/s (seed {seed}); "
            f"{len(findings)} findings, {len(kept)} kept; ")
    if rss:
        line += f"RSS {rss[0] // 1024} MiB after warm-up, {rss[-1] // 1024} MiB at the end; "
    line += f"stderr {stderr} bytes"
    if rate:
        line += f"; 10^6 inputs would take {1e6 / rate / 60:.0f} min"
    print(line, flush=True)
    print(f"  ok/total replies: {coverage(statuses)}", flush=True)
    return {"device": device, "inputs": inputs, "seconds": busy, "rate": rate,
            "findings": len(findings), "kept": [str(p) for p in kept]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("devices", nargs="*", help=f"a subset of {', '.join(DEVICES)}")
    ap.add_argument("--seconds", type=float,
                    default=float(os.environ.get("FUZZ_SECONDS", 300)),
                    help="fuzzing time per device (FUZZ_SECONDS)")
    ap.add_argument("--seed", type=int, default=None, help="default: a new one, printed")
    ap.add_argument("--batch", type=int, default=BATCH, help="inputs between checkpoints")
    ap.add_argument("--minimise", type=float, default=180.0,
                    help="seconds at most to minimise one finding")
    ap.add_argument("--no-save", action="store_true", help="keep no corpus cases")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    args = ap.parse_args()
    devices = args.devices or list(DEVICES)
    unknown = [d for d in devices if d not in DEVICES]
    if unknown:
        ap.error(f"unknown devices {unknown}; known: {', '.join(DEVICES)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 24)
    print(f"protocol fuzz: seed {seed}, {args.seconds:.0f} s per device, "
          f"checkpoint every {args.batch} inputs", flush=True)
    results = [fuzz_device(d, seed, args.seconds, args.batch, args.minimise,
                           not args.no_save, args.corpus) for d in devices]
    total = sum(r["inputs"] for r in results)
    print(f"total: {total} inputs, {sum(r['findings'] for r in results)} findings")
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
