//! The service on PostgreSQL (`storage.url`): devices register through it over HTTPS and MQTT, the
//! CLI finds it, its state is in the database and survives a restart; a database it cannot use
//! stops it at startup with what to check.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dps_device::Transport;
use dps_testkit::{PgSchema, TestServer, WebhookServer};

const HUB: &str = "contoso-pg-hub.azure-devices.net";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_opendps"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_postgresql_registers_devices_and_keeps_its_state_there() {
    let schema = PgSchema::create("node").expect("a test schema on the local PostgreSQL");
    let url = schema.url();
    let mut server =
        TestServer::start_with_env(bin(), &[("OPENDPS_STORAGE__URL", &url)], &["--hub", HUB])
            .await
            .expect("opendps starts on PostgreSQL");
    let scope = server.service_info().expect("info").id_scope.clone();
    let key = crate::symmetric_group(&server, "pg-devices", crate::eco_twin()).await;
    for (rid, transport) in [
        ("pg-sensor-1", Transport::Https),
        ("pg-sensor-2", Transport::Mqtt),
    ] {
        crate::provision_assigned(&crate::group_device(&server, &key, rid, transport)).await;
    }

    // The state is in PostgreSQL, not in a SQLite file of the data directory.
    assert!(!server.data_dir().join("opendps.db").exists());
    assert_eq!(
        schema
            .query("SELECT string_agg(id_key, ',' ORDER BY id_key) FROM registrations")
            .expect("query"),
        "pg-sensor-1,pg-sensor-2"
    );
    assert_eq!(
        schema
            .query("SELECT count(*) FROM operations WHERE pending")
            .expect("query"),
        "0"
    );

    // After a restart the service has the same identity and finds its registrations.
    server.restart().await.expect("restart");
    let info = server.service_info().expect("info");
    assert_eq!(info.id_scope, scope);
    let state = server
        .api()
        .expect("client")
        .get("/registrations/pg-sensor-2")
        .await
        .expect("registration state");
    assert_eq!(state.status, 200, "{state:?}");
    assert_eq!(state.body["assignedHub"], HUB, "{state:?}");
}

/// `opendps serve` against a database it cannot use: it exits at once, saying what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_it_cannot_use_stops_it_at_startup() {
    // A port nothing listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = unused.local_addr().expect("addr").port();
    drop(unused);
    let cases = [
        (
            format!("postgres://postgres@127.0.0.1:{port}/test"),
            "check that the server runs",
        ),
        (
            "postgres://no_such_role_opendps@127.0.0.1:5432/test".to_owned(),
            "no_such_role_opendps",
        ),
        (
            "mysql://root@127.0.0.1/test".to_owned(),
            "must be a PostgreSQL URL",
        ),
    ];
    for (url, says) in cases {
        let started = std::time::Instant::now();
        let refused = TestServer::start_with(bin(), &["--storage-url", &url])
            .await
            .err()
            .unwrap_or_else(|| panic!("{url}: started anyway"));
        let told = format!("{refused:#}");
        assert!(
            told.contains("exited with") && told.contains(says),
            "{url}: the error should say '{says}': {told}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{url}: took {:?} to fail",
            started.elapsed()
        );
    }
}

