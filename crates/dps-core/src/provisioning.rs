//! Device registration: authenticate the device, durably record an operation, and (in a worker)
//! drive it to `assigned`, `failed` or `disabled`: allocation, the hub write, reprovisioning, and
//! the registration state.
//!
//! Failures before authentication completes are errors (401, 400, 404). Failures after it are data:
//! a terminal `failed` status with an error code, read by polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::allocation::{self, AllocationError};
use crate::clock::Clock;
use crate::device::{
    DeviceRegistration, DeviceRegistrationResult, RegistrationOperationStatus,
    SymmetricKeyRegistrationResult,
};
use crate::error::ProvisioningError;
use crate::hub::{HubClient, HubDevice, HubError, HubTwin};
use crate::ids::{Etag, IdScope, RegistrationId};
use crate::linked_hub::LinkedHub;
use crate::model::{
    AllocationPolicy, AssignedDeviceSubstatus, AttestationType, DeviceRegistrationState,
    EnrollmentGroup, EnrollmentStatus, IndividualEnrollment, InitialTwin, ProvisioningStatus,
    ReprovisionPolicy,
};
use crate::sas::{self, SasToken};
use crate::secret::Secret;
use crate::store::{EnrollmentKind, Precondition, Store, StoreError, StoredDoc, StoredOperation};
use crate::time::format_utc;
use crate::webhook::{
    self, AllocationTrace, CUSTOM_ALLOCATION_FAILED, DeviceRuntimeContext, TraceAttempt, Verdict,
    WebhookClient, WebhookError,
};

/// Error code of a registration whose enrollment disappeared while it was being processed.
const ENROLLMENT_GONE: i32 = 404_202;
/// Error code of a registration that failed because a hub refused or did not answer.
const HUB_WRITE_FAILED: i32 = 500_002;

/// Settings of device registration.
#[derive(Debug, Clone)]
pub struct ProvisioningSettings {
    /// `Retry-After` sent while an operation is assigning, in seconds.
    pub retry_after_secs: u32,
    /// Clock difference tolerated on device token expiry, in seconds.
    pub sas_clock_skew_secs: i64,
    /// Largest custom payload a device may send, in bytes of JSON.
    pub max_payload_bytes: usize,
    /// The policy of enrollments that set none.
    pub default_allocation_policy: AllocationPolicy,
    /// This node's region label, for `geoLatency`.
    pub region: Option<String>,
    /// Attempts at writing to a hub before the registration fails.
    pub hub_attempts: u32,
    /// Delay before the second attempt, in milliseconds; doubled for each further attempt.
    pub hub_retry_ms: i64,
    /// How long an allocation webhook may take to answer.
    pub webhook_timeout: std::time::Duration,
    /// Retries of a webhook that answers 429 or above, 5xx included (DPS: 10).
    pub webhook_retries: u32,
    /// Delay before the first webhook retry, in milliseconds (DPS: 1 s).
    pub webhook_first_retry_ms: i64,
    /// Added to the delay for each further retry, in milliseconds (DPS: 9 s).
    pub webhook_retry_increment_ms: i64,
}

impl Default for ProvisioningSettings {
    fn default() -> Self {
        Self {
            retry_after_secs: 2,
            sas_clock_skew_secs: 300,
            max_payload_bytes: 64 * 1024,
            default_allocation_policy: AllocationPolicy::Hashed,
            region: None,
            hub_attempts: 3,
            hub_retry_ms: 1000,
            webhook_timeout: std::time::Duration::from_secs(30),
            webhook_retries: 10,
            webhook_first_retry_ms: 1000,
            webhook_retry_increment_ms: 9000,
        }
    }
}

/// Which enrollment a device registered through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentRef {
    /// `true` for an enrollment group.
    pub group: bool,
    /// Registration id or group id.
    pub id: String,
}

/// A registration operation as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Opaque id the device polls with.
    pub operation_id: String,
    /// The device's registration id.
    pub registration_id: String,
    /// The enrollment it authenticated against.
    pub enrollment: EnrollmentRef,
    /// The device's custom payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// `assigning` until terminal.
    pub status: EnrollmentStatus,
    /// The result once terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<DeviceRegistrationResult>,
    /// Hub write attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// Webhook retries made so far (after answers of 429 or above).
    #[serde(default)]
    pub webhook_retries: u32,
    /// What the webhook was asked and answered, across retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<AllocationTrace>,
    /// When the device asked.
    pub created_date_time_utc: String,
    /// How the device asked (for metrics).
    #[serde(default)]
    pub transport: Transport,
}

/// The device API a registration came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The device REST API over HTTPS.
    #[default]
    Https,
    /// MQTT over TLS.
    Mqtt,
}

impl Transport {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Mqtt => "mqtt",
        }
    }
}

/// The registration state as stored: the API view plus what reprovisioning needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    /// What the service API shows.
    #[serde(flatten)]
    pub state: DeviceRegistrationState,
    /// The first hub the device was ever assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_hub: Option<String>,
    /// The group the device registered through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The allocation trace of the last registration that asked a webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_trace: Option<AllocationTrace>,
}

/// Device registration.
pub struct Provisioning {
    store: Arc<dyn Store>,
    hubs: Arc<dyn HubClient>,
    webhooks: Arc<dyn WebhookClient>,
    clock: Arc<dyn Clock>,
    id_scope: IdScope,
    settings: ProvisioningSettings,
    wake: Box<dyn Fn() + Send + Sync>,
    /// Parsed enrollment groups by etag, for authentication.
    group_auth: Mutex<HashMap<String, Arc<GroupAuth>>>,
}

