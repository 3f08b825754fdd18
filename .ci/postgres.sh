#!/usr/bin/env bash
# Start a throwaway local PostgreSQL cluster for the gallery tests (tests/test_gallery_postgres.py).
# Source it: on success it exports FACEMOE_TEST_POSTGRES_URL and registers `facemoe_pg_stop`;
# on any failure it prints one line and returns 0 with the variable unset (the tests then skip).
# Listens on 127.0.0.1 only, trust auth for the test role, data in a temp dir, run unprivileged
# (as `postgres` when this script runs as root: initdb refuses root).

facemoe_pg_start() {
    local bindir pgver port dir runas=()
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "ci: installing postgresql (Debian) for the PostgreSQL gallery tests"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends postgresql; } >/dev/null 2>&1 \
                || { echo "ci: postgresql install failed; PostgreSQL gallery tests will skip"; return 0; }
        else
            echo "ci: no PostgreSQL server (and cannot apt-get install); PostgreSQL gallery tests will skip"
            return 0
        fi
    fi
    pgver="$(ls /usr/lib/postgresql | sort -V | tail -1)"
    bindir="/usr/lib/postgresql/$pgver/bin"
    dir="$(mktemp -d /tmp/facemoe-pg.XXXXXX)"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || { echo "ci: no postgres user; PostgreSQL gallery tests will skip"; return 0; }
        chown postgres "$dir"
        runas=(runuser -u postgres --)
    fi
    port="${FACEMOE_TEST_POSTGRES_PORT:-54329}"
    if ! "${runas[@]}" "$bindir/initdb" -D "$dir/data" -U facemoe --auth=trust -E UTF8 \
            >"$dir/initdb.log" 2>&1; then
        echo "ci: initdb failed (see $dir/initdb.log); PostgreSQL gallery tests will skip"
        return 0
    fi
    if ! "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null; then
        echo "ci: PostgreSQL did not start (see $dir/server.log); PostgreSQL gallery tests will skip"
        return 0
    fi
    if ! "${runas[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U facemoe facemoe_test; then
        echo "ci: createdb failed; PostgreSQL gallery tests will skip"
        "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
        return 0
    fi
    export FACEMOE_TEST_POSTGRES_URL="postgresql+psycopg://facemoe@127.0.0.1:$port/facemoe_test"
    FACEMOE_PG_STOP=("${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -m fast stop)
    FACEMOE_PG_DIR="$dir"
    echo "ci: PostgreSQL $pgver running for the tests at $FACEMOE_TEST_POSTGRES_URL"
}

facemoe_pg_stop() {
    if [ -n "${FACEMOE_PG_DIR:-}" ]; then
        "${FACEMOE_PG_STOP[@]}" >/dev/null 2>&1 || true
        rm -rf "$FACEMOE_PG_DIR"
        FACEMOE_PG_DIR=""
    fi
}

facemoe_pg_start || echo "ci: PostgreSQL setup failed; PostgreSQL gallery tests will skip"