/// Two nodes on one database, each with its own data directory and node id, the same
/// certificate (as behind a TCP load balancer), and one linked hub: they share the service
/// identity; devices register through either and poll the other; each device is created on the
/// hub once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_database() {
    let schema = PgSchema::create("nodes").expect("a test schema on the local PostgreSQL");
    let url = schema.url();
    let env = [("OPENDPS_STORAGE__URL", url.as_str())];
    let (a, b) = two_nodes(&env, &[]).await;
    let (ia, ib) = (a.service_info().expect("a"), b.service_info().expect("b"));
    assert_eq!(ia.id_scope, ib.id_scope, "one service identity");
    let key_of = |cs: &Option<String>| {
        cs.as_deref()
            .and_then(|cs| cs.split(';').find(|p| p.starts_with("SharedAccessKey=")))
            .map(str::to_owned)
    };
    assert_eq!(
        key_of(&ia.service_connection_string),
        key_of(&ib.service_connection_string),
        "one owner policy"
    );
    assert_ne!(
        std::fs::read_to_string(a.data_dir().join("node-id")).ok(),
        std::fs::read_to_string(b.data_dir().join("node-id")).ok(),
        "each node has its own node id"
    );

    let hub = dps_testkit::ScriptedHub::start(a.data_dir())
        .await
        .expect("hub");
    let linked = a
        .api()
        .expect("client")
        .post(
            "/linkedHubs",
            serde_json::json!({"connectionString": hub.connection_string("iothubowner").expect("cs")}),
        )
        .await
        .expect("link");
    assert!(linked.status.is_success(), "{linked:?}");
    // Made on node a, seen by node b.
    let key = crate::symmetric_group(&a, "two-nodes", serde_json::json!({})).await;
    let group = b
        .api()
        .expect("client")
        .get("/enrollmentGroups/two-nodes")
        .await
        .expect("group on b");
    assert_eq!(group.status, 200, "{group:?}");

    // Each device registers through one node and polls the other.
    let scope = ia.id_scope.clone();
    for i in 0..6 {
        let rid = format!("pair-device-{i}");
        let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let (token, operation) = register(&first.api().expect("client"), &scope, &key, &rid).await;
        let poller = second.api().expect("client").with_auth(Some(token));
        let done =
            crate::poll_until_done(&poller, &scope, &rid, &operation, Duration::from_secs(20))
                .await;
        assert_eq!(done["status"], "assigned", "{rid}: {done}");
        assert_eq!(
            done["registrationState"]["assignedHub"],
            hub.host_name(),
            "{done}"
        );
    }
    let created = hub
        .requests()
        .iter()
        .filter(|r| r.starts_with("PUT /devices/") && !r.contains("/modules"))
        .count();
    assert_eq!(
        created,
        6,
        "each device created once on the hub: {:?}",
        hub.requests()
    );
}

/// In-process hubs on PostgreSQL: two nodes started with the same `--hub` serve one hub (one
/// set of keys, linked once), minihub's tables are in the database rather than in the data
/// directories, and a device registered through node a connects to its hub through node b and
/// reads the initial twin there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_hubs_are_shared_by_the_nodes() {
    let schema = PgSchema::create("hubs").expect("a test schema on the local PostgreSQL");
    let url = schema.url();
    let env = [("OPENDPS_STORAGE__URL", url.as_str())];
    let (a, b) = two_nodes(&env, &["--hub", HUB]).await;
    let (ia, ib) = (a.service_info().expect("a"), b.service_info().expect("b"));
    // Given only a running node's data directory, the CLI finds its database.
    let info = std::process::Command::new(bin())
        .args(["info", "--json", "--data-dir"])
        .arg(b.data_dir())
        .env_remove("OPENDPS_STORAGE__URL")
        .output()
        .expect("info");
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(found["idScope"], ia.id_scope.as_str());
    assert_eq!(ia.minihubs.len(), 1, "{:?}", ia.minihubs);
    assert_eq!(ia.minihubs, ib.minihubs, "one hub, one set of keys");
    for node in [&a, &b] {
        assert!(!node.data_dir().join("minihub.db").exists());
    }
    assert_eq!(
        schema
            .query("SELECT string_agg(host_name, ',') FROM minihub_hubs")
            .expect("query"),
        HUB
    );
    let linked = b
        .api()
        .expect("client")
        .get("/linkedHubs")
        .await
        .expect("linked hubs");
    assert_eq!(
        linked.body.as_array().map(Vec::len),
        Some(1),
        "linked once: {linked:?}"
    );

    let key = crate::symmetric_group(&a, "shared-hub", crate::eco_twin()).await;
    let rid = "shared-hub-device";
    let done =
        crate::provision_assigned(&crate::group_device(&a, &key, rid, Transport::Https)).await;
    assert_eq!(done["registrationState"]["assignedHub"], HUB, "{done}");
    let twin = crate::group_device(&b, &key, rid, Transport::Mqtt)
        .read_twin(HUB, rid)
        .await
        .expect("the twin, through node b");
    assert_eq!(twin["desired"]["mode"], "eco", "{twin}");

    // The bench spreads its devices over both nodes and reports the CPU of both.
    let b_dir = b.data_dir().to_str().expect("a UTF-8 path").to_owned();
    let report = crate::cli::json_ok(
        &a,
        &[
            "bench",
            "--devices",
            "20",
            "--concurrency",
            "4",
            "--no-baseline",
            "--also-data-dir",
            &b_dir,
        ],
    );
    assert_eq!(report["registrations"]["assigned"], 20, "{report}");
    assert!(
        report["registrations"]["serverCpuMsPerRegistration"].as_f64() > Some(0.0),
        "both nodes' CPU: {report}"
    );
}

