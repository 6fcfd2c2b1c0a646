"""Device models and backends used by the tests to probe the C shim.

They are selected like any user backend, with ``backend=tests.models:...``;
the embedded interpreter finds them through the PYTHONPATH that
tests/conftest.py gives QEMU.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from pyemb.device import DeviceModel, Request, read_all, write_all
from pyemb.video.protocol import Format, QueueType
from pyemb.video_backend import PyAVBackend


class ProbeDevice(DeviceModel):
    """A sound-ID device whose queue 0 takes text commands; queue 1 holds
    every request until a reset drops them."""

    device_id = 25
    queue_sizes = (64, 64)
    config_size = 8

    def __init__(self, handle, config, **kwargs) -> None:
        self.kept: list[memoryview] = []
        self.slices: list[memoryview] = []
        self.held: list[Request] = []
        self.resets = 0
        self.orphan_on_reset = False
        super().__init__(handle, config)

    def queue_handlers(self) -> list[Callable[[Request], None]]:
        return [self.on_command, self.held.append]

    def read_config(self) -> bytes:
        return b"probe\0\0\0"

    def reset(self) -> None:
        super().reset()
        self.resets += 1
        if self.orphan_on_reset:
            # The last references to the held requests go on another thread
            # while this one (QEMU's main loop, in the drop) waits for it
            # with the GIL let go: a pacing thread ending during a reset.
            held, self.held = self.held, []
            thread = threading.Thread(target=held.clear, name="orphaning")
            thread.start()
            thread.join()
        self.held.clear()

    def reply(self, request: Request, text: str) -> None:
        request.complete(write_all(request, text.encode()))

    def on_command(self, request: Request) -> None:
        words = read_all(request).decode().split()
        op, args = words[0], words[1:]
        if op == "echo":
            self.reply(request, " ".join(args))
        elif op == "block":
            # Keep QEMU's main loop (this handler) busy: the driver's
            # kicks and chains queue up meanwhile.
            time.sleep(float(args[0]))
            self.reply(request, "unblocked")
        elif op == "config-changed":
            self.handle.notify_config()
            self.reply(request, "notified")
        elif op == "raise":
            raise RuntimeError("probe asked to raise")
        elif op == "keep":
            # Keep the views of this very request, then complete it.
            self.kept = [request.readable[0], request.writable[0]]
            self.reply(request, "kept")
        elif op == "check-kept":
            self.reply(request, " ".join(self._probe(v) for v in self.kept))
        elif op == "map":
            self.reply(request, self._map(int(args[0], 0), int(args[1], 0)))
        elif op == "later":
            # Complete from a Python thread: the bottom-half path.
            delay = float(args[0])
            threading.Thread(target=self._later, args=(request, delay), daemon=True).start()
        elif op == "interpreter":
            import sys
            self.reply(request, f"{id(sys)} {sys.prefix}")
        elif op == "hang":
            # A backend thread that never ends: QEMU's exit must not wait on it.
            threading.Thread(target=threading.Event().wait, name="hung-backend").start()
            self.reply(request, "hanging")
        elif op == "status":
            self.reply(request, f"pending={self.handle.pending_requests} "
                                f"held={len(self.held)} resets={self.resets}")
        elif op == "complete-held":
            results = [str(r.complete(0)) for r in list(self.held)]
            self.held.clear()
            self.reply(request, " ".join(results) or "none")
        elif op == "stash-held":
            self.stash = list(self.held)
            self.reply(request, str(len(self.stash)))
        elif op == "batch-held":
            # Complete the held requests from a thread inside one completion
            # batch that stays open for a while after.
            held, self.held = list(self.held), []
            threading.Thread(target=self._complete_in_batch, args=(held, float(args[0])),
                             daemon=True).start()
            self.reply(request, str(len(held)))
        elif op == "drop-held-while-raising":
            # sorted() owns the only references to a held request and a
            # guest mapping, fails comparing them and frees its list with
            # the TypeError set: the exception must still arrive.
            def items():
                yield self.held.pop()
                yield self.handle.map_guest(int(args[0], 0), 4096, writable=True)
            try:
                sorted(items())
            except TypeError:
                self.reply(request, "caught TypeError")
            except Exception as e:  # noqa: BLE001 - what arrived instead is the answer
                self.reply(request, f"lost: {type(e).__name__}: {e}")
        elif op == "release-in-thread":
            # A mapping made here and released by a model's own thread (a
            # stream worker done with a buffer): no BQL there.
            mapping = self.handle.map_guest(int(args[0], 0), 4096, writable=True)
            thread = threading.Thread(target=mapping.release, name="worker")
            thread.start()
            thread.join()
            self.reply(request, "released")
        elif op == "map-keep-slice":
            # A view derived from a mapping's (a conversion reading or
            # writing through it) outlives the mapping's release.
            mapping = self.handle.map_guest(int(args[0], 0), 4096, writable=True)
            self.slices.append(mapping.view[0:16])
            mapping.release()
            self.reply(request, "released")
        elif op == "write-slices":
            for piece in self.slices:
                piece[:4] = b"LATE"
            self.slices.clear()
            self.reply(request, "written")
        elif op == "orphan-on-reset":
            self.orphan_on_reset = True
            self.reply(request, "armed")
        elif op == "complete-stash":
            self.reply(request, " ".join(str(r.complete(0)) for r in self.stash))
        else:
            self.reply(request, f"unknown {op}")

    def _later(self, request: Request, delay: float) -> None:
        time.sleep(delay)
        request.complete(write_all(request, b"later"))

    def _complete_in_batch(self, requests: list[Request], linger: float) -> None:
        with self.handle.batch():
            for r in requests:
                r.complete(0)
            time.sleep(linger)          # completed, not pushed before the block ends

    @staticmethod
    def _probe(view: memoryview) -> str:
        try:
            view[0]
        except ValueError:
            return "dead"
        return "alive"

    def _map(self, address: int, length: int) -> str:
        try:
            mapping = self.handle.map_guest(address, length, writable=True)
        except ValueError as e:
            return f"refused {e}"
        with mapping:
            data = bytes(mapping.view[:8])
            mapping.view[:4] = b"PYEM"
            view = mapping.view
        return f"ok {data.hex()} after-release={self._probe(view)}"


class CyclicProbe(ProbeDevice):
    """A ProbeDevice in a reference cycle, as most device models are, moved to
    the collector's oldest generation as a long-lived model would be; when it
    is freed it writes "freed" into the file PYEMB_TEST_FREED names."""

    def __init__(self, handle, config, **kwargs) -> None:
        super().__init__(handle, config, **kwargs)
        self.me = self
        weakref.finalize(self, Path(os.environ["PYEMB_TEST_FREED"]).write_text, "freed")
        gc.collect()        # survivors of a full collection: the oldest generation


class FlakyVideoBackend(PyAVBackend):
    """Raises on its first capability query, then works."""

    calls = 0

    def capabilities(self, queue_type: QueueType):
        FlakyVideoBackend.calls += 1
        if FlakyVideoBackend.calls == 1:
            raise RuntimeError("flaky backend: first query fails")
        return super().capabilities(queue_type)


class BrokenConstructorBackend(PyAVBackend):
    def __init__(self, config=None) -> None:
        raise OSError("no such host device")


class EncoderFailingAtPicture3(PyAVBackend):
    """PyAV's encoders, except that a VP8 session fails at its fourth picture
    (an engine error in the middle of a stream); other formats work."""

    def open_encoder(self, settings):
        session = super().open_encoder(settings)
        if settings.coded != Format.VP8:
            return session
        encode = session.encode
        count = [0]

        def failing(picture, timestamp, keyframe):
            count[0] += 1
            if count[0] == 4:
                raise RuntimeError("encoder fell over")
            return encode(picture, timestamp, keyframe)

        session.encode = failing
        return session


# Views of shared memory kept by ShmProbe devices, by device name: another
# device in the same QEMU probes them after the keeper is unplugged.
KEPT_SHM: dict[str, tuple] = {}


class ShmProbe(DeviceModel):
    """A virtio-media-ID device (48) whose queue 0 takes text commands on
    ``handle.shared_memory``; queue 1 (an event queue) holds its requests."""

    device_id = 48
    queue_sizes = (64, 64)

    def __init__(self, handle, config, **kwargs) -> None:
        self.held: list[Request] = []
        super().__init__(handle, config)

    def queue_handlers(self) -> list[Callable[[Request], None]]:
        return [self.on_command, self.held.append]

    def reset(self) -> None:
        super().reset()
        self.held.clear()

    def on_command(self, request: Request) -> None:
        op, *args = read_all(request).decode().split()
        shm = self.handle.shared_memory
        if op in ("write", "read", "touch"):
            at = int(args[0], 0)
        if op == "size":
            reply = "none" if shm is None else str(len(shm))
        elif op == "write":             # write OFFSET HEX
            data = bytes.fromhex(args[1])
            shm[at:at + len(data)] = data
            reply = "ok"
        elif op == "read":              # read OFFSET LENGTH -> hex
            reply = shm[at:at + int(args[1], 0)].hex()
        elif op == "touch":             # touch OFFSET LENGTH: every page
            n = int(args[1], 0)
            shm[at:at + n] = b"\x5a" * n
            reply = "ok"
        elif op in ("discard", "discard-in-thread"):
            reply = self._discard(int(args[0], 0), int(args[1], 0), op != "discard")
        elif op == "keep":              # the view itself and a slice of it
            KEPT_SHM[self.handle.name] = (self.handle, shm, shm[:16])
            reply = "kept"
        elif op == "probe-kept":        # probe-kept NAME: another device's
            handle, view, piece = KEPT_SHM[args[0]]
            reply = (f"live={handle.live} view={ProbeDevice._probe(view)} "
                     f"slice={bytes(piece).hex()}")
        else:
            reply = f"unknown {op}"
        request.complete(write_all(request, reply.encode()))

    def _discard(self, offset: int, length: int, in_thread: bool) -> str:
        outcome: list[str] = []

        def run() -> None:
            try:
                self.handle.discard_shared_memory(offset, length)
                outcome.append("ok")
            except ValueError as e:
                outcome.append(f"refused {e}")

        if in_thread:
            thread = threading.Thread(target=run, name="discarding")
            thread.start()
            thread.join()
        else:
            run()
        return outcome[0]
