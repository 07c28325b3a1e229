//! An IoT hub for end-to-end tests that answers as IoT Hub does where minihub cannot be made to:
//! a real minihub behind HTTPS on loopback port 0, with a script of answers (a 429 with
//! `Retry-After` for a while, the Basic tier's 403010 on twins, …) given before minihub is asked,
//! and a log of every request. Its certificate comes from the development CA of an opendps data
//! directory, so the service under test trusts it; its host name is `localhost:{port}`, the form
//! `opendps hub` prints for hubs on non-standard ports.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use minihub::Minihub;
use tokio::sync::watch;
use tower::ServiceExt as _;

/// An answer the hub gives instead of minihub's, to requests that match.
#[derive(Debug, Clone)]
pub struct HubAnswer {
    /// Only requests with this method (any when `None`).
    pub method: Option<Method>,
    /// Only requests whose path starts with this (e.g. `/twins/`).
    pub path_prefix: String,
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
    /// Extra headers, such as `Retry-After`.
    pub headers: Vec<(String, String)>,
    /// How many matching requests get it (every one when `None`).
    pub times: Option<u32>,
}

impl HubAnswer {
    /// IoT Hub's throttling answer to the next `times` requests: 429, `ThrottlingException`,
    /// `Retry-After: {retry_after_secs}`.
    pub fn throttled(times: u32, retry_after_secs: u64) -> Self {
        Self {
            method: None,
            path_prefix: "/".into(),
            status: 429,
            body: r#"{"Message":"ErrorCode:ThrottlingException;Rate of requests exceeded the limit for this IoT hub.","ExceptionMessage":""}"#.into(),
            headers: vec![("Retry-After".into(), retry_after_secs.to_string())],
            times: Some(times),
        }
    }

    /// IoT Hub Basic's answer to every twin request: 403, 403010 OperationNotAvailableInCurrentTier.
    pub fn basic_tier() -> Self {
        Self {
            method: None,
            path_prefix: "/twins/".into(),
            status: 403,
            body: r#"{"Message":"ErrorCode:OperationNotAvailableInCurrentTier;403010 This operation is not available in the current tier of the IoT hub.","ExceptionMessage":""}"#.into(),
            headers: Vec::new(),
            times: None,
        }
    }
}

#[derive(Default)]
struct Script {
    answers: Mutex<Vec<HubAnswer>>,
    seen: Mutex<Vec<String>>,
}

impl Script {
    /// The scripted answer for this request, if one matches (and is used up by it).
    fn answer_for(&self, method: &Method, path: &str) -> Option<HubAnswer> {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let at = answers.iter().position(|a| {
            a.method.as_ref().is_none_or(|m| m == method)
                && path.starts_with(&a.path_prefix)
                && a.times != Some(0)
        })?;
        let answer = answers[at].clone();
        if let Some(left) = answers[at].times.as_mut() {
            *left -= 1;
        }
        Some(answer)
    }
}

/// A running scripted hub; stops when dropped.
pub struct ScriptedHub {
    minihub: Arc<Minihub>,
    host_port: String,
    script: Arc<Script>,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl ScriptedHub {
    /// Starts the hub with a certificate from the development CA in `data_dir` (an opendps data
    /// directory that has one, such as a running [`crate::TestServer`]'s).
    pub async fn start(data_dir: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let minihub = Arc::new(Minihub::open(&dir.path().join("hub.db"))?);
        minihub.ensure_hub("localhost").await?;
        let data = dps_server::datadir::DataDir::new(data_dir);
        let (identity, _) =
            dps_server::pki::server_identity(&dps_server::config::TlsConfig::default(), &data)
                .context("while issuing the scripted hub's certificate")?;
        let tls = tokio_rustls::TlsAcceptor::from(dps_server::pki::server_config(identity)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let host_port = format!("localhost:{}", listener.local_addr()?.port());
        let script = Arc::new(Script::default());
        let (stop, stopped) = watch::channel(false);
        let app = scripted(Arc::clone(&minihub), Arc::clone(&script));
        tokio::spawn(dps_http::serve(
            listener,
            tls,
            app,
            dps_http::HttpLimits::default(),
            stopped,
        ));
        Ok(Self {
            minihub,
            host_port,
            script,
            stop,
            _dir: dir,
        })
    }

    /// The hub's host name as linked hubs and devices see it: `localhost:{port}`.
    pub fn host_name(&self) -> &str {
        &self.host_port
    }

    /// The connection string of the shared access policy `policy` (`iothubowner`,
    /// `registryReadWrite`, …).
    pub fn connection_string(&self, policy: &str) -> anyhow::Result<String> {
        let hub = self.minihub.hub("localhost")?;
        let policy = hub
            .policy(policy)
            .with_context(|| format!("no policy {policy}"))?;
        Ok(policy.connection_string(&self.host_port))
    }

    /// Adds a scripted answer; answers are tried in the order they were added.
    pub fn answer(&self, answer: HubAnswer) {
        self.script
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(answer);
    }

    /// Every request so far, as `METHOD /path STATUS`.
    pub fn requests(&self) -> Vec<String> {
        self.script
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The minihub behind the script, to look at or change what the hub holds.
    pub fn minihub(&self) -> &Minihub {
        &self.minihub
    }

    /// The hub's name inside minihub (`localhost`).
    pub fn hub(&self) -> &'static str {
        "localhost"
    }
}

impl Drop for ScriptedHub {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn scripted(minihub: Arc<Minihub>, script: Arc<Script>) -> Router {
    let hub = minihub::router(minihub);
    Router::new().fallback_service(tower::service_fn(move |request: Request| {
        let (hub, script) = (hub.clone(), Arc::clone(&script));
        async move {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let response = match script.answer_for(&method, &path) {
                Some(answer) => {
                    let mut response = Response::new(Body::from(answer.body));
                    *response.status_mut() =
                        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::IM_A_TEAPOT);
                    for (name, value) in answer.headers {
                        if let (Ok(name), Ok(value)) = (
                            axum::http::HeaderName::try_from(name),
                            axum::http::HeaderValue::try_from(value),
                        ) {
                            response.headers_mut().insert(name, value);
                        }
                    }
                    response
                }
                None => match hub.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
            };
            script
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{method} {path} {}", response.status().as_u16()));
            Ok::<_, std::convert::Infallible>(response.into_response())
        }
    }))
}
