#!/usr/bin/env bash
# Builds the patched QEMU (qemu-system-x86_64 and qemu-system-aarch64).
#
# Source: Debian trixie's QEMU 10.0.x source package, unpacked with
# dpkg-source so Debian's patches apply, then qemu-patches/ on top, then
# c-shim/ copied to hw/pyemb/. The build lives in the cache
# ($PYEMB_CACHE, default ~/.cache/pyemb), one tree per source version and
# patch-series hash; a stamp holding the hash of c-shim/ makes an unchanged
# tree finish in about a second, and a changed c-shim/ file is copied alone
# so that ninja recompiles only what depends on it.
#
# Afterwards build/qemu in the repository points at the build directory, and
# build/qemu/pyemb.conf names the virtual environment the shim must use.
#
# ci/build-qemu.sh --sanitizers builds the same patched source with the same
# options, in its own tree in the cache (…-sanitizers, linked as
# build/qemu-sanitizers), with clang 14, ASan and UBSan, and QEMU's libFuzzer
# targets: one set of objects serves both qemu-system-* (make sanitize runs
# the qtest tier on them) and qemu-fuzz-x86_64 (make fuzz: generic-fuzz; it
# loads hw-pyemb-devices.so like the emulators, and libFuzzer counts the
# module's coverage too).  ci/setup-host.sh --sanitizers installs clang.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${PYEMB_CACHE:-$HOME/.cache/pyemb}
venv=${PYEMB_VENV:-$repo/.venv}
variant=normal
case "${1:-}" in
    "") ;;
    --sanitizers) variant=sanitizers ;;
    *) echo "usage: ci/build-qemu.sh [--sanitizers]" >&2; exit 2 ;;
esac
targets=x86_64-softmmu,aarch64-softmmu
binaries=(qemu-system-x86_64 qemu-system-aarch64)
# With --enable-modules the pyemb devices (and libpython) live in a module
# that QEMU loads only when a pyemb device is asked for.
products=("${binaries[@]}" hw-pyemb-devices.so)
variant_flags=(--enable-modules)
tree_suffix=
link_name=qemu
cold_minutes=9
if [ "$variant" = sanitizers ]; then
    command -v clang-14 >/dev/null || {
        echo "build-qemu: clang-14 is missing: run ci/setup-host.sh --sanitizers" >&2; exit 1; }
    binaries+=(qemu-fuzz-x86_64)
    products+=(qemu-fuzz-x86_64)
    variant_flags+=(--cc=clang-14 --cxx=clang++-14
                    --enable-asan --enable-ubsan --enable-fuzzing)
    tree_suffix=-sanitizers
    link_name=qemu-sanitizers
    cold_minutes=25
fi

log() { echo "build-qemu: $*"; }

# 1. The source package, downloaded once.
mkdir -p "$cache/src"
find_dsc() { ls "$cache"/src/qemu_10.0.*.dsc 2>/dev/null | sort -V | tail -n 1 || true; }
dsc=$(find_dsc)
if [ -z "$dsc" ]; then
    log "downloading Debian trixie's qemu source package"
    (cd "$cache/src" && apt-get source --download-only -q qemu >/dev/null)
    dsc=$(find_dsc)
    [ -n "$dsc" ] || { echo "build-qemu: no QEMU 10.0.x source package found (is the trixie deb-src entry there? run ci/setup-host.sh)" >&2; exit 1; }
