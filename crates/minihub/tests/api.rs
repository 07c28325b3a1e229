//! minihub over real TLS: the router behind `dps_http::serve` on port 0, reached by hub names that do
//! not resolve (the client pins them to the listener), spoken to in the IoT Hub REST protocol.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dps_core::sas::{derive_device_key, generate_key, generate_token};
use minihub::{HubInfo, Minihub};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod common;

use common::{now, tls_for};

const HUB_A: &str = "contoso-toasters-hub-1.azure-devices.net";
const HUB_B: &str = "contoso-toasters-hub-2.azure-devices.net";
const UNKNOWN: &str = "nobody-hub.azure-devices.net";

/// A running minihub.
struct Server {
    minihub: Arc<Minihub>,
    addr: SocketAddr,
    client: reqwest::Client,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(db: &Path, hubs: &[&str]) -> Self {
        let minihub = Arc::new(Minihub::open(db).expect("open"));
        for hub in hubs {
            minihub.ensure_hub(hub).await.expect("hub");
        }
        let tls = tls_for(&[HUB_A, HUB_B, UNKNOWN]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(dps_http::serve(
            listener,
            tokio_rustls::TlsAcceptor::from(tls.server),
            minihub::router(Arc::clone(&minihub)),
            dps_http::HttpLimits::default(),
            stopped,
        ));
        let ca = reqwest::Certificate::from_pem(tls.ca_pem.as_bytes()).expect("CA pem");
        let client = reqwest::Client::builder()
            .tls_certs_only([ca])
            .resolve(HUB_A, addr)
            .resolve(HUB_B, addr)
            .resolve(UNKNOWN, addr)
            .build()
            .expect("client");
        Self {
            minihub,
            addr,
            client,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.expect("server task");
    }

    async fn info(&self, hub: &str) -> HubInfo {
        self.minihub.ensure_hub(hub).await.expect("hub")
    }

    fn url(&self, hub: &str, path: &str) -> String {
        format!(
            "https://{hub}:{}{path}?api-version=2021-04-12",
            self.addr.port()
        )
    }

    /// A request with `hub`'s `policy` token.
    async fn call(
        &self,
        hub: &str,
        policy: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let info = self.info(hub).await;
        let key = info.policy(policy).expect("policy").primary_key.expose();
        let token = generate_token(hub, key, Some(policy), now() + 600).expect("token");
        self.raw(hub, method, path, Some(&token), headers, body)
            .await
    }

    async fn owner(
        &self,
        hub: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        self.call(hub, "iothubowner", method, path, headers, body)
            .await
    }

    async fn raw(
        &self,
        hub: &str,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut request = self.client.request(method, self.url(hub, path));
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("send");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn error_code(&self) -> Option<&str> {
        self.header("iothub-errorcode")
    }

    #[track_caller]
    fn expect(self, status: StatusCode) -> Self {
        assert_eq!(self.status, status, "body: {}", self.body);
        self
    }
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("minihub.db")
}

fn sas_device(id: &str) -> Value {
    json!({"deviceId": id, "status": "enabled",
           "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}},
           "capabilities": {"iotEdge": false}})
}

#[tokio::test]
async fn two_hubs_on_one_listener_are_kept_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A, HUB_B]).await;
    server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::OK);
    let missing = server
        .owner(HUB_B, Method::GET, "/devices/d1", &[], None)
        .await
        .expect(StatusCode::NOT_FOUND);
    assert_eq!(missing.error_code(), Some("DeviceNotFound"));
    assert_eq!(
        missing.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert!(
        missing.body["Message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ErrorCode:DeviceNotFound;")),
        "{}",
        missing.body
    );
    assert!(missing.body["ExceptionMessage"].is_string());
    server
        .owner(HUB_A, Method::GET, "/devices/d1", &[], None)
        .await
        .expect(StatusCode::OK);

    // A token for hub A, presented to hub B.
    let a_key = server.info(HUB_A).await.connection_string();
    let a_key = a_key.rsplit_once("SharedAccessKey=").expect("key").1;
    let token = generate_token(HUB_A, a_key, Some("iothubowner"), now() + 600).expect("token");
    let wrong_hub = server
        .raw(HUB_B, Method::GET, "/devices/d1", Some(&token), &[], None)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    assert_eq!(wrong_hub.error_code(), Some("IotHubUnauthorizedAccess"));
    // Same audience, right hub, but hub B's keys are not hub A's.
    let token = generate_token(HUB_B, a_key, Some("iothubowner"), now() + 600).expect("token");
    server
        .raw(HUB_B, Method::GET, "/devices/d1", Some(&token), &[], None)
        .await
        .expect(StatusCode::UNAUTHORIZED);

    let unknown = server
        .raw(UNKNOWN, Method::GET, "/devices/d1", None, &[], None)
        .await
        .expect(StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_code(), Some("IotHubNotFound"));
    assert!(
        unknown.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains(UNKNOWN)),
        "{}",
        unknown.body
    );
    assert_eq!(
        server
            .minihub
            .hub_for_host("Contoso-Toasters-Hub-2.azure-devices.net:443"),
        Some(HUB_B.to_owned())
    );
    server.stop().await;
}

