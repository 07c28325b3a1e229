//! The register-and-poll loop every transport shares, and the one `Retry-After` rule.

use std::time::Duration;

use anyhow::Context as _;
use dps_core::device::RegistrationOperationStatus;
use dps_core::model::EnrollmentStatus;
use serde_json::Value;

/// Polls wait this long when the service names no usable `Retry-After` (the default of the C#,
/// Node and Python SDKs, and what opendps itself sends).
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The wait a `Retry-After` header (HTTPS) or `retry-after` topic property (MQTT) asks for: whole
/// seconds from 1 to 300, as the C SDK accepts them; anything else means [`DEFAULT_RETRY_AFTER`].
pub fn retry_after(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|secs| (1..=300).contains(secs))
        .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs)
}

/// One answer of the service: its status, the wait it asked for, and its JSON body (`null` when
/// there was none or it was not JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status, or the status in the MQTT response topic.
    pub status: u16,
    /// See [`retry_after`].
    pub retry_after: Duration,
    /// The body.
    pub body: Value,
}

/// A device's two requests to DPS over one transport.
#[allow(async_fn_in_trait)] // used with concrete types only, never as `dyn`
pub trait DeviceExchange {
    /// The register request with its `DeviceRegistration` body.
    async fn register(&mut self, body: &Value) -> anyhow::Result<Reply>;
    /// A poll of the operation.
    async fn poll(&mut self, operation_id: &str) -> anyhow::Result<Reply>;
}

/// How a registration ended for the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// The operation finished: assigned, failed or disabled.
    Finished(Box<RegistrationOperationStatus>),
    /// A request was refused (401, 400, …): its status and error body.
    Refused {
        /// HTTP status (or MQTT response status).
        status: u16,
        /// The `ProvisioningServiceErrorDetails` body, as sent.
        reply: Value,
    },
    /// Waiting for the next poll would pass the deadline.
    TimedOut,
}

/// Registers and polls until the operation ends, as the SDKs do: between polls it waits
/// `poll_every`, or else the `Retry-After` the service sent. Reports progress through `say` in
/// the words of the C SDK's `prov_dev_client_sample`. Returns how it ended and how long the device
/// waited between polls.
pub async fn register_and_poll(
    link: &mut impl DeviceExchange,
    body: &Value,
    poll_every: Option<Duration>,
    deadline: tokio::time::Instant,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<(Ended, Duration)> {
    let mut waited = Duration::ZERO;
    let mut reply = link.register(body).await?;
    say("Provisioning Status: PROV_DEVICE_REG_STATUS_CONNECTED");
    // 202, or 200 as the REST specification also allows; the body may already be final, when the
    // service answered after the registration finished.
    if !(reply.status == 200 || reply.status == 202) {
        return Ok((refused(reply), waited));
    }
    let mut operation = status_of(&reply)?;
    while operation.status == EnrollmentStatus::Assigning {
        say("Provisioning Status: PROV_DEVICE_REG_STATUS_ASSIGNING");
        let wait = poll_every.unwrap_or(reply.retry_after);
        if tokio::time::Instant::now() + wait > deadline {
            return Ok((Ended::TimedOut, waited));
        }
        tokio::time::sleep(wait).await;
        waited += wait;
        reply = link.poll(&operation.operation_id).await?;
        if !(reply.status == 200 || reply.status == 202) {
            return Ok((refused(reply), waited));
        }
        operation = status_of(&reply)?;
    }
    Ok((Ended::Finished(Box::new(operation)), waited))
}

fn refused(reply: Reply) -> Ended {
    Ended::Refused {
        status: reply.status,
        reply: reply.body,
    }
}

fn status_of(reply: &Reply) -> anyhow::Result<RegistrationOperationStatus> {
    serde_json::from_value(reply.body.clone()).with_context(|| {
        format!(
            "the service answered {} with a body that is not a RegistrationOperationStatus: {}",
            reply.status, reply.body
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_retry_after_rule() {
        assert_eq!(retry_after(Some("3")), Duration::from_secs(3));
        assert_eq!(retry_after(Some(" 300 ")), Duration::from_secs(300));
        for unusable in [
            None,
            Some("0"),
            Some("301"),
            Some("-1"),
            Some("soon"),
            Some(""),
        ] {
            assert_eq!(retry_after(unusable), DEFAULT_RETRY_AFTER, "{unusable:?}");
        }
    }

    /// A scripted service: the register answer, then one answer per poll.
    struct Scripted(Vec<Reply>);

    impl DeviceExchange for Scripted {
        async fn register(&mut self, _: &Value) -> anyhow::Result<Reply> {
            Ok(self.0.remove(0))
        }
        async fn poll(&mut self, operation_id: &str) -> anyhow::Result<Reply> {
            assert_eq!(operation_id, "op-1");
            Ok(self.0.remove(0))
        }
    }

    fn reply(status: u16, secs: u64, body: Value) -> Reply {
        Reply {
            status,
            retry_after: Duration::from_secs(secs),
            body,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn polls_after_each_retry_after_until_terminal() {
        let assigning = json!({"operationId": "op-1", "status": "assigning"});
        let mut link = Scripted(vec![
            reply(202, 3, assigning.clone()),
            reply(202, 5, assigning),
            reply(
                200,
                2,
                json!({"operationId": "op-1", "status": "assigned", "registrationState": {"registrationId": "d", "status": "assigned", "assignedHub": "h", "deviceId": "d"}}),
            ),
        ]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (ended, waited) = register_and_poll(&mut link, &json!({}), None, deadline, &|_| {})
            .await
            .expect("runs");
        assert_eq!(
            waited,
            Duration::from_secs(8),
            "3 s, then 5 s, as the service asked"
        );
        let Ended::Finished(done) = ended else {
            panic!("{ended:?}")
        };
        assert_eq!(done.status, EnrollmentStatus::Assigned);
        assert_eq!(
            done.registration_state
                .and_then(|s| s.assigned_hub)
                .as_deref(),
            Some("h")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_and_deadlines_end_the_loop() {
        let mut link = Scripted(vec![reply(401, 2, json!({"errorCode": 401_002}))]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (ended, _) = register_and_poll(&mut link, &json!({}), None, deadline, &|_| {})
            .await
            .expect("runs");
        assert!(
            matches!(ended, Ended::Refused { status: 401, .. }),
            "{ended:?}"
        );

        let assigning = json!({"operationId": "op-1", "status": "assigning"});
        let mut link = Scripted(vec![reply(202, 30, assigning)]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (ended, _) = register_and_poll(&mut link, &json!({}), None, deadline, &|_| {})
            .await
            .expect("runs");
        assert_eq!(ended, Ended::TimedOut);
    }
}
