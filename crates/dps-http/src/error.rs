//! Rendering of every error as a `ProvisioningServiceErrorDetails` body with the six-digit code, the
//! matching HTTP status, and a tracking id under which the cause is logged.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dps_core::ProvisioningError;
use dps_core::model::ProvisioningServiceErrorDetails;

/// The content type of every JSON response; Node's REST client only parses bodies that carry it.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    error: ProvisioningError,
    now: jiff::Timestamp,
}

impl ApiError {
    /// Wraps `error`, stamped at `now`.
    pub fn new(error: ProvisioningError, now: jiff::Timestamp) -> Self {
        Self { error, now }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.error.error_code();
        let body = ProvisioningServiceErrorDetails::report(&self.error, self.now);
        let status = StatusCode::from_u16(self.error.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let text =
            serde_json::to_string(&body).unwrap_or_else(|_| format!(r#"{{"errorCode":{code}}}"#));
        let mut response =
            (status, [(header::CONTENT_TYPE, JSON_CONTENT_TYPE)], text).into_response();
        if let Ok(value) = HeaderValue::from_str(&code.to_string()) {
            response.headers_mut().insert("x-ms-error-code", value);
        }
        if let Some(seconds) = self.error.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
