//! The one error enum of the core, with its DPS error codes next to it.
//!
//! Every variant documents what the client receives. HTTP status = error code / 1000. Internal causes
//! are logged under the tracking id by the front end and never sent to clients.

use crate::store::StoreError;

/// What an internal failure came from (a store backend, a serializer, the OS), kept with its chain
/// for the log.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure inside the service: what was being done, and, when there is one, the error that
/// stopped it. Logged under a tracking id, never sent to clients. Two are equal when their chains
/// read the same.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{context}")]
pub struct Internal {
    context: String,
    #[source]
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl PartialEq for Internal {
    fn eq(&self, other: &Self) -> bool {
        self.chain() == other.chain()
    }
}

impl Eq for Internal {}

impl Internal {
    /// A failure described by `context` alone.
    pub fn new(context: impl Into<String>) -> Self {
        Self {
            context: context.into(),
            source: None,
        }
    }

    /// A failure while `context`, caused by `source`.
    pub fn caused(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self {
            context: context.into(),
            source: Some(std::sync::Arc::from(source.into())),
        }
    }

    /// The whole chain, outermost first: `context: cause: cause of the cause`.
    pub fn chain(&self) -> String {
        let mut text = self.context.clone();
        let mut next = self
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static));
        while let Some(err) = next {
            text.push_str(": ");
            text.push_str(&err.to_string());
            next = err.source();
        }
        text
    }
}

/// The wait suggested while the database is out of reach.
const UNAVAILABLE_RETRY_AFTER_SECS: u32 = 5;

/// A request that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    /// `400001`: the body is not valid JSON or does not have the expected shape.
    #[error("The request body is not valid: {0}")]
    InvalidBody(String),
    /// `400004`: an argument (id, key, certificate, attestation, count) is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// `401002`: no valid shared access signature for this service.
    #[error("Unauthorized: {0}")]
    Unauthorized(String),
    /// `403001`: the signature is valid but its policy lacks the right this operation needs.
    #[error("The shared access policy '{policy}' does not grant {right}.")]
    Forbidden {
        /// The policy named by `skn`.
        policy: String,
        /// The missing right.
        right: &'static str,
    },
    /// `404202`: the enrollment, group, registration or linked hub does not exist.
    #[error("{0}")]
    NotFound(String),
    /// `404000`: no API at this path and method.
    #[error("There is no API at {method} {path}.")]
    NoRoute {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// `409201`: the resource exists and the request did not say which version to replace.
    #[error("{0}")]
    Conflict(String),
    /// `412002`: the `If-Match` etag does not match the current version.
    #[error("{0}")]
    PreconditionFailed(String),
    /// `413001`: the request body is larger than the configured limit.
    #[error("The request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// `500001`: something failed inside the service; details are in its log under the tracking id.
    #[error("An internal error occurred. Quote the tracking id when reporting it.")]
    Internal(#[source] Internal),
    /// `503001`: the service cannot reach its database; nothing was changed, retry later.
    #[error("The service cannot reach its database right now; nothing was changed. Retry later.")]
    Unavailable(#[source] Internal),
}

impl ProvisioningError {
    /// The six-digit DPS error code.
    pub fn error_code(&self) -> u32 {
        match self {
            Self::InvalidBody(_) => 400_001,
            Self::InvalidArgument(_) => 400_004,
            Self::Unauthorized(_) => 401_002,
            Self::Forbidden { .. } => 403_001,
            Self::NoRoute { .. } => 404_000,
            Self::NotFound(_) => 404_202,
            Self::Conflict(_) => 409_201,
            Self::PreconditionFailed(_) => 412_002,
            Self::PayloadTooLarge { .. } => 413_001,
            Self::Internal(_) => 500_001,
            Self::Unavailable(_) => 503_001,
        }
    }

    /// The HTTP status: the error code divided by 1000.
    pub fn http_status(&self) -> u16 {
        u16::try_from(self.error_code() / 1000).unwrap_or(500)
    }

    /// Seconds a client should wait before trying again, when the answer says so: the database
    /// out of reach (`503001`) is expected back soon. Sent by every front end (HTTP
    /// `Retry-After`, the MQTT response topic's `retry-after`, the AMQP error's info).
    pub fn retry_after_secs(&self) -> Option<u32> {
        match self {
            Self::Unavailable(_) => Some(UNAVAILABLE_RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// The message safe to show a client; internal causes are replaced by a generic text.
    pub fn client_message(&self) -> String {
        self.to_string()
    }

    /// The internal cause to log, with its chain, if any.
    pub fn internal_cause(&self) -> Option<String> {
        match self {
            Self::Internal(cause) | Self::Unavailable(cause) => Some(cause.chain()),
            _ => None,
        }
    }

    /// An internal failure while `context`, caused by `source`.
    pub fn internal(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::Internal(Internal::caused(context, source))
    }
}

impl From<StoreError> for ProvisioningError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::AlreadyExists(what) => Self::Conflict(format!(
                "{what} already exists; send If-Match with its etag (or *) to replace it."
            )),
            StoreError::EtagMismatch(what) => Self::PreconditionFailed(format!(
                "The etag in If-Match does not match the current version of {what}."
            )),
            StoreError::NotFound(what) => Self::NotFound(format!("{what} does not exist.")),
            StoreError::Backend(cause) => Self::Internal(cause),
            StoreError::Unavailable(cause) => Self::Unavailable(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_code_over_thousand() {
        let all = [
            ProvisioningError::InvalidBody(String::new()),
            ProvisioningError::InvalidArgument(String::new()),
            ProvisioningError::Unauthorized(String::new()),
            ProvisioningError::Forbidden {
                policy: "p".into(),
                right: "EnrollmentWrite",
            },
            ProvisioningError::NotFound(String::new()),
            ProvisioningError::NoRoute {
                method: "GET".into(),
                path: "/".into(),
            },
            ProvisioningError::Conflict(String::new()),
            ProvisioningError::PreconditionFailed(String::new()),
            ProvisioningError::PayloadTooLarge { limit: 1 },
            ProvisioningError::Internal(Internal::new("disk on fire")),
            ProvisioningError::Unavailable(Internal::new("database down")),
        ];
        for err in all {
            assert_eq!(u32::from(err.http_status()), err.error_code() / 1000);
            assert!((100_000..1_000_000).contains(&err.error_code()));
        }
    }

    #[test]
    fn internal_cause_is_not_in_client_message() {
        let err = ProvisioningError::Internal(Internal::new("database is locked at /secret/path"));
        assert!(!err.client_message().contains("/secret/path"));
        assert_eq!(
            err.internal_cause().as_deref(),
            Some("database is locked at /secret/path")
        );
    }
}
