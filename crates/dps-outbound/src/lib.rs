//! opendps outbound clients. [`RestHubClient`] writes device identities and twins through the IoT
//! Hub service REST API, authenticated with each linked hub's connection string. The same code
//! drives a real Azure IoT Hub and the bundled minihub.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dps_core::clock::Clock;
use dps_core::hub::{HubClient, HubDevice, HubError, HubTwin};
use dps_core::linked_hub::{ConnectionString, LinkedHub};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The IoT Hub service API version used, as the Azure service SDKs send it.
const API_VERSION: &str = "2021-04-12";
/// Lifetime of the SAS token made for each request.
const TOKEN_TTL_SECS: i64 = 3600;
/// Most characters of a hub's error body kept in a message.
const MAX_MESSAGE: usize = 300;

/// Escaped in device ids: everything but RFC 3986 unreserved characters.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Where hubs are reached when their host names are not to be resolved through DNS (the in-process
/// minihub answers on this service's own listener).
pub type HubEndpoints = HashMap<String, SocketAddr>;

/// The IoT Hub REST client.
pub struct RestHubClient {
    http: reqwest::Client,
    endpoints: HubEndpoints,
    clock: Arc<dyn Clock>,
}

/// Why an HTTPS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An extra CA certificate is not PEM.
    #[error("an extra CA is not PEM")]
    Ca(#[source] reqwest::Error),
    /// The TLS or HTTP stack refused the settings.
    #[error("building the HTTPS client")]
    Build(#[source] reqwest::Error),
}

/// Settings of [`RestHubClient`].
pub struct RestHubSettings {
    /// Per-request timeout; a hub that does not answer in time fails the attempt.
    pub timeout: Duration,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub extra_roots_pem: Vec<Vec<u8>>,
    /// Host names reached at a fixed address instead of through DNS.
    pub endpoints: HubEndpoints,
    /// The time the hub tokens' expiry counts from.
    pub clock: Arc<dyn Clock>,
}

impl RestHubClient {
    /// Builds the client.
    pub fn new(settings: RestHubSettings) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout);
        for pem in &settings.extra_roots_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(ClientError::Ca)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        for (host, addr) in &settings.endpoints {
            builder = builder.resolve(host, *addr);
        }
        let http = builder.build().map_err(ClientError::Build)?;
        Ok(Self {
            http,
            endpoints: settings.endpoints,
            clock: settings.clock,
        })
    }

    fn base(&self, hub: &str) -> String {
        match self.endpoints.get(&hub.to_ascii_lowercase()) {
            Some(addr) => format!("https://{hub}:{}", addr.port()),
            None => format!("https://{hub}"),
        }
    }

    async fn call(
        &self,
        hub: &LinkedHub,
        operation: &'static str,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), HubError> {
        let conn = ConnectionString::parse(hub.connection_string.expose())
            .map_err(|_| HubError::BadConnectionString(hub.host_name.clone()))?;
        let expiry = self.clock.now().as_second() + TOKEN_TTL_SECS;
        let token = dps_core::sas::generate_token(
            &conn.host_name,
            conn.key.expose(),
            Some(&conn.key_name),
            expiry,
        )
        .map_err(|_| HubError::BadConnectionString(hub.host_name.clone()))?;
        let url = format!(
            "{}{path}?api-version={API_VERSION}",
            self.base(&conn.host_name)
        );
        let mut request = self
            .http
            .request(method, &url)
            .header("Authorization", token);
        if let Some(etag) = if_match {
            request = request.header("If-Match", etag);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |e: reqwest::Error| HubError::Unreachable {
            hub: hub.host_name.clone(),
            reason: error_chain(&e),
        };
        let started = std::time::Instant::now();
        let sent = async {
            let response = request.send().await?;
            let status = response.status();
            Ok((status, response.text().await?))
        }
        .await;
        let status = sent.as_ref().map_or("error", |(status, _)| status.as_str());
        dps_core::hub::record_call("rest", operation, status, started);
        let (status, text) = sent.map_err(unreachable)?;
        tracing::debug!(hub = %hub.host_name, operation, %status, "hub call");
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() || status == StatusCode::NOT_FOUND || status == StatusCode::CONFLICT
        {
            return Ok((status, value));
        }
        Err(HubError::Refused {
            hub: hub.host_name.clone(),
            operation,
            status: status.as_u16(),
            message: text.chars().take(MAX_MESSAGE).collect(),
        })
    }
}

