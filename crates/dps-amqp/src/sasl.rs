//! SASL for DPS devices. A symmetric-key device logs in with PLAIN: the authentication id is
//! `{idScope}/registrations/{registrationId}` and the password its SAS token. An X.509 device
//! proves itself in the TLS handshake and uses EXTERNAL or ANONYMOUS (or no SASL layer at all).
//! Like the MQTT front end, the credentials are checked on each request by the core, so a wrong
//! key is answered with a 401 body the SDKs can read rather than a bare SASL failure.

use std::sync::{Arc, Mutex};

use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

/// What a device said in SASL PLAIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainLogin {
    /// `{idScope}/registrations/{registrationId}`.
    pub authcid: String,
    /// The SAS token.
    pub password: String,
}

/// A SASL acceptor for one connection (from `peer`); what the device sent is left in `login`.
#[derive(Debug, Clone)]
pub(crate) struct DeviceSasl {
    login: Arc<Mutex<Option<PlainLogin>>>,
    peer: std::net::SocketAddr,
}

impl DeviceSasl {
    pub(crate) fn new(login: Arc<Mutex<Option<PlainLogin>>>, peer: std::net::SocketAddr) -> Self {
        Self { login, peer }
    }
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

/// `[authzid] NUL authcid NUL password` (RFC 4616).
pub fn parse_plain(response: &[u8]) -> Option<PlainLogin> {
    let mut parts = response.split(|b| *b == 0);
    let (_authzid, authcid, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authcid.is_empty() || password.is_empty() {
        return None;
    }
    Some(PlainLogin {
        authcid: String::from_utf8(authcid.to_vec()).ok()?,
        password: String::from_utf8(password.to_vec()).ok()?,
    })
}

impl SaslAcceptor for DeviceSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("PLAIN"),
            Symbol::from("EXTERNAL"),
            Symbol::from("ANONYMOUS"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.as_str() {
            "PLAIN" => {
                let login = init
                    .initial_response
                    .as_ref()
                    .and_then(|r| parse_plain(r.as_slice()));
                match login {
                    Some(login) => {
                        if let Ok(mut slot) = self.login.lock() {
                            *slot = Some(login);
                        }
                        outcome(SaslCode::Ok)
                    }
                    None => {
                        tracing::warn!(
                            peer = %self.peer,
                            "refused a malformed SASL PLAIN response; it must be NUL, {{idScope}}/registrations/{{registrationId}}, NUL, the SAS token"
                        );
                        outcome(SaslCode::Auth)
                    }
                }
            }
            // The TLS client certificate, checked on each request, is the credential.
            "EXTERNAL" | "ANONYMOUS" => outcome(SaslCode::Ok),
            other => {
                tracing::warn!(
                    peer = %self.peer,
                    mechanism = other,
                    "refused a SASL mechanism not offered; devices use PLAIN with their SAS token, or EXTERNAL with a TLS client certificate"
                );
                outcome(SaslCode::Auth)
            }
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // No mechanism offered here sends a challenge, so a response is out of turn.
        tracing::warn!(peer = %self.peer, "refused a SASL response sent without a challenge");
        outcome(SaslCode::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_responses() {
        assert_eq!(
            parse_plain(b"\x000ne00/registrations/dev-1\x00SharedAccessSignature sr=x"),
            Some(PlainLogin {
                authcid: "0ne00/registrations/dev-1".into(),
                password: "SharedAccessSignature sr=x".into(),
            })
        );
        assert!(parse_plain(b"authz\x00id\x00pw").is_some());
        assert_eq!(parse_plain(b"\x00id"), None);
        assert_eq!(parse_plain(b"\x00\x00pw"), None);
        assert_eq!(parse_plain(b"\x00id\x00"), None);
        assert_eq!(parse_plain(b"a\x00b\x00c\x00d"), None);
        assert_eq!(parse_plain(b"\x00\xff\x00pw"), None);
    }

    fn init(mechanism: &str, response: Option<&[u8]>) -> SaslInit {
        SaslInit {
            mechanism: Symbol::from(mechanism),
            initial_response: response
                .map(|r| fe2o3_amqp::types::primitives::Binary::from(r.to_vec())),
            hostname: None,
        }
    }

    fn code(frame: SaslServerFrame) -> SaslCode {
        match frame {
            SaslServerFrame::Outcome(outcome) => outcome.code,
            SaslServerFrame::Challenge(_) => panic!("no mechanism offered here challenges"),
        }
    }

    #[test]
    fn plain_is_kept_for_the_requests_and_other_mechanisms_are_refused() {
        let login: Arc<Mutex<Option<PlainLogin>>> = Arc::default();
        let peer: std::net::SocketAddr = ([127, 0, 0, 1], 5671).into();
        let mut sasl = DeviceSasl::new(Arc::clone(&login), peer);
        assert_eq!(
            code(sasl.on_init(init("PLAIN", Some(b"\x00scope/registrations/d\x00token")))),
            SaslCode::Ok
        );
        assert_eq!(
            login
                .lock()
                .expect("lock")
                .as_ref()
                .map(|l| l.authcid.as_str()),
            Some("scope/registrations/d")
        );
        let mut fresh = DeviceSasl::new(Arc::default(), peer);
        assert_eq!(
            code(fresh.on_init(init("PLAIN", Some(b"no separators")))),
            SaslCode::Auth
        );
        assert_eq!(code(fresh.on_init(init("PLAIN", None))), SaslCode::Auth);
        assert_eq!(
            code(fresh.on_init(init("SCRAM-SHA-1", Some(b"n,,n=user")))),
            SaslCode::Auth
        );
        assert_eq!(
            code(fresh.on_init(init("TPM", Some(b"\x00scope\x00d\x00ek")))),
            SaslCode::Auth
        );
        assert_eq!(code(fresh.on_init(init("EXTERNAL", None))), SaslCode::Ok);
        assert_eq!(code(fresh.on_init(init("ANONYMOUS", None))), SaslCode::Ok);
        assert_eq!(
            code(fresh.on_response(SaslResponse {
                response: fe2o3_amqp::types::primitives::Binary::from(vec![1]),
            })),
            SaslCode::Auth
        );
        assert!(fresh.login.lock().expect("lock").is_none());
    }
}
