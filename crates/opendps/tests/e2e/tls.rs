//! The listener's TLS: versions 1.2 and 1.3 are both offered, and the development certificate covers
//! the names given with --tls-name.

use std::path::Path;
use std::time::Duration;

use dps_testkit::TestServer;
use reqwest::tls::Version;

async fn healthz(
    server: &TestServer,
    host: &str,
    min: Version,
    max: Version,
) -> reqwest::Result<reqwest::StatusCode> {
    let ca = reqwest::Certificate::from_pem_bundle(&server.ca_pem().expect("ca")).expect("pem");
    let addr = server.https_addr().expect("addr");
    let client = reqwest::Client::builder()
        .tls_certs_only(ca)
        .min_tls_version(min)
        .max_tls_version(max)
        .resolve(host, addr)
        .build()?;
    Ok(client
        .get(format!("https://{host}:{}/healthz", addr.port()))
        .send()
        .await?
        .status())
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_offered() {
    let server = crate::server().await;
    assert_eq!(
        healthz(&server, "localhost", Version::TLS_1_2, Version::TLS_1_2)
            .await
            .expect("TLS 1.2"),
        200
    );
    assert_eq!(
        healthz(&server, "localhost", Version::TLS_1_3, Version::TLS_1_3)
            .await
            .expect("TLS 1.3"),
        200
    );
}

#[tokio::test]
async fn certificate_covers_extra_names() {
    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server = TestServer::start_with(bin, &["--tls-name", "dps.contoso.test"])
        .await
        .expect("start");
    assert_eq!(
        healthz(
            &server,
            "dps.contoso.test",
            Version::TLS_1_2,
            Version::TLS_1_3
        )
        .await
        .expect("extra name"),
        200
    );
    let other = healthz(
        &server,
        "not-in-cert.test",
        Version::TLS_1_2,
        Version::TLS_1_3,
    )
    .await;
    assert!(
        other.is_err(),
        "a name outside the certificate must fail verification"
    );
}

/// Each listener serves at most `max_connections` at once; the excess is closed before its TLS
/// handshake and counted, and a freed slot serves again.
#[tokio::test]
async fn connections_over_the_cap_are_refused_and_counted() {
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpStream;

    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server = TestServer::start_with_config(
        bin,
        "[http]\nmax_connections = 2\n[mqtt]\nmax_connections = 1\n",
        &[],
    )
    .await
    .expect("start");
    let https = server.https_addr().expect("https");
    let mqtt: std::net::SocketAddr = server.info["listen"]["mqtt"]
        .as_str()
        .expect("mqtt")
        .parse()
        .expect("addr");
    // Connections that never start TLS hold their slots until the handshake times out.
    let refused_after = |held: Vec<TcpStream>, addr| async move {
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(30), extra.read(&mut byte))
            .await
            .expect("the extra connection is closed, not left waiting");
        assert!(matches!(read, Ok(0) | Err(_)), "closed without a reply");
        held
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(https).await.expect("connect"));
    }
    let held = refused_after(held, https).await;
    drop(held);
    let mqtt_held = vec![TcpStream::connect(mqtt).await.expect("connect")];
    let mqtt_held = refused_after(mqtt_held, mqtt).await;

    let api = server.api().expect("client").with_auth(None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        match api.get("/metrics").await {
            Ok(reply) if reply.status == 200 => break reply,
            _ if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("a freed slot serves again: {other:?}"),
        }
    };
    let text = metrics.body.as_str().expect("text");
    for listener in ["https", "mqtt"] {
        let refused = crate::device_api::sample(
            text,
            &format!("opendps_connections_refused_total{{listener=\"{listener}\"}}"),
        );
        assert!(refused >= 1.0, "{listener}: {text}");
    }
    drop(mqtt_held);
}

/// An HTTP/1.1 connection that sends no further request for `http.idle_timeout_secs`, or only part
/// of a request's head, is closed by the server (so idle keep-alive connections cannot hold every
/// slot).
#[tokio::test]
async fn idle_http_connections_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (server, https) = closing_idle_connections_after_a_second().await;
    let mut tls = connect_tls(&server, https).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut answer = vec![0u8; 4096];
    let read = tls.read(&mut answer).await.expect("answer");
    assert!(
        answer[..read].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..read])
    );
    // Kept alive, then idle: closed by the server, not left open.
    let closed = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut answer))
        .await
        .expect("the idle connection is closed within the guard");
    assert!(matches!(closed, Ok(0) | Err(_)), "closed without a reply");

    // A head that never ends is no request: closed as well.
    let mut slow = connect_tls(&server, https).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
        .await
        .expect("part of a head");
    let closed = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut answer))
        .await
        .expect("the connection is closed within the guard");
    assert!(matches!(closed, Ok(0) | Err(_)), "closed without a reply");
}

