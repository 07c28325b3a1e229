//! One simulated device: where it registers, with which key and payload, over which transport.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use dps_core::device::RegistrationOperationStatus;
use dps_core::model::EnrollmentStatus;
use serde_json::Value;

use crate::amqp::DpsAmqp;
use crate::exchange::{DeviceExchange, Ended, Reply, register_and_poll};
use crate::https::{API_VERSION, HttpsExchange};
use crate::mqtt::{Carrier, DpsMqtt};

/// Lifetime of the device's SAS token.
const TOKEN_TTL_SECS: i64 = 3600;

/// How a device talks to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The DPS device REST API over HTTPS.
    Https,
    /// MQTT 3.1.1 over TLS, as the Python, C, C# and Node SDKs can.
    Mqtt,
    /// MQTT 3.1.1 over WebSockets on the HTTPS port (`/$iothub/websocket`), for networks that
    /// pass only 443.
    MqttWs,
    /// AMQP 1.0 over TLS, as the C, C#, Node and Java SDKs can.
    Amqp,
    /// AMQP 1.0 over WebSockets on the HTTPS port.
    AmqpWs,
}

/// How a device proves who it is.
#[derive(Debug, Clone)]
pub enum Attestation {
    /// A symmetric key (for a group device: its derived key): SAS tokens signed with it.
    SymmetricKey(String),
    /// An X.509 certificate (its subject CN is the registration id) and its private key,
    /// presented in the TLS handshake.
    X509(ClientIdentity),
}

/// A client certificate chain and its private key, PEM.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// The device's certificate, then any intermediates up to (not including) the enrolled CA.
    pub chain_pem: Vec<u8>,
    /// The certificate's private key.
    pub key_pem: Vec<u8>,
}

impl ClientIdentity {
    /// Reads a certificate chain file and a key file (PEM).
    pub fn from_files(
        certificate: &std::path::Path,
        key: &std::path::Path,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            chain_pem: std::fs::read(certificate)
                .with_context(|| format!("while reading {}", certificate.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("while reading {}", key.display()))?,
        })
    }
}

/// Where and how one device provisions itself.
#[derive(Debug, Clone)]
pub struct Device {
    /// Provisioning endpoint, `host[:port]` (HTTPS).
    pub host: String,
    /// MQTT port at the same host.
    pub mqtt_port: u16,
    /// AMQP port at the same host.
    pub amqp_port: u16,
    /// ID scope.
    pub scope: String,
    /// CA to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Registration id.
    pub registration_id: String,
    /// How it attests.
    pub attestation: Attestation,
    /// The custom payload for the allocation webhook.
    pub payload: Option<Value>,
    /// Transport.
    pub transport: Transport,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Device {
    /// The host name alone, for MQTT (DPS and the hub gateway).
    fn host_name(&self) -> &str {
        self.host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(name, _)| name)
    }

    /// Where the device's transport connects: its own port over TLS, or the HTTPS port over a
    /// WebSocket.
    fn endpoint(&self) -> (u16, Carrier) {
        match self.transport {
            Transport::Https => (self.https_port(), Carrier::Tls),
            Transport::Mqtt => (self.mqtt_port, Carrier::Tls),
            Transport::Amqp => (self.amqp_port, Carrier::Tls),
            Transport::MqttWs | Transport::AmqpWs => (self.https_port(), Carrier::WebSocket),
        }
    }

    /// Where the device reaches its hub, over MQTT: on WebSockets if it registered on them, else
    /// the MQTT port (minihub serves no AMQP, so an AMQP device reaches its hub over MQTT).
    fn hub_endpoint(&self) -> (u16, Carrier) {
        match self.endpoint() {
            (port, Carrier::WebSocket) => (port, Carrier::WebSocket),
            (_, Carrier::Tls) => (self.mqtt_port, Carrier::Tls),
        }
    }

    /// The HTTPS port of the provisioning host, where WebSockets are opened.
    fn https_port(&self) -> u16 {
        self.host
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(443)
    }

