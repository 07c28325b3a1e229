//! The DPS device API over AMQP 1.0, driven the way the C# and C SDKs drive it (PROTOCOL §4): a
//! device registers over AMQP/TLS and over AMQP on a WebSocket, refusals are rejected deliveries
//! carrying the DPS error, and malformed or misdirected input ends only its own exchange.

use std::sync::Arc;
use std::time::Duration;

use dps_device::Transport;
use dps_testkit::TestServer;
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Data, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HUB: &str = "contoso-amqp-hub.azure-devices.net";

fn derived(key: &str, rid: &str) -> String {
    dps_core::sas::derive_device_key(key, rid).expect("derive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_register_over_amqp_and_amqp_on_websockets() {
    let (server, _) = crate::server_with_hub(HUB).await;
    let key = crate::symmetric_group(&server, "amqp-devices", crate::eco_twin()).await;
    for (rid, transport) in [
        ("amqp-sensor-1", Transport::Amqp),
        ("amqp-ws-sensor-1", Transport::AmqpWs),
    ] {
        let device = crate::keyed_device(&server, rid, &derived(&key, rid), transport);
        let done = device.provision(&|_| ()).await.expect("provision");
        let done = serde_json::to_value(&done).expect("json");
        assert_eq!(done["status"], "assigned", "{transport:?}: {done}");
        assert_eq!(done["registrationState"]["assignedHub"], HUB, "{done}");
        // minihub serves no AMQP: the device reads its twin over MQTT (or MQTT on WebSockets).
        let twin = device.read_twin(HUB, rid).await.expect("twin");
        assert_eq!(twin["desired"]["mode"], "eco", "{twin}");
    }

    // Refusals come back as the DPS error, as over HTTPS and MQTT.
    let wrong = crate::keyed_device(&server, "amqp-sensor-2", &key, Transport::Amqp);
    let refused = format!(
        "{:#}",
        wrong.provision(&|_| ()).await.expect_err("wrong key")
    );
    assert!(refused.contains("401002"), "{refused}");

    let text = crate::metrics_text(&server).await;
    for (transport, outcome) in [
        ("amqp", "assigned"),
        ("amqp-ws", "assigned"),
        ("amqp", "refused"),
    ] {
        let sample = format!(
            r#"opendps_registrations_total{{transport="{transport}",outcome="{outcome}"}}"#
        );
        assert_eq!(
            crate::device_api::sample(&text, &sample),
            1.0,
            "{sample} in {text}"
        );
    }
    // Both devices had their final status in the register answer: neither polled.
    for transport in ["amqp", "amqp-ws"] {
        let sample = format!(r#"opendps_inline_answers_total{{transport="{transport}"}}"#);
        assert_eq!(
            crate::device_api::sample(&text, &sample),
            1.0,
            "{sample} in {text}"
        );
    }
    assert!(!text.contains("opendps_operation_polls_total"), "{text}");
}

/// A TLS connection to the AMQP listener.
async fn tls(server: &TestServer) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let info = server.service_info().expect("info");
    let addr = info.listen.amqp.expect("amqp listener");
    let config = dps_device::mqtt::tls_client_config(info.ca_file.as_deref(), None).expect("tls");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let host = server.service_host();
    let name = host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n);
    tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(
            rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name"),
            tcp,
        )
        .await
        .expect("tls")
}

/// An AMQP connection logged in as `rid` with `sas`, and a session.
async fn login(
    server: &TestServer,
    rid: &str,
    sas: &str,
) -> (
    fe2o3_amqp::connection::ConnectionHandle<()>,
    fe2o3_amqp::session::SessionHandle<()>,
) {
    let scope = server.service_info().expect("info").id_scope.clone();
    let mut connection = Connection::builder()
        .container_id("e2e")
        .sasl_profile(SaslProfile::Plain {
            username: format!("{scope}/registrations/{rid}"),
            password: sas.to_owned(),
        })
        .open_with_stream(tls(server).await)
        .await
        .expect("open");
    let session = Session::begin(&mut connection).await.expect("session");
    (connection, session)
}

