//! The MQTT/TLS socket shell: handshake, CONNECT, framing, keep-alive, and the loop that feeds
//! packets to a [`Connection`]. What a connection means (DPS, or a device on an IoT hub) is decided
//! by the [`Connector`] from its CONNECT, so one listener on 8883 serves both.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{self};
use tls_accept::{DEFAULT_MAX_CONNECTIONS, TlsListener, stopped};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// A device that has not sent CONNECT this long after its TLS handshake is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of the listener.
#[derive(Debug, Clone, Copy)]
pub struct MqttLimits {
    /// Largest packet accepted or sent (DPS: 96 KB messages).
    pub max_packet_bytes: usize,
    /// Most connections open at once; more are closed before their TLS handshake.
    pub max_connections: usize,
    /// The longest keep-alive honoured: a client that asks for none (0) or a longer one is held
    /// to this (MQTT 3.1.1 §3.1.2.10 lets a server drop an inactive client whatever it asked).
    pub max_keep_alive: Duration,
}

/// The longest keep-alive honoured unless configured otherwise.
pub const DEFAULT_MAX_KEEP_ALIVE: Duration = Duration::from_secs(1800);

impl Default for MqttLimits {
    fn default() -> Self {
        Self {
            max_packet_bytes: 96 * 1024 + 1024,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_keep_alive: DEFAULT_MAX_KEEP_ALIVE,
        }
    }
}

/// How long a connection may stay silent: one and a half times its keep-alive (MQTT 3.1.1
/// §3.1.2.10), the keep-alive being at most `max` and `max` when the client asked for none.
fn silence_allowed(keep_alive_secs: u16, max: Duration) -> Duration {
    let asked = Duration::from_secs(u64::from(keep_alive_secs));
    let keep_alive = if asked.is_zero() { max } else { asked.min(max) };
    keep_alive + keep_alive / 2
}

/// What a connection does after it was accepted.
#[derive(Debug, Default)]
pub struct Handled {
    /// Packets to send, in order.
    pub send: Vec<Packet>,
    /// Close the connection after sending them, for this reason.
    pub close: Option<&'static str>,
}

/// The protocol logic of one accepted connection.
#[async_trait]
pub trait Connection: Send {
    /// Handles one packet from the client.
    async fn handle(&mut self, packet: Packet) -> Handled;

    /// A packet to push to the client unprompted (a desired-property update); `None` when the
    /// connection never pushes. Must be cancel-safe.
    async fn push(&mut self) -> Option<Packet> {
        std::future::pending().await
    }
}

/// Decides, from its CONNECT, whether and how a connection is served.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Accepts the connection (CONNACK 0 follows) or refuses it with a return code.
    /// `certificates` are those the client presented in the TLS handshake, leaf first (DER;
    /// empty when none): X.509 devices authenticate with them and send no password.
    async fn connect(
        &self,
        connect: &Connect,
        certificates: &[Vec<u8>],
    ) -> Result<Box<dyn Connection>, ConnectReturnCode>;
}

/// Serves MQTT over TLS on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    connector: Arc<dyn Connector>,
    limits: MqttLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = TlsListener::new(listener, tls, "mqtt", limits.max_connections);
    while let Some(accepted) = listener.accept(&mut shutdown).await {
        let (connector, stop) = (Arc::clone(&connector), shutdown.clone());
        accepted.spawn(move |stream, peer| async move {
            let certificates = tls_accept::peer_certificates(&stream);
            serve_connection(stream, peer, certificates, connector, limits, stop).await;
        });
    }
}

/// Serves one MQTT connection over `stream`, a byte stream another front end accepted (MQTT over
/// WebSockets on the HTTPS listener), until the client leaves or `stop` turns true. `certificates`
/// are those of the TLS session underneath, leaf first.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: std::net::SocketAddr,
    certificates: Vec<Vec<u8>>,
    connector: Arc<dyn Connector>,
    limits: MqttLimits,
    stop: watch::Receiver<bool>,
) {
    let client = Client { peer, certificates };
    if let Err(reason) = run_connection(stream, client, connector, limits, stop).await {
        tracing::debug!(%peer, %reason, "MQTT connection closed");
    }
}

