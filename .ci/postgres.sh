#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1 for the multi-worker `kk tune` test.
# Prints the SQLAlchemy URL on success; prints nothing (and the test skips) if it cannot.
set -u
PORT=${KK_PG_PORT:-54329}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 || exit 0
fi
BIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")
id postgres >/dev/null 2>&1 || useradd -r -m postgres >/dev/null 2>&1 || exit 0
DIR=$(mktemp -d /tmp/kk-pg.XXXXXX)
chown postgres "$DIR"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
as_pg "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null 2>&1 || exit 0
as_pg "$BIN/pg_ctl" -D "$DIR/data" -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1" -l "$DIR/log" -w start >/dev/null 2>&1 || exit 0
as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres kk_tune >/dev/null 2>&1 || exit 0
echo "$DIR" > /tmp/kk-pg.last
echo "postgresql://postgres@127.0.0.1:$PORT/kk_tune"
