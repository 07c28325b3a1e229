//! The device API over real HTTPS sockets: the 202/poll protocol, the body shapes SDKs send, and
//! every refusal with its code, promptly. Hub-side outcomes are covered with minihub elsewhere.

use std::time::{Duration, Instant};

use dps_core::sas::{derive_device_key, generate_token};
use dps_testkit::{Body, Reply, ServiceApi, TestServer, far_future};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{assert_error, server};

const GROUP_KEY: &str =
    "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==";

fn scope(server: &TestServer) -> String {
    server.info["idScope"].as_str().expect("scope").to_owned()
}

fn device(server: &TestServer, rid: &str, key: &str, expiry: i64) -> ServiceApi {
    let token = generate_token(
        &format!("{}/registrations/{rid}", scope(server)),
        key,
        Some("registration"),
        expiry,
    )
    .expect("token");
    server.api().expect("client").with_auth(Some(token))
}

/// The device `rid` of the group [`with_group`] makes, with its derived key and a lasting token.
fn group_device(server: &TestServer, rid: &str) -> ServiceApi {
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
    device(server, rid, &key, far_future())
}

async fn register(api: &ServiceApi, server: &TestServer, rid: &str, body: Option<Body>) -> Reply {
    api.send(
        Method::PUT,
        &format!("/{}/registrations/{rid}/register", scope(server)),
        &[],
        body,
    )
    .await
    .expect("register")
}

/// Polls until the operation is terminal (the test does not wait out Retry-After).
async fn poll(api: &ServiceApi, server: &TestServer, rid: &str, op: &str) -> Value {
    crate::poll_until_done(api, &scope(server), rid, op, Duration::from_secs(20)).await
}

async fn with_group(server: &TestServer, extra: Value) {
    let mut body = json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let reply = server
        .api()
        .expect("client")
        .put("/enrollmentGroups/grp", body, None)
        .await
        .expect("group");
    assert_eq!(reply.status, 200, "{reply:?}");
}

/// The body shapes real SDKs send: C/Node, Python (payload null), C# MQTT (nothing), docs (empty object).
fn register_bodies(rid: &str) -> [Option<Value>; 4] {
    [
        Some(json!({"registrationId": rid})),
        Some(json!({"payload": null, "registrationId": rid})),
        None,
        Some(json!({})),
    ]
}

#[track_caller]
fn assert_json_202_with_operation(reply: &Reply) -> String {
    assert_eq!(reply.status, 202, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let op = reply.body["operationId"].as_str().expect("operationId");
    assert!(
        op.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
        "{op}"
    );
    op.to_owned()
}

/// What the registrations below end with: no hub is linked, so they fail after authentication,
/// as data.
#[track_caller]
fn assert_failed_without_hub(done: &Value, rid: &str, op: &str) {
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["operationId"], op);
    assert_eq!(done["registrationState"]["errorCode"], 400211);
    assert_eq!(done["registrationState"]["registrationId"], rid);
}

