//! Linked hubs that answer as Azure IoT Hub does where minihub alone would not: a scripted hub
//! (minihub behind HTTPS with scripted answers) for policies without a right, throttling with
//! `Retry-After`, a Basic-tier hub and an identity an operator changed; and the in-process minihub,
//! which requires the same rights.

use std::time::{Duration, Instant};

use dps_core::sas::{derive_device_key, generate_key, generate_token};
use dps_testkit::{Body, HubAnswer, ScriptedHub, TestServer, far_future};
use reqwest::Method;
use serde_json::{Value, json};

/// A server, and a scripted hub whose certificate the server trusts.
async fn server_and_hub() -> (TestServer, ScriptedHub) {
    let server = crate::server().await;
    let hub = ScriptedHub::start(server.data_dir())
        .await
        .expect("scripted hub");
    (server, hub)
}

async fn link(server: &TestServer, connection_string: &str) -> dps_testkit::Reply {
    server
        .api()
        .expect("client")
        .post(
            "/linkedHubs",
            json!({"connectionString": connection_string}),
        )
        .await
        .expect("link")
}

/// Creates enrollment group `group` with `key` over all linked hubs, with `extra` fields.
async fn group(server: &TestServer, group: &str, key: &str, extra: Value) {
    let mut body = json!({
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let reply = server
        .api()
        .expect("client")
        .put(&format!("/enrollmentGroups/{group}"), body, None)
        .await
        .expect("group");
    assert_eq!(reply.status, 200, "{reply:?}");
}

/// Registers `rid` with its key derived from `group_key` and polls to the end.
async fn register(server: &TestServer, rid: &str, group_key: &str) -> Value {
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    let key = derive_device_key(group_key, rid).expect("derive");
    let token = generate_token(
        &format!("{scope}/registrations/{rid}"),
        &key,
        Some("registration"),
        far_future(),
    )
    .expect("token");
    let device = server.api().expect("client").with_auth(Some(token));
    let accepted = device
        .send(
            Method::PUT,
            &format!("/{scope}/registrations/{rid}/register"),
            &[],
            Some(Body::Json(json!({"registrationId": rid}))),
        )
        .await
        .expect("register");
    assert_eq!(accepted.status, 202, "{accepted:?}");
    let op = accepted.body["operationId"]
        .as_str()
        .expect("op")
        .to_owned();
    crate::poll_until_done(&device, &scope, rid, &op, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_without_a_right_dps_needs_cannot_be_linked() {
    let (server, hub) = server_and_hub().await;
    let refused = link(
        &server,
        &hub.connection_string("registryReadWrite").expect("cs"),
    )
    .await;
    crate::assert_error(&refused, 400);
    let message = refused.body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("'registryReadWrite'") && message.contains("ServiceConnect"),
        "the message names the policy and the missing right: {message}"
    );
    let refused = link(&server, &hub.connection_string("service").expect("cs")).await;
    crate::assert_error(&refused, 400);
    let message = refused.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("RegistryWrite"), "{message}");

    // A wrong key is told apart from a missing right.
    let wrong_key = format!(
        "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        hub.host_name(),
        generate_key()
    );
    let refused = link(&server, &wrong_key).await;
    crate::assert_error(&refused, 400);
    let message = refused.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("refused the key"), "{message}");

    let linked = link(&server, &hub.connection_string("iothubowner").expect("cs")).await;
    assert_eq!(linked.status, 200, "{linked:?}");
    // The check changed nothing on the hub: it only touched a device that does not exist.
    assert!(
        hub.minihub()
            .list_devices(hub.hub(), None)
            .await
            .expect("devices")
            .is_empty()
    );
    assert!(
        hub.requests()
            .iter()
            .all(|r| r.ends_with(" 404") || r.ends_with(" 401")),
        "{:?}",
        hub.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_hub_requires_the_same_rights() {
    let hub_name = "contoso-strict-hub.azure-devices.net";
    let (server, _) = crate::server_with_hub(hub_name).await;
    let hubs = minihub::Minihub::read_hubs(&server.data_dir().join("minihub.db")).expect("hubs");
    let policy = hubs
        .iter()
        .find(|h| h.host_name == hub_name)
        .and_then(|h| h.policy("registryReadWrite"))
        .expect("the built-in registryReadWrite policy")
        .clone();
    let refused = link(&server, &policy.connection_string(hub_name)).await;
    crate::assert_error(&refused, 400);
    let message = refused.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("ServiceConnect"), "{message}");

    // Over its REST API too: twins need ServiceConnect, the registry does not.
    let token = generate_token(
        hub_name,
        policy.primary_key.expose(),
        Some("registryReadWrite"),
        far_future(),
    )
    .expect("token");
    let api = server
        .client_for(hub_name)
        .expect("client")
        .with_auth(Some(token));
    let twin = api
        .get("/twins/nobody?api-version=2021-04-12")
        .await
        .expect("twin");
    assert_eq!(twin.status, 401, "{twin:?}");
    let device = api
        .get("/devices/nobody?api-version=2021-04-12")
        .await
        .expect("device");
    assert_eq!(device.status, 404, "{device:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_hub_is_waited_for_and_counted() {
    let (server, hub) = server_and_hub().await;
    assert_eq!(
        link(&server, &hub.connection_string("iothubowner").expect("cs"))
            .await
            .status,
        200
    );
    let key = generate_key();
    group(&server, "burst", &key, json!({})).await;
    // The hub throttles the next two calls and asks for a second each time.
    hub.answer(HubAnswer::throttled(2, 1));
    let started = Instant::now();
    let done = register(&server, "throttled-device", &key).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the hub asked for a second twice; retried after {:?}",
        started.elapsed()
    );
    let requests = hub.requests();
    let throttled = requests.iter().filter(|r| r.ends_with(" 429")).count();
    assert_eq!(throttled, 2, "{requests:?}");
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("PUT /devices/throttled-device ") && r.ends_with(" 200")),
        "{requests:?}"
    );
    let text = crate::metrics_text(&server).await;
    let line = format!(
        "opendps_hub_throttled_total{{hub=\"{}\",status=\"429\"}} 2",
        hub.host_name()
    );
    assert!(text.contains(&line), "no '{line}' in\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_hub_fails_the_registration_at_once() {
    let (server, hub) = server_and_hub().await;
    assert_eq!(
        link(&server, &hub.connection_string("iothubowner").expect("cs"))
            .await
            .status,
        200
    );
    let key = generate_key();
    group(&server, "refused", &key, json!({})).await;
    // As if the policy lost a right after it was linked.
    hub.answer(HubAnswer {
        method: None,
        path_prefix: "/devices/".into(),
        status: 401,
        body:
            r#"{"Message":"ErrorCode:IotHubUnauthorizedAccess;Unauthorized","ExceptionMessage":""}"#
                .into(),
        headers: Vec::new(),
        times: None,
    });
    let started = Instant::now();
    let done = register(&server, "refused-device", &key).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["registrationState"]["errorCode"], 500_002, "{done}");
    let message = done["registrationState"]["errorMessage"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("HTTP 401") && message.contains("ServiceConnect"),
        "{message}"
    );
    let calls: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.contains("refused-device"))
        .collect();
    assert_eq!(
        calls,
        ["PUT /devices/refused-device 401"],
        "no retry of a 401"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_basic_tier_hub_is_detected_and_a_twin_is_refused_with_a_clear_error() {
    let (server, hub) = server_and_hub().await;
    hub.answer(HubAnswer::basic_tier());
    assert_eq!(
        link(&server, &hub.connection_string("iothubowner").expect("cs"))
            .await
            .status,
        200
    );
    let key = generate_key();
    group(
        &server,
        "twinned",
        &key,
        json!({"initialTwin": {"tags": {"deviceType": "toaster"}}}),
    )
    .await;
    let done = register(&server, "needs-a-twin", &key).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["registrationState"]["errorCode"], 400_301, "{done}");
    let message = done["registrationState"]["errorMessage"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("Basic-tier"), "{message}");

    let plain = generate_key();
    group(&server, "plain", &plain, json!({})).await;
    let done = register(&server, "no-twin", &plain).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let twin_calls: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.contains("/twins/") && !r.contains("opendps-link-check"))
        .collect();
    assert!(twin_calls.is_empty(), "{twin_calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registration_keeps_what_the_operator_set_on_the_hub() {
    let (server, hub) = server_and_hub().await;
    assert_eq!(
        link(&server, &hub.connection_string("iothubowner").expect("cs"))
            .await
            .status,
        200
    );
    let key = generate_key();
    group(&server, "fleet", &key, json!({})).await;
    // The device exists on the hub already: behind an IoT Edge gateway, disabled by an operator.
    let existing: minihub::DeviceRequest = serde_json::from_value(json!({
        "deviceId": "leaf-1",
        "status": "disabled",
        "statusReason": "stolen",
        "deviceScope": "ms-azure-iot-edge://gateway-1-638000000000000000",
        "parentScopes": ["ms-azure-iot-edge://gateway-1-638000000000000000"],
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": generate_key(), "secondaryKey": generate_key()}},
    }))
    .expect("request");
    hub.minihub()
        .put_device(hub.hub(), "leaf-1", existing, minihub::IfMatch::Absent)
        .await
        .expect("device");

    let done = register(&server, "leaf-1", &key).await;
    assert_eq!(done["status"], "assigned", "{done}");
    let device = hub
        .minihub()
        .get_device(hub.hub(), "leaf-1")
        .await
        .expect("read")
        .expect("device");
    let derived = derive_device_key(&key, "leaf-1").expect("derive");
    assert_eq!(
        device
            .authentication
            .symmetric_key
            .primary_key
            .as_ref()
            .map(|k| k.expose().to_owned()),
        Some(derived),
        "the keys are DPS's"
    );
    assert_eq!(
        device.status,
        minihub::DeviceStatus::Disabled,
        "the operator's status stays"
    );
    assert_eq!(device.status_reason.as_deref(), Some("stolen"));
    assert_eq!(
        device.device_scope.as_deref(),
        Some("ms-azure-iot-edge://gateway-1-638000000000000000")
    );
    assert_eq!(device.parent_scopes.len(), 1);
    let updates: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PUT /devices/leaf-1 "))
        .collect();
    assert_eq!(
        updates,
        ["PUT /devices/leaf-1 409", "PUT /devices/leaf-1 200"]
    );

    // Nothing DPS owns changed: the second registration reads the identity and writes nothing.
    let again = register(&server, "leaf-1", &key).await;
    assert_eq!(again["status"], "assigned", "{again}");
    let updates = hub
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PUT /devices/leaf-1 "))
        .count();
    assert_eq!(updates, 3, "only the create attempt: {:?}", hub.requests());
}
