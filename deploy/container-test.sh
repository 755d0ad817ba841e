#!/usr/bin/env bash
# The image, built from this repository's Dockerfile and run for real (`make container-test`).
#
#   bash deploy/container-test.sh [VENV]        VENV defaults to .venv at the repository root
#
# 1. Starts a Docker daemon of its own (own data root, exec root, socket and pidfile; no
#    iptables, no bridge: every container and the build use the host's network).
# 2. Makes sure the local base image exists: a minimal Debian rootfs with python3 and
#    python3-venv (debootstrap, from the mirror the host's apt sources use, carrying the host's
#    CA bundle), `docker import`ed. Built once: the daemon's data root and a tarball under
#    $SEQUIN_CT_CACHE keep it across runs. No registry is contacted, ever.
# 3. Builds the image from ./Dockerfile with `make image`, PYTHON_IMAGE=<that base> (pip
#    reaches PyPI only).
# 4. Checks, with real containers against the Postgres at $CONTAINER_TEST_DATABASE_URL (a fresh
#    database is created and dropped): UID 10001 under --read-only --tmpfs /tmp --cap-drop ALL
#    --security-opt no-new-privileges; `run` (the default command) syncs from the simulator
#    (same image) into Postgres; HEALTHCHECK reports healthy, then unhealthy while the loop is
#    stuck behind a lock on its table, then healthy again; `docker stop` ends it with exit 0
#    within 10 s; the one-shot `backfill` container exits 0 with its summary line.
# 5. On exit, whatever happened: removes its containers, image and build cache, drops the
#    database, stops the daemon. The base image and its tarball stay (that is the cache).
#
# Where no Docker daemon can be started at all (no dockerd, not root, the daemon does not come
# up), it prints a loud SKIP and exits 0. Every other failure exits 1.
#
# Environment:
#   CONTAINER_TEST_DATABASE_URL  admin URL (postgresql://...) of a Postgres reachable from the
#                                host network (default postgresql://root@127.0.0.1:5432/postgres)
#   SEQUIN_CT_DOCKER_ROOT        the daemon's data root (default /var/lib/sequin-worker-docker)
#   SEQUIN_CT_CACHE              base image tarball cache (default /var/cache/sequin-worker)
#   DOCKER                       docker client (default /usr/bin/docker, the docker.io package's
#                                client, which matches its daemon and can use its built-in
#                                BuildKit with DOCKER_BUILDKIT=1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
PY="$VENV/bin/python"
cd "$ROOT"

DSN_ADMIN="${CONTAINER_TEST_DATABASE_URL:-postgresql://root@127.0.0.1:5432/postgres}"
DOCKER_ROOT="${SEQUIN_CT_DOCKER_ROOT:-/var/lib/sequin-worker-docker}"
CACHE="${SEQUIN_CT_CACHE:-/var/cache/sequin-worker}"
DOCKER="${DOCKER:-/usr/bin/docker}"
EXEC_ROOT=/run/sequin-worker-docker
SOCK=/run/sequin-worker-docker.sock
PIDFILE=/run/sequin-worker-dockerd.pid
export DOCKER_HOST="unix://$SOCK"
export DOCKER_BUILDKIT=1

RUN_ID="ct$$"
IMAGE="sequin-worker:container-test-$RUN_ID"
SIM="sequin-ct-sim-$RUN_ID"
WORKER="sequin-ct-worker-$RUN_ID"
BACKFILL="sequin-ct-backfill-$RUN_ID"
DB="sequin_ct_${RUN_ID}"
TOKEN="ct-token-$RANDOM$RANDOM"
# The hardening every container of ours runs with (the same as compose.yaml and k8s).
HARDEN=(--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges)

TMP="$(mktemp -d)"
exec 3>&2
started_dockerd=""
created_db=""
failures=0
t0=$SECONDS

