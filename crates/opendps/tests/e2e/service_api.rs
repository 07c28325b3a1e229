//! The service API over HTTPS: create/replace/get/delete with ETag rules, attestation, queries,
//! bulk operations, registration states, linked hubs, and refusal of bad input.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use dps_testkit::Body;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{assert_error, server};

fn key_len(value: &Value) -> usize {
    B64.decode(value.as_str().unwrap_or_default())
        .map(|k| k.len())
        .unwrap_or(0)
}

/// Both kinds follow the same rules; run the lifecycle against each.
async fn lifecycle(collection: &str, id: &str) {
    let server = server().await;
    let api = server.api().expect("client");
    let path = format!("/{collection}/{id}");

    let created = api
        .put(
            &path,
            json!({"attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await
        .expect("create");
    assert_eq!(created.status, 200, "{created:?}");
    assert_eq!(
        created.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let etag1 = created.body["etag"].as_str().expect("etag").to_owned();
    assert!(
        created.body["attestation"].get("symmetricKey").is_none(),
        "no secrets in responses: {created:?}"
    );
    assert_eq!(created.body["provisioningStatus"], "enabled");
    assert_eq!(
        created.body["reprovisionPolicy"],
        json!({"updateHubAssignment": true, "migrateDeviceData": true})
    );
    assert!(
        created.body["createdDateTimeUtc"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let got = api.get(&path).await.expect("get");
    assert_eq!(got.status, 200);
    assert_eq!(got.body["etag"], etag1.as_str());
    assert!(
        got.body["attestation"].get("symmetricKey").is_none(),
        "GET leaves keys out: {got:?}"
    );

    let attestation = api
        .send(
            Method::POST,
            &format!("{path}/attestationmechanism"),
            &[],
            None,
        )
        .await
        .expect("attestation");
    assert_eq!(attestation.status, 200);
    assert_eq!(attestation.body["type"], "symmetricKey");
    assert_eq!(key_len(&attestation.body["symmetricKey"]["primaryKey"]), 64);
    assert_eq!(
        key_len(&attestation.body["symmetricKey"]["secondaryKey"]),
        64
    );
    let primary = attestation.body["symmetricKey"]["primaryKey"].clone();

    // PUT of an existing item without If-Match: conflict, nothing changed.
    assert_error(
        &api.put(
            &path,
            json!({"attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await
        .expect("put"),
        409,
    );
    // A stale etag: precondition failed.
    assert_error(
        &api.put(
            &path,
            json!({"attestation": {"type": "symmetricKey"}}),
            Some("\"stale\""),
        )
        .await
        .expect("put"),
        412,
    );
    assert_eq!(
        api.get(&path).await.expect("get").body["etag"],
        etag1.as_str()
    );

    // The current etag, unquoted as Node sends it: replaced; keys kept when not given.
    let unquoted = etag1.trim_matches('"');
    let replaced = api
        .put(
            &path,
            json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"}),
            Some(unquoted),
        )
        .await
        .expect("replace");
    assert_eq!(replaced.status, 200, "{replaced:?}");
    let etag2 = replaced.body["etag"].as_str().expect("etag").to_owned();
    assert_ne!(etag1, etag2);
    assert_eq!(replaced.body["provisioningStatus"], "disabled");
    assert_eq!(
        replaced.body["createdDateTimeUtc"],
        created.body["createdDateTimeUtc"]
    );
    let after = api
        .send(
            Method::POST,
            &format!("{path}/attestationmechanism"),
            &[],
            None,
        )
        .await
        .expect("attestation");
    assert_eq!(after.body["symmetricKey"]["primaryKey"], primary);

    // `"*"` (C# quotes it) replaces whatever is there.
    assert_eq!(
        api.put(
            &path,
            json!({"attestation": {"type": "symmetricKey"}}),
            Some("\"*\"")
        )
        .await
        .expect("put")
        .status,
        200
    );

    assert_error(&api.delete(&path, Some(&etag1)).await.expect("delete"), 412);
    let deleted = api.delete(&path, None).await.expect("delete");
    assert_eq!(deleted.status, 204);
    assert_error(&api.get(&path).await.expect("get"), 404);
    assert_error(&api.delete(&path, None).await.expect("delete"), 404);
}

#[tokio::test]
async fn enrollment_group_lifecycle() {
    lifecycle("enrollmentGroups", "contoso-custom-allocated-devices").await;
}

#[tokio::test]
async fn individual_enrollment_lifecycle() {
    lifecycle("enrollments", "breakroom499-contoso-tstrsd-007").await;
}

#[tokio::test]
async fn user_supplied_keys_and_tutorial_settings_round_trip() {
    let server = server().await;
    let api = server.api().expect("client");
    let key =
        "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==";
    let body = json!({
        "enrollmentGroupId": "contoso-custom-allocated-devices",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
        "capabilities": {"iotEdge": true},
        "allocationPolicy": "custom",
        "iotHubs": ["contoso-toasters-hub-1098.azure-devices.net", "contoso-heatpumps-hub-1098.azure-devices.net"],
        "customAllocationDefinition": {"webhookUrl": "https://contoso-function-app-1098.azurewebsites.net/api/HttpTrigger1?code=s3cret", "apiVersion": "2021-10-01"},
        "initialTwin": {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready", "darknessSetting": "medium"}}},
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}
    });
    let created = api
        .put(
            "/enrollmentGroups/contoso-custom-allocated-devices",
            body.clone(),
            None,
        )
        .await
        .expect("create");
    assert_eq!(created.status, 200, "{created:?}");
    for field in [
        "capabilities",
        "allocationPolicy",
        "iotHubs",
        "customAllocationDefinition",
        "initialTwin",
        "reprovisionPolicy",
    ] {
        assert_eq!(created.body[field], body[field], "{field}");
    }
    let attestation = api
        .send(
            Method::POST,
            "/enrollmentgroups/contoso-custom-allocated-devices/attestationmechanism",
            &[],
            None,
        )
        .await
        .expect("a");
    assert_eq!(attestation.body["symmetricKey"]["primaryKey"], key);
}

#[tokio::test]
async fn x509_certificates_are_accepted_in_three_encodings() {
    let server = server().await;
    let api = server.api().expect("client");
    for (i, encode) in [0, 1, 2].into_iter().enumerate() {
        let cert =
            rcgen::generate_simple_self_signed(vec![format!("x509-device-{i}")]).expect("cert");
        let der = cert.cert.der().to_vec();
        let pem = cert.cert.pem();
        let text = match encode {
            0 => pem.clone(),
            1 => B64.encode(&der),
            _ => B64.encode(pem.as_bytes()),
        };
        let path = format!("/enrollments/x509-device-{i}");
        let body = json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": text}}}}});
        let created = api.put(&path, body, None).await.expect("create");
        assert_eq!(created.status, 200, "{created:?}");
        let info = &created.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
        let thumbprint: String = Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        assert_eq!(info["sha256Thumbprint"], thumbprint.as_str());
        assert_eq!(info["version"], 3);
        assert!(
            created.body["attestation"]["x509"]["clientCertificates"]["primary"]
                .get("certificate")
                .is_none()
        );
        let full = api
            .send(
                Method::POST,
                &format!("{path}/attestationmechanism"),
                &[],
                None,
            )
            .await
            .expect("attestation");
        assert_eq!(
            full.body["x509"]["clientCertificates"]["primary"]["certificate"],
            B64.encode(&der).as_str()
        );
    }
    let bad = json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "not a certificate"}}}}});
    let reply = api
        .put("/enrollments/bad-cert", bad, None)
        .await
        .expect("put");
    assert_error(&reply, 400);
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("certificate")
    );
}

#[tokio::test]
async fn tpm_and_group_x509_are_stored_faithfully() {
    let server = server().await;
    let api = server.api().expect("client");
    let ek = B64.encode([7u8; 300]);
    let tpm = api
        .put("/enrollments/tpm-device", json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": ek, "storageRootKey": ek}}}), None)
        .await
        .expect("tpm");
    assert_eq!(tpm.status, 200, "{tpm:?}");
    assert_eq!(
        tpm.body["attestation"]["tpm"]["endorsementKey"],
        ek.as_str()
    );
    // A CA reference names a CA certificate uploaded to the service.
    let mut root = rcgen::CertificateParams::new(Vec::new()).expect("params");
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = root
        .self_signed(&rcgen::KeyPair::generate().expect("key"))
        .expect("root");
    let uploaded = api
        .put(
            "/certificates/my-root",
            json!({"certificate": root.pem()}),
            None,
        )
        .await
        .expect("upload");
    assert_eq!(uploaded.status, 200, "{uploaded:?}");
    let ca = api
        .put("/enrollmentGroups/ca-group", json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "my-root"}}}}), None)
        .await
        .expect("ca");
    assert_eq!(ca.status, 200, "{ca:?}");
    assert_eq!(
        ca.body["attestation"]["x509"]["caReferences"]["primary"],
        "my-root"
    );
    let empty = api
        .put(
            "/enrollmentGroups/empty-x509",
            json!({"attestation": {"type": "x509", "x509": {}}}),
            None,
        )
        .await
        .expect("x");
    assert_error(&empty, 400);
}

