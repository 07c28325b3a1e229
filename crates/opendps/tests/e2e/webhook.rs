//! Custom allocation end to end: a real HTTP webhook, devices registering over HTTPS, and one test
//! per row of the tutorial's troubleshooting table, plus a webhook that never answers and one that
//! answers garbage.

use std::path::Path;
use std::time::{Duration, Instant};

use dps_core::sas::{derive_device_key, generate_token};
use dps_testkit::{Body, Reply, ServiceApi, TestServer, WebhookServer, far_future};
use reqwest::Method;
use serde_json::{Value, json};

const GROUP_KEY: &str =
    "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==";
const TOASTERS: &str = "contoso-toasters-hub-1.azure-devices.net";
const HEATPUMPS: &str = "contoso-heatpumps-hub-1.azure-devices.net";

struct Setup {
    server: TestServer,
    webhook: WebhookServer,
    _config: tempfile::TempDir,
}

/// opendps with two in-process hubs, fast webhook retries (2, 100 ms apart), a 1 s webhook
/// timeout and register requests waiting at most 300 ms for their answer, and the tutorial's group
/// pointing at a scripted webhook.
async fn setup() -> Setup {
    let webhook = WebhookServer::start().await.expect("webhook");
    let config = tempfile::tempdir().expect("tempdir");
    let file = config.path().join("opendps.toml");
    std::fs::write(
        &file,
        "[provisioning]\nwebhook_timeout_ms = 1000\nwebhook_retries = 2\nwebhook_first_retry_ms = 100\nwebhook_retry_increment_ms = 100\nanswer_within_ms = 300\n",
    )
    .expect("config");
    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let file = file.to_string_lossy().into_owned();
    let server = TestServer::start_with(
        bin,
        &["--config", &file, "--hub", TOASTERS, "--hub", HEATPUMPS],
    )
    .await
    .expect("start");
    let group = json!({
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
        "allocationPolicy": "custom",
        "iotHubs": [TOASTERS, HEATPUMPS],
        "customAllocationDefinition": {"webhookUrl": webhook.url(), "apiVersion": "2021-10-01"},
    });
    let reply = server
        .api()
        .expect("client")
        .put(
            "/enrollmentGroups/contoso-custom-allocated-devices",
            group,
            None,
        )
        .await
        .expect("group");
    assert_eq!(reply.status, 200, "{reply:?}");
    Setup {
        server,
        webhook,
        _config: config,
    }
}

/// Registers with the tutorial's payload and polls to the end.
async fn register(setup: &Setup, rid: &str, key: &str) -> Value {
    let (device, scope, accepted) = send_register(setup, rid, key).await;
    let op = accepted.body["operationId"]
        .as_str()
        .expect("op")
        .to_owned();
    crate::poll_until_done(&device, &scope, rid, &op, Duration::from_secs(30)).await
}

/// Sends the register request with the tutorial's payload: the device's client, the ID scope, and
/// the answer (202).
async fn send_register(setup: &Setup, rid: &str, key: &str) -> (ServiceApi, String, Reply) {
    let scope = setup.server.info["idScope"]
        .as_str()
        .expect("scope")
        .to_owned();
    let token = generate_token(
        &format!("{scope}/registrations/{rid}"),
        key,
        Some("registration"),
        far_future(),
    )
    .expect("token");
    let device = setup.server.api().expect("client").with_auth(Some(token));
    let body = json!({"registrationId": rid, "payload": {"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"}});
    let accepted = device
        .send(
            Method::PUT,
            &format!("/{scope}/registrations/{rid}/register"),
            &[],
            Some(Body::Json(body)),
        )
        .await
        .expect("register");
    assert_eq!(accepted.status, 202, "{accepted:?}");
    (device, scope, accepted)
}

