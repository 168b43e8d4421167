# dedupblk: set-up, main job and tests for a fresh Debian 12 machine (run as root).
#   make demo   set everything up, serve a store and run the main job
#   make test   set everything up, lint, type-check and run every test tier
#   make install-systemd   set everything up, install the swap unit (README, "Running as swap")

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd qemu-utils fio lvm2 \
	qemu-system-x86 busybox-static e2fsprogs util-linux fdisk xz-utils cpio kmod python3-venv \
	python3-dev
STAMP := .venv/.installed

.PHONY: setup apt venv demo test lint unit nbd vm bench clean install-systemd

setup: apt venv

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The venv must come from Debian's /usr/bin/python3: nbdkit's Python plugin embeds that interpreter.
venv: $(STAMP)
$(STAMP): pyproject.toml
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check dedupblk tests bench testbed
	$(VENV)/bin/ruff format --check dedupblk tests bench testbed
	$(VENV)/bin/mypy dedupblk testbed

unit: setup
	$(PY) -m pytest -q tests/unit

test: setup
	$(VENV)/bin/ruff check dedupblk tests bench testbed
	$(VENV)/bin/ruff format --check dedupblk tests bench testbed
	$(VENV)/bin/mypy dedupblk testbed
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m dedupblk.demo

bench: setup
	$(PY) -m dedupblk.bench

# contrib/dedupblk-swap@.service with this checkout's paths put in: the unit runs this venv's
# dedupblk. UNIT_DIR=DIR installs elsewhere (the tests verify the unit that way).
UNIT_DIR := /etc/systemd/system
UNIT := dedupblk-swap@.service
install-systemd: setup
	@case "$(CURDIR)" in *[!A-Za-z0-9._/+-]*) echo "install-systemd: $(CURDIR) has characters \
	    a unit file would need quoted; use a checkout elsewhere" >&2; exit 1;; esac
	sed -e 's|@DEDUPBLK@|$(CURDIR)/$(VENV)/bin/dedupblk|g' -e 's|@REPO@|$(CURDIR)|g' \
	    contrib/$(UNIT) > $(UNIT_DIR)/.$(UNIT).tmp
	mv -f $(UNIT_DIR)/.$(UNIT).tmp $(UNIT_DIR)/$(UNIT)
	@if [ "$(UNIT_DIR)" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then \
	    systemctl daemon-reload; fi
	@echo "installed $(UNIT_DIR)/$(UNIT); next: systemctl edit dedupblk-swap@swap.service" \
	    "(SLOTS=...), then systemctl enable --now dedupblk-swap@swap.service"

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