#[tokio::test]
async fn auth_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A]).await;
    let no_sas = server
        .raw(HUB_A, Method::GET, "/devices", None, &[], None)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    assert_eq!(no_sas.error_code(), Some("IotHubUnauthorizedAccess"));
    let wrong_key =
        generate_token(HUB_A, &generate_key(), Some("iothubowner"), now() + 600).expect("token");
    server
        .raw(HUB_A, Method::GET, "/devices", Some(&wrong_key), &[], None)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    let info = server.info(HUB_A).await;
    let owner_key = info
        .policy("iothubowner")
        .expect("owner")
        .primary_key
        .expose();
    let expired =
        generate_token(HUB_A, owner_key, Some("iothubowner"), now() - 3600).expect("token");
    let reply = server
        .raw(HUB_A, Method::GET, "/devices", Some(&expired), &[], None)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    assert!(
        reply.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("expired"))
    );
    // The secondary key works too, and a port in the audience is fine.
    let secondary = info
        .policy("iothubowner")
        .expect("owner")
        .secondary_key
        .expose();
    let with_port = generate_token(
        &format!("{HUB_A}:{}", server.addr.port()),
        secondary,
        Some("iothubowner"),
        now() + 600,
    )
    .expect("token");
    server
        .raw(HUB_A, Method::GET, "/devices", Some(&with_port), &[], None)
        .await
        .expect(StatusCode::OK);

    // Read-only policies read but do not write.
    server
        .call(HUB_A, "registryRead", Method::GET, "/devices", &[], None)
        .await
        .expect(StatusCode::OK);
    let refused = server
        .call(
            HUB_A,
            "registryRead",
            Method::PUT,
            "/devices/d1",
            &[],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::UNAUTHORIZED);
    assert!(
        refused.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("RegistryWrite")),
        "{}",
        refused.body
    );
    server
        .call(
            HUB_A,
            "registryReadWrite",
            Method::PUT,
            "/devices/d1",
            &[],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::OK);
    // `service` may not touch identities but may work with twins; `device` may do neither.
    server
        .call(HUB_A, "service", Method::GET, "/devices/d1", &[], None)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    server
        .call(
            HUB_A,
            "service",
            Method::PATCH,
            "/twins/d1",
            &[],
            Some(json!({"tags": {"a": 1}})),
        )
        .await
        .expect(StatusCode::OK);
    server
        .call(HUB_A, "device", Method::GET, "/twins/d1", &[], None)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    server.stop().await;
}

/// Replaces d1 once (so its first etag is stale); returns (stale, current) etags, quoted.
async fn replaced_once(server: &Server) -> (String, String) {
    let created = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::OK);
    let stale = format!("\"{}\"", created.body["etag"].as_str().expect("etag"));
    let updated = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[("If-Match", &stale)],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::OK);
    let current = format!("\"{}\"", updated.body["etag"].as_str().expect("etag"));
    (stale, current)
}

