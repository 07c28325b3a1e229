#!/usr/bin/env bash
# opendps conformance suite: drives the service (management) API of a freshly
# started opendps server with the official, unmodified Azure Python SDK
# azure-iot-deviceprovisioning==1.0.0b1.  See conformance/README.md.
#
#   conformance/run.sh                 build with cargo, then test target/debug/opendps
#   OPENDPS_BIN=/path/opendps conformance/run.sh
#
# The last line is `N passed, N failed`; the exit status is non-zero when
# anything failed.
set -euo pipefail

CONF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$CONF/.." && pwd)"
VENV="$ROOT/.venv-conformance"
PY="$VENV/bin/python"
SCENARIO_TIMEOUT=60
START_TIMEOUT=30

# --- Python SDKs --------------------------------------------------------------
if [ ! -x "$PY" ] || ! "$PY" -c 'import azure.iot.deviceprovisioning' >/dev/null 2>&1; then
    echo "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        azure-iot-device==2.14.0 azure-iot-hub==2.7.0 azure-iot-deviceprovisioning==1.0.0b1 six==1.17.0
fi

# --- Server binary ------------------------------------------------------------
if [ -n "${OPENDPS_BIN:-}" ]; then
    BIN="$OPENDPS_BIN"
else
    (cd "$ROOT" && cargo build -p opendps)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/opendps"
    case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
fi
if [ ! -x "$BIN" ]; then
    echo "opendps binary not found or not executable: $BIN" >&2
    exit 1
fi

# --- The tutorial's allocation webhook (examples/contoso-allocator) ---------------
if [ -n "${CONTOSO_ALLOCATOR_BIN:-}" ]; then
    ALLOCATOR="$CONTOSO_ALLOCATOR_BIN"
else
    (cd "$ROOT" && cargo build --quiet -p contoso-allocator)
    ALLOCATOR="${CARGO_TARGET_DIR:-$ROOT/target}/debug/contoso-allocator"
    case "$ALLOCATOR" in /*) ;; *) ALLOCATOR="$ROOT/$ALLOCATOR" ;; esac
fi

# --- Start the server -----------------------------------------------------------
DIR="$(mktemp -d)"
PID=""
APID=""
cleanup() {
    for p in "$PID" "$APID"; do
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    rm -rf "$DIR"
}
trap cleanup EXIT

print_server_log() {
    echo "---- server log ($DIR/serve.log, last 100 lines) ----"
    tail -n 100 "$DIR/serve.log" 2>/dev/null || true
    echo "---- end of server log ----"
}

# (OPENDPS_BIN is ours, not a server setting: keep it out of the server's environment.)
env -u OPENDPS_BIN "$BIN" serve --data-dir "$DIR" --listen 127.0.0.1:0 \
    --hub contoso-toasters-hub-1.azure-devices.net --hub contoso-heatpumps-hub-1.azure-devices.net \
    >"$DIR/serve.log" 2>&1 &
PID=$!

INFO=""
deadline=$((SECONDS + START_TIMEOUT))
while :; do
    if ! kill -0 "$PID" 2>/dev/null; then
        rc=0
        wait "$PID" 2>/dev/null || rc=$?
        PID=""
        echo "opendps serve exited (status $rc) before it was ready" >&2
        print_server_log >&2
        exit 1
    fi
    if out="$(timeout 10 "$BIN" info --data-dir "$DIR" --json 2>/dev/null)" &&
        printf '%s' "$out" | "$PY" -c '
import json, sys
d = json.load(sys.stdin)
sys.exit(0 if d.get("running") is not None else 1)' 2>/dev/null; then
        INFO="$out"
        break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "opendps did not report running within ${START_TIMEOUT}s; last info output:" >&2
        echo "${out:-<none>}" >&2
        print_server_log >&2
        exit 1
    fi
    sleep 0.2
done

# --- Start the allocator ---------------------------------------------------------
"$ALLOCATOR" --listen 127.0.0.1:0 >"$DIR/allocator.log" 2>&1 &
APID=$!
ALLOCATOR_URL=""
for _ in $(seq 1 100); do
    ALLOCATOR_URL="$(head -n 1 "$DIR/allocator.log" 2>/dev/null | grep '^http://' || true)"
    [ -n "$ALLOCATOR_URL" ] && break
    sleep 0.1
done
if [ -z "$ALLOCATOR_URL" ]; then
    echo "the Contoso allocator did not start:" >&2
    cat "$DIR/allocator.log" >&2
    exit 1
fi

# --- Scenarios -------------------------------------------------------------------
cd "$CONF"
mapfile -t NAMES < <("$PY" "$CONF/scenarios.py" --list)
if [ "${#NAMES[@]}" -eq 0 ]; then
    echo "no scenarios found" >&2
    exit 1
fi

passed=0
failed=0
for name in "${NAMES[@]}"; do
    rc=0
    output="$(OPENDPS_INFO="$INFO" CONFORMANCE_OPENDPS_BIN="$BIN" CONFORMANCE_ALLOCATOR_URL="$ALLOCATOR_URL" timeout "$SCENARIO_TIMEOUT" "$PY" "$CONF/scenarios.py" "$name" 2>&1)" || rc=$?
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "PASS $name"
    else
        failed=$((failed + 1))
        if [ "$rc" -eq 124 ]; then
            reason="timed out after ${SCENARIO_TIMEOUT}s"
        else
            reason="$(printf '%s\n' "$output" | sed -n 's/^REASON: //p' | tail -n 1)"
            [ -n "$reason" ] || reason="exit status $rc"
        fi
        echo "FAIL $name: $reason"
        printf '%s\n' "$output" | grep -v '^REASON: ' | sed 's/^/    | /'
    fi
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "opendps serve is no longer running (after $name)"
        break
    fi
done

# Anything not run because the server died counts as failed.
total="${#NAMES[@]}"
notrun=$((total - passed - failed))
failed=$((failed + notrun))

if [ "$failed" -gt 0 ]; then
    print_server_log
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
