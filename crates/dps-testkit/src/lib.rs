//! Test kit: a fake IoT hub for provisioning tests, and starts real `opendps` processes on loopback port 0 with their own data directory, and
//! talks to them over HTTPS exactly as clients do. Processes are stopped by PID (SIGTERM) and killed
//! on drop, so a failing test never leaves a server behind.

mod fake_hub;
mod fake_webhook;
mod postgres;
mod scripted_hub;
mod webhook_server;

pub use fake_hub::FakeHub;
pub use fake_webhook::FakeWebhook;
pub use postgres::{PgCluster, PgSchema};
pub use scripted_hub::{HubAnswer, ScriptedHub};
pub use webhook_server::{Scripted, WebhookServer};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dps_server::info::ServiceInfo;
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::Value;

/// A running `opendps serve`.
pub struct TestServer {
    bin: PathBuf,
    extra_args: Vec<String>,
    /// Environment variables given to the server and to every CLI command run against it.
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `opendps info --json` of the running server.
    pub info: Value,
    /// The same, typed.
    service_info: Option<ServiceInfo>,
}

impl TestServer {
    /// Starts `bin serve` in a fresh data directory.
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        Self::start_with(bin, &[]).await
    }

    /// Starts `bin serve` with extra flags (for example `--tls-name`).
    pub async fn start_with(bin: &Path, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(tempfile::tempdir()?, bin, extra_args).await
    }

    /// Starts `bin serve` with `config` (TOML) as its configuration file, and `extra_args`.
    pub async fn start_with_config(
        bin: &Path,
        config: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("opendps.toml");
        std::fs::write(&file, config)?;
        let file = file.to_string_lossy().into_owned();
        let mut args = vec!["--config", file.as_str()];
        args.extend_from_slice(extra_args);
        Self::start_in(dir, bin, &args).await
    }

    /// Starts `bin serve` with `env` set for it and for every CLI command run against it (for
    /// example `OPENDPS_STORAGE__URL`), and `extra_args`.
    pub async fn start_with_env(
        bin: &Path,
        env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_in_with_env(tempfile::tempdir()?, bin, env, extra_args).await
    }

    /// As [`TestServer::start_with_env`], in the data directory `dir` (which may hold files made
    /// beforehand, such as another node's `tls/`).
    pub async fn start_in_with_env(
        dir: tempfile::TempDir,
        bin: &Path,
        env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut server = Self::unstarted(dir, bin, extra_args);
        server.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        server.launch().await?;
        Ok(server)
    }

    async fn start_in(
        dir: tempfile::TempDir,
        bin: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut server = Self::unstarted(dir, bin, extra_args);
        server.launch().await?;
        Ok(server)
    }

    fn unstarted(dir: tempfile::TempDir, bin: &Path, extra_args: &[&str]) -> Self {
        Self {
            bin: bin.to_owned(),
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
            dir,
            child: None,
            info: Value::Null,
            service_info: None,
        }
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--amqp-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,dps_http=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("while starting opendps")?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cli(&["info", "--json"])?;
            if out.status.success() {
                let info: ServiceInfo = serde_json::from_slice(&out.stdout)?;
                if info.running.map(|r| r.pid) == Some(pid) {
                    self.info = serde_json::to_value(&info)?;
                    self.service_info = Some(info);
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "opendps exited with {status} while starting:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!("opendps did not start within 30 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits up to ten seconds for `needle` to appear in the server's log (a line about what a
    /// client was just told may be written a moment after the client read it); whether it did.
    pub async fn log_shows(&self, needle: &str) -> bool {
        for _ in 0..100 {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub async fn stop(&mut self) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "opendps did not stop within 20 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            // Sleep without blocking the runtime: this test's own clients must be able to answer the
            // server's graceful-shutdown frames (HTTP/2 GOAWAY and PING).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server with SIGKILL, as a crash would: nothing is flushed or cleaned up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sets an environment variable for the server's next start and for CLI commands from now on
    /// (for example `OPENDPS_STORAGE__URL` after moving the state to PostgreSQL).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the server again on the same data directory (after [`kill`](Self::kill)).
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.launch().await
    }

    /// A client of the in-process IoT hub `host` (its registry REST API), signed with its
    /// `iothubowner` connection string from `opendps info`.
    pub fn hub_api(&self, host: &str) -> anyhow::Result<ServiceApi> {
        let cs = self
            .service_info()?
            .minihubs
            .iter()
            .find(|h| h.host_name == host)
            .map(|h| h.connection_string.clone())
            .with_context(|| format!("no in-process hub named {host} in `opendps info`"))?;
        let key = cs
            .split(';')
            .find_map(|p| p.strip_prefix("SharedAccessKey="))
            .context("no key")?;
        let token = dps_core::sas::generate_token(host, key, Some("iothubowner"), far_future())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(self.client_for(host)?.with_auth(Some(token)))
    }

    /// An unauthenticated client that reaches `host` (a name that need not resolve) at this server.
    pub fn client_for(&self, host: &str) -> anyhow::Result<ServiceApi> {
        let addr = self.https_addr()?;
        let http = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&self.ca_pem()?)?)
            .resolve(host, addr)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(ServiceApi {
            http,
            base: format!("https://{host}:{}", addr.port()),
            auth: None,
        })
    }

    /// Stops the server and starts it again on the same data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if !self.stop().await? {
            bail!("opendps did not exit cleanly:\n{}", self.log());
        }
        self.launch().await
    }

    /// Runs the `opendps` binary with this server's data directory (and nothing from the caller's
    /// environment that could point elsewhere).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.bin)
            .args(args)
            .env("OPENDPS_DATA_DIR", self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("OPENDPS_CONNECTION_STRING")
            .env_remove("OPENDPS_CA_FILE")
            .stdin(Stdio::null())
            .output()
            .context("while running opendps")
    }

    /// `host:port` that tokens are issued for.
    pub fn service_host(&self) -> String {
        self.service_info
            .as_ref()
            .map(|i| i.service_host.clone())
            .unwrap_or_default()
    }

    /// `opendps info` of the running server.
    pub fn service_info(&self) -> anyhow::Result<&ServiceInfo> {
        self.service_info
            .as_ref()
            .context("the server has not started")
    }

    /// The primary key of policy `name`.
    pub fn policy_key(&self, name: &str) -> String {
        let cs = self
            .service_info
            .iter()
            .flat_map(|i| &i.policies)
            .find(|p| p.name == name)
            .map(|p| p.connection_string.clone())
            .unwrap_or_default();
        cs.split(';')
            .find_map(|part| part.strip_prefix("SharedAccessKey="))
            .unwrap_or_default()
            .to_owned()
    }

    /// The development CA certificate (PEM).
    pub fn ca_pem(&self) -> anyhow::Result<Vec<u8>> {
        Ok(std::fs::read(
            self.service_info()?.ca_file.as_ref().context("no caFile")?,
        )?)
    }

    /// The bound HTTPS address.
    pub fn https_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.service_info()?.listen.https)
    }

    /// An HTTPS client of the service API that trusts the server's CA.
    pub fn api(&self) -> anyhow::Result<ServiceApi> {
        let ca = self.ca_pem()?;
        let http = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca)?)
            .timeout(Duration::from_secs(30))
            .build()?;
        let host = self.service_host();
        let owner = dps_core::sas::generate_token(
            &host,
            &self.policy_key("provisioningserviceowner"),
            Some("provisioningserviceowner"),
            far_future(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(ServiceApi {
            http,
            base: format!("https://{host}"),
            auth: Some(owner),
        })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An expiry an hour from now.
pub fn far_future() -> i64 {
    dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_second() + 3600
}

/// A response as the test sees it.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body parsed as JSON (Null when empty, a string when not JSON).
    pub body: Value,
}

impl Reply {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A service API client with a chosen `Authorization` header.
#[derive(Clone)]
pub struct ServiceApi {
    http: reqwest::Client,
    base: String,
    auth: Option<String>,
}

impl ServiceApi {
    /// The same client with another `Authorization` header (or none).
    pub fn with_auth(&self, auth: Option<String>) -> Self {
        Self {
            auth,
            ..self.clone()
        }
    }

    /// Sends a request with a JSON (or raw) body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Body>,
    ) -> anyhow::Result<Reply> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut req = self.http.request(
            method,
            format!("{}{path}{sep}api-version=2021-10-01", self.base),
        );
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        match body {
            Some(Body::Json(v)) => {
                req = req
                    .header("Content-Type", "application/json; charset=utf-8")
                    .body(v.to_string())
            }
            Some(Body::Raw(bytes)) => {
                req = req.header("Content-Type", "application/json").body(bytes)
            }
            None => {}
        }
        let resp = req.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(Method::GET, path, &[], None).await
    }

    /// `PUT path` with a JSON body and optional If-Match.
    pub async fn put(
        &self,
        path: &str,
        body: Value,
        if_match: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let headers: Vec<(&str, &str)> = if_match.map(|e| ("If-Match", e)).into_iter().collect();
        self.send(Method::PUT, path, &headers, Some(Body::Json(body)))
            .await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Reply> {
        self.send(Method::POST, path, &[], Some(Body::Json(body)))
            .await
    }

    /// `DELETE path` with optional If-Match.
    pub async fn delete(&self, path: &str, if_match: Option<&str>) -> anyhow::Result<Reply> {
        let headers: Vec<(&str, &str)> = if_match.map(|e| ("If-Match", e)).into_iter().collect();
        self.send(Method::DELETE, path, &headers, None).await
    }
}

/// A request body.
pub enum Body {
    /// JSON.
    Json(Value),
    /// Raw bytes (for malformed input).
    Raw(Vec<u8>),
}
