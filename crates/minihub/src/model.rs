//! Wire types of the IoT Hub service API, named as in the service's swagger (`Device`, `Twin`,
//! `AuthenticationMechanism`, …), and the hub's own description (policies and keys).

use std::collections::BTreeMap;

use dps_core::secret::Secret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The timestamp IoT Hub reports for "never" (for example `lastActivityTime` of a new device).
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// A right a shared access policy grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessRight {
    /// Read the identity registry (devices, twins, queries).
    RegistryRead,
    /// Write the identity registry.
    RegistryWrite,
    /// Back-end service access: twins, queries, cloud-to-device.
    ServiceConnect,
    /// Device-facing endpoints on behalf of any device.
    DeviceConnect,
}

/// A shared access policy of a hub, with its two keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubPolicy {
    /// The policy name, sent as `skn` (`iothubowner`, `service`, …).
    pub name: String,
    /// Primary key, base64 of 64 random bytes.
    pub primary_key: Secret,
    /// Secondary key, base64 of 64 random bytes.
    pub secondary_key: Secret,
    /// What the policy allows.
    pub rights: Vec<AccessRight>,
}

impl HubPolicy {
    /// The policies every new hub gets, with fresh keys, as Azure creates them.
    pub(crate) fn defaults() -> Vec<Self> {
        use AccessRight::*;
        let policy = |name: &str, rights: &[AccessRight]| Self {
            name: name.to_owned(),
            primary_key: Secret::new(dps_core::sas::generate_key()),
            secondary_key: Secret::new(dps_core::sas::generate_key()),
            rights: rights.to_vec(),
        };
        vec![
            policy(
                "iothubowner",
                &[RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
            ),
            policy("service", &[ServiceConnect]),
            policy("device", &[DeviceConnect]),
            policy("registryRead", &[RegistryRead]),
            policy("registryReadWrite", &[RegistryRead, RegistryWrite]),
        ]
    }

    /// Whether the policy grants any of `rights`.
    pub fn grants_any(&self, rights: &[AccessRight]) -> bool {
        rights.iter().any(|r| self.rights.contains(r))
    }

    /// `HostName={host_name};SharedAccessKeyName={name};SharedAccessKey={primary}`. `host_name` may
    /// carry a port for clients that must reach the hub on a non-standard one.
    pub fn connection_string(&self, host_name: &str) -> String {
        format!(
            "HostName={host_name};SharedAccessKeyName={};SharedAccessKey={}",
            self.name,
            self.primary_key.expose()
        )
    }
}

/// A virtual hub: its host name and policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubInfo {
    /// The host name, lower case, such as `contoso-toasters-hub-1.azure-devices.net`.
    pub host_name: String,
    /// The shared access policies.
    pub policies: Vec<HubPolicy>,
}

impl HubInfo {
    /// The policy named `name` (policy names compare case-insensitively, as in Azure).
    pub fn policy(&self, name: &str) -> Option<&HubPolicy> {
        self.policies
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// The `iothubowner` connection string.
    pub fn connection_string(&self) -> String {
        self.policy("iothubowner")
            .map(|p| p.connection_string(&self.host_name))
            .unwrap_or_default()
    }
}

/// Whether a device may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// The device may connect.
    Enabled,
    /// Connections are refused.
    Disabled,
}

/// How a device authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthenticationType {
    /// Symmetric keys (SAS tokens).
    #[serde(rename = "sas")]
    Sas,
    /// A self-signed X.509 certificate identified by thumbprint.
    #[serde(rename = "selfSigned")]
    SelfSigned,
    /// An X.509 certificate issued by a CA the hub trusts.
    #[serde(rename = "certificateAuthority")]
    CertificateAuthority,
}

/// `SymmetricKey`: the device's two base64 keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    /// Primary key.
    #[serde(default)]
    pub primary_key: Option<Secret>,
    /// Secondary key.
    #[serde(default)]
    pub secondary_key: Option<Secret>,
}

/// `X509Thumbprint`: hex SHA-1 or SHA-256 thumbprints of the device's certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    /// Primary thumbprint.
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    /// Secondary thumbprint.
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
}

/// `AuthenticationMechanism` as IoT Hub returns it: both sub-objects always present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationMechanism {
    /// Keys, for `sas`; both null otherwise.
    pub symmetric_key: SymmetricKey,
    /// Thumbprints, for `selfSigned`; both null otherwise.
    pub x509_thumbprint: X509Thumbprint,
    /// The mechanism.
    #[serde(rename = "type")]
    pub kind: AuthenticationType,
}

/// `DeviceCapabilities`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    /// Whether the device is an IoT Edge device.
    #[serde(default)]
    pub iot_edge: bool,
}

/// `Device`: a device identity as the registry returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// The device id (case-sensitive).
    pub device_id: String,
    /// Distinguishes identities that reused a deleted device's id.
    pub generation_id: String,
    /// The identity's version, unquoted as IoT Hub puts it in bodies.
    pub etag: String,
    /// Always `Disconnected`: minihub keeps no device connections.
    pub connection_state: String,
    /// Enabled or disabled.
    pub status: DeviceStatus,
    /// Why the status was set, if the caller said.
    pub status_reason: Option<String>,
    /// When the connection state last changed.
    pub connection_state_updated_time: String,
    /// When the status last changed.
    pub status_updated_time: String,
    /// When the device was last seen.
    pub last_activity_time: String,
    /// Queued cloud-to-device messages.
    pub cloud_to_device_message_count: u32,
    /// How the device authenticates.
    pub authentication: AuthenticationMechanism,
    /// Device capabilities.
    pub capabilities: DeviceCapabilities,
    /// The scope of an IoT Edge device (`ms-azure-iot-edge://{id}-{generation}`), or for a
    /// device behind one, its parent's scope.
    #[serde(default)]
    pub device_scope: Option<String>,
    /// The scopes of an IoT Edge device's parents (nested Edge).
    #[serde(default)]
    pub parent_scopes: Vec<String>,
}

