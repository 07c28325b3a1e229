//! `DirectHubClient`: DPS's `HubClient` for hubs served in the same process, calling minihub
//! directly instead of over its REST API. It sends the same documents the REST client sends, so
//! the result on the hub is the same; it skips the loopback TLS connection, HTTP/2 and the JSON
//! round trip.

use std::sync::Arc;

use async_trait::async_trait;
use dps_core::hub::{HubClient, HubDevice, HubError, HubTwin};
use dps_core::linked_hub::LinkedHub;
use serde_json::Value;

use crate::{IfMatch, Minihub, MinihubError};

/// Writes device identities and twins straight into an in-process [`Minihub`].
pub struct DirectHubClient {
    hub: Arc<Minihub>,
}

impl DirectHubClient {
    /// A client of `hub`'s virtual hubs.
    pub fn new(hub: Arc<Minihub>) -> Self {
        Self { hub }
    }

    /// Whether `host_name` is one of the hubs served in-process.
    pub fn serves(&self, host_name: &str) -> bool {
        self.hub.hub(host_name).is_ok()
    }
}

fn refused(hub: &LinkedHub, operation: &'static str, err: &MinihubError) -> HubError {
    HubError::Refused {
        hub: hub.host_name.clone(),
        operation,
        status: err.http_status().as_u16(),
        message: err.to_string(),
    }
}

/// Records the call like the REST client does.
fn measured<T>(
    operation: &'static str,
    started: std::time::Instant,
    result: &Result<T, MinihubError>,
) {
    let status = result
        .as_ref()
        .map_or_else(|e| e.http_status(), |_| http::StatusCode::OK);
    dps_core::hub::record_call("direct", operation, status.as_str(), started);
}

#[async_trait]
impl HubClient for DirectHubClient {
    async fn upsert_device(&self, hub: &LinkedHub, device: &HubDevice) -> Result<(), HubError> {
        let body = device.identity_document();
        let request = serde_json::from_value(body).map_err(|e| {
            refused(
                hub,
                "create device",
                &MinihubError::ArgumentInvalid(e.to_string()),
            )
        })?;
        let started = std::time::Instant::now();
        // `*` creates the device or replaces its identity, keeping its twin.
        let result = self
            .hub
            .put_device(&hub.host_name, &device.device_id, request, IfMatch::Any)
            .await;
        measured("create device", started, &result);
        result
            .map(|_| ())
            .map_err(|e| refused(hub, "create device", &e))
    }

    async fn update_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
    ) -> Result<(), HubError> {
        let body = twin.patch_document();
        let started = std::time::Instant::now();
        let result = self
            .hub
            .patch_twin(&hub.host_name, device_id, &body, IfMatch::Any)
            .await;
        measured("update twin", started, &result);
        result
            .map(|_| ())
            .map_err(|e| refused(hub, "update twin", &e))
    }

    async fn get_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
    ) -> Result<Option<HubTwin>, HubError> {
        let started = std::time::Instant::now();
        let result = self.hub.get_twin(&hub.host_name, device_id).await;
        measured("read twin", started, &result);
        let Some(twin) = result.map_err(|e| refused(hub, "read twin", &e))? else {
            return Ok(None);
        };
        Ok(Some(HubTwin::from_hub(
            &Value::Object(twin.tags),
            &Value::Object(twin.properties.desired),
        )))
    }

    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        let started = std::time::Instant::now();
        let result = self
            .hub
            .delete_device(&hub.host_name, device_id, IfMatch::Any)
            .await;
        measured("delete device", started, &result);
        match result {
            Ok(()) | Err(MinihubError::DeviceNotFound(_)) => Ok(()),
            Err(err) => Err(refused(hub, "delete device", &err)),
        }
    }
}
