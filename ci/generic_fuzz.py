"""QEMU's generic-fuzz over each pyemb device (``make generic-fuzz``, part of ``make fuzz``).

    .venv/bin/python ci/generic_fuzz.py [--seconds 300] [DEVICE ...]
    .venv/bin/python ci/generic_fuzz.py --samples [DEVICE ...]

Runs ``qemu-fuzz-x86_64 --fuzz-target=generic-fuzz`` from the sanitizer build
(``ci/build-qemu.sh --sanitizers``: clang, ASan, UBSan, libFuzzer) once per
device in DEVICES, with QEMU_FUZZ_ARGS naming that device on q35 with
-nodefaults and QEMU_FUZZ_OBJECTS='virtio*' (so: the device's own regions,
its virtio-pci capabilities, MSI-X table and PCI config space).  generic-fuzz
turns each input into port, MMIO and PCI-config accesses, DMA patterns that
fill guest memory just before the device reads it, and clock steps, then
resets the machine; one process runs every input, so state that outlives a
reset, growth (-rss_limit_mb) and hangs (-timeout) show too.

For each device, first the regression cases already in
tests/fuzz-corpus/generic/<device>/ are replayed (each must pass now), then
libFuzzer runs for --seconds with its working corpus in the cache
(~/.cache/pyemb/generic-fuzz/<device>/corpus, kept from run to run, never in
the repository).  A crash (ASan, UBSan, an abort), a timeout or an
out-of-memory input is kept in tests/fuzz-corpus/generic/<device>/ with a
qtest trace beside it (``<name>.qtest``, through QEMU's
scripts/oss-fuzz/reorder_fuzzer_qtest_trace.py) that tests/test_fuzz_qtest.py
replays on the normal build in ``make test``.

``--samples`` keeps instead, per device, the largest input of the working
corpus as ``sample-<sha1>`` with its trace: an input that passes, so that
make test replays a fuzzer-made trace on every device and the path from an
input to a replayed trace (write_trace, QEMU's reorder script,
tests/test_fuzz_qtest.py) is exercised before a crash needs it.

Prints, per device: inputs, inputs per second, new corpus entries, peak RSS,
the RSS at the start and end of the run, and what QEMU itself wrote to
stderr (lines per 1000 inputs and the most frequent lines): a flood shows
there.  The whole log is in the cache (generic-fuzz/<device>/last.log).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ci.sanitizers import BUILD, REPO, environment  # noqa: E402

# Regression directory name -> the device's QEMU options.
DEVICES = {
    "snd": "-device virtio-snd-py-pci,backend=pyemb.snd_backend:NullBackend",
    "video-decoder": "-device virtio-video-py-pci",
    "video-encoder": "-device virtio-video-py-pci,role=encoder",
    "media-camera": "-device virtio-media-py-pci",
    "media-decoder": "-device virtio-media-py-pci,role=decoder",
}
MACHINE = "-M q35 -nodefaults"
CORPUS = REPO / "tests" / "fuzz-corpus" / "generic"
CACHE = Path(os.environ.get("PYEMB_CACHE", Path.home() / ".cache" / "pyemb")) / "generic-fuzz"
FUZZER = BUILD / "qemu-fuzz-x86_64"
TIMEOUT_S = 10              # an input that runs longer is a hang
RSS_LIMIT_MB = 4096         # a process that grows past this is unbounded growth
ARTIFACT = re.compile(r"^(crash|timeout|oom|leak|slow-unit|sample)-[0-9a-f]+$")
STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) .*?exec/s: (\d+) rss: (\d+)Mb")
LIBFUZZER = re.compile(r"^(#\d+\s|INFO: |stat::|Done \d+ runs|MS: |base unit: |Running: |"
                       r"Executed |Matching objects by name |This process will try |"
                       r"  \* |artifact_prefix=|Test unit written to |Base64: |"
                       r"SUMMARY: libFuzzer|0x[0-9a-f]+,|\\\\x|==\d+== ?)")


def fuzz_env(device: str) -> dict[str, str]:
    return dict(os.environ, **environment(),
                QEMU_FUZZ_ARGS=f"{MACHINE} {DEVICES[device]}",
                QEMU_FUZZ_OBJECTS="virtio*",
                PYEMB_VENV=sys.prefix,
                PYTHONPATH=str(REPO))


def regression_cases(device: str) -> list[Path]:
    d = CORPUS / device
    return sorted(p for p in d.iterdir() if ARTIFACT.match(p.name)) if d.is_dir() else []


def replay(device: str, case: Path) -> tuple[bool, str]:
    """Run one regression input through the fuzzer build; (passed, output)."""
    proc = subprocess.run([str(FUZZER), "--fuzz-target=generic-fuzz",
                           f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", str(case)],
                          env=fuzz_env(device), capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT_S * 6)
    return proc.returncode == 0, proc.stdout + proc.stderr


def write_trace(device: str, case: Path) -> Path:
    """The input as a plain qtest trace, for qemu-system-x86_64 -qtest stdio."""
    env = dict(fuzz_env(device), QTEST_LOG="1", FUZZ_SERIALIZE_QTEST="1")
    proc = subprocess.run([str(FUZZER), "--fuzz-target=generic-fuzz", f"-timeout={TIMEOUT_S}",
                           str(case)], env=env, capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT_S * 6)
    log = CACHE / device / f"{case.name}.qtest-log"
    log.write_text(proc.stderr)
    reorder = BUILD.resolve().parent / "src/scripts/oss-fuzz/reorder_fuzzer_qtest_trace.py"
    trace = subprocess.run([sys.executable, str(reorder), str(log)], capture_output=True,
                           text=True, check=True).stdout
    out = case.with_name(case.name + ".qtest")
    out.write_text(trace)
    return out


def keep_sample(device: str) -> Path:
    """The working corpus's largest input, with its trace, as a regression case."""
    corpus = CACHE / device / "corpus"
    inputs = sorted(corpus.iterdir(), key=lambda p: (-p.stat().st_size, p.name)) \
        if corpus.is_dir() else []
    if not inputs:
        raise SystemExit(f"generic_fuzz: no corpus for {device}: fuzz it first")
    regdir = CORPUS / device
    regdir.mkdir(parents=True, exist_ok=True)
    for old in regdir.glob("sample-*"):
        old.unlink()
    case = regdir / f"sample-{inputs[0].name}"
    case.write_bytes(inputs[0].read_bytes())
    write_trace(device, case)
    return case