/// An enrollment group as authentication sees it: its id and decoded symmetric keys (none for
/// other attestation types).
struct GroupAuth {
    id: String,
    keys: Vec<Vec<u8>>,
}

/// Versions of groups kept parsed; the cache starts over past this many.
const GROUP_AUTH_CACHE: usize = 4096;

impl Provisioning {
    /// Registration for `id_scope`, writing to hubs through `hubs` and asking custom-allocation
    /// webhooks through `webhooks`. `wake` is called after an operation is recorded, so the worker
    /// picks it up without waiting for its next scan.
    pub fn new(
        store: Arc<dyn Store>,
        hubs: Arc<dyn HubClient>,
        webhooks: Arc<dyn WebhookClient>,
        clock: Arc<dyn Clock>,
        id_scope: IdScope,
        settings: ProvisioningSettings,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            store,
            hubs,
            webhooks,
            clock,
            id_scope,
            settings,
            wake,
            group_auth: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds a device should wait before polling.
    pub fn retry_after_secs(&self) -> u32 {
        self.settings.retry_after_secs
    }

    /// `PUT /{idScope}/registrations/{registrationId}/register`: authenticates the device and records
    /// an `assigning` operation before answering.
    pub async fn register(
        &self,
        transport: Transport,
        scope: &str,
        registration_id: &str,
        body: DeviceRegistration,
        sas: Option<&str>,
    ) -> Result<RegistrationOperationStatus, ProvisioningError> {
        let rid = RegistrationId::parse(registration_id)?;
        if let Some(in_body) = body.registration_id.as_deref().filter(|b| !b.is_empty())
            && !in_body.eq_ignore_ascii_case(rid.as_str())
        {
            return Err(ProvisioningError::InvalidArgument(format!(
                "The registrationId in the body ('{in_body}') differs from the one in the request ('{rid}')."
            )));
        }
        let attested = match self.authenticate(scope, &rid, sas).await {
            Ok(attested) => attested,
            Err(err) => {
                metrics::counter!("opendps_registrations_total", "transport" => transport.as_str(), "outcome" => "refused").increment(1);
                return Err(err);
            }
        };
        let payload = body.payload.filter(|p| !p.is_null());
        if let Some(size) = payload
            .as_ref()
            .map(|p| p.to_string().len())
            .filter(|size| *size > self.settings.max_payload_bytes)
        {
            metrics::counter!("opendps_registrations_total", "transport" => transport.as_str(), "outcome" => "refused").increment(1);
            return Err(ProvisioningError::InvalidArgument(format!(
                "The payload is {size} bytes of JSON; this service takes at most {} (provisioning.max_payload_bytes).",
                self.settings.max_payload_bytes
            )));
        }
        let now = self.clock.now();
        let op = Operation {
            operation_id: new_operation_id(),
            registration_id: rid.as_str().to_owned(),
            enrollment: attested,
            payload,
            status: EnrollmentStatus::Assigning,
            result: None,
            attempts: 0,
            webhook_retries: 0,
            trace: None,
            created_date_time_utc: format_utc(now),
            transport,
        };
        self.save_operation(&op, now.as_millisecond()).await?;
        metrics::counter!("opendps_operations_accepted_total", "transport" => transport.as_str())
            .increment(1);
        (self.wake)();
        Ok(RegistrationOperationStatus {
            operation_id: op.operation_id,
            status: EnrollmentStatus::Assigning,
            registration_state: None,
        })
    }

    /// `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
    pub async fn operation_status(
        &self,
        scope: &str,
        registration_id: &str,
        operation_id: &str,
        sas: Option<&str>,
    ) -> Result<RegistrationOperationStatus, ProvisioningError> {
        let rid = RegistrationId::parse(registration_id)?;
        self.check_token(scope, &rid, sas)?;
        let stored = self
            .store
            .get_operation(operation_id)
            .await?
            .filter(|op| op.registration_key == rid.key());
        let Some(stored) = stored else {
            // Only an authenticated device learns that an operation does not exist.
            self.authenticate(scope, &rid, sas).await?;
            return Err(ProvisioningError::NotFound(format!(
                "The operation '{operation_id}' does not exist for '{rid}'."
            )));
        };
        let op: Operation = parse(&stored.doc)?;
        self.authenticate_as(scope, &rid, sas, &op.enrollment)
            .await?;
        Ok(RegistrationOperationStatus {
            operation_id: op.operation_id,
            status: op.status,
            registration_state: op.result,
        })
    }

    /// `POST /{idScope}/registrations/{registrationId}`: the device's current registration state.
    pub async fn registration_status(
        &self,
        scope: &str,
        registration_id: &str,
        sas: Option<&str>,
    ) -> Result<DeviceRegistrationResult, ProvisioningError> {
        let rid = RegistrationId::parse(registration_id)?;
        self.authenticate(scope, &rid, sas).await?;
        let (record, _) = self.registration(&rid.key()).await?.ok_or_else(|| {
            ProvisioningError::NotFound(format!("The device '{rid}' has not registered."))
        })?;
        Ok(result_of(&record))
    }

    /// Checks the token's form, resource and expiry; the signature is checked against enrollments.
    fn check_token(
        &self,
        scope: &str,
        rid: &RegistrationId,
        sas: Option<&str>,
    ) -> Result<SasToken, ProvisioningError> {
        let unauthorized = |why: &str| ProvisioningError::Unauthorized(why.to_owned());
        if !scope.eq_ignore_ascii_case(self.id_scope.as_str()) {
            return Err(unauthorized("the ID scope is not served here"));
        }
        let text = sas.ok_or_else(|| {
            unauthorized("no SharedAccessSignature was sent; this service supports symmetric-key attestation for devices")
        })?;
        let token = SasToken::parse(text).map_err(|e| unauthorized(&e.to_string()))?;
        let expected = format!("{scope}/registrations/{rid}");
        if !token.audience().eq_ignore_ascii_case(&expected) {
            return Err(unauthorized(&format!(
                "the token's resource '{}' is not '{expected}'",
                token.audience()
            )));
        }
        token
            .check_expiry(
                self.clock.now().as_second(),
                self.settings.sas_clock_skew_secs,
            )
            .map_err(|e| unauthorized(&e.to_string()))?;
        Ok(token)
    }

    /// Whether `token` was signed with a key of the group, derived for this device.
    fn signed_by_group(token: &SasToken, group: &GroupAuth, rid: &RegistrationId) -> bool {
        let derived: Vec<Vec<u8>> = group
            .keys
            .iter()
            .map(|k| sas::derive_device_key_bytes(k, rid.as_str()))
            .collect();
        !derived.is_empty() && verify(token, &derived).is_ok()
    }

    /// The parsed group with this etag, if it was seen before.
    fn cached_group(&self, etag: &Etag) -> Option<Arc<GroupAuth>> {
        let cache = self.group_auth.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(etag.as_str()).map(Arc::clone)
    }

    /// What authentication needs of a stored group, parsed once per version of it (its etag).
    fn group_auth(&self, doc: &StoredDoc) -> Result<Arc<GroupAuth>, ProvisioningError> {
        if let Some(hit) = self.cached_group(&doc.etag) {
            return Ok(hit);
        }
        let group: EnrollmentGroup = parse(&doc.doc)?;
        let mut cache = self.group_auth.lock().unwrap_or_else(|e| e.into_inner());
        let auth = Arc::new(GroupAuth {
            id: group.enrollment_group_id,
            keys: symmetric_keys(&group.attestation).unwrap_or_default(),
        });
        if cache.len() >= GROUP_AUTH_CACHE {
            cache.clear();
        }
        cache.insert(doc.etag.as_str().to_owned(), Arc::clone(&auth));
        Ok(auth)
    }

    /// Finds the enrollment the device's token was signed for. An individual enrollment takes
    /// precedence; otherwise every symmetric-key group is tried with the key derived for this device
    /// (the group key itself never verifies).
    async fn authenticate(
        &self,
        scope: &str,
        rid: &RegistrationId,
        sas: Option<&str>,
    ) -> Result<EnrollmentRef, ProvisioningError> {
        let token = self.check_token(scope, rid, sas)?;
        let unauthorized = |why: &str| ProvisioningError::Unauthorized(why.to_owned());
        let key = rid.key();
        if let Some(doc) = self
            .store
            .get_enrollment(EnrollmentKind::Individual, &key)
            .await?
        {
            let enrollment: IndividualEnrollment = parse(&doc.doc)?;
            let keys = symmetric_keys(&enrollment.attestation).ok_or_else(|| {
                unauthorized("the device's enrollment does not use symmetric-key attestation")
            })?;
            verify(&token, &keys)
                .map_err(|_| unauthorized("the signature does not match the enrollment's keys"))?;
            return Ok(EnrollmentRef {
                group: false,
                id: enrollment.registration_id,
            });
        }
        let hint = self
            .registration(&key)
            .await?
            .and_then(|(r, _)| r.enrollment_group_id);
        let mut groups = Vec::new();
        for (key, etag) in self
            .store
            .enrollment_versions(EnrollmentKind::Group)
            .await?
        {
            if let Some(known) = self.cached_group(&etag) {
                groups.push(known);
            } else if let Some(doc) = self
                .store
                .get_enrollment(EnrollmentKind::Group, &key)
                .await?
            {
                groups.push(self.group_auth(&doc)?);
            }
        }
        // The group the device used last time first: it is almost always the one.
        groups.sort_by_key(|g| Some(&g.id) != hint.as_ref());
        match groups
            .into_iter()
            .find(|g| Self::signed_by_group(&token, g, rid))
        {
            Some(group) => Ok(EnrollmentRef {
                group: true,
                id: group.id.clone(),
            }),
            None => Err(unauthorized(
                "no enrollment matches this registration id and key",
            )),
        }
    }

    /// Authenticates a device that registered through `enrollment` (a poll): only that enrollment is
    /// checked, unless it no longer accepts the token (deleted, keys rolled, overridden by a new
    /// individual enrollment), in which case the full search decides.
    async fn authenticate_as(
        &self,
        scope: &str,
        rid: &RegistrationId,
        sas: Option<&str>,
        enrollment: &EnrollmentRef,
    ) -> Result<(), ProvisioningError> {
        let token = self.check_token(scope, rid, sas)?;
        let kind = if enrollment.group {
            EnrollmentKind::Group
        } else {
            EnrollmentKind::Individual
        };
        if let Some(doc) = self
            .store
            .get_enrollment(kind, &enrollment.id.to_ascii_lowercase())
            .await?
        {
            let accepted = if enrollment.group {
                let overridden = self
                    .store
                    .get_enrollment(EnrollmentKind::Individual, &rid.key())
                    .await?
                    .is_some();
                !overridden && Self::signed_by_group(&token, &*self.group_auth(&doc)?, rid)
            } else {
                let e: IndividualEnrollment = parse(&doc.doc)?;
                symmetric_keys(&e.attestation).is_some_and(|keys| verify(&token, &keys).is_ok())
            };
            if accepted {
                return Ok(());
            }
        }
        self.authenticate(scope, rid, sas).await.map(drop)
    }

    async fn registration(
        &self,
        key: &str,
    ) -> Result<Option<(RegistrationRecord, Etag)>, ProvisioningError> {
        match self.store.get_registration(key).await? {
            Some(doc) => Ok(Some((parse(&doc.doc)?, doc.etag))),
            None => Ok(None),
        }
    }

    async fn save_operation(
        &self,
        op: &Operation,
        next_attempt_ms: i64,
    ) -> Result<(), ProvisioningError> {
        let stored = StoredOperation {
            operation_id: op.operation_id.clone(),
            registration_key: op.registration_id.to_ascii_lowercase(),
            pending: !op.status.is_terminal(),
            next_attempt_ms,
            doc: serde_json::to_string(op)
                .map_err(|e| ProvisioningError::Internal(e.to_string()))?,
        };
        Ok(self.store.put_operation(&stored).await?)
    }

    /// Works on one claimed operation: finishes it, or reschedules it after a hub failure. Errors
    /// are storage failures; the lease then expires and the operation is claimed again.
    pub async fn process(
        &self,
        stored: &StoredOperation,
    ) -> Result<EnrollmentStatus, ProvisioningError> {
        let mut op: Operation = parse(&stored.doc)?;
        if op.status.is_terminal() {
            return Ok(op.status);
        }
        loop {
            match self.attempt(&mut op).await {
                Ok(write) => match self.finish(&mut op, write).await? {
                    Some(status) => return Ok(status),
                    // Another registration of the same device finished first: decide again.
                    None => continue,
                },
                Err(Failure::Retry(err)) if op.attempts + 1 < self.settings.hub_attempts => {
                    op.attempts += 1;
                    let delay = self
                        .settings
                        .hub_retry_ms
                        .saturating_mul(1 << (op.attempts - 1).min(16));
                    tracing::warn!(operation = %op.operation_id, attempt = op.attempts, %err, "hub write failed; will retry");
                    self.save_operation(&op, self.clock.now().as_millisecond() + delay)
                        .await?;
                    return Ok(EnrollmentStatus::Assigning);
                }
                Err(Failure::Retry(err)) => {
                    let write = self
                        .unassigned_record(&op, Some((HUB_WRITE_FAILED, err.to_string())))
                        .await?;
                    return self.finish_unassigned(&mut op, write).await;
                }
                Err(Failure::Final { code, message }) => {
                    let write = self.unassigned_record(&op, Some((code, message))).await?;
                    return self.finish_unassigned(&mut op, write).await;
                }
                Err(Failure::WebhookRetry(reason))
                    if op.webhook_retries < self.settings.webhook_retries =>
                {
                    op.webhook_retries += 1;
                    let delay = self.settings.webhook_first_retry_ms
                        + self.settings.webhook_retry_increment_ms
                            * i64::from(op.webhook_retries - 1);
                    tracing::info!(operation = %op.operation_id, retry = op.webhook_retries, delay_ms = delay, %reason, "allocation webhook busy; will ask again");
                    self.save_operation(&op, self.clock.now().as_millisecond() + delay)
                        .await?;
                    return Ok(EnrollmentStatus::Assigning);
                }
                Err(Failure::WebhookRetry(reason)) => {
                    let message = format!(
                        "Custom allocation failed after {} retries: {reason}",
                        op.webhook_retries
                    );
                    let write = self
                        .unassigned_record(&op, Some((CUSTOM_ALLOCATION_FAILED, message)))
                        .await?;
                    return self.finish_unassigned(&mut op, write).await;
                }
                Err(Failure::Disabled) => {
                    let write = self.unassigned_record(&op, None).await?;
                    return self.finish_unassigned(&mut op, write).await;
                }
                Err(Failure::Store(err)) => return Err(err),
            }
        }
    }

    /// A failed or disabled registration: its state is recorded with the operation, unless a
    /// concurrent registration of the device recorded a newer outcome, which is kept.
    async fn finish_unassigned(
        &self,
        op: &mut Operation,
        write: RecordWrite,
    ) -> Result<EnrollmentStatus, ProvisioningError> {
        let (done, stored_op) = self.finished(op, &write.record)?;
        match self.record(&stored_op, &write).await {
            Err(StoreError::AlreadyExists(_) | StoreError::EtagMismatch(_)) => {
                self.store.put_operation(&stored_op).await?;
            }
            written => written?,
        }
        Ok(self.complete(op, done, &write.record))
    }

    /// An assigned registration: its state and the finished operation in one store write. `None`
    /// when the state lost a race with another registration of the device (nothing was written):
    /// the caller decides again from the winner's result.
    async fn finish(
        &self,
        op: &mut Operation,
        write: RecordWrite,
    ) -> Result<Option<EnrollmentStatus>, ProvisioningError> {
        let (done, stored_op) = self.finished(op, &write.record)?;
        match self.record(&stored_op, &write).await {
            Err(StoreError::AlreadyExists(_) | StoreError::EtagMismatch(_)) => Ok(None),
            written => {
                written?;
                Ok(Some(self.complete(op, done, &write.record)))
            }
        }
    }

    /// The operation as it is once `record` is its outcome, and its stored form.
    fn finished(
        &self,
        op: &Operation,
        record: &RegistrationRecord,
    ) -> Result<(Operation, StoredOperation), ProvisioningError> {
        let mut done = op.clone();
        done.status = record.state.status;
        done.result = Some(result_of(record));
        // The trace now lives in the registration record; polls need only the result.
        done.trace = None;
        let stored = StoredOperation {
            operation_id: done.operation_id.clone(),
            registration_key: done.registration_id.to_ascii_lowercase(),
            pending: false,
            next_attempt_ms: self.clock.now().as_millisecond(),
            doc: serde_json::to_string(&done)
                .map_err(|e| ProvisioningError::Internal(e.to_string()))?,
        };
        Ok((done, stored))
    }

    /// Writes the registration state under its precondition together with the operation.
    async fn record(&self, op: &StoredOperation, write: &RecordWrite) -> Result<(), StoreError> {
        let doc =
            serde_json::to_string(&write.record).map_err(|e| StoreError::Backend(e.to_string()))?;
        let group_key = write
            .record
            .enrollment_group_id
            .as_deref()
            .map(str::to_ascii_lowercase);
        self.store
            .put_registration_and_operation(
                &op.registration_key,
                group_key.as_deref(),
                StoredDoc {
                    etag: write.etag.clone(),
                    doc,
                },
                write.cond.clone(),
                op,
            )
            .await
    }

    /// The operation is finished: metrics and the log line.
    fn complete(
        &self,
        op: &mut Operation,
        done: Operation,
        record: &RegistrationRecord,
    ) -> EnrollmentStatus {
        *op = done;
        let outcome = match op.status {
            EnrollmentStatus::Assigned => "assigned",
            EnrollmentStatus::Disabled => "disabled",
            _ => "failed",
        };
        let labels = [("transport", op.transport.as_str()), ("outcome", outcome)];
        metrics::counter!("opendps_registrations_total", &labels).increment(1);
        if let Ok(created) = op.created_date_time_utc.parse::<jiff::Timestamp>() {
            let took = self.clock.now().duration_since(created);
            metrics::histogram!("opendps_registration_duration_seconds", &labels)
                .record(took.as_secs_f64().max(0.0));
        }
        tracing::info!(
            operation = %op.operation_id,
            registration_id = %op.registration_id,
            status = ?op.status,
            hub = record.state.assigned_hub.as_deref().unwrap_or("-"),
            error_code = record.state.error_code.unwrap_or(0),
            "registration finished"
        );
        op.status
    }

    /// A `failed` (with the error) or `disabled` (without) registration state, keeping what the
    /// device had before (its current hub).
    async fn unassigned_record(
        &self,
        op: &Operation,
        error: Option<(i32, String)>,
    ) -> Result<RecordWrite, ProvisioningError> {
        let key = op.registration_id.to_ascii_lowercase();
        let previous = self.registration(&key).await?;
        let now = format_utc(self.clock.now());
        let mut record = previous
            .as_ref()
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| self.new_record(op, &now));
        record.state.status = if error.is_some() {
            EnrollmentStatus::Failed
        } else {
            EnrollmentStatus::Disabled
        };
        record.allocation_trace = op.trace.clone().map(|mut trace| {
            trace.decision = Some(match &error {
                Some((code, message)) => {
                    serde_json::json!({"errorCode": code, "errorMessage": message})
                }
                None => serde_json::json!({"status": "disabled"}),
            });
            trace
        });
        record.state.error_code = error.as_ref().map(|(code, _)| *code);
        record.state.error_message = error.map(|(_, message)| message);
        record.state.substatus = None;
        record.state.payload = None;
        record.state.last_updated_date_time_utc = Some(now);
        record.enrollment_group_id = op.enrollment.group.then(|| op.enrollment.id.clone());
        let etag = Etag::generate();
        record.state.etag = Some(etag.as_str().to_owned());
        let cond = previous.map_or(Precondition::MustNotExist, |(_, e)| Precondition::EtagIs(e));
        Ok(RecordWrite { record, etag, cond })
    }

