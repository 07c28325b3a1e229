//! Custom allocation: the webhook seam, the request DPS sends (`AllocationRequest`), and how a reply
//! becomes a decision, a failure with the tutorial's codes, or a retry.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::InitialTwin;

/// Most characters of a webhook's reply body quoted in an error message.
const QUOTED_BODY: usize = 200;

/// What the webhook answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookReply {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A webhook call that got no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No answer within the configured time.
    #[error("the webhook did not answer within {0:?}")]
    Timeout(Duration),
    /// Connecting or sending failed.
    #[error("An error occurred while sending the request: {0}")]
    Network(String),
    /// The answer's body was larger than the configured limit; it was not read further.
    #[error(
        "the webhook's answer is larger than {limit} bytes (provisioning.webhook_max_response_bytes)"
    )]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The webhook answered with a redirect, which is never followed: the allocation request
    /// carries the device's details and must go only to the URL on the enrollment.
    #[error(
        "the webhook answered {status}, a redirect to '{location}'; redirects are not followed, so set webhookUrl to the final URL"
    )]
    Redirect {
        /// The 3xx status.
        status: u16,
        /// Where it pointed (scheme, host and path only: a query may hold a key).
        location: String,
    },
}

/// Calls allocation webhooks.
#[async_trait]
pub trait WebhookClient: Send + Sync {
    /// POSTs `body` as JSON to `url`, waiting at most `timeout`.
    async fn post(
        &self,
        url: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<WebhookReply, WebhookError>;
}

/// `deviceRuntimeContext` of an allocation request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRuntimeContext {
    /// The device's registration id.
    pub registration_id: String,
    /// The hub the device is on, when it registers again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_iot_hub_host_name: Option<String>,
    /// Its device id there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_device_id: Option<String>,
    /// Present (empty) for symmetric-key attestation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<serde_json::Map<String, Value>>,
    /// For X.509 attestation: the device's certificate (`certificateInfo`), and for a group device
    /// the group (`enrollmentGroupId`) and its certificate (`signingCertificateInfo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509: Option<crate::device::X509RegistrationResult>,
    /// The device's custom payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
}

/// `AllocationResponse`: the webhook's 200 body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationResponse {
    /// The chosen hub; must be one of the request's `linkedHubs`.
    #[serde(default)]
    pub iot_hub_host_name: Option<String>,
    /// Replaces the enrollment's initial twin (initial assignment and reset only).
    #[serde(default)]
    pub initial_twin: Option<InitialTwin>,
    /// Returned to the device in `registrationState.payload`.
    #[serde(default)]
    pub payload: Option<Value>,
}

/// What a reply means for the registration.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Allocate as the webhook said.
    Allocate(Box<AllocationResponse>),
    /// Fail with this code and message.
    Fail {
        /// `400207`, `400208` or `400209`.
        code: u32,
        /// Why, naming the webhook's status and the start of its body.
        message: String,
    },
    /// The webhook is busy or failing (status ≥ 429): try again later.
    Retry(String),
}

/// Most bytes of a webhook's reply kept in the trace.
const TRACED_BODY: usize = 1024;

/// One call to the webhook, as the allocation trace shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceAttempt {
    /// When the call was made.
    pub time_utc: String,
    /// The HTTP status, if an answer came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why no answer came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the call took.
    pub latency_ms: u64,
    /// The start of the reply body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl TraceAttempt {
    /// Records a call made at `time_utc` that took `latency`.
    pub fn of(
        reply: &Result<WebhookReply, WebhookError>,
        time_utc: String,
        latency: Duration,
    ) -> Self {
        let (status, error, body) = match reply {
            Ok(r) => (
                Some(r.status),
                None,
                Some(
                    String::from_utf8_lossy(&r.body[..r.body.len().min(TRACED_BODY)]).into_owned(),
                ),
            ),
            Err(e) => (None, Some(e.to_string()), None),
        };
        Self {
            time_utc,
            status,
            error,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            body,
        }
    }
}

