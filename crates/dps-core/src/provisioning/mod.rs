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
    SymmetricKeyRegistrationResult, X509RegistrationResult,
};
use crate::error::ProvisioningError;
use crate::hub::{HubAuthentication, HubClient, HubDevice, HubError, HubTwin};
use crate::ids::{Etag, IdScope, RegistrationId};
use crate::linked_hub::LinkedHub;
use crate::model::{
    AllocationPolicy, AttestationType, DeviceRegistrationState, EnrollmentGroup, EnrollmentStatus,
    IndividualEnrollment, InitialTwin, ProvisioningStatus, ReprovisionPolicy,
};
use crate::sas::{self, SasToken};
use crate::secret::Secret;
use crate::store::{
    Durability, EnrollmentKind, LeaseOwner, Precondition, Store, StoreError, StoredDoc,
    StoredOperation,
};
use crate::time::{UtcTime, format_utc};
use crate::webhook::{
    self, AllocationTrace, CUSTOM_ALLOCATION_FAILED, DeviceRuntimeContext, TraceAttempt, Verdict,
    WebhookClient, WebhookError,
};

mod answers;
mod auth;
mod plan;
mod prefetch;
mod process;
mod record;
mod x509;

use self::answers::Answers;
pub use self::answers::Sleep;
use self::auth::{GroupAuth, symmetric_keys};
use self::prefetch::Prefetched;
use self::record::{EnrollmentView, result_of};

/// Error code of a registration whose enrollment disappeared while it was being processed.
const ENROLLMENT_GONE: u32 = 404_202;
/// Error code of a registration that failed because a hub refused or did not answer.
const HUB_WRITE_FAILED: u32 = 500_002;
/// Error code of a registration that needs a twin on a hub that keeps none (IoT Hub Basic tier).
const HUB_HAS_NO_TWINS: u32 = 400_301;

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
    /// How long a registration keeps retrying a hub that throttles, fails on its side (5xx) or
    /// does not answer, counted from its first failed call, in milliseconds.
    pub hub_retry_for_ms: i64,
    /// Delay before the first retry, in milliseconds; doubled for each further retry.
    pub hub_retry_ms: i64,
    /// The longest delay between two retries, in milliseconds (a hub's `Retry-After` may ask for
    /// more, and is honoured).
    pub hub_retry_max_ms: i64,
    /// How long an allocation webhook may take to answer.
    pub webhook_timeout: std::time::Duration,
    /// Retries of a webhook that answers 429 or above, 5xx included (DPS: 10).
    pub webhook_retries: u32,
    /// Delay before the first webhook retry, in milliseconds (DPS: 1 s).
    pub webhook_first_retry_ms: i64,
    /// How long a register request waits for its operation to finish, to answer with the final
    /// status instead of `assigning` (see [`Provisioning::answering_inline`]); zero never waits.
    pub answer_within: std::time::Duration,
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
            hub_retry_for_ms: 15 * 60 * 1000,
            hub_retry_ms: 1000,
            hub_retry_max_ms: 60 * 1000,
            webhook_timeout: std::time::Duration::from_secs(30),
            webhook_retries: 10,
            webhook_first_retry_ms: 1000,
            webhook_retry_increment_ms: 9000,
            answer_within: std::time::Duration::from_secs(1),
        }
    }
}

/// Which enrollment a device registered through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentRef {
    /// Individual enrollment or group; stored as `"group": true|false`, as before it was a kind.
    #[serde(rename = "group", with = "kind_as_group_flag")]
    pub kind: EnrollmentKind,
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
    /// Hub calls that failed and were retried so far.
    #[serde(default)]
    pub attempts: u32,
    /// When the first hub call of this operation failed (unix milliseconds): retries stop
    /// `hub_retry_for_ms` after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_failing_since_ms: Option<i64>,
    /// Webhook retries made so far (after answers of 429 or above).
    #[serde(default)]
    pub webhook_retries: u32,
    /// What the webhook was asked and answered, across retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<AllocationTrace>,
    /// When the device asked.
    pub created_date_time_utc: UtcTime,
    /// How the device asked (for metrics).
    #[serde(default)]
    pub transport: Transport,
    /// The certificate an X.509 device authenticated with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PresentedCertificate>,
}

