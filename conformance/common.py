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


# ---------------------------------------------------------------------------
# Where the server is: the suite's own host name and address
# ---------------------------------------------------------------------------


def service_hostname():
    """The host name clients use for the service (`serviceHost` without its port): run.sh makes it
    the suite's own name, dps.opendps-conformance.test. Device clients dial it on port 8883."""
    host = info()["serviceHost"]
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def suite_address():
    """The IP address the server listens on (run.sh gives each run a loopback address of its own,
    e.g. 127.77.3.41, HTTPS and MQTT alike), or 127.0.0.1 for a wildcard listener."""
    import ipaddress

    host = info()["listen"]["https"].rsplit(":", 1)[0].strip("[]")
    return "127.0.0.1" if ipaddress.ip_address(host).is_unspecified else host


def _route_suite_names():
    """Resolve the names the suite uses, and only those, to the server's address, as a hosts file
    would: the service host name (which the service SDK, ProvisioningDeviceClient and the hub
    device client's GatewayHostName dial) and the in-process hubs' names (which the registry
    client dials). Neither resolves on a test machine, and the Python device SDK always dials
    port 8883 of the name it is given, so a name of the suite's own pointing at an address of its
    own is what lets the suite run beside a default `opendps serve` (127.0.0.1:8883) or another
    run. Done once, at import, in the scenario process; the SDKs themselves are untouched, and
    TLS still checks those names against the server's certificate."""
    import socket

    if not os.environ.get("OPENDPS_INFO"):
        return  # `scenarios.py --list`
    names = {service_hostname().lower()} | {h["hostName"].lower() for h in info().get("minihubs", [])}
    address = suite_address()
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, (str, bytes)):
            name = host.decode() if isinstance(host, bytes) else host
            if name.lower().rstrip(".") in names:
                host = address
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    # requests (under the registry client) reads the CA bundle from the environment.
    os.environ["REQUESTS_CA_BUNDLE"] = info()["caFile"]


_route_suite_names()


# ---------------------------------------------------------------------------
# In-process IoT hubs (minihub)
# ---------------------------------------------------------------------------

TOASTERS_HUB = "contoso-toasters-hub-1.azure-devices.net"
HEATPUMPS_HUB = "contoso-heatpumps-hub-1.azure-devices.net"


def listen_port():
    return int(info()["listen"]["https"].rsplit(":", 1)[1])


def hub_connection_string(host):
    """The in-process hub's iothubowner connection string, with the server's port in HostName."""
    for hub in info().get("minihubs", []):
        if hub["hostName"] == host:
            return hub["connectionString"].replace(f"HostName={host};", f"HostName={host}:{listen_port()};")
    raise ScenarioFailure(f"hub {host!r} is not in `opendps info --json` (minihubs)")


def registry_manager(host):
    from azure.iot.hub import IoTHubRegistryManager

    return IoTHubRegistryManager.from_connection_string(hub_connection_string(host))


def hub_sas(host, ttl=3600):
    """A service SAS for the in-process hub `host`, from its iothubowner connection string."""
    import base64
    import hashlib
    import hmac
    import time
    import urllib.parse

    cs = hub_connection_string(host)
    key = next(p.split("=", 1)[1] for p in cs.split(";") if p.startswith("SharedAccessKey="))
    sr = urllib.parse.quote(host, safe="")
    se = str(int(time.time()) + ttl)
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}&skn=iothubowner"


def hub_telemetry(host, device_id):
    """The telemetry the in-process hub recorded for a device (opendps extension of the hub API)."""
    import requests

    url = f"https://{host}:{listen_port()}/devices/{device_id}/messages/events?api-version=2021-04-12"
    reply = requests.get(url, headers={"Authorization": hub_sas(host)}, verify=info()["caFile"], timeout=10)
    check(reply.status_code == 200, f"reading telemetry: HTTP {reply.status_code} {reply.text[:200]}")
    return reply.json()


def service_request(method, path, body=None):
    """A call to the service API outside the SDK's surface (opendps extensions such as
    /certificates), signed with the owner policy's connection string."""
    import base64
    import hashlib
    import hmac
    import time
    import urllib.parse

    import requests

    cs = dict(p.split("=", 1) for p in connection_string().split(";") if "=" in p)
    host = cs["HostName"]
    sr = urllib.parse.quote(host, safe="")
    se = str(int(time.time()) + 3600)
    sig = base64.b64encode(hmac.new(base64.b64decode(cs["SharedAccessKey"]), f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}&skn={cs['SharedAccessKeyName']}"
    reply = requests.request(
        method,
        f"https://{host}{path}?api-version=2021-10-01",
        json=body,
        headers={"Authorization": token},
        verify=info()["caFile"],
        timeout=10,
    )
    check(reply.status_code < 300, f"{method} {path}: HTTP {reply.status_code} {reply.text[:300]}")
    return reply.json() if reply.text else None


def metric(sample):
    """The value of one sample of the service's /metrics, such as
    'opendps_operation_polls_total{transport="mqtt"}'; 0 when the service has not counted it yet."""
    import requests

    data = info()
    reply = requests.get(f"https://{service_hostname()}:{listen_port()}/metrics", verify=data["caFile"], timeout=10)
    check(reply.status_code == 200, f"/metrics: HTTP {reply.status_code}")
    for line in reply.text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


class NoPolls:
    """Checks, from the service's side, that the registrations made inside the block over
    `transport` were answered in their register response and no operation-status request arrived:
    `expected` inline answers, zero polls."""

    def __init__(self, transport, expected=1):
        self.transport, self.expected = transport, expected

    def _counts(self):
        labels = f'{{transport="{self.transport}"}}'
        return metric("opendps_inline_answers_total" + labels), metric("opendps_operation_polls_total" + labels)

    def __enter__(self):
        self.before = self._counts()
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            return False
        (inline0, polls0), (inline1, polls1) = self.before, self._counts()
        check(polls1 == polls0, f"{self.transport}: the device polled {polls1 - polls0:.0f} times")
        check(inline1 - inline0 == self.expected,
              f"{self.transport}: {inline1 - inline0:.0f} register requests answered with the final status, expected {self.expected}")
        return False