/// What happened when a registration asked its webhook: shown by `opendps registration show --trace`
/// and `GET /registrations/{id}/trace`. Secrets never enter it: the URL without its query, the
/// enrollment without keys.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationTrace {
    /// The webhook, without its query (where function keys live).
    pub webhook_url: String,
    /// The AllocationRequest sent.
    pub request: Value,
    /// Every call, in order.
    pub attempts: Vec<TraceAttempt>,
    /// The outcome: the hub chosen, or the error code and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Value>,
}

/// CustomAllocationFailed.
pub const CUSTOM_ALLOCATION_FAILED: u32 = 400_207;
/// CustomAllocationIotHubNotSpecified.
pub const CUSTOM_ALLOCATION_HUB_NOT_SPECIFIED: u32 = 400_208;
/// CustomAllocationUnauthorizedAccess.
pub const CUSTOM_ALLOCATION_UNAUTHORIZED: u32 = 400_209;

/// The tutorial's troubleshooting table: 200 with a hub → allocate; 200 with an empty or null hub
/// → 400208; 401 → 400209; ≥ 429 → retry; anything else, or a body that is not the expected JSON →
/// 400207. `linked_hubs` are the hubs the request offered.
pub fn judge(reply: Result<WebhookReply, WebhookError>, linked_hubs: &[String]) -> Verdict {
    let reply = match reply {
        Ok(reply) => reply,
        Err(err) => {
            return Verdict::Fail {
                code: CUSTOM_ALLOCATION_FAILED,
                message: format!("Custom allocation failed: {err}"),
            };
        }
    };
    let excerpt = || {
        let text = String::from_utf8_lossy(&reply.body);
        let mut short: String = text.chars().take(QUOTED_BODY).collect();
        if text.chars().count() > QUOTED_BODY {
            short.push('…');
        }
        short
    };
    match reply.status {
        200 => match serde_json::from_slice::<AllocationResponse>(&reply.body) {
            Ok(response) => match response.iot_hub_host_name.as_deref().map(str::trim).filter(|h| !h.is_empty()) {
                None => Verdict::Fail {
                    code: CUSTOM_ALLOCATION_HUB_NOT_SPECIFIED,
                    message: "Custom allocation failed: the webhook answered 200 without an iotHubHostName.".into(),
                },
                Some(hub) if !linked_hubs.iter().any(|l| l.eq_ignore_ascii_case(hub)) => Verdict::Fail {
                    code: CUSTOM_ALLOCATION_FAILED,
                    message: format!("Custom allocation failed: the webhook chose '{hub}', which is not one of the linked hubs {linked_hubs:?}."),
                },
                Some(_) => Verdict::Allocate(Box::new(response)),
            },
            Err(err) => Verdict::Fail {
                code: CUSTOM_ALLOCATION_FAILED,
                message: format!("Custom allocation failed: the webhook's 200 body is not an allocation response ({err}): {}", excerpt()),
            },
        },
        401 => Verdict::Fail {
            code: CUSTOM_ALLOCATION_UNAUTHORIZED,
            message: format!("Custom allocation failed with status code: 401 (unauthorized): {}", excerpt()),
        },
        status if status >= 429 => Verdict::Retry(format!("the webhook answered {status}: {}", excerpt())),
        status => Verdict::Fail {
            code: CUSTOM_ALLOCATION_FAILED,
            message: format!("Custom allocation failed with status code: {status}: {}", excerpt()),
        },
    }
}

