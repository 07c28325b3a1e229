//! The settings shared by `enrollment` and `enrollment-group` create/update, applied to the document
//! that is sent to the service. Every value is one of the core's wire types (`dps_core::model`),
//! so the names of policies and fields exist once, there.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use dps_core::model::{
    AllocationPolicy, AttestationMechanism, AttestationType, CustomAllocationDefinition,
    DeviceCapabilities, ReprovisionPolicy, SymmetricKeyAttestation, TpmAttestation,
    X509Attestation, X509CAReferences, X509CertificateWithInfo, X509Certificates,
};
use serde_json::{Map, Value, json};

use super::ProvisioningStatusArg;

/// Individual enrollment or enrollment group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/enrollments`.
    Individual,
    /// `/enrollmentGroups`.
    Group,
}

impl Kind {
    pub(super) fn path(self) -> &'static str {
        match self {
            Self::Individual => "enrollments",
            Self::Group => "enrollmentGroups",
        }
    }

    pub(super) fn id_field(self) -> &'static str {
        match self {
            Self::Individual => "registrationId",
            Self::Group => "enrollmentGroupId",
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Individual => "enrollment",
            Self::Group => "enrollment group",
        }
    }

    pub(super) fn columns(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Individual => &[
                ("REGISTRATION ID", "registrationId"),
                ("ATTESTATION", "attestation.type"),
                ("STATUS", "provisioningStatus"),
                ("ALLOCATION", "allocationPolicy"),
                ("ETAG", "etag"),
            ],
            Self::Group => &[
                ("GROUP ID", "enrollmentGroupId"),
                ("ATTESTATION", "attestation.type"),
                ("STATUS", "provisioningStatus"),
                ("ALLOCATION", "allocationPolicy"),
                ("ETAG", "etag"),
            ],
        }
    }
}

/// `--attestation-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttestationArg {
    /// Symmetric keys (group devices use keys derived from the group key).
    Symmetrickey,
    /// X.509 certificates.
    X509,
    /// TPM endorsement key (individual enrollments only).
    Tpm,
}

/// `--allocation-policy`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AllocationArg {
    /// Weighted hash over the linked hubs.
    Hashed,
    /// Lowest latency (region labels when self-hosted).
    Geolatency,
    /// The one hub in --iot-hubs (none: the first linked hub accepting allocation).
    Static,
    /// Ask the webhook in --webhook-url.
    Custom,
}

/// `--reprovision-policy`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReprovisionArg {
    /// Re-evaluate the hub and migrate twin and identity.
    Reprovisionandmigratedata,
    /// Re-evaluate the hub and reset to the initial twin.
    Reprovisionandresetdata,
    /// Keep the device where it is.
    Never,
}

/// Enrollment settings, named as `az iot dps` names them.
#[derive(Debug, Clone, Default, Args)]
pub struct EnrollmentSettings {
    /// How devices attest [default on create: symmetrickey].
    #[arg(long, value_enum, ignore_case = true)]
    pub attestation_type: Option<AttestationArg>,
    /// Primary symmetric key (base64, 16-64 bytes); generated when omitted.
    #[arg(long)]
    pub primary_key: Option<String>,
    /// Secondary symmetric key; generated when omitted.
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// PEM or DER file of the primary certificate (device cert for an enrollment, signing cert for a group).
    #[arg(long, visible_alias = "cp")]
    pub certificate_path: Option<PathBuf>,
    /// PEM or DER file of the secondary certificate.
    #[arg(long, visible_alias = "scp")]
    pub secondary_certificate_path: Option<PathBuf>,
    /// Name of an uploaded CA certificate (groups).
    #[arg(long, visible_alias = "ca-name")]
    pub root_ca_name: Option<String>,
    /// Name of a second uploaded CA certificate (groups).
    #[arg(long)]
    pub secondary_root_ca_name: Option<String>,
    /// TPM endorsement key, base64 (individual enrollments).
    #[arg(long)]
    pub endorsement_key: Option<String>,
    /// Device id to create on the hub (individual enrollments; default: the registration id).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Whether devices may register.
    #[arg(long, value_enum, ignore_case = true)]
    pub provisioning_status: Option<ProvisioningStatusArg>,
    /// How to choose the hub.
    #[arg(long, value_enum, ignore_case = true)]
    pub allocation_policy: Option<AllocationArg>,
    /// Hub host names devices may be assigned to (space-separated).
    #[arg(long, num_args = 1.., value_delimiter = ' ')]
    pub iot_hubs: Option<Vec<String>>,
    /// Webhook URL for custom allocation.
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Service API version of the enrollment sent to the webhook [default: 2021-10-01].
    #[arg(long)]
    pub api_version: Option<String>,
    /// Initial twin tags, a JSON object.
    #[arg(long)]
    pub initial_twin_tags: Option<String>,
    /// Initial twin desired properties, a JSON object.
    #[arg(long)]
    pub initial_twin_properties: Option<String>,
    /// What happens when a device registers again.
    #[arg(long, value_enum, ignore_case = true)]
    pub reprovision_policy: Option<ReprovisionArg>,
    /// Whether devices are IoT Edge devices.
    #[arg(long, action = clap::ArgAction::Set)]
    pub edge_enabled: Option<bool>,
}

