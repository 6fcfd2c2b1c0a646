#!/usr/bin/env bash
# Creates the project's virtual environment (.venv, or $PYEMB_VENV) from Debian's
# python3.11, the same Python whose libpython QEMU links against, and installs
# pyemb into it (editable) with what the tests need. A tool environment for
# meson (QEMU needs >= 1.5, bookworm has 1.0) lives in the build cache.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${PYEMB_VENV:-$repo/.venv}
cache=${PYEMB_CACHE:-$HOME/.cache/pyemb}
python=/usr/bin/python3.11

stamp_of() { sha256sum "$repo/pyproject.toml" | cut -c1-16; }

if [ ! -x "$venv/bin/python" ] || [ "$(readlink -f "$venv/bin/python")" != "$(readlink -f $python)" ]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
if [ "$(cat "$venv/.pyemb-stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e "$repo[test]"
    stamp_of > "$venv/.pyemb-stamp"
fi

tools=$cache/tools-venv
if ! "$tools/bin/python" -c 'import mesonbuild' 2>/dev/null; then
    rm -rf "$tools"
    mkdir -p "$cache"
    "$python" -m venv "$tools"
    "$tools/bin/python" -m pip install -q 'meson>=1.5,<2'
fi
