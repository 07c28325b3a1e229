//! X.509 device authentication: the device proved in its TLS handshake that it holds the key of
//! the certificate it presented (the transport checked the handshake signature); here the
//! certificate's subject, its validity and an enrollment decide. The registration id is the
//! leaf's subject CN.

use super::*;
use crate::certificate::{self, Presented};
use crate::model::X509Attestation;

/// The answer a device gets for a certificate DPS does not accept (401002 "Invalid certificate."
/// on Azure), with what is wrong.
fn invalid(why: impl std::fmt::Display) -> ProvisioningError {
    ProvisioningError::Unauthorized(format!("Invalid certificate: {why}"))
}

/// The DER certificates of an X.509 attestation's client certificates (primary, then secondary).
fn client_certificates(attestation: &X509Attestation) -> Vec<Vec<u8>> {
    attestation
        .client_certificates
        .iter()
        .flat_map(|c| [&c.primary, &c.secondary])
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(|text| certificate::decode_to_der(text).ok())
        .collect()
}

impl Provisioning {
    /// Checks the scope and the leaf: it parses, its subject CN is the registration id, and it is
    /// valid now.
    pub(super) fn check_certificate(
        &self,
        scope: &str,
        rid: &RegistrationId,
        chain: &[Vec<u8>],
    ) -> Result<Presented, ProvisioningError> {
        if !scope.eq_ignore_ascii_case(self.id_scope.as_str()) {
            return Err(ProvisioningError::Unauthorized(
                "the ID scope is not served here".into(),
            ));
        }
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("no client certificate was presented"))?;
        let presented = certificate::presented(leaf).map_err(invalid)?;
        match presented.common_name.as_deref() {
            Some(cn) if cn.eq_ignore_ascii_case(rid.as_str()) => {}
            Some(cn) => {
                return Err(invalid(format!(
                    "the certificate's subject CN is '{cn}', not the registration id '{rid}'"
                )));
            }
            None => {
                return Err(invalid(format!(
                    "the certificate's subject has no CN; it must be the registration id '{rid}'"
                )));
            }
        }
        let now = self.clock.now().as_second();
        if now < presented.not_before {
            return Err(invalid(format!(
                "the certificate is not valid before {}",
                presented.info.not_before_utc
            )));
        }
        if now > presented.not_after {
            return Err(invalid(format!(
                "the certificate expired at {}",
                presented.info.not_after_utc
            )));
        }
        Ok(presented)
    }

    /// Finds the enrollment of a device that presented `chain` (leaf first): the individual
    /// enrollment of its registration id, which must hold the leaf as one of its client
    /// certificates.
    pub(super) async fn authenticate_x509(
        &self,
        scope: &str,
        rid: &RegistrationId,
        chain: &[Vec<u8>],
    ) -> Result<(EnrollmentRef, PresentedCertificate), ProvisioningError> {
        let presented = self.check_certificate(scope, rid, chain)?;
        let leaf = &chain[0];
        let Some(doc) = self
            .store
            .get_enrollment(EnrollmentKind::Individual, &rid.key())
            .await?
        else {
            return Err(invalid(format!(
                "no enrollment holds this certificate or one that issued it (registration id '{rid}')"
            )));
        };
        let enrollment: IndividualEnrollment = parse(&doc.doc)?;
        let attestation = match (&enrollment.attestation.kind, &enrollment.attestation.x509) {
            (AttestationType::X509, Some(x509)) => x509,
            _ => {
                return Err(invalid(
                    "the device's enrollment does not use X.509 attestation; sign a SAS token with its key instead",
                ));
            }
        };
        if !client_certificates(attestation).iter().any(|c| c == leaf) {
            return Err(invalid(
                "the certificate is not one of the enrollment's client certificates",
            ));
        }
        if !presented.self_issued {
            return Err(invalid(
                "the certificate was issued by a CA: enroll the CA (an enrollment group) or the device's own self-signed certificate",
            ));
        }
        Ok((
            EnrollmentRef {
                kind: EnrollmentKind::Individual,
                id: enrollment.registration_id,
            },
            PresentedCertificate {
                info: presented.info,
                signing_certificate_info: None,
            },
        ))
    }
}
