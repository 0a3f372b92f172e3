#!/usr/bin/env bash
# What tests/test_publish.py needs beyond the venv, installed when missing: a PostgreSQL server's binaries
# (initdb, pg_ctl; the tests start a throwaway server of their own on a free 127.0.0.1 port) and the
# PostgreSQL JDBC jar for Spark's writer. Debian/Ubuntu with apt; elsewhere install them by hand (any
# PostgreSQL >= 12, any org.postgresql 42.x jar, its path in DMF_JDBC_JAR).
set -euo pipefail
have_server() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }
have_jar() {
  [ -n "${DMF_JDBC_JAR:-}" ] || [ -f /usr/share/java/postgresql.jar ] ||
    ls ~/.m2/repository/org/postgresql/postgresql/*/postgresql-*.jar >/dev/null 2>&1
}
missing=()
have_server || missing+=(postgresql)
have_jar || missing+=(libpostgresql-jdbc-java)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_postgres.sh: ${missing[*]} missing and no apt-get here: install them by hand (see the script)" >&2
  exit 1
fi
sudo=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
echo "==> installing ${missing[*]} (apt)"
$sudo apt-get update -qq
# The package may start a cluster of its own on 5432; the tests do not use it (systemctl disable --now postgresql).
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
