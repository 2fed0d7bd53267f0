# make test: set up everything a fresh machine lacks, then run the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test chaos demo bench deps system-deps clean

$(STAMP): setup.cfg setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

system-deps:
	@missing=""; \
	for tool in mosquitto:mosquitto mosquitto_pub:mosquitto-clients openssl:openssl rsyslogd:rsyslog logrotate:logrotate; do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; \
	done; \
	[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$$missing rabbitmq-server"; \
	[ -n "$$(ls /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 2>/dev/null)" ] \
	  || missing="$$missing libfaketime"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

deps: $(STAMP) system-deps

# four test processes (pytest-xdist; most tests wait on brokers and processes: three used ~1.2
# of the 2 cores, and four took the suite from 9 to 7.4 minutes); tests/conftest.py keeps what
# shares a broker node, systemd or a module fixture on one of them
test: deps
	$(BIN)/python -m pytest -q -n 4 --dist loadgroup

# the same suite on another Python, pyenv's when it is there: `make test-py39` (Raspberry Pi OS
# Bullseye's 3.9, the oldest we support), `make test-py313` (Trixie's 3.13, the newest)
test-py%: system-deps
	@version=$$(echo $* | sed 's/^3/3./'); \
	python=$$(ls $(HOME)/.pyenv/versions/$$version.*/bin/python3 2>/dev/null | tail -1); \
	[ -n "$$python" ] || python=$$(command -v python$$version || true); \
	if [ -z "$$python" ]; then echo "test-py$*: no Python $$version on this machine (pyenv install $$version)"; exit 1; fi; \
	$(MAKE) test PY=$$python VENV=.venv$*

# the fault-injection scenarios of tests/chaos at full size (make test runs them short)
chaos: deps
	FLASHLEXD_CHAOS=full $(BIN)/python -m pytest -q -s tests/chaos

demo: deps
	bash scripts/demo.sh

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

# every benchmark, then docs/BENCHMARKS.md (and docs/ingest-during-kills.png)
bench: deps $(VENV)/.bench-installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
