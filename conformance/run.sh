#!/usr/bin/env bash
# opendps conformance suite: drives the service (management) API of a freshly
# started opendps server with the official, unmodified Azure Python SDK
# azure-iot-deviceprovisioning==1.0.0b1.  See conformance/README.md.
#
#   conformance/run.sh                 build with cargo, then test target/debug/opendps
#   OPENDPS_BIN=/path/opendps conformance/run.sh
#   CONFORMANCE_ADDRESS=127.0.0.1 conformance/run.sh   listen there, not on 127.77.X.Y
#
# The last line is `N passed, N failed` (`, N skipped` when a scenario could
# not run here, with the reason on its SKIP line); the exit status is non-zero
# when anything failed.
set -euo pipefail

CONF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$CONF/.." && pwd)"
VENV="$ROOT/.venv-conformance"
PY="$VENV/bin/python"
SCENARIO_TIMEOUT=60
START_TIMEOUT=30

# --- Python SDKs, and the Node.js SDK for AMQP ---------------------------------
"$CONF/venv.sh"
"$CONF/node.sh"

# --- Server binary ------------------------------------------------------------
# A relative OPENDPS_BIN (or CONTOSO_ALLOCATOR_BIN) is relative to where run.sh was started; the
# scenarios run in conformance/, so it is made absolute here.
if [ -n "${OPENDPS_BIN:-}" ]; then
    BIN="$OPENDPS_BIN"
    case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
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
    case "$ALLOCATOR" in /*) ;; *) ALLOCATOR="$PWD/$ALLOCATOR" ;; esac
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

# The suite's server listens on a loopback address of its own, 127.77.X.Y (Linux routes all of
# 127.0.0.0/8 to lo), never on 127.0.0.1: its MQTT listener must be on port 8883, the only port the
# Python device SDK dials, and a default `opendps serve` holds 127.0.0.1:8883. The address comes
# from this script's PID, so two runs get different ones; when it is taken anyway, the next
# candidate is tried. CONFORMANCE_ADDRESS=IP pins it (e.g. where only 127.0.0.1 is on loopback).
# Clients reach the server by the name $SUITE_HOST (its public host, in the connection strings and
# the certificate): common.py resolves that name and the hubs' names to the address, inside the
# scenario processes only. `.test` is reserved (RFC 2606), so the name never resolves elsewhere.
SUITE_HOST="dps.opendps-conformance.test"
DATA="$DIR/data"
ADDR=""

candidates() {
    if [ -n "${CONFORMANCE_ADDRESS:-}" ]; then
        echo "$CONFORMANCE_ADDRESS"
        return
    fi
    local i n
    for i in $(seq 0 9); do
        n=$((($$ + i * 257) % (254 * 254)))
        echo "127.77.$((n / 254 + 1)).$((n % 254 + 1))"
    done
}

# MQTT over WebSockets: the Python device SDK dials port 443, so the HTTPS listener takes 443 on
# the suite's own address when this user may bind it (root, or a low
# net.ipv4.ip_unprivileged_port_start); otherwise a free port, and the WebSocket scenarios are
# skipped with a line that says so.
HTTPS_PORT=0
if [ "$(id -u)" -eq 0 ] || [ "$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024)" -le 443 ]; then
    HTTPS_PORT=443
fi

# Starts the server on $1 and waits until it reports running (status 0); status 2 when $1:8883 or
# the HTTPS port there is taken; any other failure ends the run.
start_server() {
    local addr="$1" rc out
    rm -rf "$DATA"
    # (OPENDPS_BIN is ours, not a server setting: keep it out of the server's environment.)
    env -u OPENDPS_BIN "$BIN" serve --data-dir "$DATA" --listen "$addr:$HTTPS_PORT" --mqtt-listen "$addr:8883" --amqp-listen "$addr:5671" \
        --public-host "$SUITE_HOST" --tls-name "$SUITE_HOST" --tls-name "$addr" \
        --hub contoso-toasters-hub-1.azure-devices.net --hub contoso-heatpumps-hub-1.azure-devices.net \
        >"$DIR/serve.log" 2>&1 &
    PID=$!
    local deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if ! kill -0 "$PID" 2>/dev/null; then
            rc=0
            wait "$PID" 2>/dev/null || rc=$?
            PID=""
            if grep -q "Address already in use" "$DIR/serve.log"; then
                echo "$addr is taken: $(grep -m 1 'while binding' "$DIR/serve.log" || true)"
                return 2
            fi
            echo "opendps serve exited (status $rc) before it was ready" >&2
            if grep -q "assign requested address" "$DIR/serve.log"; then
                echo "$addr is not a local address here; set CONFORMANCE_ADDRESS to one that is" \
                    "(e.g. 127.0.0.1 when no other server holds port 8883 there)" >&2
            fi
            print_server_log >&2
            exit 1
        fi
        if out="$(timeout 10 "$BIN" info --data-dir "$DATA" --json 2>/dev/null)" &&
            printf '%s' "$out" | "$PY" -c '
import json, sys
d = json.load(sys.stdin)
sys.exit(0 if d.get("running") is not None else 1)' 2>/dev/null; then
            INFO="$out"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "opendps did not report running within ${START_TIMEOUT}s; last info output:" >&2
            echo "${out:-<none>}" >&2
            print_server_log >&2
            exit 1
        fi
        sleep 0.2
    done
}

INFO=""
for candidate in $(candidates); do
    rc=0
    start_server "$candidate" || rc=$?
    if [ "$rc" -eq 0 ]; then
        ADDR="$candidate"
        break
    fi
done
if [ -z "$ADDR" ]; then
    echo "no free address for the server among: $(candidates | tr '\n' ' ')" >&2
    exit 1
fi
echo "opendps serve on $ADDR (HTTPS $(printf '%s' "$INFO" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["listen"]["https"].rsplit(":", 1)[1])'), MQTT 8883) as $SUITE_HOST"

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
skipped=0
for name in "${NAMES[@]}"; do
    rc=0
    output="$(OPENDPS_INFO="$INFO" CONFORMANCE_OPENDPS_BIN="$BIN" CONFORMANCE_ALLOCATOR_URL="$ALLOCATOR_URL" CONFORMANCE_HTTPS_PORT="$HTTPS_PORT" timeout "$SCENARIO_TIMEOUT" "$PY" "$CONF/scenarios.py" "$name" 2>&1)" || rc=$?
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "PASS $name"
    elif [ "$rc" -eq 3 ]; then
        skipped=$((skipped + 1))
        echo "SKIP $name: $(printf '%s\n' "$output" | sed -n 's/^SKIP: //p' | tail -n 1)"
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
notrun=$((total - passed - failed - skipped))
failed=$((failed + notrun))

if [ "$failed" -gt 0 ]; then
    print_server_log
fi
if [ "$skipped" -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" -eq 0 ]
