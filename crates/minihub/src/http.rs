//! The IoT Hub REST surface: one router for every virtual hub. A request goes to the hub named by
//! its `Host` (or HTTP/2 `:authority`), is decoded into an [`Endpoint`], authorized, and answered
//! by one [`Minihub`] call. Paths follow the IoT Hub service API (api-version `2021-04-12`, any
//! version accepted) and the device HTTPS telemetry API.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use percent_encoding::percent_decode_str;
use serde::Serialize;

use crate::Minihub;
use crate::error::{JSON_CONTENT_TYPE, MinihubError};
use crate::etag::{self, IfMatch};
use crate::model::{AccessRight, DeviceMessage, DeviceRequest};

/// Largest service API request body.
const MAX_SERVICE_BODY: usize = 1024 * 1024;
/// Largest device-to-cloud message, IoT Hub's limit.
const MAX_TELEMETRY_BODY: usize = 256 * 1024;
/// Prefix of headers carrying application properties of a telemetry message.
const APP_PROPERTY_PREFIX: &str = "iothub-app-";

/// The router serving every hub of `hub`.
pub fn router(hub: Arc<Minihub>) -> Router {
    Router::new().fallback(dispatch).with_state(hub)
}

/// An operation of the API, with its decoded path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    /// `GET /devices` (`Devices_GetDevices`).
    ListDevices,
    /// `GET /devices/{id}` (`Devices_GetIdentity`).
    GetDevice(String),
    /// `PUT /devices/{id}` (`Devices_CreateOrUpdateIdentity`).
    PutDevice(String),
    /// `DELETE /devices/{id}` (`Devices_DeleteIdentity`).
    DeleteDevice(String),
    /// `POST /devices/query` (`Query_GetTwins`).
    Query,
    /// `GET /twins/{id}` (`Devices_GetTwin`).
    GetTwin(String),
    /// `PATCH /twins/{id}` (`Devices_UpdateTwin`).
    PatchTwin(String),
    /// `PUT /twins/{id}` (`Devices_ReplaceTwin`).
    ReplaceTwin(String),
    /// `POST /devices/{id}/messages/events`: device-to-cloud telemetry.
    Telemetry(String),
    /// `GET /devices/{id}/messages/events`: the telemetry recorded last (an opendps extension).
    ReadTelemetry(String),
}

impl Endpoint {
    fn parse(method: &Method, path: &str) -> Result<Self, MinihubError> {
        let segments: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let id = |s: &str| s.to_owned();
        let endpoint = match (method, segments.as_slice()) {
            (&Method::GET, ["devices"]) => Some(Self::ListDevices),
            (&Method::POST, ["devices", "query"]) => Some(Self::Query),
            (&Method::GET, ["devices", d]) => Some(Self::GetDevice(id(d))),
            (&Method::PUT, ["devices", d]) => Some(Self::PutDevice(id(d))),
            (&Method::DELETE, ["devices", d]) => Some(Self::DeleteDevice(id(d))),
            (&Method::GET, ["twins", d]) => Some(Self::GetTwin(id(d))),
            (&Method::PATCH, ["twins", d]) => Some(Self::PatchTwin(id(d))),
            (&Method::PUT, ["twins", d]) => Some(Self::ReplaceTwin(id(d))),
            (&Method::POST, ["devices", d, "messages", "events"]) => Some(Self::Telemetry(id(d))),
            (&Method::GET, ["devices", d, "messages", "events"]) => {
                Some(Self::ReadTelemetry(id(d)))
            }
            _ => None,
        };
        endpoint.ok_or_else(|| {
            MinihubError::EndpointNotFound(format!("{method} {path} is not an API minihub serves"))
        })
    }

    /// The rights a service token needs for this operation (any one of them); `None` for the
    /// device-facing telemetry, which takes a device token.
    fn rights(&self) -> Option<&'static [AccessRight]> {
        use AccessRight::*;
        match self {
            // RegistryWrite includes reading the registry.
            Self::ListDevices | Self::GetDevice(_) | Self::ReadTelemetry(_) => {
                Some(&[RegistryRead, RegistryWrite])
            }
            Self::PutDevice(_) | Self::DeleteDevice(_) => Some(&[RegistryWrite]),
            Self::Query => Some(&[RegistryRead, ServiceConnect]),
            // Twins are the back end's: ServiceConnect, as IoT Hub requires.
            Self::GetTwin(_) | Self::PatchTwin(_) | Self::ReplaceTwin(_) => Some(&[ServiceConnect]),
            Self::Telemetry(_) => None,
        }
    }
}

