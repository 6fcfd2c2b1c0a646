#!/usr/bin/env bash
# Provides a current v4l2-compliance for the real-guest tier.
#
# bookworm's v4l2-compliance (1.22) fails checks that later v4l-utils fixed
# (NV12's description, DECODER_CMD's media-entity check) and the failures
# cascade, so the guest gets Debian trixie's instead. Debian's archive as
# reached here serves trixie's v4l-utils binary packages but not its source
# package (the .dsc and tarballs answer 404), so this does not compile it:
# it takes trixie's v4l-utils and every library v4l2-compliance loads (libv4l2,
# libv4lconvert, libjpeg, libstdc++, libgcc_s, and trixie's glibc with its
# dynamic loader) and makes a self-contained directory whose v4l2-compliance
# is a wrapper that runs the binary through the bundled loader with
# --library-path, so nothing is taken from the system it runs on (the guest's
# bookworm libc stays as it is).
#
# Packages come from a private apt state for trixie in the cache
# ($PYEMB_CACHE, default ~/.cache/pyemb, under apt-trixie/): the host's own
# sources and lists are not touched. Its lists are fetched once; a package
# that has since left the archive (a trixie point release) makes it fetch them
# again. The downloaded .deb files are kept in src/v4l-utils-trixie/.
#
#     ci/build_v4l2_compliance.sh [amd64|arm64]     (default: amd64)
#
# Output, keyed by v4l-utils' version and this script's hash (arm64 adds
# -arm64 to the version), printed as the last line of stdout:
#
#     $cache/v4l2-compliance-<version>-<hash>/
#         v4l2-compliance        the wrapper (/bin/sh; follows links to itself)
#         bin/v4l2-compliance    trixie's binary
#         lib/                   the loader and the libraries, by soname
#         VERSIONS               the packages it was made from
#
# Copy the directory anywhere (the guest: /opt/v4l2-compliance) and run its
# v4l2-compliance, directly or through a symbolic link. An up-to-date
# directory finishes in about a second.
set -euo pipefail
cache=${PYEMB_CACHE:-$HOME/.cache/pyemb}
arch=${1:-amd64}
case $arch in
    amd64) triplet=x86_64-linux-gnu; loader=ld-linux-x86-64.so.2; suffix= ;;
    arm64) triplet=aarch64-linux-gnu; loader=ld-linux-aarch64.so.1; suffix=-arm64 ;;
    *) echo "usage: $0 [amd64|arm64]" >&2; exit 2 ;;
esac
# v4l-utils first; the rest are what its v4l2-compliance loads, checked below.
packages=(v4l-utils libv4l-0t64 libv4lconvert0t64 libjpeg62-turbo libstdc++6 libgcc-s1 libc6)

log() { echo "build-v4l2-compliance: $*" >&2; }

# One run at a time (the amd64 and arm64 guests may be built together).
mkdir -p "$cache"
exec 9>"$cache/.v4l2-compliance.lock"
flock 9

