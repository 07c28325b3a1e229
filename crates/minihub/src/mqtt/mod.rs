//! The device side of the hubs over MQTT 3.1.1: CONNECT with `{hubHostName}/{deviceId}/?api-version=…`
//! and the device SAS as password, then twin reads, reported patches, desired-property updates and
//! telemetry. [`session`] is the protocol without I/O; [`HubMqtt`] plugs it into the
//! `dps_mqtt` socket shell (as the connector for everything that is not DPS).

pub mod session;

use std::sync::Arc;

use async_trait::async_trait;
use dps_mqtt::{Connection, Connector, Handled};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::{DesiredPatch, DeviceMessage, Minihub, MinihubError};
use session::{HubSession, Output};

/// `(hubHostName, deviceId)` from a hub CONNECT username: `{hub}/{deviceId}/?api-version=…` (the
/// `?` may be missing). Module identities (`{hub}/{deviceId}/{moduleId}/…`) are not served.
pub fn parse_username(username: &str) -> Option<(String, String)> {
    let mut parts = username.splitn(3, '/');
    let hub = parts.next().filter(|s| !s.is_empty())?;
    let device_id = parts.next().filter(|s| !s.is_empty() && !s.contains('?'))?;
    match parts.next() {
        None => {}
        Some(rest) if rest.is_empty() || rest.starts_with('?') => {}
        // No `?`: the first segment must already be the query (`api-version=…`).
        Some(rest) if rest.split('/').next().is_some_and(|s| s.contains('=')) => {}
        Some(_) => return None,
    }
    Some((hub.to_owned(), device_id.to_owned()))
}

/// Accepts device connections to the hubs of a [`Minihub`].
#[derive(Debug, Clone)]
pub struct HubMqtt {
    minihub: Arc<Minihub>,
}

impl HubMqtt {
    /// Serves the devices of every hub in `minihub`.
    pub fn new(minihub: Arc<Minihub>) -> Self {
        Self { minihub }
    }
}

#[async_trait]
impl Connector for HubMqtt {
    async fn connect(
        &self,
        connect: &Connect,
        certificates: &[Vec<u8>],
    ) -> Result<Box<dyn Connection>, ConnectReturnCode> {
        let Some(login) = connect.login.as_ref() else {
            return Err(ConnectReturnCode::NotAuthorized);
        };
        let Some((hub_name, device_id)) = parse_username(&login.username) else {
            tracing::debug!(
                username = login.username,
                "MQTT username is not {{hub}}/{{deviceId}}/…"
            );
            return Err(ConnectReturnCode::BadUserNamePassword);
        };
        let Some(hub) = self.minihub.hub_for_host(&hub_name) else {
            tracing::debug!(hub_name, "MQTT CONNECT for an unknown hub");
            return Err(ConnectReturnCode::NotAuthorized);
        };
        // X.509 devices send no password and authenticate with their TLS client certificate.
        let verified = match (login.password.is_empty(), certificates.first()) {
            (false, _) => {
                self.minihub
                    .verify_device_sas(&hub, &device_id, &login.password)
                    .await
            }
            (true, Some(leaf)) => {
                self.minihub
                    .verify_device_certificate(&hub, &device_id, leaf)
                    .await
            }
            (true, None) => Err(MinihubError::Unauthorized(
                "no password and no client certificate".into(),
            )),
        };
        if let Err(err) = verified {
            tracing::debug!(hub, device_id, %err, "MQTT CONNECT refused");
            return Err(ConnectReturnCode::NotAuthorized);
        }
        if connect.client_id != device_id {
            tracing::warn!(
                hub,
                device_id,
                client_id = connect.client_id,
                "MQTT client id differs from the device id"
            );
        }
        let desired = self
            .minihub
            .watch_desired(&hub, &device_id)
            .map_err(|_| ConnectReturnCode::ServiceUnavailable)?;
        tracing::debug!(
            hub,
            device_id,
            username = login.username,
            clean_session = connect.clean_session,
            keep_alive = connect.keep_alive,
            "device connected over MQTT"
        );
        Ok(Box::new(HubConnection {
            session: HubSession::new(&device_id),
            minihub: Arc::clone(&self.minihub),
            hub,
            device_id,
            desired: Some(desired),
        }))
    }
}

