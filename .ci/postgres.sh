#!/usr/bin/env bash
# Installs PostgreSQL from the OS packages and starts it on localhost for the multi-worker Optuna test.
# Prints the URL the tests use (ALTERNAS_TEST_POSTGRES); prints nothing if the server cannot be started.
set -uo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 || exit 0
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
pg_lsclusters -h | grep -q "^$version main" || pg_createcluster "$version" main >/dev/null 2>&1
pg_ctlcluster "$version" main start >/dev/null 2>&1 || true
for _ in $(seq 1 30); do
  su postgres -c "psql -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='alternas'\"" | grep -q 1 || \
  su postgres -c "psql -qc \"create role alternas login\"" >/dev/null
su postgres -c "psql -qc \"alter role alternas password 's3cr3t-ci'\"" >/dev/null
su postgres -c "psql -qtAc \"select 1 from pg_database where datname='alternas_test'\"" | grep -q 1 || \
  su postgres -c "createdb -O alternas alternas_test" >/dev/null
echo "postgresql://alternas:s3cr3t-ci@127.0.0.1:5432/alternas_test"