fn json_object(flag: &str, text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text)
        .with_context(|| format!("{flag} is not valid JSON"))?
    {
        Value::Object(map) => Ok(map),
        _ => bail!("{flag} must be a JSON object such as '{{\"deviceType\":\"toaster\"}}'"),
    }
}

/// A wire value as JSON.
fn wire(value: impl serde::Serialize) -> anyhow::Result<Value> {
    serde_json::to_value(value).context("while building the request")
}

impl From<AllocationArg> for AllocationPolicy {
    fn from(arg: AllocationArg) -> Self {
        match arg {
            AllocationArg::Hashed => Self::Hashed,
            AllocationArg::Geolatency => Self::GeoLatency,
            AllocationArg::Static => Self::Static,
            AllocationArg::Custom => Self::Custom,
        }
    }
}

impl From<ReprovisionArg> for ReprovisionPolicy {
    fn from(arg: ReprovisionArg) -> Self {
        let (update_hub_assignment, migrate_device_data) = match arg {
            ReprovisionArg::Reprovisionandmigratedata => (true, true),
            ReprovisionArg::Reprovisionandresetdata => (true, false),
            ReprovisionArg::Never => (false, true),
        };
        Self {
            update_hub_assignment,
            migrate_device_data,
        }
    }
}

fn read_cert(path: &PathBuf) -> anyhow::Result<X509CertificateWithInfo> {
    let bytes = std::fs::read(path).with_context(|| format!("while reading {}", path.display()))?;
    let text = match String::from_utf8(bytes) {
        Ok(text) if text.contains("-----BEGIN") => text,
        Ok(text) => text,
        Err(raw) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(raw.into_bytes())
        }
    };
    Ok(X509CertificateWithInfo {
        certificate: Some(text),
        info: None,
    })
}

impl EnrollmentSettings {
    fn touches_attestation(&self) -> bool {
        self.attestation_type.is_some()
            || self.primary_key.is_some()
            || self.secondary_key.is_some()
            || self.certificate_path.is_some()
            || self.secondary_certificate_path.is_some()
            || self.root_ca_name.is_some()
            || self.secondary_root_ca_name.is_some()
            || self.endorsement_key.is_some()
    }