fn error_chain(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn device_path(device_id: &str) -> String {
    utf8_percent_encode(device_id, PATH_SEGMENT).to_string()
}

fn refused(hub: &LinkedHub, operation: &'static str, status: StatusCode, body: &Value) -> HubError {
    HubError::Refused {
        hub: hub.host_name.clone(),
        operation,
        status: status.as_u16(),
        message: body.to_string().chars().take(MAX_MESSAGE).collect(),
    }
}

#[async_trait]
impl HubClient for RestHubClient {
    async fn upsert_device(&self, hub: &LinkedHub, device: &HubDevice) -> Result<(), HubError> {
        let body = device.identity_document();
        let path = format!("/devices/{}", device_path(&device.device_id));
        // Create first (what a new device needs); replace the identity when it already exists.
        let (status, reply) = self
            .call(hub, "create device", Method::PUT, &path, None, Some(&body))
            .await?;
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::CONFLICT => {
                let (status, reply) = self
                    .call(
                        hub,
                        "update device",
                        Method::PUT,
                        &path,
                        Some("*"),
                        Some(&body),
                    )
                    .await?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(refused(hub, "update device", status, &reply))
                }
            }
            other => Err(refused(hub, "create device", other, &reply)),
        }
    }

    async fn update_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
    ) -> Result<(), HubError> {
        let body = twin.patch_document();
        let path = format!("/twins/{}", device_path(device_id));
        let (status, reply) = self
            .call(
                hub,
                "update twin",
                Method::PATCH,
                &path,
                Some("*"),
                Some(&body),
            )
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(refused(hub, "update twin", status, &reply))
        }
    }

    async fn get_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
    ) -> Result<Option<HubTwin>, HubError> {
        let path = format!("/twins/{}", device_path(device_id));
        let (status, twin) = self
            .call(hub, "read twin", Method::GET, &path, None, None)
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(HubTwin::from_hub(
                &twin["tags"],
                &twin["properties"]["desired"],
            ))),
            other => Err(refused(hub, "read twin", other, &twin)),
        }
    }

    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        let path = format!("/devices/{}", device_path(device_id));
        let (status, reply) = self
            .call(hub, "delete device", Method::DELETE, &path, Some("*"), None)
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(()),
            s if s.is_success() => Ok(()),
            other => Err(refused(hub, "delete device", other, &reply)),
        }
    }
}

/// The allocation webhook client: a JSON POST over HTTPS (system roots plus any configured CA) or
/// plain HTTP on a trusted network. Function keys in the URL's query are never logged.
pub struct ReqwestWebhookClient {
    http: reqwest::Client,
    max_response_bytes: usize,
}

impl ReqwestWebhookClient {
    /// A client trusting the system roots and `extra_roots_pem`, reading at most
    /// `max_response_bytes` of an answer and never following a redirect.
    pub fn new(
        extra_roots_pem: &[Vec<u8>],
        max_response_bytes: usize,
    ) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        for pem in extra_roots_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(ClientError::Ca)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: builder.build().map_err(ClientError::Build)?,
            max_response_bytes,
        })
    }
}

#[async_trait]
impl dps_core::webhook::WebhookClient for ReqwestWebhookClient {
    async fn post(
        &self,
        url: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<dps_core::webhook::WebhookReply, dps_core::webhook::WebhookError> {
        use dps_core::webhook::WebhookError;
        let mut response = self
            .http
            .post(url)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    WebhookError::Timeout(timeout)
                } else {
                    // reqwest's message names the URL: keep only its path.
                    WebhookError::Network(error_chain(&e.without_url()))
                }
            })?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or_default();
            return Err(WebhookError::Redirect {
                status: status.as_u16(),
                location: dps_core::webhook::loggable_url(location).to_owned(),
            });
        }
        let limit = self.max_response_bytes;
        let too_large = WebhookError::TooLarge { limit };
        if response
            .content_length()
            .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
        {
            return Err(too_large);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            if e.is_timeout() {
                WebhookError::Timeout(timeout)
            } else {
                WebhookError::Network(error_chain(&e.without_url()))
            }
        })? {
            if body.len() + chunk.len() > limit {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(dps_core::webhook::WebhookReply {
            status: status.as_u16(),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_escaped() {
        assert_eq!(device_path("a b/c"), "a%20b%2Fc");
        assert_eq!(device_path("dev-1.x_y~"), "dev-1.x_y~");
    }
}
