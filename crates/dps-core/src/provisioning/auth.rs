//! Device authentication: the token's form, resource and expiry, then its signature against the
//! individual enrollment's keys or each symmetric-key group's keys derived for the device; groups
//! are kept parsed per etag.

use super::*;

/// An enrollment group as authentication sees it: its id and decoded symmetric keys (none for
/// other attestation types).
pub(super) struct GroupAuth {
    pub(super) id: String,
    pub(super) keys: Vec<Vec<u8>>,
    /// X.509: the signing certificates (DER) the group holds.
    pub(super) signing_certificates: Vec<Vec<u8>>,
    /// X.509: the names of the uploaded CA certificates the group refers to.
    pub(super) ca_references: Vec<String>,
}

/// Versions of groups kept parsed; the cache starts over past this many.
pub(super) const GROUP_AUTH_CACHE: usize = 4096;

/// Decoded primary and secondary keys of a symmetric-key attestation.
pub(super) fn symmetric_keys(att: &crate::model::AttestationMechanism) -> Option<Vec<Vec<u8>>> {
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

pub(super) fn verify(token: &SasToken, keys: &[Vec<u8>]) -> Result<usize, sas::SasError> {
    token.verify_signature(keys.iter().map(Vec::as_slice))
}

impl Provisioning {
    /// Checks the token's form, resource and expiry; the signature is checked against enrollments.
    pub(super) fn check_token(
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
            unauthorized(
                "no credentials: send a SharedAccessSignature (symmetric-key attestation) or present a client certificate in the TLS handshake (X.509 attestation)",
            )
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
    pub(super) fn signed_by_group(
        token: &SasToken,
        group: &GroupAuth,
        rid: &RegistrationId,
    ) -> bool {
        let derived: Vec<Vec<u8>> = group
            .keys
            .iter()
            .map(|k| sas::derive_device_key_bytes(k, rid.as_str()))
            .collect();
        !derived.is_empty() && verify(token, &derived).is_ok()
    }

    /// The parsed group with this etag, if it was seen before.
    pub(super) fn cached_group(&self, etag: &Etag) -> Option<Arc<GroupAuth>> {
        let cache = self.group_auth.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(etag.as_str()).map(Arc::clone)
    }

    /// What authentication needs of a stored group, parsed once per version of it (its etag).
    pub(super) fn group_auth(&self, doc: &StoredDoc) -> Result<Arc<GroupAuth>, ProvisioningError> {
        if let Some(hit) = self.cached_group(&doc.etag) {
            return Ok(hit);
        }
        let group: EnrollmentGroup = parse(&doc.doc)?;
        let mut cache = self.group_auth.lock().unwrap_or_else(|e| e.into_inner());
        let x509 = group
            .attestation
            .x509
            .as_ref()
            .filter(|_| group.attestation.kind == AttestationType::X509);
        let auth = Arc::new(GroupAuth {
            id: group.enrollment_group_id,
            keys: symmetric_keys(&group.attestation).unwrap_or_default(),
            signing_certificates: x509
                .and_then(|x| x.signing_certificates.as_ref())
                .into_iter()
                .flat_map(|c| [&c.primary, &c.secondary])
                .flatten()
                .filter_map(|c| c.certificate.as_deref())
                .filter_map(|t| crate::certificate::decode_to_der(t).ok())
                .collect(),
            ca_references: x509
                .and_then(|x| x.ca_references.as_ref())
                .into_iter()
                .flat_map(|r| [&r.primary, &r.secondary])
                .flatten()
                .cloned()
                .collect(),
        });
        if cache.len() >= GROUP_AUTH_CACHE {
            cache.clear();
        }
        cache.insert(doc.etag.as_str().to_owned(), Arc::clone(&auth));
        Ok(auth)
    }

    /// Finds the enrollment the device authenticates against: by its SAS token, or by the
    /// certificates it presented when it sent no token. Returns the certificate an X.509 device
    /// authenticated with.
    pub(super) async fn authenticate(
        &self,
        scope: &str,
        rid: &RegistrationId,
        credentials: Credentials<'_>,
    ) -> Result<(EnrollmentRef, Option<PresentedCertificate>), ProvisioningError> {
        match credentials.sas {
            None if !credentials.certificates.is_empty() => {
                let (enrollment, certificate) = self
                    .authenticate_x509(scope, rid, credentials.certificates)
                    .await?;
                Ok((enrollment, Some(certificate)))
            }
            sas => Ok((self.authenticate_sas(scope, rid, sas).await?, None)),
        }
    }

    /// Checks what can be checked without the store: the scope, and the token's form, resource and
    /// expiry, or the certificate's subject and validity.
    pub(super) fn check_credentials(
        &self,
        scope: &str,
        rid: &RegistrationId,
        credentials: Credentials<'_>,
    ) -> Result<(), ProvisioningError> {
        match credentials.sas {
            None if !credentials.certificates.is_empty() => self
                .check_certificate(scope, rid, credentials.certificates)
                .map(drop),
            sas => self.check_token(scope, rid, sas).map(drop),
        }
    }

    /// Every enrollment group, parsed for authentication (from the cache when unchanged).
    pub(super) async fn all_groups(&self) -> Result<Vec<Arc<GroupAuth>>, ProvisioningError> {
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
        Ok(groups)
    }

    /// Finds the enrollment the device's token was signed for. An individual enrollment takes
    /// precedence; otherwise every symmetric-key group is tried with the key derived for this device
    /// (the group key itself never verifies).
    pub(super) async fn authenticate_sas(
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
                unauthorized(
                    "the device's enrollment does not use symmetric-key attestation; present its X.509 certificate instead of a SAS token",
                )
            })?;
            verify(&token, &keys)
                .map_err(|_| unauthorized("the signature does not match the enrollment's keys"))?;
            return Ok(EnrollmentRef {
                kind: EnrollmentKind::Individual,
                id: enrollment.registration_id,
            });
        }
        let mut groups = self.all_groups().await?;
        if groups.len() > 1 {
            // The group the device used last time first: it is almost always the one.
            let hint = self
                .registration(&key)
                .await?
                .and_then(|(r, _)| r.enrollment_group_id);
            groups.sort_by_key(|g| Some(&g.id) != hint.as_ref());
        }
        match groups
            .into_iter()
            .find(|g| Self::signed_by_group(&token, g, rid))
        {
            Some(group) => Ok(EnrollmentRef {
                kind: EnrollmentKind::Group,
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
    pub(super) async fn authenticate_as(
        &self,
        scope: &str,
        rid: &RegistrationId,
        credentials: Credentials<'_>,
        enrollment: &EnrollmentRef,
    ) -> Result<(), ProvisioningError> {
        let sas = match credentials.sas {
            // An X.509 device is checked in full: the chain walk is the search.
            None if !credentials.certificates.is_empty() => {
                return self.authenticate(scope, rid, credentials).await.map(drop);
            }
            sas => sas,
        };
        let token = self.check_token(scope, rid, sas)?;
        let kind = enrollment.kind;
        if let Some(doc) = self
            .store
            .get_enrollment(kind, &enrollment.id.to_ascii_lowercase())
            .await?
        {
            let accepted = if enrollment.kind == EnrollmentKind::Group {
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
        self.authenticate_sas(scope, rid, sas).await.map(drop)
    }
}
