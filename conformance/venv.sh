#!/usr/bin/env bash
# Makes sure .venv-conformance (at the repository root) holds the pinned official Azure IoT Python
# SDKs the conformance suite drives; creates it on first use, does nothing when it is ready.
# Called by conformance/run.sh, and by scripts/test before its long steps so that a missing
# prerequisite stops it at once. Needs python3 with its venv module, and pip access to PyPI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-conformance"
PY="$VENV/bin/python"
PACKAGES=(azure-iot-device==2.14.0 azure-iot-hub==2.7.0 azure-iot-deviceprovisioning==1.0.0b1 six==1.17.0)

if [ -x "$PY" ] && "$PY" -c 'import azure.iot.device, azure.iot.hub, azure.iot.deviceprovisioning' >/dev/null 2>&1; then
    exit 0
fi

missing() {
    printf 'conformance: %s\n' "$@" >&2
    exit 1
}

command -v python3 >/dev/null 2>&1 ||
    missing "python3 is required for the official-SDK conformance suite." \
        "Install Python 3 with its venv module (Debian/Ubuntu: apt-get install python3 python3-venv)."

echo "creating $VENV (the pinned Azure IoT Python SDKs)"
# Debian and Ubuntu ship the venv module without ensurepip: `python3 -m venv` then fails, saying
# so, until the python3-venv package is installed.
if ! log="$(python3 -m venv "$VENV" 2>&1)"; then
    printf '%s\n' "$log" >&2
    missing "python3 could not create a virtual environment in $VENV." \
        "Debian/Ubuntu: apt-get install python3-venv (as root), then run this again."
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" ||
    missing "pip could not install ${PACKAGES[*]} into $VENV." \
        "The suite needs access to PyPI (or a mirror set with PIP_INDEX_URL)."