/// The certificate an X.509 device authenticated with, as the registration keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresentedCertificate {
    /// The leaf's summary (its thumbprint goes to the hub identity).
    pub info: crate::model::X509CertificateInfo,
    /// The summary of the group's certificate the chain led to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<crate::model::X509CertificateInfo>,
}

/// How a device proves who it is: a SAS token (symmetric keys), or the certificates it presented
/// in its TLS handshake (X.509). A token wins when both are there.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The SharedAccessSignature (the Authorization header, or the MQTT password).
    pub sas: Option<&'a str>,
    /// The TLS client certificates, leaf first, DER.
    pub certificates: &'a [Vec<u8>],
}

impl<'a> From<Option<&'a str>> for Credentials<'a> {
    fn from(sas: Option<&'a str>) -> Self {
        Self {
            sas,
            certificates: &[],
        }
    }
}

impl<'a> From<Option<&'a String>> for Credentials<'a> {
    fn from(sas: Option<&'a String>) -> Self {
        sas.map(String::as_str).into()
    }
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
    /// MQTT over WebSockets on the HTTPS listener.
    #[serde(rename = "mqtt-ws")]
    MqttWs,
    /// AMQP 1.0 over TLS.
    Amqp,
    /// AMQP 1.0 over WebSockets on the HTTPS listener.
    #[serde(rename = "amqp-ws")]
    AmqpWs,
}

impl Transport {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Mqtt => "mqtt",
            Self::MqttWs => "mqtt-ws",
            Self::Amqp => "amqp",
            Self::AmqpWs => "amqp-ws",
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
    /// The certificate of an X.509 device's last registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PresentedCertificate>,
    /// The device's previous identity that the last registration could not delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_identity: Option<StaleIdentity>,
}

/// A previous identity of a device (on the hub it left, or under the device id it had) that a
/// registration failed to delete: it still accepts the device's earlier credentials until an
/// operator deletes it. Shown in the registration's trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaleIdentity {
    /// The hub holding it.
    pub hub: String,
    /// Its device id.
    pub device_id: String,
    /// Why it could not be deleted.
    pub error: String,
    /// When the deletion was attempted.
    pub at: String,
}

