# Sender Filter: `make run` starts the appliance, `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := iptables ipset postfix swaks dnsmasq-base conntrack iproute2 procps chromium nftables vagrant debootstrap qemu-system-x86 qemu-utils openssh-client python3-venv python3-dev gcc e2fsprogs

.PHONY: run test lint format system-packages clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	SENDER_FILTER_PURE=1 $(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The mail-log parser and the profiler compiled by mypyc (setup.py) beside
# their sources, and again whenever one of them changes: a stale build would
# shadow the edit.
# A build that fails leaves pure Python, not the previous build, and is
# tried again at the next make (once gcc and python3-dev are there).
$(VENV)/.compiled: $(VENV)/.installed setup.py appliance/profiler.py $(wildcard appliance/sources/*.py)
	rm -f appliance/*.so appliance/sources/*.so
	$(PY) setup.py --quiet build_ext --inplace --force
	if ls appliance/sources/correlate.*.so >/dev/null 2>&1; then touch $@; \
	else echo "ingest runs as pure Python: the build is tried again at the next make"; fi

# As root, install the Debian packages the appliance and its tests drive.
# The tests run their own Postfix instances; the system one stays unconfigured.
system-packages:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(SYSTEM_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "not root: system packages not checked; kernel and Postfix tests will skip"; fi

# `make run PORT=8090` serves the demo console on another port (default 8080)
run: $(VENV)/.compiled
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH PORT="$(PORT)" ./scripts/run-demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: system-packages $(VENV)/.compiled lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/pytest -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
	rm -f appliance/*.so appliance/sources/*.so
