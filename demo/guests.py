"""Two Linux guests at once on this host, each with its own virtio-video-py
and virtio-snd-py (two QEMU processes, TCG).

Each guest (ci/build_guest.py: Debian's 6.12 kernel, the ChromeOS
virtio-video driver) decodes its own 720p H.264 clip with the project's
V4L2 client while it plays a tune with aplay and records with arecord.  The
client writes every decoded picture, as it took it from its CAPTURE buffer,
to a virtio-serial port whose host side is a file (the virtio console driver
is built into Debian's kernel, so the guest image needs nothing more; 104 MB
per guest cross in about a second).  The host then checks those pictures
against PyAV byte for byte, writes ``guestN.mp4`` (the pictures, and the
sound the guest played) and PNG stills.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from demo import guest_sound, guest_video
from demo.guest_sound import GuestSound
from tests.guest import GuestResult, boot_guest
from tests.streams import frames_file, split_frames

GUESTS = (1, 2)
STILLS = (0, guest_video.FRAMES // 2, guest_video.FRAMES - 1)
TIMEOUT = 600

SCRIPT = r"""
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = pictures ] && port=/dev/${p##*/}
done
echo "guest: $(uname -sr), $(cat /sys/class/video4linux/video0/name) at /dev/video0," \
    "pictures out through $port"
. /sound-start.sh
start=$(cut -d' ' -f1 /proc/uptime)
pyemb-v4l2-decode --dump $port /clip.pyf > /tmp/decode.txt 2> /tmp/decode.err; rc=$?
end=$(cut -d' ' -f1 /proc/uptime)
echo "guest: pyemb-v4l2-decode rc=$rc in $(awk "BEGIN { print $end - $start }") s" \
    "($(tail -n 1 /tmp/decode.txt)), aplay and arecord running alongside"
sed -n 's/^pyemb-v4l2-decode: \(CAPTURE .*\)/guest: \1/p' /tmp/decode.err
[ $rc = 0 ] || sed 's/^/guest: decoder: /' /tmp/decode.err
. /sound-finish.sh
echo "== crcs"; grep ^FRAME /tmp/decode.txt
"""


def boot(guest: int, stream: bytes, sound: GuestSound, dump: Path) -> GuestResult:
    files = {
        "clip.pyf": frames_file("h264", guest_video.WIDTH, guest_video.HEIGHT,
                                split_frames(stream)),
        "tune.wav": sound.tune,
        "sound-start.sh": guest_sound.START.encode(),
        "sound-finish.sh": guest_sound.FINISH.encode(),
    }
    args = ["-device", "virtio-video-py-pci", *sound.device_args(),
            "-device", "virtio-serial-pci",
            "-chardev", f"file,id=pictures,path={dump}",
            "-device", "virtserialport,chardev=pictures,name=pictures"]
    return boot_guest(args, SCRIPT, files, timeout=TIMEOUT, memory="1G")


def run(out_dir: Path) -> list[Path]:
    """Run both guests; the files written, for a person to look at and listen to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    has_output, has_input = guest_sound.host_devices()
    t0 = time.monotonic()
    streams = {g: guest_video.clip(g) for g in GUESTS}
    print("== two real guests at once (Debian 6.12 kernel, TCG, one QEMU each): "
          "-device virtio-video-py-pci -device virtio-snd-py-pci")
    print(f"  made two {guest_video.WIDTH}x{guest_video.HEIGHT} H.264 clips of "
          f"{guest_video.FRAMES} pictures with PyAV in {time.monotonic() - t0:.1f} s "
          f"({', '.join(f'{len(s) // 1000} kB' for s in streams.values())})")
    sounds = {g: GuestSound(out_dir, g, has_output, has_input) for g in GUESTS}
    results: dict[int, GuestResult | BaseException] = {}
    with tempfile.TemporaryDirectory(prefix="pyemb-demo-") as tmp:
        dumps = {g: Path(tmp) / f"guest{g}.nv12" for g in GUESTS}

        def one(g: int) -> None:
            try:
                results[g] = boot(g, streams[g], sounds[g], dumps[g])
            except BaseException as e:  # noqa: BLE001 - reported below, per guest
                results[g] = e

        t1 = time.monotonic()
        threads = [threading.Thread(target=one, args=(g,)) for g in GUESTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"  both guests booted, decoded, played, recorded and powered off in "
              f"{time.monotonic() - t1:.1f} s")
        failed, files = [], []
        for g in GUESTS:
            failed += report(g, results[g], streams[g], sounds[g], dumps[g], out_dir, files)
    if failed:
        raise SystemExit("demo: " + "; ".join(failed))
    print(f"  the two-guest part took {time.monotonic() - t0:.1f} s in all")
    return files


def report(guest: int, result: GuestResult | BaseException, stream: bytes,
           sound: GuestSound, dump: Path, out_dir: Path, files: list[Path]) -> list[str]:
    """Print what guest ``guest`` did and write its files (added to
    ``files``); the failures."""
    print(f"  -- guest {guest}")
    if isinstance(result, BaseException):
        print(f"  {result}")
        return [f"guest {guest} did not finish"]
    for line in result.console.splitlines():
        if line.startswith("guest:"):
            print(f"  {line}")
    failed = [] if result.rc == 0 else [f"guest {guest}'s script ended with rc {result.rc}"]
    sound.collect()
    try:
        for line in sound.report():
            print(f"  {line}")
    except (OSError, ValueError) as e:
        print(f"  no sound came back: {e}")
        failed.append(f"guest {guest}'s sound")
    files += [p for p in (sound.played, sound.echo) if p.exists()]
    w, h = guest_video.WIDTH, guest_video.HEIGHT
    try:
        pictures = guest_video.pictures(dump.read_bytes(), w, h)
    except (OSError, ValueError) as e:
        print(f"  no pictures came back: {e}")
        return [*failed, f"guest {guest}'s pictures"]
    same, expected, differ = guest_video.compare(pictures, stream)
    crcs = guest_video.console_crcs(result.section("crcs"))
    crcs_ok = crcs == guest_video.crcs(pictures)
    verdict = "bit-exact" if same == expected == len(pictures) else "NOT bit-exact"
    print(f"  {len(pictures)} pictures ({dump.stat().st_size / 1e6:.0f} MB) came back "
          f"through the serial port; {same}/{expected} equal to PyAV's decoding of the "
          f"same clip: {verdict}" + (f" (first differing: {differ[:5]})" if differ else ""))
    print(f"  the guest's own CRC of each CAPTURE buffer "
          f"{'matches' if crcs_ok else 'does NOT match'} what arrived")
    if verdict != "bit-exact" or not crcs_ok:
        failed.append(f"guest {guest}'s pictures differ from PyAV's")
    video = out_dir / f"guest{guest}.mp4"
    audio = None if sound.has_output or not sound.played.exists() else sound.played
    guest_video.write_video(video, pictures, w, h, audio)
    print(f"  video{' with its tune' if audio else ''}: {video}")
    files.append(video)
    stills = []
    for i in STILLS:
        if i < len(pictures):
            path = out_dir / f"guest{guest}-picture{i:03d}.png"
            guest_video.write_png(path, guest_video.nv12_frame(pictures[i], w, h))
            stills.append(path)
    print(f"  stills: {', '.join(str(p) for p in stills)}")
    files += stills
    return failed
