//! The DPS request and answer over a session's two links: requests arrive on the link the device
//! sends on, each becomes one core call, and the answer goes out on the link the device receives
//! on with the request's correlation id; a refused request is a rejected delivery whose error
//! description is the `ProvisioningServiceErrorDetails` JSON.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dps_core::ProvisioningError;
use dps_core::device::DeviceRegistration;
use dps_core::model::ProvisioningServiceErrorDetails;
use dps_core::provisioning::{Credentials, Provisioning, Transport};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::{Receiver, Sender};
use tokio::sync::{Notify, mpsc};

use crate::sasl::PlainLogin;

/// How long a request waits for the device's receiving link before its answer is dropped.
const RESPONDER_WAIT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
pub(crate) struct Device {
    pub provisioning: Arc<Provisioning>,
    pub transport: Transport,
    /// From the TLS handshake, leaf first.
    pub certificates: Vec<Vec<u8>>,
    /// From SASL PLAIN.
    pub login: Option<PlainLogin>,
}

/// `(idScope, registrationId)` of `{idScope}/registrations/{registrationId}`, with or without an
/// `amqps://host/` in front (the C SDK sends the URL form).
pub fn parse_address(address: &str) -> Option<(String, String)> {
    let path = match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?.1,
        None => address,
    };
    let mut parts = path.trim_start_matches('/').splitn(4, '/');
    let scope = parts.next().filter(|s| !s.is_empty())?;
    parts
        .next()
        .filter(|s| s.eq_ignore_ascii_case("registrations"))?;
    let rid = parts.next().filter(|s| !s.is_empty())?;
    Some((scope.to_owned(), rid.to_owned()))
}

impl Device {
    /// The registration a link is for; a device that logged in with SASL PLAIN may only attach
    /// to its own address.
    pub(crate) fn registration_of(
        &self,
        address: &str,
    ) -> Result<(String, String), definitions::Error> {
        let (scope, rid) = parse_address(address).ok_or_else(|| {
            // Most likely an IoT hub device ($cbs, /devices/…) pointed at this gateway.
            definitions::Error::new(
                AmqpError::NotImplemented,
                format!(
                    "'{address}' is not a DPS address ({{idScope}}/registrations/{{registrationId}}). This service serves DPS over AMQP; its IoT hubs (minihub) serve devices over MQTT and MQTT over WebSockets only"
                ),
                None,
            )
        })?;
        if let Some(login) = &self.login {
            let same = parse_address(&login.authcid).is_some_and(|(s, r)| {
                s.eq_ignore_ascii_case(&scope) && r.eq_ignore_ascii_case(&rid)
            });
            if !same {
                return Err(definitions::Error::new(
                    AmqpError::UnauthorizedAccess,
                    format!(
                        "the link is for '{scope}/registrations/{rid}', but the connection logged in as '{}'",
                        login.authcid
                    ),
                    None,
                ));
            }
        }
        Ok((scope, rid))
    }