    fn new_record(&self, op: &Operation, now: &str) -> RegistrationRecord {
        RegistrationRecord {
            state: DeviceRegistrationState {
                registration_id: op.registration_id.clone(),
                created_date_time_utc: Some(now.to_owned()),
                assigned_hub: None,
                device_id: None,
                status: EnrollmentStatus::Assigning,
                substatus: None,
                error_code: None,
                error_message: None,
                last_updated_date_time_utc: Some(now.to_owned()),
                etag: None,
                payload: None,
            },
            initial_hub: None,
            enrollment_group_id: op.enrollment.group.then(|| op.enrollment.id.clone()),
            allocation_trace: None,
        }
    }

    /// One pass: decide the hub, write the device there, record the state.
    async fn attempt(&self, op: &mut Operation) -> Result<RecordWrite, Failure> {
        let kind = if op.enrollment.group {
            EnrollmentKind::Group
        } else {
            EnrollmentKind::Individual
        };
        let Some(doc) = self
            .store
            .get_enrollment(kind, &op.enrollment.id.to_ascii_lowercase())
            .await
            .map_err(store_failure)?
        else {
            return Err(Failure::Final {
                code: ENROLLMENT_GONE,
                message: "The enrollment was deleted while the device was registering.".into(),
            });
        };
        let view = EnrollmentView::parse(op.enrollment.group, &doc.doc, &op.registration_id)
            .map_err(Failure::Store)?;
        if view.status == ProvisioningStatus::Disabled {
            return Err(Failure::Disabled);
        }
        let key = op.registration_id.to_ascii_lowercase();
        let previous = self.registration(&key).await.map_err(Failure::Store)?;
        let linked = self.store.list_linked_hubs().await.map_err(store_failure)?;
        let current = previous
            .as_ref()
            .and_then(|(r, _)| r.state.assigned_hub.clone());
        let current_hub = current.as_deref().and_then(|name| {
            linked
                .iter()
                .find(|h| h.host_name.eq_ignore_ascii_case(name))
        });

        let policy = view
            .policy
            .unwrap_or(self.settings.default_allocation_policy);
        let keep_current = current_hub.filter(|_| !view.reprovision.update_hub_assignment);
        let (target, webhook_twin, payload): (&LinkedHub, Option<InitialTwin>, Option<Value>) =
            match (policy, keep_current) {
                // The webhook is asked on every registration, even one that keeps its hub (for the payload).
                (AllocationPolicy::Custom, _) => {
                    let offered: Vec<&LinkedHub> = match keep_current {
                        Some(hub) => vec![hub],
                        None => allocation::candidates(&linked, view.iot_hubs.as_deref())
                            .map_err(allocation_failure)?
                            .into_iter()
                            .filter(|h| h.apply_allocation_policy)
                            .collect(),
                    };
                    let current_device_id = current_hub
                        .and(previous.as_ref())
                        .and_then(|(r, _)| r.state.device_id.clone());
                    let context = DeviceRuntimeContext {
                        registration_id: op.registration_id.clone(),
                        current_iot_hub_host_name: current_hub.map(|h| h.host_name.clone()),
                        current_device_id,
                        symmetric_key: serde_json::Map::new(),
                        payload: op.payload.clone(),
                    };
                    self.ask_webhook(op, &doc.doc, view.webhook_url.as_deref(), context, offered)
                        .await?
                }
                (_, Some(hub)) => (hub, None, None),
                (_, None) => {
                    let candidates = allocation::candidates(&linked, view.iot_hubs.as_deref())
                        .map_err(allocation_failure)?;
                    let hub = allocation::allocate(
                        policy,
                        &op.registration_id,
                        &candidates,
                        self.settings.region.as_deref(),
                    )
                    .map_err(allocation_failure)?;
                    (hub, None, None)
                }
            };
        let moved_from =
            current_hub.filter(|hub| !hub.host_name.eq_ignore_ascii_case(&target.host_name));
        // The webhook's initial twin replaces the enrollment's (used on first assignment and on reset).
        let initial = HubTwin::from_initial(webhook_twin.as_ref().or(view.initial_twin.as_ref()));
        let initial_hub = previous
            .as_ref()
            .and_then(|(r, _)| r.initial_hub.clone())
            .unwrap_or_else(|| target.host_name.clone());
        let back_home = initial_hub.eq_ignore_ascii_case(&target.host_name);
        let previous_device_id = previous
            .as_ref()
            .and_then(|(r, _)| r.state.device_id.clone());
        let device = HubDevice {
            // Registration ids are case-insensitive: a device keeps the device id of its first
            // assignment whatever case it registers with now, so it never has two identities.
            device_id: view
                .device_id
                .clone()
                .or_else(|| {
                    previous_device_id
                        .clone()
                        .filter(|d| d.eq_ignore_ascii_case(&op.registration_id))
                })
                .unwrap_or_else(|| op.registration_id.clone()),
            primary_key: view.keys.0.clone(),
            secondary_key: view.keys.1.clone(),
            iot_edge: view.iot_edge,
        };
        let (twin, substatus) = match (current.is_some(), moved_from) {
            (false, _) => (Some(initial), AssignedDeviceSubstatus::InitialAssignment),
            (true, None) => (
                None,
                previous
                    .as_ref()
                    .and_then(|(r, _)| r.state.substatus)
                    .unwrap_or(AssignedDeviceSubstatus::InitialAssignment),
            ),
            (true, Some(old)) if view.reprovision.migrate_device_data => {
                let carried = self
                    .hubs
                    .get_twin(
                        old,
                        previous_device_id.as_ref().unwrap_or(&device.device_id),
                    )
                    .await
                    .map_err(Failure::Retry)?;
                let substatus = if back_home {
                    AssignedDeviceSubstatus::ReprovisionedToInitialAssignment
                } else {
                    AssignedDeviceSubstatus::DeviceDataMigrated
                };
                (Some(carried.unwrap_or(initial)), substatus)
            }
            (true, Some(_)) => {
                let substatus = if back_home {
                    AssignedDeviceSubstatus::ReprovisionedToInitialAssignment
                } else {
                    AssignedDeviceSubstatus::DeviceDataReset
                };
                (Some(initial), substatus)
            }
        };

        self.hubs
            .upsert_device(target, &device)
            .await
            .map_err(Failure::Retry)?;
        if let Some(twin) = twin.filter(|t| !t.is_empty()) {
            self.hubs
                .update_twin(target, &device.device_id, &twin)
                .await
                .map_err(Failure::Retry)?;
        }
        // The identity the device had before, if it is not the one just written: on the hub it
        // left, or on this hub under a device id the enrollment has since changed. Left behind, it
        // would still accept the device's earlier credentials.
        let stale = match (moved_from, current_hub, &previous_device_id) {
            (Some(old), _, previous_id) => {
                Some((old, previous_id.as_ref().unwrap_or(&device.device_id)))
            }
            (None, Some(same), Some(previous_id)) if *previous_id != device.device_id => {
                Some((same, previous_id))
            }
            _ => None,
        };
        if let Some((hub, stale_id)) = stale
            && let Err(err) = self.hubs.delete_device(hub, stale_id).await
        {
            tracing::warn!(registration_id = %op.registration_id, %err, hub = %hub.host_name, "the device's previous identity could not be deleted");
        }

        let now = format_utc(self.clock.now());
        let mut record = previous
            .as_ref()
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| self.new_record(op, &now));
        record.state.registration_id.clone_from(&op.registration_id);
        record.state.status = EnrollmentStatus::Assigned;
        record.state.assigned_hub = Some(target.host_name.clone());
        record.state.device_id = Some(device.device_id.clone());
        record.state.substatus = Some(substatus);
        record.state.error_code = None;
        record.state.error_message = None;
        record.state.payload = payload;
        record.allocation_trace = op.trace.clone().map(|mut trace| {
            trace.decision = Some(serde_json::json!({"assignedHub": target.host_name}));
            trace
        });
        record.state.last_updated_date_time_utc = Some(now);
        record.initial_hub = Some(initial_hub);
        record.enrollment_group_id = op.enrollment.group.then(|| op.enrollment.id.clone());
        let etag = Etag::generate();
        record.state.etag = Some(etag.as_str().to_owned());
        let cond = previous.map_or(Precondition::MustNotExist, |(_, e)| Precondition::EtagIs(e));
        Ok(RecordWrite { record, etag, cond })
    }

    /// Custom allocation: asks the enrollment's webhook to choose among `offered`, recording the
    /// call in the operation's allocation trace. Returns the chosen hub, the webhook's initial twin
    /// and its payload for the device.
    async fn ask_webhook<'h>(
        &self,
        op: &mut Operation,
        enrollment_doc: &str,
        webhook_url: Option<&str>,
        context: DeviceRuntimeContext,
        offered: Vec<&'h LinkedHub>,
    ) -> Result<(&'h LinkedHub, Option<InitialTwin>, Option<Value>), Failure> {
        let url = webhook_url.ok_or_else(|| Failure::Final {
            code: CUSTOM_ALLOCATION_FAILED,
            message: "The enrollment's custom allocation has no webhook URL.".into(),
        })?;
        let names: Vec<String> = offered.iter().map(|h| h.host_name.clone()).collect();
        let kind = if op.enrollment.group {
            "enrollmentGroup"
        } else {
            "individualEnrollment"
        };
        let request = serde_json::json!({
            kind: webhook::redacted_enrollment(enrollment_doc),
            "deviceRuntimeContext": context,
            "linkedHubs": names,
        });
        let called_at = format_utc(self.clock.now());
        let started = std::time::Instant::now();
        let reply = self
            .webhooks
            .post(url, &request, self.settings.webhook_timeout)
            .await;
        let latency = started.elapsed();
        let status = match &reply {
            Ok(r) => r.status.to_string(),
            Err(WebhookError::Timeout(_)) => "timeout".to_owned(),
            Err(WebhookError::Network(_)) => "error".to_owned(),
            Err(WebhookError::TooLarge { .. }) => "too_large".to_owned(),
            Err(WebhookError::Redirect { status, .. }) => status.to_string(),
        };
        metrics::counter!("opendps_webhook_calls_total", "status" => status.clone()).increment(1);
        metrics::histogram!("opendps_webhook_call_duration_seconds", "status" => status)
            .record(latency.as_secs_f64());
        tracing::info!(
            registration_id = %op.registration_id,
            webhook = webhook::loggable_url(url),
            status = reply.as_ref().map(|r| r.status).unwrap_or(0),
            "allocation webhook answered"
        );
        let trace = op.trace.get_or_insert_with(|| AllocationTrace {
            webhook_url: webhook::loggable_url(url).to_owned(),
            ..AllocationTrace::default()
        });
        trace
            .attempts
            .push(TraceAttempt::of(&reply, called_at, latency));
        trace.request = request;
        match webhook::judge(reply, &names) {
            Verdict::Allocate(response) => {
                let chosen = response
                    .iot_hub_host_name
                    .as_deref()
                    .unwrap_or_default()
                    .trim();
                let hub = offered
                    .iter()
                    .copied()
                    .find(|h| h.host_name.eq_ignore_ascii_case(chosen))
                    .ok_or_else(|| Failure::Final {
                        code: CUSTOM_ALLOCATION_FAILED,
                        message: format!("the webhook chose '{chosen}'"),
                    })?;
                Ok((hub, response.initial_twin, response.payload))
            }
            Verdict::Fail { code, message } => Err(Failure::Final { code, message }),
            Verdict::Retry(reason) => Err(Failure::WebhookRetry(reason)),
        }
    }
}

