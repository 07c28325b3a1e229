//! The device API over HTTPS: `PUT …/register` and `GET …/operations/{id}`, signed with the
//! device's SAS token, as the SDKs' HTTP transports send them.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::device::ClientIdentity;
use crate::exchange::{DeviceExchange, Reply, retry_after};

/// Device API version sent, as the C SDK sends it.
pub const API_VERSION: &str = "2021-06-01";

/// One device's requests over HTTPS (one pooled connection, as the SDKs keep it).
pub struct HttpsExchange {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl HttpsExchange {
    /// A device `registration_id` of `scope` at `host[:port]`, trusting `ca` (else the system
    /// roots), sending `token` (`SharedAccessSignature sr=…`) or presenting `identity` (X.509).
    pub fn new(
        host: &str,
        scope: &str,
        registration_id: &str,
        ca: Option<&Path>,
        token: Option<String>,
        identity: Option<&ClientIdentity>,
    ) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("while reading {}", ca.display()))?;
            builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem)?);
        }
        if let Some(identity) = identity {
            let mut pem = identity.chain_pem.clone();
            pem.push(b'\n');
            pem.extend_from_slice(&identity.key_pem);
            builder = builder.identity(
                reqwest::Identity::from_pem(&pem)
                    .context("the device certificate and key are not PEM")?,
            );
        }
        Ok(Self {
            http: builder.build()?,
            base: format!("https://{host}/{scope}/registrations/{registration_id}"),
            token,
        })
    }
}

impl HttpsExchange {
    /// The `Authorization` header of a symmetric-key device; none for an X.509 device.
    fn authorization(&self) -> reqwest::header::HeaderMap {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = self
            .token
            .as_deref()
            .and_then(|t| reqwest::header::HeaderValue::from_str(t).ok())
        {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        headers
    }
}

impl DeviceExchange for HttpsExchange {
    async fn register(&mut self, body: &Value) -> anyhow::Result<Reply> {
        let response = self
            .http
            .put(format!("{}/register?api-version={API_VERSION}", self.base))
            .headers(self.authorization())
            .json(body)
            .send()
            .await
            .with_context(|| {
                format!(
                    "could not reach {}; check --provisioning-host and the CA",
                    self.base
                )
            })?;
        read(response).await
    }

    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<Reply> {
        let response = self
            .http
            .get(format!(
                "{}/operations/{operation_id}?api-version={API_VERSION}",
                self.base
            ))
            .headers(self.authorization())
            .send()
            .await?;
        read(response).await
    }
}

/// The wait a response's `Retry-After` header asks for, by [`retry_after`]'s rule.
pub fn retry_after_header(headers: &reqwest::header::HeaderMap) -> std::time::Duration {
    retry_after(
        headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
    )
}

async fn read(response: reqwest::Response) -> anyhow::Result<Reply> {
    let status = response.status().as_u16();
    let wait = retry_after_header(response.headers());
    let text = response.text().await?;
    Ok(Reply {
        status,
        retry_after: wait,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    })
}
