//! The one error type of minihub and its rendering in IoT Hub's shape: a JSON body
//! `{"Message": "ErrorCode:<code>;<message>", "ExceptionMessage": "Tracking ID:…"}`, the status, and
//! an `iothub-errorcode` header.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The content type of every JSON response.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// Why a minihub call failed. Each variant says what an HTTP client receives.
#[derive(Debug, thiserror::Error)]
pub enum MinihubError {
    /// No virtual hub serves this host name. `404`, `IotHubNotFound`.
    #[error("no IoT hub named '{0}' is served here")]
    UnknownHub(String),
    /// The path or method is not part of the API served here. `404`, `EndpointNotFound`.
    #[error("{0}")]
    EndpointNotFound(String),
    /// Missing, malformed, expired or wrongly signed SAS token, or a policy without the needed
    /// rights. `401`, `IotHubUnauthorizedAccess`.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The device exists but is disabled, so it may not connect. `403`, `DeviceDisabled`.
    #[error("device '{0}' is disabled")]
    DeviceDisabled(String),
    /// No such device. `404`, `DeviceNotFound`.
    #[error("device '{0}' not found")]
    DeviceNotFound(String),
    /// A create found the device already registered. `409`, `DeviceAlreadyExists`.
    #[error("a device with id '{0}' is already registered")]
    DeviceAlreadyExists(String),
    /// `If-Match` named another version. `412`, `PreconditionFailed`.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The request is malformed or asks for something unsupported. `400`, `ArgumentInvalid`.
    #[error("{0}")]
    ArgumentInvalid(String),
    /// The request body is larger than allowed. `413`, `MessageTooLarge`.
    #[error("the request body exceeds {0} bytes")]
    MessageTooLarge(usize),
    /// The database failed. `500`, `ServerError`; the cause is logged, never sent.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The database is out of reach for now; nothing was changed. `503`, `ServiceUnavailable`; the
    /// cause is logged, never sent.
    #[error("the hub's database is out of reach: {0}")]
    Unavailable(String),
}

impl MinihubError {
    /// The IoT Hub error code, also sent in the `iothub-errorcode` header.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::UnknownHub(_) => "IotHubNotFound",
            Self::EndpointNotFound(_) => "EndpointNotFound",
            Self::Unauthorized(_) => "IotHubUnauthorizedAccess",
            Self::DeviceDisabled(_) => "DeviceDisabled",
            Self::DeviceNotFound(_) => "DeviceNotFound",
            Self::DeviceAlreadyExists(_) => "DeviceAlreadyExists",
            Self::PreconditionFailed(_) => "PreconditionFailed",
            Self::ArgumentInvalid(_) => "ArgumentInvalid",
            Self::MessageTooLarge(_) => "MessageTooLarge",
            Self::Storage(_) => "ServerError",
            Self::Unavailable(_) => "ServiceUnavailable",
        }
    }

    /// The HTTP status.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::UnknownHub(_) | Self::EndpointNotFound(_) | Self::DeviceNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::DeviceDisabled(_) => StatusCode::FORBIDDEN,
            Self::DeviceAlreadyExists(_) => StatusCode::CONFLICT,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::ArgumentInvalid(_) => StatusCode::BAD_REQUEST,
            Self::MessageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The message shown to the client: internal causes stay in the log.
    fn client_message(&self) -> String {
        match self {
            Self::Storage(_) => "internal server error".to_owned(),
            Self::Unavailable(_) => "the service is unavailable for now; retry later".to_owned(),
            other => other.to_string(),
        }
    }
}

impl From<rusqlite::Error> for MinihubError {
    fn from(err: rusqlite::Error) -> Self {
        Self::Storage(err.to_string())
    }
}

impl From<serde_json::Error> for MinihubError {
    fn from(err: serde_json::Error) -> Self {
        Self::Storage(format!("a stored document does not parse: {err}"))
    }
}

impl MinihubError {
    /// The response IoT Hub would send, stamped with `now` (the hub's clock); the cause is logged
    /// under the tracking id it carries.
    pub fn into_response_at(self, now: jiff::Timestamp) -> Response {
        let tracking_id = uuid::Uuid::new_v4().simple().to_string();
        let code = self.error_code();
        match &self {
            Self::Storage(cause) => tracing::error!(tracking_id, code, cause, "hub request failed"),
            Self::Unavailable(cause) => {
                tracing::warn!(
                    tracking_id,
                    code,
                    cause,
                    "hub request failed: database out of reach"
                );
            }
            other => tracing::debug!(tracking_id, code, message = %other, "hub request refused"),
        }
        let now = dps_core::time::format_utc(now);
        let body = serde_json::json!({
            "Message": format!("ErrorCode:{code};{}", self.client_message()),
            "ExceptionMessage": format!("Tracking ID:{tracking_id}-G:0-TimeStamp:{now}"),
        });
        let mut response = (
            self.http_status(),
            [(header::CONTENT_TYPE, JSON_CONTENT_TYPE)],
            body.to_string(),
        )
            .into_response();
        response
            .headers_mut()
            .insert("iothub-errorcode", HeaderValue::from_static(code));
        response
    }
}

impl From<sqlite_commit::CommitError> for MinihubError {
    fn from(err: sqlite_commit::CommitError) -> Self {
        let mut text = err.to_string();
        let mut next = std::error::Error::source(&err);
        while let Some(cause) = next {
            text.push_str(&format!(": {cause}"));
            next = cause.source();
        }
        Self::Storage(text)
    }
}

impl From<sqlite_commit::OpenError> for MinihubError {
    fn from(err: sqlite_commit::OpenError) -> Self {
        match err {
            sqlite_commit::OpenError::Sql(e) => e.into(),
            sqlite_commit::OpenError::TooNew { found, known } => Self::Storage(format!(
                "the minihub database has schema version {found}, newer than this build knows ({known})"
            )),
            sqlite_commit::OpenError::NotMigrated { found, known } => Self::Storage(format!(
                "the minihub database has schema version {found}, this build reads {known}; start `opendps serve` on it"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_causes_are_not_sent() {
        let err = MinihubError::Storage("disk I/O error at /secret/path".into());
        assert_eq!(err.client_message(), "internal server error");
        assert_eq!(err.http_status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn codes_and_statuses_pair_up() {
        let err = MinihubError::DeviceNotFound("d1".into());
        assert_eq!(err.error_code(), "DeviceNotFound");
        assert_eq!(err.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(err.client_message(), "device 'd1' not found");
        let response = err.into_response_at(jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(
            response
                .headers()
                .get("iothub-errorcode")
                .and_then(|v| v.to_str().ok()),
            Some("DeviceNotFound")
        );
    }
}
