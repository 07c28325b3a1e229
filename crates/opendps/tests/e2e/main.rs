//! End-to-end tests: real `opendps` processes on loopback, spoken to over HTTPS with JSON, and the
//! real CLI binary. One binary, unique data directory per test, so tests run in parallel.

mod amqp;
mod auth;
mod cli;
mod device_api;
mod hubs;
mod lifecycle;
mod postgres;
mod real_hubs;
mod service_api;
mod tls;
mod webhook;
mod websocket;
mod x509;

use std::time::{Duration, Instant};

use dps_testkit::{ServiceApi, TestServer};

/// Starts a fresh server from the binary under test.
pub async fn server() -> TestServer {
    TestServer::start(std::path::Path::new(env!("CARGO_BIN_EXE_opendps")))
        .await
        .expect("opendps starts")
}

/// Starts a fresh server serving the in-process hub `hub`, and returns it with the hub's
/// `iothubowner` connection string.
pub async fn server_with_hub(hub: &str) -> (TestServer, String) {
    let server = TestServer::start_with(
        std::path::Path::new(env!("CARGO_BIN_EXE_opendps")),
        &["--hub", hub],
    )
    .await
    .expect("opendps starts");
    let cs = server.info["minihubs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["hostName"] == hub)
        .and_then(|h| h["connectionString"].as_str())
        .expect("the hub's connection string")
        .to_owned();
    (server, cs)
}

/// A simulated device of `server` (its listeners, ID scope and CA) over `transport`.
pub fn device(
    server: &TestServer,
    rid: &str,
    attestation: dps_device::Attestation,
    transport: dps_device::Transport,
) -> dps_device::Device {
    let info = server.service_info().expect("info");
    dps_device::Device {
        host: server.service_host(),
        mqtt_port: info.listen.mqtt.expect("mqtt listener").port(),
        amqp_port: info.listen.amqp.expect("amqp listener").port(),
        scope: info.id_scope.clone(),
        ca: info.ca_file.clone(),
        registration_id: rid.to_owned(),
        attestation,
        payload: None,
        transport,
        timeout: Duration::from_secs(30),
    }
}

/// A symmetric-key device of `server` with `key` over `transport`.
pub fn keyed_device(
    server: &TestServer,
    rid: &str,
    key: &str,
    transport: dps_device::Transport,
) -> dps_device::Device {
    device(
        server,
        rid,
        dps_device::Attestation::SymmetricKey(key.to_owned()),
        transport,
    )
}

/// A device of the symmetric-key group whose key is `group_key` (its own key derived from it), of
/// `server` over `transport`.
pub fn group_device(
    server: &TestServer,
    group_key: &str,
    rid: &str,
    transport: dps_device::Transport,
) -> dps_device::Device {
    let key = dps_core::sas::derive_device_key(group_key, rid).expect("derive");
    keyed_device(server, rid, &key, transport)
}

/// Registers `device`, which must end `assigned`; the final status as JSON.
pub async fn provision_assigned(device: &dps_device::Device) -> serde_json::Value {
    let done = device.provision(&|_| ()).await.expect("provision");
    let done = serde_json::to_value(&done).expect("json");
    assert_eq!(done["status"], "assigned", "{done}");
    done
}

/// Group settings with an initial twin, for the transport tests.
pub fn eco_twin() -> serde_json::Value {
    serde_json::json!({"initialTwin": {"properties": {"desired": {"mode": "eco"}}}})
}

/// Creates the symmetric-key enrollment group `id` with `settings` merged in (an initial twin, …);
/// returns its primary key.
pub async fn symmetric_group(server: &TestServer, id: &str, settings: serde_json::Value) -> String {
    let key = dps_core::sas::generate_key();
    let mut body = serde_json::json!({
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
    });
    if let (Some(body), Some(settings)) = (body.as_object_mut(), settings.as_object()) {
        body.extend(settings.clone());
    }
    let reply = server
        .api()
        .expect("client")
        .put(&format!("/enrollmentGroups/{id}"), body, None)
        .await
        .expect("group");
    assert_eq!(reply.status, 200, "{reply:?}");
    key
}

/// The service's `/metrics` text.
pub async fn metrics_text(server: &TestServer) -> String {
    let metrics = server
        .api()
        .expect("client")
        .with_auth(None)
        .get("/metrics")
        .await
        .expect("metrics");
    metrics
        .body
        .as_str()
        .map_or_else(|| metrics.body.to_string(), str::to_owned)
}

/// Asserts an error reply: status, DPS code family, JSON content type, tracking id.
#[track_caller]
pub fn assert_error(reply: &dps_testkit::Reply, status: u16) {
    assert_eq!(reply.status.as_u16(), status, "unexpected reply: {reply:?}");
    let code = reply.body["errorCode"]
        .as_u64()
        .unwrap_or_else(|| panic!("no errorCode in {reply:?}"));
    assert_eq!(code / 1000, u64::from(status), "{reply:?}");
    assert!(
        reply.body["trackingId"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{reply:?}"
    );
    assert!(
        reply.body["message"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{reply:?}"
    );
    assert!(
        reply.body.get("status").is_none(),
        "error bodies carry no status field: {reply:?}"
    );
    assert_eq!(
        reply.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        reply.header("x-ms-error-code"),
        Some(code.to_string().as_str())
    );
}

/// Polls a device's registration operation until it is terminal and returns that answer. Tests do
/// not wait out Retry-After, but every answer before the end must be a 202 `assigning` carrying it.
pub async fn poll_until_done(
    device: &ServiceApi,
    scope: &str,
    rid: &str,
    op: &str,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let reply = device
            .get(&format!("/{scope}/registrations/{rid}/operations/{op}"))
            .await
            .expect("poll");
        if reply.status == 200 {
            return reply.body;
        }
        assert_eq!(reply.status, 202, "unexpected poll reply {reply:?}");
        assert_eq!(
            reply.body["status"], "assigning",
            "the device sees assigning meanwhile: {reply:?}"
        );
        assert!(
            reply.header("retry-after").is_some(),
            "202 carries Retry-After: {reply:?}"
        );
        assert!(
            Instant::now() < deadline,
            "{rid}: operation {op} did not finish within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
