# pacsbridge: the two commands of the README, and what they stand on.
# Everything is installed from PyPI (into .venv) and Debian's packages, by these rules.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PB     := $(VENV)/bin/pacsbridge
DEBS   := dcmtk orthanc orthanc-dicomweb dicom3tools
PYTEST_ARGS ?=

.PHONY: demo install install-test services debs lint test bench bench-ingest bench-retrieve bench-push bench-cohort bench-dicomweb bench-deid bench-scale bench-memory clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(VENV)/bin/activate
	$(PIP) install -q -e .

install-test: $(VENV)/bin/activate
	$(PIP) install -q -e '.[test]'

# First try, no server needed: listener + workers + API on SQLite and an embedded broker, with
# pydicom's bundled examples indexed into ./data + ./conquest.db; Ctrl-C stops it
demo: install
	$(PB) serve --demo

# Debian packages the tests talk to (real DICOM peers)
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	fi

# The machine's PostgreSQL and Redis (started if down)
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
	@for i in $$(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done

# ruff (pyflakes, pycodestyle, bugbear) and mypy over the tree as it is (pyproject.toml says how);
# the import rules of docs/architecture.md are tests/test_architecture.py, part of the suite
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The checks and the whole suite, then the compose file validated and run for real with Podman
# (docs/testing.md)
# the suite in 2 processes (pytest-xdist), a test file per process: its tests wait on peers more than they
# compute, and a file's module fixtures (an Orthanc, a stack) stay in one process. 14.5 min vs 29 serial.
test: debs services install-test lint compose-config
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)
	$(MAKE) compose-test

bench: install-test
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/rebuild.py

bench-ingest: debs services install-test
	$(PY) bench/ingest.py

bench-retrieve: debs services install-test
	$(PY) bench/retrieve.py

bench-push: debs services install-test
	$(PY) bench/push.py

# a 1,000-row cohort against Orthanc vs the same studies as 1,000 retrieve jobs (--rows 50 for a quick look)
bench-cohort: debs services install-test
	$(PY) bench/cohort.py

# WADO-RS retrieve vs our C-GET vs a plain dicomweb-client loop; STOW-RS push vs dicomweb-client store_instances
bench-dicomweb: debs services install-test
	$(PY) bench/dicomweb.py

# The index at millions of instances (issue 19): a database of its own filled by COPY, dropped at the end
# (10 M instances take about 7 min to fill and 8 GB; `bench/scale.py --instances N` for less), then ingest
# (storescu: debs) on it against an empty index, the reconciler on a tree of 1 M empty files, rebuild --missing
bench-scale: debs services install-test
	$(PY) bench/scale.py

# De-identification alone (issue 16): pacsbridge's engine, dicognito, pydicom/deid and dcmanon on the same
# files; each peer in its own venv under .bench-venvs/, made by the script from bench/deid_peers/*.txt
bench-deid: install-test
	$(PY) bench/deidentify.py

# RSS of listener, worker and API over 1 M small instances deleted as they go (issue 19; takes hours:
# --instances 20000 --every 5000 for a quick look)
bench-memory: debs services install-test
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) .bench-venvs build *.egg-info .pytest_cache

# Deployment (docker-compose.yml). compose-config validates it, alone and with the podman override,
# with Debian's docker-compose 1.29 (installed if missing; placeholder values for the three required
# settings). compose-test runs it for real with podman-compose and checks that instances sent with
# DCMTK get indexed (deploy/compose_test.py: needs root; installs podman & co. from Debian if missing).
.PHONY: compose-config compose-test
COMPOSE_CHECK_ENV := POSTGRES_PASSWORD=config-check PACSBRIDGE_API_TOKENS=check:config-check PACSBRIDGE_ALLOWED_PEERS=CHECK

compose-config:
	@command -v docker-compose >/dev/null || { apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null; }
	$(COMPOSE_CHECK_ENV) docker-compose -f docker-compose.yml config -q
	$(COMPOSE_CHECK_ENV) docker-compose -f docker-compose.yml -f compose.podman.yml config -q
	$(PYTHON) deploy/compose_test.py --check-settings

compose-test: install
	$(PY) deploy/compose_test.py
