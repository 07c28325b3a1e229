//! A real allocation webhook for end-to-end tests: plain HTTP on loopback port 0, answering from a
//! script (status, body, optional delay) and recording every request body it received.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::Value;

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
}

#[derive(Default)]
struct Shared {
    script: Mutex<(VecDeque<Scripted>, Option<Scripted>)>,
    received: Mutex<Vec<Value>>,
}

/// A running webhook; stops when dropped.
pub struct WebhookServer {
    shared: Arc<Shared>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookServer {
    /// Starts a webhook at `http://127.0.0.1:{port}/api/alloc?code=…` (the code mimics an Azure
    /// Functions key, which must never appear in logs).
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/api/alloc", post(answer))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!(
            "http://{}/api/alloc?code=function-key-s3cret",
            listener.local_addr()?
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { shared, url, task })
    }

    /// The URL to put in `customAllocationDefinition.webhookUrl`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Queues an answer; once the queue is used up the last answer repeats.
    pub fn answer(&self, status: u16, body: &str) {
        self.answer_after(status, body, Duration::ZERO);
    }

    /// Queues an answer given after `delay`.
    pub fn answer_after(&self, status: u16, body: &str, delay: Duration) {
        let mut script = self.shared.script.lock().unwrap_or_else(|e| e.into_inner());
        script.0.push_back(Scripted {
            status,
            body: body.to_owned(),
            delay,
            headers: Vec::new(),
        });
    }

    /// Queues a redirect (`status`, `Location: location`).
    pub fn redirect(&self, status: u16, location: &str) {
        let mut script = self.shared.script.lock().unwrap_or_else(|e| e.into_inner());
        script.0.push_back(Scripted {
            status,
            body: String::new(),
            delay: Duration::ZERO,
            headers: vec![("location".to_owned(), location.to_owned())],
        });
    }

    /// Every request body received so far.
    pub fn received(&self) -> Vec<Value> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(shared): State<Arc<Shared>>, body: Bytes) -> axum::response::Response {
    shared
        .received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    let next = {
        let mut script = shared.script.lock().unwrap_or_else(|e| e.into_inner());
        match script.0.pop_front() {
            Some(next) => {
                script.1 = Some(next.clone());
                Some(next)
            }
            None => script.1.clone(),
        }
    };
    let Some(next) = next else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no scripted answer".to_owned(),
        )
            .into_response();
    };
    tokio::time::sleep(next.delay).await;
    let mut headers = axum::http::HeaderMap::new();
    for (name, value) in &next.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    (
        StatusCode::from_u16(next.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        headers,
        next.body,
    )
        .into_response()
}