/// A single-node installation on SQLite moved to PostgreSQL with `opendps migrate-store`: refused
/// while the service runs; copied whole (service identity, enrollments, registrations, in-process
/// hubs with their devices and twins); refused a second time; the node then serves on PostgreSQL
/// as before. A node's data directory is refused on another service's database, and on a database
/// without its service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_moves_a_sqlite_installation_to_postgresql() {
    let mut server = TestServer::start_with(bin(), &["--hub", HUB])
        .await
        .expect("opendps starts on SQLite");
    let scope = server.service_info().expect("info").id_scope.clone();
    let key = crate::symmetric_group(&server, "moving", crate::eco_twin()).await;
    for rid in ["moving-1", "moving-2", "moving-3"] {
        crate::provision_assigned(&crate::group_device(&server, &key, rid, Transport::Https)).await;
    }
    let schema = PgSchema::create("moved").expect("a test schema on the local PostgreSQL");
    let url = schema.url();
    let dir = server.data_dir().to_string_lossy().into_owned();
    let migrate = [
        "migrate-store",
        "--from",
        dir.as_str(),
        "--to",
        url.as_str(),
    ];

    let running = server.cli(&migrate).expect("run");
    let told = String::from_utf8_lossy(&running.stderr);
    assert!(
        !running.status.success() && told.contains("must be stopped"),
        "{told}"
    );

    server.stop().await.expect("stop");
    let copied = server.cli(&migrate).expect("run");
    let said = String::from_utf8_lossy(&copied.stdout);
    assert!(
        copied.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    assert!(said.contains(&scope), "{said}");
    for (table, rows) in [
        ("registrations", 3),
        ("enrollments", 1),
        ("minihub_devices", 3),
    ] {
        assert!(
            said.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == [table, &rows.to_string(), "rows"]),
            "{table}: {rows} rows expected in:\n{said}"
        );
    }
    let again = server.cli(&migrate).expect("run");
    let told = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success()
            && told.contains(&format!(
                "already holds an opendps service (ID scope {scope})"
            )),
        "{told}"
    );

    server.set_env("OPENDPS_STORAGE__URL", &url);
    server
        .start_again()
        .await
        .expect("the node starts on PostgreSQL");
    assert_eq!(server.service_info().expect("info").id_scope, scope);
    let state = server
        .api()
        .expect("client")
        .get("/registrations/moving-2")
        .await
        .expect("registration state");
    assert_eq!(state.status, 200, "{state:?}");
    let twin = crate::group_device(&server, &key, "moving-2", Transport::Mqtt)
        .read_twin(HUB, "moving-2")
        .await
        .expect("the device's hub identity and twin came along");
    assert_eq!(twin["desired"]["mode"], "eco", "{twin}");
    crate::provision_assigned(&crate::group_device(
        &server,
        &key,
        "moving-4",
        Transport::Mqtt,
    ))
    .await;
    server.stop().await.expect("stop");

    // This data directory on a database without its service, then on another service's.
    let other = PgSchema::create("other").expect("schema");
    let other_url = other.url();
    server.set_env("OPENDPS_STORAGE__URL", &other_url);
    let refused = format!(
        "{:#}",
        server.start_again().await.expect_err("an empty database")
    );
    assert!(
        refused.contains(&format!("ID scope {scope}")) && refused.contains("holds no service"),
        "{refused}"
    );
    let stranger = TestServer::start_with_env(bin(), &[("OPENDPS_STORAGE__URL", &other_url)], &[])
        .await
        .expect("another service on the other schema");
    let theirs = stranger.service_info().expect("info").id_scope.clone();
    let refused = format!(
        "{:#}",
        server
            .start_again()
            .await
            .expect_err("another service's database")
    );
    assert!(
        refused.contains(&format!(
            "belongs to another opendps service (ID scope {theirs})"
        )),
        "{refused}"
    );
}