/// One device connection: the session plus the calls into [`Minihub`].
struct HubConnection {
    session: HubSession,
    minihub: Arc<Minihub>,
    hub: String,
    device_id: String,
    /// Desired-property updates; `None` once the channel is gone.
    desired: Option<broadcast::Receiver<DesiredPatch>>,
}

impl HubConnection {
    /// Status, `$version` and body of the answer to a twin request.
    async fn twin_answer(&self, output: &Output) -> (u16, Option<u64>, Vec<u8>) {
        let result = match output {
            Output::GetTwin { .. } => self
                .minihub
                .device_twin(&self.hub, &self.device_id)
                .await
                .map(|twin| (200, None, serde_json::to_vec(&twin).unwrap_or_default())),
            Output::PatchReported { body, .. } => match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(patch)) => self
                    .minihub
                    .patch_reported(&self.hub, &self.device_id, &patch)
                    .await
                    .map(|version| (204, Some(version), Vec::new())),
                _ => {
                    return (
                        400,
                        None,
                        error_body("the reported properties must be a JSON object"),
                    );
                }
            },
            _ => return (500, None, Vec::new()),
        };
        result.unwrap_or_else(|err| {
            let status = err.http_status().as_u16();
            if status >= 500 {
                tracing::error!(hub = self.hub, device_id = self.device_id, %err, "twin request failed");
                (status, None, error_body("internal error"))
            } else {
                (status, None, error_body(&err.to_string()))
            }
        })
    }
}

fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "Message": message })).unwrap_or_default()
}

#[async_trait]
impl Connection for HubConnection {
    async fn handle(&mut self, packet: Packet) -> Handled {
        let mut handled = Handled::default();
        for output in self.session.handle(packet) {
            match output {
                Output::Send(packet) => handled.send.push(packet),
                Output::Close(reason) => {
                    handled.close = Some(reason);
                    break;
                }
                Output::Telemetry {
                    properties,
                    system_properties,
                    body,
                } => {
                    let message = DeviceMessage {
                        enqueued_time: self.minihub.timestamp(),
                        body,
                        properties,
                        system_properties,
                    };
                    if let Err(err) =
                        self.minihub
                            .record_telemetry(&self.hub, &self.device_id, message)
                    {
                        tracing::warn!(hub = self.hub, device_id = self.device_id, %err, "telemetry dropped");
                    }
                }
                request @ (Output::GetTwin { .. } | Output::PatchReported { .. }) => {
                    let (status, version, body) = self.twin_answer(&request).await;
                    let (Output::GetTwin { rid } | Output::PatchReported { rid, .. }) = request
                    else {
                        continue;
                    };
                    handled
                        .send
                        .push(self.session.twin_response(&rid, status, version, body));
                }
            }
        }
        handled
    }

    async fn push(&mut self) -> Option<Packet> {
        loop {
            let Some(receiver) = self.desired.as_mut() else {
                return std::future::pending().await;
            };
            match receiver.recv().await {
                Ok(patch) => {
                    if let Some(packet) = self.session.desired_update(patch.version, &patch.body) {
                        return Some(packet);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        hub = self.hub,
                        device_id = self.device_id,
                        missed,
                        "desired-property updates dropped for a slow device"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => self.desired = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        let hub = |u: &str| parse_username(u);
        let expected = Some(("hub.example".to_owned(), "dev-1".to_owned()));
        assert_eq!(
            hub(
                "hub.example/dev-1/?api-version=2019-10-01&DeviceClientType=py-azure-iot-device%2F2.14.0"
            ),
            expected
        );
        assert_eq!(
            hub("hub.example/dev-1/api-version=2020-09-30&DeviceClientType=x&model-id=dtmi:a;1"),
            expected
        );
        assert_eq!(hub("hub.example/dev-1/"), expected);
        assert_eq!(hub("hub.example/dev-1"), expected);
        assert_eq!(hub("hub.example/dev-1/module-1/?api-version=1"), None);
        assert_eq!(hub("hub.example//?api-version=1"), None);
        assert_eq!(hub("0ne001/registrations/dev-1/api-version=1"), None);
        assert_eq!(hub(""), None);
    }
}