/// The authentication part of a `PUT /devices/{id}` body, as lenient as IoT Hub.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationRequest {
    /// Keys; empty or absent keys with `type: sas` are generated.
    #[serde(default)]
    pub symmetric_key: Option<SymmetricKey>,
    /// Thumbprints for `selfSigned`.
    #[serde(default)]
    pub x509_thumbprint: Option<X509Thumbprint>,
    /// `sas`, `selfSigned` or `certificateAuthority`; absent means `sas`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

/// The body of `PUT /devices/{id}`: what a client may set on an identity. Other fields (etag,
/// generationId, …) are accepted and ignored, as IoT Hub does.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRequest {
    /// Must match the id in the path when given.
    #[serde(default)]
    pub device_id: Option<String>,
    /// `enabled` (default) or `disabled`, any case.
    #[serde(default)]
    pub status: Option<String>,
    /// Free text kept with the status.
    #[serde(default)]
    pub status_reason: Option<String>,
    /// How the device authenticates; absent means generated SAS keys.
    #[serde(default)]
    pub authentication: Option<AuthenticationRequest>,
    /// Capabilities; absent means none.
    #[serde(default)]
    pub capabilities: Option<DeviceCapabilities>,
    /// The device's scope; absent means none (an IoT Edge device then gets its own).
    #[serde(default)]
    pub device_scope: Option<String>,
    /// The parents' scopes; absent means none.
    #[serde(default)]
    pub parent_scopes: Option<Vec<String>>,
}

/// `TwinProperties`: desired and reported properties, each with `$metadata` and `$version`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinProperties {
    /// Written by the back end.
    #[serde(default)]
    pub desired: Map<String, Value>,
    /// Written by the device.
    #[serde(default)]
    pub reported: Map<String, Value>,
}

/// `Twin`: a device twin as the service API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// The device id.
    pub device_id: String,
    /// The twin's version as an opaque tag, unquoted.
    pub etag: String,
    /// The device identity's etag.
    pub device_etag: String,
    /// The device's status.
    pub status: DeviceStatus,
    /// When the status last changed.
    pub status_update_time: String,
    /// Always `Disconnected`.
    pub connection_state: String,
    /// When the device was last seen.
    pub last_activity_time: String,
    /// Queued cloud-to-device messages.
    pub cloud_to_device_message_count: u32,
    /// `sas`, `selfSigned` or `certificateAuthority`.
    pub authentication_type: AuthenticationType,
    /// The device's thumbprints (null for other mechanisms).
    pub x509_thumbprint: X509Thumbprint,
    /// The Plug and Play model id; empty.
    pub model_id: String,
    /// Increments on every twin change.
    pub version: u64,
    /// Back-end-only tags.
    pub tags: Map<String, Value>,
    /// Desired and reported properties.
    pub properties: TwinProperties,
    /// Device capabilities.
    pub capabilities: DeviceCapabilities,
}

/// A device-to-cloud message received over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMessage {
    /// When the hub accepted it.
    pub enqueued_time: jiff::Timestamp,
    /// The body, as sent.
    pub body: bytes::Bytes,
    /// Application properties, from `iothub-app-{name}` headers.
    pub properties: BTreeMap<String, String>,
    /// System properties such as `messageid`, `correlationid`, `contenttype`, from the other
    /// `iothub-{name}` headers (names lower case, without the prefix).
    pub system_properties: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policies_and_connection_string() {
        let hub = HubInfo {
            host_name: "h.example".into(),
            policies: HubPolicy::defaults(),
        };
        let owner = hub.policy("IOTHUBOWNER").expect("owner");
        assert!(owner.grants_any(&[AccessRight::RegistryWrite]));
        assert!(
            !hub.policy("registryRead")
                .expect("policy")
                .grants_any(&[AccessRight::RegistryWrite])
        );
        assert_eq!(
            hub.connection_string(),
            format!(
                "HostName=h.example;SharedAccessKeyName=iothubowner;SharedAccessKey={}",
                owner.primary_key.expose()
            )
        );
        assert_ne!(owner.primary_key, owner.secondary_key);
    }

    #[test]
    fn device_serializes_like_iot_hub() {
        let device = Device {
            device_id: "d1".into(),
            generation_id: "638000000000000000".into(),
            etag: "MTIz".into(),
            connection_state: "Disconnected".into(),
            status: DeviceStatus::Enabled,
            status_reason: None,
            connection_state_updated_time: NEVER.into(),
            status_updated_time: NEVER.into(),
            last_activity_time: NEVER.into(),
            cloud_to_device_message_count: 0,
            authentication: AuthenticationMechanism {
                symmetric_key: SymmetricKey {
                    primary_key: Some(Secret::new("a")),
                    secondary_key: Some(Secret::new("b")),
                },
                x509_thumbprint: X509Thumbprint::default(),
                kind: AuthenticationType::Sas,
            },
            capabilities: DeviceCapabilities::default(),
            device_scope: None,
            parent_scopes: Vec::new(),
        };
        let json = serde_json::to_value(&device).expect("json");
        assert_eq!(json["authentication"]["type"], "sas");
        assert_eq!(json["authentication"]["symmetricKey"]["primaryKey"], "a");
        assert_eq!(
            json["authentication"]["x509Thumbprint"]["primaryThumbprint"],
            Value::Null
        );
        assert_eq!(json["status"], "enabled");
        assert_eq!(json["capabilities"]["iotEdge"], false);
        assert_eq!(json["cloudToDeviceMessageCount"], 0);
    }
}
