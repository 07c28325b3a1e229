#!/usr/bin/env python3
"""opendps conformance scenarios, driven by the official, unmodified Python SDK
azure-iot-deviceprovisioning (DeviceProvisioningClient).

    scenarios.py --list        print the scenario names, one a line
    scenarios.py NAME          run one scenario; exit 0 on success

On failure the last line printed is `REASON: ...`, preceded by the trace of
the scenario and the HTTP exchanges it made.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import traceback

from azure.core.credentials import AzureNamedKeyCredential  # noqa: F401  (documentation: what from_connection_string builds)
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

import common
from common import call, check, expect_status, is_b64_of_len, make_client, out, unique_id

SCENARIOS = {}


def scenario(name):
    def register(fn):
        SCENARIOS[name] = fn
        return fn

    return register


class Kind:
    def __init__(self, name, ops_attr, id_field, query_text):
        self.name = name
        self.ops_attr = ops_attr
        self.id_field = id_field
        self.query_text = query_text

    def ops(self, client):
        return getattr(client, self.ops_attr)

    def symmetric_body(self, id_):
        # No keys given: the service must generate them.
        return {self.id_field: id_, "attestation": {"type": "symmetricKey"}}


GROUP = Kind("group", "enrollment_group", "enrollmentGroupId", "SELECT * FROM enrollmentGroups")
INDIVIDUAL = Kind("enrollment", "enrollment", "registrationId", "SELECT * FROM enrollments")
KINDS = (GROUP, INDIVIDUAL)


class Cleanup:
    """Deletes what a scenario created, best effort, so the shared server stays small."""

    def __init__(self):
        self.items = []

    def add(self, kind, id_):
        self.items.append((kind, id_))

    def run(self, client):
        for kind, id_ in reversed(self.items):
            try:
                kind.ops(client).delete(id_)
            except Exception:
                pass


def create_symmetric(client, kind, cleanup, id_):
    cleanup.add(kind, id_)
    created = call(
        f"create {kind.name} {id_}", kind.ops(client).create_or_update, id_, kind.symmetric_body(id_)
    )
    check(isinstance(created, dict), f"create {kind.name} {id_}: response body is not a JSON object: {created!r}")
    return created


# ---------------------------------------------------------------------------
# Per kind: enrollment groups and individual enrollments (symmetric key)
# ---------------------------------------------------------------------------


def define_kind_scenarios(kind):
    ops = kind.ops

    @scenario(f"{kind.name}_create_generates_keys")
    def create_generates_keys(client, cleanup):
        id_ = unique_id(f"{kind.name[:3]}-create")
        created = create_symmetric(client, kind, cleanup, id_)
        check(created.get(kind.id_field) == id_, f"create: {kind.id_field} is {created.get(kind.id_field)!r}, want {id_!r}")
        check(bool(created.get("etag")), f"create: response has no etag: {created!r}")
        att = created.get("attestation") or {}
        check(att.get("type") == "symmetricKey", f"create: attestation.type is {att.get('type')!r}")
        # The keys were generated: the attestation mechanism has them.
        mech = call("attestation mechanism", ops(client).get_attestation_mechanism, id_)
        sk = (mech or {}).get("symmetricKey") or {}
        check(
            sk.get("primaryKey") and sk.get("secondaryKey"),
            f"no generated keys in the attestation mechanism after a create without keys: {mech!r}",
        )
        check(sk["primaryKey"] != sk["secondaryKey"], "the generated primary and secondary keys are equal")

    @scenario(f"{kind.name}_get_has_no_secrets")
    def get_has_no_secrets(client, cleanup):
        id_ = unique_id(f"{kind.name[:3]}-get")
        created = create_symmetric(client, kind, cleanup, id_)
        got = call(f"get {kind.name}", ops(client).get, id_)
        check(got.get(kind.id_field) == id_, f"get: {kind.id_field} is {got.get(kind.id_field)!r}, want {id_!r}")
        check(got.get("etag") == created.get("etag"), f"get: etag {got.get('etag')!r} differs from create's {created.get('etag')!r}")
        att = got.get("attestation") or {}
        check(att.get("type") == "symmetricKey", f"get: attestation.type is {att.get('type')!r}")
        sk = att.get("symmetricKey")
        check(
            not sk or (not sk.get("primaryKey") and not sk.get("secondaryKey")),
            f"get: the response carries symmetric keys: attestation.symmetricKey = {sk!r}",
        )

    @scenario(f"{kind.name}_attestation_mechanism")
    def attestation_mechanism(client, cleanup):
        id_ = unique_id(f"{kind.name[:3]}-att")
        create_symmetric(client, kind, cleanup, id_)
        mech = call("attestation mechanism", ops(client).get_attestation_mechanism, id_)
        check(isinstance(mech, dict), f"attestation mechanism: not a JSON object: {mech!r}")
        check(mech.get("type") == "symmetricKey", f"attestation mechanism: type is {mech.get('type')!r}")
        sk = mech.get("symmetricKey") or {}
        for field in ("primaryKey", "secondaryKey"):
            check(
                common.is_b64_of_len(sk.get(field), 64),
                f"attestation mechanism: symmetricKey.{field} is not base64 of 64 bytes: {sk.get(field)!r}",
            )

    @scenario(f"{kind.name}_query_paged")
    def query_paged(client, cleanup):
        prefix = unique_id(f"{kind.name[:3]}-q")
        ids = [f"{prefix}-{i}" for i in range(3)]
        for id_ in ids:
            create_symmetric(client, kind, cleanup, id_)
        # The SDK's own query helper: `top` becomes x-ms-max-item-count, and the
        # x-ms-continuation response header drives by_page().
        pager = ops(client).query({"query": kind.query_text}, top=1)
        seen = {}
        pages = 0
        try:
            for page in pager.by_page():
                pages += 1
                items = list(page)
                check(len(items) <= 1, f"query page {pages} has {len(items)} items with x-ms-max-item-count 1")
                for item in items:
                    check(isinstance(item, dict), f"query page {pages}: item is not a JSON object: {item!r}")
                    got_id = item.get(kind.id_field)
                    if got_id in ids:
                        check(got_id not in seen, f"query: {got_id} seen on page {seen.get(got_id)} and again on page {pages}")
                        seen[got_id] = pages
                    sk = (item.get("attestation") or {}).get("symmetricKey") or {}
                    check(not sk.get("primaryKey"), f"query: item {got_id} carries symmetric keys")
                check(pages <= 5000, "query: more than 5000 pages; the continuation does not end")
        except HttpResponseError as e:
            raise common.ScenarioFailure(
                f"query page {pages + 1}: HTTP {e.status_code}: {common.describe_http_error(e)}"
            ) from e
        missing = [i for i in ids if i not in seen]
        check(not missing, f"query: paging one item at a time over {pages} pages did not return {missing} (saw {seen})")
        out(f"  {pages} pages, ours on pages {sorted(seen.values())}")

    @scenario(f"{kind.name}_replace_stale_etag_412")
    def replace_stale_etag(client, cleanup):
        id_ = unique_id(f"{kind.name[:3]}-stale")
        created = create_symmetric(client, kind, cleanup, id_)
        stale = created["etag"]
        body = call("get", ops(client).get, id_)
        body["provisioningStatus"] = "disabled"
        updated = call("replace with the current etag", ops(client).create_or_update, id_, body, if_match=stale)
        check(updated.get("etag") and updated["etag"] != stale, f"replace: etag did not change ({updated.get('etag')!r})")
        body["provisioningStatus"] = "enabled"
        expect_status(412, "replace with a stale etag", ops(client).create_or_update, id_, body, if_match=stale)
        after = call("get", ops(client).get, id_)
        check(after.get("provisioningStatus") == "disabled", f"the rejected replace changed the record: {after!r}")

    @scenario(f"{kind.name}_put_existing_without_if_match_409")
    def put_existing_409(client, cleanup):
        id_ = unique_id(f"{kind.name[:3]}-dup")
        create_symmetric(client, kind, cleanup, id_)
        expect_status(
            409, "create_or_update of an existing id without If-Match",
            ops(client).create_or_update, id_, kind.symmetric_body(id_),
        )

    @scenario(f"{kind.name}_replace_current_etag")
    def replace_current_etag(client, cleanup):
        id_ = unique_id(f"{kind.name[:3]}-repl")
        create_symmetric(client, kind, cleanup, id_)
        body = call("get", ops(client).get, id_)
        etag = body.get("etag")
        check(bool(etag), f"get: no etag: {body!r}")
        body["provisioningStatus"] = "disabled"
        updated = call("replace with the current etag", ops(client).create_or_update, id_, body, if_match=etag)
        check(updated.get("etag") and updated["etag"] != etag, f"replace: new etag {updated.get('etag')!r} does not differ from {etag!r}")
        check(updated.get("provisioningStatus") == "disabled", f"replace: provisioningStatus is {updated.get('provisioningStatus')!r}")
        again = call("get", ops(client).get, id_)
        check(again.get("etag") == updated["etag"], f"get after replace: etag {again.get('etag')!r}, replace returned {updated['etag']!r}")
        check(again.get("provisioningStatus") == "disabled", "get after replace: provisioningStatus not kept")

    @scenario(f"{kind.name}_delete_then_get_404")
    def delete_then_get_404(client, cleanup):
        id_ = unique_id(f"{kind.name[:3]}-del")
        create_symmetric(client, kind, cleanup, id_)
        call(f"delete {kind.name}", ops(client).delete, id_)
        e = expect_status(404, "get after delete", ops(client).get, id_)
        check(isinstance(e, ResourceNotFoundError), f"get after delete: SDK raised {type(e).__name__}, not ResourceNotFoundError")


for _kind in KINDS:
    define_kind_scenarios(_kind)


# ---------------------------------------------------------------------------
# Others
# ---------------------------------------------------------------------------


@scenario("registration_query_fresh_group_empty")
def registration_query_fresh_group(client, cleanup):
    id_ = unique_id("grp-regq")
    create_symmetric(client, GROUP, cleanup, id_)
    try:
        states = list(client.device_registration_state.query(id_))
    except HttpResponseError as e:
        raise common.ScenarioFailure(f"registration state query: HTTP {e.status_code}: {common.describe_http_error(e)}") from e
    check(states == [], f"registration state query of a fresh group: want [], got {states!r}")


@scenario("enrollmentread_policy_get_ok_create_403")
def enrollmentread_policy(client, cleanup):
    id_ = unique_id("enr-read")
    create_symmetric(client, INDIVIDUAL, cleanup, id_)
    reader = make_client(policy="enrollmentread")
    got = call("get with the enrollmentread policy", reader.enrollment.get, id_)
    check(got.get("registrationId") == id_, f"get with enrollmentread: {got!r}")
    other = unique_id("enr-read-new")
    cleanup.add(INDIVIDUAL, other)
    expect_status(
        403, "create with the enrollmentread policy",
        reader.enrollment.create_or_update, other, INDIVIDUAL.symmetric_body(other),
    )
    expect_status(404, "the forbidden create left nothing behind", client.enrollment.get, other)


@scenario("wrong_key_401")
def wrong_key(client, cleanup):
    cs = common.connection_string()
    parts = []
    real = None
    for part in cs.split(";"):
        k, _, v = part.partition("=")
        if k.lower() == "sharedaccesskey":
            real = v
            wrong = base64.b64encode(secrets.token_bytes(32)).decode()
            while wrong == real:
                wrong = base64.b64encode(secrets.token_bytes(32)).decode()
            part = f"{k}={wrong}"
        parts.append(part)
    check(real is not None, f"no SharedAccessKey in {cs!r}")
    bad = make_client(cs=";".join(parts))
    expect_status(401, "get with a wrong key", bad.enrollment.get, unique_id("nobody"))
    expect_status(401, "query with a wrong key", lambda: list(bad.enrollment_group.query({"query": "*"})))


def self_signed_cert_pem(cn):
    """A fresh self-signed certificate, PEM.  Uses `cryptography` when it is
    installed, else the openssl command line."""
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        with tempfile.TemporaryDirectory() as d:
            key, crt = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", key, "-out", crt, "-days", "30", "-subj", f"/CN={cn}"],
                check=True, capture_output=True,
            )
            with open(crt) as f:
                return f.read()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@scenario("x509_enrollment_thumbprint")
def x509_enrollment(client, cleanup):
    id_ = unique_id("x509")
    pem = self_signed_cert_pem(id_)
    der = ssl.PEM_cert_to_DER_cert(pem)
    want = hashlib.sha256(der).hexdigest().upper()
    body = {
        "registrationId": id_,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
    }
    cleanup.add(INDIVIDUAL, id_)
    created = call("create x509 enrollment", client.enrollment.create_or_update, id_, body)
    check(bool(created.get("etag")), f"create x509: no etag: {created!r}")
    got = call("get x509 enrollment", client.enrollment.get, id_)
    att = got.get("attestation") or {}
    check(att.get("type") == "x509", f"get x509: attestation.type is {att.get('type')!r}")
    primary = (((att.get("x509") or {}).get("clientCertificates") or {}).get("primary")) or {}
    thumb = (primary.get("info") or {}).get("sha256Thumbprint")
    check(thumb == want, f"get x509: clientCertificates.primary.info.sha256Thumbprint is {thumb!r}, want {want!r} (attestation: {att!r})")


@scenario("bulk_create_one_existing")
def bulk_create(client, cleanup):
    existing = unique_id("bulk-old")
    new = unique_id("bulk-new")
    create_symmetric(client, INDIVIDUAL, cleanup, existing)
    cleanup.add(INDIVIDUAL, new)
    result = call(
        "bulk create", client.enrollment.run_bulk_operation,
        {"mode": "create", "enrollments": [INDIVIDUAL.symmetric_body(existing), INDIVIDUAL.symmetric_body(new)]},
    )
    check(isinstance(result, dict), f"bulk: response is not a JSON object: {result!r}")
    check(result.get("isSuccessful") is False, f"bulk: isSuccessful is {result.get('isSuccessful')!r}, want false: {result!r}")
    errors = result.get("errors") or []
    check(len(errors) == 1, f"bulk: want exactly one error, got {errors!r}")
    check(errors[0].get("registrationId") == existing, f"bulk: the error is for {errors[0].get('registrationId')!r}, want {existing!r}: {errors!r}")



# ---------------------------------------------------------------------------
# IoT hub side: the official azure-iot-hub registry client against the in-process hubs
# ---------------------------------------------------------------------------


def symmetric_group(client, cleanup, tag):
    """A symmetric-key enrollment group with nothing else set (fresh id from `tag`); its keys."""
    group = unique_id(tag)
    cleanup.add(GROUP, group)
    call("create the group", client.enrollment_group.create_or_update, group, {"enrollmentGroupId": group, "attestation": {"type": "symmetricKey"}})
    return call("group keys", client.enrollment_group.get_attestation_mechanism, group)["symmetricKey"]


def derived_key(group_key, registration_id):
    return base64.b64encode(hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()).decode()


def hub_status(fn, *args):
    """The HTTP status of a registry call that is expected to fail."""
    try:
        fn(*args)
    except Exception as e:  # msrest raises HttpOperationError with a response attached
        response = getattr(e, "response", None)
        return getattr(response, "status_code", None)
    return 200


@scenario("hub_registry_crud")
def hub_registry_crud(client, cleanup):
    from azure.iot.hub.models import QuerySpecification, Twin, TwinProperties

    rm = common.registry_manager(common.TOASTERS_HUB)
    id_ = unique_id("hubcrud")
    created = rm.create_device_with_sas(id_, "", "", "enabled")
    keys = created.authentication.symmetric_key
    check(is_b64_of_len(keys.primary_key, 32) or is_b64_of_len(keys.primary_key, 64), f"generated primary key: {keys.primary_key!r}")
    got = rm.get_device(id_)
    check(got.etag and got.device_id == id_, f"get_device: {got!r}")
    updated = rm.update_device_with_sas(id_, got.etag, keys.primary_key, keys.secondary_key, "disabled")
    check(updated.status == "disabled", f"update_device_with_sas: status {updated.status!r}")
    check(hub_status(rm.update_device_with_sas, id_, got.etag, keys.primary_key, keys.secondary_key, "enabled") == 412,
          "update with a stale etag must be 412")
    twin = rm.get_twin(id_)
    patched = rm.update_twin(id_, Twin(tags={"site": "hq"}, properties=TwinProperties(desired={"mode": "eco"})), twin.etag)
    check(patched.tags == {"site": "hq"}, f"update_twin tags: {patched.tags!r}")
    check(patched.properties.desired.get("mode") == "eco", f"update_twin desired: {patched.properties.desired!r}")
    replaced = rm.replace_twin(id_, Twin(tags={"owner": "ops"}, properties=TwinProperties(desired={})))
    check(replaced.tags == {"owner": "ops"}, f"replace_twin tags: {replaced.tags!r}")
    found = rm.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"))
    check(id_ in [t.device_id for t in found.items], f"query_iot_hub: {id_} not among {[t.device_id for t in found.items]}")
    rm.delete_device(id_)
    check(hub_status(rm.get_device, id_) == 404, "get_device after delete must be 404")


@scenario("provisioned_device_on_hub_with_initial_twin")
def provisioned_device_on_hub(client, cleanup):
    group = unique_id("grp-hub")
    cleanup.add(GROUP, group)
    body = {
        "enrollmentGroupId": group,
        "attestation": {"type": "symmetricKey"},
        "iotHubs": [common.HEATPUMPS_HUB],
        "initialTwin": {"tags": {"deviceType": "heatpump"}, "properties": {"desired": {"state": "on", "temperatureSetting": "65"}}},
    }
    call("create the group", client.enrollment_group.create_or_update, group, body)
    keys = call("group keys", client.enrollment_group.get_attestation_mechanism, group)["symmetricKey"]
    rid = unique_id("mainbuilding167-contoso-hpsd")
    device_key = derived_key(keys["primaryKey"], rid)
    data = common.info()
    # Another process does not see common.py's name routing: it dials the server's address, which
    # the certificate carries too (run.sh's --tls-name).
    endpoint = f"{common.suite_address()}:{common.listen_port()}"
    result = subprocess.run(
        [os.environ["CONFORMANCE_OPENDPS_BIN"], "device", "register", "--provisioning-host", endpoint,
         "--id-scope", data["idScope"], "--registration-id", rid, "--symmetric-key", device_key,
         "--ca-file", data["caFile"], "--output", "json"],
        capture_output=True, text=True, timeout=60,
    )
    check(result.returncode == 0, f"opendps device register failed: {result.stderr.strip()} {result.stdout.strip()}")
    state = json.loads(result.stdout)["registrationState"]
    check(state["assignedHub"] == common.HEATPUMPS_HUB, f"assigned to {state['assignedHub']!r}")
    rm = common.registry_manager(common.HEATPUMPS_HUB)
    device = rm.get_device(state["deviceId"])
    check(device.authentication.symmetric_key.primary_key == device_key, "the hub identity carries the derived key")
    twin = rm.get_twin(state["deviceId"])
    check(twin.tags == {"deviceType": "heatpump"}, f"twin tags: {twin.tags!r}")
    desired = {k: v for k, v in twin.properties.desired.items() if not k.startswith("$")}
    check(desired == {"state": "on", "temperatureSetting": "65"}, f"twin desired: {desired!r}")
    rm.delete_device(state["deviceId"])


# ---------------------------------------------------------------------------
# Device side over MQTT: the official azure-iot-device ProvisioningDeviceClient (port 8883)
# ---------------------------------------------------------------------------


def provisioning_client(registration_id, key, websockets=False):
    from azure.iot.device import ProvisioningDeviceClient

    data = common.info()
    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=common.service_hostname(),
        registration_id=registration_id,
        id_scope=data["idScope"],
        symmetric_key=key,
        server_verification_cert=open(data["caFile"]).read(),
        websockets=websockets,
    )


def require_websockets():
    """MQTT over WebSockets goes to port 443 (the SDK's fixed port), where run.sh puts the HTTPS
    listener when it may."""
    if os.environ.get("CONFORMANCE_HTTPS_PORT") != "443":
        raise Skipped("the HTTPS listener could not take port 443 here (run as root, or lower net.ipv4.ip_unprivileged_port_start)")


def register_expecting_failure(registration_id, key, what, websockets=False):
    """Registration must fail, and fast (well under 5 s)."""
    import time

    started = time.monotonic()
    try:
        result = provisioning_client(registration_id, key, websockets=websockets).register()
    except Exception as e:  # the SDK raises ClientError / ServiceError
        elapsed = time.monotonic() - started
        check(elapsed < 5, f"{what}: the SDK failed only after {elapsed:.1f} s")
        out(f"  {what}: {type(e).__name__} after {elapsed:.2f} s")
        return
    raise common.ScenarioFailure(f"{what}: registration did not fail: {result}")


@scenario("mqtt_group_device_with_payload")
def mqtt_group_device(client, cleanup):
    group = unique_id("grp-mqtt")
    cleanup.add(GROUP, group)
    body = {
        "enrollmentGroupId": group,
        "attestation": {"type": "symmetricKey"},
        "iotHubs": [common.TOASTERS_HUB],
        "initialTwin": {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready", "darknessSetting": "medium"}}},
    }
    call("create the group", client.enrollment_group.create_or_update, group, body)
    keys = call("group keys", client.enrollment_group.get_attestation_mechanism, group)["symmetricKey"]
    rid = unique_id("breakroom499-contoso-tstrsd")
    device_key = derived_key(keys["primaryKey"], rid)
    device = provisioning_client(rid, device_key)
    device.provisioning_payload = {"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"}
    # Registration in one round trip: the register response carries the result, and the SDK
    # (which otherwise waits 2 s before its first poll) never polls.
    with common.NoPolls("mqtt"):
        result = device.register()
    check(result.status == "assigned", f"status {result.status!r}: {result}")
    state = result.registration_state
    check(state.assigned_hub == common.TOASTERS_HUB, f"assigned hub {state.assigned_hub!r}")
    check(state.device_id == rid, f"device id {state.device_id!r}")
    check(state.sub_status == "initialAssignment", f"substatus {state.sub_status!r}")
    rm = common.registry_manager(common.TOASTERS_HUB)
    check(rm.get_device(rid).authentication.symmetric_key.primary_key == device_key, "the hub identity carries the derived key")
    twin = rm.get_twin(rid)
    check(twin.tags == {"deviceType": "toaster"}, f"twin tags {twin.tags!r}")
    rm.delete_device(rid)


@scenario("mqtt_individual_enrollment")
def mqtt_individual(client, cleanup):
    rid = unique_id("mqtt-solo")
    cleanup.add(INDIVIDUAL, rid)
    body = {"registrationId": rid, "deviceId": rid + "-dev", "attestation": {"type": "symmetricKey"}, "iotHubs": [common.HEATPUMPS_HUB]}
    call("create the enrollment", client.enrollment.create_or_update, rid, body)
    keys = call("enrollment keys", client.enrollment.get_attestation_mechanism, rid)["symmetricKey"]
    result = provisioning_client(rid, keys["secondaryKey"]).register()
    check(result.status == "assigned", f"status {result.status!r}: {result}")
    check(result.registration_state.assigned_hub == common.HEATPUMPS_HUB, f"hub {result.registration_state.assigned_hub!r}")
    check(result.registration_state.device_id == rid + "-dev", f"device id {result.registration_state.device_id!r}")
    common.registry_manager(common.HEATPUMPS_HUB).delete_device(rid + "-dev")


@scenario("mqtt_wrong_key_disabled_unknown_fail_fast")
def mqtt_failures(client, cleanup):
    keys = symmetric_group(client, cleanup, "grp-mqtt-bad")
    rid = unique_id("mqtt-dev")
    register_expecting_failure(rid, derived_key(keys["primaryKey"], rid + "x"), "wrong key")
    register_expecting_failure(rid, keys["primaryKey"], "the group key itself")
    register_expecting_failure(unique_id("stranger"), base64.b64encode(secrets.token_bytes(32)).decode(), "unknown device")
    disabled = unique_id("mqtt-off")
    cleanup.add(INDIVIDUAL, disabled)
    call("create a disabled enrollment", client.enrollment.create_or_update, disabled,
         {"registrationId": disabled, "attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"})
    off_key = call("its keys", client.enrollment.get_attestation_mechanism, disabled)["symmetricKey"]["primaryKey"]
    register_expecting_failure(disabled, off_key, "disabled enrollment")


def provision_then_use_the_hub(rid, key, device_id, hub, websockets=False):
    """The tutorial's device flow: register over MQTT (with a custom payload), connect to the
    assigned hub with IoTHubDeviceClient, read the initial twin, report, receive a desired update,
    send telemetry; each effect checked through the hub's registry API. `websockets`: both over
    MQTT over WebSockets on port 443."""
    import threading

    from azure.iot.device import IoTHubDeviceClient, Message
    from azure.iot.hub.models import Twin, TwinProperties

    device = provisioning_client(rid, key, websockets=websockets)
    device.provisioning_payload = {"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"}
    with common.NoPolls("mqtt-ws" if websockets else "mqtt"):
        result = device.register()
    check(result.status == "assigned", f"status {result.status!r}: {result}")
    state = result.registration_state
    check(state.assigned_hub == hub and state.device_id == device_id, f"assigned {state.assigned_hub!r} / {state.device_id!r}")

    cs = f"HostName={state.assigned_hub};DeviceId={state.device_id};SharedAccessKey={key};GatewayHostName={common.service_hostname()}"
    hub_client = IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=open(common.info()["caFile"]).read(), websockets=websockets)
    updates = []
    arrived = threading.Event()

    def on_desired(patch):
        updates.append(patch)
        if "mode" in patch:
            arrived.set()

    hub_client.on_twin_desired_properties_patch_received = on_desired
    try:
        hub_client.connect()
        twin = hub_client.get_twin()
        desired = {k: v for k, v in twin["desired"].items() if not k.startswith("$")}
        check(desired == {"state": "ready", "darknessSetting": "medium"}, f"initial desired properties: {twin}")
        hub_client.patch_twin_reported_properties({"firmware": "12.0.2.5"})
        rm = common.registry_manager(hub)
        seen = rm.get_twin(device_id)
        check(seen.properties.reported.get("firmware") == "12.0.2.5", f"reported properties via the registry: {seen.properties.reported}")
        check(seen.tags == {"deviceType": "toaster"}, f"tags: {seen.tags}")
        rm.update_twin(device_id, Twin(properties=TwinProperties(desired={"mode": "eco"})), seen.etag)
        check(arrived.wait(10), f"the desired update did not reach the device's handler: {updates}")
        hub_client.send_message(Message('{"temperature": 21.5}', content_encoding="utf-8", content_type="application/json"))
        recorded = common.hub_telemetry(hub, device_id)
        check(any("21.5" in m.get("body", "") for m in recorded), f"telemetry recorded by the hub: {recorded}")
    finally:
        hub_client.shutdown()
    common.registry_manager(hub).delete_device(device_id)


INITIAL_TWIN = {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready", "darknessSetting": "medium"}}}


def group_device_uses_its_hub(client, cleanup, tag, websockets=False):
    """A group on the toasters hub with an initial twin, and one of its devices through the whole
    flow (provision_then_use_the_hub); returns the device's registration id."""
    group = unique_id(f"grp-{tag}")
    cleanup.add(GROUP, group)
    body = {"enrollmentGroupId": group, "attestation": {"type": "symmetricKey"}, "iotHubs": [common.TOASTERS_HUB], "initialTwin": INITIAL_TWIN}
    call("create the group", client.enrollment_group.create_or_update, group, body)
    keys = call("group keys", client.enrollment_group.get_attestation_mechanism, group)["symmetricKey"]
    rid = unique_id(f"{tag}-contoso-tstrsd")
    provision_then_use_the_hub(rid, derived_key(keys["primaryKey"], rid), rid, common.TOASTERS_HUB, websockets=websockets)
    return rid


@scenario("mqtt_group_device_uses_its_hub")
def mqtt_group_device_uses_its_hub(client, cleanup):
    group_device_uses_its_hub(client, cleanup, "flow")


@scenario("mqtt_individual_device_uses_its_hub")
def mqtt_individual_device_uses_its_hub(client, cleanup):
    rid = unique_id("flow-solo")
    cleanup.add(INDIVIDUAL, rid)
    body = {"registrationId": rid, "attestation": {"type": "symmetricKey"}, "iotHubs": [common.HEATPUMPS_HUB], "initialTwin": INITIAL_TWIN}
    call("create the enrollment", client.enrollment.create_or_update, rid, body)
    keys = call("enrollment keys", client.enrollment.get_attestation_mechanism, rid)["symmetricKey"]
    provision_then_use_the_hub(rid, keys["primaryKey"], rid, common.HEATPUMPS_HUB)


@scenario("websocket_group_device_uses_its_hub")
def websocket_group_device_uses_its_hub(client, cleanup):
    """The same flow as mqtt_group_device_uses_its_hub, all of it over MQTT over WebSockets on 443."""
    require_websockets()
    rid = group_device_uses_its_hub(client, cleanup, "ws", websockets=True)
    state = call("the registration state", client.device_registration_state.get, rid)
    check(state.get("status") == "assigned", f"registration state: {state}")


@scenario("websocket_wrong_key_and_unknown_device_fail_fast")
def websocket_failures(client, cleanup):
    require_websockets()
    keys = symmetric_group(client, cleanup, "grp-ws-bad")
    rid = unique_id("ws-dev")
    register_expecting_failure(rid, derived_key(keys["primaryKey"], rid + "x"), "wrong key", websockets=True)
    register_expecting_failure(unique_id("ws-stranger"), base64.b64encode(secrets.token_bytes(32)).decode(), "unknown device", websockets=True)


# ---------------------------------------------------------------------------
# X.509 devices with the official SDK: certificates made by the openssl command line
# ---------------------------------------------------------------------------


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


def openssl_key_and_csr(cwd, name, cn):
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd)


