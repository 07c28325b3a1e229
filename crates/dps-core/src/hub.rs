//! The IoT hub seam: what provisioning needs from a hub (create the device identity, set its twin,
//! read it back for migration, delete it). The REST implementation lives in `dps-outbound`.

use std::time::Instant;

use async_trait::async_trait;

use crate::linked_hub::LinkedHub;
use crate::model::{InitialTwin, TwinCollection};
use crate::secret::Secret;

/// The identity DPS creates on a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDevice {
    /// Device id.
    pub device_id: String,
    /// Primary SAS key.
    pub primary_key: Secret,
    /// Secondary SAS key.
    pub secondary_key: Secret,
    /// IoT Edge capability.
    pub iot_edge: bool,
}

/// The parts of a twin that move with a device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HubTwin {
    /// Tags.
    pub tags: TwinCollection,
    /// Desired properties, without `$metadata`/`$version`.
    pub desired: TwinCollection,
}

impl HubTwin {
    /// The twin an enrollment's initial twin describes.
    pub fn from_initial(initial: Option<&InitialTwin>) -> Self {
        Self {
            tags: initial.and_then(|t| t.tags.clone()).unwrap_or_default(),
            desired: initial
                .and_then(|t| t.properties.as_ref())
                .and_then(|p| p.desired.clone())
                .unwrap_or_default(),
        }
    }

    /// Whether there is anything to write.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.desired.is_empty()
    }
}

/// A hub call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The hub could not be reached or did not answer in time.
    #[error("IoT hub {hub} did not answer: {reason}")]
    Unreachable {
        /// Hub host name.
        hub: String,
        /// What went wrong.
        reason: String,
    },
    /// The hub answered with an error status.
    #[error("IoT hub {hub} refused {operation} with HTTP {status}: {message}")]
    Refused {
        /// Hub host name.
        hub: String,
        /// What was attempted.
        operation: &'static str,
        /// HTTP status.
        status: u16,
        /// The hub's message (truncated).
        message: String,
    },
    /// The hub's connection string cannot be used.
    #[error("the connection string of linked hub {0} is not usable")]
    BadConnectionString(String),
}

/// Counts one call to a hub in `opendps_hub_calls_total` and its duration in
/// `opendps_hub_call_duration_seconds`: `via` is `rest` or `direct`, `status` the HTTP status (or
/// `error` when there was none).
pub fn record_call(via: &'static str, operation: &'static str, status: &str, started: Instant) {
    let labels = [
        ("operation", operation.to_owned()),
        ("status", status.to_owned()),
        ("via", via.to_owned()),
    ];
    metrics::counter!("opendps_hub_calls_total", &labels).increment(1);
    metrics::histogram!("opendps_hub_call_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
}

impl HubDevice {
    /// The device identity as the IoT Hub REST API takes it (`PUT /devices/{id}`).
    pub fn identity_document(&self) -> serde_json::Value {
        serde_json::json!({
            "deviceId": self.device_id,
            "status": "enabled",
            "authentication": {
                "type": "sas",
                "symmetricKey": {"primaryKey": self.primary_key.expose(), "secondaryKey": self.secondary_key.expose()},
            },
            "capabilities": {"iotEdge": self.iot_edge},
        })
    }
}

impl HubTwin {
    /// The twin patch as the IoT Hub REST API takes it (`PATCH /twins/{id}`).
    pub fn patch_document(&self) -> serde_json::Value {
        serde_json::json!({"tags": self.tags, "properties": {"desired": self.desired}})
    }

    /// A twin's user-visible tags and desired properties, from the hub's `tags` and
    /// `properties.desired` (leaving out the service's `$metadata` and `$version`).
    pub fn from_hub(tags: &serde_json::Value, desired: &serde_json::Value) -> Self {
        let user = |value: &serde_json::Value| -> TwinCollection {
            value
                .as_object()
                .map(|map| {
                    map.iter()
                        .filter(|(k, _)| !k.starts_with('$'))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            tags: user(tags),
            desired: user(desired),
        }
    }
}

/// Writes to IoT hubs.
#[async_trait]
pub trait HubClient: Send + Sync {
    /// Creates the device, or replaces its identity (keys, capabilities) if it exists.
    async fn upsert_device(&self, hub: &LinkedHub, device: &HubDevice) -> Result<(), HubError>;
    /// Writes tags and desired properties onto the device's twin.
    async fn update_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
    ) -> Result<(), HubError>;
    /// Reads the device's twin; `None` if the device does not exist.
    async fn get_twin(&self, hub: &LinkedHub, device_id: &str)
    -> Result<Option<HubTwin>, HubError>;
    /// Deletes the device; succeeds if it is already gone.
    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bookkeeping_is_stripped_from_twins() {
        let twin = HubTwin::from_hub(
            &json!({"deviceType": "toaster", "$etag": "x"}),
            &json!({"state": "ready", "$version": 4, "$metadata": {"x": 1}}),
        );
        assert_eq!(
            serde_json::Value::Object(twin.desired),
            json!({"state": "ready"})
        );
        assert_eq!(
            serde_json::Value::Object(twin.tags),
            json!({"deviceType": "toaster"})
        );
    }
}
