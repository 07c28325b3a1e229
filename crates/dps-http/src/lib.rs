//! opendps HTTPS front end: the device API, the service (management) API, `/healthz` and
//! `/openapi.json`.
//!
//! The caller binds the listener and builds the TLS acceptor; [`serve`] accepts connections until
//! the shutdown signal, then lets open requests finish. Handlers decode, make one core call, encode.

mod device_api;
mod error;
mod server;
mod service_api;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use dps_core::clock::Clock;
use dps_core::management::Management;
use dps_core::provisioning::Provisioning;

pub use device_api::DeviceRequest;
pub use error::ApiError;
pub use server::{DEFAULT_IDLE_TIMEOUT, HttpLimits, serve};
pub use service_api::decode_service_request;
pub use tls_accept::DEFAULT_MAX_CONNECTIONS;

/// The OpenAPI document of the service API.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The certificates a client presented in its TLS handshake, leaf first (DER), carried with each
/// of its requests.
#[derive(Debug, Clone, Default)]
pub struct ClientCertificates(pub std::sync::Arc<[Vec<u8>]>);

/// The address a request's connection came from, carried with each of its requests.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Shared state of the HTTPS front end.
pub struct AppState {
    /// The service API use cases.
    pub management: Arc<Management>,
    /// Device registration.
    pub provisioning: Arc<Provisioning>,
    /// Time, for error timestamps.
    pub clock: Arc<dyn Clock>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
}

/// The router of the whole HTTPS API.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .fallback(service_api::dispatch)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// `GET /healthz`: the process is up and serving.
async fn healthz() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, error::JSON_CONTENT_TYPE)],
        r#"{"status":"ok"}"#,
    )
}

/// `GET /openapi.json`: the service API description.
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, error::JSON_CONTENT_TYPE)],
        OPENAPI_JSON,
    )
}
