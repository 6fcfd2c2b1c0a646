#!/usr/bin/env bash
# Installs every Debian package pyemb needs to build QEMU and run its tests, and
# adds the Debian trixie deb-src entry that the QEMU 10.0.x source comes from.
# Idempotent: a second run with everything present takes about a second.
#
# ci/setup-host.sh --sanitizers also installs clang and its runtimes (ASan,
# UBSan, libFuzzer) for ci/build-qemu.sh --sanitizers (make sanitize, make
# fuzz); make test does not ask for them.
set -euo pipefail

packages=(
    build-essential ninja-build pkg-config dpkg-dev xz-utils
    libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev flex bison
    python3.11 python3.11-dev python3.11-venv libpython3.11-dev
    seabios libportaudio2
    # the real-guest tier: out-of-tree guest modules (BTF needs pahole), and
    # the V4L2 and GStreamer programs copied into the guest image
    dwarves v4l-utils gstreamer1.0-tools gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
    # the arm64 guest: its virtio-video driver and our client cross-built
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross
)
if [ "${1:-}" = --sanitizers ]; then
    # bookworm's clang 14; libclang-rt-14-dev holds the sanitizer runtimes
    # and libFuzzer (a Recommends, which --no-install-recommends leaves out).
    packages+=(clang-14 libclang-rt-14-dev llvm-14)
fi

sudo_cmd=()
[ "$(id -u)" = 0 ] || sudo_cmd=(sudo)

trixie_src=/etc/apt/sources.list.d/pyemb-trixie-src.sources
need_update=0
if [ ! -f "$trixie_src" ]; then
    "${sudo_cmd[@]}" tee "$trixie_src" >/dev/null <<'SRC'
# Added by pyemb's ci/setup-host.sh: QEMU 10.0.x source package (deb-src only,
# no binary package is ever installed from trixie).
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    need_update=1
fi

# bookworm-backports: qemu-system-data's option ROMs (and, for guests, the
# 6.12 kernel).  Nothing is installed from it unless asked by name.
backports=/etc/apt/sources.list.d/pyemb-bookworm-backports.sources
if [ ! -f "$backports" ]; then
    "${sudo_cmd[@]}" tee "$backports" >/dev/null <<'SRC'
# Added by pyemb's ci/setup-host.sh.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    need_update=1
fi

# The arm64 guest's packages are fetched with apt-get download <name>:arm64.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    "${sudo_cmd[@]}" dpkg --add-architecture arm64
    need_update=1
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    need_update=1
fi
# apt-cache showsrc needs the source lists once, the arm64 guest the arm64 ones.
if ! ls /var/lib/apt/lists/*trixie*Sources* /var/lib/apt/lists/*bookworm-backports*Packages* \
        /var/lib/apt/lists/*bookworm-backports*binary-arm64_Packages* >/dev/null 2>&1; then
    need_update=1
fi
if [ "$need_update" = 1 ]; then
    "${sudo_cmd[@]}" apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