    /// Applies the settings to `doc`. On create, absent settings take the service defaults.
    pub fn apply(&self, kind: Kind, doc: &mut Value, creating: bool) -> anyhow::Result<()> {
        if kind == Kind::Group && (self.device_id.is_some() || self.endorsement_key.is_some()) {
            bail!("--device-id and --endorsement-key apply to individual enrollments only");
        }
        let obj = doc
            .as_object_mut()
            .context("the service returned a non-object")?;
        if creating || self.touches_attestation() {
            let current = obj
                .get("attestation")
                .and_then(|a| a["type"].as_str())
                .map(str::to_owned);
            let kind_arg = self.attestation_type.unwrap_or(match current.as_deref() {
                Some("x509") => AttestationArg::X509,
                Some("tpm") => AttestationArg::Tpm,
                _ => AttestationArg::Symmetrickey,
            });
            obj.insert(
                "attestation".into(),
                wire(self.attestation(kind, kind_arg)?)?,
            );
        }
        if let Some(device_id) = &self.device_id {
            obj.insert("deviceId".into(), json!(device_id));
        }
        if let Some(status) = self.provisioning_status {
            obj.insert("provisioningStatus".into(), wire(status.wire())?);
        }
        if let Some(policy) = self.allocation_policy {
            obj.insert(
                "allocationPolicy".into(),
                wire(AllocationPolicy::from(policy))?,
            );
        }
        if let Some(hubs) = &self.iot_hubs {
            obj.insert(
                "iotHubs".into(),
                json!(hubs.iter().filter(|h| !h.is_empty()).collect::<Vec<_>>()),
            );
        }
        if self.webhook_url.is_some() || self.api_version.is_some() {
            let existing = obj
                .get("customAllocationDefinition")
                .cloned()
                .unwrap_or(Value::Null);
            let url = self
                .webhook_url
                .clone()
                .or_else(|| existing["webhookUrl"].as_str().map(str::to_owned));
            let url = url.context("--api-version needs --webhook-url (custom allocation)")?;
            let api = self
                .api_version
                .clone()
                .or_else(|| existing["apiVersion"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "2021-10-01".into());
            obj.insert(
                "customAllocationDefinition".into(),
                wire(CustomAllocationDefinition {
                    webhook_url: url,
                    api_version: api,
                })?,
            );
        }
        if self.initial_twin_tags.is_some() || self.initial_twin_properties.is_some() {
            let twin = obj.entry("initialTwin").or_insert_with(|| json!({}));
            if let Some(tags) = &self.initial_twin_tags {
                twin["tags"] = Value::Object(json_object("--initial-twin-tags", tags)?);
            }
            if let Some(props) = &self.initial_twin_properties {
                twin["properties"] =
                    json!({"desired": json_object("--initial-twin-properties", props)?});
            }
        }
        if let Some(policy) = self.reprovision_policy {
            obj.insert(
                "reprovisionPolicy".into(),
                wire(ReprovisionPolicy::from(policy))?,
            );
        }
        if let Some(edge) = self.edge_enabled {
            obj.insert(
                "capabilities".into(),
                wire(DeviceCapabilities { iot_edge: edge })?,
            );
        }
        Ok(())
    }

    fn attestation(
        &self,
        kind: Kind,
        which: AttestationArg,
    ) -> anyhow::Result<AttestationMechanism> {
        let none = |kind| AttestationMechanism {
            kind,
            tpm: None,
            x509: None,
            symmetric_key: None,
        };
        Ok(match which {
            AttestationArg::Symmetrickey => AttestationMechanism {
                symmetric_key: Some(SymmetricKeyAttestation {
                    primary_key: self.primary_key.clone(),
                    secondary_key: self.secondary_key.clone(),
                }),
                ..none(AttestationType::SymmetricKey)
            },
            AttestationArg::Tpm => {
                if kind == Kind::Group {
                    bail!("enrollment groups cannot use TPM attestation");
                }
                let ek = self
                    .endorsement_key
                    .as_ref()
                    .context("TPM attestation needs --endorsement-key")?;
                AttestationMechanism {
                    tpm: Some(TpmAttestation {
                        endorsement_key: ek.clone(),
                        storage_root_key: None,
                    }),
                    ..none(AttestationType::Tpm)
                }
            }
            AttestationArg::X509 => {
                let primary = self.certificate_path.as_ref().map(read_cert).transpose()?;
                let secondary = self
                    .secondary_certificate_path
                    .as_ref()
                    .map(read_cert)
                    .transpose()?;
                let certificates = (primary.is_some() || secondary.is_some())
                    .then_some(X509Certificates { primary, secondary });
                let ca_references = (self.root_ca_name.is_some()
                    || self.secondary_root_ca_name.is_some())
                .then(|| X509CAReferences {
                    primary: self.root_ca_name.clone(),
                    secondary: self.secondary_root_ca_name.clone(),
                });
                if certificates.is_none() && ca_references.is_none() {
                    bail!(
                        "x509 attestation needs --certificate-path (or --root-ca-name for a group)"
                    );
                }
                let (client_certificates, signing_certificates) = match kind {
                    Kind::Group => (None, certificates),
                    Kind::Individual => (certificates, None),
                };
                AttestationMechanism {
                    x509: Some(X509Attestation {
                        client_certificates,
                        signing_certificates,
                        ca_references,
                    }),
                    ..none(AttestationType::X509)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tutorial_group_settings() {
        let settings = EnrollmentSettings {
            allocation_policy: Some(AllocationArg::Custom),
            webhook_url: Some("https://example/api/alloc?code=x".into()),
            iot_hubs: Some(vec!["a-toasters-hub".into(), "b-heatpumps-hub".into()]),
            initial_twin_tags: Some(r#"{"site":"hq"}"#.into()),
            reprovision_policy: Some(ReprovisionArg::Reprovisionandresetdata),
            ..Default::default()
        };
        let mut doc = json!({"enrollmentGroupId": "g"});
        settings.apply(Kind::Group, &mut doc, true).expect("apply");
        assert_eq!(
            doc["attestation"],
            json!({"type": "symmetricKey", "symmetricKey": {}})
        );
        assert_eq!(
            doc["customAllocationDefinition"]["apiVersion"],
            "2021-10-01"
        );
        assert_eq!(doc["reprovisionPolicy"]["migrateDeviceData"], false);
        assert_eq!(doc["initialTwin"]["tags"]["site"], "hq");
    }

    #[test]
    fn update_without_attestation_flags_keeps_attestation() {
        let mut doc = json!({"registrationId": "d", "attestation": {"type": "x509", "x509": {}}});
        let settings = EnrollmentSettings {
            provisioning_status: Some(ProvisioningStatusArg::Disabled),
            ..Default::default()
        };
        settings
            .apply(Kind::Individual, &mut doc, false)
            .expect("apply");
        assert_eq!(doc["attestation"]["type"], "x509");
        assert_eq!(doc["provisioningStatus"], "disabled");
    }

    #[test]
    fn bad_flags_are_explained() {
        let bad_json = EnrollmentSettings {
            initial_twin_tags: Some("[1]".into()),
            ..Default::default()
        };
        assert!(bad_json.apply(Kind::Group, &mut json!({}), true).is_err());
        let tpm_group = EnrollmentSettings {
            attestation_type: Some(AttestationArg::Tpm),
            ..Default::default()
        };
        assert!(tpm_group.apply(Kind::Group, &mut json!({}), true).is_err());
    }
}