async fn dispatch(State(hub): State<Arc<Minihub>>, request: Request) -> Response {
    match handle(&hub, request).await {
        Ok(response) => response,
        Err(err) => err.into_response_at(hub.now()),
    }
}

fn header_text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The host a request is for: HTTP/2 carries it in the URI, HTTP/1.1 in `Host`.
fn requested_host(request: &Request) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| header_text(request.headers(), header::HOST).map(str::to_owned))
}

fn query_param(request: &Request, name: &str) -> Option<String> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        key.eq_ignore_ascii_case(name)
            .then(|| percent_decode_str(value).decode_utf8_lossy().into_owned())
    })
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, MinihubError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| MinihubError::MessageTooLarge(limit))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, MinihubError> {
    serde_json::from_slice(body).map_err(|e| {
        MinihubError::ArgumentInvalid(format!("the body is not valid JSON for this call: {e}"))
    })
}

fn json_response(value: &impl Serialize, etag: Option<&str>) -> Result<Response, MinihubError> {
    let body = serde_json::to_string(value)
        .map_err(|e| MinihubError::Storage(format!("encoding a response: {e}")))?;
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, JSON_CONTENT_TYPE)],
        body,
    )
        .into_response();
    if let Some(value) = etag.and_then(|e| HeaderValue::from_str(&etag::quoted(e)).ok()) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}

/// Telemetry properties from `iothub-app-{name}` headers, and the other `iothub-{name}` headers as
/// system properties.
fn message_properties(headers: &HeaderMap) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (mut app, mut system) = (BTreeMap::new(), BTreeMap::new());
    for (name, value) in headers {
        let (name, Ok(value)) = (name.as_str(), value.to_str()) else {
            continue;
        };
        if let Some(app_name) = name.strip_prefix(APP_PROPERTY_PREFIX) {
            app.insert(app_name.to_owned(), value.to_owned());
        } else if let Some(system_name) = name.strip_prefix("iothub-") {
            system.insert(system_name.to_owned(), value.to_owned());
        }
    }
    (app, system)
}

async fn handle(hub: &Minihub, request: Request) -> Result<Response, MinihubError> {
    let host = requested_host(&request).unwrap_or_default();
    let hub_name = hub
        .hub_for_host(&host)
        .ok_or_else(|| MinihubError::UnknownHub(crate::host_without_port(&host)))?;
    let endpoint = Endpoint::parse(request.method(), request.uri().path())?;
    let authorization = header_text(request.headers(), header::AUTHORIZATION).map(str::to_owned);
    if let Some(rights) = endpoint.rights() {
        hub.authorize_service(&hub_name, authorization.as_deref(), rights)?;
    }
    let if_match = IfMatch::from_header(header_text(request.headers(), header::IF_MATCH));
    let top = query_param(&request, "top");
    let max_items = header_text(request.headers(), "x-ms-max-item-count").map(str::to_owned);
    let continuation = header_text(request.headers(), "x-ms-continuation").map(str::to_owned);
    let (message_props, system_props) = message_properties(request.headers());
    let body = request.into_body();
    let hub_name = hub_name.as_str();
    match endpoint {
        Endpoint::ListDevices => {
            let top = top
                .map(|t| {
                    t.trim().parse::<usize>().map_err(|_| {
                        MinihubError::ArgumentInvalid(format!("top '{t}' is not a number"))
                    })
                })
                .transpose()?;
            json_response(&hub.list_devices(hub_name, top).await?, None)
        }
        Endpoint::GetDevice(id) => {
            let device = hub
                .get_device(hub_name, &id)
                .await?
                .ok_or(MinihubError::DeviceNotFound(id))?;
            json_response(&device, Some(&device.etag))
        }
        Endpoint::PutDevice(id) => {
            let request: DeviceRequest = parse_json(&read_body(body, MAX_SERVICE_BODY).await?)?;
            let device = hub.put_device(hub_name, &id, request, if_match).await?;
            json_response(&device, Some(&device.etag))
        }
        Endpoint::DeleteDevice(id) => {
            hub.delete_device(hub_name, &id, if_match).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Endpoint::GetTwin(id) => {
            let twin = hub
                .get_twin(hub_name, &id)
                .await?
                .ok_or(MinihubError::DeviceNotFound(id))?;
            json_response(&twin, Some(&twin.etag))
        }
        Endpoint::PatchTwin(id) => {
            let body: serde_json::Value = parse_json(&read_body(body, MAX_SERVICE_BODY).await?)?;
            let twin = hub.patch_twin(hub_name, &id, &body, if_match).await?;
            json_response(&twin, Some(&twin.etag))
        }
        Endpoint::ReplaceTwin(id) => {
            let body: serde_json::Value = parse_json(&read_body(body, MAX_SERVICE_BODY).await?)?;
            let twin = hub.replace_twin(hub_name, &id, &body, if_match).await?;
            json_response(&twin, Some(&twin.etag))
        }
        Endpoint::Query => {
            #[derive(serde::Deserialize)]
            struct QuerySpecification {
                query: Option<String>,
            }
            let spec: QuerySpecification = parse_json(&read_body(body, MAX_SERVICE_BODY).await?)?;
            let query = spec
                .query
                .ok_or_else(|| MinihubError::ArgumentInvalid("the body has no 'query'".into()))?;
            let page_size = max_items
                .map(|m| {
                    m.trim().parse::<usize>().map_err(|_| {
                        MinihubError::ArgumentInvalid(format!(
                            "x-ms-max-item-count '{m}' is not a number"
                        ))
                    })
                })
                .transpose()?;
            let (twins, next) = hub
                .query_twins(hub_name, &query, page_size, continuation.as_deref())
                .await?;
            let mut response = json_response(&twins, None)?;
            let headers = response.headers_mut();
            headers.insert("x-ms-item-type", HeaderValue::from_static("twin"));
            if let Some(value) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
                headers.insert("x-ms-continuation", value);
            }
            Ok(response)
        }
        Endpoint::Telemetry(id) => {
            let body = read_body(body, MAX_TELEMETRY_BODY).await?;
            let message = DeviceMessage {
                enqueued_time: hub.timestamp(),
                body,
                properties: message_props,
                system_properties: system_props,
            };
            hub.receive_telemetry(hub_name, &id, authorization.as_deref(), message)
                .await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Endpoint::ReadTelemetry(id) => {
            let messages = hub.messages(hub_name, &id).await;
            json_response(
                &messages
                    .iter()
                    .map(RecordedMessage::from)
                    .collect::<Vec<_>>(),
                None,
            )
        }
    }
}

/// A recorded telemetry message as `GET /devices/{id}/messages/events` returns it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RecordedMessage<'a> {
    /// The body as UTF-8 text, or base64 when it is not text.
    body: String,
    /// `utf-8` or `base64`.
    body_encoding: &'static str,
    properties: &'a BTreeMap<String, String>,
    system_properties: &'a BTreeMap<String, String>,
    enqueued_time_utc: String,
}

