# Two commands do everything on a fresh machine: `make run` and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.pipeline-installed
export PYSPARK_PYTHON := $(abspath $(VENV))/bin/python

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml deploy/install.sh deploy/cxx17 deploy/patch_horovod.py
	VENV=$(VENV) ./deploy/install.sh

run: install
	$(VENV)/bin/dmf run --config conf/local.yaml

test: install
	$(VENV)/bin/python -m pytest tests

clean:
	rm -rf work .pytest_cache
