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
    pub(super) keys: (Secret, Secret),
    pub(super) webhook_url: Option<String>,
}

impl EnrollmentView {
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
        symmetric_key: Some(SymmetricKeyRegistrationResult {
            enrollment_group_id: record.enrollment_group_id.clone(),
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
            stale_identity: None,
        }
    }
}
