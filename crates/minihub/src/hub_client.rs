//! `DirectHubClient`: DPS's `HubClient` for hubs served in the same process, calling minihub
//! directly instead of over its REST API. It sends the same documents the REST client sends, so
//! the result on the hub is the same; it skips the loopback TLS connection, HTTP/2 and the JSON
//! round trip.

use std::sync::Arc;

use async_trait::async_trait;
use dps_core::hub::{
    HubClient, HubDevice, HubError, HubTwin, IdentityWrite, ProbeAnswer, ProbeCall, TwinWrite,
};
use dps_core::linked_hub::{ConnectionString, LinkedHub};
use serde_json::Value;

use crate::model::{AccessRight, DeviceRequest};
use crate::{IfMatch, Minihub, MinihubError};

/// Writes device identities and twins straight into an in-process [`Minihub`].
pub struct DirectHubClient {
    hub: Arc<Minihub>,
}

impl DirectHubClient {
    /// A client of `hub`'s virtual hubs, for DPS's provisioning, which commits the registration
    /// (or its rescheduled operation) after its hub writes: those are written through
    /// [`Minihub::flushed_with_callers_commit`].
    pub fn new(hub: Arc<Minihub>) -> Self {
        Self {
            hub: Arc::new(hub.flushed_with_callers_commit()),
        }
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
        retry_after: None,
    }
}

/// Records the call like the REST client does.
fn measured<T>(
    hub: &LinkedHub,
    operation: &'static str,
    started: std::time::Instant,
    result: &Result<T, MinihubError>,
) {
    let status = result
        .as_ref()
        .map_or_else(|e| e.http_status(), |_| http::StatusCode::OK);
    dps_core::hub::record_call(
        "direct",
        &hub.host_name,
        operation,
        status.as_str(),
        started,
    );
}

/// The rights each kind of call needs, as minihub's REST API requires them.
const WRITE_REGISTRY: &[AccessRight] = &[AccessRight::RegistryWrite];
const READ_REGISTRY: &[AccessRight] = &[AccessRight::RegistryRead, AccessRight::RegistryWrite];
const TWINS: &[AccessRight] = &[AccessRight::ServiceConnect];

/// Attempts at a read-modify-write of an identity that keeps changing under it.
const IDENTITY_WRITE_ATTEMPTS: usize = 3;

impl DirectHubClient {
    /// Refuses what the linked hub's policy would not be allowed over REST.
    fn authorize(
        &self,
        hub: &LinkedHub,
        operation: &'static str,
        rights: &[AccessRight],
    ) -> Result<(), HubError> {
        let conn = ConnectionString::parse(hub.connection_string.expose())
            .map_err(|_| HubError::BadConnectionString(hub.host_name.clone()))?;
        self.hub
            .authorize_policy(&hub.host_name, &conn.key_name, conn.key.expose(), rights)
            .map_err(|e| refused(hub, operation, &e))
    }
}