/// A server closing connections idle for a second, and its HTTPS address.
async fn closing_idle_connections_after_a_second() -> (TestServer, std::net::SocketAddr) {
    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server = TestServer::start_with_config(bin, "[http]\nidle_timeout_secs = 1\n", &[])
        .await
        .expect("start");
    let https = server.https_addr().expect("https");
    (server, https)
}

/// An HTTP/2 connection without a request in flight for `http.idle_timeout_secs` is closed by the
/// server too (HTTP/2 has no per-request head to time out).
#[tokio::test]
async fn idle_http2_connections_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (server, https) = closing_idle_connections_after_a_second().await;
    let mut tls = connect_tls_with_alpn(&server, https, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The client preface and an empty SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let mut answer = vec![0u8; 4096];
    let read = tls.read(&mut answer).await.expect("settings");
    assert!(
        read >= 9 && answer[3] == 0x04,
        "the server's SETTINGS frame first"
    );
    // Then nothing but the server's acknowledgement until the server closes the connection.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tls.read(&mut answer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the idle connection is closed within the guard"
    );
}

/// A TLS connection to `addr` trusting the server's CA.
async fn connect_tls(
    server: &TestServer,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    connect_tls_with_alpn(server, addr, &[]).await
}

/// A TLS connection to `addr` trusting the server's CA, offering the protocols `alpn`.
async fn connect_tls_with_alpn(
    server: &TestServer,
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&server.ca_pem().expect("ca")) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await.expect("handshake")
}

/// Opens a TLS connection to `addr` trusting the server's CA and sends `bytes`; returns the first
/// bytes the server answered (nothing when it closed the connection, as for a refused protocol).
async fn send_over_tls(server: &TestServer, addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tls = connect_tls(server, addr).await;
    tls.write_all(bytes).await.expect("write");
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut answer))
        .await
        .expect("the server answers or closes")
        .unwrap_or(0);
    answer.truncate(read);
    answer
}

/// AMQP clients on the HTTPS and MQTT listeners, and WebSocket upgrades for a subprotocol not
/// served, are refused with a log line naming the peer and what it asked.
#[tokio::test]
async fn websocket_and_amqp_attempts_are_logged() {
    let server = crate::server().await;
    let https = server.https_addr().expect("https");
    let mqtt: std::net::SocketAddr = server.info["listen"]["mqtt"]
        .as_str()
        .expect("mqtt")
        .parse()
        .expect("addr");
    let amqp_header = b"AMQP\x03\x01\x00\x00";
    assert!(send_over_tls(&server, https, amqp_header).await.is_empty());
    assert!(send_over_tls(&server, mqtt, amqp_header).await.is_empty());
    let upgrade = send_over_tls(
        &server,
        https,
        b"GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: AMQPWSB9\r\n\r\n",
    )
    .await;
    assert!(
        !String::from_utf8_lossy(&upgrade).starts_with("HTTP/1.1 101"),
        "not upgraded"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.log();
        let seen = [
            "refused an AMQP connection on the HTTPS listener",
            "refused a connection speaking AMQP on the MQTT listener",
            "refused a WebSocket upgrade",
            "subprotocols=AMQPWSB9",
        ]
        .iter()
        .all(|line| log.contains(line));
        if seen {
            assert!(log.contains("peer=127.0.0.1:"), "{log}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The development certificate names the public host, so `--public-host` alone is enough.
#[tokio::test]
async fn certificate_covers_the_public_host() {
    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server = TestServer::start_with(bin, &["--public-host", "dps.public.test"])
        .await
        .expect("start");
    assert_eq!(
        healthz(
            &server,
            "dps.public.test",
            Version::TLS_1_2,
            Version::TLS_1_3
        )
        .await
        .expect("the public host verifies"),
        200
    );
}
