# Two set-up commands: `make up` (install, then start the node) and `make test` (install, then ruff, mypy and all tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?=
STAMP := $(VENV)/.installed

.PHONY: install install-test peers up test clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch from this machine's disk, then sam2 as an sdist built against it (../shared/docs/medsam2.md),
# then the project itself. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation sam2==1.1.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The real peers the tests talk to: DCMTK, dicom3tools, Orthanc (with its DICOMweb plugin for STOW-RS), Chromium for the console's browser
# test (Playwright drives Debian's; its own download is not used), Prometheus (Debian packages).
peers:
	@command -v /usr/bin/storescu >/dev/null && command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null && \
	  test -x /usr/bin/chromium && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk dicom3tools orthanc orthanc-dicomweb chromium >/dev/null)
	@# Prometheus and promtool (deploy/prometheus tests); no daemon left from the package: tests start their own
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  ((apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) && \
	   (systemctl stop prometheus 2>/dev/null || service prometheus stop >/dev/null 2>&1 || true))
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp
	@# docker-compose (deploy/compose.multi-host.yml is checked by `docker-compose config`; no daemon needed)
	@command -v docker-compose >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null)
	@# RabbitMQ on 127.0.0.1:5672 (the durable broker's fault test takes a private vhost on it)
	@command -v rabbitmqctl >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null)
	@rabbitmqctl -q await_startup >/dev/null 2>&1 || service rabbitmq-server start >/dev/null 2>&1 || \
	  (rabbitmq-server -detached && sleep 5 && rabbitmqctl -q await_startup)
	@# PostgreSQL 15 ([store] url tests): the server on 127.0.0.1:5432 (trust auth) and initdb/pg_ctl for test-owned ones
	@test -x /usr/lib/postgresql/15/bin/pg_ctl || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null)

up: install
	$(VENV)/bin/medsam2-cxr up $(if $(CONFIG),--config $(CONFIG),)

# Lint and type check first (settings in pyproject.toml), then every test folder: unit, integration,
# e2e, faults, bench (plain `pytest` runs tests/unit only).
test: install peers
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m pytest -q -ra tests/unit tests/integration tests/e2e tests/faults tests/bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
