//! The service on PostgreSQL (`storage.url`): devices register through it over HTTPS and MQTT, the
//! CLI finds it, its state is in the database and survives a restart; a database it cannot use
//! stops it at startup with what to check.

use std::path::Path;
use std::process::Command;

use dps_device::Transport;
use dps_testkit::{PgSchema, TestServer};

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
        let derived = dps_core::sas::derive_device_key(&key, rid).expect("derive");
        let done = crate::keyed_device(&server, rid, &derived, transport)
            .provision(&|_| ())
            .await
            .expect("provision");
        assert_eq!(
            serde_json::to_value(&done).expect("json")["status"],
            "assigned"
        );
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
    let dir = tempfile::tempdir().expect("dir");
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
        let out = Command::new(bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--amqp-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--storage-url", &url])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: started anyway: {stderr}");
        assert!(
            stderr.contains(says),
            "{url}: the error should say '{says}': {stderr}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{url}: took {:?} to fail",
            started.elapsed()
        );
    }
}
