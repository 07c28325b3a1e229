//! Process lifecycle: state, ID scope and keys survive a restart; registration states written by the
//! store are served; SIGTERM stops the service cleanly.

use dps_core::ids::Etag;
use dps_core::store::{Precondition, RegistrationStore as _, StoredDoc};
use serde_json::json;

use crate::{assert_error, server};

#[tokio::test]
async fn state_scope_and_keys_survive_a_restart() {
    let mut server = server().await;
    let before = server.info.clone();
    let api = server.api().expect("client");
    assert_eq!(
        api.put(
            "/enrollmentGroups/kept",
            json!({"attestation": {"type": "symmetricKey"}}),
            None
        )
        .await
        .expect("put")
        .status,
        200
    );
    let keys = api
        .post("/enrollmentGroups/kept/attestationmechanism", json!({}))
        .await
        .expect("keys")
        .body;

    server.restart().await.expect("restart");
    let after = server.info.clone();
    assert_eq!(after["idScope"], before["idScope"]);
    assert_eq!(after["policies"][0]["name"], before["policies"][0]["name"]);
    assert_eq!(server.policy_key("provisioningserviceowner").len(), 88);
    let key_before = before["policies"]
        .to_string()
        .split("SharedAccessKey=")
        .nth(1)
        .map(|s| s[..88].to_owned());
    let key_after = after["policies"]
        .to_string()
        .split("SharedAccessKey=")
        .nth(1)
        .map(|s| s[..88].to_owned());
    assert_eq!(key_before, key_after);
    assert_eq!(after["caFile"], before["caFile"]);

    let api = server.api().expect("client");
    let again = api
        .post("/enrollmentGroups/kept/attestationmechanism", json!({}))
        .await
        .expect("keys")
        .body;
    assert_eq!(again, keys);
    assert!(
        server.log().contains("stopped"),
        "SIGTERM leads to a clean stop:\n{}",
        server.log()
    );
}

#[tokio::test]
async fn registration_states_are_served_and_deleted() {
    let mut server = server().await;
    assert!(server.stop().await.expect("stop"), "clean exit on SIGTERM");
    {
        let store =
            dps_store::SqliteStore::open(server.data_dir().join("opendps.db")).expect("open");
        for (id, group) in [
            ("dev-1", Some("grp")),
            ("dev-2", Some("grp")),
            ("solo", None),
        ] {
            let state = json!({
                "registrationId": id, "status": "assigned", "assignedHub": "hub-a.example", "deviceId": id,
                "substatus": "initialAssignment", "etag": "\"v1\"", "createdDateTimeUtc": "2026-01-01T00:00:00.0000000Z"
            });
            let doc = StoredDoc {
                etag: Etag::new("\"v1\""),
                doc: state.to_string(),
            };
            store
                .put_registration(id, group, doc, Precondition::MustNotExist)
                .await
                .expect("seed");
        }
        store.close();
    }
    server.restart().await.expect("start");
    let api = server.api().expect("client");
    let one = api.get("/registrations/DEV-1").await.expect("get");
    assert_eq!(
        one.status, 200,
        "registration ids are case-insensitive: {one:?}"
    );
    assert_eq!(one.body["assignedHub"], "hub-a.example");
    let group = api
        .post("/registrations/grp/query", json!({}))
        .await
        .expect("query");
    assert_eq!(group.body.as_array().map(Vec::len), Some(2));
    assert_error(
        &api.delete("/registrations/dev-1", Some("\"v0\""))
            .await
            .expect("delete"),
        412,
    );
    assert_eq!(
        api.delete("/registrations/dev-1", Some("\"v1\""))
            .await
            .expect("delete")
            .status,
        204
    );
    assert_error(&api.get("/registrations/dev-1").await.expect("get"), 404);
    let (ok, stdout) = {
        let out = server
            .cli(&["registration", "show", "--registration-id", "solo"])
            .expect("cli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(ok && stdout.contains("hub-a.example"), "{stdout}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let server = server().await;
    let pid = server.info["running"]["pid"].as_u64().expect("pid");
    let second = server
        .cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--amqp-listen",
            "127.0.0.1:0",
        ])
        .expect("run");
    assert!(!second.status.success(), "the second server must not start");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("pid {pid}")) && stderr.contains("--data-dir"),
        "the refusal names the holder and what to do: {stderr}"
    );
    assert!(
        server.data_dir().join("runtime.json").exists(),
        "the first server's runtime.json is left alone"
    );
    let info = server.cli(&["info", "--json"]).expect("info");
    assert!(info.status.success());
}

#[tokio::test]
async fn info_reads_the_data_directory_without_the_write_lock() {
    let server = server().await;
    // Another process holds both databases' write locks for as long as `info` runs.
    let dps = rusqlite::Connection::open(server.data_dir().join("opendps.db")).expect("open");
    dps.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let info = server.cli(&["info", "--json"]).expect("info");
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    dps.execute_batch("ROLLBACK").expect("unlock");
}

/// The startup line and `info` name both listeners; a log that goes to a file has no colour codes.
#[tokio::test]
async fn startup_log_and_info_name_the_mqtt_listener() {
    let server = server().await;
    let mqtt = server.info["listen"]["mqtt"]
        .as_str()
        .expect("mqtt")
        .to_owned();
    let log = server.log();
    assert!(log.contains(&format!("MQTT on {mqtt}")), "{log}");
    assert!(!log.contains('\u{1b}'), "no terminal colour codes: {log:?}");
    let info = server.cli(&["info"]).expect("info");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("MQTT listener:") && l.ends_with(&mqtt)),
        "{text}"
    );
}

/// A hub served in-process by an earlier `serve --hub` stays linked; a later `serve` without it
/// warns at startup, naming both ways out.
#[tokio::test]
async fn a_linked_hub_no_longer_served_in_process_is_warned_about() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_opendps"));
    let mut server = dps_testkit::TestServer::start_with(bin, &["--hub", "gone-hub.example"])
        .await
        .expect("start");
    assert!(server.stop().await.expect("stop"));
    let log = server.data_dir().join("plain.log");
    let mut plain = std::process::Command::new(bin)
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
        .arg(server.data_dir())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(&log)
                .expect("log"),
        )
        .spawn()
        .expect("serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("opendps is serving") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let _ = plain.kill();
    let _ = plain.wait();
    assert!(
        text.contains("gone-hub.example")
            && text.contains("--hub gone-hub.example")
            && text.contains("linked-hub delete --linked-hub gone-hub.example"),
        "{text}"
    );
}