    fn credentials(&self) -> Credentials<'_> {
        Credentials {
            sas: self.login.as_ref().map(|l| l.password.as_str()),
            certificates: &self.certificates,
        }
    }

    /// One request: the answer to send, or the error to reject the delivery with.
    async fn answer(
        &self,
        scope: &str,
        rid: &str,
        message: &Message<Body<Value>>,
    ) -> Result<Message<Data>, definitions::Error> {
        let (correlation, request) = decode(message)?;
        let result = match request {
            Request::Register { body } => match DeviceRegistration::from_body(&body) {
                Ok(registration) => {
                    self.provisioning
                        .register(self.transport, scope, rid, registration, self.credentials())
                        .await
                }
                Err(err) => Err(err),
            },
            Request::OperationStatus { operation_id } => {
                self.provisioning
                    .operation_status(
                        self.transport,
                        scope,
                        rid,
                        &operation_id,
                        self.credentials(),
                    )
                    .await
            }
        };
        let status = result.map_err(|err| self.rejection(&err))?;
        let body = serde_json::to_vec(&status).map_err(|_| {
            definitions::Error::new(
                AmqpError::InternalError,
                "the answer did not encode".to_owned(),
                None,
            )
        })?;
        let mut application = ApplicationProperties::builder();
        if let Some(wait) = self.provisioning.retry_after_for(&status) {
            // C and Node read `retry-after`, C# `Retry-After`.
            let wait = wait.to_string();
            application = application
                .insert("retry-after", SimpleValue::String(wait.clone()))
                .insert("Retry-After", SimpleValue::String(wait));
        }
        let mut properties = Properties::builder();
        if let Some(correlation) = correlation {
            properties = properties.correlation_id(correlation);
        }
        Ok(Message::builder()
            .properties(properties.build())
            .application_properties(application.build())
            .data(Binary::from(body))
            .build())
    }

    /// The rejection of a refused request: the DPS error body as the description (C# parses it
    /// and decides from its code whether to retry), and a condition Node understands: it retries
    /// only on `amqp:internal-error` and `com.microsoft:device-container-throttled`, waiting the
    /// `retry-after` of the error's info (the error's own wait, else the assigning one).
    fn rejection(&self, err: &ProvisioningError) -> definitions::Error {
        let status = err.http_status();
        let condition: ErrorCondition = match status {
            401 | 403 => AmqpError::UnauthorizedAccess.into(),
            404 => AmqpError::NotFound.into(),
            429 => ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled")),
            500.. => AmqpError::InternalError.into(),
            _ => AmqpError::InvalidField.into(),
        };
        let body = ProvisioningServiceErrorDetails::report(err, self.provisioning.now());
        let description = serde_json::to_string(&body).unwrap_or_default();
        let info = (status == 429 || status >= 500).then(|| {
            let seconds = err
                .retry_after_secs()
                .unwrap_or_else(|| self.provisioning.retry_after_secs());
            let wait = Value::String(seconds.to_string());
            let mut info = Fields::new();
            info.insert(Symbol::from("retry-after"), wait.clone());
            info.insert(Symbol::from("Retry-After"), wait);
            info
        });
        definitions::Error::new(condition, description, info)
    }
}

/// A DPS request, as decoded from its AMQP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `iotdps-register`, with the DeviceRegistration JSON (empty when the body had none).
    Register {
        /// The bytes of the message's data sections.
        body: Vec<u8>,
    },
    /// `iotdps-get-operationstatus` of `iotdps-operation-id`.
    OperationStatus {
        /// The operation.
        operation_id: String,
    },
}

/// Decodes a request message: its correlation id (C# and Node send one, and Node matches the
/// answer by it; the C SDK sends none and takes the next answer), and what it asks. A message
/// that is not a DPS request is the error to reject it with.
pub fn decode(
    message: &Message<Body<Value>>,
) -> Result<(Option<MessageId>, Request), definitions::Error> {
    let correlation = message
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.clone().or_else(|| p.message_id.clone()));
    let request = match application_property(message, "iotdps-operation-type").as_deref() {
        Some("iotdps-register") => Request::Register {
            body: body_bytes(&message.body),
        },
        Some("iotdps-get-operationstatus") => Request::OperationStatus {
            operation_id: application_property(message, "iotdps-operation-id")
                .ok_or_else(|| invalid("an operation status request needs iotdps-operation-id"))?,
        },
        Some(other) => {
            return Err(invalid(&format!(
                "iotdps-operation-type '{other}' is not served; send iotdps-register or iotdps-get-operationstatus"
            )));
        }
        None => {
            return Err(invalid(
                "a request needs the application property iotdps-operation-type",
            ));
        }
    };
    Ok((correlation, request))
}

fn invalid(why: &str) -> definitions::Error {
    definitions::Error::new(AmqpError::InvalidField, why.to_owned(), None::<Fields>)
}

fn application_property(message: &Message<Body<Value>>, name: &str) -> Option<String> {
    let value = message.application_properties.as_ref()?.0.get(name)?;
    match value {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The request body: the bytes of its data sections (the DeviceRegistration JSON); an AMQP value
/// (C# sends the operation name as one on status queries) or nothing reads as empty.
fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        _ => Vec::new(),
    }
}

