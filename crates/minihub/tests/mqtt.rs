//! The device side of minihub over real MQTT/TLS: `dps_mqtt::serve` with [`HubMqtt`] on port 0,
//! spoken to by a raw MQTT 3.1.1 client (rumqttc's codec over tokio-rustls), with the REST API of
//! the same hubs beside it to change and inspect twins and telemetry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dps_core::sas::generate_token;
use minihub::{DeviceRequest, HubMqtt, IfMatch, Minihub};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe,
    SubscribeFilter, SubscribeReasonCode,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

mod common;

use common::{now, tls_for};

const HUB: &str = "contoso-mqtt-hub.azure-devices.net";

struct Server {
    minihub: Arc<Minihub>,
    mqtt: SocketAddr,
    https: SocketAddr,
    ca: rustls::RootCertStore,
    ca_pem: String,
    _stop: watch::Sender<bool>,
    /// What keeps the database (a temp dir, a schema) while the server runs.
    _storage: Box<dyn std::any::Any + Send>,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let minihub = Minihub::open(&dir.path().join("m.db")).expect("open");
        Self::start_on(minihub, Box::new(dir)).await
    }

    /// Serves `minihub` (with the hub [`HUB`]) over MQTT and HTTPS.
    async fn start_on(minihub: Minihub, storage: Box<dyn std::any::Any + Send>) -> Self {
        let minihub = Arc::new(minihub);
        minihub.ensure_hub(HUB).await.expect("hub");

        let tls = tls_for(&[HUB]);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA pem")).expect("root");
        }

        let (stop, stopped) = watch::channel(false);
        let mqtt_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let https_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (mqtt, https) = (
            mqtt_listener.local_addr().expect("addr"),
            https_listener.local_addr().expect("addr"),
        );
        tokio::spawn(dps_mqtt::serve(
            mqtt_listener,
            acceptor.clone(),
            Arc::new(HubMqtt::new(Arc::clone(&minihub))),
            dps_mqtt::MqttLimits::default(),
            stopped.clone(),
        ));
        tokio::spawn(dps_http::serve(
            https_listener,
            acceptor,
            minihub::router(Arc::clone(&minihub)),
            dps_http::HttpLimits::default(),
            stopped,
        ));
        Self {
            minihub,
            mqtt,
            https,
            ca: roots,
            ca_pem: tls.ca_pem,
            _stop: stop,
            _storage: storage,
        }
    }

    /// Registers `id` and returns its device SAS token.
    async fn device(&self, id: &str) -> String {
        let request: DeviceRequest = serde_json::from_value(json!({"deviceId": id})).expect("req");
        let device = self
            .minihub
            .put_device(HUB, id, request, IfMatch::Absent)
            .await
            .expect("device");
        let key = device
            .authentication
            .symmetric_key
            .primary_key
            .expect("key");
        generate_token(
            &format!("{HUB}/devices/{id}"),
            key.expose(),
            None,
            now() + 600,
        )
        .expect("token")
    }

    /// A REST call with the `iothubowner` token.
    async fn rest(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let info = self.minihub.hub(HUB).expect("hub");
        let key = info
            .policy("iothubowner")
            .expect("policy")
            .primary_key
            .expose();
        let token = generate_token(HUB, key, Some("iothubowner"), now() + 600).expect("token");
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("pem")])
            .resolve(HUB, self.https)
            .build()
            .expect("client");
        let mut request = client
            .request(
                method,
                format!(
                    "https://{HUB}:{}{path}?api-version=2021-04-12",
                    self.https.port()
                ),
            )
            .header("Authorization", token);
        if let Some(body) = body {
            request = request.header("If-Match", "*").json(&body);
        }
        let response = request.send().await.expect("send");
        assert!(response.status().is_success(), "{}", response.status());
        response.json().await.expect("json")
    }

    async fn client(&self, device_id: &str, password: &str) -> (Client, ConnAck) {
        let username =
            format!("{HUB}/{device_id}/?api-version=2019-10-01&DeviceClientType=test%2F1.0");
        self.client_as(device_id, &username, password).await
    }

    async fn client_as(
        &self,
        device_id: &str,
        username: &str,
        password: &str,
    ) -> (Client, ConnAck) {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.ca.clone())
            .with_no_client_auth(),
        ));
        let tcp = TcpStream::connect(self.mqtt).await.expect("connect");
        let stream = connector
            .connect(ServerName::try_from(HUB).expect("name"), tcp)
            .await
            .expect("tls");
        let mut client = Client {
            stream,
            buffer: BytesMut::new(),
        };
        let mut connect = Connect::new(device_id);
        connect.keep_alive = 60;
        connect.clean_session = false;
        connect.login = Some(Login::new(username, password));
        client.send(Packet::Connect(connect)).await;
        let Packet::ConnAck(ack) = client.recv().await else {
            panic!("CONNACK expected")
        };
        (client, ack)
    }
}