/// `migrate-store` is all or nothing: when part of the copy is refused (here minihub's, on a
/// database that already has in-process hubs), nothing of the service was copied either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_migration_copies_nothing() {
    let mut server = TestServer::start_with(bin(), &["--hub", HUB])
        .await
        .expect("opendps starts on SQLite");
    crate::symmetric_group(&server, "not-copied", serde_json::json!({})).await;
    server.stop().await.expect("stop");
    let schema = PgSchema::create("halfway").expect("schema");
    schema
        .query(
            r#"CREATE TABLE opendps_schema (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
               INSERT INTO opendps_schema VALUES ('minihub', 1);
               CREATE TABLE minihub_hubs (host_name TEXT COLLATE "C" PRIMARY KEY, doc TEXT NOT NULL);
               CREATE TABLE minihub_devices (hub TEXT COLLATE "C" NOT NULL, device_id TEXT COLLATE "C" NOT NULL,
                   device TEXT NOT NULL, twin TEXT NOT NULL, PRIMARY KEY (hub, device_id));
               INSERT INTO minihub_hubs VALUES ('someone-elses-hub', '{}');"#,
        )
        .expect("a database with a hub in it");
    let dir = server.data_dir().to_string_lossy().into_owned();
    let url = schema.url();
    let refused = server
        .cli(&["migrate-store", "--from", &dir, "--to", &url])
        .expect("run");
    let told = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && told.contains("already has in-process hubs"),
        "{told}"
    );
    for table in ["service_identity", "enrollments"] {
        assert_eq!(
            schema
                .query(&format!("SELECT count(*) FROM {table}"))
                .expect("count"),
            "0",
            "{table} was copied"
        );
    }
}

/// A node moved from SQLite to PostgreSQL without copying its database is refused, and told how.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_left_on_sqlite_is_told_to_migrate() {
    let mut server = TestServer::start(bin())
        .await
        .expect("opendps starts on SQLite");
    server.stop().await.expect("stop");
    // As an installation from before id-scope was recorded.
    std::fs::remove_file(server.data_dir().join("id-scope")).expect("id-scope is written");
    let schema = PgSchema::create("unmoved").expect("schema");
    server.set_env("OPENDPS_STORAGE__URL", &schema.url());
    let refused = format!("{:#}", server.start_again().await.expect_err("not copied"));
    assert!(
        refused.contains("opendps migrate-store --from"),
        "{refused}"
    );
}

/// Registers group device `rid` (its key derived from the group's `key`) through `api`, over the
/// device REST API; its token and the operation id of the 202.
async fn register(
    api: &dps_testkit::ServiceApi,
    scope: &str,
    key: &str,
    rid: &str,
) -> (String, String) {
    let token = registration_token(scope, key, rid);
    let reply = send_register(&api.with_auth(Some(token.clone())), scope, rid).await;
    assert_eq!(reply.status, 202, "{reply:?}");
    let operation = reply.body["operationId"]
        .as_str()
        .expect("operation id")
        .to_owned();
    (token, operation)
}

