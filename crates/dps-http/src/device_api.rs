//! The DPS device API over HTTPS: register, poll the operation, look up the registration.
//! Registration ids come from the path (the body's is only checked); bodies may be empty, `{}` or
//! carry `"payload": null`; any api-version is accepted.

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dps_core::ProvisioningError;
use dps_core::device::{DeviceRegistration, RegistrationOperationStatus};
use dps_core::provisioning::{Credentials, Transport};

use crate::AppState;
use crate::error::JSON_CONTENT_TYPE;

/// A device API request, decoded from method and path segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `PUT /{idScope}/registrations/{registrationId}/register`.
    Register {
        /// The ID scope, percent-decoded.
        scope: String,
        /// The registration id, percent-decoded.
        registration_id: String,
    },
    /// `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
    Operation {
        /// The ID scope, percent-decoded.
        scope: String,
        /// The registration id, percent-decoded.
        registration_id: String,
        /// The operation id, percent-decoded.
        operation_id: String,
    },
    /// `POST /{idScope}/registrations/{registrationId}`.
    Status {
        /// The ID scope, percent-decoded.
        scope: String,
        /// The registration id, percent-decoded.
        registration_id: String,
    },
}

impl DeviceRequest {
    /// The device API's path decoder, also the fuzz entry point: `None` when method and URI path
    /// (still percent-encoded) are not a device request.
    pub fn from_path(method: &Method, path: &str) -> Option<Self> {
        Self::decode(method, &crate::service_api::segments(path))
    }

    /// Matches `/{scope}/registrations/{id}[/register | /operations/{op}]`. `segments` are percent-decoded.
    pub(crate) fn decode(method: &Method, segments: &[String]) -> Option<Self> {
        let word = |i: usize| segments.get(i).map(|s| s.to_ascii_lowercase());
        if word(1).as_deref() != Some("registrations")
            || crate::service_api::is_service_collection(&segments[0])
        {
            return None;
        }
        let (scope, registration_id) = (segments[0].clone(), segments.get(2)?.clone());
        match (segments.len(), method, word(3).as_deref()) {
            (4, &Method::PUT, Some("register")) => Some(Self::Register {
                scope,
                registration_id,
            }),
            (5, &Method::GET, Some("operations")) => Some(Self::Operation {
                scope,
                registration_id,
                operation_id: segments[4].clone(),
            }),
            (3, &Method::POST, None) => Some(Self::Status {
                scope,
                registration_id,
            }),
            _ => None,
        }
    }
}

/// Carries out a device request.
pub(crate) async fn handle(
    state: &AppState,
    request: DeviceRequest,
    headers: &HeaderMap,
    certificates: &[Vec<u8>],
    body: &[u8],
) -> Result<Response, ProvisioningError> {
    let sas = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let credentials = Credentials { sas, certificates };
    let provisioning = &state.provisioning;
    match request {
        DeviceRequest::Register {
            scope,
            registration_id,
        } => {
            let registration = DeviceRegistration::from_body(body)?;
            let status = provisioning
                .register(
                    Transport::Https,
                    &scope,
                    &registration_id,
                    registration,
                    credentials,
                )
                .await?;
            let retry = provisioning.retry_after_for(&status);
            let code = StatusCode::from_u16(RegistrationOperationStatus::REGISTER_RESPONSE_STATUS)
                .unwrap_or(StatusCode::ACCEPTED);
            Ok(json(code, &status, retry))
        }
        DeviceRequest::Operation {
            scope,
            registration_id,
            operation_id,
        } => {
            let status = provisioning
                .operation_status(
                    Transport::Https,
                    &scope,
                    &registration_id,
                    &operation_id,
                    credentials,
                )
                .await?;
            let retry = provisioning.retry_after_for(&status);
            Ok(json(
                StatusCode::from_u16(status.response_status()).unwrap_or(StatusCode::OK),
                &status,
                retry,
            ))
        }
        DeviceRequest::Status {
            scope,
            registration_id,
        } => {
            DeviceRegistration::from_body(body)?;
            let result = provisioning
                .registration_status(&scope, &registration_id, credentials)
                .await?;
            Ok(json(StatusCode::OK, &result, None))
        }
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T, retry_after: Option<u32>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    if let Some(seconds) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    let body = serde_json::to_string(value).unwrap_or_default();
    (status, headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(path: &str) -> Vec<String> {
        crate::service_api::segments(path)
    }

    #[test]
    fn device_paths() {
        assert!(matches!(
            DeviceRequest::decode(
                &Method::PUT,
                &segs("/0ne00000001/registrations/dev/register")
            ),
            Some(DeviceRequest::Register { .. })
        ));
        assert!(matches!(
            DeviceRequest::decode(&Method::GET, &segs("/0ne00000001/Registrations/dev/operations/4.abc.def")),
            Some(DeviceRequest::Operation { operation_id, .. }) if operation_id == "4.abc.def"
        ));
        assert!(matches!(
            DeviceRequest::decode(&Method::POST, &segs("/0ne00000001/registrations/dev")),
            Some(DeviceRequest::Status { .. })
        ));
        assert!(DeviceRequest::decode(&Method::POST, &segs("/registrations/grp/query")).is_none());
        assert!(DeviceRequest::decode(&Method::GET, &segs("/enrollments/x")).is_none());
        assert!(
            DeviceRequest::decode(
                &Method::DELETE,
                &segs("/0ne00000001/registrations/dev/register")
            )
            .is_none()
        );
    }
}