def qemu_lines(lines: list[str]) -> list[str]:
    """What QEMU and the device models wrote, without libFuzzer's own lines."""
    return [line for line in lines if line.strip() and not LIBFUZZER.match(line)]


def normalized(line: str) -> str:
    return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", line.strip())[:140]


def fuzz(device: str, seconds: int) -> dict:
    work = CACHE / device
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    regdir = CORPUS / device
    regdir.mkdir(parents=True, exist_ok=True)
    before = set(regression_cases(device))
    # -detect_leaks=0: libFuzzer's leak check after an input that malloc'd
    # more than it freed (most do: QEMU's and Python's caches) scans the
    # whole heap, a tenth of the rate; LeakSanitizer still checks the whole
    # run when the process exits.
    cmd = [str(FUZZER), "--fuzz-target=generic-fuzz", f"-max_total_time={seconds}",
           f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}", "-detect_leaks=0",
           "-print_final_stats=1", f"-artifact_prefix={regdir}/", str(corpus)]
    log_path = work / "last.log"
    statuses: list[tuple[float, int, int, int]] = []     # (t, inputs, cov, rss)
    lines: list[str] = []
    start = time.monotonic()
    next_print = start + 60
    with open(log_path, "w") as log:
        log.write(f"QEMU_FUZZ_ARGS={MACHINE} {DEVICES[device]}\n{shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, env=fuzz_env(device), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                cwd=work)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            line = line.rstrip("\n")
            lines.append(line)
            m = STATUS.match(line)
            if m:
                statuses.append((time.monotonic() - start, int(m[1]), int(m[3]), int(m[5])))
            if time.monotonic() >= next_print and statuses:
                t, n, _, rss = statuses[-1]
                print(f"  {device}: {n} inputs in {t:.0f} s ({n / max(t, 1e-9):.0f}/s), "
                      f"rss {rss} MB", flush=True)
                next_print += 60
        rc = proc.wait()
    elapsed = time.monotonic() - start
    stats = {k: int(v) for k, v in re.findall(r"^stat::(\w+):\s+(\d+)", "\n".join(lines), re.M)}
    inputs = stats.get("number_of_executed_units", statuses[-1][1] if statuses else 0)
    qemu = qemu_lines(lines)
    found = sorted(set(regression_cases(device)) - before)
    return {
        "device": device, "rc": rc, "seconds": elapsed, "inputs": inputs,
        "rate": inputs / elapsed if elapsed else 0.0,
        "new_units": stats.get("new_units_added", 0),
        "cov": statuses[-1][2] if statuses else 0,
        "peak_rss_mb": stats.get("peak_rss_mb", 0),
        "rss_first_mb": statuses[0][3] if statuses else 0,
        "rss_last_mb": statuses[-1][3] if statuses else 0,
        "qemu_lines": len(qemu),
        "top": collections.Counter(normalized(x) for x in qemu).most_common(5),
        "found": found, "log": log_path,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=300, help="fuzzing time per device")
    ap.add_argument("--samples", action="store_true",
                    help="keep each device's largest corpus input as a sample case; no fuzzing")
    ap.add_argument("devices", nargs="*", metavar="DEVICE",
                    help=f"devices to fuzz: {', '.join(DEVICES)} (default: all)")
    args = ap.parse_args()
    unknown = set(args.devices) - set(DEVICES)
    if unknown:
        ap.error(f"unknown device(s): {', '.join(sorted(unknown))}")
    args.devices = args.devices or list(DEVICES)
    if not FUZZER.exists():
        print(f"generic_fuzz: {FUZZER} is missing: run `bash ci/build-qemu.sh --sanitizers` "
              "(make generic-fuzz does)", file=sys.stderr)
        return 2
    if args.samples:
        for device in args.devices:
            case = keep_sample(device)
            ok, out = replay(device, case)
            print(f"{device}: kept {case.name}: {'passes' if ok else 'FAILS'}")
            if not ok:
                print(out[-4000:])
                return 1
        return 0
    failed = False
    for device in args.devices:
        cases = regression_cases(device)
        for case in cases:
            ok, out = replay(device, case)
            print(f"{device}: regression case {case.name}: {'passes' if ok else 'FAILS'}")
            if not ok:
                failed = True
                print(out[-4000:])
        print(f"{device}: fuzzing {args.seconds} s ({MACHINE} {DEVICES[device]})", flush=True)
        r = fuzz(device, args.seconds)
        per_k = 1000 * r["qemu_lines"] / max(r["inputs"], 1)
        print(f"{device}: {r['inputs']} inputs in {r['seconds']:.0f} s = {r['rate']:.0f} "
              f"inputs/s; coverage {r['cov']} edges, corpus +{r['new_units']}; "
              f"RSS {r['rss_first_mb']} -> {r['rss_last_mb']} MB (peak {r['peak_rss_mb']}); "
              f"QEMU's stderr "
              f"{r['qemu_lines']} lines ({per_k:.1f} per 1000 inputs); exit {r['rc']}")
        for text, count in r["top"]:
            print(f"    {count:8d}x {text}")
        for case in r["found"]:
            failed = True
            trace = write_trace(device, case)
            print(f"{device}: FINDING kept as {case.relative_to(REPO)} "
                  f"(qtest trace {trace.name}); log {r['log']}")
        if r["rc"] != 0 and not r["found"]:
            failed = True
            print(f"{device}: the fuzzer exited {r['rc']} without an artifact; log {r['log']}")
            text = r["log"].read_text(errors="replace")
            at = max(text.find("ERROR: LeakSanitizer"), text.find("ERROR: AddressSanitizer"))
            if at >= 0:             # a report at exit (LeakSanitizer: the whole run)
                print(text[at:at + 6000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
