//! Registration end to end with in-process IoT hubs (minihub) on the same listener: weighted
//! allocation over thousands of devices, the identity and twin on the hub, a hub that refuses
//! allocation, and a crash with operations in flight.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dps_core::sas::{derive_device_key, generate_token};
use dps_testkit::{Body, ServiceApi, TestServer, far_future};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

const GROUP_KEY: &str =
    "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==";
const TOASTERS: &str = "contoso-toasters-hub-1.azure-devices.net";
const HEATPUMPS: &str = "contoso-heatpumps-hub-1.azure-devices.net";
const IDLE: &str = "contoso-idle-hub-1.azure-devices.net";

async fn server_with_hubs() -> TestServer {
    server_with_hubs_written(Written::Directly).await
}

/// How the service writes to its in-process hubs.
#[derive(Clone, Copy)]
enum Written {
    /// Straight into minihub (the default).
    Directly,
    /// Over the IoT Hub REST API, as to a real IoT hub (`minihub.direct = false`).
    OverRest,
}

async fn server_with_hubs_written(written: Written) -> TestServer {
    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let config = match written {
        Written::Directly => "",
        Written::OverRest => "[minihub]\ndirect = false\n",
    };
    let server = TestServer::start_with_config(
        bin,
        config,
        &["--hub", TOASTERS, "--hub", HEATPUMPS, "--hub", IDLE],
    )
    .await
    .expect("start");
    let api = server.api().expect("client");
    let hubs = server.info["minihubs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let cs = |host: &str| {
        hubs.iter()
            .find(|h| h["hostName"] == host)
            .and_then(|h| h["connectionString"].as_str())
            .expect("hub")
            .to_owned()
    };
    // Relink with the weights and the allocation switch under test.
    for (host, weight, apply) in [
        (TOASTERS, 1, true),
        (HEATPUMPS, 3, true),
        (IDLE, 1000, false),
    ] {
        let reply = api
            .post("/linkedHubs", json!({"connectionString": cs(host), "allocationWeight": weight, "applyAllocationPolicy": apply}))
            .await
            .expect("link");
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let group = json!({
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
        "initialTwin": {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready", "darknessSetting": "medium"}}},
    });
    assert_eq!(
        api.put("/enrollmentGroups/contoso", group, None)
            .await
            .expect("group")
            .status,
        200
    );
    server
}

/// Registers `rid` with its key derived from the fixture group's key, and polls to the end.
async fn provision(api: &ServiceApi, scope: &str, rid: &str) -> Value {
    provision_in(api, scope, rid, GROUP_KEY).await
}

/// Registers `rid` with its key derived from `group_key` and polls (without waiting out
/// Retry-After) until the operation is terminal.
async fn provision_in(api: &ServiceApi, scope: &str, rid: &str, group_key: &str) -> Value {
    let key = derive_device_key(group_key, rid).expect("derive");
    let token = generate_token(
        &format!("{scope}/registrations/{rid}"),
        &key,
        Some("registration"),
        far_future(),
    )
    .expect("token");
    let device = api.with_auth(Some(token));
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
    crate::poll_until_done(&device, scope, rid, &op, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weighted_allocation_over_4000_devices() {
    let server = server_with_hubs().await;
    let api = server.api().expect("client");
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(200));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4000 {
        let (api, scope, limit) = (api.clone(), scope.clone(), Arc::clone(&limit));
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("permit");
            let rid = format!("device-{i:04}");
            let result = provision(&api, &scope, &rid).await;
            (rid, result)
        });
    }
    let mut by_hub: BTreeMap<String, usize> = BTreeMap::new();
    let mut assigned = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (rid, result) = joined.expect("task");
        assert_eq!(result["status"], "assigned", "{rid}: {result}");
        let hub = result["registrationState"]["assignedHub"]
            .as_str()
            .expect("hub")
            .to_owned();
        *by_hub.entry(hub.clone()).or_default() += 1;
        assigned.insert(rid, hub);
    }
    let share = |hub: &str| by_hub.get(hub).copied().unwrap_or(0) as f64 / 4000.0;
    eprintln!("4000 devices in {:?}: {by_hub:?}", started.elapsed());
    assert!(
        (0.20..=0.30).contains(&share(TOASTERS)),
        "weight 1 of 4: {by_hub:?}"
    );
    assert!(
        (0.70..=0.80).contains(&share(HEATPUMPS)),
        "weight 3 of 4: {by_hub:?}"
    );
    assert_eq!(share(IDLE), 0.0, "applyAllocationPolicy=false gets none");

    // Re-registering lands on the same hub.
    for i in (0..4000).step_by(400) {
        let rid = format!("device-{i:04}");
        let again = provision(&api, &scope, &rid).await;
        assert_eq!(
            again["registrationState"]["assignedHub"].as_str(),
            assigned.get(&rid).map(String::as_str),
            "{rid}"
        );
    }

    // The hubs hold exactly the devices assigned to them.
    for hub in [TOASTERS, HEATPUMPS, IDLE] {
        let hub_api = server.hub_api(hub).expect("hub client");
        let mut count = 0;
        let mut continuation: Option<String> = None;
        loop {
            let mut headers = vec![("x-ms-max-item-count", "1000".to_owned())];
            if let Some(c) = &continuation {
                headers.push(("x-ms-continuation", c.clone()));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let page = hub_api
                .send(
                    Method::POST,
                    "/devices/query",
                    &headers,
                    Some(Body::Json(json!({"query": "SELECT * FROM devices"}))),
                )
                .await
                .expect("query");
            assert_eq!(page.status, 200, "{page:?}");
            count += page.body.as_array().map(Vec::len).unwrap_or(0);
            continuation = page.header("x-ms-continuation").map(str::to_owned);
            if continuation.is_none() {
                break;
            }
        }
        assert_eq!(
            count,
            by_hub.get(hub).copied().unwrap_or(0),
            "devices on {hub}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_exists_on_its_hub_with_its_keys_and_initial_twin() {
    device_on_its_hub(Written::Directly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_exists_on_its_hub_written_over_the_rest_api() {
    device_on_its_hub(Written::OverRest).await;
}

async fn device_on_its_hub(written: Written) {
    let server = server_with_hubs_written(written).await;
    check_device_on_its_hub(&server).await;
    let text = crate::metrics_text(&server).await;
    let rest = text.contains(r#"operation="create device",status="200",via="rest"}"#);
    let direct = text.contains(r#"operation="create device",status="200",via="direct"}"#);
    match written {
        Written::Directly => assert!(direct && !rest, "{text}"),
        Written::OverRest => assert!(rest && !direct, "{text}"),
    }
}

async fn check_device_on_its_hub(server: &TestServer) {
    let api = server.api().expect("client");
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    let rid = "breakroom499-contoso-tstrsd-007";
    let result = provision(&api, &scope, rid).await;
    assert_eq!(result["status"], "assigned", "{result}");
    let state = &result["registrationState"];
    assert_eq!(state["deviceId"], rid);
    assert_eq!(state["substatus"], "initialAssignment");
    let hub = state["assignedHub"].as_str().expect("hub");
    let hub_api = server.hub_api(hub).expect("hub client");

    let device = hub_api
        .get(&format!("/devices/{rid}"))
        .await
        .expect("device");
    assert_eq!(device.status, 200, "{device:?}");
    assert_eq!(
        device.body["authentication"]["symmetricKey"]["primaryKey"],
        "JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs="
    );
    let twin = hub_api.get(&format!("/twins/{rid}")).await.expect("twin");
    assert_eq!(twin.body["tags"]["deviceType"], "toaster");
    assert_eq!(
        twin.body["properties"]["desired"]["darknessSetting"],
        "medium"
    );

    // The device authenticates to its hub with a SAS signed by its derived key.
    let device_token = |key: &str| {
        generate_token(&format!("{hub}/devices/{rid}"), key, None, far_future()).expect("token")
    };
    let as_device = server
        .client_for(hub)
        .expect("client")
        .with_auth(Some(device_token(
            "JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs=",
        )));
    let sent = as_device
        .post(
            &format!("/devices/{rid}/messages/events"),
            json!({"temperature": 21}),
        )
        .await
        .expect("telemetry");
    assert_eq!(sent.status, 204, "{sent:?}");
    let impostor = server
        .client_for(hub)
        .expect("client")
        .with_auth(Some(device_token(GROUP_KEY)));
    let refused = impostor
        .post(&format!("/devices/{rid}/messages/events"), json!({}))
        .await
        .expect("telemetry");
    assert_eq!(refused.status, 401, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_with_500_operations_in_flight_loses_none() {
    let mut server = server_with_hubs().await;
    let api = server.api().expect("client");
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500 {
        let (api, scope) = (api.clone(), scope.clone());
        tasks.spawn(async move {
            let rid = format!("crash-{i:03}");
            let key = derive_device_key(GROUP_KEY, &rid).expect("derive");
            let token = generate_token(
                &format!("{scope}/registrations/{rid}"),
                &key,
                Some("registration"),
                far_future(),
            )
            .expect("t");
            let reply = api
                .with_auth(Some(token.clone()))
                .send(
                    Method::PUT,
                    &format!("/{scope}/registrations/{rid}/register"),
                    &[],
                    None,
                )
                .await
                .expect("register");
            assert_eq!(reply.status, 202, "{reply:?}");
            (
                rid,
                token,
                reply.body["operationId"].as_str().expect("op").to_owned(),
            )
        });
    }
    let mut accepted = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        accepted.push(joined.expect("task"));
    }
    server.kill();
    let pending = {
        let store =
            dps_store::SqliteStore::open(server.data_dir().join("opendps.db")).expect("open");
        // A zero-length lease at the current time: counts what is due and leaves it claimable.
        let now = dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_millisecond();
        let pending = dps_core::store::OperationStore::claim_operations(
            &store,
            &dps_core::store::LeaseOwner::new("inspector"),
            now,
            0,
            1000,
        )
        .await
        .expect("claim")
        .len();
        store.close();
        pending
    };
    eprintln!("{pending} of 500 operations were still assigning when the server was killed");
    server.start_again().await.expect("restart");

    let api = server.api().expect("client");
    let mut assigned = BTreeMap::new();
    for (rid, token, op) in &accepted {
        let device = api.with_auth(Some(token.clone()));
        let done = crate::poll_until_done(&device, &scope, rid, op, Duration::from_secs(120)).await;
        assert_eq!(done["status"], "assigned", "{rid}: {done}");
        assigned.insert(
            rid.clone(),
            done["registrationState"]["assignedHub"]
                .as_str()
                .expect("hub")
                .to_owned(),
        );
    }
    for (rid, hub) in &assigned {
        for other in [TOASTERS, HEATPUMPS, IDLE] {
            let found = server
                .hub_api(other)
                .expect("hub")
                .get(&format!("/devices/{rid}"))
                .await
                .expect("get")
                .status
                == 200;
            assert_eq!(
                found,
                other == hub,
                "{rid} must exist on {hub} only (checked {other})"
            );
        }
    }
}

#[tokio::test]
async fn standalone_hub_serves_its_registry() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_opendps"))
        .args([
            "hub",
            "--hub",
            "plant-hub.example",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let cs = first
        .strip_prefix("plant-hub.example: ")
        .expect("the hub's connection string")
        .to_owned();
    let host_port = cs
        .split(';')
        .find_map(|p| p.strip_prefix("HostName="))
        .expect("HostName");
    let port: u16 = host_port
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in HostName");
    let key = cs
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .expect("key");

    let ca = std::fs::read(dir.path().join("tls/ca.pem")).expect("ca");
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).expect("pem"))
        .resolve(
            "plant-hub.example",
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        )
        .build()
        .expect("client");
    let token = generate_token(host_port, key, Some("iothubowner"), far_future()).expect("token");
    let created = http
        .put(format!("https://plant-hub.example:{port}/devices/sensor-1?api-version=2021-04-12"))
        .header("Authorization", token)
        .json(&json!({"deviceId": "sensor-1", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}}}))
        .send()
        .await
        .expect("put");
    let status = created.status();
    let body: Value = created.json().await.expect("json");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{body}"
    );
}

/// Registers a device of group `group` on TOASTERS, changes its twin there, moves the group to
/// HEATPUMPS under `policy`, registers again, and returns (new state, twin on the new hub).
async fn move_between_hubs(
    server: &TestServer,
    group: &str,
    rid: &str,
    policy: Value,
) -> (Value, Option<Value>) {
    let api = server.api().expect("client");
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    // A key of its own, so the device cannot also authenticate through the fixture's group.
    let group_key = dps_core::sas::generate_key();
    let body = |hub: &str| {
        json!({
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}},
            "iotHubs": [hub],
            "reprovisionPolicy": policy,
            "initialTwin": {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready"}}},
        })
    };
    assert_eq!(
        api.put(
            &format!("/enrollmentGroups/{group}"),
            body(TOASTERS),
            Some("*")
        )
        .await
        .expect("group")
        .status,
        200
    );
    let first = provision_in(&api, &scope, rid, &group_key).await;
    assert_eq!(
        first["registrationState"]["assignedHub"], TOASTERS,
        "{first}"
    );
    let toasters = server.hub_api(TOASTERS).expect("hub");
    let patch = json!({"tags": {"room": "499"}, "properties": {"desired": {"state": "toasting"}}});
    let patched = toasters
        .send(
            Method::PATCH,
            &format!("/twins/{rid}"),
            &[("If-Match", "*")],
            Some(Body::Json(patch)),
        )
        .await
        .expect("patch");
    assert_eq!(patched.status, 200, "{patched:?}");

    assert_eq!(
        api.put(
            &format!("/enrollmentGroups/{group}"),
            body(HEATPUMPS),
            Some("*")
        )
        .await
        .expect("group")
        .status,
        200
    );
    let second = provision_in(&api, &scope, rid, &group_key).await;
    let hub = second["registrationState"]["assignedHub"]
        .as_str()
        .expect("hub")
        .to_owned();
    let twin = server
        .hub_api(&hub)
        .expect("hub")
        .get(&format!("/twins/{rid}"))
        .await
        .expect("twin");
    (second, (twin.status == 200).then_some(twin.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovision_policies_move_devices_between_real_hubs() {
    reprovision_policies(Written::Directly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovision_policies_over_the_rest_api() {
    reprovision_policies(Written::OverRest).await;
}

async fn reprovision_policies(written: Written) {
    let server = server_with_hubs_written(written).await;
    let gone_from_toasters = |rid: &'static str| {
        let hub = server.hub_api(TOASTERS).expect("hub");
        async move {
            hub.get(&format!("/devices/{rid}"))
                .await
                .expect("get")
                .status
                == 404
        }
    };

    let (state, twin) = move_between_hubs(
        &server,
        "migrating",
        "mover-migrate",
        json!({"updateHubAssignment": true, "migrateDeviceData": true}),
    )
    .await;
    assert_eq!(state["registrationState"]["assignedHub"], HEATPUMPS);
    assert_eq!(
        state["registrationState"]["substatus"],
        "deviceDataMigrated"
    );
    let twin = twin.expect("twin on the new hub");
    assert_eq!(twin["tags"]["room"], "499", "tags migrated: {twin}");
    assert_eq!(
        twin["properties"]["desired"]["state"], "toasting",
        "desired migrated: {twin}"
    );
    assert!(gone_from_toasters("mover-migrate").await);

    let (state, twin) = move_between_hubs(
        &server,
        "resetting",
        "mover-reset",
        json!({"updateHubAssignment": true, "migrateDeviceData": false}),
    )
    .await;
    assert_eq!(state["registrationState"]["assignedHub"], HEATPUMPS);
    assert_eq!(state["registrationState"]["substatus"], "deviceDataReset");
    let twin = twin.expect("twin on the new hub");
    assert!(
        twin["tags"].get("room").is_none(),
        "reset to the initial twin: {twin}"
    );
    assert_eq!(twin["properties"]["desired"]["state"], "ready");
    assert!(gone_from_toasters("mover-reset").await);

    let (state, _) = move_between_hubs(
        &server,
        "staying",
        "mover-never",
        json!({"updateHubAssignment": false, "migrateDeviceData": true}),
    )
    .await;
    assert_eq!(
        state["registrationState"]["assignedHub"], TOASTERS,
        "never reprovision keeps the hub"
    );
    assert!(!gone_from_toasters("mover-never").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_device_registering_20_times_at_once_has_one_identity() {
    let server = server_with_hubs().await;
    let api = server.api().expect("client");
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (api, scope) = (api.clone(), scope.clone());
        tasks.spawn(async move { provision(&api, &scope, "impatient-device").await });
    }
    let mut hubs = std::collections::BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let result = joined.expect("task");
        assert_eq!(result["status"], "assigned", "{result}");
        hubs.insert(
            result["registrationState"]["assignedHub"]
                .as_str()
                .expect("hub")
                .to_owned(),
        );
    }
    assert_eq!(hubs.len(), 1, "{hubs:?}");
    let holders: Vec<&str> = {
        let mut found = Vec::new();
        for hub in [TOASTERS, HEATPUMPS, IDLE] {
            if server
                .hub_api(hub)
                .expect("hub")
                .get("/devices/impatient-device")
                .await
                .expect("get")
                .status
                == 200
            {
                found.push(hub);
            }
        }
        found
    };
    assert_eq!(
        holders.len(),
        1,
        "exactly one hub holds the device: {holders:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_simulator_registers_over_https_and_mqtt() {
    let server = server_with_hubs().await;
    let mqtt_port = server.info["listen"]["mqtt"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .expect("MQTT listener")
        .to_owned();
    for (transport, rid) in [("https", "sim-https-1"), ("mqtt", "sim-mqtt-1")] {
        let key = derive_device_key(GROUP_KEY, rid).expect("derive");
        let out = server
            .cli(&[
                "device",
                "register",
                "--registration-id",
                rid,
                "--symmetric-key",
                &key,
                "--transport",
                transport,
                "--mqtt-port",
                &mqtt_port,
                "--payload",
                r#"{"MyDeviceFirmwareVersion":"12.0.2.5"}"#,
                "--connect",
            ])
            .expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{transport}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("Provisioning Status: PROV_DEVICE_REG_STATUS_CONNECTED"),
            "{stdout}"
        );
        assert!(
            stdout.contains("Registration Information received from service: contoso-"),
            "{stdout}"
        );
        assert!(stdout.contains(&format!("deviceId: {rid}")), "{stdout}");
        // --connect: the device reaches its hub over MQTT and reads the initial twin.
        assert!(stdout.contains(&format!("as {rid}. Twin:")), "{stdout}");
        assert!(
            stdout.contains("\"darknessSetting\": \"medium\""),
            "{stdout}"
        );
    }
    let wrong = server
        .cli(&[
            "device",
            "register",
            "--registration-id",
            "sim-mqtt-2",
            "--symmetric-key",
            GROUP_KEY,
            "--transport",
            "mqtt",
            "--mqtt-port",
            &mqtt_port,
        ])
        .expect("run");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("401002"), "{stderr}");

    // Without --mqtt-port the simulator uses the local service's MQTT listener (here not 8883).
    let rid = "sim-mqtt-3";
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
    let found = server
        .cli(&[
            "device",
            "register",
            "--registration-id",
            rid,
            "--symmetric-key",
            &key,
            "--transport",
            "mqtt",
            "--connect",
        ])
        .expect("run");
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
}

/// Registration ids are case-insensitive: the same device registering in three spellings has one
/// identity on its hub, named as it first registered, and only the latest spelling's key opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_id_in_another_case_leaves_no_orphan_on_the_hub() {
    let server = server_with_hubs().await;
    let api = server.api().expect("client");
    let scope = server.info["idScope"].as_str().expect("scope").to_owned();
    let mut hub = String::new();
    for rid in ["Case-Dev-1", "case-dev-1", "CASE-DEV-1"] {
        let done = provision(&api, &scope, rid).await;
        assert_eq!(done["status"], "assigned", "{done}");
        assert_eq!(
            done["registrationState"]["deviceId"], "Case-Dev-1",
            "{done}"
        );
        hub = done["registrationState"]["assignedHub"]
            .as_str()
            .expect("hub")
            .to_owned();
    }
    let devices = server
        .hub_api(&hub)
        .expect("hub")
        .get("/devices")
        .await
        .expect("list");
    let ids: Vec<&str> = devices
        .body
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .filter(|d| d.eq_ignore_ascii_case("case-dev-1"))
        .collect();
    assert_eq!(ids, vec!["Case-Dev-1"], "{devices:?}");
    let identity = server
        .hub_api(&hub)
        .expect("hub")
        .get("/devices/Case-Dev-1")
        .await
        .expect("get");
    assert_eq!(
        identity.body["authentication"]["symmetricKey"]["primaryKey"],
        derive_device_key(GROUP_KEY, "CASE-DEV-1").expect("derive"),
        "the earlier spellings' keys no longer work: {identity:?}"
    );
}
