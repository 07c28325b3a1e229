"""Shared helpers for the opendps official-SDK conformance scenarios.

Every scenario runs in its own process (see run.sh).  The running server is
described by the JSON of `opendps info --json`, passed in the environment
variable OPENDPS_INFO.
"""

import base64
import io
import json
import logging
import os
import secrets
import sys

from azure.core.exceptions import HttpResponseError
from azure.iot.deviceprovisioning import DeviceProvisioningClient

OWNER_POLICY = "provisioningserviceowner"

# HTTP exchanges as azure-core's HttpLoggingPolicy reports them (method, URL,
# status, non-secret headers).  Printed only when a scenario fails.
_HTTP_LOG = io.StringIO()


class _CompactHttpLog(logging.Handler):
    """One line per request and per response, out of HttpLoggingPolicy's records."""

    def emit(self, record):
        fields = {}
        for line in record.getMessage().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip().strip("'"))
        if "Request URL" in fields:
            _HTTP_LOG.write(f"    > {fields.get('Request method', '?')} {fields['Request URL']}\n")
        elif "Response status" in fields:
            _HTTP_LOG.write(f"    < {fields['Response status']}\n")


def _setup_http_logging():
    log = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    log.setLevel(logging.INFO)
    log.addHandler(_CompactHttpLog())
    log.propagate = False


_setup_http_logging()


def http_log(max_lines=120):
    lines = _HTTP_LOG.getvalue().splitlines()
    if len(lines) > max_lines:
        lines = [f"    ... {len(lines) - max_lines} earlier lines left out"] + lines[-max_lines:]
    return "\n".join(lines)


class ScenarioFailure(AssertionError):
    """A check failed; the message says which and what was seen."""


def check(cond, message):
    if not cond:
        raise ScenarioFailure(message)


def info():
    text = os.environ.get("OPENDPS_INFO")
    if not text:
        raise ScenarioFailure("OPENDPS_INFO is not set (run the scenarios through run.sh)")
    return json.loads(text)


def connection_string(policy=OWNER_POLICY):
    data = info()
    for p in data.get("policies", []):
        if p.get("name") == policy:
            return p["connectionString"]
    if policy == OWNER_POLICY and data.get("serviceConnectionString"):
        return data["serviceConnectionString"]
    raise ScenarioFailure(f"policy {policy!r} is not in `opendps info --json`")


def make_client(cs=None, policy=OWNER_POLICY):
    """An official SDK client that trusts the server's CA."""
    cs = cs or connection_string(policy)
    return DeviceProvisioningClient.from_connection_string(
        cs,
        connection_verify=info()["caFile"],
        # A conformance run wants the server's first answer, not a retried one.
        retry_total=0,
    )


def unique_id(tag):
    """A fresh id, valid both as registration id and as enrollment group id."""
    return f"conf-{tag}-{secrets.token_hex(5)}"


def describe_http_error(e):
    """Method, URL, status and body of the failed exchange."""
    resp = getattr(e, "response", None)
    if resp is None:
        return repr(e)
    req = getattr(resp, "request", None)
    try:
        body = resp.text()
    except Exception:  # pragma: no cover - best effort
        body = "<unreadable body>"
    where = f"{req.method} {req.url}" if req is not None else "<request unknown>"
    return f"{where} -> {resp.status_code}: {body[:600]}"


def expect_status(status, what, fn, *args, **kwargs):
    """Run fn; it must raise HttpResponseError with this status code."""
    try:
        result = fn(*args, **kwargs)
    except HttpResponseError as e:
        check(
            e.status_code == status,
            f"{what}: expected HTTP {status}, got {e.status_code} "
            f"({type(e).__name__}): {describe_http_error(e)}",
        )
        return e
    raise ScenarioFailure(f"{what}: expected HTTP {status}, but the call succeeded and returned {result!r}")


def call(what, fn, *args, **kwargs):
    """Run fn; an HttpResponseError becomes a readable failure."""
    try:
        return fn(*args, **kwargs)
    except HttpResponseError as e:
        raise ScenarioFailure(
            f"{what}: unexpected HTTP {e.status_code} ({type(e).__name__}): {describe_http_error(e)}"
        ) from e


def is_b64_of_len(value, nbytes):
    if not isinstance(value, str):
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == nbytes
    except Exception:
        return False


def out(msg):
    print(msg, flush=True)
    sys.stdout.flush()