/// The device's register request with a body of its id alone, as `device` (authorized as it).
async fn send_register(
    device: &dps_testkit::ServiceApi,
    scope: &str,
    rid: &str,
) -> dps_testkit::Reply {
    device
        .put(
            &format!("/{scope}/registrations/{rid}/register"),
            serde_json::json!({ "registrationId": rid }),
            None,
        )
        .await
        .expect("register")
}

/// The SAS token of group device `rid` (its key derived from the group's `key`).
fn registration_token(scope: &str, key: &str, rid: &str) -> String {
    let derived = dps_core::sas::derive_device_key(key, rid).expect("derive");
    dps_core::sas::generate_token(
        &format!("{scope}/registrations/{rid}"),
        &derived,
        Some("registration"),
        dps_testkit::far_future(),
    )
    .expect("token")
}

/// Two nodes on the database `env` names, started with `args`: node b with node a's certificate
/// and CA, as nodes behind one name have.
async fn two_nodes(env: &[(&str, &str)], args: &[&str]) -> (TestServer, TestServer) {
    let a = TestServer::start_with_env(bin(), env, args)
        .await
        .expect("node a starts");
    let b_dir = tempfile::tempdir().expect("dir");
    copy_dir(&a.data_dir().join("tls"), &b_dir.path().join("tls"));
    let b = TestServer::start_in_with_env(b_dir, bin(), env, args)
        .await
        .expect("node b starts");
    (a, b)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// A register request answered `assigning` (its registration still waiting for a slow webhook) has
/// a durable operation, though the operation was first written without waiting for its flush:
/// PostgreSQL crashing right after the answer loses nothing the device was told of, and the device
/// polls its operation once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_answered_assigning_survives_a_database_crash() {
    // The log writer waits 10 s between rounds: before the crash, only a durable commit writes
    // the operation's log.
    let cluster = dps_testkit::PgCluster::start_with(&["wal_writer_delay=10000"])
        .expect("a PostgreSQL cluster of the test's own");
    let url = cluster.url();
    let webhook = WebhookServer::start().await.expect("webhook");
    let hub = serde_json::json!({ "iotHubHostName": HUB }).to_string();
    webhook.answer_after(200, &hub, Duration::from_secs(30));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("opendps.toml");
    std::fs::write(
        &config,
        "[provisioning]\nanswer_within_ms = 300\nwebhook_timeout_ms = 20000\n",
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let server = TestServer::start_with_env(
        bin(),
        &[("OPENDPS_STORAGE__URL", url.as_str())],
        &["--config", &config, "--hub", HUB],
    )
    .await
    .expect("opendps starts");
    let key = crate::symmetric_group(
        &server,
        "slow-webhook",
        serde_json::json!({
            "allocationPolicy": "custom",
            "iotHubs": [HUB],
            "customAllocationDefinition": {"webhookUrl": webhook.url(), "apiVersion": "2021-10-01"},
        }),
    )
    .await;
    let scope = server.service_info().expect("info").id_scope.clone();
    let rid = "told-of-operation";
    let device = server
        .api()
        .expect("client")
        .with_auth(Some(registration_token(&scope, &key, rid)));
    let accepted = send_register(&device, &scope, rid).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.body["status"], "assigning", "{accepted:?}");
    let operation = accepted.body["operationId"].as_str().expect("operation id");

    cluster.crash().expect("crash PostgreSQL");
    cluster.start_again().expect("start PostgreSQL again");
    // In the database, not only in the node's memory (which answers its own polls).
    assert_eq!(
        cluster
            .query(&format!(
                "SELECT count(*) FROM operations WHERE operation_id = '{operation}'"
            ))
            .expect("query"),
        "1",
        "the operation the device was told of is gone from the database"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let found = loop {
        let reply = device
            .get(&format!(
                "/{scope}/registrations/{rid}/operations/{operation}"
            ))
            .await
            .expect("poll");
        if reply.status != 503 || std::time::Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        found.status == 200 || found.status == 202,
        "the operation the device was told of is gone: {found:?}"
    );
    assert_eq!(found.body["operationId"], operation, "{found:?}");
}

/// The database going away and coming back under a running node: requests fail fast with 503 and
/// 503001 (nothing half-written), and the node serves again once PostgreSQL is back, without a
/// restart of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rides_out_a_database_restart() {
    let cluster = dps_testkit::PgCluster::start().expect("a PostgreSQL cluster of the test's own");
    let url = cluster.url();
    let server = TestServer::start_with_env(
        bin(),
        &[("OPENDPS_STORAGE__URL", url.as_str())],
        &["--hub", HUB],
    )
    .await
    .expect("opendps starts");
    let key = crate::symmetric_group(&server, "restart-devices", serde_json::json!({})).await;
    let api = server.api().expect("client");

    cluster.stop().expect("stop PostgreSQL");
    let started = std::time::Instant::now();
    let refused = api
        .get("/enrollmentGroups/restart-devices")
        .await
        .expect("answer");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["errorCode"], 503001, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("5"), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let device = crate::group_device(&server, &key, "restart-device", Transport::Https);
    let failed = format!(
        "{:#}",
        device.provision(&|_| ()).await.expect_err("no database")
    );
    assert!(failed.contains("503"), "{failed}");

    cluster.start_again().expect("start PostgreSQL again");
    let back = api
        .get("/enrollmentGroups/restart-devices")
        .await
        .expect("answer");
    assert_eq!(back.status, 200, "{back:?}");
    let done = device
        .provision(&|_| ())
        .await
        .expect("provision once the database is back");
    assert_eq!(
        serde_json::to_value(&done).expect("json")["status"],
        "assigned"
    );
}

