//! The MQTT/TLS socket shell: handshake, CONNECT, framing, keep-alive, and the loop that feeds
//! packets to a [`Connection`]. What a connection means (DPS, or a device on an IoT hub) is decided
//! by the [`Connector`] from its CONNECT, so one listener on 8883 serves both.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::{self};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// A device that has not finished TLS and sent CONNECT by then is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of the listener.
#[derive(Debug, Clone, Copy)]
pub struct MqttLimits {
    /// Largest packet accepted or sent (DPS: 96 KB messages).
    pub max_packet_bytes: usize,
}

impl Default for MqttLimits {
    fn default() -> Self {
        Self {
            max_packet_bytes: 96 * 1024 + 1024,
        }
    }
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
    async fn connect(&self, connect: &Connect) -> Result<Box<dyn Connection>, ConnectReturnCode>;
}

/// Serves MQTT over TLS on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    connector: Arc<dyn Connector>,
    limits: MqttLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!(%err, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (tls, connector, stop) = (tls.clone(), Arc::clone(&connector), shutdown.clone());
                tokio::spawn(async move {
                    let _open = OpenConnection::new("mqtt");
                    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        _ => {
                            tracing::debug!(%peer, "MQTT TLS handshake failed or timed out");
                            metrics::counter!("opendps_tls_handshake_failures_total", "listener" => "mqtt").increment(1);
                            return;
                        }
                    };
                    if let Err(reason) = run_connection(stream, connector, limits, stop).await {
                        tracing::debug!(%peer, reason, "MQTT connection closed");
                    }
                });
            }
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Resolves once the shutdown flag turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Framing over any byte stream.
struct Framed<S> {
    stream: S,
    buffer: BytesMut,
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    async fn read(&mut self) -> Result<Packet, String> {
        loop {
            match Packet::read(&mut self.buffer, self.max) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => return Err(format!("malformed packet: {err}")),
            }
            let read = self
                .stream
                .read_buf(&mut self.buffer)
                .await
                .map_err(|e| format!("read failed: {e}"))?;
            if read == 0 {
                return Err("the client closed the connection".into());
            }
        }
    }

    async fn write(&mut self, packets: &[Packet]) -> Result<(), String> {
        let mut out = BytesMut::new();
        for packet in packets {
            packet
                .write(&mut out, self.max)
                .map_err(|e| format!("cannot encode a packet: {e}"))?;
        }
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        self.stream
            .flush()
            .await
            .map_err(|e| format!("write failed: {e}"))
    }
}

async fn run_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    connector: Arc<dyn Connector>,
    limits: MqttLimits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut framed = Framed {
        stream,
        buffer: BytesMut::with_capacity(4096),
        max: limits.max_packet_bytes,
    };
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, framed.read()).await {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(_)) => return Err("the first packet was not CONNECT".into()),
        Ok(Err(err)) => return Err(err),
        Err(_) => return Err("no CONNECT in time".into()),
    };
    let mut connection = match connector.connect(&connect).await {
        Ok(connection) => connection,
        Err(code) => {
            framed
                .write(&[Packet::ConnAck(ConnAck::new(code, false))])
                .await?;
            return Err(format!("CONNECT refused ({code:?})"));
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
    let idle = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    loop {
        let next = async {
            match idle {
                Some(limit) => tokio::time::timeout(limit, framed.read())
                    .await
                    .map_err(|_| "keep-alive expired".to_owned())?,
                None => framed.read().await,
            }
        };
        tokio::select! {
            packet = next => {
                let handled = connection.handle(packet?).await;
                framed.write(&handled.send).await?;
                if let Some(reason) = handled.close {
                    return Err(reason.to_owned());
                }
            }
            Some(push) = connection.push() => framed.write(&[push]).await?,
            () = stopped(&mut stop) => return Ok(()),
        }
    }
}

/// Counts a connection in `opendps_open_connections` while it lives.
struct OpenConnection(&'static str);

impl OpenConnection {
    fn new(listener: &'static str) -> Self {
        metrics::gauge!("opendps_open_connections", "listener" => listener).increment(1.0);
        Self(listener)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("opendps_open_connections", "listener" => self.0).decrement(1.0);
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

    #[async_trait]
    impl Connector for OnlyAlice {
        async fn connect(
            &self,
            connect: &Connect,
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
        let (client, server) = tokio::io::duplex(1 << 20);
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(run_connection(
            server,
            Arc::new(OnlyAlice),
            MqttLimits {
                max_packet_bytes: 1024,
            },
            rx,
        ));
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
}