/// Whether `byte` can open a packet a client sends: its type and the fixed flags that type must
/// carry (MQTT 3.1.1 §2.2). Anything else is not MQTT, and waiting for more of it would only keep a
/// dead connection open until its keep-alive runs out.
fn opens_client_packet(byte: u8) -> bool {
    let flags = byte & 0x0F;
    match byte >> 4 {
        // CONNECT, PUBACK, PUBREC, PUBCOMP, PINGREQ, DISCONNECT
        1 | 4 | 5 | 7 | 12 | 14 => flags == 0,
        // PUBLISH: DUP and RETAIN free, QoS 0, 1 or 2
        3 => (flags >> 1) & 0b11 != 0b11,
        // PUBREL, SUBSCRIBE, UNSUBSCRIBE
        6 | 8 | 10 => flags == 0b0010,
        _ => false,
    }
}

/// The remaining length a fixed-size packet must declare, if the packet type has one.
fn fixed_remaining_length(byte: u8) -> Option<u8> {
    match byte >> 4 {
        4..=7 => Some(2),
        12 | 14 => Some(0),
        _ => None,
    }
}

/// Why no packet could be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The bytes are not MQTT 3.1.1.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A CONNECT for another protocol level or name (answered with CONNACK 0x01).
    #[error("malformed packet: {0}")]
    UnsupportedProtocol(String),
    /// Reading from the socket failed.
    #[error("read failed: {0}")]
    Io(#[source] std::io::Error),
    /// The client closed the connection.
    #[error("the client closed the connection")]
    ClientClosed,
    /// The client speaks another protocol (named), to the wrong port.
    #[error("the client speaks {0}, not MQTT")]
    Foreign(&'static str),
}

/// Why a connection ended (logged at debug level: most reasons are the client's doing).
#[derive(Debug, thiserror::Error)]
enum Closed {
    /// Reading the next packet failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A packet of ours did not encode.
    #[error("cannot encode a packet: {0}")]
    Encode(#[source] mqttbytes::Error),
    /// Writing to the socket failed.
    #[error("write failed: {0}")]
    Write(#[source] std::io::Error),
    /// The first packet was another one.
    #[error("the first packet was not CONNECT")]
    NotConnect,
    /// Nothing in time after the handshake.
    #[error("no CONNECT in time")]
    NoConnect,
    /// The CONNECT asked for another protocol (CONNACK 0x01 was sent).
    #[error("CONNECT refused: {0}")]
    Unsupported(String),
    /// The connector refused the CONNECT with this return code.
    #[error("CONNECT refused ({0:?})")]
    Refused(ConnectReturnCode),
    /// The client was silent for longer than its keep-alive allows.
    #[error("keep-alive expired")]
    KeepAlive,
    /// The connection's protocol logic ended it, for this reason.
    #[error("{0}")]
    Ended(&'static str),
}

/// Framing over any byte stream.
struct Framed<S> {
    stream: S,
    buffer: BytesMut,
    max: usize,
    /// No CONNECT yet: a client of another protocol is recognised (and named) only here.
    before_connect: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    async fn read(&mut self) -> Result<Packet, ReadError> {
        loop {
            if let Some(&first) = self.buffer.first() {
                if let Some(protocol) = self
                    .before_connect
                    .then(|| tls_accept::protocol_of(&self.buffer))
                    .flatten()
                    .filter(|protocol| *protocol != "MQTT")
                {
                    return Err(ReadError::Foreign(protocol));
                }
                if !opens_client_packet(first) {
                    return Err(ReadError::Malformed(format!(
                        "0x{first:02x} does not start a client packet"
                    )));
                }
                if let (Some(expected), Some(&length)) =
                    (fixed_remaining_length(first), self.buffer.get(1))
                    && length != expected
                {
                    return Err(ReadError::Malformed(format!(
                        "packet 0x{first:02x} declares {length} bytes, not {expected}"
                    )));
                }
            }
            match Packet::read(&mut self.buffer, self.max) {
                Ok(Packet::Connect(connect)) if connect.protocol != mqttbytes::Protocol::V4 => {
                    return Err(ReadError::UnsupportedProtocol(
                        "protocol level 5; only MQTT 3.1.1 (level 4) is served".into(),
                    ));
                }
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err @ mqttbytes::Error::InvalidProtocolLevel(_)) => {
                    return Err(ReadError::UnsupportedProtocol(format!(
                        "{err}; only MQTT 3.1.1 (level 4) is served"
                    )));
                }
                Err(err @ mqttbytes::Error::InvalidProtocol) => {
                    return Err(ReadError::UnsupportedProtocol(format!(
                        "{err}; only MQTT 3.1.1 is served"
                    )));
                }
                Err(err) => return Err(ReadError::Malformed(err.to_string())),
            }
            let read = self
                .stream
                .read_buf(&mut self.buffer)
                .await
                .map_err(ReadError::Io)?;
            if read == 0 {
                return Err(ReadError::ClientClosed);
            }
        }
    }

    async fn write(&mut self, packets: &[Packet]) -> Result<(), Closed> {
        let mut out = BytesMut::new();
        for packet in packets {
            packet.write(&mut out, self.max).map_err(Closed::Encode)?;
        }
        self.stream.write_all(&out).await.map_err(Closed::Write)?;
        self.stream.flush().await.map_err(Closed::Write)
    }
}

/// Who is on the other end of a connection.
struct Client {
    peer: std::net::SocketAddr,
    /// What it presented in the TLS handshake, leaf first (DER).
    certificates: Vec<Vec<u8>>,
}

async fn run_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    client: Client,
    connector: Arc<dyn Connector>,
    limits: MqttLimits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Closed> {
    let peer = client.peer;
    let mut framed = Framed {
        stream,
        buffer: BytesMut::with_capacity(4096),
        max: limits.max_packet_bytes,
        before_connect: true,
    };
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, framed.read()).await {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(_)) => return Err(Closed::NotConnect),
        // MQTT 3.1.1 §3.1.2.2: an unsupported protocol level is answered with CONNACK 0x01.
        Ok(Err(ReadError::UnsupportedProtocol(why))) => {
            framed
                .write(&[Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::RefusedProtocolVersion,
                    false,
                ))])
                .await?;
            return Err(Closed::Unsupported(why));
        }
        Ok(Err(ReadError::Foreign(protocol))) => {
            tracing::warn!(
                %peer,
                protocol,
                "refused a connection speaking {protocol} on the MQTT listener: only MQTT 3.1.1 is served here{}",
                if protocol == "AMQP" {
                    "; AMQP devices connect to the AMQP listener (port 5671 by default)"
                } else {
                    "; HTTPS is served on the https listener"
                }
            );
            return Err(ReadError::Foreign(protocol).into());
        }
        Ok(Err(err)) => return Err(err.into()),
        Err(_) => return Err(Closed::NoConnect),
    };
    framed.before_connect = false;
    let mut connection = match connector.connect(&connect, &client.certificates).await {
        Ok(connection) => connection,
        Err(code) => {
            framed
                .write(&[Packet::ConnAck(ConnAck::new(code, false))])
                .await?;
            return Err(Closed::Refused(code));
        }
    };
    // Sessions are never persisted, whatever the client's clean-session flag says.
    framed
        .write(&[Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        ))])
        .await?;
    // MQTT 3.1.1: a server may drop a client silent for one and a half keep-alive periods.
    let idle = silence_allowed(connect.keep_alive, limits.max_keep_alive);
    loop {
        let next = async {
            tokio::time::timeout(idle, framed.read())
                .await
                .map_err(|_| Closed::KeepAlive)?
                .map_err(Closed::from)
        };
        tokio::select! {
            packet = next => {
                let handled = connection.handle(packet?).await;
                framed.write(&handled.send).await?;
                if let Some(reason) = handled.close {
                    return Err(Closed::Ended(reason));
                }
            }
            Some(push) = connection.push() => framed.write(&[push]).await?,
            () = stopped(&mut stop) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{Login, PubAck, Publish};

    struct Echo;

    #[async_trait]
    impl Connection for Echo {
        async fn handle(&mut self, packet: Packet) -> Handled {
            match packet {
                Packet::Publish(p) => Handled {
                    send: vec![Packet::PubAck(PubAck::new(p.pkid))],
                    close: None,
                },
                Packet::Disconnect => Handled {
                    send: vec![],
                    close: Some("bye"),
                },
                _ => Handled::default(),
            }
        }
    }

    struct OnlyAlice;

    fn test_client() -> Client {
        Client {
            peer: ([127, 0, 0, 1], 1).into(),
            certificates: Vec::new(),
        }
    }

    #[async_trait]
    impl Connector for OnlyAlice {
        async fn connect(
            &self,
            connect: &Connect,
            _certificates: &[Vec<u8>],
        ) -> Result<Box<dyn Connection>, ConnectReturnCode> {
            match &connect.login {
                Some(login) if login.username == "alice" => Ok(Box::new(Echo)),
                _ => Err(ConnectReturnCode::NotAuthorized),
            }
        }
    }

    fn encode(packets: &[Packet]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for p in packets {
            p.write(&mut out, 1 << 20).expect("encode");
        }
        out.to_vec()
    }

    async fn exchange(input: Vec<u8>) -> (Result<(), String>, Vec<Packet>) {
        let (result, packets) = exchange_closed(input).await;
        (result.map_err(|reason| reason.to_string()), packets)
    }

    /// A connection served by [`OnlyAlice`] with small limits and `max_keep_alive`, its client's
    /// end, and the task serving it (until it ends or the client's end goes).
    fn serve_alice(
        max_keep_alive: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Result<(), Closed>>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let limits = MqttLimits {
            max_packet_bytes: 1024,
            max_connections: 1,
            max_keep_alive,
        };
        let task = tokio::spawn(async move {
            let (_tx, rx) = watch::channel(false);
            run_connection(server, test_client(), Arc::new(OnlyAlice), limits, rx).await
        });
        (client, task)
    }

    async fn exchange_closed(input: Vec<u8>) -> (Result<(), Closed>, Vec<Packet>) {
        let (client, task) = serve_alice(DEFAULT_MAX_KEEP_ALIVE);
        let (mut read, mut write) = tokio::io::split(client);
        write.write_all(&input).await.expect("write");
        drop(write);
        let result = task.await.expect("join");
        let mut bytes = Vec::new();
        read.read_to_end(&mut bytes).await.expect("read");
        let mut buffer = BytesMut::from(&bytes[..]);
        let mut packets = Vec::new();
        while !buffer.is_empty() {
            packets.push(Packet::read(&mut buffer, 1 << 20).expect("decode"));
        }
        (result, packets)
    }

    fn connect(user: &str) -> Packet {
        let mut c = Connect::new("client");
        c.login = Some(Login::new(user, "secret"));
        c.clean_session = false;
        c.keep_alive = 0;
        Packet::Connect(c)
    }

    #[test]
    fn keep_alives_are_capped_and_none_is_the_cap() {
        let max = Duration::from_secs(100);
        assert_eq!(silence_allowed(60, max), Duration::from_secs(90));
        assert_eq!(silence_allowed(0, max), Duration::from_secs(150));
        assert_eq!(silence_allowed(u16::MAX, max), Duration::from_secs(150));
    }

    /// A client that asked for no keep-alive and falls silent is dropped once the cap has passed,
    /// not kept for ever.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_without_keep_alive_is_dropped() {
        let (client, task) = serve_alice(Duration::from_secs(2));
        let (mut read, mut write) = tokio::io::split(client);
        write
            .write_all(&encode(&[connect("alice")]))
            .await
            .expect("write");
        let mut connack = [0u8; 4];
        read.read_exact(&mut connack).await.expect("connack");
        let started = tokio::time::Instant::now();
        let ended = task.await.expect("join");
        assert!(matches!(ended, Err(Closed::KeepAlive)), "{ended:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        drop(write);
    }

    #[tokio::test]
    async fn connack_then_packets_in_order() {
        let mut publish = Publish::new("t", QoS::AtLeastOnce, b"x".to_vec());
        publish.pkid = 5;
        let (result, out) = exchange(encode(&[
            connect("alice"),
            Packet::Publish(publish),
            Packet::Disconnect,
        ]))
        .await;
        assert_eq!(result, Err("bye".into()));
        assert_eq!(
            out,
            vec![
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
                Packet::PubAck(PubAck::new(5))
            ]
        );
    }

    #[tokio::test]
    async fn refused_login_gets_its_return_code() {
        let (result, out) = exchange(encode(&[connect("mallory")])).await;
        assert!(result.is_err());
        assert_eq!(
            out,
            vec![Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::NotAuthorized,
                false
            ))]
        );
    }

    #[tokio::test]
    async fn malformed_or_oversized_input_closes_only_this_connection() {
        let (result, out) = exchange(vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]).await;
        assert!(result.is_err() && out.is_empty());
        let big = Publish::new("t", QoS::AtMostOnce, vec![0u8; 4096]);
        let (result, out) = exchange(encode(&[connect("alice"), Packet::Publish(big)])).await;
        assert!(
            result.expect_err("refused").contains("malformed"),
            "oversized packets are refused"
        );
        assert_eq!(out.len(), 1, "only the CONNACK");
        let (result, _) = exchange(encode(&[Packet::PingReq])).await;
        assert_eq!(result, Err("the first packet was not CONNECT".into()));
    }

    /// A CONNECT with protocol name `name` and level `level`, otherwise valid.
    fn connect_with_level(name: &str, level: u8) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&u16::try_from(name.len()).expect("short").to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&[level, 0b1100_0010, 0, 60]);
        for field in ["client", "alice", "secret"] {
            body.extend_from_slice(&u16::try_from(field.len()).expect("short").to_be_bytes());
            body.extend_from_slice(field.as_bytes());
        }
        let mut packet = vec![0x10, u8::try_from(body.len()).expect("short")];
        packet.extend_from_slice(&body);
        packet
    }

    #[tokio::test]
    async fn protocol_levels_other_than_4_get_connack_1() {
        let mut accepted = connect_with_level("MQTT", 4);
        accepted.extend_from_slice(&encode(&[Packet::Disconnect]));
        let (result, out) = exchange(accepted).await;
        assert_eq!(
            out,
            vec![Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                false
            ))],
            "{result:?}"
        );
        for (name, level) in [("MQTT", 5), ("MQTT", 3), ("MQIsdp", 3), ("MQTT", 99)] {
            let (result, out) = exchange(connect_with_level(name, level)).await;
            assert!(result.is_err(), "{name} level {level}");
            assert_eq!(
                out,
                vec![Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::RefusedProtocolVersion,
                    false
                ))],
                "{name} level {level}: CONNACK 0x01, then close"
            );
        }
    }

    #[tokio::test]
    async fn other_protocols_are_named() {
        for (head, protocol) in [
            (&b"AMQP\x03\x01\x00\x00"[..], "AMQP"),
            (b"AMQP\x00\x01\x00\x00", "AMQP"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP"),
        ] {
            let (result, out) = exchange(head.to_vec()).await;
            assert_eq!(
                result,
                Err(format!("the client speaks {protocol}, not MQTT")),
                "{head:?}"
            );
            assert!(out.is_empty());
        }
    }

    /// Garbage after a CONNECT closes the connection at once, even with the client's side still
    /// open and no keep-alive to end it: with paused time, a connection that waited for more bytes
    /// would run into the timeout below instead.
    #[tokio::test(start_paused = true)]
    async fn garbage_after_connect_closes_at_once() {
        for garbage in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0x00, 0x00],
            &[0xf0, 0x10],
            &[0x62, 0x05],
            &[0xc0, 0x01],
            &[0x36, 0x02],
        ] {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (_tx, rx) = watch::channel(false);
            let task = tokio::spawn(run_connection(
                server,
                test_client(),
                Arc::new(OnlyAlice),
                MqttLimits::default(),
                rx,
            ));
            let (_read, mut write) = tokio::io::split(client);
            let mut input = encode(&[connect("alice")]);
            input.extend_from_slice(garbage);
            write.write_all(&input).await.expect("write");
            let result = tokio::time::timeout(Duration::from_secs(3600), task)
                .await
                .unwrap_or_else(|_| panic!("{garbage:02x?} left the connection open"))
                .expect("join");
            assert!(
                result
                    .as_ref()
                    .is_err_and(|why| why.to_string().contains("malformed")),
                "{garbage:02x?}: {result:?}"
            );
        }
    }
}