/// The worker of this node, taking each operation that a registration records as it is recorded:
/// the operation is written already leased to the worker, which starts on it without claiming it
/// from the store.
pub trait Intake: Send + Sync {
    /// Who the lease of a new operation goes to, and until when (unix milliseconds); none when
    /// the worker takes nothing (it is stopping), so the operation is left to the next claim.
    fn lease(&self) -> Option<(LeaseOwner, i64)>;
    /// The operation, recorded under the lease [`Intake::lease`] gave.
    fn take(&self, op: StoredOperation);
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
    /// Where the operations this node records go at once, if anywhere (see [`Intake`]).
    intake: Option<Arc<dyn Intake>>,
    /// Register requests waiting for their operations, when they wait (see [`Answers`]).
    answers: Option<Answers>,
    /// Registration states read with the operations handed to the worker (see [`Prefetched`]).
    prefetched: Prefetched,
    /// Parsed enrollment groups by etag, for authentication.
    group_auth: Mutex<HashMap<String, Arc<GroupAuth>>>,
    /// Hubs that throttled (429) or were busy (503), by lower-case host name, with the time
    /// (unix milliseconds) before which no call is made to them.
    hub_gates: Mutex<HashMap<String, i64>>,
}

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
            intake: None,
            answers: None,
            prefetched: Prefetched::new(),
            group_auth: Mutex::new(HashMap::new()),
            hub_gates: Mutex::new(HashMap::new()),
        }
    }

    /// Hands each operation this node records to `intake` (its worker) as it records it, rather
    /// than waking the worker to claim it.
    #[must_use]
    pub fn with_intake(mut self, intake: Arc<dyn Intake>) -> Self {
        self.intake = Some(intake);
        self
    }

    /// Answers each register request with its operation's final status when the operation
    /// finishes within `settings.answer_within` (timed by `sleep`, the runtime's timer), and with
    /// `assigning` otherwise, as without this. Every SDK ends its registration on a final status
    /// in the register response without polling (docs/device-api.md has the table).
    #[must_use]
    pub fn answering_inline(mut self, sleep: Sleep) -> Self {
        let within = self.settings.answer_within;
        self.answers = (!within.is_zero()).then(|| Answers::new(within, sleep));
        self
    }

    /// The time by this service's clock.
    pub fn now(&self) -> jiff::Timestamp {
        self.clock.now()
    }

    /// Seconds a device should wait before polling.
    pub fn retry_after_secs(&self) -> u32 {
        self.settings.retry_after_secs
    }

    /// The Retry-After a device is answered with on every transport: the wait before its next
    /// poll while its registration is assigning, none once it is terminal.
    pub fn retry_after_for(&self, status: &RegistrationOperationStatus) -> Option<u32> {
        (!status.status.is_terminal()).then_some(self.settings.retry_after_secs)
    }

    /// `PUT /{idScope}/registrations/{registrationId}/register`: authenticates the device and records
    /// an `assigning` operation before answering.
    pub async fn register(
        &self,
        transport: Transport,
        scope: &str,
        registration_id: &str,
        body: DeviceRegistration,
        credentials: impl Into<Credentials<'_>>,
    ) -> Result<RegistrationOperationStatus, ProvisioningError> {
        let credentials = credentials.into();
        let rid = RegistrationId::parse(registration_id)?;
        if let Some(in_body) = body.registration_id.as_deref().filter(|b| !b.is_empty())
            && !in_body.eq_ignore_ascii_case(rid.as_str())
        {
            return Err(ProvisioningError::InvalidArgument(format!(
                "The registrationId in the body ('{in_body}') differs from the one in the request ('{rid}')."
            )));
        }
        let (attested, certificate) = match self.authenticate(scope, &rid, credentials).await {
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
            operation_id: new_operation_id(now.as_millisecond()),
            registration_id: rid.as_str().to_owned(),
            enrollment: attested,
            payload,
            status: EnrollmentStatus::Assigning,
            result: None,
            attempts: 0,
            hub_failing_since_ms: None,
            webhook_retries: 0,
            trace: None,
            created_date_time_utc: UtcTime(now),
            transport,
            certificate,
        };
        let stored = stored_operation(&op, now.as_millisecond())?;
        // Waiting starts before the worker can have the operation, so its end is not missed.
        let expected = self.answers.as_ref().map(|a| a.expect(&op.operation_id));
        let written = match self.intake.as_ref().map(|i| (i, i.lease())) {
            Some((intake, Some((owner, until_ms)))) => {
                // A request that waits is answered only after a durable write: the final one,
                // or the one below.
                let durability = if expected.is_some() {
                    Durability::Deferred
                } else {
                    Durability::Now
                };
                let key = rid.key();
                let stamp = self.prefetched.stamp(&key);
                let registration = self
                    .store
                    .put_leased_operation(&stored, &owner, until_ms, durability)
                    .await?;
                self.prefetched
                    .keep(&op.operation_id, &key, stamp, registration);
                intake.take(stored);
                durability
            }
            // Work that any node may claim at once: written durably.
            _ => {
                self.store.put_operation(&stored).await?;
                (self.wake)();
                Durability::Now
            }
        };
        metrics::counter!("opendps_operations_accepted_total", "transport" => transport.as_str())
            .increment(1);
        if let Some(expected) = expected {
            if let Some(done) = expected.answer().await {
                metrics::counter!("opendps_inline_answers_total", "transport" => transport.as_str())
                    .increment(1);
                return Ok(done);
            }
            // The device learns of its operation now: it must survive a crash from here on.
            if written == Durability::Deferred {
                self.store.make_durable(&op.operation_id).await?;
            }
        }
        Ok(RegistrationOperationStatus {
            operation_id: op.operation_id,
            status: EnrollmentStatus::Assigning,
            registration_state: None,
        })
    }

    /// `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
    pub async fn operation_status(
        &self,
        transport: Transport,
        scope: &str,
        registration_id: &str,
        operation_id: &str,
        credentials: impl Into<Credentials<'_>>,
    ) -> Result<RegistrationOperationStatus, ProvisioningError> {
        metrics::counter!("opendps_operation_polls_total", "transport" => transport.as_str())
            .increment(1);
        let credentials = credentials.into();
        let rid = RegistrationId::parse(registration_id)?;
        self.check_credentials(scope, &rid, credentials)?;
        let stored = self
            .store
            .get_operation(operation_id)
            .await?
            .filter(|op| op.registration_key == rid.key());
        let Some(stored) = stored else {
            // Only an authenticated device learns that an operation does not exist.
            self.authenticate(scope, &rid, credentials).await?;
            return Err(ProvisioningError::NotFound(format!(
                "The operation '{operation_id}' does not exist for '{rid}'."
            )));
        };
        let op: Operation = parse(&stored.doc)?;
        // The thumbprint of the certificate an X.509 device registered with: kept in the operation
        // while it is assigning, in its result once finished.
        let registered = op.certificate.as_ref().map(|c| &c.info).or_else(|| {
            op.result
                .as_ref()
                .and_then(|r| r.x509.as_ref())
                .and_then(|x| x.certificate_info.as_ref())
        });
        match (registered, credentials.sas) {
            // An X.509 device polls with the certificate it registered with: the handshake proved
            // it holds its key, so the chain need not be walked again.
            (Some(registered), None) if !credentials.certificates.is_empty() => {
                let leaf = &credentials.certificates[0];
                if crate::certificate::sha256_thumbprint(leaf) != registered.sha256_thumbprint {
                    self.authenticate(scope, &rid, credentials).await?;
                }
            }
            _ => {
                self.authenticate_as(scope, &rid, credentials, &op.enrollment)
                    .await?
            }
        }
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
        credentials: impl Into<Credentials<'_>>,
    ) -> Result<DeviceRegistrationResult, ProvisioningError> {
        let rid = RegistrationId::parse(registration_id)?;
        self.authenticate(scope, &rid, credentials.into()).await?;
        let (record, _) = self.registration(&rid.key()).await?.ok_or_else(|| {
            ProvisioningError::NotFound(format!("The device '{rid}' has not registered."))
        })?;
        Ok(result_of(&record))
    }

    async fn registration(
        &self,
        key: &str,
    ) -> Result<Option<(RegistrationRecord, Etag)>, ProvisioningError> {
        let stored = self.store.get_registration(key).await?;
        parse_registration(stored)
    }

    /// The device's registration state for working on `op`: the one read when `op` was recorded,
    /// if still current, else read now.
    async fn registration_for(
        &self,
        op: &Operation,
    ) -> Result<Option<(RegistrationRecord, Etag)>, ProvisioningError> {
        match self.prefetched.take(&op.operation_id) {
            Some(stored) => parse_registration(stored),
            None => {
                self.registration(&op.registration_id.to_ascii_lowercase())
                    .await
            }
        }
    }

    async fn save_operation(
        &self,
        op: &Operation,
        next_attempt_ms: i64,
    ) -> Result<(), ProvisioningError> {
        let stored = stored_operation(op, next_attempt_ms)?;
        Ok(self.store.put_operation(&stored).await?)
    }
}

