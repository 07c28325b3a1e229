"""Drives minihub's device side with the official Python device client (azure-iot-device 2.14.0),
checking each step through the registry client (azure-iot-hub 2.7.0).

Start the dev server first (it listens for MQTT on 127.0.0.1:8883, where the device SDK connects),
then run with its CA and connection string:

    cargo run -p minihub --example serve -- localhost 18443
    REQUESTS_CA_BUNDLE=<ca file> timeout 60 .venv-conformance/bin/python \
        crates/minihub/examples/device_roundtrip.py '<connection string>' <ca file>

Exits non-zero at the first step that does not behave like IoT Hub.
"""

import json
import logging
import os
import sys
import threading
import uuid

import requests
from azure.iot.device import IoTHubDeviceClient, Message
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import Twin, TwinProperties
from azure.iot.hub.auth import ConnectionStringAuthentication


def step(name, value=None):
    print(f"ok  {name}" + (f": {value}" if value is not None else ""), flush=True)


def main(connection_string, ca_file):
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("MQTT_DEBUG"):
        logging.getLogger("azure.iot.device.common.mqtt_transport").setLevel(logging.INFO)
    registry = IoTHubRegistryManager.from_connection_string(connection_string)
    fields = dict(p.split("=", 1) for p in connection_string.split(";"))
    host_with_port = fields["HostName"]
    hub = host_with_port.split(":")[0]
    device_id = f"py-{uuid.uuid4().hex[:8]}"
    created = registry.create_device_with_sas(device_id, "", "", "enabled")
    key = created.authentication.symmetric_key.primary_key
    step("create_device_with_sas", device_id)

    with open(ca_file) as f:
        ca_pem = f.read()
    client = IoTHubDeviceClient.create_from_connection_string(
        f"HostName={hub};DeviceId={device_id};SharedAccessKey={key};GatewayHostName=localhost",
        server_verification_cert=ca_pem,
    )
    desired_received = []
    got_desired = threading.Event()

    def on_desired(patch):
        # The SDK also reports the desired properties it finds in its own twin GET at connect
        # ($version 1 here) as a patch; wait for the service's change.
        desired_received.append(patch)
        if patch.get("$version", 0) >= 2:
            got_desired.set()

    client.on_twin_desired_properties_patch_received = on_desired
    client.connect()
    step("connect")

    twin = client.get_twin()
    assert twin["desired"]["$version"] == 1 and twin["reported"]["$version"] == 1, twin
    step("get_twin", json.dumps(twin))

    client.patch_twin_reported_properties({"firmware": "1.2.3", "net": {"rssi": -61}})
    step("patch_twin_reported_properties")
    service_twin = registry.get_twin(device_id)
    reported = service_twin.properties.reported
    assert reported["firmware"] == "1.2.3" and reported["net"]["rssi"] == -61, reported
    step("registry get_twin shows reported", f"$version={reported['$version']}")

    registry.update_twin(
        device_id,
        Twin(properties=TwinProperties(desired={"mode": "eco", "interval": 30})),
        service_twin.etag,
    )
    assert got_desired.wait(10), "no desired-property patch arrived"
    patch = desired_received[-1]
    assert patch["mode"] == "eco" and patch["interval"] == 30 and patch["$version"] == 2, patch
    step("on_twin_desired_properties_patch_received", json.dumps(desired_received))

    twin = client.get_twin()
    assert twin["desired"]["mode"] == "eco" and twin["reported"]["firmware"] == "1.2.3", twin
    step("get_twin again", json.dumps(twin))

    message = Message(json.dumps({"temperature": 21.5}))
    message.content_type = "application/json"
    message.content_encoding = "utf-8"
    message.custom_properties["alert"] = "no"
    client.send_message(message)
    step("send_message")

    # The recorded telemetry, through the opendps extension GET /devices/{id}/messages/events.
    auth = ConnectionStringAuthentication(connection_string)
    token = auth.signed_session().headers["Authorization"]
    response = requests.get(
        f"https://{host_with_port}/devices/{device_id}/messages/events?api-version=2021-04-12",
        headers={"Authorization": token},
        verify=ca_file,
        timeout=10,
    )
    response.raise_for_status()
    messages = response.json()
    assert len(messages) == 1 and json.loads(messages[0]["body"]) == {"temperature": 21.5}, messages
    assert messages[0]["properties"] == {"alert": "no"}, messages
    step("telemetry recorded", json.dumps(messages[0]))

    client.shutdown()
    step("shutdown")
    registry.delete_device(device_id)
    step("delete_device")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
