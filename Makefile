# Two commands do everything on a fresh machine: `make run` and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.pipeline-installed
AIRFLOW_STAMP := .venv-airflow/.airflow-installed
export PYSPARK_PYTHON := $(abspath $(VENV))/bin/python

.PHONY: install airflow-venv postgres run test test-cluster bench clean

install: $(STAMP)

$(STAMP): pyproject.toml deploy/install.sh deploy/cxx17 deploy/patch_horovod.py
	VENV=$(VENV) ./deploy/install.sh

# Airflow in a venv of its own (its pins clash with .venv's), for tests/test_deploy.py's DagBag check.
airflow-venv: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): deploy/airflow/install.sh
	./deploy/airflow/install.sh

# make run DB_URL=postgresql://dmf@127.0.0.1:5432/dmf publishes after the gate (password: PGPASSWORD or ~/.pgpass).
DB_URL ?=
run: install
	$(VENV)/bin/dmf run $(if $(DB_URL),--set publish.db_url=$(DB_URL))

# PostgreSQL's server binaries and JDBC jar, for tests/test_publish.py (a throwaway server on 127.0.0.1).
postgres:
	./deploy/install_postgres.sh

test: install airflow-venv postgres
	$(VENV)/bin/python -m pytest tests

# tests/test_cluster.py alone (make test runs it too): a three-host Spark standalone cluster in network
# namespaces, the environment packed by deploy/pack.sh. Needs root, iproute2 and java.
test-cluster: install
	$(VENV)/bin/python -m pytest tests/test_cluster.py

clean:
	rm -rf work .pytest_cache