/// Two nodes on a PostgreSQL server of the test's own, with an in-process hub, under a steady load
/// of registrations through both; the server is stopped and started again in the middle. The
/// nodes answer 503 meanwhile and recover without a restart of their own: every device that keeps
/// trying (as the SDKs do on 503) ends assigned, every accepted operation finishes, and each device
/// is on the hub once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_ride_out_a_database_restart_under_load() {
    let cluster = dps_testkit::PgCluster::start().expect("a PostgreSQL cluster of the test's own");
    let url = cluster.url();
    let env = [("OPENDPS_STORAGE__URL", url.as_str())];
    let (a, b) = two_nodes(&env, &["--hub", HUB]).await;
    // What `opendps info` says about a node now: its pid while it runs.
    let running = |node: &TestServer| {
        let out = node.cli(&["info", "--json"]).expect("info");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        info["running"]["pid"].as_u64()
    };
    let pids = (running(&a), running(&b));
    assert!(pids.0.is_some() && pids.1.is_some(), "{pids:?}");
    let key = crate::symmetric_group(&a, "steady", serde_json::json!({})).await;
    let scope = a.service_info().expect("info").id_scope.clone();
    let apis = [a.api().expect("client"), b.api().expect("client")];
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let devices = 240;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..devices {
        let (scope, key) = (scope.clone(), key.clone());
        let (first, second) = (apis[i % 2].clone(), apis[(i + 1) % 2].clone());
        let (accepted, refused) = (Arc::clone(&accepted), Arc::clone(&refused));
        tasks.spawn(async move {
            // A steady stream: one new device every 10 ms, across the outage.
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let rid = format!("steady-{i:03}");
            let token = registration_token(&scope, &key, &rid);
            let (first, second) = (
                first.with_auth(Some(token.clone())),
                second.with_auth(Some(token)),
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            let operation = loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{rid}: never accepted"
                );
                let reply = send_register(&first, &scope, &rid).await;
                match reply.status.as_u16() {
                    202 => break reply.body["operationId"].as_str().expect("id").to_owned(),
                    503 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    other => panic!("{rid}: register answered {other}: {reply:?}"),
                }
            };
            accepted.fetch_add(1, Ordering::Relaxed);
            loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{rid}: never finished"
                );
                let reply = second
                    .get(&format!(
                        "/{scope}/registrations/{rid}/operations/{operation}"
                    ))
                    .await
                    .expect("poll");
                match reply.status.as_u16() {
                    200 => return (rid, reply.body),
                    202 => {}
                    503 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("{rid}: poll answered {other}: {reply:?}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    while accepted.load(Ordering::Relaxed) < devices / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.stop().expect("stop PostgreSQL under load");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_again().expect("start PostgreSQL again");
    let mut finished = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        finished.push(joined.expect("device task"));
    }
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "no request met the outage: the test shows nothing"
    );
    for (rid, done) in &finished {
        assert_eq!(done["status"], "assigned", "{rid}: {done}");
    }
    assert_eq!((running(&a), running(&b)), pids, "a node restarted");
    let hub = a.hub_api(HUB).expect("hub client");
    let listed = hub.get("/devices?top=1000").await.expect("devices");
    assert_eq!(
        listed.body.as_array().map(Vec::len),
        Some(devices),
        "each device on the hub once"
    );
    eprintln!(
        "{} requests met the outage with 503; all {devices} devices assigned",
        refused.load(Ordering::Relaxed)
    );
}

