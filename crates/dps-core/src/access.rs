//! Shared access policies of the service API and the check of a service SAS against them.
//!
//! The token's `sr` must name the host the request was sent to (as the client wrote it, port
//! included), `skn` must name a policy, the signature must come from one of its keys, and the policy
//! must grant the right the operation needs.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::error::ProvisioningError;
use crate::ids::IdScope;
use crate::sas::{self, SasToken};
use crate::secret::Secret;

/// A right a shared access policy can grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Right {
    /// Manage the service itself (linked hubs).
    ServiceConfig,
    /// Read enrollments and groups, including their attestation.
    EnrollmentRead,
    /// Create, replace and delete enrollments and groups.
    EnrollmentWrite,
    /// Read registration states.
    RegistrationStatusRead,
    /// Delete registration states.
    RegistrationStatusWrite,
}

impl Right {
    /// Every right.
    pub const ALL: [Right; 5] = [
        Right::ServiceConfig,
        Right::EnrollmentRead,
        Right::EnrollmentWrite,
        Right::RegistrationStatusRead,
        Right::RegistrationStatusWrite,
    ];

    /// The right's name as Azure spells it.
    pub fn name(self) -> &'static str {
        match self {
            Right::ServiceConfig => "ServiceConfig",
            Right::EnrollmentRead => "EnrollmentRead",
            Right::EnrollmentWrite => "EnrollmentWrite",
            Right::RegistrationStatusRead => "RegistrationStatusRead",
            Right::RegistrationStatusWrite => "RegistrationStatusWrite",
        }
    }
}

/// A named policy with two keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessPolicy {
    /// Policy name, sent as `skn`.
    pub name: String,
    /// What it may do.
    pub rights: Vec<Right>,
    /// Primary key, base64.
    pub primary_key: Secret,
    /// Secondary key, base64.
    pub secondary_key: Secret,
}

/// The all-rights policy, as Azure names it.
pub const OWNER_POLICY: &str = "provisioningserviceowner";
/// A read-only policy.
pub const READER_POLICY: &str = "enrollmentread";
/// A policy that may only read and delete registration states.
pub const REGISTRATION_POLICY: &str = "registrationstatuswrite";

impl AccessPolicy {
    /// A policy with freshly generated keys.
    pub fn generate(name: &str, rights: &[Right]) -> Self {
        Self {
            name: name.to_owned(),
            rights: rights.to_vec(),
            primary_key: Secret::new(sas::generate_key()),
            secondary_key: Secret::new(sas::generate_key()),
        }
    }

    /// The policies created at first start: owner, read-only and registration-only.
    pub fn defaults() -> Vec<Self> {
        vec![
            Self::generate(OWNER_POLICY, &Right::ALL),
            Self::generate(
                READER_POLICY,
                &[Right::EnrollmentRead, Right::RegistrationStatusRead],
            ),
            Self::generate(
                REGISTRATION_POLICY,
                &[
                    Right::RegistrationStatusRead,
                    Right::RegistrationStatusWrite,
                ],
            ),
        ]
    }

    /// The connection string a client uses with this policy against `host`.
    pub fn connection_string(&self, host: &str) -> String {
        format!(
            "HostName={host};SharedAccessKeyName={};SharedAccessKey={}",
            self.name,
            self.primary_key.expose()
        )
    }
}

/// What is created once per service and shared by every node: the ID scope and the policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIdentity {
    /// The ID scope devices use.
    pub id_scope: IdScope,
    /// The service API's policies.
    pub policies: Vec<AccessPolicy>,
}

impl ServiceIdentity {
    /// A new identity: a random scope and the default policies.
    pub fn generate() -> Self {
        Self {
            id_scope: IdScope::generate(),
            policies: AccessPolicy::defaults(),
        }
    }

    /// The policy called `name` (case-insensitive).
    pub fn policy(&self, name: &str) -> Option<&AccessPolicy> {
        self.policies
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }
}

/// A caller whose service token was verified: the policy it was signed with. Only
/// [`Authorizer::authenticate`] makes one, so a request cannot reach a use case unauthenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    policy: String,
    rights: Vec<Right>,
}

impl Caller {
    /// The policy the caller's token was signed with.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// Allows the request if the caller's policy grants `right`; 403 otherwise.
    pub fn require(&self, right: Right) -> Result<(), ProvisioningError> {
        if self.rights.contains(&right) {
            Ok(())
        } else {
            Err(ProvisioningError::Forbidden {
                policy: self.policy.clone(),
                right: right.name(),
            })
        }
    }
}

/// Checks service SAS tokens against the service's policies.
pub struct Authorizer {
    identity: ServiceIdentity,
    clock: Arc<dyn Clock>,
    skew_secs: i64,
}

impl Authorizer {
    /// An authorizer over `identity`'s policies, tolerating `skew_secs` of clock difference on expiry.
    pub fn new(identity: ServiceIdentity, clock: Arc<dyn Clock>, skew_secs: i64) -> Self {
        Self {
            identity,
            clock,
            skew_secs,
        }
    }