#[async_trait]
impl HubClient for DirectHubClient {
    async fn upsert_device(
        &self,
        hub: &LinkedHub,
        device: &HubDevice,
    ) -> Result<IdentityWrite, HubError> {
        self.authorize(hub, "create device", WRITE_REGISTRY)?;
        let request = |body: Value| -> Result<DeviceRequest, HubError> {
            serde_json::from_value(body).map_err(|e| {
                refused(
                    hub,
                    "create device",
                    &MinihubError::ArgumentInvalid(e.to_string()),
                )
            })
        };
        let mut last = None;
        for _ in 0..IDENTITY_WRITE_ATTEMPTS {
            let started = std::time::Instant::now();
            let created = self
                .hub
                .put_device(
                    &hub.host_name,
                    &device.device_id,
                    request(device.identity_document())?,
                    IfMatch::Absent,
                )
                .await;
            measured(hub, "create device", started, &created);
            match created {
                Ok(_) => return Ok(IdentityWrite::Created),
                Err(MinihubError::DeviceAlreadyExists(_)) => {}
                Err(err) => return Err(refused(hub, "create device", &err)),
            }
            // It exists: change only what DPS owns, under the identity's etag.
            let started = std::time::Instant::now();
            let existing = self.hub.get_device(&hub.host_name, &device.device_id).await;
            measured(hub, "read device", started, &existing);
            let Some(existing) = existing.map_err(|e| refused(hub, "read device", &e))? else {
                continue;
            };
            let as_json = serde_json::to_value(&existing).map_err(|e| {
                refused(
                    hub,
                    "read device",
                    &MinihubError::ArgumentInvalid(e.to_string()),
                )
            })?;
            let Some(updated) = device.updated_identity(&as_json) else {
                return Ok(IdentityWrite::Unchanged);
            };
            let started = std::time::Instant::now();
            let written = self
                .hub
                .put_device(
                    &hub.host_name,
                    &device.device_id,
                    request(updated)?,
                    IfMatch::Etag(existing.etag.clone()),
                )
                .await;
            measured(hub, "update device", started, &written);
            match written {
                Ok(_) => return Ok(IdentityWrite::Updated),
                // Changed or deleted since it was read: read it again.
                Err(
                    err @ (MinihubError::PreconditionFailed(_) | MinihubError::DeviceNotFound(_)),
                ) => last = Some(refused(hub, "update device", &err)),
                Err(err) => return Err(refused(hub, "update device", &err)),
            }
        }
        Err(last.unwrap_or_else(|| {
            refused(
                hub,
                "update device",
                &MinihubError::PreconditionFailed("the device kept changing".into()),
            )
        }))
    }

    async fn write_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
        mode: TwinWrite,
    ) -> Result<(), HubError> {
        let operation = match mode {
            TwinWrite::Merge => "update twin",
            TwinWrite::Replace => "replace twin",
        };
        self.authorize(hub, operation, TWINS)?;
        let body = twin.patch_document();
        let started = std::time::Instant::now();
        let result = match mode {
            TwinWrite::Merge => {
                self.hub
                    .patch_twin(&hub.host_name, device_id, &body, IfMatch::Any)
                    .await
            }
            TwinWrite::Replace => {
                self.hub
                    .replace_twin(&hub.host_name, device_id, &body, IfMatch::Any)
                    .await
            }
        };
        measured(hub, operation, started, &result);
        result.map(|_| ()).map_err(|e| refused(hub, operation, &e))
    }

    async fn get_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
    ) -> Result<Option<HubTwin>, HubError> {
        self.authorize(hub, "read twin", TWINS)?;
        let started = std::time::Instant::now();
        let result = self.hub.get_twin(&hub.host_name, device_id).await;
        measured(hub, "read twin", started, &result);
        let Some(twin) = result.map_err(|e| refused(hub, "read twin", &e))? else {
            return Ok(None);
        };
        Ok(Some(HubTwin::from_hub(
            &Value::Object(twin.tags),
            &Value::Object(twin.properties.desired),
        )))
    }

    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        self.authorize(hub, "delete device", WRITE_REGISTRY)?;
        let started = std::time::Instant::now();
        let result = self
            .hub
            .delete_device(&hub.host_name, device_id, IfMatch::Any)
            .await;
        measured(hub, "delete device", started, &result);
        match result {
            Ok(()) | Err(MinihubError::DeviceNotFound(_)) => Ok(()),
            Err(err) => Err(refused(hub, "delete device", &err)),
        }
    }

    async fn probe_call(
        &self,
        hub: &LinkedHub,
        call: ProbeCall,
        _device_id: &str,
    ) -> Result<ProbeAnswer, HubError> {
        let rights = match call {
            ProbeCall::DeleteDevice => WRITE_REGISTRY,
            ProbeCall::ReadDevice => READ_REGISTRY,
            ProbeCall::ReadTwin => TWINS,
        };
        // minihub hubs are all of the Standard tier: only the rights can be missing.
        match self.authorize(hub, call.describe(), rights) {
            Ok(()) => Ok(ProbeAnswer::Allowed),
            Err(HubError::Refused {
                status: 401,
                message,
                ..
            }) => Ok(ProbeAnswer::Unauthorized(message)),
            Err(other) => Err(other),
        }
    }
}
