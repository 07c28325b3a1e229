//! The registration record: how an enrollment reads for registration, and the state a device and
//! the service API see.

use super::*;

/// What registration needs of either kind of enrollment.
pub(super) struct EnrollmentView {
    pub(super) status: ProvisioningStatus,
    pub(super) policy: Option<AllocationPolicy>,
    pub(super) iot_hubs: Option<Vec<String>>,
    pub(super) initial_twin: Option<InitialTwin>,
    pub(super) reprovision: ReprovisionPolicy,
    pub(super) iot_edge: bool,
    pub(super) device_id: Option<String>,
    pub(super) credentials: ViewCredentials,
    pub(super) webhook_url: Option<String>,
}

/// What a device authenticates to its hub with, as the enrollment decides it.
pub(super) enum ViewCredentials {
    /// Symmetric keys: the enrollment's, or the group's derived for the device.
    Keys(Secret, Secret),
    /// X.509: the thumbprints of the enrollment's client certificates (none in a group, where
    /// the device's own certificate is used).
    Certificates(Vec<String>),
}

impl EnrollmentView {
    /// The identity's authentication on the hub: SAS keys, or `selfSigned` with the thumbprints of
    /// the enrollment's client certificates, or of the certificate the device presented (the
    /// primary doubles as the secondary when there is one).
    pub(super) fn hub_authentication(
        &self,
        presented: Option<&PresentedCertificate>,
    ) -> HubAuthentication {
        match &self.credentials {
            ViewCredentials::Keys(primary, secondary) => HubAuthentication::Sas {
                primary_key: primary.clone(),
                secondary_key: secondary.clone(),
            },
            ViewCredentials::Certificates(thumbprints) => {
                let leaf = presented.map(|p| p.info.sha256_thumbprint.clone());
                let mut thumbprints = thumbprints.iter().cloned().chain(leaf);
                let primary = thumbprints.next().unwrap_or_default();
                let secondary = thumbprints.next().unwrap_or_else(|| primary.clone());
                HubAuthentication::SelfSigned {
                    primary_thumbprint: primary,
                    secondary_thumbprint: secondary,
                }
            }
        }
    }

    /// Reads an enrollment document; a group's keys are derived for `registration_id`.
    pub(super) fn parse(
        kind: EnrollmentKind,
        doc: &str,
        registration_id: &str,
    ) -> Result<Self, ProvisioningError> {
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
        if kind == EnrollmentKind::Group {
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
                credentials: match g.attestation.kind {
                    AttestationType::X509 => ViewCredentials::Certificates(Vec::new()),
                    _ => {
                        let (primary, secondary) = derive(symmetric_keys(&g.attestation));
                        ViewCredentials::Keys(primary, secondary)
                    }
                },
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
                credentials: match &e.attestation.x509 {
                    Some(x509) if e.attestation.kind == AttestationType::X509 => {
                        ViewCredentials::Certificates(
                            x509.client_certificates
                                .iter()
                                .flat_map(|c| [&c.primary, &c.secondary])
                                .flatten()
                                .filter_map(|c| c.certificate.as_deref())
                                .filter_map(|t| crate::certificate::decode_to_der(t).ok())
                                .map(|der| crate::certificate::sha256_thumbprint(&der))
                                .collect(),
                        )
                    }
                    _ => ViewCredentials::Keys(
                        Secret::new(sym.primary_key.unwrap_or_default()),
                        Secret::new(sym.secondary_key.unwrap_or_default()),
                    ),
                },
                webhook_url: e.custom_allocation_definition.map(|d| d.webhook_url),
            })
        }
    }
}

pub(super) fn result_of(record: &RegistrationRecord) -> DeviceRegistrationResult {
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
        symmetric_key: record
            .certificate
            .is_none()
            .then(|| SymmetricKeyRegistrationResult {
                enrollment_group_id: record.enrollment_group_id.clone(),
            }),
        x509: record
            .certificate
            .as_ref()
            .map(|certificate| X509RegistrationResult {
                certificate_info: Some(certificate.info.clone()),
                enrollment_group_id: record.enrollment_group_id.clone(),
                signing_certificate_info: certificate.signing_certificate_info.clone(),
            }),
    }
}

impl Provisioning {
    pub(super) fn new_record(&self, op: &Operation, now: &str) -> RegistrationRecord {
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
            enrollment_group_id: op.enrollment.group_id(),
            allocation_trace: None,
            certificate: op.certificate.clone(),
            stale_identity: None,
        }
    }
}
