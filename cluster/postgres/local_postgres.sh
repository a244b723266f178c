#!/usr/bin/env bash
# A PostgreSQL on loopback for tests and benchmarks, from Debian's `postgresql` package.
#
#   cluster/postgres/local_postgres.sh start|stop|status|env
#
# start: installs the package when it is missing, starts Debian's cluster (the first one
# pg_lsclusters lists; it listens on localhost only, as Debian configures it) and creates a role
# that may create databases, with a password, and a database of its own. env: prints
# `export SSLGRID_TEST_POSTGRES=postgresql://ROLE:PASSWORD@127.0.0.1:PORT/DB`, which the tests marked
# postgres and bench/tracking_load.py read; each test creates and drops its own database beside DB.
# stop: stops the cluster only if `start` started it (a marker under $SSLGRID_PG_DIR), so a
# PostgreSQL that was already running is left running. Must run as root (it acts as `postgres`).
# Role, password and database: $SSLGRID_PG_USER, $SSLGRID_PG_PASSWORD, $SSLGRID_PG_DB (default
# sslgrid, sslgrid, sslgrid). A test-only password on loopback: never open this cluster to a network.
set -euo pipefail

DIR=${SSLGRID_PG_DIR:-/tmp/sslgrid-postgres}
USER_=${SSLGRID_PG_USER:-sslgrid}
PASSWORD=${SSLGRID_PG_PASSWORD:-sslgrid}
DB=${SSLGRID_PG_DB:-sslgrid}

install_packages() {
  if ! command -v pg_lsclusters >/dev/null || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
    echo "installing postgresql from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
}

# "VERSION NAME PORT STATUS" of the first cluster
cluster() { pg_lsclusters -h | awk 'NR==1 {print $1, $2, $3, $4}'; }

as_postgres() { runuser -u postgres -- "$@"; }

start() {
  install_packages
  mkdir -p "$DIR"
  read -r ver name port state < <(cluster)
  if [ "$state" != online ]; then
    pg_ctlcluster "$ver" "$name" start
    touch "$DIR/started"
  fi
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p "$port" && break
    sleep 0.5
  done
  if ! pg_isready -q -h 127.0.0.1 -p "$port"; then
    echo "PostgreSQL $ver/$name did not come up on 127.0.0.1:$port; log: /var/log/postgresql/postgresql-$ver-$name.log" >&2
    tail -n 20 "/var/log/postgresql/postgresql-$ver-$name.log" >&2 || true
    return 1
  fi
  # cd: runuser keeps the working directory, which postgres may not be allowed to read
  (cd / && as_postgres psql -q -p "$port" -v ON_ERROR_STOP=1 -v user="$USER_" -v pw="$PASSWORD" -v db="$DB" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB PASSWORD %L', :'user', :'pw')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'user', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
  )
  echo "PostgreSQL $ver up on 127.0.0.1:$port: role $USER_, database $DB" >&2
}

stop() {
  read -r ver name _ state < <(cluster)
  if [ -f "$DIR/started" ] && [ "$state" = online ]; then
    pg_ctlcluster "$ver" "$name" stop
    rm -f "$DIR/started"
    echo "PostgreSQL $ver/$name stopped" >&2
  else
    echo "PostgreSQL $ver/$name left as it was ($state): this script did not start it" >&2
  fi
}

status() {
  pg_lsclusters
}

env_() {
  read -r _ _ port _ < <(cluster)
  echo "export SSLGRID_TEST_POSTGRES=postgresql://$USER_:$PASSWORD@127.0.0.1:$port/$DB"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_ ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