struct Client {
    stream: TlsStream<TcpStream>,
    buffer: BytesMut,
}

impl Client {
    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, 1 << 20).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    async fn recv(&mut self) -> Packet {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match Packet::read(&mut self.buffer, 1 << 20) {
                    Ok(packet) => return packet,
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(err) => panic!("decode: {err}"),
                }
                let n = self.stream.read_buf(&mut self.buffer).await.expect("read");
                assert!(n > 0, "the server closed the connection");
            }
        })
        .await
        .expect("a packet in time")
    }

    async fn publish(&mut self, topic: &str, pkid: u16, payload: &[u8]) {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        publish.pkid = pkid;
        self.send(Packet::Publish(publish)).await;
        assert_eq!(self.recv().await, Packet::PubAck(PubAck::new(pkid)));
    }

    /// The next PUBLISH from the server, acknowledged if QoS 1.
    async fn incoming(&mut self) -> Publish {
        let Packet::Publish(publish) = self.recv().await else {
            panic!("PUBLISH expected")
        };
        if publish.qos == QoS::AtLeastOnce {
            self.send(Packet::PubAck(PubAck::new(publish.pkid))).await;
        }
        publish
    }

    async fn subscribe(&mut self, device_id: &str) {
        let filters = [
            "$iothub/twin/res/#",
            "$iothub/twin/PATCH/properties/desired/#",
            "$iothub/methods/POST/#",
            &format!("devices/{device_id}/messages/devicebound/#"),
        ];
        self.send(Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: filters
                .iter()
                .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce))
                .collect(),
        }))
        .await;
        let Packet::SubAck(ack) = self.recv().await else {
            panic!("SUBACK expected")
        };
        assert_eq!(
            ack.return_codes,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); 4]
        );
    }
}

#[tokio::test]
async fn bad_credentials_get_connack_5() {
    let server = Server::start().await;
    let token = server.device("dev-1").await;
    let wrong = token.replace("sig=", "sig=A");
    for (id, password) in [
        ("dev-1", wrong.as_str()),
        ("dev-2", token.as_str()),
        ("dev-1", ""),
    ] {
        let (_, ack) = server.client(id, password).await;
        assert_eq!(
            ack.code,
            ConnectReturnCode::NotAuthorized,
            "{id} {password}"
        );
    }
    // The right token, sent to a hub that is not served here.
    let (_, ack) = server
        .client_as(
            "dev-1",
            "other-hub.azure-devices.net/dev-1/?api-version=2019-10-01",
            &token,
        )
        .await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    // Hub names are case-insensitive; the `?` may be missing.
    let (mut client, ack) = server
        .client_as(
            "dev-1",
            &format!("{}/dev-1/api-version=2019-10-01", HUB.to_uppercase()),
            &token,
        )
        .await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    assert!(!ack.session_present);
    client.send(Packet::Disconnect).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.stream.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(read.is_err() || rest.is_empty());

    // A disabled device is refused too.
    let keys = server
        .minihub
        .get_device(HUB, "dev-1")
        .await
        .expect("get")
        .expect("device")
        .authentication
        .symmetric_key;
    let request: DeviceRequest = serde_json::from_value(json!({
        "deviceId": "dev-1", "status": "disabled",
        "authentication": {"type": "sas", "symmetricKey": {
            "primaryKey": keys.primary_key.expect("key").expose(),
            "secondaryKey": keys.secondary_key.expect("key").expose()}}}))
    .expect("request");
    server
        .minihub
        .put_device(HUB, "dev-1", request, IfMatch::Any)
        .await
        .expect("disable");
    let (_, ack) = server.client("dev-1", &token).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
}