    /// Checks `authorization` (the header value) for a request sent to `host` (the `Host` header,
    /// port included) that needs `right`.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        host: &str,
        right: Right,
    ) -> Result<(), ProvisioningError> {
        self.authenticate(authorization, host)?.require(right)
    }

    /// Checks `authorization` for a request sent to `host`: the token's form, resource, expiry,
    /// policy and signature, everything but the right the request needs. Needs nothing from the
    /// request itself, so front ends call it before they read a body: an unsigned caller learns
    /// nothing about what the request should look like.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        host: &str,
    ) -> Result<Caller, ProvisioningError> {
        let unauthorized = |why: String| ProvisioningError::Unauthorized(why);
        let text = authorization.ok_or_else(|| {
            unauthorized("no Authorization header; send a SharedAccessSignature made from the service connection string".into())
        })?;
        let token = SasToken::parse(text).map_err(|e| unauthorized(e.to_string()))?;
        if !audience_matches(&token.audience(), host) {
            return Err(unauthorized(format!(
                "the token's resource '{}' is not this service ('{host}')",
                token.audience()
            )));
        }
        token
            .check_expiry(self.clock.now().as_second(), self.skew_secs)
            .map_err(|e| unauthorized(e.to_string()))?;
        let name = token.key_name.as_deref().ok_or_else(|| {
            unauthorized("the token has no 'skn' (shared access policy name)".into())
        })?;
        let policy = self.identity.policy(name).ok_or_else(|| {
            unauthorized(format!("there is no shared access policy named '{name}'"))
        })?;
        let keys: Vec<Vec<u8>> = [&policy.primary_key, &policy.secondary_key]
            .iter()
            .filter_map(|k| B64.decode(k.expose()).ok())
            .collect();
        token
            .verify_signature(keys.iter().map(Vec::as_slice))
            .map_err(|e| unauthorized(e.to_string()))?;
        Ok(Caller {
            policy: policy.name.clone(),
            rights: policy.rights.clone(),
        })
    }

    /// The service identity the authorizer checks against.
    pub fn identity(&self) -> &ServiceIdentity {
        &self.identity
    }
}

/// `sr` names the host (optionally followed by a path prefix); compared case-insensitively.
fn audience_matches(audience: &str, host: &str) -> bool {
    let audience = audience.trim_end_matches('/').to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let bare = |s: &str| {
        s.strip_prefix("https://")
            .map(str::to_owned)
            .unwrap_or_else(|| s.to_owned())
    };
    let audience = bare(&audience);
    !host.is_empty() && (audience == host || audience.starts_with(&format!("{host}/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const NOW: i64 = 1_800_000_000;

    fn authorizer() -> Authorizer {
        let clock = Arc::new(ManualClock::new(
            jiff::Timestamp::from_second(NOW).expect("ts"),
        ));
        Authorizer::new(ServiceIdentity::generate(), clock, 300)
    }

    fn token(a: &Authorizer, policy: &str, resource: &str, expiry: i64) -> String {
        let key = a
            .identity()
            .policy(policy)
            .expect("policy")
            .secondary_key
            .expose()
            .to_owned();
        sas::generate_token(resource, &key, Some(policy), expiry).expect("token")
    }

    #[test]
    fn owner_may_do_everything() {
        let a = authorizer();
        let t = token(&a, OWNER_POLICY, "localhost:8443", NOW + 60);
        for right in Right::ALL {
            assert!(
                a.authorize(Some(&t), "localhost:8443", right).is_ok(),
                "{right:?}"
            );
        }
    }

    #[test]
    fn refusals() {
        let a = authorizer();
        let host = "localhost:8443";
        let unauthorized =
            |r: Result<(), ProvisioningError>| matches!(r, Err(ProvisioningError::Unauthorized(_)));
        assert!(unauthorized(a.authorize(None, host, Right::EnrollmentRead)));
        assert!(unauthorized(a.authorize(
            Some("Bearer x"),
            host,
            Right::EnrollmentRead
        )));
        let other_host = token(&a, OWNER_POLICY, "other.example", NOW + 60);
        assert!(unauthorized(a.authorize(
            Some(&other_host),
            host,
            Right::EnrollmentRead
        )));
        let expired = token(&a, OWNER_POLICY, host, NOW - 3600);
        assert!(unauthorized(a.authorize(
            Some(&expired),
            host,
            Right::EnrollmentRead
        )));
        let wrong_key =
            sas::generate_token(host, &sas::generate_key(), Some(OWNER_POLICY), NOW + 60)
                .expect("t");
        assert!(unauthorized(a.authorize(
            Some(&wrong_key),
            host,
            Right::EnrollmentRead
        )));
        let no_skn = sas::generate_token(host, &sas::generate_key(), None, NOW + 60).expect("t");
        assert!(unauthorized(a.authorize(
            Some(&no_skn),
            host,
            Right::EnrollmentRead
        )));
        let reader = token(&a, READER_POLICY, host, NOW + 60);
        assert!(
            a.authorize(Some(&reader), host, Right::EnrollmentRead)
                .is_ok()
        );
        assert!(matches!(
            a.authorize(Some(&reader), host, Right::EnrollmentWrite),
            Err(ProvisioningError::Forbidden {
                right: "EnrollmentWrite",
                ..
            })
        ));
    }

    #[test]
    fn audience_forms() {
        assert!(audience_matches("localhost:8443", "LOCALHOST:8443"));
        assert!(audience_matches("localhost:8443/", "localhost:8443"));
        assert!(audience_matches(
            "localhost:8443/enrollments",
            "localhost:8443"
        ));
        assert!(audience_matches("https://localhost:8443", "localhost:8443"));
        assert!(!audience_matches("localhost", "localhost:8443"));
        assert!(!audience_matches("localhost:84431", "localhost:8443"));
        assert!(!audience_matches("localhost", ""));
    }
}