/// A registration state to record, with the precondition that keeps racing registrations of one
/// device from both winning.
struct RecordWrite {
    record: RegistrationRecord,
    etag: Etag,
    cond: Precondition,
}

enum Failure {
    /// A hub failed; worth another attempt.
    Retry(HubError),
    /// The webhook answered 429 or above; ask again later.
    WebhookRetry(String),
    /// The enrollment is disabled.
    Disabled,
    /// The registration fails with this code.
    Final { code: i32, message: String },
    /// Storage failed; the operation stays leased and is retried after the lease.
    Store(ProvisioningError),
}

fn store_failure(err: StoreError) -> Failure {
    Failure::Store(err.into())
}

fn allocation_failure(err: AllocationError) -> Failure {
    Failure::Final {
        code: err.error_code(),
        message: err.to_string(),
    }
}

/// What registration needs of either kind of enrollment.
struct EnrollmentView {
    status: ProvisioningStatus,
    policy: Option<AllocationPolicy>,
    iot_hubs: Option<Vec<String>>,
    initial_twin: Option<InitialTwin>,
    reprovision: ReprovisionPolicy,
    iot_edge: bool,
    device_id: Option<String>,
    keys: (Secret, Secret),
    webhook_url: Option<String>,
}

impl EnrollmentView {
    /// Reads an enrollment document; a group's keys are derived for `registration_id`.
    fn parse(group: bool, doc: &str, registration_id: &str) -> Result<Self, ProvisioningError> {
        let derive = |keys: Option<Vec<Vec<u8>>>| -> (Secret, Secret) {
            let mut derived = keys.unwrap_or_default().into_iter().map(|k| {
                Secret::new(
                    sas::derive_device_key(&B64.encode(k), registration_id).unwrap_or_default(),
                )
            });
            (
                derived.next().unwrap_or_else(|| Secret::new("")),
                derived.next().unwrap_or_else(|| Secret::new("")),
            )
        };
        if group {
            let g: EnrollmentGroup = parse(doc)?;
            Ok(Self {
                status: g.provisioning_status.unwrap_or_default(),
                policy: g.allocation_policy,
                iot_hubs: crate::model::named_hubs(&g.iot_hubs, &g.iot_hub_host_name)
                    .map(<[String]>::to_vec),
                initial_twin: g.initial_twin,
                reprovision: g.reprovision_policy.unwrap_or_default(),
                iot_edge: g.capabilities.is_some_and(|c| c.iot_edge),
                device_id: None,
                keys: derive(symmetric_keys(&g.attestation)),
                webhook_url: g.custom_allocation_definition.map(|d| d.webhook_url),
            })
        } else {
            let e: IndividualEnrollment = parse(doc)?;
            let sym = e.attestation.symmetric_key.clone().unwrap_or_default();
            Ok(Self {
                status: e.provisioning_status.unwrap_or_default(),
                policy: e.allocation_policy,
                iot_hubs: crate::model::named_hubs(&e.iot_hubs, &e.iot_hub_host_name)
                    .map(<[String]>::to_vec),
                initial_twin: e.initial_twin,
                reprovision: e.reprovision_policy.unwrap_or_default(),
                iot_edge: e.capabilities.is_some_and(|c| c.iot_edge),
                device_id: e.device_id.filter(|d| !d.is_empty()),
                keys: (
                    Secret::new(sym.primary_key.unwrap_or_default()),
                    Secret::new(sym.secondary_key.unwrap_or_default()),
                ),
                webhook_url: e.custom_allocation_definition.map(|d| d.webhook_url),
            })
        }
    }
}

