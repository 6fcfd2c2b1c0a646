#!/usr/bin/env bash
# What `make bench` needs beyond `make build`: the ffmpeg CLI, a reference
# for bench/decode_throughput.py (Debian's, so older than PyAV's FFmpeg).
set -euo pipefail
sudo_cmd=()
[ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
if ! command -v ffmpeg >/dev/null; then
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends ffmpeg >/dev/null
fi