#[tokio::test]
async fn devices_are_created_with_generated_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A]).await;
    let created = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::OK);
    let device = &created.body;
    assert_eq!(device["deviceId"], "d1");
    assert_eq!(device["status"], "enabled");
    assert_eq!(device["connectionState"], "Disconnected");
    assert_eq!(device["cloudToDeviceMessageCount"], 0);
    assert_eq!(device["capabilities"]["iotEdge"], false);
    assert!(
        device["generationId"]
            .as_str()
            .is_some_and(|g| !g.is_empty())
    );
    let keys = &device["authentication"]["symmetricKey"];
    let primary = keys["primaryKey"].as_str().expect("primary").to_owned();
    let secondary = keys["secondaryKey"].as_str().expect("secondary").to_owned();
    for key in [&primary, &secondary] {
        assert_eq!(dps_core::sas::decode_key(key).map(|k| k.len()), Some(64));
    }
    assert_ne!(primary, secondary);
    let etag = device["etag"].as_str().expect("etag").to_owned();
    assert_eq!(created.header("etag"), Some(format!("\"{etag}\"").as_str()));

    let again = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::CONFLICT);
    assert_eq!(again.error_code(), Some("DeviceAlreadyExists"));

    server.stop().await;
}

#[tokio::test]
async fn replacing_a_device_needs_its_current_etag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A]).await;
    let created = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[],
            Some(sas_device("d1")),
        )
        .await
        .expect(StatusCode::OK);
    let device = &created.body;
    let etag = device["etag"].as_str().expect("etag").to_owned();

    // Replace with the etag, quoted as the Python client sends it: keys given are kept.
    let new_keys = (generate_key(), generate_key());
    let update = json!({"deviceId": "d1", "status": "disabled", "etag": etag,
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_keys.0, "secondaryKey": new_keys.1}}});
    let quoted = format!("\"{etag}\"");
    let updated = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[("If-Match", &quoted)],
            Some(update.clone()),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(updated.body["status"], "disabled");
    assert_eq!(
        updated.body["authentication"]["symmetricKey"]["primaryKey"],
        new_keys.0
    );
    assert_eq!(updated.body["generationId"], device["generationId"]);
    let new_etag = updated.body["etag"].as_str().expect("etag").to_owned();
    assert_ne!(new_etag, etag);
    let stale = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d1",
            &[("If-Match", &quoted)],
            Some(update),
        )
        .await
        .expect(StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.error_code(), Some("PreconditionFailed"));

    // An etag for a device that does not exist is 404; `*` creates.
    server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d2",
            &[("If-Match", "\"MTIz\"")],
            Some(sas_device("d2")),
        )
        .await
        .expect(StatusCode::NOT_FOUND);
    server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d2",
            &[("If-Match", "*")],
            Some(sas_device("d2")),
        )
        .await
        .expect(StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn self_signed_devices_and_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A]).await;
    let x509 = json!({"deviceId": "d3", "authentication": {"type": "selfSigned",
        "x509Thumbprint": {"primaryThumbprint": "AB".repeat(20), "secondaryThumbprint": null}}});
    let x509 = server
        .owner(HUB_A, Method::PUT, "/devices/d3", &[], Some(x509))
        .await
        .expect(StatusCode::OK);
    assert_eq!(x509.body["authentication"]["type"], "selfSigned");
    assert_eq!(
        x509.body["authentication"]["symmetricKey"]["primaryKey"],
        Value::Null
    );
    // Bad input is a 400 with the IoT Hub code.
    let bad = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/d4",
            &[],
            Some(json!({"deviceId": "other"})),
        )
        .await
        .expect(StatusCode::BAD_REQUEST);
    assert_eq!(bad.error_code(), Some("ArgumentInvalid"));

    server.stop().await;
}