/// Requests on the link the device sends on, one at a time, each answered or rejected.
pub(crate) async fn requests(
    mut link: Receiver,
    device: Arc<Device>,
    scope: String,
    rid: String,
    responders: Arc<Responders>,
) {
    loop {
        let delivery: Delivery<Body<Value>> = match link.recv().await {
            Ok(delivery) => delivery,
            Err(fe2o3_amqp::link::RecvError::MessageSizeExceeded(too_big)) => {
                // fe2o3-amqp has detached the link with amqp:link:message-size-exceeded.
                tracing::warn!(
                    registration_id = %rid,
                    size = too_big.size,
                    max = too_big.max_size,
                    "refused an AMQP request larger than the link allows; the link is detached with amqp:link:message-size-exceeded"
                );
                break;
            }
            Err(err) => {
                tracing::debug!(registration_id = %rid, %err, "an AMQP request link ended");
                break;
            }
        };
        match device.answer(&scope, &rid, delivery.message()).await {
            Ok(answer) => {
                if let Err(err) = link.accept(&delivery).await {
                    tracing::debug!(registration_id = %rid, %err, "could not accept a request");
                    break;
                }
                match responders.get(&rid).await {
                    Some(responder) => {
                        let _ = responder.send(answer).await;
                    }
                    None => tracing::warn!(
                        registration_id = %rid,
                        "an AMQP device sent a request without a receiving link to answer on"
                    ),
                }
            }
            Err(error) => {
                if let Err(err) = link.reject(&delivery, error).await {
                    tracing::debug!(registration_id = %rid, %err, "could not reject a request");
                    break;
                }
            }
        }
    }
}

/// Answers out on the link the device receives on.
pub(crate) async fn responses(mut link: Sender, rid: String, responders: Arc<Responders>) {
    let (tx, mut rx) = mpsc::channel::<Message<Data>>(16);
    responders.attach(&rid, tx);
    while let Some(answer) = rx.recv().await {
        if let Err(err) = link.send(answer).await {
            tracing::debug!(registration_id = %rid, %err, "an AMQP answer was not delivered");
            break;
        }
    }
    let _ = link.close().await;
}

/// The answering links of a session, by registration id.
#[derive(Default)]
pub(crate) struct Responders {
    links: Mutex<HashMap<String, mpsc::Sender<Message<Data>>>>,
    attached: Notify,
}

impl Responders {
    fn attach(&self, rid: &str, link: mpsc::Sender<Message<Data>>) {
        if let Ok(mut links) = self.links.lock() {
            links.insert(rid.to_ascii_lowercase(), link);
        }
        self.attached.notify_waiters();
    }

    /// Lets every answering link end once it has sent what it holds (the session is over).
    pub(crate) fn close_all(&self) {
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
    }

    /// The answering link of `rid`, waiting a little for a device that attaches it after sending.
    async fn get(&self, rid: &str) -> Option<mpsc::Sender<Message<Data>>> {
        let key = rid.to_ascii_lowercase();
        let deadline = tokio::time::Instant::now() + RESPONDER_WAIT;
        loop {
            let attached = self.attached.notified();
            let found = self
                .links
                .lock()
                .ok()
                .and_then(|links| links.get(&key).cloned());
            if found.is_some() {
                return found;
            }
            if tokio::time::timeout_at(deadline, attached).await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("0ne00111111/registrations/dev-1"),
            Some(("0ne00111111".into(), "dev-1".into()))
        );
        assert_eq!(
            parse_address("amqps://dps.example/0ne00111111/registrations/dev-1"),
            Some(("0ne00111111".into(), "dev-1".into()))
        );
        assert_eq!(
            parse_address("/0ne00111111/Registrations/dev-1"),
            Some(("0ne00111111".into(), "dev-1".into()))
        );
        assert_eq!(parse_address("0ne00111111/registrations/"), None);
        assert_eq!(parse_address("$cbs"), None);
        assert_eq!(parse_address("amqps://host"), None);
    }

    #[test]
    fn symbols_name_the_operation() {
        let message = Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert(
                        "iotdps-operation-type",
                        SimpleValue::Symbol(Symbol::from("iotdps-register")),
                    )
                    .build(),
            )
            .value(Value::Null)
            .build();
        let message = Message {
            body: Body::Value(fe2o3_amqp::types::messaging::AmqpValue(Value::Null)),
            header: message.header,
            delivery_annotations: message.delivery_annotations,
            message_annotations: message.message_annotations,
            properties: message.properties,
            application_properties: message.application_properties,
            footer: message.footer,
        };
        assert_eq!(
            application_property(&message, "iotdps-operation-type").as_deref(),
            Some("iotdps-register")
        );
        assert!(body_bytes(&message.body).is_empty());
    }
}
