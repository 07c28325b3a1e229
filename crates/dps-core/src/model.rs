//! Wire types of the DPS service API, named and shaped exactly as the 2021-10-01 swagger defines them.
//!
//! Optional fields are left out of JSON output when absent, so that what a client stored is what it
//! reads back. Server-managed fields (`etag`, timestamps, `registrationState`) are set by the core.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::store::EnrollmentKind;

/// A collection of twin properties or tags (swagger `TwinCollection`): any JSON object.
pub type TwinCollection = Map<String, Value>;

/// `AttestationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttestationType {
    /// No attestation.
    None,
    /// TPM endorsement key.
    Tpm,
    /// X.509 certificates.
    X509,
    /// Symmetric keys.
    SymmetricKey,
}

/// `AttestationMechanism`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    /// Which of the mechanisms below is in use.
    #[serde(rename = "type")]
    pub kind: AttestationType,
    /// TPM attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    /// X.509 attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    /// Symmetric-key attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
}

/// `TpmAttestation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    /// Base64 TPM2B_PUBLIC of the endorsement key.
    pub endorsement_key: String,
    /// Base64 TPM2B_PUBLIC of the storage root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

/// `SymmetricKeyAttestation`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    /// Primary key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Secondary key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

/// `X509Attestation`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    /// Device (leaf) certificates, for individual enrollments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    /// Signing (CA or intermediate) certificates, for groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    /// Names of CA certificates uploaded to the service, for groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CAReferences>,
}

/// `X509Certificates`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    /// Primary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509CertificateWithInfo>,
    /// Secondary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
}

/// `X509CertificateWithInfo`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    /// The certificate as sent (PEM, base64 DER or base64 PEM); stored as base64 DER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The summary the service computes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<X509CertificateInfo>,
}

/// `X509CertificateInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateInfo {
    /// Subject distinguished name.
    pub subject_name: String,
    /// SHA-1 of the DER, upper-case hex.
    pub sha1_thumbprint: String,
    /// SHA-256 of the DER, upper-case hex.
    pub sha256_thumbprint: String,
    /// Issuer distinguished name.
    pub issuer_name: String,
    /// Start of validity.
    pub not_before_utc: String,
    /// End of validity.
    pub not_after_utc: String,
    /// Serial number, upper-case hex.
    pub serial_number: String,
    /// X.509 version (3 for v3).
    pub version: i32,
}

/// `X509CAReferences`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CAReferences {
    /// Primary CA certificate name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Secondary CA certificate name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

/// `DeviceCapabilities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    /// Whether the device is an IoT Edge device.
    #[serde(default)]
    pub iot_edge: bool,
}

/// `InitialTwin`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwin {
    /// Twin tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<TwinCollection>,
    /// Twin properties (desired only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<InitialTwinProperties>,
}

/// `InitialTwinProperties`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwinProperties {
    /// Desired properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinCollection>,
}

/// `ProvisioningStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    /// Devices may register.
    #[default]
    Enabled,
    /// Devices get `disabled`.
    Disabled,
}

/// `ReprovisionPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Re-evaluate the hub on repeat registrations.
    pub update_hub_assignment: bool,
    /// Copy twin and identity to the new hub (else reset to the initial twin).
    pub migrate_device_data: bool,
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        Self {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

/// `AllocationPolicy`. Read in any letter case (`geoLatency`, `geolatency`), as Azure reads it and
/// as the CLI and configuration accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AllocationPolicy {
    /// Weighted hash of the registration id over the candidate hubs.
    Hashed,
    /// Lowest latency; see docs/allocation.md for what it means self-hosted.
    GeoLatency,
    /// Exactly one hub, named on the enrollment.
    Static,
    /// Decided by a webhook.
    Custom,
}

impl<'de> Deserialize<'de> for AllocationPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const NAMES: &[&str] = &["hashed", "geoLatency", "static", "custom"];
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        match text.to_ascii_lowercase().as_str() {
            "hashed" => Ok(Self::Hashed),
            "geolatency" => Ok(Self::GeoLatency),
            "static" => Ok(Self::Static),
            "custom" => Ok(Self::Custom),
            _ => Err(serde::de::Error::unknown_variant(&text, NAMES)),
        }
    }
}

/// `CustomAllocationDefinition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    /// The webhook to POST the allocation request to.
    pub webhook_url: String,
    /// The service api-version whose shapes go into the request.
    pub api_version: String,
}

/// `EnrollmentStatus`: the status of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EnrollmentStatus {
    /// Not assigned.
    Unassigned,
    /// Being assigned.
    Assigning,
    /// Assigned to a hub.
    Assigned,
    /// Assignment failed.
    Failed,
    /// The enrollment is disabled.
    Disabled,
}

/// `AssignedDeviceSubstatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AssignedDeviceSubstatus {
    /// First assignment.
    InitialAssignment,
    /// Moved to another hub with its data.
    DeviceDataMigrated,
    /// Moved to another hub with its data reset to the initial twin.
    DeviceDataReset,
    /// Moved back to a previously assigned hub.
    ReprovisionedToInitialAssignment,
}