    /// Registers and polls, honouring `Retry-After`, until the operation ends, reporting progress
    /// through `say` in the C sample's words. Returns the final operation status (assigned, failed
    /// or disabled); a refused request (401, 400, …) or a timeout is an error.
    pub async fn provision(
        &self,
        say: &(dyn Fn(&str) + Sync),
    ) -> anyhow::Result<RegistrationOperationStatus> {
        let (token, identity) = match &self.attestation {
            Attestation::SymmetricKey(key) => {
                let resource = format!("{}/registrations/{}", self.scope, self.registration_id);
                let expiry = dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_second()
                    + TOKEN_TTL_SECS;
                let token =
                    dps_core::sas::generate_token(&resource, key, Some("registration"), expiry)
                        .map_err(|_| anyhow::anyhow!("the symmetric key is not base64"))?;
                (Some(token), None)
            }
            Attestation::X509(identity) => (None, Some(identity)),
        };
        say(&format!(
            "Provisioning API Version: {API_VERSION}\n\nRegistering Device\n"
        ));
        let mut channel = match self.transport {
            Transport::Https => Channel::Https(HttpsExchange::new(
                &self.host,
                &self.scope,
                &self.registration_id,
                self.ca.as_deref(),
                token,
                identity,
            )?),
            Transport::Mqtt | Transport::MqttWs => {
                let config = crate::mqtt::tls_client_config(self.ca.as_deref(), identity)?;
                let (port, carrier) = self.endpoint();
                Channel::Mqtt(Box::new(
                    DpsMqtt::connect_with(
                        &config,
                        self.host_name(),
                        port,
                        carrier,
                        &self.scope,
                        &self.registration_id,
                        token.as_deref().unwrap_or_default(),
                    )
                    .await?,
                ))
            }
            Transport::Amqp | Transport::AmqpWs => {
                let config = crate::mqtt::tls_client_config(self.ca.as_deref(), identity)?;
                let (port, carrier) = self.endpoint();
                Channel::Amqp(Box::new(
                    DpsAmqp::connect(
                        &config,
                        self.host_name(),
                        port,
                        carrier,
                        &self.scope,
                        &self.registration_id,
                        token.as_deref(),
                    )
                    .await?,
                ))
            }
        };
        let outcome = self.poll_to_end(&mut channel, say).await;
        match channel {
            Channel::Mqtt(mqtt) => mqtt.disconnect().await,
            Channel::Amqp(amqp) => amqp.close().await,
            Channel::Https(_) => {}
        }
        outcome
    }

    async fn poll_to_end(
        &self,
        channel: &mut Channel,
        say: &(dyn Fn(&str) + Sync),
    ) -> anyhow::Result<RegistrationOperationStatus> {
        let body =
            serde_json::json!({"registrationId": self.registration_id, "payload": self.payload});
        let deadline = tokio::time::Instant::now() + self.timeout;
        match register_and_poll(channel, &body, None, deadline, say)
            .await?
            .0
        {
            Ended::Finished(reply) => Ok(*reply),
            Ended::Refused { status, reply } => bail!(refusal(status, &reply)),
            Ended::TimedOut => bail!(
                "Failure registering device: PROV_DEVICE_RESULT_TIMEOUT after {} s",
                self.timeout.as_secs()
            ),
        }
    }

    /// Connects to the assigned hub over MQTT (through this host, as a gateway; over WebSockets
    /// when the device registered that way) and reads the device's twin.
    pub async fn read_twin(&self, hub: &str, device_id: &str) -> anyhow::Result<Value> {
        let (port, carrier) = self.hub_endpoint();
        crate::mqtt::read_twin(
            self.host_name(),
            port,
            carrier,
            self.ca.as_deref(),
            hub,
            device_id,
            &self.attestation,
        )
        .await
        .with_context(|| format!("while connecting to {hub} as {device_id}"))
    }
}

/// The C SDK's result for a finished registration that is not `assigned`, and its error.
pub fn failure_line(done: &RegistrationOperationStatus) -> String {
    let state = done.registration_state.as_ref();
    let code = state.and_then(|s| s.error_code);
    let result = match (done.status, code) {
        (EnrollmentStatus::Disabled, _) => "PROV_DEVICE_RESULT_DISABLED",
        (_, Some(400_208)) => "PROV_DEVICE_RESULT_HUB_NOT_SPECIFIED",
        (_, Some(400_209)) => "PROV_DEVICE_RESULT_UNAUTHORIZED",
        _ => "PROV_DEVICE_RESULT_DEV_AUTH_ERROR",
    };
    let status = serde_json::to_value(done.status)
        .ok()
        .and_then(|s| s.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "Failure registering device: {result} (status {status}, error {}: {})",
        code.map_or_else(|| "-".into(), |c| c.to_string()),
        state
            .and_then(|s| s.error_message.as_deref())
            .unwrap_or("no message")
    )
}

/// The message for a refused request (401, 400, …).
pub fn refusal(status: u16, reply: &Value) -> String {
    format!(
        "Failure registering device: status {status}, error {}: {}",
        reply["errorCode"]
            .as_i64()
            .map_or_else(|| "-".into(), |c| c.to_string()),
        reply["message"].as_str().unwrap_or("no message")
    )
}

/// The way requests reach the service.
enum Channel {
    Https(HttpsExchange),
    Mqtt(Box<DpsMqtt>),
    Amqp(Box<DpsAmqp>),
}

impl DeviceExchange for Channel {
    async fn register(&mut self, body: &Value) -> anyhow::Result<Reply> {
        match self {
            Self::Https(https) => https.register(body).await,
            Self::Mqtt(mqtt) => mqtt.register(body).await,
            Self::Amqp(amqp) => amqp.register(body).await,
        }
    }

    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<Reply> {
        match self {
            Self::Https(https) => https.poll(operation_id).await,
            Self::Mqtt(mqtt) => mqtt.poll(operation_id).await,
            Self::Amqp(amqp) => amqp.poll(operation_id).await,
        }
    }
}