#[tokio::test]
async fn devices_are_listed_and_deleted_by_etag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A]).await;
    let (quoted, current) = replaced_once(&server).await;
    for id in ["d2", "d3"] {
        server
            .owner(
                HUB_A,
                Method::PUT,
                &format!("/devices/{id}"),
                &[],
                Some(sas_device(id)),
            )
            .await
            .expect(StatusCode::OK);
    }
    let list = server
        .owner(HUB_A, Method::GET, "/devices", &[], None)
        .await
        .expect(StatusCode::OK);
    let ids: Vec<&str> = list
        .body
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .collect();
    assert_eq!(ids, ["d1", "d2", "d3"]);
    let info = server.info(HUB_A).await;
    let key = info
        .policy("iothubowner")
        .expect("owner")
        .primary_key
        .expose();
    let token = generate_token(HUB_A, key, Some("iothubowner"), now() + 600).expect("token");
    let top: Value = server
        .client
        .get(format!(
            "https://{HUB_A}:{}/devices?top=2&api-version=2021-04-12",
            server.addr.port()
        ))
        .header("Authorization", token)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(top.as_array().map(Vec::len), Some(2));

    server
        .owner(
            HUB_A,
            Method::DELETE,
            "/devices/d1",
            &[("If-Match", &quoted)],
            None,
        )
        .await
        .expect(StatusCode::PRECONDITION_FAILED);
    server
        .owner(
            HUB_A,
            Method::DELETE,
            "/devices/d1",
            &[("If-Match", &current)],
            None,
        )
        .await
        .expect(StatusCode::NO_CONTENT);
    server
        .owner(
            HUB_A,
            Method::DELETE,
            "/devices/d2",
            &[("If-Match", "\"*\"")],
            None,
        )
        .await
        .expect(StatusCode::NO_CONTENT);
    server
        .owner(HUB_A, Method::GET, "/devices/d1", &[], None)
        .await
        .expect(StatusCode::NOT_FOUND);
    server
        .owner(HUB_A, Method::GET, "/twins/d1", &[], None)
        .await
        .expect(StatusCode::NOT_FOUND);
    server
        .owner(
            HUB_A,
            Method::DELETE,
            "/devices/d1",
            &[("If-Match", "*")],
            None,
        )
        .await
        .expect(StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn twin_patch_and_replace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A]).await;
    server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/t1",
            &[],
            Some(sas_device("t1")),
        )
        .await
        .expect(StatusCode::OK);
    let twin = server
        .owner(HUB_A, Method::GET, "/twins/t1", &[], None)
        .await
        .expect(StatusCode::OK)
        .body;
    assert_eq!(twin["deviceId"], "t1");
    assert_eq!(twin["version"], 1);
    assert_eq!(twin["etag"], "AAAAAAAAAAE=");
    assert_eq!(twin["properties"]["desired"]["$version"], 1);
    assert_eq!(twin["properties"]["reported"]["$version"], 1);
    assert_eq!(twin["tags"], json!({}));

    let patched = server
        .owner(
            HUB_A,
            Method::PATCH,
            "/twins/t1",
            &[("If-Match", "*")],
            Some(json!({"tags": {"site": "north", "rack": {"row": 1}},
                        "properties": {"desired": {"mode": "eco", "limits": {"lo": 1}}}})),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(patched.body["version"], 2);
    assert_eq!(patched.body["properties"]["desired"]["$version"], 2);
    assert_eq!(patched.body["properties"]["desired"]["mode"], "eco");
    assert!(patched.body["properties"]["desired"]["$metadata"]["mode"]["$lastUpdated"].is_string());
    let etag = patched.body["etag"].as_str().expect("etag").to_owned();
    assert_eq!(patched.header("etag"), Some(format!("\"{etag}\"").as_str()));

    let stale = server
        .owner(
            HUB_A,
            Method::PATCH,
            "/twins/t1",
            &[("If-Match", "\"AAAAAAAAAAE=\"")],
            Some(json!({"tags": {"x": 1}})),
        )
        .await
        .expect(StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.error_code(), Some("PreconditionFailed"));

    let quoted = format!("\"{etag}\"");
    let merged = server
        .owner(
            HUB_A,
            Method::PATCH,
            "/twins/t1",
            &[("If-Match", &quoted)],
            Some(json!({"tags": {"rack": {"slot": 4}, "site": null},
                        "properties": {"desired": {"mode": null, "limits": {"hi": 9}},
                                       "reported": {"sneaky": true}}})),
        )
        .await
        .expect(StatusCode::OK)
        .body;
    assert_eq!(merged["tags"], json!({"rack": {"row": 1, "slot": 4}}));
    let desired = &merged["properties"]["desired"];
    assert_eq!(desired["limits"], json!({"lo": 1, "hi": 9}));
    assert!(desired.get("mode").is_none());
    assert_eq!(desired["$version"], 3);
    assert!(merged["properties"]["reported"].get("sneaky").is_none());

    let replaced = server
        .owner(
            HUB_A,
            Method::PUT,
            "/twins/t1",
            // The Python client quotes the wildcard.
            &[("If-Match", "\"*\"")],
            Some(json!({"tags": {"owner": "ops"}, "properties": {"desired": {"fan": 2}}})),
        )
        .await
        .expect(StatusCode::OK)
        .body;
    assert_eq!(replaced["tags"], json!({"owner": "ops"}));
    assert_eq!(replaced["properties"]["desired"]["fan"], 2);
    assert!(replaced["properties"]["desired"].get("limits").is_none());
    assert_eq!(replaced["properties"]["desired"]["$version"], 4);
    assert_eq!(replaced["version"], 4);

    // What the API returns is what the library returns.
    let twin = server
        .minihub
        .get_twin(HUB_A, "t1")
        .await
        .expect("twin")
        .expect("present");
    assert_eq!(serde_json::to_value(&twin).expect("json"), replaced);
    server
        .owner(
            HUB_A,
            Method::PATCH,
            "/twins/none",
            &[],
            Some(json!({"tags": {}})),
        )
        .await
        .expect(StatusCode::NOT_FOUND);
    let bad = server
        .owner(
            HUB_A,
            Method::PATCH,
            "/twins/t1",
            &[],
            Some(json!({"tags": {"a.b": 1}})),
        )
        .await
        .expect(StatusCode::BAD_REQUEST);
    assert_eq!(bad.error_code(), Some("ArgumentInvalid"));
    server.stop().await;
}