/// The enrollment as the service API shows it, for the webhook: never its keys or certificates,
/// and the webhook URL's query (its function key) masked as Azure masks it (`?****`).
pub fn redacted_enrollment(doc: &str) -> Value {
    let mut value: Value = serde_json::from_str(doc).unwrap_or(Value::Null);
    if let Some(url) = value.pointer_mut("/customAllocationDefinition/webhookUrl")
        && let Some((base, _)) = url.as_str().and_then(|u| u.split_once('?'))
    {
        *url = Value::String(format!("{base}?****"));
    }
    if let Some(att) = value.get_mut("attestation").and_then(Value::as_object_mut) {
        att.remove("symmetricKey");
        if let Some(x509) = att.get_mut("x509").and_then(Value::as_object_mut) {
            for certs in x509.values_mut().filter_map(Value::as_object_mut) {
                for slot in certs.values_mut().filter_map(Value::as_object_mut) {
                    slot.remove("certificate");
                }
            }
        }
    }
    value
}

/// A URL as it may be logged: without its query, where Azure Functions keys (`?code=…`) live.
pub fn loggable_url(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(status: u16, body: &str) -> Result<WebhookReply, WebhookError> {
        Ok(WebhookReply {
            status,
            body: body.as_bytes().to_vec(),
        })
    }

    fn hubs() -> Vec<String> {
        vec!["toasters.example".into(), "heatpumps.example".into()]
    }

    #[test]
    fn the_troubleshooting_table() {
        let ok = judge(
            reply(
                200,
                r#"{"iotHubHostName":"toasters.example","payload":{"a":1}}"#,
            ),
            &hubs(),
        );
        assert!(matches!(ok, Verdict::Allocate(r) if r.payload == Some(json!({"a": 1}))));
        for body in [
            r#"{"iotHubHostName":""}"#,
            r#"{"iotHubHostName":null}"#,
            "{}",
        ] {
            assert!(
                matches!(
                    judge(reply(200, body), &hubs()),
                    Verdict::Fail { code: 400_208, .. }
                ),
                "{body}"
            );
        }
        assert!(matches!(
            judge(reply(401, "no"), &hubs()),
            Verdict::Fail { code: 400_209, .. }
        ));
        for status in [429, 500, 503] {
            assert!(
                matches!(judge(reply(status, "busy"), &hubs()), Verdict::Retry(_)),
                "{status}"
            );
        }
        let bad = judge(reply(400, "Unrecognized device registration."), &hubs());
        assert!(
            matches!(&bad, Verdict::Fail { code: 400_207, message } if message.contains("400") && message.contains("Unrecognized device registration.")),
            "{bad:?}"
        );
        assert!(matches!(
            judge(reply(404, ""), &hubs()),
            Verdict::Fail { code: 400_207, .. }
        ));
        assert!(matches!(
            judge(reply(200, "<html>"), &hubs()),
            Verdict::Fail { code: 400_207, .. }
        ));
        assert!(matches!(
            judge(
                reply(200, r#"{"iotHubHostName":"elsewhere.example"}"#),
                &hubs()
            ),
            Verdict::Fail { code: 400_207, .. }
        ));
        let timeout = judge(Err(WebhookError::Timeout(Duration::from_secs(5))), &hubs());
        assert!(matches!(timeout, Verdict::Fail { code: 400_207, .. }));
    }

    #[test]
    fn long_bodies_are_quoted_in_part() {
        let long = "x".repeat(5000);
        let Verdict::Fail { message, .. } = judge(reply(400, &long), &hubs()) else {
            panic!("a failure")
        };
        assert!(message.len() < 400 && message.ends_with('…'));
    }

    #[test]
    fn secrets_stay_out() {
        let doc = json!({
            "enrollmentGroupId": "g",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "k"}},
            "customAllocationDefinition": {"webhookUrl": "https://f.example/api/HttpTrigger1?code=s3cret", "apiVersion": "2021-10-01"},
        })
        .to_string();
        let redacted = redacted_enrollment(&doc);
        assert_eq!(redacted["attestation"], json!({"type": "symmetricKey"}));
        assert_eq!(
            redacted["customAllocationDefinition"]["webhookUrl"],
            "https://f.example/api/HttpTrigger1?****"
        );
        assert_eq!(
            loggable_url("https://f.example/api/alloc?code=s3cret"),
            "https://f.example/api/alloc"
        );
    }
}