fn parse_registration(
    stored: Option<StoredDoc>,
) -> Result<Option<(RegistrationRecord, Etag)>, ProvisioningError> {
    stored
        .map(|doc| Ok((parse(&doc.doc)?, doc.etag)))
        .transpose()
}

/// `op` as the store keeps it, due at `next_attempt_ms`.
fn stored_operation(
    op: &Operation,
    next_attempt_ms: i64,
) -> Result<StoredOperation, ProvisioningError> {
    Ok(StoredOperation {
        operation_id: op.operation_id.clone(),
        registration_key: op.registration_id.to_ascii_lowercase(),
        pending: !op.status.is_terminal(),
        next_attempt_ms,
        doc: serde_json::to_string(op)
            .map_err(|e| ProvisioningError::internal("serializing an operation", e))?,
    })
}

/// [`EnrollmentKind`] stored as the `group` flag operations have always carried.
mod kind_as_group_flag {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use crate::store::EnrollmentKind;

    pub(super) fn serialize<S: Serializer>(kind: &EnrollmentKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*kind == EnrollmentKind::Group)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EnrollmentKind, D::Error> {
        Ok(match bool::deserialize(d)? {
            true => EnrollmentKind::Group,
            false => EnrollmentKind::Individual,
        })
    }
}

impl EnrollmentRef {
    /// The group's id, when the device registered through a group.
    pub fn group_id(&self) -> Option<String> {
        (self.kind == EnrollmentKind::Group).then(|| self.id.clone())
    }
}