/// Two nodes on one database and two hubs; 500 devices register through node a, which is killed
/// (SIGKILL) at once: node b finishes every accepted operation, each device ends `assigned` and
/// has an identity on its assigned hub only. Leases are 5 s here so that the test does not wait
/// out the default minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_registrations_are_finished_by_the_other() {
    let schema = PgSchema::create("crash").expect("a test schema on the local PostgreSQL");
    let url = schema.url();
    let env = [
        ("OPENDPS_STORAGE__URL", url.as_str()),
        ("OPENDPS_PROVISIONING__OPERATION_LEASE_SECS", "5"),
        ("OPENDPS_PROVISIONING__HUB_TIMEOUT_SECS", "2"),
        ("OPENDPS_PROVISIONING__WEBHOOK_TIMEOUT_MS", "2000"),
    ];
    let (mut a, b) = two_nodes(&env, &[]).await;
    let hubs = [
        dps_testkit::ScriptedHub::start(a.data_dir())
            .await
            .expect("hub 1"),
        dps_testkit::ScriptedHub::start(a.data_dir())
            .await
            .expect("hub 2"),
    ];
    for hub in &hubs {
        let linked = a
            .api()
            .expect("client")
            .post(
                "/linkedHubs",
                serde_json::json!({"connectionString": hub.connection_string("iothubowner").expect("cs")}),
            )
            .await
            .expect("link");
        assert!(linked.status.is_success(), "{linked:?}");
    }
    let key = crate::symmetric_group(&a, "crash-devices", serde_json::json!({})).await;
    let scope = a.service_info().expect("info").id_scope.clone();

    let api = a.api().expect("client");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500 {
        let (api, scope, key) = (api.clone(), scope.clone(), key.clone());
        tasks.spawn(async move {
            let rid = format!("crash-{i:03}");
            let (token, operation) = register(&api, &scope, &key, &rid).await;
            (rid, token, operation)
        });
    }
    let mut accepted = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        accepted.push(joined.expect("task"));
    }
    a.kill();
    let pending = schema
        .query("SELECT count(*) FROM operations WHERE pending")
        .expect("count");
    eprintln!("{pending} of 500 operations were unfinished when node a was killed");

    let api = b.api().expect("client");
    for (rid, token, operation) in &accepted {
        let poller = api.with_auth(Some(token.clone()));
        let done =
            crate::poll_until_done(&poller, &scope, rid, operation, Duration::from_secs(60)).await;
        assert_eq!(done["status"], "assigned", "{rid}: {done}");
        let assigned = done["registrationState"]["assignedHub"]
            .as_str()
            .expect("hub");
        for hub in &hubs {
            let held = hub
                .minihub()
                .get_device("localhost", rid)
                .await
                .expect("read the hub")
                .is_some();
            assert_eq!(
                held,
                hub.host_name() == assigned,
                "{rid} must exist on {assigned} only (checked {})",
                hub.host_name()
            );
        }
    }
    assert_eq!(
        schema
            .query("SELECT count(*) FROM operations WHERE pending")
            .expect("count"),
        "0"
    );
}
