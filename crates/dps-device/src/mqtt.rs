//! A minimal MQTT 3.1.1 client over TLS or over WebSockets: the DPS register/poll exchange
//! exactly as the SDKs perform it (CONNECT with the SAS as password, SUBSCRIBE to the response
//! topic, QoS 1 requests with a `$rid`, PUBACK of every response), and a device's twin read from
//! its IoT hub.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
};
use rumqttc::mqttbytes::{self, QoS};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::device::{Attestation, ClientIdentity};
use crate::exchange::Reply;

const MAX_PACKET: usize = 256 * 1024;
/// How long to wait for any answer from the service.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const DPS_RESPONSES: &str = "$dps/registrations/res/";
const TWIN_RESPONSES: &str = "$iothub/twin/res/";

/// How MQTT packets travel to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Carrier {
    /// MQTT over TLS (port 8883).
    #[default]
    Tls,
    /// MQTT over WebSockets over TLS on the HTTPS port: path `/$iothub/websocket`, subprotocol
    /// `mqtt`, each packet in a binary message (as the SDKs' `websockets` option does).
    WebSocket,
}

/// The bytes under an MQTT connection: a TLS stream, or a WebSocket on one.
trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for S {}

/// An open MQTT connection of one device.
pub struct DpsMqtt {
    stream: Box<dyn ByteStream>,
    buffer: BytesMut,
    next_id: u16,
    client_id: String,
}

/// Reads a device's twin from its IoT hub over MQTT: `gateway:port` is where the hub is reached,
/// `hub` its name (in the username and the token). Returns the `{"desired", "reported"}` document.
pub async fn read_twin(
    gateway: &str,
    port: u16,
    carrier: Carrier,
    ca: Option<&Path>,
    hub: &str,
    device_id: &str,
    attestation: &Attestation,
) -> anyhow::Result<Value> {
    // A symmetric-key device logs in with a SAS token; an X.509 device with its certificate and
    // no password.
    let (sas, identity) = match attestation {
        Attestation::SymmetricKey(key) => {
            let expiry =
                dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_second() + 3600;
            let sas = dps_core::sas::generate_token(
                &format!("{hub}/devices/{device_id}"),
                key,
                None,
                expiry,
            )
            .map_err(|_| anyhow::anyhow!("the device key is not base64"))?;
            (sas, None)
        }
        Attestation::X509(identity) => (String::new(), Some(identity)),
    };
    let username = format!(
        "{hub}/{device_id}/?api-version=2019-10-01&DeviceClientType=opendps-device%2F{}",
        env!("CARGO_PKG_VERSION")
    );
    let config = tls_client_config(ca, identity)?;
    let mut link = DpsMqtt::open_with(
        &config,
        gateway,
        port,
        carrier,
        device_id,
        &username,
        &sas,
        "$iothub/twin/res/#",
    )
    .await?;
    let Reply {
        status, body: twin, ..
    } = link
        .request(
            TWIN_RESPONSES,
            "$iothub/twin/GET/?$rid=1".into(),
            Vec::new(),
        )
        .await?;
    link.disconnect().await;
    if status != 200 {
        bail!("the hub answered the twin request with status {status}");
    }
    Ok(twin)
}

/// A TLS client configuration trusting `ca`, or the platform's roots without one, presenting
/// `identity` (an X.509 device's certificate) when given.
pub fn tls_client_config(
    ca: Option<&Path>,
    identity: Option<&ClientIdentity>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("while reading {}", ca.display()))?
            {
                roots.add(cert.with_context(|| format!("{} is not PEM", ca.display()))?)?;
            }
            builder.with_root_certificates(roots)
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt as _;
            builder.with_platform_verifier()?
        }
    };
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => {
            let chain = CertificateDer::pem_slice_iter(&identity.chain_pem)
                .collect::<Result<Vec<_>, _>>()
                .context("the device certificate is not PEM")?;
            if chain.is_empty() {
                bail!("the device certificate file holds no certificate");
            }
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&identity.key_pem)
                .context("the device key is not a PEM private key")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the device key does not match its certificate")?
        }
    };
    Ok(Arc::new(config))
}

/// A TCP connection to `host:port` (without Nagle's delay: small request packets must not wait
/// for the previous one's ACK) and the TLS handshake with `config`; `what` names the protocol in
/// errors.
pub(crate) async fn connect_tls(
    config: &Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    what: &str,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .context("connecting timed out")?
        .with_context(|| format!("could not reach {host}:{port} ({what})"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_owned()).context("the host is not a valid TLS name")?;
    TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
        .context("the TLS handshake failed")
}

impl crate::exchange::DeviceExchange for DpsMqtt {
    /// Publishes the register request; returns (status, retry-after, body).
    async fn register(&mut self, body: &Value) -> anyhow::Result<Reply> {
        let rid = self.packet_id();
        let payload = serde_json::to_vec(body)?;
        self.request(
            DPS_RESPONSES,
            format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
            payload,
        )
        .await
    }

    /// Publishes a poll of `operation_id`.
    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<Reply> {
        let rid = self.packet_id();
        let topic = format!(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation_id}"
        );
        self.request(DPS_RESPONSES, topic, b" ".to_vec()).await
    }
}

