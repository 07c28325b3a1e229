//! opendps outbound clients. [`RestHubClient`] writes device identities and twins through the IoT
//! Hub service REST API, authenticated with each linked hub's connection string. The same code
//! drives a real Azure IoT Hub and the bundled minihub.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dps_core::clock::Clock;
use dps_core::hub::{
    HubClient, HubDevice, HubError, HubTwin, IdentityWrite, ProbeAnswer, ProbeCall, TwinWrite,
};
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
    ) -> Result<Answer, HubError> {
        let conn = ConnectionString::parse(hub.connection_string.expose())
            .map_err(|_| HubError::BadConnectionString(hub.host_name.clone()))?;
        let expiry = self.clock.now().as_second() + TOKEN_TTL_SECS;
        // IoT Hub checks the signature over the lower-case host, as the SDKs sign it.
        let token = dps_core::sas::generate_token(
            &conn.host_name.to_ascii_lowercase(),
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
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let sent = async {
            let response = request.send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now));
            Ok((status, retry_after, response.text().await?))
        }
        .await;
        let status = sent
            .as_ref()
            .map_or("error", |(status, _, _)| status.as_str());
        dps_core::hub::record_call("rest", &hub.host_name, operation, status, started);
        let (status, retry_after, text) =
            sent.map_err(|e: reqwest::Error| HubError::Unreachable {
                hub: hub.host_name.clone(),
                reason: error_chain(&e),
            })?;
        tracing::debug!(hub = %hub.host_name, operation, %status, "hub call");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            body,
            text,
            retry_after,
        })
    }

    /// Reads a device identity: `None` if it does not exist.
    async fn get_device(&self, hub: &LinkedHub, path: &str) -> Result<Option<Value>, HubError> {
        let answer = self
            .call(hub, "read device", Method::GET, path, None, None)
            .await?;
        match answer.status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(answer.body)),
            _ => Err(answer.refused(hub, "read device")),
        }
    }
}

/// A hub's answer.
struct Answer {
    status: StatusCode,
    body: Value,
    text: String,
    retry_after: Option<Duration>,
}

impl Answer {
    fn refused(self, hub: &LinkedHub, operation: &'static str) -> HubError {
        if self.status == StatusCode::FORBIDDEN && self.text.contains("403010") {
            return HubError::TwinsUnsupported {
                hub: hub.host_name.clone(),
            };
        }
        HubError::Refused {
            hub: hub.host_name.clone(),
            operation,
            status: self.status.as_u16(),
            message: self.text.chars().take(MAX_MESSAGE).collect(),
            retry_after: self.retry_after,
        }
    }
}

/// `Retry-After` in seconds (IoT Hub's form) or as an HTTP date, counted from `now`.
fn parse_retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let wait = when.duration_since(now);
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
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

/// `If-Match` for "whatever version is there", quoted as the service SDKs send it.
const ANY_VERSION: &str = "\"*\"";

/// Attempts at a read-modify-write of an identity that keeps changing under it.
const IDENTITY_WRITE_ATTEMPTS: usize = 3;

#[async_trait]
impl HubClient for RestHubClient {
    async fn upsert_device(
        &self,
        hub: &LinkedHub,
        device: &HubDevice,
    ) -> Result<IdentityWrite, HubError> {
        let path = format!("/devices/{}", device_path(&device.device_id));
        let mut last = None;
        for _ in 0..IDENTITY_WRITE_ATTEMPTS {
            // Create first (what a new device needs, in one call).
            let created = self
                .call(
                    hub,
                    "create device",
                    Method::PUT,
                    &path,
                    None,
                    Some(&device.identity_document()),
                )
                .await?;
            match created.status {
                s if s.is_success() => return Ok(IdentityWrite::Created),
                StatusCode::CONFLICT => {}
                _ => return Err(created.refused(hub, "create device")),
            }
            // It exists: change only what DPS owns, under the identity's etag.
            let Some(existing) = self.get_device(hub, &path).await? else {
                continue;
            };
            let Some(updated) = device.updated_identity(&existing) else {
                return Ok(IdentityWrite::Unchanged);
            };
            let etag = existing["etag"].as_str().unwrap_or("*");
            let written = self
                .call(
                    hub,
                    "update device",
                    Method::PUT,
                    &path,
                    Some(&format!("\"{}\"", etag.trim_matches('"'))),
                    Some(&updated),
                )
                .await?;
            match written.status {
                s if s.is_success() => return Ok(IdentityWrite::Updated),
                // Changed or deleted since it was read: read it again.
                StatusCode::PRECONDITION_FAILED | StatusCode::NOT_FOUND => {
                    last = Some(written.refused(hub, "update device"));
                }
                _ => return Err(written.refused(hub, "update device")),
            }
        }
        Err(last.unwrap_or_else(|| HubError::Refused {
            hub: hub.host_name.clone(),
            operation: "update device",
            status: 409,
            message: "the device kept changing while it was written".into(),
            retry_after: None,
        }))
    }

