"""Drives minihub with the official Python registry client (azure-iot-hub 2.7.0).

Start the dev server first, then run with its CA and connection string:

    cargo run -p minihub --example serve -- localhost 18443
    REQUESTS_CA_BUNDLE=<ca file> .venv-conformance/bin/python \
        crates/minihub/examples/registry_roundtrip.py '<connection string>'

Exits non-zero at the first step that does not behave like IoT Hub.
"""

import sys
import uuid

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError


def step(name, value=None):
    print(f"ok  {name}" + (f": {value}" if value is not None else ""))


def main(connection_string):
    registry = IoTHubRegistryManager.from_connection_string(connection_string)
    device_id = f"py-{uuid.uuid4().hex[:8]}"

    created = registry.create_device_with_sas(device_id, "", "", "enabled")
    keys = created.authentication.symmetric_key
    assert keys.primary_key and keys.secondary_key, "keys were not generated"
    assert keys.primary_key != keys.secondary_key
    step("create_device_with_sas (generated keys)", f"{device_id} etag={created.etag}")

    fetched = registry.get_device(device_id)
    assert fetched.etag == created.etag
    assert fetched.authentication.symmetric_key.primary_key == keys.primary_key
    assert fetched.status == "enabled" and fetched.connection_state == "Disconnected"
    step("get_device", f"generationId={fetched.generation_id}")

    updated = registry.update_device_with_sas(
        device_id, fetched.etag, keys.primary_key, keys.secondary_key, "disabled"
    )
    assert updated.status == "disabled" and updated.etag != fetched.etag
    step("update_device_with_sas with the etag", f"status={updated.status}")
    try:
        registry.update_device_with_sas(
            device_id, fetched.etag, keys.primary_key, keys.secondary_key, "enabled"
        )
        raise AssertionError("a stale etag was accepted")
    except HttpOperationError as err:
        assert err.response.status_code == 412, err.response.status_code
        step("update_device_with_sas with a stale etag", "412")

    twin = registry.get_twin(device_id)
    assert twin.device_id == device_id and twin.version == 1
    step("get_twin", f"etag={twin.etag} version={twin.version}")

    patch = Twin(
        tags={"site": "north", "rack": {"row": 3}},
        properties=TwinProperties(desired={"mode": "eco", "limits": {"lo": 1}}),
    )
    patched = registry.update_twin(device_id, patch, twin.etag)
    assert patched.tags == {"site": "north", "rack": {"row": 3}}, patched.tags
    assert patched.properties.desired["mode"] == "eco"
    assert patched.properties.desired["$version"] == 2
    step("update_twin", f"version={patched.version} desired={patched.properties.desired}")

    replacement = Twin(tags={"owner": "ops"}, properties=TwinProperties(desired={"fan": 2}))
    replaced = registry.replace_twin(device_id, replacement)
    assert replaced.tags == {"owner": "ops"}, replaced.tags
    assert "mode" not in replaced.properties.desired
    assert replaced.properties.desired["fan"] == 2
    step("replace_twin", f"version={replaced.version} tags={replaced.tags}")

    result = registry.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"))
    ids = [item.device_id for item in result.items]
    assert device_id in ids, ids
    step("query_iot_hub", f"type={result.type} items={len(result.items)}")

    one = registry.query_iot_hub(
        QuerySpecification(query=f"SELECT * FROM devices WHERE deviceId = '{device_id}'"),
        None,
        1,
    )
    assert [i.device_id for i in one.items] == [device_id]
    step("query_iot_hub with WHERE and max_item_count", one.continuation_token)

    registry.delete_device(device_id)
    step("delete_device")
    try:
        registry.get_device(device_id)
        raise AssertionError("the device is still there")
    except HttpOperationError as err:
        assert err.response.status_code == 404, err.response.status_code
        step("get_device after delete", f"404 {err.response.headers.get('iothub-errorcode')}")

    print("registry round trip passed")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