/// The body of the next frame on `stream` (what follows its 8-byte header).
async fn read_frame<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).await.expect("frame header");
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut body = vec![0u8; size - 8];
    stream.read_exact(&mut body).await.expect("frame body");
    body
}

fn token(server: &TestServer, rid: &str, key: &str) -> String {
    token_until(server, rid, key, dps_testkit::far_future())
}

/// A device SAS token for `rid` that expires at `expiry` (Unix seconds).
fn token_until(server: &TestServer, rid: &str, key: &str, expiry: i64) -> String {
    let scope = server.service_info().expect("info").id_scope.clone();
    dps_core::sas::generate_token(
        &format!("{scope}/registrations/{rid}"),
        key,
        Some("registration"),
        expiry,
    )
    .expect("token")
}

/// The register request of `rid`, as the C SDK sends it (no correlation id).
fn register_request(rid: &str) -> Message<Data> {
    let body = serde_json::json!({ "registrationId": rid }).to_string();
    request(Some("iotdps-register"), body.as_bytes())
}

/// The device's two links to `address`, named as the C SDK names them: requests out, answers in.
async fn links(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    address: String,
) -> (Sender, Receiver) {
    let sender = Sender::attach(session, "sender_link", address.clone())
        .await
        .expect("sender");
    let receiver = Receiver::attach(session, "recv_link", address)
        .await
        .expect("receiver");
    (sender, receiver)
}

/// Sends `rid`'s register request on `sender` and reads the answer on `receiver`: its JSON body
/// and its application properties.
async fn register_and_read(
    sender: &mut Sender,
    receiver: &mut Receiver,
    rid: &str,
) -> (
    serde_json::Value,
    fe2o3_amqp::types::primitives::OrderedMap<String, SimpleValue>,
) {
    let outcome = sender.send(register_request(rid)).await.expect("send");
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let delivery: Delivery<Body<Value>> =
        tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .expect("an answer in time")
            .expect("answer");
    receiver.accept(&delivery).await.expect("accept");
    let message = delivery.message();
    let Body::Data(data) = &message.body else {
        panic!("the answer is not one data section: {message:?}");
    };
    let answer: serde_json::Value = serde_json::from_slice(
        &data
            .iter()
            .flat_map(|d| d.0.iter().copied())
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let properties = message
        .application_properties
        .as_ref()
        .expect("properties")
        .0
        .clone();
    (answer, properties)
}

/// A server that answers `assigning` at once (`answer_within_ms = 0`) says how long to wait in
/// the properties both spellings of which SDKs read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigning_answer_carries_retry_after() {
    let server = TestServer::start_with_env(
        std::path::Path::new(env!("CARGO_BIN_EXE_opendps")),
        &[("OPENDPS_PROVISIONING__ANSWER_WITHIN_MS", "0")],
        &["--hub", HUB],
    )
    .await
    .expect("opendps starts");
    let key = crate::symmetric_group(&server, "amqp-devices", crate::eco_twin()).await;
    let scope = server.service_info().expect("info").id_scope.clone();
    let rid = "amqp-polling";
    let (mut connection, mut session) =
        login(&server, rid, &token(&server, rid, &derived(&key, rid))).await;
    let address = format!("{scope}/registrations/{rid}");
    let (mut sender, mut receiver) = links(&mut session, address).await;
    let (answer, properties) = register_and_read(&mut sender, &mut receiver, rid).await;
    assert_eq!(answer["status"], "assigning", "{answer}");
    assert!(answer["operationId"].is_string(), "{answer}");
    for name in ["retry-after", "Retry-After"] {
        assert!(
            matches!(properties.get(name), Some(SimpleValue::String(s)) if s.parse::<u32>().is_ok()),
            "{name} in {properties:?}"
        );
    }
    let _ = connection.close().await;
}

