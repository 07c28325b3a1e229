//! A small client of the service API for the admin commands: it signs every request with the
//! connection string's policy key, trusts the data directory's CA, and turns error bodies into
//! messages that say what to do next.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use dps_core::linked_hub::ConnectionString;
use dps_core::sas;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Lifetime of each request's token.
const TOKEN_TTL_SECS: i64 = 3600;

/// A page of a query.
pub struct QueryPage {
    /// The items.
    pub items: Vec<Value>,
    /// The continuation token, when more items follow.
    pub continuation: Option<String>,
}

/// An authenticated service API client.
pub struct ServiceClient {
    http: reqwest::Client,
    base: String,
    connection: ConnectionString,
}

/// Where the client's settings come from.
pub struct ClientSettings {
    /// `--login` / `OPENDPS_CONNECTION_STRING`.
    pub login: Option<String>,
    /// `--ca-file` / `OPENDPS_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// The data directory to read both from when they are not given.
    pub data_dir: PathBuf,
}

impl ServiceClient {
    /// Builds a client from flags, the environment, or a local data directory.
    pub async fn connect(settings: ClientSettings) -> anyhow::Result<Self> {
        let (login, ca_file) = match settings.login {
            Some(login) => (login, settings.ca_file),
            None => {
                let config = dps_server::config::Config::for_data_dir(&settings.data_dir)?;
                let info = dps_server::info::collect(&config).await.context(
                    "no connection string: pass --login or set OPENDPS_CONNECTION_STRING, or point --data-dir at a local service",
                )?;
                let login = info
                    .service_connection_string
                    .context("the data directory has no owner policy")?;
                let ca = settings.ca_file.or(info.ca_file);
                (login, ca)
            }
        };
        let connection = ConnectionString::parse(&login)
            .map_err(|e| anyhow!("the connection string is not valid: {e}"))?;
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
        if let Some(ca) = ca_file.as_deref() {
            builder = builder.tls_certs_only(read_ca(ca)?);
        }
        let http = builder.build().context("while setting up HTTPS")?;
        Ok(Self {
            base: format!("https://{}", connection.host_name),
            http,
            connection,
        })
    }

    fn token(&self) -> anyhow::Result<String> {
        let expiry =
            dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_second() + TOKEN_TTL_SECS;
        sas::generate_token(
            &self.connection.host_name,
            self.connection.key.expose(),
            Some(&self.connection.key_name),
            expiry,
        )
        .map_err(|e| anyhow!("the connection string's key is not valid: {e}"))
    }

    /// Sends one request and returns the JSON body (Null for 204) and headers.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        extra_headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<(Value, reqwest::header::HeaderMap)> {
        let (status, text, headers) = self
            .exchange(method, path, if_match, extra_headers, body)
            .await?;
        Ok((success_body(status, &text)?, headers))
    }

    /// `GET {path}`: the item, or `None` when the service answers 404.
    pub async fn get_if_found(&self, path: &str) -> anyhow::Result<Option<Value>> {
        let (status, text, _) = self.exchange(Method::GET, path, None, &[], None).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        success_body(status, &text).map(Some)
    }

    /// The CPU seconds the service has used, from its own `process_cpu_seconds_total` in
    /// `/metrics`; `None` when it does not report them (not on Linux, or metrics turned off).
    pub async fn server_cpu_seconds(&self) -> Option<f64> {
        let (status, text, _) = self
            .exchange(Method::GET, "/metrics", None, &[], None)
            .await
            .ok()?;
        if !status.is_success() {
            return None;
        }
        text.lines()
            .find_map(|line| line.strip_prefix("process_cpu_seconds_total "))
            .and_then(|value| value.trim().parse().ok())
    }

    /// Sends one request; the status, body text and headers, whatever the status.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        extra_headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<(reqwest::StatusCode, String, reqwest::header::HeaderMap)> {
        let url = format!(
            "{}{path}{}api-version=2021-10-01",
            self.base,
            if path.contains('?') { '&' } else { '?' }
        );
        let mut request = self
            .http
            .request(method, &url)
            .header("Authorization", self.token()?);
        if let Some(etag) = if_match {
            request = request.header("If-Match", etag);
        }
        for (name, value) in extra_headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            anyhow!("could not reach {}: {e}. Is `opendps serve` running, and does --ca-file name the CA it uses?", self.base)
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response
            .text()
            .await
            .context("while reading the response")?;
        Ok((status, text, headers))
    }

    /// One page of `POST {path}` (a query).
    pub async fn query_page(
        &self,
        path: &str,
        page_size: Option<usize>,
        continuation: Option<&str>,
    ) -> anyhow::Result<QueryPage> {
        let mut headers = Vec::new();
        if let Some(size) = page_size {
            headers.push(("x-ms-max-item-count", size.to_string()));
        }
        if let Some(token) = continuation {
            headers.push(("x-ms-continuation", token.to_owned()));
        }
        let (value, response_headers) = self
            .send(
                Method::POST,
                path,
                None,
                &headers,
                Some(&serde_json::json!({"query": "SELECT *"})),
            )
            .await?;
        let continuation = response_headers
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        Ok(QueryPage {
            items: value.as_array().cloned().unwrap_or_default(),
            continuation,
        })
    }

    /// Every item of a query, following continuation tokens, up to `top` items.
    pub async fn query_all(&self, path: &str, top: Option<usize>) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut continuation = None;
        loop {
            let page = self.query_page(path, None, continuation.as_deref()).await?;
            items.extend(page.items);
            if top.is_some_and(|t| items.len() >= t) {
                items.truncate(top.unwrap_or(usize::MAX));
                return Ok(items);
            }
            match page.continuation {
                Some(next) => continuation = Some(next),
                None => return Ok(items),
            }
        }
    }
}

fn describe_error(status: StatusCode, body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let (code, message, tracking) = match &parsed {
        Some(v) => (
            v["errorCode"]
                .as_u64()
                .map(|c| c.to_string())
                .unwrap_or_else(|| status.as_u16().to_string()),
            v["message"].as_str().unwrap_or(body).to_owned(),
            v["trackingId"].as_str().map(str::to_owned),
        ),
        None => (status.as_u16().to_string(), body.to_owned(), None),
    };
    let hint = match status {
        StatusCode::UNAUTHORIZED => {
            " Check the connection string (--login or OPENDPS_CONNECTION_STRING)."
        }
        StatusCode::FORBIDDEN => {
            " Use a connection string whose policy has that right, such as provisioningserviceowner."
        }
        StatusCode::PRECONDITION_FAILED => " Read the current version and retry with its etag.",
        StatusCode::CONFLICT => " Use `update` to change an existing item.",
        _ => "",
    };
    match tracking {
        Some(id) => format!("{message} (error {code}, tracking id {id}).{hint}"),
        None => format!("{message} (error {code}).{hint}"),
    }
}

fn read_ca(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("while reading the CA file {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The JSON body of a successful answer; any other status is an error that says what to do.
fn success_body(status: StatusCode, text: &str) -> anyhow::Result<Value> {
    if !status.is_success() {
        bail!(describe_error(status, text));
    }
    parse_body(text)
}

/// A response body as JSON (`null` when empty).
fn parse_body(text: &str) -> anyhow::Result<Value> {
    if text.trim().is_empty() {
        Ok(Value::Null)
    } else {
        serde_json::from_str(text).context("the service sent invalid JSON")
    }
}