#[tokio::test]
async fn query_with_paging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A, HUB_B]).await;
    for id in ["q1", "q2", "q3", "q4", "q5"] {
        server
            .owner(
                HUB_A,
                Method::PUT,
                &format!("/devices/{id}"),
                &[],
                Some(sas_device(id)),
            )
            .await
            .expect(StatusCode::OK);
    }
    server
        .owner(
            HUB_B,
            Method::PUT,
            "/devices/other",
            &[],
            Some(sas_device("other")),
        )
        .await
        .expect(StatusCode::OK);
    server
        .owner(
            HUB_A,
            Method::PATCH,
            "/twins/q4",
            &[],
            Some(json!({"tags": {"site": "north"}})),
        )
        .await
        .expect(StatusCode::OK);
    let all = server
        .owner(
            HUB_A,
            Method::POST,
            "/devices/query",
            &[],
            Some(json!({"query": "SELECT * FROM devices"})),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(all.header("x-ms-item-type"), Some("twin"));
    assert_eq!(all.header("x-ms-continuation"), None);
    assert_eq!(all.body.as_array().map(Vec::len), Some(5));
    assert!(all.body[0]["properties"]["desired"]["$version"].is_number());

    let one = server
        .owner(
            HUB_A,
            Method::POST,
            "/devices/query",
            &[],
            Some(json!({"query": "select * from devices where deviceId = 'q3'"})),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(one.body.as_array().map(Vec::len), Some(1));
    assert_eq!(one.body[0]["deviceId"], "q3");
    let tagged = server
        .owner(
            HUB_A,
            Method::POST,
            "/devices/query",
            &[],
            Some(json!({"query": "SELECT * FROM devices WHERE tags.site = 'north'"})),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(tagged.body[0]["deviceId"], "q4");

    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut headers = vec![("x-ms-max-item-count", "2")];
        if let Some(c) = &continuation {
            headers.push(("x-ms-continuation", c.as_str()));
        }
        let page = server
            .owner(
                HUB_A,
                Method::POST,
                "/devices/query",
                &headers,
                Some(json!({"query": "SELECT * FROM devices"})),
            )
            .await
            .expect(StatusCode::OK);
        pages += 1;
        seen.extend(
            page.body
                .as_array()
                .expect("array")
                .iter()
                .filter_map(|t| t["deviceId"].as_str().map(str::to_owned)),
        );
        continuation = page.header("x-ms-continuation").map(str::to_owned);
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["q1", "q2", "q3", "q4", "q5"]);

    let bad = server
        .owner(
            HUB_A,
            Method::POST,
            "/devices/query",
            &[],
            Some(json!({"query": "SELECT deviceId FROM devices.modules"})),
        )
        .await
        .expect(StatusCode::BAD_REQUEST);
    assert!(
        bad.body["Message"]
            .as_str()
            .is_some_and(|m| m.contains("SELECT * FROM devices")),
        "{}",
        bad.body
    );
    server.stop().await;
}

#[tokio::test]
async fn telemetry_with_device_sas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&db_path(&dir), &[HUB_A]).await;
    // Keys as DPS would give a device of a symmetric-key enrollment group.
    let group = (generate_key(), generate_key());
    let primary = derive_device_key(&group.0, "sensor-7").expect("derived");
    let secondary = derive_device_key(&group.1, "sensor-7").expect("derived");
    let body = json!({"deviceId": "sensor-7", "status": "enabled",
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}}});
    server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/sensor-7",
            &[],
            Some(body.clone()),
        )
        .await
        .expect(StatusCode::OK);
    let resource = format!("{HUB_A}/devices/sensor-7");
    let send = |token: String, text: &'static str| {
        let request = server
            .client
            .post(format!(
                "https://{HUB_A}:{}/devices/sensor-7/messages/events?api-version=2020-09-30",
                server.addr.port()
            ))
            .header("Authorization", token)
            .header("iothub-app-temperature", "21.5")
            .header("iothub-messageid", "m-1")
            .body(text);
        async move { request.send().await.expect("send").status() }
    };
    let token = generate_token(&resource, &primary, None, now() + 600).expect("token");
    assert_eq!(send(token, "hello").await, StatusCode::NO_CONTENT);
    let token = generate_token(&resource, &secondary, None, now() + 600).expect("token");
    assert_eq!(send(token, "again").await, StatusCode::NO_CONTENT);
    let messages = server.minihub.messages(HUB_A, "sensor-7").await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].body.as_ref(), b"hello");
    assert_eq!(
        messages[0]
            .properties
            .get("temperature")
            .map(String::as_str),
        Some("21.5")
    );
    assert_eq!(
        messages[0]
            .system_properties
            .get("messageid")
            .map(String::as_str),
        Some("m-1")
    );

    // The group key itself, another device's audience, and no token at all are refused.
    let token = generate_token(&resource, &group.0, None, now() + 600).expect("token");
    assert_eq!(send(token, "x").await, StatusCode::UNAUTHORIZED);
    let token = generate_token(
        &format!("{HUB_A}/devices/other"),
        &primary,
        None,
        now() + 600,
    )
    .expect("token");
    assert_eq!(send(token, "x").await, StatusCode::UNAUTHORIZED);
    let anonymous = server
        .raw(
            HUB_A,
            Method::POST,
            "/devices/sensor-7/messages/events",
            None,
            &[],
            None,
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.minihub.messages(HUB_A, "sensor-7").await.len(), 2);

    // The library check agrees.
    let token = generate_token(&resource, &primary, None, now() + 600).expect("token");
    assert!(
        server
            .minihub
            .verify_device_sas(HUB_A, "sensor-7", &token)
            .await
            .is_ok()
    );

    // A disabled device is refused even with its key.
    let mut disabled = body;
    disabled["status"] = json!("disabled");
    server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/sensor-7",
            &[("If-Match", "*")],
            Some(disabled),
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(send(token, "x").await, StatusCode::FORBIDDEN);
    server.stop().await;
}