#[tokio::test]
async fn twin_get_and_reported_patch_show_in_the_service_api() {
    let server = Server::start().await;
    let token = server.device("dev-1").await;
    let (mut client, _) = server.client("dev-1", &token).await;
    client.subscribe("dev-1").await;

    client.publish("$iothub/twin/GET/?$rid=r1", 2, b" ").await;
    let twin = client.incoming().await;
    assert_eq!(twin.topic, "$iothub/twin/res/200/?$rid=r1");
    let body: Value = serde_json::from_slice(&twin.payload).expect("json");
    assert_eq!(
        body,
        json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
    );

    client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=r2",
            3,
            br#"{"firmware": "1.2.3", "net": {"rssi": -60}}"#,
        )
        .await;
    let patched = client.incoming().await;
    assert_eq!(patched.topic, "$iothub/twin/res/204/?$rid=r2&$version=2");
    assert!(patched.payload.is_empty());

    client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=r3",
            4,
            b"not json",
        )
        .await;
    assert_eq!(
        client.incoming().await.topic,
        "$iothub/twin/res/400/?$rid=r3"
    );

    let twin = server
        .rest(reqwest::Method::GET, "/twins/dev-1", None)
        .await;
    let reported = &twin["properties"]["reported"];
    assert_eq!(reported["firmware"], "1.2.3");
    assert_eq!(reported["net"]["rssi"], -60);
    assert_eq!(reported["$version"], 2);
    assert!(reported["$metadata"]["firmware"]["$lastUpdated"].is_string());
}

#[tokio::test]
async fn desired_changes_reach_the_connected_device() {
    let server = Server::start().await;
    let token = server.device("dev-1").await;
    let (mut client, _) = server.client("dev-1", &token).await;
    client.subscribe("dev-1").await;
    // A second connection of the same device hears the same updates.
    let (mut second, _) = server.client("dev-1", &token).await;
    second.subscribe("dev-1").await;

    server
        .rest(
            reqwest::Method::PATCH,
            "/twins/dev-1",
            Some(json!({"properties": {"desired": {"mode": "eco", "limits": {"hi": 9}}}})),
        )
        .await;
    let update = client.incoming().await;
    assert_eq!(
        update.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=2"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&update.payload).expect("json"),
        json!({"mode": "eco", "limits": {"hi": 9}, "$version": 2})
    );
    assert_eq!(second.incoming().await.payload, update.payload);

    // Tags alone change nothing the device sees; a replacement sends all desired properties.
    server
        .rest(
            reqwest::Method::PATCH,
            "/twins/dev-1",
            Some(json!({"tags": {"site": "a"}})),
        )
        .await;
    server
        .rest(
            reqwest::Method::PUT,
            "/twins/dev-1",
            Some(json!({"properties": {"desired": {"mode": "max"}}})),
        )
        .await;
    let update = client.incoming().await;
    assert_eq!(
        update.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=3"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&update.payload).expect("json"),
        json!({"mode": "max", "$version": 3})
    );

    // The device's own twin read agrees.
    client.publish("$iothub/twin/GET/?$rid=9", 5, b"").await;
    let twin: Value = serde_json::from_slice(&client.incoming().await.payload).expect("json");
    assert_eq!(twin["desired"], json!({"mode": "max", "$version": 3}));
}