fi
version=$(basename "$dsc" .dsc); version=${version#qemu_}

# 2. Unpacked and patched source tree, keyed by version and patch series.
patch_hash=$( (cat "$repo/qemu-patches/series"; for p in $(grep -v '^#' "$repo/qemu-patches/series"); do cat "$repo/qemu-patches/$p"; done) | sha256sum | cut -c1-12)
work=$cache/qemu-$version-$patch_hash$tree_suffix
src=$work/src
build=$work/build
if [ ! -f "$src/.pyemb-patched" ]; then
    log "unpacking $version and applying qemu-patches/"
    rm -rf "$src" "$build"
    mkdir -p "$work"
    dpkg-source --no-check -x "$dsc" "$src" >/dev/null
    for p in $(grep -v '^#' "$repo/qemu-patches/series"); do
        patch -s -p1 -d "$src" < "$repo/qemu-patches/$p"
    done
    touch "$src/.pyemb-patched"
fi

# 3. c-shim/ into hw/pyemb/, copying only what changed.
mkdir -p "$src/hw/pyemb"
for f in "$repo"/c-shim/*; do
    dst=$src/hw/pyemb/$(basename "$f")
    cmp -s "$f" "$dst" || cp "$f" "$dst"
done
for f in "$src"/hw/pyemb/*; do
    [ -e "$repo/c-shim/$(basename "$f")" ] || rm -f "$f"
done

configure_flags=(
    --target-list=$targets
    --python="$cache/tools-venv/bin/python3"
    --disable-docs --disable-tools --disable-guest-agent --disable-werror
    --disable-install-blobs
    --enable-fdt=system --enable-trace-backends=log "${variant_flags[@]}"
)
shim_hash=$( (printf '%s\n' "${configure_flags[@]}"; cat "$repo"/c-shim/*) | sha256sum | cut -c1-16)
up_to_date=1
for b in "${products[@]}"; do [ -e "$build/$b" ] || up_to_date=0; done
[ "$(cat "$build/.pyemb-stamp" 2>/dev/null)" = "$shim_hash" ] || up_to_date=0

if [ "$up_to_date" = 1 ]; then
    log "up to date ($build)"
else
    if [ ! -f "$build/build.ninja" ] || [ "$(cat "$build/.pyemb-configured" 2>/dev/null)" != "${configure_flags[*]}" ]; then
        log "configuring"
        rm -rf "$build"
        mkdir -p "$build"
        (cd "$build" && "$src/configure" "${configure_flags[@]}" > configure.log 2>&1) || {
            tail -n 40 "$build/configure.log" >&2; exit 1; }
        echo "${configure_flags[*]}" > "$build/.pyemb-configured"
    fi
    log "building ${binaries[*]} and modules (a cold build takes about $cold_minutes minutes on 2 cores)"
    # The emulators and the modules they load; not QEMU's own tests.
    modules=$(ninja -C "$build" -t targets all | sed -n 's/^\([A-Za-z0-9_-]*\.so\):.*/\1/p')
    # shellcheck disable=SC2086 # one word per module
    ninja -C "$build" "${binaries[@]}" $modules > "$build/ninja.log" 2>&1 &
    ninja_pid=$!
    # Ninja's step counter every 30 s: a cold build is not nine silent minutes.
    ticks=0
    while kill -0 "$ninja_pid" 2>/dev/null; do
        sleep 1
        ticks=$((ticks + 1))
        if [ $((ticks % 30)) = 0 ]; then
            step=$(grep -o '^\[[0-9]*/[0-9]*\]' "$build/ninja.log" | tail -n 1 || true)
            [ -z "$step" ] || log "building: $step steps done ($((ticks / 60)) min $((ticks % 60)) s)"
        fi
    done
    if ! wait "$ninja_pid"; then
        grep -B2 -A12 -m 5 'error' "$build/ninja.log" >&2 || tail -n 60 "$build/ninja.log" >&2
        exit 1
    fi
    echo "$shim_hash" > "$build/.pyemb-stamp"
fi

# 4. Firmware, as a distribution's QEMU has it: Debian's source
#    package has no binary blobs, so they come from Debian's binary packages,
#    downloaded once and unpacked (dpkg -x) into one tree in the cache, and
#    linked into the data directory that an uninstalled QEMU searches
#    (qemu-bundle/<prefix>/share/qemu):
#      seabios           bios.bin, bios-256k.bin, bios-microvm.bin, vgabios-*.bin
#      ipxe-qemu         the NICs' option ROMs, efi-*.rom and pxe-*.rom
#      qemu-system-data  kvmvapic.bin, linuxboot*.bin, multiboot*.bin, pvh.bin, qboot.rom
#      ovmf, qemu-efi-aarch64
#                        UEFI: OVMF.fd, QEMU_EFI.fd, upstream's edk2-*.fd names and
#                        the firmware/*.json descriptors
#    The tree is named by a hash of the package list: a changed list unpacks anew.
fw_debs=(seabios/bookworm-backports ipxe-qemu qemu-system-data/bookworm-backports
         ovmf qemu-efi-aarch64)
fw=$cache/firmware-$(printf '%s\n' "${fw_debs[@]}" | sha256sum | cut -c1-12)
root=$fw/root
if [ ! -f "$fw/.unpacked" ]; then
    log "downloading and unpacking firmware: ${fw_debs[*]}"
    rm -rf "$cache"/qemu-system-data "$cache"/firmware-*   # earlier trees, a half-done one
    mkdir -p "$fw/debs"
    (cd "$fw/debs" && apt-get download -q "${fw_debs[@]}" >/dev/null)
    for deb in "$fw"/debs/*.deb; do dpkg -x "$deb" "$root"; done
    # An absolute link means that path in this tree, never on the host.
    find "$root" -lname '/*' | while read -r l; do ln -sfn "$root$(readlink "$l")" "$l"; done
    sed -i "s|\"/usr/share/|\"$root/usr/share/|" "$root"/usr/share/qemu/firmware/*.json
    # The 64 MiB AAVMF images are mostly zeros.
    find "$root" -name '*.fd' -type f -size +8M -exec fallocate --dig-holes {} \;
    touch "$fw/.unpacked"
fi
datadir=$build/qemu-bundle/usr/local/share/qemu
# link_into DIR FILE...: links to the FILEs in DIR, leaving the build's own files be.
link_into() {
    local dir=$1 f files=()
    shift
    for f in "$@"; do
        [ -f "$f" ] || continue
        [ -e "$dir/${f##*/}" ] && [ ! -L "$dir/${f##*/}" ] && continue
        files+=("$f")
    done
    mkdir -p "$dir"
    [ ${#files[@]} = 0 ] || ln -sfn -t "$dir" "${files[@]}"
}
link_into "$datadir" "$root"/usr/share/seabios/*.bin "$root"/usr/lib/ipxe/qemu/*.rom \
    "$root"/usr/share/qemu/*
link_into "$datadir/firmware" "$root"/usr/share/qemu/firmware/*.json
while read -r name file; do
    ln -sfn "$root/usr/share/$file" "$datadir/$name"
done <<'EDK2'
QEMU_EFI.fd                qemu-efi-aarch64/QEMU_EFI.fd
edk2-aarch64-code.fd       AAVMF/AAVMF_CODE.fd
edk2-arm-vars.fd           AAVMF/AAVMF_VARS.fd
edk2-x86_64-code.fd        OVMF/OVMF_CODE_4M.fd
edk2-x86_64-secure-code.fd OVMF/OVMF_CODE_4M.secboot.fd
edk2-i386-vars.fd          OVMF/OVMF_VARS_4M.fd
EDK2
find "$datadir" -xtype l -delete        # links into an earlier firmware tree
for f in bios-256k.bin vgabios-stdvga.bin efi-e1000.rom efi-e1000e.rom efi-virtio.rom \
         kvmvapic.bin linuxboot_dma.bin; do
    [ -r "$datadir/$f" ] || { echo "build-qemu: $f is missing from $datadir" >&2; exit 1; }
done

# 5. Tell the shim which Python environment to embed, and give the
#    repository a stable path to the binaries.
printf 'venv=%s\n' "$venv" > "$build/pyemb.conf"
mkdir -p "$repo/build"
ln -sfn "$build" "$repo/build/$link_name"
log "binaries in $repo/build/$link_name/"
