# pyemb: `make demo` and `make test` work on a fresh Debian bookworm machine;
# each installs what is missing (ci/setup-host.sh, ci/setup-venv.sh) and
# builds the patched QEMU (ci/build-qemu.sh, cached) first.
VENV ?= $(CURDIR)/.venv
export PYEMB_VENV := $(VENV)
PYTHON := $(VENV)/bin/python

.PHONY: setup build test demo lint bench clean sanitizers sanitize

setup:
	bash ci/setup-host.sh
	bash ci/setup-venv.sh

build: setup
	bash ci/build-qemu.sh
	/usr/bin/python3.11 ci/build_guest.py
	/usr/bin/python3.11 ci/build_guest.py --arch arm64

test: build
	$(PYTHON) -m ruff check pyemb tests bench ci
	$(PYTHON) -m pytest -q tests

demo: build
	$(PYTHON) -m demo.run

lint:
	$(PYTHON) -m ruff check pyemb tests bench ci

bench: build
	bash ci/setup-bench.sh
	$(PYTHON) -m bench.control_roundtrip
	$(PYTHON) -m bench.decode_throughput
	$(PYTHON) -m bench.encode_throughput
	$(PYTHON) -m bench.encode_quality
	$(PYTHON) -m bench.guest_decode
	$(PYTHON) -m bench.media_capture
	$(PYTHON) -m bench.snd_pacing
	$(PYTHON) -m bench.soak
	$(PYTHON) -m bench.unplug_loop

# The ASan + UBSan + libFuzzer build (clang 14, its own tree in the cache,
# build/qemu-sanitizers); make test never needs it.
sanitizers:
	bash ci/setup-host.sh --sanitizers
	bash ci/setup-venv.sh
	bash ci/build-qemu.sh --sanitizers

# The qtest tier on the sanitizer build: any ASan, LeakSanitizer or UBSan
# report from QEMU fails the run.
sanitize: sanitizers
	$(PYTHON) ci/sanitizers.py

# The project's own protocol fuzzer on the host driver (bench/protocol_fuzz.py),
# FUZZ_SECONDS per device (PROTOCOL_FUZZ_DEVICES: a subset); findings are kept
# in tests/fuzz-corpus/protocol/ and replayed by make test.  make fuzz runs it.
FUZZ_SECONDS ?= 300
PROTOCOL_FUZZ_DEVICES ?=
.PHONY: fuzz protocol-fuzz generic-fuzz
fuzz: protocol-fuzz generic-fuzz
protocol-fuzz: build
	$(PYTHON) -m bench.protocol_fuzz --seconds $(FUZZ_SECONDS) $(PROTOCOL_FUZZ_DEVICES)

# QEMU's generic-fuzz (ci/generic_fuzz.py) on the sanitizer build, FUZZ_SECONDS
# per device (GENERIC_FUZZ_DEVICES: a subset); findings are kept in
# tests/fuzz-corpus/generic/ and replayed by make test.  make fuzz runs it too.
GENERIC_FUZZ_DEVICES ?=
generic-fuzz: sanitizers
	$(PYTHON) ci/generic_fuzz.py --seconds $(FUZZ_SECONDS) $(GENERIC_FUZZ_DEVICES)

clean:
	rm -rf build .venv