impl<'a> From<&'a DeviceMessage> for RecordedMessage<'a> {
    fn from(message: &'a DeviceMessage) -> Self {
        let (body, body_encoding) = match std::str::from_utf8(&message.body) {
            Ok(text) => (text.to_owned(), "utf-8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&message.body),
                "base64",
            ),
        };
        Self {
            body,
            body_encoding,
            properties: &message.properties,
            system_properties: &message.system_properties,
            enqueued_time_utc: dps_core::time::format_utc(message.enqueued_time),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let parse = |m: Method, p: &str| Endpoint::parse(&m, p).ok();
        assert_eq!(
            parse(Method::GET, "/devices/dev%201"),
            Some(Endpoint::GetDevice("dev 1".into()))
        );
        assert_eq!(parse(Method::POST, "/devices/query"), Some(Endpoint::Query));
        // A device may be called "query": only POST means the query API.
        assert_eq!(
            parse(Method::GET, "/devices/query"),
            Some(Endpoint::GetDevice("query".into()))
        );
        assert_eq!(
            parse(Method::POST, "/devices/d1/messages/events"),
            Some(Endpoint::Telemetry("d1".into()))
        );
        assert_eq!(parse(Method::GET, "/devices/"), Some(Endpoint::ListDevices));
        assert_eq!(
            parse(Method::GET, "/devices/d1/messages/events"),
            Some(Endpoint::ReadTelemetry("d1".into()))
        );
        assert_eq!(parse(Method::POST, "/twins/d1"), None);
        assert_eq!(parse(Method::GET, "/jobs/v2"), None);
        assert!(matches!(
            Endpoint::parse(&Method::GET, "/statistics/devices"),
            Err(MinihubError::EndpointNotFound(_))
        ));
    }

    #[test]
    fn telemetry_properties_from_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("iothub-app-temp", HeaderValue::from_static("21"));
        headers.insert("iothub-messageid", HeaderValue::from_static("m1"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        let (app, system) = message_properties(&headers);
        assert_eq!(app.get("temp").map(String::as_str), Some("21"));
        assert_eq!(system.get("messageid").map(String::as_str), Some("m1"));
        assert_eq!((app.len(), system.len()), (1, 1));
    }
}
