//! Request dispatch, and the service (management) API: `/enrollments`, `/enrollmentGroups`, `/registrations` and the
//! opendps `/linkedHubs` extension. Paths are matched case-insensitively and ids percent-decoded,
//! because the SDKs differ (`enrollmentGroups` versus `enrollmentgroups`).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dps_core::ProvisioningError;
use dps_core::ids::IfMatch;
use dps_core::management::{
    CertificateOp, EnrollmentRequest, LinkedHubOp, Paging, RegistrationRequest, ServiceRequest,
    ServiceResponse, parse_page_size,
};
use dps_core::model::{BulkEnrollmentGroupOperation, BulkEnrollmentOperation};
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::{ApiError, JSON_CONTENT_TYPE};

/// Every request that is not `/healthz` or `/openapi.json` lands here.
pub(crate) async fn dispatch(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match handle(&state, &parts, body).await {
        Ok(response) => response,
        Err(err) => ApiError::new(err, state.clock.now()).into_response(),
    }
}

/// The body, up to the configured limit.
async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ProvisioningError> {
    axum::body::to_bytes(body, state.max_body_bytes)
        .await
        .map_err(|_| ProvisioningError::PayloadTooLarge {
            limit: state.max_body_bytes,
        })
}

/// The path's segments, percent-decoded.
pub(crate) fn segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect()
}

/// Collections of the service API; a first path segment naming one is never an ID scope.
pub(crate) fn is_service_collection(segment: &str) -> bool {
    [
        "enrollments",
        "enrollmentgroups",
        "registrations",
        "linkedhubs",
        "certificates",
    ]
    .iter()
    .any(|c| segment.eq_ignore_ascii_case(c))
}