# 1. A private apt state that sees trixie's binary packages for both guests.
state=$cache/apt-trixie
debs=$cache/src/v4l-utils-trixie
apt_opts=(
    -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$state/sources.list.d"
    -o Dir::Etc::Parts="$state/apt.conf.d" -o Dir::Etc::Preferences=/dev/null
    -o Dir::Etc::PreferencesParts="$state/preferences.d"
    -o Dir::State="$state/state" -o Dir::State::Lists="$state/lists"
    -o Dir::State::status="$state/state/status" -o Dir::Cache="$state/cache"
    -o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o APT::Architectures::=arm64
    -o Acquire::Languages=none -o APT::Sandbox::User="$(id -un)"
)
# resolve: the candidate version of each package for both guests, in
# $state/versions ("package:arch version"), so that a run with nothing to do
# does not read the lists (apt-cache takes seconds over them).
resolve() {
    local names=() p a
    for a in amd64 arm64; do for p in "${packages[@]}"; do names+=("$p:$a"); done; done
    apt-cache "${apt_opts[@]}" policy "${names[@]}" | awk '
        /^[^ ].*:$/ { p = substr($0, 1, length($0) - 1); if (p !~ /:/) p = p ":amd64" }
        /^  Candidate: / { print p, $2 }' > "$state/versions.new"
    mv "$state/versions.new" "$state/versions"
}
update_lists() {
    log "fetching trixie's package lists (amd64, arm64) into $state"
    apt-get "${apt_opts[@]}" update -q >"$state/update.log" 2>&1 || {
        cat "$state/update.log" >&2; exit 1; }
    resolve
}
if ! ls "$state"/lists/*trixie_main_binary-arm64_Packages* >/dev/null 2>&1; then
    mkdir -p "$state"/{sources.list.d,apt.conf.d,preferences.d,state,lists/partial,cache}
    touch "$state/state/status"
    cat > "$state/sources.list.d/trixie.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    update_lists
fi
candidate() { awk -v p="$1:$arch" '$1 == p && $2 != "(none)" { print $2 }' "$state/versions"; }
[ -f "$state/versions" ] || resolve
for p in "${packages[@]}"; do
    [ -n "$(candidate "$p")" ] || {
        echo "build-v4l2-compliance: no $p:$arch in trixie's lists ($state)" >&2; exit 1; }
done
# deb_file PACKAGE VERSION: where apt-get download puts it (an epoch's colon as %3a).
deb_file() { echo "$debs/${1}_${2/:/%3a}_$arch.deb"; }
version=$(candidate v4l-utils)

# 2. The cached result.
script_hash=$(sha256sum "$0" | cut -c1-12)
out=$cache/v4l2-compliance-$version$suffix-$script_hash
if [ -f "$out/.complete" ]; then
    log "up to date"
    echo "$out/v4l2-compliance"
    exit 0
fi

# 3. The packages, downloaded once.
mkdir -p "$debs"
wanted=()
for p in "${packages[@]}"; do
    v=$(candidate "$p")
    [ -f "$(deb_file "$p" "$v")" ] || wanted+=("$p:$arch=$v")
done
if [ ${#wanted[@]} -gt 0 ]; then
    log "downloading ${wanted[*]}"
    (cd "$debs" && apt-get "${apt_opts[@]}" download -q "${wanted[@]}" >/dev/null 2>&1) || {
        # The lists may name versions the archive has replaced since.
        update_lists
        version=$(candidate v4l-utils)
        out=$cache/v4l2-compliance-$version$suffix-$script_hash
        wanted=()
        for p in "${packages[@]}"; do wanted+=("$p:$arch"); done
        (cd "$debs" && apt-get "${apt_opts[@]}" download -q "${wanted[@]}" >/dev/null)
    }
fi

# 4. Unpacked, and the directory assembled next to its final place.
tmp=$(mktemp -d "$cache/.v4l2-compliance.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
new=$tmp/out
mkdir -p "$new/bin" "$new/lib"
: > "$new/VERSIONS"
for p in "${packages[@]}"; do
    v=$(candidate "$p")
    dpkg-deb -x "$(deb_file "$p" "$v")" "$root"
    echo "$p:$arch $v" >> "$new/VERSIONS"
done
cp "$root/usr/bin/v4l2-compliance" "$new/bin/"
# The loader and the libraries: everything NEEDED, followed through the
# libraries (readelf reads either architecture), each found in the packages.
cp -L "$root/usr/lib/$triplet/$loader" "$new/lib/$loader"
todo=("$new/bin/v4l2-compliance")
while [ ${#todo[@]} -gt 0 ]; do
    elf=${todo[0]}; todo=("${todo[@]:1}")
    for lib in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [ -e "$new/lib/$lib" ] && continue
        found=
        for d in "lib/$triplet" "usr/lib/$triplet"; do
            [ -e "$root/$d/$lib" ] && { found=$root/$d/$lib; break; }
        done
        [ -n "$found" ] || {
            echo "build-v4l2-compliance: $lib (needed by ${elf##*/}) is in none of: ${packages[*]}" >&2
            exit 1; }
        cp -L "$found" "$new/lib/$lib"
        todo+=("$new/lib/$lib")
    done
done
cat > "$new/v4l2-compliance" <<WRAPPER
#!/bin/sh
# v4l2-compliance from Debian trixie's v4l-utils $version ($arch), run by the
# dynamic loader beside it with the libraries beside it (see VERSIONS): it
# needs nothing from the system, whose own libc may be older.
d=\$(dirname "\$(readlink -f "\$0")")
exec "\$d/lib/$loader" --library-path "\$d/lib" --argv0 "\$0" "\$d/bin/v4l2-compliance" "\$@"
WRAPPER
chmod 755 "$new/v4l2-compliance" "$new/bin/v4l2-compliance" "$new/lib/$loader"
if [ "$arch" = "$(dpkg --print-architecture)" ]; then
    "$new/v4l2-compliance" --version >/dev/null || {
        echo "build-v4l2-compliance: the bundled v4l2-compliance does not run" >&2; exit 1; }
fi
touch "$new/.complete"
rm -rf "$out"
mv "$new" "$out"
# Earlier results of this architecture (another version or script).
for old in "$cache"/v4l2-compliance-*; do
    [ "$old" = "$out" ] && continue
    case ${old##*/} in *-arm64-*) [ "$arch" = arm64 ] || continue ;;
                       *) [ "$arch" = amd64 ] || continue ;; esac
    rm -rf "$old"
done
log "$(head -n 1 "$out/VERSIONS") in $out"
echo "$out/v4l2-compliance"