fn request(operation: Option<&str>, body: &[u8]) -> Message<Data> {
    let mut application = ApplicationProperties::builder();
    if let Some(operation) = operation {
        application = application.insert(
            "iotdps-operation-type",
            SimpleValue::String(operation.into()),
        );
    }
    Message::builder()
        .application_properties(application.build())
        .data(Binary::from(body.to_vec()))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_as_the_c_sdk_drives_it_and_what_is_refused() {
    let (server, _) = crate::server_with_hub(HUB).await;
    let key = crate::symmetric_group(&server, "amqp-devices", crate::eco_twin()).await;
    let scope = server.service_info().expect("info").id_scope.clone();
    let rid = "amqp-c-style";
    let (mut connection, mut session) =
        login(&server, rid, &token(&server, rid, &derived(&key, rid))).await;
    // The C SDK's links: the URL form of the address, and no correlation id on its requests.
    let address = format!(
        "amqps://{}/{scope}/registrations/{rid}",
        server.service_host()
    );
    let (mut sender, mut receiver) = links(&mut session, address).await;
    // The registration finishes while the request waits: the answer is final, with no Retry-After.
    let (answer, properties) = register_and_read(&mut sender, &mut receiver, rid).await;
    assert_eq!(answer["status"], "assigned", "{answer}");
    assert_eq!(answer["registrationState"]["assignedHub"], HUB, "{answer}");
    assert!(answer["operationId"].is_string(), "{answer}");
    assert!(
        !properties.contains_key("retry-after"),
        "no wait after a final answer: {properties:?}"
    );

    // No operation type, an unknown one, and a body that is not JSON: rejected, with the reason.
    for (message, why) in [
        (request(None, b"{}"), "iotdps-operation-type"),
        (
            request(Some("iotdps-delete-everything"), b"{}"),
            "is not served",
        ),
        (request(Some("iotdps-register"), b"{not json"), "400"),
    ] {
        let outcome = sender.send(message).await.expect("send");
        let Outcome::Rejected(rejected) = outcome else {
            panic!("not rejected: {outcome:?}");
        };
        let description = rejected
            .error
            .and_then(|e| e.description)
            .unwrap_or_default();
        assert!(description.contains(why), "{why}: {description}");
    }
    let _ = sender.close().await;
    let _ = receiver.close().await;
    let _ = session.close().await;
    let _ = connection.close().await;

    // A token that expired two hours ago: the request is rejected as unauthorized, with the DPS
    // error JSON (401002), as over HTTPS and MQTT.
    let expired = token_until(
        &server,
        rid,
        &derived(&key, rid),
        dps_testkit::far_future() - 7200,
    );
    let (mut connection, mut session) = login(&server, rid, &expired).await;
    let own = format!("{scope}/registrations/{rid}");
    let mut sender = Sender::attach(&mut session, "sender_link", own)
        .await
        .expect("sender");
    let outcome = sender.send(register_request(rid)).await.expect("send");
    let Outcome::Rejected(rejected) = outcome else {
        panic!("an expired token was not rejected: {outcome:?}");
    };
    let error = rejected.error.expect("error");
    assert_eq!(
        error.condition,
        fe2o3_amqp::types::definitions::AmqpError::UnauthorizedAccess.into()
    );
    assert!(
        error
            .description
            .as_deref()
            .unwrap_or("")
            .contains("401002"),
        "{error:?}"
    );
    let _ = connection.close().await;

    // A connection logged in as one device may not attach to another device's address.
    let (mut connection, mut session) =
        login(&server, rid, &token(&server, rid, &derived(&key, rid))).await;
    let other = format!("{scope}/registrations/someone-else");
    let refused = match Sender::attach(&mut session, "sender_link", other).await {
        Err(err) => format!("{err:?}"),
        Ok(mut sender) => format!(
            "{:?}",
            sender
                .send(request(Some("iotdps-register"), b"{}"))
                .await
                .expect_err("the link was closed")
        ),
    };
    assert!(
        refused.contains("logged in as")
            || refused.contains("UnauthorizedAccess")
            || refused.contains("Detached"),
        "{refused}"
    );
    let _ = connection.close().await;
    assert!(
        server.log().contains("refused an AMQP link"),
        "{}",
        server.log()
    );

    // An IoT hub device pointed at this gateway over AMQP (its CBS node): told that minihub serves
    // devices over MQTT only.
    let mut connection = Connection::builder()
        .container_id("hub-device")
        .sasl_profile(SaslProfile::Anonymous)
        .open_with_stream(tls(&server).await)
        .await
        .expect("open");
    let mut session = Session::begin(&mut connection).await.expect("session");
    let refused = match Sender::attach(&mut session, "cbs", "$cbs").await {
        Err(err) => format!("{err:?}"),
        Ok(mut sender) => format!(
            "{:?}",
            sender
                .send(request(Some("put-token"), b""))
                .await
                .expect_err("the link was closed")
        ),
    };
    assert!(
        refused.contains("NotImplemented") || refused.contains("Detached"),
        "{refused}"
    );
    let _ = connection.close().await;
    assert!(
        server
            .log()
            .contains("serve devices over MQTT and MQTT over WebSockets only"),
        "{}",
        server.log()
    );

    // Bytes that are not AMQP get the AMQP header back and the connection closes; a broken frame
    // after a good header closes that connection only.
    let mut stream = tls(&server).await;
    stream
        .write_all(b"\x10\x20\x00\x04MQTT\x04\x02\x00\x3c")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(answer.starts_with(b"AMQP"), "{answer:?}");
    let mut stream = tls(&server).await;
    stream
        .write_all(b"AMQP\x03\x01\x00\x00\xff\xff\xff\xff\x02\x01\x00\x00")
        .await
        .expect("write");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open");

    // A SASL mechanism the service does not offer fails SASL with `auth`, and says so in its log.
    let mut stream = tls(&server).await;
    stream
        .write_all(b"AMQP\x03\x01\x00\x00")
        .await
        .expect("write");
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await.expect("header");
    assert_eq!(&header, b"AMQP\x03\x01\x00\x00");
    let mechanisms = read_frame(&mut stream).await;
    let offered: fe2o3_amqp::types::sasl::SaslMechanisms =
        serde_amqp::from_slice(&mechanisms).expect("sasl-mechanisms");
    assert!(
        offered
            .sasl_server_mechanisms
            .0
            .iter()
            .all(|m| m.0 != "SCRAM-SHA-256"),
        "{offered:?}"
    );
    let init = fe2o3_amqp::types::sasl::SaslInit {
        mechanism: "SCRAM-SHA-256".into(),
        initial_response: Some(Binary::from(b"n,,n=device".to_vec())),
        hostname: None,
    };
    let body = serde_amqp::to_vec(&init).expect("encode");
    let mut frame = u32::try_from(body.len() + 8)
        .expect("size")
        .to_be_bytes()
        .to_vec();
    frame.extend([2, 1, 0, 0]);
    frame.extend(body);
    stream.write_all(&frame).await.expect("write");
    let outcome: fe2o3_amqp::types::sasl::SaslOutcome =
        serde_amqp::from_slice(&read_frame(&mut stream).await).expect("sasl-outcome");
    assert_eq!(outcome.code, fe2o3_amqp::types::sasl::SaslCode::Auth);
    assert!(
        server
            .log_shows("refused a SASL mechanism not offered")
            .await,
        "{}",
        server.log()
    );

    // A client that sends its protocol header and then nothing is closed (10 s for SASL and Open).
    let mut silent = tls(&server).await;
    silent
        .write_all(b"AMQP\x03\x01\x00\x00")
        .await
        .expect("write");
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut sink = Vec::new();
        let _ = silent.read_to_end(&mut sink).await;
    })
    .await;
    assert!(closed.is_ok(), "a silent client was kept open");

    // A request larger than the link allows (96 KiB): the client splits it over frames as the
    // service's max-frame-size requires, and the service detaches the link with
    // amqp:link:message-size-exceeded, saying so in its log.
    let rid = "amqp-oversized";
    let mut big = crate::keyed_device(&server, rid, &derived(&key, rid), Transport::Amqp);
    big.payload = Some(serde_json::json!({ "blob": "x".repeat(200 * 1024) }));
    let refused = format!("{:#}", big.provision(&|_| ()).await.expect_err("oversized"));
    assert!(
        refused.contains("larger than max size"),
        "the device should read why: {refused}"
    );
    assert!(
        server.log_shows("amqp:link:message-size-exceeded").await,
        "{}",
        server.log()
    );

    // Everyone else is still served.
    let rid = "amqp-after-garbage";
    crate::provision_assigned(&crate::group_device(&server, &key, rid, Transport::Amqp)).await;
}