/// Device requests go to the device API; service requests are authenticated from their headers
/// before anything else of them (body, paging headers, even the route) is looked at, so an
/// unsigned caller gets 401 and learns nothing about the request's shape.
async fn handle(
    state: &AppState,
    parts: &Parts,
    body: Body,
) -> Result<Response, ProvisioningError> {
    let (method, path, headers) = (&parts.method, parts.uri.path(), &parts.headers);
    let segments = segments(path);
    if let Some(device) = crate::device_api::DeviceRequest::decode(method, &segments) {
        let body = read_body(state, body).await?;
        let certificates = parts
            .extensions
            .get::<crate::ClientCertificates>()
            .map_or(&[][..], |c| &c.0[..]);
        return crate::device_api::handle(state, device, headers, certificates, &body).await;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let caller = state.management.authenticate(authorization, host)?;
    let body = read_body(state, body).await?;
    let request = decode(method, path, &segments, headers, &body)?;
    state.management.handle(&caller, request).await.map(render)
}

/// The service API decoder, also the fuzz entry point: method, URI path (still percent-encoded),
/// headers and body to a typed request, or the error the client would get. Device API paths are
/// not its to decode (see [`crate::DeviceRequest::from_path`]).
pub fn decode_service_request(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ServiceRequest, ProvisioningError> {
    decode(method, path, &segments(path), headers, body)
}

/// Turns method, path, headers and body into a typed request.
fn decode(
    method: &Method,
    path: &str,
    segments: &[String],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ServiceRequest, ProvisioningError> {
    let lower: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
    let words: Vec<&str> = lower.iter().map(String::as_str).collect();
    let no_route = || ProvisioningError::NoRoute {
        method: method.to_string(),
        path: path.to_owned(),
    };
    let if_match =
        || IfMatch::from_header(headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()));
    let id = |i: usize| segments[i].clone();

    Ok(match (words.as_slice(), method) {
        (["enrollments"], &Method::POST) => {
            let bulk: BulkEnrollmentOperation = json(body)?;
            ServiceRequest::Enrollment(EnrollmentRequest::Bulk {
                mode: bulk.mode,
                items: bulk.enrollments,
            })
        }
        (["enrollmentgroups"], &Method::POST) => {
            let bulk: BulkEnrollmentGroupOperation = json(body)?;
            ServiceRequest::Group(EnrollmentRequest::Bulk {
                mode: bulk.mode,
                items: bulk.enrollment_groups,
            })
        }
        (["enrollments", "query"], &Method::POST) => {
            ServiceRequest::Enrollment(EnrollmentRequest::Query(paging(headers)?))
        }
        (["enrollmentgroups", "query"], &Method::POST) => {
            ServiceRequest::Group(EnrollmentRequest::Query(paging(headers)?))
        }
        (["enrollments", _], m) => {
            ServiceRequest::Enrollment(single(m, id(1), body, if_match()).ok_or_else(no_route)??)
        }
        (["enrollmentgroups", _], m) => {
            ServiceRequest::Group(single(m, id(1), body, if_match()).ok_or_else(no_route)??)
        }
        (["enrollments", _, "attestationmechanism"], &Method::POST) => {
            ServiceRequest::Enrollment(EnrollmentRequest::Attestation { id: id(1) })
        }
        (["enrollmentgroups", _, "attestationmechanism"], &Method::POST) => {
            ServiceRequest::Group(EnrollmentRequest::Attestation { id: id(1) })
        }
        (["registrations", _], &Method::GET) => {
            ServiceRequest::Registration(RegistrationRequest::Get { id: id(1) })
        }
        (["registrations", _, "trace"], &Method::GET) => {
            ServiceRequest::Registration(RegistrationRequest::Trace { id: id(1) })
        }
        (["registrations", _], &Method::DELETE) => {
            ServiceRequest::Registration(RegistrationRequest::Delete {
                id: id(1),
                if_match: if_match(),
            })
        }
        (["registrations", _, "query"], &Method::POST) => {
            ServiceRequest::Registration(RegistrationRequest::QueryGroup {
                group_id: id(1),
                paging: paging(headers)?,
            })
        }
        (["linkedhubs"], &Method::GET) => ServiceRequest::LinkedHub(LinkedHubOp::List),
        (["linkedhubs"], &Method::POST) => ServiceRequest::LinkedHub(LinkedHubOp::Put(json(body)?)),
        (["linkedhubs", _], &Method::DELETE) => {
            ServiceRequest::LinkedHub(LinkedHubOp::Delete { name: id(1) })
        }
        (["certificates"], &Method::GET) => ServiceRequest::Certificate(CertificateOp::List),
        (["certificates", _], &Method::GET) => {
            ServiceRequest::Certificate(CertificateOp::Get { name: id(1) })
        }
        (["certificates", _], &Method::PUT) => ServiceRequest::Certificate(CertificateOp::Put {
            name: id(1),
            body: json(body)?,
            if_match: if_match(),
        }),
        (["certificates", _], &Method::DELETE) => {
            ServiceRequest::Certificate(CertificateOp::Delete {
                name: id(1),
                if_match: if_match(),
            })
        }
        (["certificates", _, "generateverificationcode"], &Method::POST) => {
            ServiceRequest::Certificate(CertificateOp::GenerateVerificationCode {
                name: id(1),
                if_match: if_match(),
            })
        }
        (["certificates", _, "verify"], &Method::POST) => {
            ServiceRequest::Certificate(CertificateOp::Verify {
                name: id(1),
                body: json(body)?,
                if_match: if_match(),
            })
        }
        _ => return Err(no_route()),
    })
}

/// `PUT`, `GET` or `DELETE` of one enrollment or group; `None` for other methods.
fn single<T: DeserializeOwned>(
    method: &Method,
    id: String,
    body: &[u8],
    if_match: IfMatch,
) -> Option<Result<EnrollmentRequest<T>, ProvisioningError>> {
    match *method {
        Method::PUT => Some(json(body).map(|body| EnrollmentRequest::Put {
            id,
            body: Box::new(body),
            if_match,
        })),
        Method::GET => Some(Ok(EnrollmentRequest::Get { id })),
        Method::DELETE => Some(Ok(EnrollmentRequest::Delete { id, if_match })),
        _ => None,
    }
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProvisioningError> {
    dps_core::request_body::read(body)
}

fn paging(headers: &HeaderMap) -> Result<Paging, ProvisioningError> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let max_item_count = text("x-ms-max-item-count")
        .map(parse_page_size)
        .transpose()?;
    Ok(Paging {
        max_item_count,
        continuation: text("x-ms-continuation").map(str::to_owned),
    })
}

fn render(response: ServiceResponse) -> Response {
    match response {
        ServiceResponse::NoContent => StatusCode::NO_CONTENT.into_response(),
        ServiceResponse::Json(value) => json_response(&value, HeaderMap::new()),
        ServiceResponse::Page {
            items,
            item_type,
            continuation,
            max_item_count,
        } => {
            let mut headers = HeaderMap::new();
            headers.insert("x-ms-item-type", HeaderValue::from_static(item_type));
            headers.insert("x-ms-max-item-count", HeaderValue::from(max_item_count));
            if let Some(token) = continuation.and_then(|c| HeaderValue::from_str(&c).ok()) {
                headers.insert("x-ms-continuation", token);
            }
            json_response(&items, headers)
        }
    }
}

fn json_response(value: &serde_json::Value, mut headers: HeaderMap) -> Response {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    (StatusCode::OK, headers, value.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_ok(method: Method, path: &str, body: &str) -> ServiceRequest {
        decode(
            &method,
            path,
            &segments(path),
            &HeaderMap::new(),
            body.as_bytes(),
        )
        .expect("decodes")
    }

    #[test]
    fn paths_are_case_insensitive_and_decoded() {
        assert!(matches!(
            decode_ok(Method::POST, "/enrollmentgroups/g%3A1/attestationmechanism", ""),
            ServiceRequest::Group(EnrollmentRequest::Attestation { id }) if id == "g:1"
        ));
        assert!(matches!(
            decode_ok(Method::POST, "/EnrollmentGroups/query", ""),
            ServiceRequest::Group(EnrollmentRequest::Query(_))
        ));
        assert!(
            matches!(decode_ok(Method::GET, "/enrollments/Dev1/", ""), ServiceRequest::Enrollment(EnrollmentRequest::Get { id }) if id == "Dev1")
        );
        assert!(matches!(
            decode_ok(Method::POST, "/registrations/grp/query", ""),
            ServiceRequest::Registration(RegistrationRequest::QueryGroup { .. })
        ));
    }

    #[test]
    fn bad_requests() {
        let err = |m: Method, p: &str, b: &str| {
            decode(&m, p, &segments(p), &HeaderMap::new(), b.as_bytes()).expect_err("refused")
        };
        assert!(matches!(
            err(Method::PUT, "/enrollments/x", "{not json"),
            ProvisioningError::InvalidBody(_)
        ));
        assert!(matches!(
            err(Method::PUT, "/enrollments/x", ""),
            ProvisioningError::InvalidBody(_)
        ));
        assert!(matches!(
            err(Method::PATCH, "/enrollments/x", "{}"),
            ProvisioningError::NoRoute { .. }
        ));
        assert!(matches!(
            err(Method::GET, "/nothing/here", ""),
            ProvisioningError::NoRoute { .. }
        ));
        let mut headers = HeaderMap::new();
        headers.insert("x-ms-max-item-count", HeaderValue::from_static("lots"));
        assert!(matches!(
            paging(&headers),
            Err(ProvisioningError::InvalidArgument(_))
        ));
    }

    #[test]
    fn page_sizes_outside_1_to_1000_are_refused_alike() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-ms-max-item-count", HeaderValue::from_static(value));
            paging(&headers)
        };
        for value in ["0", "-1", "1001", "99999999999999999999999", "1.5", "ten"] {
            assert!(
                matches!(with(value), Err(ProvisioningError::InvalidArgument(ref m)) if m.contains("from 1 to 1000")),
                "{value}"
            );
        }
        for (value, size) in [("1", 1), ("1000", 1000), (" 7 ", 7)] {
            assert_eq!(with(value).expect(value).max_item_count, Some(size));
        }
        assert_eq!(
            paging(&HeaderMap::new()).expect("none").max_item_count,
            None
        );
    }

    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(crate::OPENAPI_JSON).expect("valid JSON");
        let paths = doc["paths"].as_object().expect("paths");
        for path in [
            "/enrollments",
            "/enrollments/query",
            "/enrollments/{id}",
            "/enrollments/{id}/attestationmechanism",
            "/enrollmentGroups",
            "/enrollmentGroups/query",
            "/enrollmentGroups/{id}",
            "/enrollmentGroups/{id}/attestationmechanism",
            "/registrations/{id}",
            "/registrations/{id}/query",
            "/linkedHubs",
            "/linkedHubs/{name}",
            "/healthz",
        ] {
            assert!(paths.contains_key(path), "openapi.json lacks {path}");
        }
    }
}