say() { printf '== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
die() { printf 'FAIL  %s\n' "$*"; exit 1; }
skip() {
    printf '\n'
    printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
    printf '!!! SKIP container-test: %s\n' "$*"
    printf '!!! The image was NOT built and NOT tested.\n'
    printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
    exit 0
}
# show CMD...: print the command (so that an operator can repeat it), then run it.
# The token and the database URL (it may carry a password) are shown by name only.
show() {
    local line="$*"
    line="${line//"$TOKEN"/\$TOKEN}"
    [[ -n "${DSN:-}" ]] && line="${line//"$DSN"/\$DATABASE_URL}"
    printf '  $ %s\n' "$line" >&3  # fd 3: the script's stderr, even when the command's is a log
    "$@"
}

sql() { # sql DSN STATEMENT: run one statement, print the first column of the first row
    "$PY" - "$1" "$2" <<'PY'
import sys
import psycopg

with psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=10) as conn:
    cur = conn.execute(sys.argv[2])
    row = cur.fetchone() if cur.description else None
    print("" if row is None else row[0])
PY
}

cleanup() {
    local rc=$?
    set +e
    if [[ -S "$SOCK" ]] && [[ -n "$started_dockerd" ]]; then
        for c in "$BACKFILL" "$WORKER" "$SIM"; do
            "$DOCKER" rm -f "$c" >/dev/null 2>&1
        done
        "$DOCKER" rmi -f "$IMAGE" >/dev/null 2>&1
        "$DOCKER" image prune -f >/dev/null 2>&1
        "$DOCKER" builder prune -af >/dev/null 2>&1
    fi
    if [[ -n "${LOCK_PID:-}" ]]; then
        kill "$LOCK_PID" 2>/dev/null
        wait "$LOCK_PID" 2>/dev/null
    fi
    if [[ -n "$created_db" ]]; then
        sql "$DSN_ADMIN" "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
    fi
    if [[ -n "$started_dockerd" ]]; then
        kill -TERM "$started_dockerd" 2>/dev/null
        for _ in $(seq 1 60); do
            kill -0 "$started_dockerd" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$started_dockerd" 2>/dev/null; then
            echo "dockerd did not stop within 30 s; killing it"
            kill -KILL "$started_dockerd" 2>/dev/null
        fi
        wait "$started_dockerd" 2>/dev/null
    fi
    rm -rf "$TMP"
    echo "== container-test took $((SECONDS - t0)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
say "preconditions: dockerd, root, Postgres"
# Where no Docker daemon can be started at all: skip (loudly) before anything else.
command -v dockerd >/dev/null 2>&1 || skip "no dockerd on this machine (apt-get install docker.io)"
[[ -x "$DOCKER" ]] || skip "no docker client at $DOCKER (apt-get install docker.io)"
[[ $(id -u) -eq 0 ]] || skip "dockerd needs root and this is uid $(id -u)"
# Checked first: without it nothing below can pass. (The password, if any, is not printed.)
"$PY" - "$DSN_ADMIN" <<'PY' || die "no Postgres answers at CONTAINER_TEST_DATABASE_URL (default 127.0.0.1:5432)"
import sys

import psycopg

try:
    with psycopg.connect(sys.argv[1], connect_timeout=5) as conn:
        print(f"PASS  PostgreSQL {conn.info.server_version // 10000} answers")
except psycopg.Error as exc:
    print(f"      {type(exc).__name__}: {str(exc).splitlines()[0]}")
    sys.exit(1)
PY

# ---------------------------------------------------------------------------------------------
say "Docker daemon"
if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    die "a dockerd from an earlier run is still alive (pid $(cat "$PIDFILE"), $PIDFILE); stop it first"
fi
mkdir -p "$DOCKER_ROOT" "$EXEC_ROOT"
printf '  $ dockerd --data-root %s --exec-root %s --pidfile %s --host unix://%s --iptables=false --ip-masq=false --bridge=none\n' \
    "$DOCKER_ROOT" "$EXEC_ROOT" "$PIDFILE" "$SOCK"
dockerd --data-root "$DOCKER_ROOT" --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" \
    --host "unix://$SOCK" --iptables=false --ip-masq=false --bridge=none \
    >"$TMP/dockerd.log" 2>&1 &
started_dockerd=$!
for _ in $(seq 1 120); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$started_dockerd" 2>/dev/null || break
    sleep 0.5
done
if ! "$DOCKER" version >/dev/null 2>&1; then
    tail -n 20 "$TMP/dockerd.log" | sed 's/^/      /'
    skip "dockerd did not come up within 60 s (log above)"
fi
pass "dockerd $("$DOCKER" version --format '{{.Server.Version}}') up (pid $started_dockerd, data root $DOCKER_ROOT)"

# ---------------------------------------------------------------------------------------------
say "local base image (debootstrap; cached)"
# Every input of the base goes into its tag: the recipe below and the host's CA bundle.
CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[[ -f "$CA_BUNDLE" ]] || die "no CA bundle at $CA_BUNDLE"
BASE_PACKAGES="python3,python3-venv"
RECIPE="v1 minbase $CODENAME $BASE_PACKAGES"
BASE_KEY="$( (echo "$RECIPE"; cat "$CA_BUNDLE") | sha256sum | cut -c1-12)"
BASE="sequin-worker-base:$CODENAME-$BASE_KEY"
BASE_TAR="$CACHE/base-$CODENAME-$BASE_KEY.tar"

if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    pass "$BASE already in the daemon's data root"
else
    if [[ ! -s "$BASE_TAR" ]]; then
        command -v debootstrap >/dev/null 2>&1 || die "debootstrap missing (apt-get install debootstrap)"
        # The host's Debian mirror, as its apt sources name it (apt-get update has run).
        mirror() {
            apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 2>/dev/null \
                | awk -v s="$CODENAME" '$2 == s && $3 == "main" {print $1; exit}'
        }
        MIRROR="$(mirror)"
        if [[ -z "$MIRROR" ]]; then  # no package lists yet
            apt-get update -qq >/dev/null 2>&1 || true
            MIRROR="$(mirror)"
        fi
        [[ -n "$MIRROR" ]] || die "no '$CODENAME main' source in the host's apt sources"
        mkdir -p "$CACHE"
        rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
        ts=$SECONDS
        echo "  $ debootstrap --variant=minbase --include=$BASE_PACKAGES $CODENAME ROOTFS $MIRROR"
        if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$CODENAME" "$rootfs" \
            "$MIRROR" >"$TMP/debootstrap.log" 2>&1; then
            tail -n 20 "$TMP/debootstrap.log" | sed 's/^/      /'
            rm -rf "$rootfs"
            die "debootstrap failed (log above)"
        fi
        # pip inside the build trusts what the host trusts (Debian's pip reads this bundle).
        cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
        tar -C "$rootfs" --numeric-owner -cf "$BASE_TAR.partial" .
        mv "$BASE_TAR.partial" "$BASE_TAR"
        rm -rf "$rootfs"
        pass "debootstrap $CODENAME from $MIRROR ($((SECONDS - ts)) s) -> $BASE_TAR"
    fi
    # An imported image has no environment: give it the usual PATH (the Dockerfile appends to
    # it) and a UTF-8 locale.
    show "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' "$BASE_TAR" "$BASE" >/dev/null
    pass "imported $BASE"
fi
# Bases of earlier recipes or CA bundles are no longer needed.
for old in $("$DOCKER" images --format '{{.Repository}}:{{.Tag}}' sequin-worker-base); do
    [[ "$old" == "$BASE" ]] || "$DOCKER" rmi "$old" >/dev/null 2>&1 || true
done
find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "$(basename "$BASE_TAR")" -delete 2>/dev/null || true

# ---------------------------------------------------------------------------------------------
say "build ./Dockerfile"
ts=$SECONDS
# Through `make image`, so that the target users run is the one tested. It runs
#   DOCKER_BUILDKIT=1 $DOCKER build --network host --progress plain -t $IMAGE \
#     --build-arg VERSION=... --build-arg REVISION=$(git rev-parse HEAD) \
#     --build-arg PYTHON_IMAGE=$BASE .
if ! show make --no-print-directory image DOCKER="$DOCKER" IMAGE="$IMAGE" \
    PYTHON_IMAGE="$BASE" DOCKER_BUILD_FLAGS="--network host --progress plain" \
    >"$TMP/build.log" 2>&1; then
    tail -n 40 "$TMP/build.log" | sed 's/^/      /'
    die "docker build (log above)"
fi
pass "built $IMAGE in $((SECONDS - ts)) s ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
[[ "$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")" == "10001:10001" ]] \
    && pass "image USER 10001:10001" || fail "image USER is not 10001:10001"
if git rev-parse HEAD >/dev/null 2>&1; then
    label="$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$IMAGE")"
    [[ "$label" == "$(git rev-parse HEAD)" ]] && pass "image label revision $label" \
        || fail "image label revision '$label' is not HEAD"
fi

# ---------------------------------------------------------------------------------------------
say "database"
sql "$DSN_ADMIN" "CREATE DATABASE $DB" >/dev/null
created_db=1
DSN="$("$PY" -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1])._replace(path="/" + sys.argv[2]).geturl())' "$DSN_ADMIN" "$DB")"
pass "fresh database $DB"

# Two free ports on the host network (shared with anything else running here).
read -r SIM_PORT OPS_PORT < <("$PY" - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
PY
)

# ---------------------------------------------------------------------------------------------
say "simulator and worker containers"
show "$DOCKER" run -d --name "$SIM" --network host "${HARDEN[@]}" --no-healthcheck \
    -e SEQUIN_API_TOKEN="$TOKEN" "$IMAGE" \
    simulate --host 127.0.0.1 --port "$SIM_PORT" --records 3000 --keys 600 --append-rate 20 >/dev/null
for _ in $(seq 1 60); do
    "$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
        "$SIM_PORT" 2>/dev/null && break
    sleep 0.5
done

# A short heartbeat timeout and health interval, so that "stuck" shows within seconds.
show "$DOCKER" run -d --name "$WORKER" --network host "${HARDEN[@]}" \
    -e SEQUIN_API_TOKEN="$TOKEN" -e SEQUIN_BASE_URL="http://127.0.0.1:$SIM_PORT" \
    -e DATABASE_URL="$DSN" -e SEQUIN_HTTP_PORT="$OPS_PORT" -e SEQUIN_LOG_FORMAT=json \
    -e SEQUIN_HEARTBEAT_TIMEOUT=5 -e SEQUIN_REQUEST_TIMEOUT=4 -e SEQUIN_READ_TIMEOUT=3 -e SEQUIN_CONNECT_TIMEOUT=2 -e SEQUIN_DB_TIMEOUT=2 \
    --health-interval 1s --health-timeout 4s --health-retries 2 --health-start-period 60s \
    "$IMAGE" >/dev/null

health() { "$DOCKER" inspect -f '{{.State.Health.Status}}' "$WORKER" 2>/dev/null || echo gone; }
# wait_health WANT SECONDS: poll Docker's health status.
wait_health() {
    local want="$1" limit="$2" start=$SECONDS
    while ((SECONDS - start < limit)); do
        [[ "$(health)" == "$want" ]] && return 0
        sleep 0.5
    done
    return 1
}

if wait_health healthy 60; then
    pass "HEALTHCHECK: healthy"
else
    "$DOCKER" logs --tail 20 "$WORKER" 2>&1 | sed 's/^/      /'
    die "HEALTHCHECK: not healthy within 60 s (status $(health))"
fi

uid="$("$DOCKER" exec "$WORKER" python3 -c 'import os; print(os.getuid(), os.getgid())')"
[[ "$uid" == "10001 10001" ]] && pass "runs as uid/gid 10001" || fail "runs as uid/gid '$uid'"
if "$DOCKER" exec "$WORKER" sh -c 'touch /opt/venv/x' 2>/dev/null; then
    fail "root filesystem is writable"
else
    pass "root filesystem read-only"
fi
"$DOCKER" exec "$WORKER" sh -c 'touch /tmp/x && rm /tmp/x' && pass "/tmp writable (tmpfs)" \
    || fail "/tmp not writable"
caps="$("$DOCKER" exec "$WORKER" awk '/^CapEff/ {print $2}' /proc/1/status)"
[[ "$caps" == "0000000000000000" ]] && pass "no effective capabilities" || fail "CapEff $caps"
nnp="$("$DOCKER" exec "$WORKER" awk '/^NoNewPrivs/ {print $2}' /proc/1/status)"
[[ "$nnp" == "1" ]] && pass "no_new_privs set" || fail "NoNewPrivs $nnp"

# `run` syncs the simulator's 600 keys into Postgres (appends keep coming at 20/s).
rows=0
for _ in $(seq 1 120); do
    rows="$(sql "$DSN" "SELECT count(*) FROM sequin.records" 2>/dev/null || echo 0)"
    ((rows >= 600)) && break
    sleep 0.5
done
((rows >= 600)) && pass "run: $rows rows in $DB.sequin.records" \
    || fail "run: only $rows rows after 60 s (want >= 600)"
metrics="$("$PY" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://127.0.0.1:$OPS_PORT/metrics")"
grep -Eq '^sequin_worker_leader 1(\.0)?$' <<<"$metrics" && pass "/metrics: leader 1" \
    || fail "/metrics: sequin_worker_leader is not 1"