/// `DeviceRegistrationState`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    /// The device's registration id.
    pub registration_id: String,
    /// When the registration was first created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// The hub the device is assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// The device id on that hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Registration status.
    pub status: EnrollmentStatus,
    /// Substatus of an assigned device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<AssignedDeviceSubstatus>,
    /// Error code of a failed registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u32>,
    /// Error message of a failed registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Payload the allocation webhook returned for the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// `IndividualEnrollment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    /// The registration id (taken from the path when absent from the body).
    #[serde(default)]
    pub registration_id: String,
    /// The device id to create on the hub (default: the registration id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Read-only registration state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
    /// Optional device information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<TwinCollection>,
    /// How the device proves its identity.
    pub attestation: AttestationMechanism,
    /// Device capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Legacy single-hub field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    /// Version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Behaviour on repeat registrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Last update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Allocation policy (default: the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    /// Candidate hubs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Webhook for `custom` allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
}

/// `EnrollmentGroup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    /// The group id (taken from the path when absent from the body).
    #[serde(default)]
    pub enrollment_group_id: String,
    /// How devices of the group prove their identity.
    pub attestation: AttestationMechanism,
    /// Device capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    /// Legacy single-hub field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Initial twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    /// Version tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Enabled or disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// Behaviour on repeat registrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// Creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Last update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// Allocation policy (default: the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    /// Candidate hubs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    /// Webhook for `custom` allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
}

/// What individual enrollments and groups share, so the management rules are written once.
pub trait Enrollment:
    Clone + Serialize + serde::de::DeserializeOwned + Send + Sync + 'static
{
    /// Which kind this is.
    const KIND: EnrollmentKind;
    /// The id (registration id or group id).
    fn id(&self) -> &str;
    /// Sets the id.
    fn set_id(&mut self, id: String);
    /// The attestation.
    fn attestation(&self) -> &AttestationMechanism;
    /// The attestation, mutably.
    fn attestation_mut(&mut self) -> &mut AttestationMechanism;
    /// The allocation settings that must be checked together: the policy, the hubs the
    /// enrollment names (see [`named_hubs`]) and the webhook.
    fn allocation(
        &self,
    ) -> (
        Option<AllocationPolicy>,
        Option<&[String]>,
        Option<&CustomAllocationDefinition>,
    );
    /// Sets the server-managed fields.
    fn set_server_fields(&mut self, etag: String, created: String, updated: String);
    /// The creation time, if stored.
    fn created(&self) -> Option<&str>;
    /// Clears read-only fields a client may have echoed back.
    fn clear_read_only(&mut self);
    /// Fills what DPS fills when the client leaves it out: enabled, migrate-data reprovisioning,
    /// no IoT Edge.
    fn fill_defaults(&mut self);
}

/// The hubs an enrollment names: `iotHubs` when it lists any, else the legacy single-hub
/// `iotHubHostName`, else none (every linked hub is a candidate).
pub fn named_hubs<'a>(
    iot_hubs: &'a Option<Vec<String>>,
    iot_hub_host_name: &'a Option<String>,
) -> Option<&'a [String]> {
    iot_hubs
        .as_deref()
        .filter(|hubs| !hubs.is_empty())
        .or_else(|| {
            iot_hub_host_name
                .as_ref()
                .filter(|h| !h.trim().is_empty())
                .map(std::slice::from_ref)
        })
}

macro_rules! impl_enrollment {
    ($ty:ty, $kind:expr, $id:ident, $clear:expr) => {
        impl Enrollment for $ty {
            const KIND: EnrollmentKind = $kind;
            fn id(&self) -> &str {
                &self.$id
            }
            fn set_id(&mut self, id: String) {
                self.$id = id;
            }
            fn attestation(&self) -> &AttestationMechanism {
                &self.attestation
            }
            fn attestation_mut(&mut self) -> &mut AttestationMechanism {
                &mut self.attestation
            }
            fn allocation(
                &self,
            ) -> (
                Option<AllocationPolicy>,
                Option<&[String]>,
                Option<&CustomAllocationDefinition>,
            ) {
                (
                    self.allocation_policy,
                    named_hubs(&self.iot_hubs, &self.iot_hub_host_name),
                    self.custom_allocation_definition.as_ref(),
                )
            }
            fn set_server_fields(&mut self, etag: String, created: String, updated: String) {
                self.etag = Some(etag);
                self.created_date_time_utc = Some(created);
                self.last_updated_date_time_utc = Some(updated);
            }
            fn created(&self) -> Option<&str> {
                self.created_date_time_utc.as_deref()
            }
            fn clear_read_only(&mut self) {
                let clear: fn(&mut Self) = $clear;
                clear(self);
            }
            fn fill_defaults(&mut self) {
                self.provisioning_status.get_or_insert_default();
                self.reprovision_policy.get_or_insert_default();
                self.capabilities.get_or_insert_default();
            }
        }
    };
}

