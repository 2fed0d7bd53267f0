# make test: set up everything a fresh machine lacks, then run the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench deps system-deps clean

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
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

deps: $(STAMP) system-deps

test: deps
	$(BIN)/python -m pytest -q

demo: deps
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info
