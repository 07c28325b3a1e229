//! X.509 device authentication: the device proved in its TLS handshake that it holds the key of
//! the certificate it presented (the transport checked the handshake signature); here the
//! certificate's subject, its validity and an enrollment decide. The registration id is the
//! leaf's subject CN.

use super::auth::GroupAuth;
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

    /// The uploaded CA certificates by lower-cased name: (DER, verified).
    async fn ca_certificates(&self) -> Result<HashMap<String, (Vec<u8>, bool)>, ProvisioningError> {
        let mut found = HashMap::new();
        for doc in self.store.list_certificates().await? {
            let ca: crate::ca::CaCertificate = parse(&doc.doc)?;
            found.insert(ca.name.to_ascii_lowercase(), (ca.der()?, ca.is_verified));
        }
        Ok(found)
    }

    /// Validates `chain` up to a verified CA certificate, for client authentication. Returns the
    /// certificates on the path (leaf first, the verified anchor last).
    fn verified_path(
        &self,
        chain: &[Vec<u8>],
        cas: &HashMap<String, (Vec<u8>, bool)>,
    ) -> Result<Vec<Vec<u8>>, ProvisioningError> {
        let anchors: Vec<Vec<u8>> = cas
            .values()
            .filter(|(_, verified)| *verified)
            .map(|(der, _)| der.clone())
            .collect();
        certificate::verify_path(
            chain,
            &anchors,
            self.clock.now().as_second(),
        )
        .map_err(|why| {
            invalid(format!(
                "the certificate chain does not lead to a verified CA certificate ({why}); send the chain up to it, and upload and verify the root or intermediate that issued it (opendps certificate create / verify)"
            ))
        })
    }

    /// Finds the enrollment of a device that presented `chain` (leaf first), as Azure does: the
    /// individual enrollment of its registration id, which must hold the leaf; else, walking the
    /// chain up from the leaf's issuer, the first enrollment group holding that certificate (as a
    /// signing certificate or a CA reference), or one holding the certificate that issued the top
    /// of the chain. A disabled enrollment found first stops the search (the registration is then
    /// disabled). Except for a self-signed leaf held by an individual enrollment, the chain must
    /// lead to a verified CA certificate.
    pub(super) async fn authenticate_x509(
        &self,
        scope: &str,
        rid: &RegistrationId,
        chain: &[Vec<u8>],
    ) -> Result<(EnrollmentRef, PresentedCertificate), ProvisioningError> {
        let presented = self.check_certificate(scope, rid, chain)?;
        let leaf = &chain[0];
        if let Some(doc) = self
            .store
            .get_enrollment(EnrollmentKind::Individual, &rid.key())
            .await?
        {
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
                let cas = self.ca_certificates().await?;
                self.verified_path(chain, &cas)?;
            }
            return Ok((
                EnrollmentRef {
                    kind: EnrollmentKind::Individual,
                    id: enrollment.registration_id,
                },
                PresentedCertificate {
                    info: presented.info,
                    signing_certificate_info: None,
                },
            ));
        }

        let cas = self.ca_certificates().await?;
        let groups = self.all_groups().await?;
        // Each group's certificates: its signing certificates and the CAs it refers to.
        let held: Vec<(&GroupAuth, Vec<Vec<u8>>)> = groups
            .iter()
            .map(|g| {
                let mut certs = g.signing_certificates.clone();
                certs.extend(
                    g.ca_references
                        .iter()
                        .filter_map(|name| cas.get(&name.to_ascii_lowercase()))
                        .map(|(der, _)| der.clone()),
                );
                (&**g, certs)
            })
            .filter(|(_, certs)| !certs.is_empty())
            .collect();
        let in_chain = chain[1..].iter().find_map(|cert| {
            held.iter()
                .find_map(|(g, certs)| certs.iter().find(|c| *c == cert).map(|c| (*g, c.clone())))
        });
        let now = self.clock.now().as_second();
        // The device may leave out the group's own certificate: the one that issued the top of
        // what it sent. Only certificates named as that issuer are tried, each with one path
        // validation, whose path is kept.
        let (found, path_to_group) = match in_chain {
            Some(found) => (Some(found), None),
            None => {
                let top = chain.last().unwrap_or(leaf);
                held.iter()
                    .find_map(|(g, certs)| {
                        certs.iter().find_map(|c| {
                            if !certificate::names_issuer(c, top) {
                                return None;
                            }
                            certificate::verify_path(chain, std::slice::from_ref(c), now)
                                .ok()
                                .map(|path| ((*g, c.clone()), path))
                        })
                    })
                    .map_or((None, None), |(found, path)| (Some(found), Some(path)))
            }
        };
        let Some((group, signing)) = found else {
            return Err(invalid(format!(
                "no enrollment holds this certificate or one that issued it (registration id '{rid}'); enroll the device, or its CA in an enrollment group"
            )));
        };
        let group_verified = cas
            .values()
            .any(|(der, verified)| *verified && *der == signing);
        // A path to the group's certificate is a path to a verified one when that is verified;
        // otherwise the chain must reach a verified CA certificate through it.
        if !(group_verified && path_to_group.is_some()) {
            let path = self.verified_path(chain, &cas)?;
            if !group_verified && !path.contains(&signing) {
                return Err(invalid(format!(
                    "the chain reaches a verified CA certificate, but not through enrollment group '{}''s certificate",
                    group.id
                )));
            }
        }
        Ok((
            EnrollmentRef {
                kind: EnrollmentKind::Group,
                id: group.id.clone(),
            },
            PresentedCertificate {
                info: presented.info,
                signing_certificate_info: certificate::info_of(&signing).ok(),
            },
        ))
    }
}
