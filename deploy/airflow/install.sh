#!/usr/bin/env bash
# Creates .venv-airflow: Airflow and its Spark provider, apart from .venv, whose pins (pyarrow 14, numpy < 2,
# pandas 2.2) Airflow's own pins clash with. Only tests/test_deploy.py uses it, to load the DAG in a DagBag.
# Installs with Airflow's official constraints file when it can be fetched, else without (pip resolves).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${AIRFLOW_VENV:-.venv-airflow}
PYTHON=${PYTHON:-python3.11}
AIRFLOW_VERSION=2.10.5
[ -x "$VENV/bin/python" ] || { echo "==> creating $VENV"; "$PYTHON" -m venv "$VENV"; }
py="$VENV/bin/python"
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
constraints_url="https://raw.githubusercontent.com/apache/airflow/constraints-$AIRFLOW_VERSION/constraints-$pyver.txt"
constraints=()
if "$py" -c "import sys, urllib.request; open(sys.argv[2], 'wb').write(urllib.request.urlopen(sys.argv[1], timeout=10).read())" \
    "$constraints_url" "$VENV/constraints.txt" 2>/dev/null; then
  constraints=(--constraint "$VENV/constraints.txt")
else
  echo "==> Airflow's constraints file is out of reach; installing without it"
fi
echo "==> installing apache-airflow $AIRFLOW_VERSION and the Spark provider into $VENV"
"$py" -m pip --disable-pip-version-check install "apache-airflow==$AIRFLOW_VERSION" \
    apache-airflow-providers-apache-spark "${constraints[@]}"
touch "$VENV/.airflow-installed"  # the Makefile's stamp