#[tokio::test]
async fn queries_page_through_continuation_tokens() {
    let server = server().await;
    let api = server.api().expect("client");
    for id in ["page-c", "page-a", "page-b"] {
        assert_eq!(
            api.put(
                &format!("/enrollments/{id}"),
                json!({"attestation": {"type": "symmetricKey"}}),
                None
            )
            .await
            .expect("put")
            .status,
            200
        );
    }
    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    for _ in 0..10 {
        let mut headers = vec![("x-ms-max-item-count", "1".to_owned())];
        if let Some(token) = &continuation {
            headers.push(("x-ms-continuation", token.clone()));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = api
            .send(
                Method::POST,
                "/enrollments/query",
                &headers,
                Some(Body::Json(json!({"query": "SELECT * FROM enrollments"}))),
            )
            .await
            .expect("query");
        assert_eq!(page.status, 200);
        assert_eq!(page.header("x-ms-item-type"), Some("enrollment"));
        let items = page.body.as_array().expect("array");
        assert_eq!(items.len(), 1);
        assert!(items[0]["attestation"].get("symmetricKey").is_none());
        seen.push(items[0]["registrationId"].as_str().expect("id").to_owned());
        continuation = page.header("x-ms-continuation").map(str::to_owned);
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(seen, ["page-a", "page-b", "page-c"]);
    let groups = api
        .post("/enrollmentGroups/query", json!({"query": "SELECT *"}))
        .await
        .expect("groups");
    assert_eq!(groups.header("x-ms-item-type"), Some("enrollmentGroup"));
    assert_eq!(groups.body, json!([]));
    let bad = api
        .send(
            Method::POST,
            "/enrollments/query",
            &[("x-ms-continuation", "!!garbage!!")],
            None,
        )
        .await
        .expect("bad");
    assert_error(&bad, 400);
}

#[tokio::test]
async fn bulk_operations_report_per_item_errors() {
    let server = server().await;
    let api = server.api().expect("client");
    let item = |id: &str| json!({"registrationId": id, "attestation": {"type": "symmetricKey"}});
    assert_eq!(
        api.put("/enrollments/bulk-1", item("bulk-1"), None)
            .await
            .expect("put")
            .status,
        200
    );
    let reply = api
        .post(
            "/enrollments",
            json!({"mode": "create", "enrollments": [item("bulk-1"), item("bulk-2")]}),
        )
        .await
        .expect("bulk");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body["isSuccessful"], false);
    let errors = reply.body["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["registrationId"], "bulk-1");
    assert_eq!(errors[0]["errorCode"], 409201);
    assert_eq!(
        api.get("/enrollments/bulk-2").await.expect("get").status,
        200
    );

    let stale = json!({"registrationId": "bulk-2", "etag": "\"old\"", "attestation": {"type": "symmetricKey"}});
    let reply = api
        .post(
            "/enrollments",
            json!({"mode": "updateIfMatchETag", "enrollments": [stale]}),
        )
        .await
        .expect("bulk");
    assert_eq!(reply.body["errors"][0]["errorCode"], 412002);

    let groups = json!({"mode": "create", "enrollmentGroups": [{"enrollmentGroupId": "bg", "attestation": {"type": "symmetricKey"}}]});
    let reply = api
        .post("/enrollmentGroups", groups)
        .await
        .expect("bulk groups");
    assert_eq!(reply.body, json!({"isSuccessful": true, "errors": []}));

    let reply = api
        .post(
            "/enrollments",
            json!({"mode": "delete", "enrollments": [item("bulk-1"), item("bulk-2")]}),
        )
        .await
        .expect("bulk");
    assert_eq!(reply.body["isSuccessful"], true);
    assert_error(&api.get("/enrollments/bulk-1").await.expect("get"), 404);

    let eleven: Vec<Value> = (0..11).map(|i| item(&format!("many-{i}"))).collect();
    assert_error(
        &api.post(
            "/enrollments",
            json!({"mode": "create", "enrollments": eleven}),
        )
        .await
        .expect("bulk"),
        400,
    );
    assert_error(&api.get("/enrollments/many-0").await.expect("get"), 404);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error_and_nothing_written() {
    let server = server().await;
    let api = server.api().expect("client");
    let put_raw = |path: &'static str, bytes: Vec<u8>| {
        let api = api.clone();
        async move {
            api.send(Method::PUT, path, &[], Some(Body::Raw(bytes)))
                .await
                .expect("put")
        }
    };
    let malformed = put_raw("/enrollments/dev-a", b"{\"attestation\": ".to_vec()).await;
    assert_error(&malformed, 400);
    assert_eq!(malformed.body["errorCode"], 400001);

    let unknown_type = api
        .put(
            "/enrollments/dev-a",
            json!({"attestation": {"type": "password"}}),
            None,
        )
        .await
        .expect("put");
    assert_error(&unknown_type, 400);
    assert!(
        unknown_type.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("password"),
        "{unknown_type:?}"
    );

    let invalid_id = api
        .put(
            "/enrollments/bad%20id",
            json!({"attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await
        .expect("put");
    assert_error(&invalid_id, 400);
    assert_eq!(invalid_id.body["errorCode"], 400004);
    assert_error(
        &api.put(
            &format!("/enrollments/{}", "a".repeat(129)),
            json!({"attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await
        .expect("put"),
        400,
    );

    let mismatch = api
        .put(
            "/enrollments/dev-a",
            json!({"registrationId": "dev-b", "attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await
        .expect("put");
    assert_error(&mismatch, 400);

    let short_key = api.put("/enrollments/dev-a", json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}), None).await.expect("put");
    assert_error(&short_key, 400);

    let static_two = json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "static", "iotHubs": ["a", "b"]});
    assert_error(
        &api.put("/enrollments/dev-a", static_two, None)
            .await
            .expect("put"),
        400,
    );
    let custom_none =
        json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom"});
    assert_error(
        &api.put("/enrollments/dev-a", custom_none, None)
            .await
            .expect("put"),
        400,
    );

    let mut big =
        br#"{"attestation":{"type":"symmetricKey"},"initialTwin":{"tags":{"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 200 * 1024));
    big.extend(br#""}}}"#);
    let oversized = put_raw("/enrollments/dev-a", big).await;
    assert_error(&oversized, 413);

    assert_error(
        &api.send(Method::PATCH, "/enrollments/dev-a", &[], None)
            .await
            .expect("patch"),
        404,
    );
    assert_error(&api.get("/enrollments/dev-a").await.expect("get"), 404);
}

#[tokio::test]
async fn registration_states_of_a_fresh_group_are_empty() {
    let server = server().await;
    let api = server.api().expect("client");
    assert_eq!(
        api.put(
            "/enrollmentGroups/fresh",
            json!({"attestation": {"type": "symmetricKey"}}),
            None
        )
        .await
        .expect("put")
        .status,
        200
    );
    let reply = api
        .post("/registrations/fresh/query", json!({}))
        .await
        .expect("query");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-ms-item-type"), Some("deviceRegistration"));
    assert_eq!(reply.body, json!([]));
    assert_error(
        &api.get("/registrations/never-registered")
            .await
            .expect("get"),
        404,
    );
    assert_error(
        &api.delete("/registrations/never-registered", None)
            .await
            .expect("delete"),
        404,
    );
}

#[tokio::test]
async fn linked_hubs_keep_their_keys_secret() {
    // Linking checks the hub's rights, so the hub must exist: an in-process one.
    let (server, cs) = crate::server_with_hub("contoso-toasters-hub-1.azure-devices.net").await;
    let api = server.api().expect("client");
    let key = cs.split("SharedAccessKey=").nth(1).expect("key").to_owned();
    // The host name is case-insensitive and stored in lower case.
    let cs = cs.replace(
        "HostName=contoso-toasters-hub-1.azure-devices.net",
        "HostName=Contoso-Toasters-Hub-1.azure-devices.net",
    );
    let added = api
        .post(
            "/linkedHubs",
            json!({"connectionString": cs, "allocationWeight": 3}),
        )
        .await
        .expect("add");
    assert_eq!(added.status, 200, "{added:?}");
    assert_eq!(
        added.body["name"],
        "contoso-toasters-hub-1.azure-devices.net"
    );
    let listed = api.get("/linkedHubs").await.expect("list");
    assert_eq!(listed.body[0]["allocationWeight"], 3);
    assert_eq!(listed.body[0]["applyAllocationPolicy"], true);
    assert!(
        !listed.body.to_string().contains(&key),
        "keys are never returned"
    );
    assert!(!server.log().contains(&key), "keys are never logged");
    assert_error(
        &api.post(
            "/linkedHubs",
            json!({"connectionString": cs, "allocationWeight": 0}),
        )
        .await
        .expect("add"),
        400,
    );
    assert_error(
        &api.post("/linkedHubs", json!({"connectionString": "HostName=x"}))
            .await
            .expect("add"),
        400,
    );
    assert_eq!(
        api.delete("/linkedHubs/contoso-toasters-hub-1.azure-devices.net", None)
            .await
            .expect("delete")
            .status,
        204
    );
    assert_error(
        &api.delete("/linkedHubs/contoso-toasters-hub-1.azure-devices.net", None)
            .await
            .expect("delete"),
        404,
    );
}

/// Strict where a client is wrong, lenient where it only echoes the server: an array where an
/// object belongs is a 400, read-only fields sent back are ignored, and every page size outside
/// 1 to 1000 is refused the same way.
#[tokio::test]
async fn body_shapes_read_only_fields_and_page_sizes() {
    let server = server().await;
    let api = server.api().expect("client");
    for body in [
        json!({"attestation": ["symmetricKey"]}),
        json!({"attestation": {"type": "symmetricKey"}, "reprovisionPolicy": [false, false]}),
    ] {
        let reply = api
            .put("/enrollmentGroups/shapes", body.clone(), None)
            .await
            .expect("put");
        assert_error(&reply, 400);
        assert_eq!(reply.body["errorCode"], 400_001, "{body}: {reply:?}");
    }
    let created = api
        .put(
            "/enrollments/echoer",
            json!({"registrationId": "echoer", "attestation": {"type": "symmetricKey"}}),
            None,
        )
        .await
        .expect("create");
    assert_eq!(created.status, 200, "{created:?}");
    let mut echoed = created.body.clone();
    echoed["registrationState"] = json!({"status": ["bogus"], "registrationId": 7});
    let etag = created.body["etag"].as_str().expect("etag").to_owned();
    let replaced = api
        .put("/enrollments/echoer", echoed, Some(&etag))
        .await
        .expect("replace");
    assert_eq!(
        replaced.status, 200,
        "read-only fields are ignored: {replaced:?}"
    );
    assert!(replaced.body.get("registrationState").is_none());

    for size in ["0", "-5", "1001", "18446744073709551616"] {
        let reply = api
            .send(
                Method::POST,
                "/enrollments/query",
                &[("x-ms-max-item-count", size)],
                Some(dps_testkit::Body::Json(json!({"query": "*"}))),
            )
            .await
            .expect("query");
        assert_error(&reply, 400);
        assert_eq!(reply.body["errorCode"], 400_004, "{size}: {reply:?}");
    }
}

/// Azure accepts `static` without `iotHubs` (Microsoft's SDK tests create such groups) and honours
/// the legacy `iotHubHostName`; more than one hub is still refused.
#[tokio::test]
async fn static_groups_may_name_no_hub_or_use_the_legacy_field() {
    let server = server().await;
    let api = server.api().expect("client");
    for (id, body) in [
        (
            "static-any",
            json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "static"}),
        ),
        (
            "static-legacy",
            json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "static", "iotHubHostName": "hub-a.example"}),
        ),
    ] {
        let reply = api
            .put(&format!("/enrollmentGroups/{id}"), body, None)
            .await
            .expect("put");
        assert_eq!(reply.status, 200, "{id}: {reply:?}");
    }
    let two = json!({"attestation": {"type": "symmetricKey"}, "allocationPolicy": "static", "iotHubs": ["a.example", "b.example"]});
    let refused = api
        .put("/enrollmentGroups/static-two", two, None)
        .await
        .expect("put");
    assert_error(&refused, 400);
}