/// A webhook slower than the register request's wait: the request answers `assigning` with
/// Retry-After, as without waiting, and the device polls the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_slower_than_the_wait_is_answered_assigning() {
    let s = setup().await;
    s.webhook.answer_after(
        200,
        &json!({"iotHubHostName": TOASTERS}).to_string(),
        Duration::from_millis(700),
    );
    let (rid, key) = toaster();
    let (device, scope, accepted) = send_register(&s, rid, &key).await;
    assert_eq!(accepted.body["status"], "assigning", "{accepted:?}");
    assert!(accepted.header("retry-after").is_some(), "{accepted:?}");
    let op = accepted.body["operationId"].as_str().expect("op");
    let done = crate::poll_until_done(&device, &scope, rid, op, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(done["registrationState"]["assignedHub"], TOASTERS);

    // Quick again: the next registration of the device is answered with its result.
    s.webhook
        .answer(200, &json!({"iotHubHostName": TOASTERS}).to_string());
    let (_, _, answered) = send_register(&s, rid, &key).await;
    assert_eq!(answered.body["status"], "assigned", "{answered:?}");
    assert!(answered.header("retry-after").is_none(), "{answered:?}");
}

fn toaster() -> (&'static str, String) {
    let rid = "breakroom499-contoso-tstrsd-007";
    (rid, derive_device_key(GROUP_KEY, rid).expect("derive"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_with_the_webhook_twin_and_the_payload_round_trip() {
    let s = setup().await;
    s.webhook.answer(
        200,
        &json!({
            "iotHubHostName": TOASTERS,
            "initialTwin": {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready", "darknessSetting": "medium"}}},
            "payload": {"welcome": "toaster"},
        })
        .to_string(),
    );
    let (rid, key) = toaster();
    let done = register(&s, rid, &key).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(done["registrationState"]["assignedHub"], TOASTERS);
    assert_eq!(
        done["registrationState"]["payload"],
        json!({"welcome": "toaster"}),
        "the webhook's payload reaches the device"
    );

    let request = s.webhook.received().pop().expect("the webhook was called");
    assert_eq!(
        request["deviceRuntimeContext"]["payload"]["MyDeviceFirmwareVersion"], "12.0.2.5",
        "the device's payload reaches the webhook"
    );
    assert_eq!(request["deviceRuntimeContext"]["registrationId"], rid);
    assert_eq!(
        request["enrollmentGroup"]["enrollmentGroupId"],
        "contoso-custom-allocated-devices"
    );
    assert_eq!(
        request["enrollmentGroup"]["attestation"],
        json!({"type": "symmetricKey"}),
        "no keys"
    );
    assert_eq!(request["linkedHubs"], json!([TOASTERS, HEATPUMPS]));

    let twin = s
        .server
        .hub_api(TOASTERS)
        .expect("hub")
        .get(&format!("/twins/{rid}"))
        .await
        .expect("twin");
    assert_eq!(twin.body["tags"]["deviceType"], "toaster");
    assert_eq!(
        twin.body["properties"]["desired"]["darknessSetting"],
        "medium"
    );
    assert!(
        !s.server.log().contains("function-key-s3cret"),
        "the function key is never logged"
    );
}

async fn failed_with(answers: &[(u16, &str)], code: u64) -> Value {
    let s = setup().await;
    for (status, body) in answers {
        s.webhook.answer(*status, body);
    }
    let (rid, key) = toaster();
    let done = register(&s, rid, &key).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["registrationState"]["errorCode"], code, "{done}");
    assert!(
        !s.server.log().contains("function-key-s3cret"),
        "the function key is never logged"
    );
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_or_null_hub_is_400208() {
    failed_with(&[(200, r#"{"iotHubHostName":""}"#)], 400_208).await;
    failed_with(&[(200, r#"{"iotHubHostName":null}"#)], 400_208).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_is_400209() {
    failed_with(&[(401, "")], 400_209).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_statuses_and_garbage_are_400207_with_the_cause() {
    let done = failed_with(&[(400, "Unrecognized device registration.")], 400_207).await;
    let message = done["registrationState"]["errorMessage"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("400") && message.contains("Unrecognized device registration."),
        "{message}"
    );
    failed_with(&[(200, "this is not JSON")], 400_207).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_is_400207() {
    let s = setup().await;
    s.webhook.answer_after(
        200,
        &json!({"iotHubHostName": TOASTERS}).to_string(),
        Duration::from_secs(5),
    );
    let (rid, key) = toaster();
    let started = Instant::now();
    let done = register(&s, rid, &key).await;
    assert_eq!(done["registrationState"]["errorCode"], 400_207, "{done}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the configured 1 s timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_then_assigned_or_400207() {
    let s = setup().await;
    s.webhook.answer(429, "slow down");
    s.webhook.answer(429, "slow down");
    s.webhook
        .answer(200, &json!({"iotHubHostName": HEATPUMPS}).to_string());
    let (rid, key) = toaster();
    let done = register(&s, rid, &key).await;
    assert_eq!(
        done["status"], "assigned",
        "assigned after two retries: {done}"
    );
    assert_eq!(done["registrationState"]["assignedHub"], HEATPUMPS);
    assert_eq!(s.webhook.received().len(), 3);

    // The allocation trace shows every call and the decision, without the function key.
    let trace = s
        .server
        .api()
        .expect("client")
        .get(&format!("/registrations/{rid}/trace"))
        .await
        .expect("trace");
    assert_eq!(trace.status, 200, "{trace:?}");
    let statuses: Vec<u64> = trace.body["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["status"].as_u64())
        .collect();
    assert_eq!(statuses, [429, 429, 200], "{}", trace.body);
    assert!(
        trace.body["attempts"][0]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("slow down")
    );
    assert_eq!(trace.body["decision"]["assignedHub"], HEATPUMPS);
    assert_eq!(
        trace.body["request"]["deviceRuntimeContext"]["registrationId"],
        rid
    );
    assert!(
        trace.body["webhookUrl"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/api/alloc")
    );
    assert!(
        !trace.body.to_string().contains("function-key-s3cret"),
        "no secrets in the trace"
    );
    assert!(
        !trace.body.to_string().contains(GROUP_KEY),
        "no keys in the trace"
    );
    let out = s
        .server
        .cli(&["registration", "show", "--registration-id", rid, "--trace"])
        .expect("cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"decision\"") && stdout.contains("429"),
        "{stdout}"
    );

    let done = failed_with(&[(500, "down")], 400_207).await;
    assert!(
        done["registrationState"]["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_individual_enrollment_is_disabled() {
    let s = setup().await;
    s.webhook
        .answer(200, &json!({"iotHubHostName": TOASTERS}).to_string());
    let (rid, key) = toaster();
    let enrollment = json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}, "provisioningStatus": "disabled"});
    assert_eq!(
        s.server
            .api()
            .expect("client")
            .put(&format!("/enrollments/{rid}"), enrollment, None)
            .await
            .expect("put")
            .status,
        200
    );
    let done = register(&s, rid, &key).await;
    assert_eq!(done["status"], "disabled", "{done}");
    assert!(
        s.webhook.received().is_empty(),
        "a disabled device never reaches the webhook"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_schedule_survives_a_crash() {
    let webhook = WebhookServer::start().await.expect("webhook");
    let config = tempfile::tempdir().expect("tempdir");
    let file = config.path().join("opendps.toml");
    // Retries 3 s apart: long enough to kill the server while one is scheduled.
    std::fs::write(&file, "[provisioning]\nwebhook_retries = 3\nwebhook_first_retry_ms = 3000\nwebhook_retry_increment_ms = 0\n").expect("config");
    let file = file.to_string_lossy().into_owned();
    let mut server = TestServer::start_with(
        Path::new(env!("CARGO_BIN_EXE_opendps")),
        &["--config", &file, "--hub", TOASTERS],
    )
    .await
    .expect("start");
    let group = json!({
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": webhook.url(), "apiVersion": "2021-10-01"},
    });
    assert_eq!(
        server
            .api()
            .expect("client")
            .put("/enrollmentGroups/crashy", group, None)
            .await
            .expect("group")
            .status,
        200
    );
    webhook.answer(429, "busy");
    let (rid, key) = toaster();
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    let token = generate_token(
        &format!("{scope}/registrations/{rid}"),
        &key,
        Some("registration"),
        far_future(),
    )
    .expect("token");
    let accepted = server
        .api()
        .expect("client")
        .with_auth(Some(token.clone()))
        .send(
            Method::PUT,
            &format!("/{scope}/registrations/{rid}/register"),
            &[],
            None,
        )
        .await
        .expect("register");
    let op = accepted.body["operationId"]
        .as_str()
        .expect("op")
        .to_owned();
    // Wait until the 429 is on disk with its retry scheduled (reading the service's database
    // beside it), so the kill lands in the retry's wait rather than before the answer was saved.
    let store = dps_store::SqliteStore::open_read_only(server.data_dir().join("opendps.db"))
        .expect("open the database");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored = dps_core::store::OperationStore::get_operation(&store, &op)
            .await
            .expect("read");
        if stored.is_some_and(|o| o.doc.contains("\"webhookRetries\":1")) {
            break;
        }
        assert!(Instant::now() < deadline, "the retry was never scheduled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(webhook.received().len(), 1);
    drop(store);
    // Killed while the retry is scheduled; the webhook recovers meanwhile.
    server.kill();
    webhook.answer(200, &json!({"iotHubHostName": TOASTERS}).to_string());
    server.start_again().await.expect("restart");

    let device = server.api().expect("client").with_auth(Some(token));
    let done = crate::poll_until_done(&device, &scope, rid, &op, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(done["registrationState"]["assignedHub"], TOASTERS);
    assert_eq!(
        webhook.received().len(),
        2,
        "one call before the crash, one retry after it"
    );
    let trace = server
        .api()
        .expect("client")
        .get(&format!("/registrations/{rid}/trace"))
        .await
        .expect("trace");
    let statuses: Vec<u64> = trace.body["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["status"].as_u64())
        .collect();
    assert_eq!(
        statuses,
        [429, 200],
        "the trace survives the crash too: {}",
        trace.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovisioning_sends_the_current_hub_and_reset_applies_the_webhook_twin() {
    let s = setup().await;
    let (rid, key) = toaster();
    let answer = |hub: &str, device_type: &str| {
        json!({
            "iotHubHostName": hub,
            "initialTwin": {"tags": {"deviceType": device_type}, "properties": {"desired": {"state": device_type}}},
        })
        .to_string()
    };
    let url = s.webhook.url().to_owned();
    let set_policy = |migrate: bool| {
        let api = s.server.api().expect("client");
        let url = url.clone();
        async move {
            let group = json!({
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
                "allocationPolicy": "custom",
                "iotHubs": [TOASTERS, HEATPUMPS],
                "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"},
                "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": migrate},
            });
            let reply = api
                .put(
                    "/enrollmentGroups/contoso-custom-allocated-devices",
                    group,
                    Some("*"),
                )
                .await
                .expect("group");
            assert_eq!(reply.status, 200, "{reply:?}");
        }
    };
    let twin_on = |hub: &'static str| {
        let api = s.server.hub_api(hub).expect("hub");
        async move { api.get(&format!("/twins/{rid}")).await.expect("twin") }
    };

    s.webhook.answer(200, &answer(TOASTERS, "toaster"));
    let first = register(&s, rid, &key).await;
    assert_eq!(
        first["registrationState"]["assignedHub"], TOASTERS,
        "{first}"
    );
    let request = s.webhook.received().pop().expect("first call");
    assert!(
        request["deviceRuntimeContext"]
            .get("currentIotHubHostName")
            .is_none(),
        "a first registration has no current hub: {request}"
    );

    // Reset: the webhook moves the device, and its twin replaces the old one.
    set_policy(false).await;
    s.webhook.answer(200, &answer(HEATPUMPS, "reset"));
    let reset = register(&s, rid, &key).await;
    assert_eq!(reset["status"], "assigned", "{reset}");
    assert_eq!(reset["registrationState"]["assignedHub"], HEATPUMPS);
    assert_eq!(reset["registrationState"]["substatus"], "deviceDataReset");
    let context = s.webhook.received().pop().expect("second call")["deviceRuntimeContext"].clone();
    assert_eq!(context["currentIotHubHostName"], TOASTERS, "{context}");
    assert_eq!(context["currentDeviceId"], rid);
    let twin = twin_on(HEATPUMPS).await;
    assert_eq!(twin.body["tags"]["deviceType"], "reset", "{twin:?}");
    assert_eq!(twin.body["properties"]["desired"]["state"], "reset");
    assert_eq!(twin_on(TOASTERS).await.status, 404, "gone from the old hub");

    // Migrate: the twin travels with the device; the webhook's twin is not applied.
    set_policy(true).await;
    s.webhook.answer(200, &answer(TOASTERS, "ignored"));
    let migrated = register(&s, rid, &key).await;
    assert_eq!(
        migrated["registrationState"]["assignedHub"], TOASTERS,
        "{migrated}"
    );
    // Back on the hub of its first assignment, the substatus says so (and the data still moves).
    assert_eq!(
        migrated["registrationState"]["substatus"],
        "reprovisionedToInitialAssignment"
    );
    let context = s.webhook.received().pop().expect("third call")["deviceRuntimeContext"].clone();
    assert_eq!(context["currentIotHubHostName"], HEATPUMPS, "{context}");
    assert_eq!(
        twin_on(HEATPUMPS).await.status,
        404,
        "gone from the old hub"
    );
    let twin = twin_on(TOASTERS).await;
    assert_eq!(
        twin.body["tags"]["deviceType"], "reset",
        "carried over: {twin:?}"
    );
    assert_eq!(twin.body["properties"]["desired"]["state"], "reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_is_400207_and_not_stored() {
    let huge = format!(
        r#"{{"iotHubHostName":"{TOASTERS}","payload":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let done = failed_with(&[(200, &huge)], 400_207).await;
    let message = done["registrationState"]["errorMessage"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("larger than 65536 bytes"),
        "the message names the cause: {message}"
    );
    assert!(
        done.to_string().len() < 4096,
        "nothing of the body reaches the device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_400207_and_not_followed() {
    let elsewhere = WebhookServer::start().await.expect("webhook");
    elsewhere.answer(200, &format!(r#"{{"iotHubHostName":"{TOASTERS}"}}"#));
    let s = setup().await;
    s.webhook.redirect(302, elsewhere.url());
    let (rid, key) = toaster();
    let done = register(&s, rid, &key).await;
    assert_eq!(done["registrationState"]["errorCode"], 400_207, "{done}");
    let message = done["registrationState"]["errorMessage"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("302") && message.contains("redirects are not followed"),
        "{message}"
    );
    assert!(
        !message.contains("function-key-s3cret"),
        "the Location's query is not repeated"
    );
    assert!(
        elsewhere.received().is_empty(),
        "the device's details never reach the redirect's target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_device_payload_is_refused() {
    let s = setup().await;
    let scope = s.server.info["idScope"].as_str().expect("scope").to_owned();
    let (rid, key) = toaster();
    let token = generate_token(
        &format!("{scope}/registrations/{rid}"),
        &key,
        Some("registration"),
        far_future(),
    )
    .expect("token");
    let device = s.server.api().expect("client").with_auth(Some(token));
    let body = json!({"registrationId": rid, "payload": {"blob": "y".repeat(70 * 1024)}});
    let refused = device
        .send(
            Method::PUT,
            &format!("/{scope}/registrations/{rid}/register"),
            &[],
            Some(Body::Json(body)),
        )
        .await
        .expect("register");
    crate::assert_error(&refused, 400);
    assert_eq!(refused.body["errorCode"], 400_004, "{refused:?}");
    assert!(
        refused.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_payload_bytes")),
        "{refused:?}"
    );
    assert!(s.webhook.received().is_empty());
}
