//! Whatever a custom-allocation webhook answers (any status, any body) is judged into allocate,
//! fail or retry without panicking; an allocation always names one of the offered linked hubs, and
//! what it hands on (initial twin, payload) serializes again.
//!
//! Input: the status as two big-endian bytes, then the body.

#![no_main]

use std::time::Duration;

use dps_core::webhook::{TraceAttempt, Verdict, WebhookReply, judge};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [high, low, body @ ..] = data else {
        return;
    };
    let linked_hubs = [
        "hub-1.azure-devices.net".to_owned(),
        "Contoso-Hub-2.example".to_owned(),
    ];
    let reply = Ok(WebhookReply {
        status: u16::from_be_bytes([*high, *low]),
        body: body.to_vec(),
    });
    let _ = TraceAttempt::of(
        &reply,
        "2026-01-01T00:00:00Z".into(),
        Duration::from_millis(7),
    );
    match judge(reply, &linked_hubs) {
        Verdict::Allocate(response) => {
            let hub = response.iot_hub_host_name.as_deref().map(str::trim);
            assert!(
                hub.is_some_and(|hub| linked_hubs.iter().any(|l| l.eq_ignore_ascii_case(hub))),
                "allocated to {hub:?}, not a linked hub"
            );
            serde_json::to_vec(&response.initial_twin).expect("the initial twin serializes");
            serde_json::to_vec(&response.payload).expect("the payload serializes");
        }
        Verdict::Fail { code, message } => {
            assert!((400_207..=400_209).contains(&code), "code {code}");
            assert!(!message.is_empty());
        }
        Verdict::Retry(reason) => assert!(!reason.is_empty()),
    }
});
