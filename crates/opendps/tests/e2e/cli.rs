//! The admin CLI against a running service: the same round trip as the service SDK, through the
//! real binary, in both output formats.

use serde_json::Value;

use crate::server;

const TUTORIAL_GROUP_KEY: &str =
    "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==";

fn run(server: &dps_testkit::TestServer, args: &[&str]) -> (bool, String, String) {
    let out = server.cli(args).expect("opendps runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `opendps ARGS --output json` against `server`, which must succeed; its JSON.
#[track_caller]
pub(crate) fn json_ok(server: &dps_testkit::TestServer, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let (ok, stdout, stderr) = run(server, &all);
    assert!(ok, "opendps {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn compute_device_key_matches_the_tutorial() {
    let server = server().await;
    for (id, expected) in [
        (
            "breakroom499-contoso-tstrsd-007",
            "JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs=",
        ),
        (
            "mainbuilding167-contoso-hpsd-088",
            "6uejA9PfkQgmYylj8Zerp3kcbeVrGZ172YLa7VSnJzg=",
        ),
    ] {
        let (ok, stdout, stderr) = run(
            &server,
            &[
                "compute-device-key",
                "--key",
                TUTORIAL_GROUP_KEY,
                "--registration-id",
                id,
            ],
        );
        assert!(ok, "{stderr}");
        assert_eq!(stdout.trim(), expected);
    }
}

#[tokio::test]
async fn enrollment_group_round_trip() {
    let server = server().await;
    let group = "contoso-custom-allocated-devices";
    let created = json_ok(
        &server,
        &[
            "enrollment-group",
            "create",
            "--group-id",
            group,
            "--allocation-policy",
            "custom",
            "--webhook-url",
            "https://allocator.example/api/alloc",
            "--iot-hubs",
            "contoso-toasters-hub-1.example contoso-heatpumps-hub-1.example",
            "--initial-twin-tags",
            r#"{"site":"hq"}"#,
            "--initial-twin-properties",
            r#"{"state":"ready"}"#,
            "--reprovision-policy",
            "reprovisionandresetdata",
            "--edge-enabled",
            "false",
        ],
    );
    assert_eq!(created["allocationPolicy"], "custom");
    assert_eq!(created["iotHubs"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        created["initialTwin"]["properties"]["desired"]["state"],
        "ready"
    );
    assert!(created["attestation"].get("symmetricKey").is_none());

    let shown = json_ok(&server, &["enrollment-group", "show", "--group-id", group]);
    assert!(shown["attestation"].get("symmetricKey").is_none());
    let with_keys = json_ok(
        &server,
        &[
            "enrollment-group",
            "show",
            "--group-id",
            group,
            "--show-keys",
        ],
    );
    let primary = with_keys["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("key")
        .to_owned();

    let derived = json_ok(
        &server,
        &[
            "compute-device-key",
            "--group-id",
            group,
            "--registration-id",
            "dev-1",
        ],
    );
    assert_eq!(
        derived["derivedKey"],
        dps_core::sas::derive_device_key(&primary, "dev-1")
            .expect("derive")
            .as_str()
    );

    let listed = json_ok(&server, &["enrollment-group", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let (ok, table, _) = run(&server, &["enrollment-group", "list"]);
    assert!(
        ok && table.contains(group) && table.starts_with("GROUP ID"),
        "{table}"
    );

    // Create again: refused with a hint, non-zero exit.
    let (ok, _, stderr) = run(
        &server,
        &["enrollment-group", "create", "--group-id", group],
    );
    assert!(!ok);
    assert!(
        stderr.contains("409201") && stderr.contains("update"),
        "{stderr}"
    );

    let updated = json_ok(
        &server,
        &[
            "enrollment-group",
            "update",
            "--group-id",
            group,
            "--provisioning-status",
            "disabled",
        ],
    );
    assert_eq!(updated["provisioningStatus"], "disabled");
    assert_eq!(
        updated["allocationPolicy"], "custom",
        "untouched settings stay"
    );
    let kept = json_ok(
        &server,
        &[
            "enrollment-group",
            "show",
            "--group-id",
            group,
            "--show-keys",
        ],
    );
    assert_eq!(
        kept["attestation"]["symmetricKey"]["primaryKey"],
        primary.as_str(),
        "update keeps the keys"
    );

    let (ok, _, stderr) = run(
        &server,
        &[
            "enrollment-group",
            "update",
            "--group-id",
            group,
            "--etag",
            "\"stale\"",
            "--edge-enabled",
            "true",
        ],
    );
    assert!(!ok && stderr.contains("412002"), "{stderr}");

    let registrations = json_ok(&server, &["registration", "list", "--group-id", group]);
    assert_eq!(registrations, serde_json::json!([]));

    let (ok, stdout, stderr) = run(
        &server,
        &["enrollment-group", "delete", "--group-id", group],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Deleted"));
    let (ok, _, stderr) = run(&server, &["enrollment-group", "show", "--group-id", group]);
    assert!(!ok && stderr.contains("404202"), "{stderr}");
}

#[tokio::test]
async fn individual_enrollment_round_trip() {
    let server = server().await;
    let id = "mainbuilding167-contoso-hpsd-088";
    let created = json_ok(
        &server,
        &[
            "enrollment",
            "create",
            "--enrollment-id",
            id,
            "--primary-key",
            TUTORIAL_GROUP_KEY,
            "--device-id",
            "heatpump-1",
            "--allocation-policy",
            "hashed",
        ],
    );
    assert_eq!(created["deviceId"], "heatpump-1");
    let with_keys = json_ok(
        &server,
        &["enrollment", "show", "--enrollment-id", id, "--show-keys"],
    );
    assert_eq!(
        with_keys["attestation"]["symmetricKey"]["primaryKey"],
        TUTORIAL_GROUP_KEY
    );
    assert_eq!(
        json_ok(&server, &["enrollment", "list"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let updated = json_ok(
        &server,
        &[
            "enrollment",
            "update",
            "--enrollment-id",
            id,
            "--secondary-key",
            TUTORIAL_GROUP_KEY,
        ],
    );
    assert_eq!(updated["deviceId"], "heatpump-1");
    let both = json_ok(
        &server,
        &["enrollment", "show", "--enrollment-id", id, "--show-keys"],
    );
    assert_eq!(
        both["attestation"]["symmetricKey"]["primaryKey"],
        TUTORIAL_GROUP_KEY
    );
    assert_eq!(
        both["attestation"]["symmetricKey"]["secondaryKey"],
        TUTORIAL_GROUP_KEY
    );
    let (ok, _, stderr) = run(&server, &["enrollment", "delete", "--enrollment-id", id]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&server, &["enrollment", "show", "--enrollment-id", id]);
    assert!(!ok && stderr.contains("does not exist"), "{stderr}");
}

#[tokio::test]
async fn linked_hub_round_trip_and_info() {
    // Linking checks the hub's rights, so the hub must exist: an in-process one.
    let (server, cs) = crate::server_with_hub("contoso-toasters-hub-7.example").await;
    let key = cs.split("SharedAccessKey=").nth(1).expect("key").to_owned();
    let hub = json_ok(
        &server,
        &[
            "linked-hub",
            "create",
            "--connection-string",
            &cs,
            "--allocation-weight",
            "3",
            "--apply-allocation-policy",
            "false",
        ],
    );
    assert_eq!(hub["name"], "contoso-toasters-hub-7.example");
    assert_eq!(hub["applyAllocationPolicy"], false);
    let (ok, table, _) = run(&server, &["linked-hub", "list"]);
    assert!(
        ok && table.contains("contoso-toasters-hub-7.example") && !table.contains(&key),
        "{table}"
    );
    let info = json_ok(&server, &["info"]);
    assert_eq!(info["linkedHubs"][0]["allocationWeight"], 3);
    assert!(!info["linkedHubs"].to_string().contains(&key));
    let (ok, _, stderr) = run(
        &server,
        &[
            "linked-hub",
            "delete",
            "--linked-hub",
            "contoso-toasters-hub-7.example",
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        json_ok(&server, &["linked-hub", "list"]),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn a_wrong_connection_string_is_explained() {
    let server = server().await;
    let host = server.service_host();
    let bad = format!(
        "HostName={host};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={}",
        dps_core::sas::generate_key()
    );
    let ca = server.info["caFile"].as_str().expect("ca").to_owned();
    let (ok, _, stderr) = run(
        &server,
        &[
            "enrollment-group",
            "list",
            "--login",
            &bad,
            "--ca-file",
            &ca,
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("401002") && stderr.contains("connection string"),
        "{stderr}"
    );
}

/// `opendps demo` reproduces the tutorial over both transports and leaves nothing behind.
#[test]
fn the_demo_reproduces_the_tutorial() {
    for transport in ["mqtt", "https"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_opendps"))
            .args(["demo", "--suffix", "1098", "--transport", transport])
            .env("TMPDIR", tmp.path())
            .output()
            .expect("opendps demo runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "demo over {transport} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in [
            "Registration Information received from service: contoso-toasters-hub-1098.azure-devices.net, deviceId: breakroom499-contoso-tstrsd-007",
            "Registration Information received from service: contoso-heatpumps-hub-1098.azure-devices.net, deviceId: mainbuilding167-contoso-hpsd-088",
            "Provisioning Status: PROV_DEVICE_REG_STATUS_CONNECTED",
            "error 400207: Custom allocation failed with status code: 400: Unrecognized device registration.",
            "\"darknessSetting\": \"medium\"",
            "\"temperatureSetting\": \"65\"",
            "Everything happened as the tutorial says",
        ] {
            assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
        }
        assert!(!stdout.contains("?code="), "the function key is not shown");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("tmp")
            .collect::<Result<_, _>>()
            .expect("entries");
        assert!(left.is_empty(), "the demo left {left:?} behind");
    }
}

/// `opendps bench` over both transports: every device assigned, a baseline and a ratio reported,
/// its own group removed afterwards. (The figures themselves belong in docs/performance.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_registers_every_device_and_reports_the_baseline() {
    let server = dps_testkit::TestServer::start_with(
        std::path::Path::new(env!("CARGO_BIN_EXE_opendps")),
        &[
            "--hub",
            "bench-a.azure-devices.net",
            "--hub",
            "bench-b.azure-devices.net",
        ],
    )
    .await
    .expect("start");
    for transport in ["https", "mqtt"] {
        let report = json_ok(
            &server,
            &[
                "bench",
                "--devices",
                "40",
                "--concurrency",
                "8",
                "--transport",
                transport,
                "--poll-interval-ms",
                "10",
            ],
        );
        let registrations = &report["registrations"];
        assert_eq!(registrations["assigned"], 40, "{report}");
        assert_eq!(registrations["errors"], serde_json::json!({}), "{report}");
        assert!(report["baseline"]["connectionsPerSec"].as_f64() > Some(0.0));
        assert!(report["ratioToBaseline"].as_f64() > Some(0.0));
        // The server's CPU, from its own counter: every TLS handshake and registration costs some.
        assert!(
            report["baseline"]["serverCpuMsPerConnection"].as_f64() >= Some(0.0),
            "{report}"
        );
        assert!(
            registrations["serverCpuMsPerRegistration"].as_f64() > Some(0.0),
            "{report}"
        );
        // And the load generator's own.
        assert!(
            report["baseline"]["benchCpuMsPerConnection"].as_f64() >= Some(0.0),
            "{report}"
        );
        assert!(
            registrations["benchCpuMsPerRegistration"].as_f64() > Some(0.0),
            "{report}"
        );
        for q in ["p50", "p95", "p99", "max"] {
            assert!(
                registrations["latencyMs"][q].as_f64() > Some(0.0),
                "{report}"
            );
        }
        assert!(
            registrations["serviceLatencyMs"]["p99"].as_f64()
                <= registrations["latencyMs"]["p99"].as_f64()
        );
        let groups = json_ok(&server, &["enrollment-group", "list"]);
        assert_eq!(groups, serde_json::json!([]), "the bench removes its group");
    }
    // X.509: each device its own certificate under a verified test root, symmetric-key devices
    // first for comparison; the root and both groups are removed afterwards.
    for transport in ["https", "mqtt"] {
        let report = json_ok(
            &server,
            &[
                "bench",
                "--devices",
                "20",
                "--concurrency",
                "4",
                "--transport",
                transport,
                "--poll-interval-ms",
                "10",
                "--no-baseline",
                "--attestation",
                "x509",
            ],
        );
        assert_eq!(report["attestation"], "x509", "{report}");
        for part in ["registrations", "symmetricKeyRegistrations"] {
            assert_eq!(report[part]["assigned"], 20, "{report}");
            assert_eq!(report[part]["errors"], serde_json::json!({}), "{report}");
            assert!(
                report[part]["serverCpuMsPerRegistration"].as_f64() > Some(0.0),
                "{report}"
            );
        }
        assert!(
            report["ratioToSymmetricKey"].as_f64() > Some(0.0),
            "{report}"
        );
        assert_eq!(
            json_ok(&server, &["enrollment-group", "list"]),
            serde_json::json!([])
        );
        assert_eq!(
            json_ok(&server, &["certificate", "list"]),
            serde_json::json!([])
        );
    }
    // The X.509 devices registered through the X.509 group, whose only attestation is the CA
    // reference (kept to look at, then removed).
    let report = json_ok(
        &server,
        &[
            "bench",
            "--devices",
            "2",
            "--no-baseline",
            "--attestation",
            "x509",
            "--keep-group",
            "--poll-interval-ms",
            "10",
        ],
    );
    let group = report["group"].as_str().expect("group");
    let states = json_ok(&server, &["registration", "list", "--group-id", group]);
    let states = states.as_array().expect("states");
    assert_eq!(states.len(), 2, "{states:?}");
    for state in states {
        assert_eq!(state["status"], "assigned", "{state}");
        assert!(
            state["registrationId"]
                .as_str()
                .is_some_and(|id| id.starts_with(group))
        );
    }
    for kept in json_ok(&server, &["enrollment-group", "list"])
        .as_array()
        .expect("groups")
    {
        let id = kept["enrollmentGroupId"].as_str().expect("id");
        assert!(run(&server, &["enrollment-group", "delete", "--group-id", id]).0);
    }
    assert!(
        run(
            &server,
            &["certificate", "delete", "--certificate-name", group]
        )
        .0
    );
    let refused = run(
        &server,
        &[
            "bench",
            "--devices",
            "1",
            "--transport",
            "mqtt",
            "--reuse-connections",
        ],
    );
    assert!(!refused.0 && refused.2.contains("--reuse-connections is for HTTPS"));
}

#[tokio::test]
async fn bench_without_a_hub_fails_and_says_what_to_do() {
    let server = server().await;
    let (ok, stdout, stderr) = run(
        &server,
        &[
            "bench",
            "--devices",
            "4",
            "--concurrency",
            "2",
            "--poll-interval-ms",
            "10",
            "--no-baseline",
        ],
    );
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("failed 400211: 4"), "{stdout}");
    assert!(
        stderr.contains("4 of 4 devices were not assigned") && stderr.contains("linked-hub create"),
        "{stderr}"
    );
}

/// Ctrl-C during `opendps demo` still stops its service and removes its data directory (keys).
#[test]
fn an_interrupted_demo_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let demo = std::process::Command::new(env!("CARGO_BIN_EXE_opendps"))
        .args(["demo", "--suffix", "1099"])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("opendps demo runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(tmp.path()).expect("tmp").next().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the demo never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let out = demo.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains("Everything happened as the tutorial says") {
        // Finished before the signal landed: nothing to test, and nothing may be left either.
    } else {
        assert!(!out.status.success(), "{stdout}");
        assert!(stdout.contains("Interrupted"), "{stdout}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("tmp")
        .collect::<Result<_, _>>()
        .expect("entries");
    assert!(left.is_empty(), "the demo left {left:?} behind:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_fleet_from_the_test_chain_to_the_hub() {
    let (server, _) = crate::server_with_hub("contoso-cli-x509-hub.azure-devices.net").await;
    let pki = tempfile::tempdir().expect("tempdir");
    let out = pki.path().to_string_lossy().into_owned();
    let (ok, stdout, stderr) = run(
        &server,
        &[
            "certificate",
            "make-test-chain",
            "--out",
            &out,
            "--device",
            "cli-sensor-1",
            "--device",
            "cli-sensor-2",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("TEST"), "marked as test material: {stdout}");
    let file = |name: &str| pki.path().join(name).to_string_lossy().into_owned();

    // Upload the root; prove possession of its key with a certificate signed by it.
    let root = json_ok(
        &server,
        &[
            "certificate",
            "create",
            "--certificate-name",
            "test-root",
            "--path",
            &file("root.pem"),
        ],
    );
    assert_eq!(root["properties"]["isVerified"], false);
    let code = json_ok(
        &server,
        &[
            "certificate",
            "generate-verification-code",
            "--certificate-name",
            "test-root",
        ],
    );
    let code = code["properties"]["verificationCode"]
        .as_str()
        .expect("code")
        .to_owned();
    let root_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(file("root.key")).expect("key"))
            .expect("root key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(file("root.pem")).expect("root"),
        root_key,
    )
    .expect("the root as an issuer");
    let mut proof = rcgen::CertificateParams::new(Vec::new()).expect("params");
    proof
        .distinguished_name
        .push(rcgen::DnType::CommonName, code.as_str());
    let proof = proof
        .signed_by(&rcgen::KeyPair::generate().expect("key"), &issuer)
        .expect("proof");
    std::fs::write(pki.path().join("proof.pem"), proof.pem()).expect("write");
    let verified = json_ok(
        &server,
        &[
            "certificate",
            "verify",
            "--certificate-name",
            "test-root",
            "--path",
            &file("proof.pem"),
        ],
    );
    assert_eq!(verified["properties"]["isVerified"], true);
    let (ok, table, _) = run(&server, &["certificate", "list"]);
    assert!(
        ok && table.contains("test-root") && table.contains("true"),
        "{table}"
    );

    let group = json_ok(
        &server,
        &[
            "enrollment-group",
            "create",
            "--enrollment-id",
            "cli-sensors",
            "--attestation-type",
            "x509",
            "--certificate-path",
            &file("intermediate.pem"),
        ],
    );
    assert_eq!(group["attestation"]["type"], "x509", "{group}");

    let mqtt_port = server
        .service_info()
        .expect("info")
        .listen
        .mqtt
        .expect("mqtt")
        .port()
        .to_string();
    for (rid, transport) in [("cli-sensor-1", "https"), ("cli-sensor-2", "mqtt")] {
        let (ok, stdout, stderr) = run(
            &server,
            &[
                "device",
                "register",
                "--registration-id",
                rid,
                "--cert",
                &file(&format!("{rid}.pem")),
                "--key",
                &file(&format!("{rid}.key")),
                "--transport",
                transport,
                "--mqtt-port",
                &mqtt_port,
                "--connect",
            ],
        );
        assert!(ok, "{rid}: {stdout} {stderr}");
        assert!(stdout.contains(&format!("deviceId: {rid}")), "{stdout}");
        assert!(stdout.contains(&format!("as {rid}. Twin:")), "{stdout}");
    }
    // A device certificate is not a CA: it cannot be uploaded as one.
    let (ok, _, stderr) = run(
        &server,
        &[
            "certificate",
            "create",
            "--certificate-name",
            "leaf",
            "--path",
            &file("cli-sensor-1.pem"),
        ],
    );
    assert!(!ok && stderr.contains("not a CA"), "{stderr}");
    let (ok, _, stderr) = run(
        &server,
        &["certificate", "delete", "--certificate-name", "test-root"],
    );
    assert!(ok, "{stderr}");
}