# ---------------------------------------------------------------------------------------------
say "stuck loop -> unhealthy -> healthy"
# A maintenance transaction holds an exclusive lock on the worker's table: the next batch's
# apply waits on it and the loop's heartbeat stops. (The worker sets no lock_timeout, so it
# waits as long as the lock is held.) Released after the check, or after 90 s at most.
"$PY" - "$DSN" "$TMP/locked" "$TMP/release" <<'PY' &
import os, sys, time
import psycopg

dsn, locked, release = sys.argv[1:]
with psycopg.connect(dsn) as conn:
    conn.execute("LOCK TABLE sequin.records IN ACCESS EXCLUSIVE MODE")
    open(locked, "w").close()
    deadline = time.monotonic() + 90
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.2)
    conn.rollback()
PY
LOCK_PID=$!
for _ in $(seq 1 40); do [[ -e "$TMP/locked" ]] && break; sleep 0.25; done
[[ -e "$TMP/locked" ]] || die "could not take the lock on sequin.records"
echo "  (a session holds LOCK TABLE sequin.records IN ACCESS EXCLUSIVE MODE)"
if wait_health unhealthy 40; then
    pass "HEALTHCHECK: unhealthy while the loop is stuck"
    "$PY" - "http://127.0.0.1:$OPS_PORT/healthz" <<'PY' | sed 's/^/      /'