/// Decoded primary and secondary keys of a symmetric-key attestation.
fn symmetric_keys(att: &crate::model::AttestationMechanism) -> Option<Vec<Vec<u8>>> {
    if att.kind != AttestationType::SymmetricKey {
        return None;
    }
    let sym = att.symmetric_key.as_ref()?;
    Some(
        [&sym.primary_key, &sym.secondary_key]
            .into_iter()
            .flatten()
            .filter_map(|k| B64.decode(k).ok())
            .collect(),
    )
}

fn verify(token: &SasToken, keys: &[Vec<u8>]) -> Result<usize, sas::SasError> {
    token.verify_signature(keys.iter().map(Vec::as_slice))
}

fn result_of(record: &RegistrationRecord) -> DeviceRegistrationResult {
    let s = &record.state;
    DeviceRegistrationResult {
        registration_id: s.registration_id.clone(),
        created_date_time_utc: s.created_date_time_utc.clone(),
        assigned_hub: s
            .assigned_hub
            .clone()
            .filter(|_| s.status == EnrollmentStatus::Assigned),
        device_id: s
            .device_id
            .clone()
            .filter(|_| s.status == EnrollmentStatus::Assigned),
        status: s.status,
        substatus: s.substatus,
        error_code: s.error_code,
        error_message: s.error_message.clone(),
        last_updated_date_time_utc: s.last_updated_date_time_utc.clone(),
        etag: s.etag.clone(),
        payload: s.payload.clone(),
        symmetric_key: Some(SymmetricKeyRegistrationResult {
            enrollment_group_id: record.enrollment_group_id.clone(),
        }),
    }
}

fn parse<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T, ProvisioningError> {
    serde_json::from_str(doc)
        .map_err(|e| ProvisioningError::Internal(format!("a stored document does not parse: {e}")))
}

/// `4.{16 hex}.{uuid}`, the shape DPS uses, limited to characters SDKs splice into URLs and topics
/// unescaped.
fn new_operation_id() -> String {
    let mut bytes = [0u8; 8];
    sas::fill_random(&mut bytes);
    format!(
        "4.{:016x}.{}",
        u64::from_be_bytes(bytes),
        uuid::Uuid::new_v4()
    )
}
