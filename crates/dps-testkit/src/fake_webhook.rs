//! A scripted allocation webhook for provisioning tests: it records every request and answers with
//! the replies it was given, in order; when they are used up, the last one repeats.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use dps_core::webhook::{WebhookClient, WebhookError, WebhookReply};
use serde_json::Value;

/// One scripted answer.
type Answer = Result<WebhookReply, WebhookError>;

/// Answers still to give, and the last one given (repeated once the queue is empty).
#[derive(Default)]
struct Script {
    queued: std::collections::VecDeque<Answer>,
    last: Option<Answer>,
}

/// An allocation webhook that answers from a script.
#[derive(Default)]
pub struct FakeWebhook {
    script: Mutex<Script>,
    requests: Mutex<Vec<(String, Value)>>,
}

impl FakeWebhook {
    /// Queues an answer with this status and JSON (or raw) body.
    pub fn answer(&self, status: u16, body: &str) {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queued
            .push_back(Ok(WebhookReply {
                status,
                body: body.as_bytes().to_vec(),
            }));
    }

    /// Queues a call that never gets an answer in time.
    pub fn time_out(&self) {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queued
            .push_back(Err(WebhookError::Timeout(Duration::from_secs(1))));
    }

    /// The (url, body) of every call so far.
    pub fn requests(&self) -> Vec<(String, Value)> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[async_trait]
impl WebhookClient for FakeWebhook {
    async fn post(
        &self,
        url: &str,
        body: &Value,
        _timeout: Duration,
    ) -> Result<WebhookReply, WebhookError> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((url.to_owned(), body.clone()));
        let mut script = self.script.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(next) = script.queued.pop_front() {
            script.last = Some(next.clone());
            return next;
        }
        script
            .last
            .clone()
            .unwrap_or_else(|| Err(WebhookError::Network("no scripted answer".into())))
    }
}
