"""make test's share of the protocol fuzzer (tests/protocol_fuzz.py; ``make
fuzz`` runs it for longer, bench/protocol_fuzz.py): every case of the corpus
(tests/fuzz-corpus/protocol/, each an input range that tripped an oracle
once) replays without tripping one, and a short seeded run per device trips
none.  A case marked ``open`` is a bug found and reported, not fixed yet: it
is expected to trip (xfail) until its fix lands."""

from __future__ import annotations

import pytest

from tests.protocol_fuzz import DEVICES, load_cases, replay_case, run

SEED = 1
# Inputs per device: a few seconds each at the rates this machine reaches.
SHORT = {"snd": 3000, "video-decoder": 2000, "video-encoder": 2000, "media-camera": 3000,
         "media-decoder": 1000}
CASES = load_cases()
# Devices whose short run trips on a bug found and reported, not fixed yet.
# (media-decoder's: DecoderSession._planes counted planes by a single-planar
# buffer's length, holding QEMU's main loop up seconds: fixed, see
# tests/test_media_decoder.py.)
OPEN: dict[str, str] = {}


def _case_param(case: dict) -> pytest.param:
    marks = [pytest.mark.xfail(reason=case["open"], strict=False)] if case.get("open") else []
    return pytest.param(case, id=case["file"], marks=marks)


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_corpus_case_replays_clean(case):
    report = replay_case(case)
    assert not report.findings, f"{case['file']} ({case['tripped']}): {report.findings[0]}"
    assert report.inputs + report.skipped == case["stop"] - case["start"]


@pytest.mark.parametrize("device", [
    pytest.param(d, marks=[pytest.mark.xfail(reason=OPEN[d], strict=False)] if d in OPEN else [])
    for d in DEVICES])
def test_a_short_seeded_run_trips_no_oracle(device):
    report = run(device, SEED, 0, SHORT[device])
    assert not report.findings, str(report.findings[0])
    assert report.inputs >= 0.9 * SHORT[device], f"{report.skipped} inputs found no room"
    assert report.rss_kb, "no checkpoint ran"


def test_a_broken_device_report_names_the_chain_and_what_changed_in_it():
    """The oracle for QEMU's NEEDS_RESET names the chain QEMU stopped at and
    compares its descriptors with what the driver wrote: here a descriptor
    the driver zeroed after publishing it (as a stray write would)."""
    from tests.protocol_fuzz import DESC, Fuzzer, FuzzError, Op

    fz = Fuzzer("media-camera", SEED)
    fz.start()
    try:
        fz.poll()
        op = Op("open", 0, b"\x01\0\0\0\0\0\0\0", 16)
        chain = fz.submit(op, 7)
        ring = fz.rings[0]
        d = ring.desc - fz.base + 16 * chain.head
        addr, _, flags, nxt = DESC.unpack_from(fz.mm, d)
        DESC.pack_into(fz.mm, d, addr, 0, flags, nxt)
        fz.kick()
        with pytest.raises(FuzzError) as e:
            fz._check_broken()     # noqa: SLF001 - the oracle itself
        text = str(e.value)
        assert "zero sized buffers" in text and "input 7 open" in text, text
        assert "(changed)" in text, text
    finally:
        fz.close()