fn parse<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T, ProvisioningError> {
    serde_json::from_str(doc)
        .map_err(|e| ProvisioningError::internal("a stored document does not parse", e))
}

/// `4.{16 hex}.{uuid}`, the shape DPS uses, limited to characters SDKs splice into URLs and topics
/// unescaped. The 16 hex digits grow with time (the milliseconds of `now_ms`, then 16 random
/// bits), so a new operation sorts after older ones: the stores' indexes of operation ids take it
/// at their end rather than on a random page of their own, one page fewer written per
/// registration. The random UUID keeps the id unguessable.
fn new_operation_id(now_ms: i64) -> String {
    let mut bytes = [0u8; 2];
    sas::fill_random(&mut bytes);
    let ms = u64::try_from(now_ms).unwrap_or(0);
    format!(
        "4.{:016x}.{}",
        (ms << 16) | u64::from(u16::from_be_bytes(bytes)),
        uuid::Uuid::new_v4()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operation ids keep DPS's shape and sort by the time they were made.
    #[test]
    fn operation_ids_sort_by_time() {
        let ids: Vec<String> = [1_700_000_000_000, 1_700_000_000_001, 1_800_000_000_000]
            .into_iter()
            .map(new_operation_id)
            .collect();
        for id in &ids {
            let parts: Vec<&str> = id.split('.').collect();
            assert_eq!(parts.len(), 3, "{id}");
            assert_eq!(parts[0], "4");
            assert!(parts[1].len() == 16 && parts[1].bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(uuid::Uuid::parse_str(parts[2]).is_ok(), "{id}");
        }
        assert!(ids.is_sorted(), "{ids:?}");
        assert_ne!(new_operation_id(5), new_operation_id(5));
    }

    /// Operations stored before the kind existed carry `"group": true|false`, and still do.
    #[test]
    fn the_enrollment_kind_is_stored_as_the_group_flag() {
        for (flag, kind) in [
            (true, EnrollmentKind::Group),
            (false, EnrollmentKind::Individual),
        ] {
            let stored = serde_json::json!({"group": flag, "id": "contoso"});
            let read: EnrollmentRef = serde_json::from_value(stored.clone()).expect("reads");
            assert_eq!(read.kind, kind);
            assert_eq!(serde_json::to_value(&read).expect("json"), stored);
        }
    }
}