def openssl_sign(cwd, name, ca, extensions):
    with open(os.path.join(cwd, f"{name}.ext"), "w") as f:
        f.write(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-sha256", "-extfile", f"{name}.ext", cwd=cwd)


CA_EXTENSIONS = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
LEAF_EXTENSIONS = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"


def openssl_chain(cwd, devices):
    """root -> intermediate -> one leaf per device; each device's `{id}-chain.pem` is its
    certificate followed by the intermediate, as a device sends them."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "root.key", "-out", "root.pem", "-days", "30", "-subj", "/CN=conformance root",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)
    openssl_key_and_csr(cwd, "intermediate", "conformance intermediate")
    openssl_sign(cwd, "intermediate", "root", CA_EXTENSIONS)
    for rid in devices:
        openssl_key_and_csr(cwd, rid, rid)
        openssl_sign(cwd, rid, "intermediate", LEAF_EXTENSIONS)
        with open(os.path.join(cwd, f"{rid}-chain.pem"), "w") as chain:
            for part in (rid, "intermediate"):
                with open(os.path.join(cwd, f"{part}.pem")) as f:
                    chain.write(f.read())


def upload_and_verify_root(d, ca_name):
    """Uploads `root.pem` of openssl_chain as CA certificate `ca_name`, then proves possession of its
    key as Azure's documentation shows it: a certificate with CN=<code>, signed by
    `openssl x509 -req` without extensions (version 1)."""
    root = open(os.path.join(d, "root.pem")).read()
    uploaded = common.service_request("PUT", f"/certificates/{ca_name}", {"certificate": root})
    check(uploaded["properties"]["isVerified"] is False, f"the root upload: {uploaded}")
    code = common.service_request("POST", f"/certificates/{ca_name}/generateVerificationCode", {})["properties"]["verificationCode"]
    openssl_key_and_csr(d, "verification", code)
    openssl("x509", "-req", "-in", "verification.csr", "-CA", "root.pem", "-CAkey", "root.key",
            "-CAcreateserial", "-out", "verification.pem", "-days", "30", "-sha256", cwd=d)
    proof = open(os.path.join(d, "verification.pem")).read()
    verified = common.service_request("POST", f"/certificates/{ca_name}/verify", {"certificate": proof})
    check(verified["properties"]["isVerified"] is True, f"the root after proof of possession: {verified}")


def x509_provisioning_client(registration_id, cert_file, key_file):
    from azure.iot.device import ProvisioningDeviceClient, X509

    data = common.info()
    return ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=common.service_hostname(),
        registration_id=registration_id,
        id_scope=data["idScope"],
        x509=X509(cert_file=cert_file, key_file=key_file),
        server_verification_cert=open(data["caFile"]).read(),
    )


def x509_device_reads_its_twin(rid, cert_file, key_file, hub):
    """Registers over MQTT with the certificate, then connects to the assigned hub with the same
    certificate and reads the initial twin."""
    from azure.iot.device import IoTHubDeviceClient, X509

    result = x509_provisioning_client(rid, cert_file, key_file).register()
    check(result.status == "assigned", f"{rid}: status {result.status!r}: {result}")
    state = result.registration_state
    check(state.assigned_hub == hub and state.device_id == rid, f"{rid}: assigned {state.assigned_hub!r} / {state.device_id!r}")
    device = common.registry_manager(hub).get_device(rid)
    check(device.authentication.type == "selfSigned", f"{rid}: the hub identity is {device.authentication.type!r}, not selfSigned")
    hub_client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=cert_file, key_file=key_file),
        hostname=state.assigned_hub,
        device_id=state.device_id,
        gateway_hostname=common.service_hostname(),
        server_verification_cert=open(common.info()["caFile"]).read(),
    )
    try:
        hub_client.connect()
        twin = hub_client.get_twin()
        desired = {k: v for k, v in twin["desired"].items() if not k.startswith("$")}
        check(desired == {"state": "ready", "darknessSetting": "medium"}, f"{rid}: initial desired properties: {twin}")
    finally:
        hub_client.shutdown()


@scenario("mqtt_x509_individual_device_uses_its_hub")
def mqtt_x509_individual(client, cleanup):
    rid = unique_id("x509-solo")
    with tempfile.TemporaryDirectory() as d:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", "device.key", "-out", "device.pem", "-days", "30", "-subj", f"/CN={rid}", cwd=d)
        pem = open(os.path.join(d, "device.pem")).read()
        cleanup.add(INDIVIDUAL, rid)
        body = {"registrationId": rid, "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
                "iotHubs": [common.HEATPUMPS_HUB], "initialTwin": INITIAL_TWIN}
        call("create the x509 enrollment", client.enrollment.create_or_update, rid, body)
        x509_device_reads_its_twin(rid, os.path.join(d, "device.pem"), os.path.join(d, "device.key"), common.HEATPUMPS_HUB)


@scenario("mqtt_x509_group_under_verified_root_and_a_disabled_device")
def mqtt_x509_group(client, cleanup):
    group = unique_id("x509-grp")
    first, second = unique_id("x509-a"), unique_id("x509-b")
    ca_name = unique_id("root")
    with tempfile.TemporaryDirectory() as d:
        openssl_chain(d, [first, second])
        intermediate = open(os.path.join(d, "intermediate.pem")).read()
        upload_and_verify_root(d, ca_name)
        cleanup.add(GROUP, group)
        body = {"enrollmentGroupId": group, "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": intermediate}}}},
                "iotHubs": [common.TOASTERS_HUB], "initialTwin": INITIAL_TWIN}
        call("create the x509 group", client.enrollment_group.create_or_update, group, body)
        for rid in (first, second):
            x509_device_reads_its_twin(rid, os.path.join(d, f"{rid}-chain.pem"), os.path.join(d, f"{rid}.key"), common.TOASTERS_HUB)
        # A disabled individual enrollment for one device's certificate stops that device only.
        leaf = open(os.path.join(d, f"{second}.pem")).read()
        cleanup.add(INDIVIDUAL, second)
        disabled = {"registrationId": second, "provisioningStatus": "disabled",
                    "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf}}}}}
        call("disable one device", client.enrollment.create_or_update, second, disabled)
        # The SDK reports a disabled registration as an error.
        try:
            result = x509_provisioning_client(second, os.path.join(d, f"{second}-chain.pem"), os.path.join(d, f"{second}.key")).register()
            check(result.status == "disabled", f"the disabled device: {result}")
        except common.ScenarioFailure:
            raise
        except Exception as e:  # ClientError from the SDK
            out(f"  the disabled device: {type(e).__name__}")
        state = common.service_request("GET", f"/registrations/{second}")
        check(state.get("status") == "disabled", f"the disabled device's registration state: {state}")
        result = x509_provisioning_client(first, os.path.join(d, f"{first}-chain.pem"), os.path.join(d, f"{first}.key")).register()
        check(result.status == "assigned", f"the other device: {result}")
        common.service_request("DELETE", f"/certificates/{ca_name}")


# ---------------------------------------------------------------------------
# The tutorial: custom allocation through the Contoso allocator (examples/contoso-allocator)
# ---------------------------------------------------------------------------


def tutorial_group(client, cleanup):
    """The tutorial's enrollment group: symmetric keys, custom allocation through the Contoso
    allocator over both hubs; returns its keys."""
    group = unique_id("contoso-custom-allocated-devices")
    cleanup.add(GROUP, group)
    body = {
        "enrollmentGroupId": group,
        "attestation": {"type": "symmetricKey"},
        "allocationPolicy": "custom",
        "iotHubs": [common.TOASTERS_HUB, common.HEATPUMPS_HUB],
        "customAllocationDefinition": {"webhookUrl": os.environ["CONFORMANCE_ALLOCATOR_URL"], "apiVersion": "2021-10-01"},
    }
    call("create the group", client.enrollment_group.create_or_update, group, body)
    return call("group keys", client.enrollment_group.get_attestation_mechanism, group)["symmetricKey"]


@scenario("tutorial_devices_through_the_contoso_allocator")
def tutorial_devices(client, cleanup):
    keys = tutorial_group(client, cleanup)
    expected = [
        ("-contoso-tstrsd-007", common.TOASTERS_HUB, {"deviceType": "toaster"}, {"state": "ready", "darknessSetting": "medium"}),
        ("-contoso-hpsd-088", common.HEATPUMPS_HUB, {"deviceType": "heatpump"}, {"state": "on", "temperatureSetting": "65"}),
    ]
    for suffix, hub, tags, desired in expected:
        rid = unique_id("device") + suffix
        device = provisioning_client(rid, derived_key(keys["primaryKey"], rid))
        device.provisioning_payload = {"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"}
        result = device.register()
        check(result.status == "assigned", f"{rid}: status {result.status!r}: {result}")
        check(result.registration_state.assigned_hub == hub, f"{rid}: assigned to {result.registration_state.assigned_hub!r}, want {hub!r}")
        rm = common.registry_manager(hub)
        twin = rm.get_twin(rid)
        check(twin.tags == tags, f"{rid}: twin tags {twin.tags!r}")
        got = {k: v for k, v in twin.properties.desired.items() if not k.startswith("$")}
        check(got == desired, f"{rid}: desired {got!r}")
        rm.delete_device(rid)
    stranger = unique_id("elevator1") + "-contoso-elvtr-001"
    register_expecting_failure(stranger, derived_key(keys["primaryKey"], stranger), "unknown suffix (the allocator answers 400)")
    state = call("the stranger's registration state", client.device_registration_state.get, stranger)
    check(state.get("errorCode") == 400207, f"the unknown device's state: {state}")
    check("Unrecognized device registration." in (state.get("errorMessage") or ""), f"the allocator's message: {state}")

# ---------------------------------------------------------------------------
# Device side with the official Node.js SDK: AMQP, AMQP over WebSockets, MQTT, MQTT over WebSockets
# ---------------------------------------------------------------------------

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
NODE_TRANSPORTS = ("amqp", "amqp-ws", "mqtt", "mqtt-ws", "https")


def require_node():
    """node.sh (run by run.sh) installs the pinned SDK into node/node_modules when Node.js is here;
    without Node.js the Node scenarios are skipped, except in CI, where node.sh stops the run."""
    import shutil

    if shutil.which("node") is None or not os.path.isdir(os.path.join(NODE_DIR, "node_modules")):
        raise Skipped("Node.js or the pinned Node SDK (conformance/node.sh) is not installed here")


def node_register(transport, registration_id, *, key=None, cert_file=None, key_file=None, payload=None):
    """One registration by node/register.js (ProvisioningDeviceClient of azure-iot-provisioning-device
    with the transport's official package), which dials the suite's host name: amqps://host (5671),
    wss://host:443, mqtts://host:8883. Returns what it printed: {"ok": true, "ms", "result"} or
    {"ok": false, "ms", "name", "error", "condition", "description", "result"}."""
    require_node()
    if transport.endswith("-ws") or transport == "https":
        require_websockets()  # the SDK dials port 443
    spec = {"transport": transport, "host": common.service_hostname(), "address": common.suite_address(),
            "idScope": common.info()["idScope"], "registrationId": registration_id}
    if key is not None:
        spec["symmetricKey"] = key
    else:
        spec["certFile"], spec["keyFile"] = cert_file, key_file
    if payload is not None:
        spec["payload"] = payload
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=common.info()["caFile"])
    proc = subprocess.run(["node", os.path.join(NODE_DIR, "register.js"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=45, env=env, cwd=NODE_DIR)
    # The SDK's dependencies may print lines of their own; ours is the one that starts {"ok":
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"ok":')]
    check(proc.returncode == 0 and lines,
          f"node register.js over {transport} exited {proc.returncode}: {proc.stdout[-1000:]} {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def node_assigned(transport, rid, hub, device_id=None, **kwargs):
    """Registers with the Node SDK and checks the assignment; returns the registration result."""
    seen = node_register(transport, rid, **kwargs)
    check(seen["ok"], f"{rid} over {transport}: {seen}")
    result = seen["result"]
    check(result.get("status") == "assigned", f"{rid} over {transport}: {result}")
    check(result.get("assignedHub") == hub and result.get("deviceId") == (device_id or rid),
          f"{rid} over {transport}: assigned {result.get('assignedHub')!r} / {result.get('deviceId')!r}")
    out(f"  {transport}: {rid} assigned to {hub} in {seen['ms']} ms")
    return result


def node_fails_fast(transport, rid, what, **kwargs):
    """Registration must fail, well under 5 s (a registration that the service accepted and then
    failed takes one poll: the SDK waits the Retry-After the service sent); returns what the SDK
    reported."""
    seen = node_register(transport, rid, **kwargs)
    check(not seen["ok"], f"{what} over {transport}: registration did not fail: {seen}")
    check(seen["ms"] < 5000, f"{what} over {transport}: the SDK failed only after {seen['ms']} ms: {seen}")
    out(f"  {what} over {transport}: {seen.get('condition') or seen.get('name')} after {seen['ms']} ms")
    return seen


def dps_error_code(seen):
    """The DPS error code in a failure the Node SDK reported: in the rejected delivery's
    description (AMQP) or in the error's result (MQTT, and a failed registration)."""
    if seen.get("description"):
        return json.loads(seen["description"]).get("errorCode")
    result = seen.get("result") or {}
    return result.get("errorCode") or (result.get("registrationState") or {}).get("errorCode")


@scenario("node_group_device_with_payload_over_every_transport")
def node_every_transport(client, cleanup):
    """The Node SDK registers group devices (derived keys, a custom payload) over AMQP, MQTT, and,
    where the HTTPS listener holds 443, AMQP and MQTT over WebSockets and HTTPS; each lands on the
    hub with its key and the group's initial twin, in one round trip (no poll)."""
    require_node()
    group = unique_id("grp-node")
    cleanup.add(GROUP, group)
    body = {"enrollmentGroupId": group, "attestation": {"type": "symmetricKey"}, "iotHubs": [common.TOASTERS_HUB], "initialTwin": INITIAL_TWIN}
    call("create the group", client.enrollment_group.create_or_update, group, body)
    keys = call("group keys", client.enrollment_group.get_attestation_mechanism, group)["symmetricKey"]
    rm = common.registry_manager(common.TOASTERS_HUB)
    transports = NODE_TRANSPORTS if os.environ.get("CONFORMANCE_HTTPS_PORT") == "443" else ("amqp", "mqtt")
    for transport in transports:
        rid = unique_id(f"node-{transport}")
        key = derived_key(keys["primaryKey"], rid)
        with common.NoPolls(transport):
            result = node_assigned(transport, rid, common.TOASTERS_HUB, key=key,
                                   payload={"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"})
        check(result.get("substatus") == "initialAssignment", f"{rid}: substatus {result.get('substatus')!r}")
        check(rm.get_device(rid).authentication.symmetric_key.primary_key == key, f"{rid}: the hub identity carries the derived key")
        twin = rm.get_twin(rid)
        check(twin.tags == {"deviceType": "toaster"}, f"{rid}: twin tags {twin.tags!r}")
        state = call("the registration state", client.device_registration_state.get, rid)
        check(state.get("status") == "assigned", f"{rid}: registration state {state}")
        rm.delete_device(rid)
    if transports == ("amqp", "mqtt"):
        raise Skipped("AMQP and MQTT passed; the WebSocket transports and HTTPS need the HTTPS listener on 443 (run as root)")


@scenario("node_amqp_wrong_key_disabled_unknown_fail_fast")
def node_amqp_failures(client, cleanup):
    """Over AMQP the service rejects the request delivery with amqp:unauthorized-access and the DPS
    error JSON (401002); the Node SDK hands that error to the application at once."""
    require_node()
    keys = symmetric_group(client, cleanup, "grp-node-bad")
    rid = unique_id("node-dev")
    cases = [
        (rid, derived_key(keys["primaryKey"], rid + "x"), "wrong key"),
        (rid, keys["primaryKey"], "the group key itself"),
        (unique_id("node-stranger"), base64.b64encode(secrets.token_bytes(32)).decode(), "unknown device"),
    ]
    for transport in ("amqp", "amqp-ws") if os.environ.get("CONFORMANCE_HTTPS_PORT") == "443" else ("amqp",):
        for who, key, what in cases:
            seen = node_fails_fast(transport, who, what, key=key)
            check(seen.get("condition") == "amqp:unauthorized-access", f"{what} over {transport}: {seen}")
            check(dps_error_code(seen) == 401002, f"{what} over {transport}: {seen}")
    disabled = unique_id("node-off")
    cleanup.add(INDIVIDUAL, disabled)
    call("create a disabled enrollment", client.enrollment.create_or_update, disabled,
         {"registrationId": disabled, "attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"})
    off_key = call("its keys", client.enrollment.get_attestation_mechanism, disabled)["symmetricKey"]["primaryKey"]
    seen = node_fails_fast("amqp", disabled, "disabled enrollment", key=off_key)
    state = call("the disabled device's registration state", client.device_registration_state.get, disabled)
    check(state.get("status") == "disabled", f"the disabled device's registration state: {state}")
    # Its key was right: the registration was accepted and ended `disabled`, which the SDK reports.
    check((seen.get("result") or {}).get("status") == "disabled", f"disabled enrollment: {seen}")


@scenario("node_amqp_tutorial_devices_through_the_contoso_allocator")
def node_amqp_tutorial(client, cleanup):
    """The tutorial's custom allocation with the Node SDK over AMQP (the transport the C# samples
    use by default): the allocator routes by suffix and sets each twin; an unknown suffix fails
    with 400207, which the SDK reports as a failed registration."""
    require_node()
    keys = tutorial_group(client, cleanup)
    payload = {"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"}
    for suffix, hub, tags in (("-contoso-tstrsd-007", common.TOASTERS_HUB, {"deviceType": "toaster"}),
                              ("-contoso-hpsd-088", common.HEATPUMPS_HUB, {"deviceType": "heatpump"})):
        rid = unique_id("device") + suffix
        node_assigned("amqp", rid, hub, key=derived_key(keys["primaryKey"], rid), payload=payload)
        rm = common.registry_manager(hub)
        check(rm.get_twin(rid).tags == tags, f"{rid}: twin tags {rm.get_twin(rid).tags!r}")
        rm.delete_device(rid)
    stranger = unique_id("elevator1") + "-contoso-elvtr-001"
    seen = node_fails_fast("amqp", stranger, "unknown suffix (the allocator answers 400)", key=derived_key(keys["primaryKey"], stranger), payload=payload)
    check(seen.get("result", {}).get("status") == "failed" and dps_error_code(seen) == 400207, f"the unknown device: {seen}")


@scenario("node_amqp_x509_individual_and_group_devices")
def node_amqp_x509(client, cleanup):
    """X.509 with the Node SDK (X509Security): over AMQP the device's certificate is its TLS client
    certificate and no SASL is used; over AMQP over WebSockets the same certificate goes on the
    WebSocket's TLS connection. A self-signed individual enrollment, and two devices of a group on
    an intermediate."""
    require_node()
    solo, first, second = unique_id("node-x509-solo"), unique_id("node-x509-a"), unique_id("node-x509-b")
    group, ca_name = unique_id("node-x509-grp"), unique_id("node-root")
    with tempfile.TemporaryDirectory() as d:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", "solo.key", "-out", "solo.pem", "-days", "30", "-subj", f"/CN={solo}", cwd=d)
        cleanup.add(INDIVIDUAL, solo)
        pem = open(os.path.join(d, "solo.pem")).read()
        call("create the x509 enrollment", client.enrollment.create_or_update, solo,
             {"registrationId": solo, "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
              "iotHubs": [common.HEATPUMPS_HUB]})
        node_assigned("amqp", solo, common.HEATPUMPS_HUB, cert_file=os.path.join(d, "solo.pem"), key_file=os.path.join(d, "solo.key"))
        check(common.registry_manager(common.HEATPUMPS_HUB).get_device(solo).authentication.type == "selfSigned", f"{solo}: not selfSigned on the hub")

        openssl_chain(d, [first, second])
        intermediate = open(os.path.join(d, "intermediate.pem")).read()
        upload_and_verify_root(d, ca_name)
        cleanup.add(GROUP, group)
        call("create the x509 group", client.enrollment_group.create_or_update, group,
             {"enrollmentGroupId": group, "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": intermediate}}}},
              "iotHubs": [common.TOASTERS_HUB]})
        ws = os.environ.get("CONFORMANCE_HTTPS_PORT") == "443"
        for rid, transport in ((first, "amqp"), (second, "amqp-ws" if ws else "amqp")):
            node_assigned(transport, rid, common.TOASTERS_HUB, cert_file=os.path.join(d, f"{rid}-chain.pem"), key_file=os.path.join(d, f"{rid}.key"))
            # Azure DPS gives every X.509 device a thumbprint identity, CA-issued or not.
            check(common.registry_manager(common.TOASTERS_HUB).get_device(rid).authentication.type == "selfSigned",
                  f"{rid}: not selfSigned on the hub")
        # The intermediate alone does not make a self-signed certificate of the same name valid.
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", "forged.key", "-out", "forged.pem", "-days", "30", "-subj", f"/CN={first}", cwd=d)
        seen = node_fails_fast("amqp", first, "a self-signed certificate with a group device's name",
                               cert_file=os.path.join(d, "forged.pem"), key_file=os.path.join(d, "forged.key"))
        check(seen.get("condition") == "amqp:unauthorized-access" and dps_error_code(seen) == 401002, f"the forged certificate: {seen}")
    for hub, rid in ((common.HEATPUMPS_HUB, solo), (common.TOASTERS_HUB, first), (common.TOASTERS_HUB, second)):
        common.registry_manager(hub).delete_device(rid)
    common.service_request("DELETE", f"/certificates/{ca_name}")
    if not ws:
        raise Skipped("AMQP passed; AMQP over WebSockets needs the HTTPS listener on 443 (run as root)")


