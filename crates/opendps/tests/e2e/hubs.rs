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
    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server =
        TestServer::start_with(bin, &["--hub", TOASTERS, "--hub", HEATPUMPS, "--hub", IDLE])
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

/// Registers `rid` with its derived key and polls (without waiting out Retry-After) to the end.
async fn provision(api: &ServiceApi, scope: &str, rid: &str) -> Value {
    let key = derive_device_key(GROUP_KEY, rid).expect("derive");
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
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = device
            .get(&format!("/{scope}/registrations/{rid}/operations/{op}"))
            .await
            .expect("poll");
        if reply.status == 200 {
            return reply.body;
        }
        assert_eq!(reply.status, 202, "{reply:?}");
        assert!(
            Instant::now() < deadline,
            "{rid} was not provisioned within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
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
    let server = server_with_hubs().await;
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        let pending =
            dps_core::store::OperationStore::claim_operations(&store, "inspector", now, 0, 1000)
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
        let deadline = Instant::now() + Duration::from_secs(120);
        let done = loop {
            let reply = device
                .get(&format!("/{scope}/registrations/{rid}/operations/{op}"))
                .await
                .expect("poll");
            if reply.status == 200 {
                break reply.body;
            }
            assert!(
                Instant::now() < deadline,
                "{rid} never finished after the restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
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