impl DpsMqtt {
    /// Connects to DPS at `host:port`, logs in as the device and subscribes to the response topic.
    pub async fn connect(
        host: &str,
        port: u16,
        ca: Option<&Path>,
        scope: &str,
        registration_id: &str,
        sas: &str,
    ) -> anyhow::Result<Self> {
        let config = tls_client_config(ca, None)?;
        Self::connect_with(
            &config,
            host,
            port,
            Carrier::Tls,
            scope,
            registration_id,
            sas,
        )
        .await
    }

    /// Connects to DPS with a TLS client configuration made once (see [`tls_client_config`]),
    /// over `carrier` (`port` is then the MQTT or the HTTPS port).
    pub async fn connect_with(
        config: &Arc<rustls::ClientConfig>,
        host: &str,
        port: u16,
        carrier: Carrier,
        scope: &str,
        registration_id: &str,
        sas: &str,
    ) -> anyhow::Result<Self> {
        let username = format!(
            "{scope}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=opendps-device%2F{}",
            env!("CARGO_PKG_VERSION")
        );
        Self::open_with(
            config,
            host,
            port,
            carrier,
            registration_id,
            &username,
            sas,
            "$dps/registrations/res/#",
        )
        .await
    }

    /// TLS, CONNECT (clean session, the SAS as password, or none for an X.509 device), SUBSCRIBE
    /// to `filter` at QoS 1.
    #[allow(clippy::too_many_arguments)]
    async fn open_with(
        config: &Arc<rustls::ClientConfig>,
        host: &str,
        port: u16,
        carrier: Carrier,
        client_id: &str,
        username: &str,
        sas: &str,
        filter: &str,
    ) -> anyhow::Result<Self> {
        let stream = connect_tls(config, host, port, "MQTT").await?;
        let stream: Box<dyn ByteStream> = match carrier {
            Carrier::Tls => Box::new(stream),
            Carrier::WebSocket => Box::new(crate::ws::open(stream, host, port, "mqtt").await?),
        };
        let mut link = Self {
            stream,
            buffer: BytesMut::new(),
            next_id: 1,
            client_id: client_id.to_owned(),
        };

        let mut connect = Connect::new(client_id);
        connect.keep_alive = 60;
        connect.clean_session = true;
        connect.login = Some(Login::new(username, sas));
        link.send(Packet::Connect(connect)).await?;
        match link.receive().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(ack) => bail!("the service refused the MQTT login: {:?}", ack.code),
            other => bail!("expected CONNACK, got {other:?}"),
        }
        let pkid = link.packet_id();
        link.send(Packet::Subscribe(Subscribe {
            pkid,
            filters: vec![SubscribeFilter::new(filter.into(), QoS::AtLeastOnce)],
        }))
        .await?;
        match link.receive().await? {
            Packet::SubAck(ack) if ack.pkid == pkid => Ok(link),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    /// Says goodbye.
    pub async fn disconnect(mut self) {
        let _ = self.send(Packet::Disconnect).await;
    }

    /// Publishes a QoS 1 request and waits for the response under `response_prefix` carrying its
    /// `$rid`.
    async fn request(
        &mut self,
        response_prefix: &str,
        topic: String,
        payload: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        let rid = topic
            .split("$rid=")
            .nth(1)
            .and_then(|r| r.split('&').next())
            .unwrap_or_default()
            .to_owned();
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
        publish.pkid = self.packet_id();
        self.send(Packet::Publish(publish)).await?;
        loop {
            match self.receive().await? {
                Packet::Publish(response) => {
                    if response.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(PubAck::new(response.pkid)))
                            .await?;
                    }
                    let Some(rest) = response.topic.strip_prefix(response_prefix) else {
                        continue;
                    };
                    if !rest.split(['?', '&']).any(|p| p == format!("$rid={rid}")) {
                        continue;
                    }
                    let status: u16 = rest
                        .split('/')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .context("no status in the response topic")?;
                    let wait = crate::exchange::retry_after(
                        rest.split("retry-after=")
                            .nth(1)
                            .and_then(|v| v.split('&').next()),
                    );
                    let body = serde_json::from_slice(&response.payload).unwrap_or(Value::Null);
                    return Ok(Reply {
                        status,
                        retry_after: wait,
                        body,
                    });
                }
                Packet::PubAck(_) | Packet::PingResp => {}
                other => bail!("unexpected packet from the service: {other:?}"),
            }
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    async fn send(&mut self, packet: Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        packet.write(&mut out, MAX_PACKET)?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn receive(&mut self) -> anyhow::Result<Packet> {
        loop {
            match Packet::read(&mut self.buffer, MAX_PACKET) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => bail!("malformed packet from the service: {err}"),
            }
            let read = tokio::time::timeout(ANSWER_TIMEOUT, self.stream.read_buf(&mut self.buffer))
                .await
                .with_context(|| {
                    format!("no answer for {} within {ANSWER_TIMEOUT:?}", self.client_id)
                })??;
            if read == 0 {
                bail!("the service closed the MQTT connection");
            }
        }
    }
}
