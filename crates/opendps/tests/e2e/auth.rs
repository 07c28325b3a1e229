//! The service API refuses requests without a valid policy signature, and enforces policy rights.

use dps_core::sas::generate_token;
use dps_testkit::far_future;
use serde_json::json;

use crate::{assert_error, server};

fn group_body() -> serde_json::Value {
    json!({"attestation": {"type": "symmetricKey"}})
}

#[tokio::test]
async fn requests_without_a_valid_signature_are_refused() {
    let server = server().await;
    let api = server.api().expect("client");
    let host = server.service_host();
    let owner = server.policy_key("provisioningserviceowner");
    let token = |resource: &str, key: &str, skn: Option<&str>, expiry: i64| {
        generate_token(resource, key, skn, expiry).expect("token")
    };
    let other_key = dps_core::sas::generate_key();
    let cases = [
        ("no Authorization header", None),
        ("not a SAS", Some("Bearer abc".to_owned())),
        (
            "wrong key",
            Some(token(
                &host,
                &other_key,
                Some("provisioningserviceowner"),
                far_future(),
            )),
        ),
        (
            "expired",
            Some(token(
                &host,
                &owner,
                Some("provisioningserviceowner"),
                far_future() - 7200 - 3600,
            )),
        ),
        (
            "another host",
            Some(token(
                "other-dps.example.net",
                &owner,
                Some("provisioningserviceowner"),
                far_future(),
            )),
        ),
        (
            "unknown policy",
            Some(token(&host, &owner, Some("nosuchpolicy"), far_future())),
        ),
        (
            "no policy name",
            Some(token(&host, &owner, None, far_future())),
        ),
    ];
    for (what, auth) in cases {
        let reply = api
            .with_auth(auth)
            .put("/enrollmentGroups/g1", group_body(), None)
            .await
            .expect("request");
        assert_error(&reply, 401);
        assert_eq!(reply.body["errorCode"], 401002, "{what}");
    }
    // Nothing was written by the refused requests.
    assert_error(&api.get("/enrollmentGroups/g1").await.expect("get"), 404);
}

#[tokio::test]
async fn policy_rights_are_enforced() {
    let server = server().await;
    let api = server.api().expect("client");
    let host = server.service_host();
    assert_eq!(
        api.put("/enrollmentGroups/g1", group_body(), None)
            .await
            .expect("create")
            .status,
        200
    );

    let reader_token = generate_token(
        &host,
        &server.policy_key("enrollmentread"),
        Some("enrollmentread"),
        far_future(),
    )
    .expect("t");
    let reader = api.with_auth(Some(reader_token));
    assert_eq!(
        reader
            .get("/enrollmentGroups/g1")
            .await
            .expect("get")
            .status,
        200
    );
    assert_eq!(
        reader
            .post("/enrollmentGroups/query", json!({"query": "SELECT *"}))
            .await
            .expect("query")
            .status,
        200
    );
    let write = reader
        .put("/enrollmentGroups/g2", group_body(), None)
        .await
        .expect("put");
    assert_error(&write, 403);
    assert!(
        write.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("EnrollmentWrite")
    );
    assert_error(
        &reader
            .delete("/enrollmentGroups/g1", None)
            .await
            .expect("delete"),
        403,
    );
    assert_error(&reader.get("/linkedHubs").await.expect("hubs"), 403);

    let registrar_token = generate_token(
        &host,
        &server.policy_key("registrationstatuswrite"),
        Some("registrationstatuswrite"),
        far_future(),
    )
    .expect("t");
    let registrar = api.with_auth(Some(registrar_token));
    assert_error(
        &registrar.get("/enrollmentGroups/g1").await.expect("get"),
        403,
    );
    assert_eq!(
        registrar
            .post("/registrations/g1/query", json!({}))
            .await
            .expect("query")
            .status,
        200
    );
    assert_error(&api.get("/enrollmentGroups/g2").await.expect("get"), 404);
}

#[tokio::test]
async fn health_and_openapi_need_no_token() {
    let server = server().await;
    let api = server.api().expect("client").with_auth(None);
    let health = api.get("/healthz").await.expect("healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "ok");
    let openapi = api.get("/openapi.json").await.expect("openapi");
    assert_eq!(openapi.status, 200);
    assert!(openapi.body["paths"]["/enrollmentGroups/{id}"]["put"].is_object());
}

/// Credentials are checked before anything else of a request: an unsigned caller gets 401 for a
/// malformed body, bad paging headers, an oversized body or an unknown route alike, never a parser
/// message.
#[tokio::test]
async fn unsigned_requests_learn_nothing_about_their_shape() {
    use dps_testkit::Body;
    use reqwest::Method;

    let server = server().await;
    let anonymous = server.api().expect("client").with_auth(None);
    type Case<'a> = (
        &'a str,
        Method,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Option<Body>,
    );
    let cases: [Case; 5] = [
        (
            "malformed JSON",
            Method::PUT,
            "/enrollmentGroups/g1",
            vec![],
            Some(Body::Raw(b"{not json".to_vec())),
        ),
        (
            "a body of the wrong shape",
            Method::PUT,
            "/enrollments/d1",
            vec![],
            Some(Body::Json(json!({"attestation": ["symmetricKey"]}))),
        ),
        (
            "bad paging header",
            Method::POST,
            "/enrollmentGroups/query",
            vec![("x-ms-max-item-count", "lots")],
            Some(Body::Json(json!({"query": "*"}))),
        ),
        (
            "oversized body",
            Method::PUT,
            "/enrollmentGroups/g1",
            vec![],
            Some(Body::Raw(vec![b' '; 200 * 1024])),
        ),
        (
            "unknown route",
            Method::PATCH,
            "/nothing/here",
            vec![],
            None,
        ),
    ];
    for (what, method, path, headers, body) in cases {
        let reply = anonymous
            .send(method, path, &headers, body)
            .await
            .expect(what);
        assert_error(&reply, 401);
        assert_eq!(reply.body["errorCode"], 401_002, "{what}: {reply:?}");
    }
}
