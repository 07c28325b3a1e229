//! Wire types of the DPS device API (swagger `device.json`): what a device sends to register and
//! what it reads back while polling.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{AssignedDeviceSubstatus, EnrollmentStatus, TpmAttestation};

/// `DeviceRegistration`: the body of a register request. Every field is optional in practice:
/// C# over MQTT sends no body at all, Python sends `"payload": null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistration {
    /// The registration id; the path (or MQTT username) is authoritative.
    #[serde(default)]
    pub registration_id: Option<String>,
    /// TPM keys (TPM attestation).
    #[serde(default)]
    pub tpm: Option<TpmAttestation>,
    /// Custom data for the allocation webhook.
    #[serde(default)]
    pub payload: Option<Value>,
}

impl DeviceRegistration {
    /// Decodes a request body. Empty bodies (C# over MQTT), whitespace (poll payloads), `{}` and
    /// `"payload": null` all mean "nothing special".
    pub fn from_body(body: &[u8]) -> Result<Self, crate::ProvisioningError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        serde_json::from_slice(body)
            .map_err(|e| crate::ProvisioningError::InvalidBody(e.to_string()))
    }
}

/// `SymmetricKeyRegistrationResult`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyRegistrationResult {
    /// The group the device registered through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
}

/// `X509RegistrationResult`: what an X.509 device registered with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationResult {
    /// The device's (leaf) certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_info: Option<crate::model::X509CertificateInfo>,
    /// The group the device registered through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The group's certificate that the device's chain led to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<crate::model::X509CertificateInfo>,
}

/// `DeviceRegistrationResult`: the registration state a device reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationResult {
    /// Registration id.
    pub registration_id: String,
    /// First registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// Hub host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Device id on that hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Status.
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
    /// Payload from the allocation webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Present for symmetric-key attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyRegistrationResult>,
    /// Present for X.509 attestation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
}

/// `RegistrationOperationStatus`: the answer to register and to every poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationOperationStatus {
    /// Opaque id to poll with.
    pub operation_id: String,
    /// `assigning` until terminal.
    pub status: EnrollmentStatus,
    /// The result, once terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationResult>,
}

impl RegistrationOperationStatus {
    /// The status a poll is answered with, on every transport: 202 (poll again after Retry-After)
    /// while assigning, 200 once the registration is terminal.
    pub fn response_status(&self) -> u16 {
        if self.status.is_terminal() { 200 } else { 202 }
    }

    /// The HTTP (or MQTT response) status of the answer to a register request: 202 whatever the
    /// body, also when it already carries the final status (the registration finished while the
    /// request waited). The C# SDK's HTTP transport refuses any other status to a register request;
    /// every SDK reads the body's `status` first.
    pub const REGISTER_RESPONSE_STATUS: u16 = 202;
}

impl EnrollmentStatus {
    /// Whether no more work will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Assigned | Self::Failed | Self::Disabled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_devices_send() {
        assert_eq!(
            DeviceRegistration::from_body(b"").expect("empty"),
            DeviceRegistration::default()
        );
        assert_eq!(
            DeviceRegistration::from_body(b" ").expect("space"),
            DeviceRegistration::default()
        );
        assert_eq!(
            DeviceRegistration::from_body(b"{}").expect("{}"),
            DeviceRegistration::default()
        );
        let python = DeviceRegistration::from_body(br#"{"payload": null, "registrationId": "d"}"#)
            .expect("null payload");
        assert_eq!(
            (python.payload, python.registration_id.as_deref()),
            (None, Some("d"))
        );
        assert!(DeviceRegistration::from_body(b"{oops").is_err());
    }
}