# ---------------------------------------------------------------------------


class Skipped(Exception):
    """The scenario cannot run on this machine (said why); exit status 3."""


def main(argv):
    if len(argv) == 2 and argv[1] == "--list":
        for name in SCENARIOS:
            print(name)
        return 0
    if len(argv) != 2 or argv[1] not in SCENARIOS:
        print(f"usage: {argv[0]} --list | NAME\nscenarios: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    name = argv[1]
    cleanup = Cleanup()
    client = None
    try:
        client = make_client()
        SCENARIOS[name](client, cleanup)
        return 0
    except Skipped as e:
        out(f"SKIP: {e}")
        return 3
    except Exception as e:  # noqa: BLE001 - every failure becomes a report
        if not isinstance(e, common.ScenarioFailure):
            # Only the frames of the scenario code: where in the scenario it broke.
            here = os.path.dirname(os.path.abspath(__file__))
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(here)]
            out("  Traceback (scenario frames only):\n" + "".join(traceback.format_list(frames)).rstrip())
        log = common.http_log()
        if log:
            out("  HTTP exchanges:\n" + log.rstrip())
        reason = str(e) if isinstance(e, common.ScenarioFailure) else f"{type(e).__name__}: {e}"
        out("REASON: " + " ".join(reason.split()))
        return 1
    finally:
        if client is not None:
            cleanup.run(client)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
