//! A hand-written IoT hub fake for provisioning tests: it keeps devices and twins per hub, records
//! every call, and fails calls on demand.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use dps_core::hub::{
    HubClient, HubDevice, HubError, HubTwin, IdentityWrite, ProbeAnswer, ProbeCall, TwinWrite,
};
use dps_core::linked_hub::LinkedHub;

/// What the fake hub holds and has seen.
#[derive(Default)]
struct State {
    devices: BTreeMap<(String, String), (HubDevice, HubTwin)>,
    calls: Vec<String>,
    failures: HashMap<String, (u32, Option<Refusal>)>,
}

/// An injected answer: HTTP status and `Retry-After`.
type Refusal = (u16, Option<Duration>);

/// An in-memory hub (or many, keyed by host name).
#[derive(Default)]
pub struct FakeHub {
    state: Mutex<State>,
}

impl FakeHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `times` calls to `hub` fail as if it did not answer.
    pub fn fail(&self, hub: &str, times: u32) {
        self.lock().failures.insert(hub.to_owned(), (times, None));
    }

    /// Makes the next `times` calls to `hub` answer HTTP `status`, with `Retry-After` if given.
    pub fn refuse(&self, hub: &str, times: u32, status: u16, retry_after: Option<Duration>) {
        self.lock()
            .failures
            .insert(hub.to_owned(), (times, Some((status, retry_after))));
    }

    /// The device and twin on `hub`, if any.
    pub fn device(&self, hub: &str, device_id: &str) -> Option<(HubDevice, HubTwin)> {
        self.lock()
            .devices
            .get(&(hub.to_owned(), device_id.to_owned()))
            .cloned()
    }

    /// Every device id on `hub`.
    pub fn device_ids(&self, hub: &str) -> Vec<String> {
        self.lock()
            .devices
            .keys()
            .filter(|(h, _)| h == hub)
            .map(|(_, d)| d.clone())
            .collect()
    }

    /// Every hub holding `device_id`.
    pub fn hubs_holding(&self, device_id: &str) -> Vec<String> {
        self.lock()
            .devices
            .keys()
            .filter(|(_, d)| d == device_id)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Overwrites a twin (as a service-side change would).
    pub fn set_twin(&self, hub: &str, device_id: &str, twin: HubTwin) {
        if let Some(entry) = self
            .lock()
            .devices
            .get_mut(&(hub.to_owned(), device_id.to_owned()))
        {
            entry.1 = twin;
        }
    }

    /// The calls made so far, as `operation hub device`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn enter(&self, op: &str, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        let mut state = self.lock();
        state
            .calls
            .push(format!("{op} {} {device_id}", hub.host_name));
        if let Some((left, answer)) = state
            .failures
            .get_mut(&hub.host_name)
            .filter(|(n, _)| *n > 0)
        {
            *left -= 1;
            return Err(match answer {
                None => HubError::Unreachable {
                    hub: hub.host_name.clone(),
                    reason: "injected failure".into(),
                },
                Some((status, retry_after)) => HubError::Refused {
                    hub: hub.host_name.clone(),
                    operation: "injected",
                    status: *status,
                    message: "injected refusal".into(),
                    retry_after: *retry_after,
                },
            });
        }
        Ok(())
    }
}

#[async_trait]
impl HubClient for FakeHub {
    async fn upsert_device(
        &self,
        hub: &LinkedHub,
        device: &HubDevice,
    ) -> Result<IdentityWrite, HubError> {
        self.enter("upsert", hub, &device.device_id)?;
        let key = (hub.host_name.clone(), device.device_id.clone());
        let mut state = self.lock();
        let (written, twin) = match state.devices.get(&key) {
            None => (IdentityWrite::Created, HubTwin::default()),
            Some((same, twin)) if same == device => (IdentityWrite::Unchanged, twin.clone()),
            Some((_, twin)) => (IdentityWrite::Updated, twin.clone()),
        };
        state.devices.insert(key, (device.clone(), twin));
        Ok(written)
    }

    async fn write_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
        mode: TwinWrite,
    ) -> Result<(), HubError> {
        let op = match mode {
            TwinWrite::Merge => "twin",
            TwinWrite::Replace => "replace-twin",
        };
        self.enter(op, hub, device_id)?;
        let mut state = self.lock();
        match state
            .devices
            .get_mut(&(hub.host_name.clone(), device_id.to_owned()))
        {
            Some(entry) if mode == TwinWrite::Replace => {
                entry.1 = twin.clone();
                Ok(())
            }
            Some(entry) => {
                entry.1.tags.extend(twin.tags.clone());
                entry.1.desired.extend(twin.desired.clone());
                Ok(())
            }
            None => Err(HubError::Refused {
                hub: hub.host_name.clone(),
                operation: "update twin",
                status: 404,
                message: "no device".into(),
                retry_after: None,
            }),
        }
    }

    async fn get_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
    ) -> Result<Option<HubTwin>, HubError> {
        self.enter("get", hub, device_id)?;
        Ok(self
            .lock()
            .devices
            .get(&(hub.host_name.clone(), device_id.to_owned()))
            .map(|(_, t)| t.clone()))
    }

    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError> {
        self.enter("delete", hub, device_id)?;
        self.lock()
            .devices
            .remove(&(hub.host_name.clone(), device_id.to_owned()));
        Ok(())
    }

    async fn probe_call(
        &self,
        hub: &LinkedHub,
        _call: ProbeCall,
        device_id: &str,
    ) -> Result<ProbeAnswer, HubError> {
        self.enter("probe", hub, device_id)?;
        Ok(ProbeAnswer::Allowed)
    }
}