import sys, urllib.error, urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=5)
    print("/healthz: 200")
except urllib.error.HTTPError as e:
    print(f"/healthz: {e.code} {e.read().decode()}")
PY
else
    fail "HEALTHCHECK: still $(health) 40 s after the loop got stuck"
fi
touch "$TMP/release"
wait "$LOCK_PID" || true
LOCK_PID=""
if wait_health healthy 40; then
    pass "HEALTHCHECK: healthy again once the lock is released"
else
    fail "HEALTHCHECK: $(health) 40 s after the lock was released"
fi

# ---------------------------------------------------------------------------------------------
say "docker stop"
ts=$EPOCHREALTIME
show "$DOCKER" stop -t 30 "$WORKER" >/dev/null
took="$("$PY" -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$ts" "$EPOCHREALTIME")"
code="$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$WORKER")"
[[ "$code" == "0" ]] && pass "exit code 0 after SIGTERM" || fail "exit code $code after SIGTERM"
"$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) < 10 else 1)' "$took" \
    && pass "stopped in $took s (< 10 s)" || fail "stop took $took s (>= 10 s)"
"$DOCKER" logs "$WORKER" 2>&1 | grep -q '"event": *"worker_stopped"' \
    && pass "its log has worker_stopped" || fail "no worker_stopped event in its log"