    async fn write_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
        mode: TwinWrite,
    ) -> Result<(), HubError> {
        let body = twin.patch_document();
        let path = format!("/twins/{}", device_path(device_id));
        let (operation, method) = match mode {
            TwinWrite::Merge => ("update twin", Method::PATCH),
            TwinWrite::Replace => ("replace twin", Method::PUT),
        };
        let answer = self
            .call(
                hub,
                operation,
                method,
                &path,
                Some(ANY_VERSION),
                Some(&body),
            )
            .await?;
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(answer.refused(hub, operation))
        }
    }

    async fn get_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
    ) -> Result<Option<HubTwin>, HubError> {
        let path = format!("/twins/{}", device_path(device_id));
        let answer = self
            .call(hub, "read twin", Method::GET, &path, None, None)
            .await?;
        match answer.status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(HubTwin::from_hub(
                &answer.body["tags"],
                &answer.body["properties"]["desired"],
            ))),
            _ => Err(answer.refused(hub, "read twin")),
        }
    }

    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        let path = format!("/devices/{}", device_path(device_id));
        let answer = self
            .call(
                hub,
                "delete device",
                Method::DELETE,
                &path,
                Some(ANY_VERSION),
                None,
            )
            .await?;
        match answer.status {
            StatusCode::NOT_FOUND => Ok(()),
            s if s.is_success() => Ok(()),
            _ => Err(answer.refused(hub, "delete device")),
        }
    }

    async fn probe_call(
        &self,
        hub: &LinkedHub,
        call: ProbeCall,
        device_id: &str,
    ) -> Result<ProbeAnswer, HubError> {
        let id = device_path(device_id);
        let (method, path, if_match) = match call {
            ProbeCall::DeleteDevice => {
                (Method::DELETE, format!("/devices/{id}"), Some(ANY_VERSION))
            }
            ProbeCall::ReadDevice => (Method::GET, format!("/devices/{id}"), None),
            ProbeCall::ReadTwin => (Method::GET, format!("/twins/{id}"), None),
        };
        let answer = self
            .call(hub, "link check", method, &path, if_match, None)
            .await?;
        match answer.status {
            StatusCode::NOT_FOUND => Ok(ProbeAnswer::Allowed),
            StatusCode::UNAUTHORIZED => Ok(ProbeAnswer::Unauthorized(
                answer.text.chars().take(MAX_MESSAGE).collect(),
            )),
            _ => match answer.refused(hub, call.describe()) {
                HubError::TwinsUnsupported { .. } => Ok(ProbeAnswer::NotInTier),
                other => Err(other),
            },
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
    fn retry_after_in_seconds_or_as_a_date() {
        let now = jiff::Timestamp::from_second(1_900_000_000).expect("ts");
        assert_eq!(
            parse_retry_after(" 30 ", now),
            Some(Duration::from_secs(30))
        );
        let later = now
            .checked_add(jiff::SignedDuration::from_secs(90))
            .expect("ts");
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&later)
            .expect("date");
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn device_ids_are_escaped() {
        assert_eq!(device_path("a b/c"), "a%20b%2Fc");
        assert_eq!(device_path("dev-1.x_y~"), "dev-1.x_y~");
    }
}
