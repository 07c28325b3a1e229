//! MQTT over WebSockets on the HTTPS listener (`/$iothub/websocket`, subprotocol `mqtt`): a device
//! registers and reads its twin on its hub that way, a wrong key is refused as over MQTT, and
//! upgrades the service cannot serve are refused with a reason while it keeps serving others.
//! (AMQP over WebSockets is in `amqp.rs`.)

use std::sync::Arc;
use std::time::Duration;

use dps_device::Transport;
use dps_testkit::TestServer;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, http::HeaderValue};

const HUB: &str = "contoso-ws-hub.azure-devices.net";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_registers_and_reads_its_twin_over_websockets() {
    let (server, _) = crate::server_with_hub(HUB).await;
    let key = crate::symmetric_group(&server, "ws-devices", crate::eco_twin()).await;
    let rid = "ws-sensor-1";
    let device_key = dps_core::sas::derive_device_key(&key, rid).expect("derive");
    let device = crate::keyed_device(&server, rid, &device_key, Transport::MqttWs);
    let done = device.provision(&|_| ()).await.expect("provision");
    let done = serde_json::to_value(&done).expect("json");
    assert_eq!(done["status"], "assigned", "{done}");
    assert_eq!(done["registrationState"]["assignedHub"], HUB, "{done}");
    let twin = device.read_twin(HUB, rid).await.expect("twin");
    assert_eq!(twin["desired"]["mode"], "eco", "{twin}");

    // A wrong key is refused as over MQTT: 401002 on the response topic.
    let wrong = crate::keyed_device(&server, "ws-sensor-2", &key, Transport::MqttWs);
    let refused = format!("{:#}", wrong.provision(&|_| ()).await.expect_err("refused"));
    assert!(refused.contains("401002"), "{refused}");

    let text = crate::metrics_text(&server).await;
    for outcome in ["assigned", "refused"] {
        let sample =
            format!(r#"opendps_registrations_total{{transport="mqtt-ws",outcome="{outcome}"}}"#);
        assert_eq!(
            crate::device_api::sample(&text, &sample),
            1.0,
            "{sample} in {text}"
        );
    }
}

/// A WebSocket client of the service: TLS with its CA, then the upgrade on `path` asking for
/// `protocol`.
async fn open(
    server: &TestServer,
    path: &str,
    protocol: Option<&str>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    WsError,
> {
    let addr = server.https_addr().expect("addr");
    let info = server.service_info().expect("info");
    let config = dps_device::mqtt::tls_client_config(info.ca_file.as_deref(), None).expect("tls");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let host = server.service_host();
    let name = host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n);
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(
            rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name"),
            tcp,
        )
        .await
        .expect("tls");
    let mut request = format!("wss://{host}{path}")
        .into_client_request()
        .expect("request");
    if let Some(protocol) = protocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(protocol).expect("header"),
        );
    }
    tokio_tungstenite::client_async(request, tls)
        .await
        .map(|(socket, _)| socket)
}

/// The status and body of a refused upgrade.
fn refusal(result: Result<impl std::fmt::Debug, WsError>) -> (u16, String) {
    match result {
        Err(WsError::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!("the upgrade was not refused with an HTTP status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_it_cannot_serve_are_refused_and_bad_bytes_end_only_their_connection() {
    let (server, _) = crate::server_with_hub(HUB).await;
    let key = crate::symmetric_group(&server, "ws-devices", crate::eco_twin()).await;

    for protocol in [Some("chat"), Some("amqp"), None] {
        let (status, body) = refusal(open(&server, "/$iothub/websocket", protocol).await);
        assert_eq!(status, 400, "{protocol:?}: {body}");
        assert!(
            body.contains("Unsupported WebSocket subprotocol")
                && body.contains("'mqtt'")
                && body.contains("'AMQPWSB10'"),
            "{protocol:?}: {body}"
        );
    }
    // Only the paths SDKs use are upgraded; elsewhere the service API answers as it would anyway.
    let (status, _) = refusal(open(&server, "/elsewhere", Some("mqtt")).await);
    assert_eq!(status, 401);
    assert!(
        server
            .log()
            .contains("refused a WebSocket upgrade on a path")
    );
    // A plain request to `/` is still the service API's (which wants a token first).
    let plain = server
        .api()
        .expect("client")
        .with_auth(None)
        .get("/")
        .await
        .expect("get /");
    assert_eq!(plain.status.as_u16(), 401, "{plain:?}");

    // Text instead of binary, and bytes that are not MQTT: the connection ends.
    for message in [
        Message::Text("CONNECT".into()),
        Message::Binary(vec![0xFF, 0x00, 0x01].into()),
    ] {
        let mut socket = open(&server, "/$iothub/websocket", Some("mqtt"))
            .await
            .expect("upgrade");
        socket.send(message).await.expect("send");
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match socket.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the connection stayed open");
    }
    // An MQTT packet larger than the limit in one message ends that connection too.
    let mut socket = open(&server, "/$iothub/websocket", Some("MQTT"))
        .await
        .expect("upgrade with the C SDK's spelling");
    let _ = socket
        .send(Message::Binary(vec![0x10; 200 * 1024].into()))
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open");

    // And everyone else is still served.
    let rid = "ws-after-garbage";
    crate::provision_assigned(&crate::group_device(&server, &key, rid, Transport::MqttWs)).await;
}
