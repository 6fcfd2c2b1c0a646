"""The host test driver itself, against the probe model and QEMU's own
virtio-sound-pci: interrupts counted per vector, VIRTIO_RING_F_EVENT_IDX
(used_event written, avail_event read, kicks only when needed) and
VIRTIO_RING_F_INDIRECT_DESC (a chain of several buffers in one ring slot)."""

from __future__ import annotations

import time

import pytest

from pyemb.snd import protocol as snd
from tests.conftest import command, settled, start, with_and_without_ring_features
from tests.hostdriver import Machine
from tests.hostdriver.virtio import DESC, DESC_F_INDIRECT, DESC_F_NEXT, U16, need_event


def test_need_event_is_linux_vring_need_event():
    assert need_event(0, 1, 0)                  # the first entry after event 0
    assert not need_event(1, 1, 0)              # event 1 not passed yet
    assert need_event(5, 9, 3) and not need_event(9, 9, 3)
    assert need_event(0xFFFF, 2, 0xFFFE)        # across the wrap
    assert not need_event(3, 3, 3)              # nothing added: no kick


@with_and_without_ring_features
def test_interrupts_are_counted_per_vector(probe, ring):
    m, dev = probe
    pci = m.arch == "x86_64"
    q0, q1, cfg = dev.interrupts(0), dev.interrupts(1), dev.interrupts(None)
    assert command(dev, "echo one") == "one"
    assert settled(dev, 0, q0 + 1)
    if pci:                                     # on virtio-mmio the queues share the line
        assert dev.interrupts(1) == q1
    assert command(dev, "config-changed") == "notified"
    assert settled(dev, None, cfg + 1)
    assert settled(dev, 0, q0 + 2)
    # Two held requests completed one after the other by the main loop:
    # two messages on queue 1's vector; with EVENT_IDX the driver, which
    # has not taken the first, asked for none after it (used_event 0).
    q1 = dev.interrupts(1)
    for _ in range(2):
        dev.queues[1].add([b"x"], [8])
    dev.queues[1].kick()
    assert command(dev, "complete-held") == "True True"
    expected = 1 if ring["event_idx"] or not pci else 2     # mmio: the line stayed up
    assert settled(dev, 1, q1 + expected)
    assert [dev.queues[1].wait().written for _ in range(2)] == [0, 0]
    assert dev.interrupts(None) == cfg + 1


def test_event_idx_kicks_only_when_the_device_needs_it(transport):
    m = start(transport, "virtio-snd-py", "backend=tests.models:ProbeDevice")
    try:
        dev = m.find_virtio(25)
        for event_idx in (True, False):
            dev.initialize(event_idx=event_idx)
            q = dev.queues[0]
            # Long enough that the device cannot take "echo b" before the
            # driver has decided on the kick after "echo c", even on a loaded machine.
            q.add([b"block 2" if event_idx else b"block 0.1"], [16])
            assert q.kick(wait=False)           # posted: the main loop is busy with it
            deadline = time.monotonic() + 5
            while m.mem.u16(q.used + 4 + 8 * q.size) != 1 and event_idx:
                assert time.monotonic() < deadline, "avail_event never moved"
                time.sleep(0.001)
            if not event_idx:
                time.sleep(0.1)
            q.add([b"echo b"], [16])
            assert q.kick(wait=False)           # past avail_event (1): needed
            q.add([b"echo c"], [16])
            # The device has not taken "echo b" yet: with EVENT_IDX its
            # avail_event still says 1, and it takes "echo c" in the same pass.
            assert q.kick(wait=False) is not event_idx
            replies = sorted(q.wait().data for _ in range(3))
            assert replies == [b"b", b"c", b"unblocked"]
            assert (q.kicks, q.kicks_suppressed) == ((2, 1) if event_idx else (3, 0))
            # The driver asks for an interrupt at the next used entry.
            if event_idx:
                assert m.mem.u16(q.avail + 4 + 2 * q.size) == q.last_used == 3
            assert command(dev, "echo after") == "after"
    finally:
        m.stop()


@pytest.mark.parametrize("indirect", [True, False])
def test_indirect_table_carries_a_chain_in_one_ring_slot(transport, indirect):
    m = start(transport, "virtio-snd-py", "backend=tests.models:ProbeDevice")
    try:
        dev = m.find_virtio(25)
        dev.initialize(queue_size=8, indirect=indirect)
        q = dev.queues[0]
        chain = q.add([b"echo ", b"split ", b"over three"], [16])
        q.kick()
        assert q.wait().data == b"split over three"
        ring = DESC.unpack_from(m.mm, q.desc - m.ram_base + 16 * chain.head)
        if indirect:
            assert len(chain.descs) == 1 and chain.table is not None
            assert ring == (chain.table, 4 * 16, DESC_F_INDIRECT, 0)
            table = [DESC.unpack_from(m.mm, chain.table - m.ram_base + 16 * i) for i in range(4)]
            assert [(flags, nxt) for _, _, flags, nxt in table] == \
                [(DESC_F_NEXT, 1), (DESC_F_NEXT, 2), (DESC_F_NEXT, 3), (2, 0)]
        else:
            assert len(chain.descs) == 4 and chain.table is None
            assert ring[2] == DESC_F_NEXT
        assert command(dev, "echo one") == "one"            # one buffer each way: direct
        # Twelve buffers on an 8-entry queue: only as an indirect table.
        pieces = [b"echo"] + [f" {i}".encode() for i in range(11)]
        if indirect:
            assert q.call(pieces, [64]).data == b" ".join(str(i).encode() for i in range(11))
        else:
            with pytest.raises(RuntimeError, match="virtqueue full"):
                q.add(pieces, [64])
    finally:
        m.stop()


def test_qemu_virtio_sound_pci_with_ring_features():
    """QEMU's own device through the same driver with both ring features:
    replies in scattered buffers, one interrupt each."""
    with Machine.x86(["-audiodev", "none,id=a", "-device", "virtio-sound-pci,audiodev=a"]) as m:
        dev = m.find_virtio(25)
        dev.initialize(event_idx=True, indirect=True)
        ctl = dev.queues[snd.CONTROL_QUEUE]
        query = snd.QUERY_INFO.pack(snd.Code.PCM_INFO, 0, 1, snd.PCM_INFO.size)
        before = dev.interrupts(snd.CONTROL_QUEUE)
        for i in range(5):
            used = ctl.call([query[:4], query[4:]], [4, snd.PCM_INFO.size])
            assert used.written == 4 + snd.PCM_INFO.size
            assert snd.HDR.unpack_from(used.data)[0] == snd.Status.OK
            assert settled(dev, snd.CONTROL_QUEUE, before + i + 1)
        assert U16.unpack_from(m.mm, ctl.avail - m.ram_base + 4 + 2 * ctl.size)[0] == 5
