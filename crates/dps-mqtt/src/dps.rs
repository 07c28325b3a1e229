//! The DPS side of the MQTT listener: CONNECT usernames `{idScope}/registrations/{registrationId}/…`
//! with the device SAS as password, or no password and a client certificate (X.509). Like Azure,
//! the credentials are checked on each request, so a bad key or certificate gets a 401 with a JSON
//! body on the response topic (every SDK then fails at once).

use std::sync::Arc;

use async_trait::async_trait;
use dps_core::ProvisioningError;
use dps_core::device::{DeviceRegistration, RegistrationOperationStatus};
use dps_core::model::ProvisioningServiceErrorDetails;
use dps_core::provisioning::{Credentials, Provisioning, Transport};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};

use crate::server::{Connection, Connector, Handled};
use crate::session::{DpsSession, Output};

/// `(idScope, registrationId)` from a DPS CONNECT username: `{scope}/registrations/{id}/api-version=…`
/// (SDKs omit the `?`; one is tolerated).
pub fn parse_username(username: &str) -> Option<(String, String)> {
    let mut parts = username.splitn(4, '/');
    let scope = parts.next().filter(|s| !s.is_empty())?;
    parts
        .next()
        .filter(|s| s.eq_ignore_ascii_case("registrations"))?;
    let registration_id = parts.next().filter(|s| !s.is_empty())?;
    Some((scope.to_owned(), registration_id.to_owned()))
}

/// Accepts DPS connections; hands other usernames to `others` (the IoT hub side), if any.
pub struct DpsConnector {
    provisioning: Arc<Provisioning>,
    others: Option<Arc<dyn Connector>>,
    transport: Transport,
}

impl DpsConnector {
    /// DPS, with an optional connector for everything that is not DPS.
    pub fn new(provisioning: Arc<Provisioning>, others: Option<Arc<dyn Connector>>) -> Self {
        Self {
            provisioning,
            others,
            transport: Transport::Mqtt,
        }
    }

    /// The same, for connections that arrive another way (MQTT over WebSockets): registrations
    /// and metrics are labelled with `transport`.
    #[must_use]
    pub fn over(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }
}

#[async_trait]
impl Connector for DpsConnector {
    async fn connect(
        &self,
        connect: &Connect,
        certificates: &[Vec<u8>],
    ) -> Result<Box<dyn Connection>, ConnectReturnCode> {
        let username = connect
            .login
            .as_ref()
            .map(|l| l.username.as_str())
            .unwrap_or_default();
        let Some((scope, registration_id)) = parse_username(username) else {
            return match &self.others {
                Some(others) => others.connect(connect, certificates).await,
                None => Err(ConnectReturnCode::BadUserNamePassword),
            };
        };
        let sas = connect
            .login
            .as_ref()
            .map(|l| l.password.clone())
            .filter(|p| !p.is_empty());
        // X.509 devices send no password: their certificate is checked on each request, as a SAS is.
        if sas.is_none() && certificates.is_empty() {
            return Err(ConnectReturnCode::NotAuthorized);
        }
        Ok(Box::new(DpsConnection {
            session: DpsSession::new(),
            provisioning: Arc::clone(&self.provisioning),
            scope,
            registration_id,
            sas,
            certificates: certificates.to_vec(),
            transport: self.transport,
        }))
    }
}

struct DpsConnection {
    session: DpsSession,
    provisioning: Arc<Provisioning>,
    scope: String,
    registration_id: String,
    sas: Option<String>,
    certificates: Vec<Vec<u8>>,
    transport: Transport,
}

/// Which request a response answers.
#[derive(Clone, Copy)]
enum Request {
    Register,
    Poll,
}

impl DpsConnection {
    fn credentials(&self) -> Credentials<'_> {
        Credentials {
            sas: self.sas.as_deref(),
            certificates: &self.certificates,
        }
    }

    /// Status, Retry-After and JSON body of a response (a register request's status is the core's
    /// [`RegistrationOperationStatus::REGISTER_RESPONSE_STATUS`], whatever the body).
    fn answer(
        &self,
        request: Request,
        result: Result<RegistrationOperationStatus, ProvisioningError>,
    ) -> (u16, Option<u32>, Vec<u8>) {
        match result {
            Ok(status) => {
                let code = match request {
                    Request::Register => RegistrationOperationStatus::REGISTER_RESPONSE_STATUS,
                    Request::Poll => status.response_status(),
                };
                let retry = self.provisioning.retry_after_for(&status);
                (code, retry, serde_json::to_vec(&status).unwrap_or_default())
            }
            Err(err) => {
                let body = ProvisioningServiceErrorDetails::report(&err, self.provisioning.now());
                (
                    err.http_status(),
                    err.retry_after_secs(),
                    serde_json::to_vec(&body).unwrap_or_default(),
                )
            }
        }
    }
}

#[async_trait]
impl Connection for DpsConnection {
    async fn handle(&mut self, packet: Packet) -> Handled {
        let mut handled = Handled::default();
        for output in self.session.handle(packet) {
            let (rid, (status, retry_after, body)) = match output {
                Output::Send(packet) => {
                    handled.send.push(packet);
                    continue;
                }
                Output::Close(reason) => {
                    handled.close = Some(reason);
                    break;
                }
                Output::Register { rid, body } => {
                    let result = match DeviceRegistration::from_body(&body) {
                        Ok(registration) => {
                            self.provisioning
                                .register(
                                    self.transport,
                                    &self.scope,
                                    &self.registration_id,
                                    registration,
                                    self.credentials(),
                                )
                                .await
                        }
                        Err(err) => Err(err),
                    };
                    (rid, self.answer(Request::Register, result))
                }
                Output::Poll { rid, operation_id } => {
                    let result = self
                        .provisioning
                        .operation_status(
                            self.transport,
                            &self.scope,
                            &self.registration_id,
                            &operation_id,
                            self.credentials(),
                        )
                        .await;
                    (rid, self.answer(Request::Poll, result))
                }
            };
            handled
                .send
                .push(self.session.respond(&rid, status, retry_after, body));
        }
        handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert_eq!(
            parse_username(
                "0ne00111111/registrations/dev-1/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.14.0"
            ),
            Some(("0ne00111111".into(), "dev-1".into()))
        );
        assert_eq!(
            parse_username("0ne00111111/registrations/dev-1/?api-version=2019-03-31"),
            Some(("0ne00111111".into(), "dev-1".into()))
        );
        assert_eq!(
            parse_username("0ne00111111/Registrations/dev-1"),
            Some(("0ne00111111".into(), "dev-1".into()))
        );
        assert_eq!(
            parse_username("myhub.azure-devices.net/dev-1/?api-version=2019-10-01"),
            None
        );
        assert_eq!(parse_username("0ne00111111/registrations/"), None);
        assert_eq!(parse_username(""), None);
    }
}
