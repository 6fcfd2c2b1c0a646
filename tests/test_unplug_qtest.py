"""Hot-unplug of every pyemb device with streams running, many times over
(issue 15 item 4): QEMU lives, says nothing, and serves the devices plugged
after.  ``bench.unplug_loop`` runs 1,000 cycles and prints the RSS curve."""

from __future__ import annotations

from pathlib import Path

from bench.unplug_loop import cycles, plug, snd_config, start_streams
from tests.hostdriver import Machine
from tests.streams import encode


def test_unplugging_three_devices_mid_stream_forty_times(tmp_path: Path):
    with Machine.x86([], mem_mb=256) as m:
        cycles(m, 40, tmp_path)
        assert m.alive()
        assert m.stderr().strip() == ""
        plug(m, snd_config(tmp_path))               # and once more, left running
        start_streams(m, [(data, i) for i, (data, _) in enumerate(encode("h264", 160, 96, 6))])