# ---------------------------------------------------------------------------------------------
say "one-shot backfill"
set +e
show "$DOCKER" run --name "$BACKFILL" --network host "${HARDEN[@]}" --no-healthcheck \
    -e SEQUIN_API_TOKEN="$TOKEN" -e SEQUIN_BASE_URL="http://127.0.0.1:$SIM_PORT" \
    -e DATABASE_URL="$DSN" -e SEQUIN_CONSUMER=container-test-backfill -e SEQUIN_LOG_FORMAT=json \
    "$IMAGE" backfill >"$TMP/backfill.out" 2>"$TMP/backfill.err"
code=$?
set -e
[[ $code -eq 0 ]] && pass "backfill exit 0" || fail "backfill exit $code"
if grep -E '^backfill complete: [0-9]+ records in ' "$TMP/backfill.out"; then
    pass "backfill summary line on stdout"
else
    sed 's/^/      /' "$TMP/backfill.out"
    tail -n 10 "$TMP/backfill.err" | sed 's/^/      /'
    fail "no 'backfill complete: ...' line on stdout"
fi

# ---------------------------------------------------------------------------------------------
if ((failures)); then
    say "container-test: $failures check(s) failed"
    for c in "$WORKER" "$SIM"; do
        echo "-- docker logs $c (last 20 lines)"
        "$DOCKER" logs --tail 20 "$c" 2>&1 | sed 's/^/      /'
    done
    exit 1
fi
say "container-test: all checks passed"