impl_enrollment!(
    IndividualEnrollment,
    EnrollmentKind::Individual,
    registration_id,
    |e| e.registration_state = None
);
impl_enrollment!(
    EnrollmentGroup,
    EnrollmentKind::Group,
    enrollment_group_id,
    |_| ()
);

/// `OperationMode` of a bulk operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OperationMode {
    /// Create; fails per item if it exists.
    Create,
    /// Create or replace.
    Update,
    /// Replace only if each item's `etag` matches.
    UpdateIfMatchETag,
    /// Delete.
    Delete,
}

/// `BulkEnrollmentOperation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperation {
    /// The enrollments (at most 10).
    pub enrollments: Vec<IndividualEnrollment>,
    /// What to do with them.
    pub mode: OperationMode,
}

/// `BulkEnrollmentGroupOperation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperation {
    /// The groups (at most 10).
    pub enrollment_groups: Vec<EnrollmentGroup>,
    /// What to do with them.
    pub mode: OperationMode,
}

/// `BulkEnrollmentOperationError` and `BulkEnrollmentGroupOperationError`: the id field name differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationError {
    /// Registration id (individual enrollments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// Group id (enrollment groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The DPS error code.
    pub error_code: u32,
    /// What went wrong.
    pub error_status: String,
}

/// `BulkEnrollmentOperationResult` (also used for groups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationResult {
    /// True when every item succeeded.
    pub is_successful: bool,
    /// One entry per failed item.
    pub errors: Vec<BulkEnrollmentOperationError>,
}

/// `QuerySpecification`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuerySpecification {
    /// The query text; opendps answers every query as `SELECT *`.
    #[serde(default)]
    pub query: String,
}

/// `ProvisioningServiceErrorDetails`: the body of every error response. It has no `status` field,
/// because the C SDK would act on one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningServiceErrorDetails {
    /// Six-digit error code.
    pub error_code: u32,
    /// Id under which the service logged the failure.
    pub tracking_id: String,
    /// Human-readable message.
    pub message: String,
    /// Extra string details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<std::collections::BTreeMap<String, String>>,
    /// When the error happened.
    pub timestamp_utc: String,
}

impl ProvisioningServiceErrorDetails {
    /// The body a client gets for `err`, under a new tracking id. An internal cause is logged
    /// under that id (and never sent); a refusal is logged at debug level.
    pub fn report(err: &crate::ProvisioningError, now: jiff::Timestamp) -> Self {
        let tracking_id = uuid::Uuid::new_v4().to_string();
        let code = err.error_code();
        match err.internal_cause() {
            Some(cause) => tracing::error!(tracking_id, code, %cause, "request failed"),
            None => tracing::debug!(tracking_id, code, message = %err, "request refused"),
        }
        Self::from_error(err, tracking_id, now)
    }

    /// The body for `err`, logged under `tracking_id`.
    pub fn from_error(
        err: &crate::ProvisioningError,
        tracking_id: String,
        now: jiff::Timestamp,
    ) -> Self {
        Self {
            error_code: err.error_code(),
            tracking_id,
            message: err.client_message(),
            info: None,
            timestamp_utc: crate::time::format_utc(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tutorial_group_round_trips_with_swagger_names() {
        let text = r#"{"enrollmentGroupId":"contoso-custom-allocated-devices","attestation":{"type":"symmetricKey"},"capabilities":{"iotEdge":false},"provisioningStatus":"enabled","reprovisionPolicy":{"updateHubAssignment":true,"migrateDeviceData":true},"allocationPolicy":"custom","iotHubs":["contoso-toasters-hub-1098.azure-devices.net","contoso-heatpumps-hub-1098.azure-devices.net"],"customAllocationDefinition":{"webhookUrl":"https://contoso-function-app-1098.azurewebsites.net/api/HttpTrigger1","apiVersion":"2021-10-01"}}"#;
        let group: EnrollmentGroup = serde_json::from_str(text).expect("parse");
        assert_eq!(group.allocation_policy, Some(AllocationPolicy::Custom));
        assert_eq!(serde_json::to_string(&group).expect("serialize"), text);
    }

    #[test]
    fn unknown_attestation_type_is_refused() {
        let err = serde_json::from_str::<AttestationMechanism>(r#"{"type":"password"}"#)
            .expect_err("refused");
        assert!(
            err.to_string().contains("unknown variant `password`"),
            "{err}"
        );
    }

    #[test]
    fn error_body_has_no_status_field() {
        let err = crate::ProvisioningError::NotFound("x".into());
        let body = ProvisioningServiceErrorDetails::from_error(
            &err,
            "t".into(),
            jiff::Timestamp::UNIX_EPOCH,
        );
        let json = serde_json::to_value(body).expect("json");
        assert_eq!(json["errorCode"], 404202);
        assert!(json.get("status").is_none());
    }
}
