#!/usr/bin/env bash
# Makes sure conformance/node/node_modules holds the pinned official Azure IoT Node.js provisioning
# SDK (package-lock.json) that the node_* scenarios drive; installs it with `npm ci` on first use
# or when the lock file changed, does nothing when it is ready. Called by conformance/run.sh and
# scripts/test. Without Node.js it says so and the node_* scenarios are skipped, except in CI
# (CI set), where a missing Node.js stops the run: CI must exercise them.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/node" && pwd)"
STAMP="$DIR/node_modules/.opendps-lock"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    msg="conformance: Node.js with npm is not installed; the node_* scenarios (the official Node.js SDK over AMQP and WebSockets) will be skipped. Debian/Ubuntu: apt-get install nodejs npm"
    if [ -n "${CI:-}" ]; then
        echo "${msg/will be skipped/cannot run}" >&2
        exit 1
    fi
    echo "$msg" >&2
    exit 0
fi

if [ -f "$STAMP" ] && cmp -s "$STAMP" "$DIR/package-lock.json"; then
    exit 0
fi
echo "installing the pinned Azure IoT Node.js provisioning SDK into $DIR/node_modules (npm ci)"
if ! (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
    echo "conformance: npm could not install conformance/node/package-lock.json; the suite needs the npm registry (or a mirror set with npm_config_registry)" >&2
    exit 1
fi
cp "$DIR/package-lock.json" "$STAMP"