#[tokio::test]
async fn restart_keeps_hubs_keys_devices_and_twins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let server = Server::start(&path, &[HUB_A, HUB_B]).await;
    let before_hubs = server.minihub.hubs().await.expect("hubs");
    let device = server
        .owner(
            HUB_A,
            Method::PUT,
            "/devices/keep",
            &[],
            Some(sas_device("keep")),
        )
        .await
        .expect(StatusCode::OK)
        .body;
    let twin = server
        .owner(
            HUB_A,
            Method::PATCH,
            "/twins/keep",
            &[],
            Some(json!({"tags": {"k": "v"}, "properties": {"desired": {"d": 1}}})),
        )
        .await
        .expect(StatusCode::OK)
        .body;
    server.stop().await;

    let server = Server::start(&path, &[]).await;
    let after_hubs = server.minihub.hubs().await.expect("hubs");
    assert_eq!(after_hubs, before_hubs);
    assert_eq!(after_hubs.len(), 2);
    // ensure_hub on an existing hub keeps its keys.
    assert_eq!(server.info(HUB_A).await, before_hubs[0]);
    let device_after = server
        .owner(HUB_A, Method::GET, "/devices/keep", &[], None)
        .await
        .expect(StatusCode::OK)
        .body;
    assert_eq!(device_after, device);
    let twin_after = server
        .owner(HUB_A, Method::GET, "/twins/keep", &[], None)
        .await
        .expect(StatusCode::OK)
        .body;
    assert_eq!(twin_after, twin);
    server.stop().await;
}