#[tokio::test]
async fn telemetry_is_recorded_and_readable() {
    let server = Server::start().await;
    let token = server.device("dev-1").await;
    let (mut client, _) = server.client("dev-1", &token).await;
    client
        .publish(
            "devices/dev-1/messages/events/temp=21&%24.ct=application%2Fjson&%24.ce=utf-8",
            7,
            br#"{"t": 21}"#,
        )
        .await;
    client
        .publish("devices/dev-1/messages/events/", 8, &[0xff, 0x00])
        .await;
    client.send(Packet::PingReq).await;
    assert_eq!(client.recv().await, Packet::PingResp);

    let messages = server
        .rest(reqwest::Method::GET, "/devices/dev-1/messages/events", None)
        .await;
    let messages = messages.as_array().expect("array");
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["body"], r#"{"t": 21}"#);
    assert_eq!(messages[0]["properties"], json!({"temp": "21"}));
    assert_eq!(
        messages[0]["systemProperties"],
        json!({"contenttype": "application/json", "contentencoding": "utf-8"})
    );
    assert!(messages[0]["enqueuedTimeUtc"].is_string());
    assert_eq!(messages[1]["body"], "/wA=");
    assert_eq!(messages[1]["bodyEncoding"], "base64");

    // Someone else's topic ends the connection.
    let mut publish = Publish::new(
        "devices/dev-2/messages/events/",
        QoS::AtLeastOnce,
        b"x".to_vec(),
    );
    publish.pkid = 9;
    client.send(Packet::Publish(publish)).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.stream.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(
        read.is_err() || rest.is_empty(),
        "no PUBACK for a refused topic"
    );
}

/// minihub on PostgreSQL as two opendps nodes run it, sharing the database: the hub made by one
/// node has the same keys on the other, and a device connected to node b hears of desired-property
/// changes made through node a, a small patch as sent and one too large to announce as the
/// desired properties read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_changes_made_through_another_node_reach_the_device() {
    let schema = pg_schema::testing::TestSchema::create("minihub_mqtt").await;
    let clock = Arc::new(dps_core::clock::SystemClock);
    let a = Minihub::open_postgres(
        std::sync::Arc::new(pg_schema::WarmPool::new(schema.pool(4).await, 2)),
        clock.clone(),
    )
    .await
    .expect("node a");
    let made = a.ensure_hub(HUB).await.expect("hub on node a");
    let b = Minihub::open_postgres(
        std::sync::Arc::new(pg_schema::WarmPool::new(schema.pool(4).await, 2)),
        clock,
    )
    .await
    .expect("node b");
    let server = Server::start_on(b, Box::new(schema)).await;
    assert_eq!(
        server.minihub.hub(HUB).expect("hub on node b"),
        made,
        "one hub, one set of keys"
    );

    let token = server.device("dev-1").await;
    assert!(
        a.get_device(HUB, "dev-1").await.expect("read").is_some(),
        "a device made through node b is on node a"
    );
    let (mut client, _) = server.client("dev-1", &token).await;
    client.subscribe("dev-1").await;

    // As DPS's provisioning writes: committed without waiting for the flush.
    a.flushed_with_callers_commit()
        .patch_twin(
            HUB,
            "dev-1",
            &json!({"properties": {"desired": {"mode": "eco"}}}),
            IfMatch::Any,
        )
        .await
        .expect("patch through node a");
    let update = client.incoming().await;
    assert_eq!(
        update.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=2"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&update.payload).expect("json"),
        json!({"mode": "eco", "$version": 2})
    );

    let block = "x".repeat(2000);
    let large = json!({"b1": block, "b2": block, "b3": block, "b4": block});
    a.patch_twin(
        HUB,
        "dev-1",
        &json!({"properties": {"desired": large}}),
        IfMatch::Any,
    )
    .await
    .expect("large patch through node a");
    let update = client.incoming().await;
    assert_eq!(
        update.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=3"
    );
    let mut expected = large.clone();
    expected["mode"] = json!("eco");
    expected["$version"] = json!(3);
    assert_eq!(
        serde_json::from_slice::<Value>(&update.payload).expect("json"),
        expected
    );
}