/// By default a register request waits for its registration to finish and answers with the final
/// status: 202 still (C# accepts nothing else), no Retry-After, the whole `registrationState`, and
/// an operation that can still be polled. No poll is needed: the metrics count none.
#[tokio::test]
async fn register_answers_with_the_final_status_when_it_is_quick() {
    let server = server().await;
    with_group(&server, json!({})).await;
    let rid = "breakroom499-contoso-tstrsd-007";
    let api = group_device(&server, rid);
    for body in register_bodies(rid) {
        let reply = register(&api, &server, rid, body.map(Body::Json)).await;
        let op = assert_json_202_with_operation(&reply);
        assert!(reply.header("retry-after").is_none(), "{reply:?}");
        assert_failed_without_hub(&reply.body, rid, &op);
        assert_eq!(reply.body["registrationState"]["status"], "failed");
    }
    assert_failed_state_is_kept(&server, &api, rid).await;
    let metrics = crate::metrics_text(&server).await;
    assert!(
        metrics.contains(r#"opendps_inline_answers_total{transport="https"} 4"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("opendps_operation_polls_total"),
        "{metrics}"
    );
    let reply = register(&api, &server, rid, None).await;
    let op = assert_json_202_with_operation(&reply);
    let polled = poll(&api, &server, rid, &op).await;
    assert_eq!(
        polled, reply.body,
        "a poll reads what the register answered"
    );
}

/// With `answer_within_ms = 0` the register request answers `assigning` at once, with
/// Retry-After, and polling reaches the terminal state, as Azure DPS does.
#[tokio::test]
async fn register_answers_assigning_when_told_not_to_wait() {
    let server = TestServer::start_with_env(
        std::path::Path::new(env!("CARGO_BIN_EXE_opendps")),
        &[("OPENDPS_PROVISIONING__ANSWER_WITHIN_MS", "0")],
        &[],
    )
    .await
    .expect("opendps starts");
    with_group(&server, json!({})).await;
    let rid = "breakroom499-contoso-tstrsd-008";
    let api = group_device(&server, rid);
    for body in register_bodies(rid) {
        let reply = register(&api, &server, rid, body.map(Body::Json)).await;
        let op = assert_json_202_with_operation(&reply);
        assert!(reply.header("retry-after").is_some());
        assert_eq!(reply.body["status"], "assigning");
        let done = poll(&api, &server, rid, &op).await;
        assert_failed_without_hub(&done, rid, &op);
    }
    assert_failed_state_is_kept(&server, &api, rid).await;
    let metrics = crate::metrics_text(&server).await;
    assert!(
        !metrics.contains("opendps_inline_answers_total"),
        "{metrics}"
    );
}

/// The registration state the device reads back, and the service API's query, after those.
async fn assert_failed_state_is_kept(server: &TestServer, api: &ServiceApi, rid: &str) {
    let state = api
        .post(
            &format!("/{}/registrations/{rid}", scope(server)),
            json!({"registrationId": rid}),
        )
        .await
        .expect("status");
    assert_eq!(state.status, 200);
    assert_eq!(state.body["status"], "failed");
    let listed = server
        .api()
        .expect("client")
        .post("/registrations/grp/query", json!({}))
        .await
        .expect("query");
    assert_eq!(listed.body.as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn disabled_enrollment_ends_disabled() {
    let server = server().await;
    with_group(&server, json!({"provisioningStatus": "disabled"})).await;
    let rid = "dev-off";
    let api = group_device(&server, rid);
    let reply = register(&api, &server, rid, None).await;
    assert_eq!(reply.status, 202);
    assert_eq!(
        reply.body["status"], "disabled",
        "answered inline: {reply:?}"
    );
    let done = poll(
        &api,
        &server,
        rid,
        reply.body["operationId"].as_str().expect("op"),
    )
    .await;
    assert_eq!(done["status"], "disabled");
    assert_eq!(done["registrationState"]["status"], "disabled");
}

#[tokio::test]
async fn refusals_are_prompt_and_carry_codes() {
    let server = server().await;
    with_group(&server, json!({})).await;
    let rid = "dev-1";
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
    let started = Instant::now();
    let cases: Vec<(&str, ServiceApi)> = vec![
        (
            "wrong key",
            device(&server, rid, &dps_core::sas::generate_key(), far_future()),
        ),
        ("expired", device(&server, rid, &key, far_future() - 7200)),
        (
            "the group key itself",
            device(&server, rid, GROUP_KEY, far_future()),
        ),
        (
            "token for another registration id",
            device(
                &server,
                "dev-2",
                &derive_device_key(GROUP_KEY, "dev-2").expect("d"),
                far_future(),
            ),
        ),
        (
            "unknown device",
            device(
                &server,
                "stranger",
                &dps_core::sas::generate_key(),
                far_future(),
            ),
        ),
        ("no token", server.api().expect("client").with_auth(None)),
    ];
    for (what, api) in cases {
        let path_rid = if what == "unknown device" {
            "stranger"
        } else {
            rid
        };
        let reply = register(&api, &server, path_rid, None).await;
        assert_error(&reply, 401);
        assert_eq!(reply.body["errorCode"], 401002, "{what}: {reply:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusals are prompt"
    );

    let api = device(&server, rid, &key, far_future());
    let malformed = api
        .send(
            Method::PUT,
            &format!("/{}/registrations/{rid}/register", scope(&server)),
            &[],
            Some(Body::Raw(b"{nope".to_vec())),
        )
        .await
        .expect("put");
    assert_error(&malformed, 400);
    let mismatch = register(
        &api,
        &server,
        rid,
        Some(Body::Json(json!({"registrationId": "someone-else"}))),
    )
    .await;
    assert_error(&mismatch, 400);
    let big = Body::Raw(format!(r#"{{"payload":"{}"}}"#, "x".repeat(200 * 1024)).into_bytes());
    assert_error(&register(&api, &server, rid, Some(big)).await, 413);
    assert_error(
        &api.get(&format!(
            "/{}/registrations/{rid}/operations/4.0000000000000000.nope",
            scope(&server)
        ))
        .await
        .expect("poll"),
        404,
    );
    assert_error(
        &api.post(
            &format!("/{}/registrations/{rid}", scope(&server)),
            json!({}),
        )
        .await
        .expect("status"),
        404,
    );
    // Nothing was recorded by the refused requests.
    let listed = server
        .api()
        .expect("client")
        .post("/registrations/grp/query", json!({}))
        .await
        .expect("query");
    assert_eq!(listed.body, json!([]));
}

#[tokio::test]
async fn an_operation_is_only_visible_to_its_device() {
    let server = server().await;
    with_group(&server, json!({})).await;
    let a = device(
        &server,
        "dev-a",
        &derive_device_key(GROUP_KEY, "dev-a").expect("d"),
        far_future(),
    );
    let b = device(
        &server,
        "dev-b",
        &derive_device_key(GROUP_KEY, "dev-b").expect("d"),
        far_future(),
    );
    let op = register(&a, &server, "dev-a", None).await.body["operationId"]
        .as_str()
        .expect("op")
        .to_owned();
    let stolen = b
        .get(&format!(
            "/{}/registrations/dev-b/operations/{op}",
            scope(&server)
        ))
        .await
        .expect("poll");
    assert_error(&stolen, 404);
}

/// The value of one Prometheus sample, 0 when it is absent.
pub fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_registrations_by_transport_and_outcome() {
    let server = server().await;
    with_group(&server, json!({})).await;
    let rid = "metered-device";
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
    let api = device(&server, rid, &key, far_future());
    let reply = register(&api, &server, rid, None).await;
    let op = reply.body["operationId"].as_str().expect("operationId");
    assert_eq!(poll(&api, &server, rid, op).await["status"], "failed");
    let wrong = device(&server, rid, GROUP_KEY, far_future());
    assert_eq!(register(&wrong, &server, rid, None).await.status, 401);

    let metrics = server
        .api()
        .expect("client")
        .with_auth(None)
        .get("/metrics")
        .await
        .expect("metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{metrics:?}"
    );
    let text = metrics.body.as_str().expect("text");
    let https_failed = r#"opendps_registrations_total{transport="https",outcome="failed"}"#;
    let https_refused = r#"opendps_registrations_total{transport="https",outcome="refused"}"#;
    assert_eq!(sample(text, https_failed), 1.0, "{text}");
    assert_eq!(sample(text, https_refused), 1.0, "{text}");
    assert_eq!(
        sample(
            text,
            r#"opendps_registration_duration_seconds_count{transport="https",outcome="failed"}"#
        ),
        1.0
    );
    assert!(
        sample(
            text,
            r#"opendps_store_duration_seconds_count{kind="write"}"#
        ) >= 2.0
    );
    assert!(sample(text, r#"opendps_open_connections{listener="https"}"#) >= 1.0);
    assert!(!text.contains(GROUP_KEY) && !text.contains("SharedAccessSignature"));
}

/// Device tokens have their own clock-skew setting: with `device_sas_clock_skew_secs = 0` a device
/// token that expired a minute ago is refused, while a service token as old still passes under the
/// service API's default of 300 s.
#[tokio::test]
async fn device_token_skew_is_its_own_setting() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server =
        TestServer::start_with_config(bin, "[provisioning]\ndevice_sas_clock_skew_secs = 0\n", &[])
            .await
            .expect("start");
    with_group(&server, json!({})).await;
    let a_minute_ago = far_future() - 3600 - 60;
    let rid = "skewed-device";
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
    let late = device(&server, rid, &key, a_minute_ago);
    let refused = register(&late, &server, rid, None).await;
    assert_error(&refused, 401);
    let fresh = device(&server, rid, &key, far_future());
    assert_eq!(register(&fresh, &server, rid, None).await.status, 202);

    let service_token = generate_token(
        &server.service_host(),
        &server.policy_key("provisioningserviceowner"),
        Some("provisioningserviceowner"),
        a_minute_ago,
    )
    .expect("token");
    let service = server.api().expect("client").with_auth(Some(service_token));
    assert_eq!(
        service
            .get("/enrollmentGroups/grp")
            .await
            .expect("get")
            .status,
        200
    );
}

/// A finished operation is deleted after `operation_retention_secs`; polling it then gets what an
/// operation that never existed gets, while the registration state stays.
#[tokio::test]
async fn finished_operations_are_pruned_after_their_retention() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server =
        TestServer::start_with_config(bin, "[provisioning]\noperation_retention_secs = 1\n", &[])
            .await
            .expect("start");
    with_group(&server, json!({})).await;
    let rid = "short-lived-operation";
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
    let api = device(&server, rid, &key, far_future());
    let accepted = register(&api, &server, rid, None).await;
    let op = accepted.body["operationId"]
        .as_str()
        .expect("op")
        .to_owned();
    let done = poll(&api, &server, rid, &op).await;
    assert_eq!(done["status"], "failed", "no hub is linked: {done}");

    let path = |op: &str| format!("/{}/registrations/{rid}/operations/{op}", scope(&server));
    let unknown = api
        .get(&path("00000000-0000-0000-0000-000000000000"))
        .await
        .expect("poll");
    assert_error(&unknown, 404);
    let deadline = Instant::now() + Duration::from_secs(30);
    let expired = loop {
        let reply = api.get(&path(&op)).await.expect("poll");
        if reply.status != 200 || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_error(&expired, 404);
    assert_eq!(expired.body["errorCode"], unknown.body["errorCode"]);
    let state = server
        .api()
        .expect("client")
        .get(&format!("/registrations/{rid}"))
        .await
        .expect("state");
    assert_eq!(state.status, 200, "the registration state stays: {state:?}");
}

/// `registration show --trace` on a registration that used no webhook still shows the registration,
/// and says that no webhook was involved.
#[tokio::test]
async fn trace_of_a_registration_without_a_webhook() {
    let server = server().await;
    with_group(&server, json!({})).await;
    let rid = "no-webhook-device";
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
    let api = device(&server, rid, &key, far_future());
    let accepted = register(&api, &server, rid, None).await;
    let op = accepted.body["operationId"]
        .as_str()
        .expect("op")
        .to_owned();
    poll(&api, &server, rid, &op).await;
    let out = server
        .cli(&["registration", "show", "--registration-id", rid, "--trace"])
        .expect("cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(rid), "the registration is shown: {stdout}");
    assert!(
        stdout.contains("No trace: its last registration was allocated without custom allocation"),
        "{stdout}"
    );
    let json = server
        .cli(&[
            "registration",
            "show",
            "--registration-id",
            rid,
            "--trace",
            "--output",
            "json",
        ])
        .expect("cli");
    let value: Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(value["registration"]["registrationId"], rid);
    assert!(value["allocationTrace"].is_null());
}
