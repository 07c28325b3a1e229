//! The service (management) API use cases: enrollments, enrollment groups, registration states and
//! linked hubs, with Azure's ETag rules. Front ends decode a [`ServiceRequest`], call
//! [`Management::handle`], and encode the [`ServiceResponse`].

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::Value;

use crate::access::{Authorizer, Caller, Right};
use crate::ca::{self, CaCertificate, CertificateBody};
use crate::certificate;
use crate::clock::Clock;
use crate::error::ProvisioningError;
use crate::hub::HubClient;
use crate::ids::{EnrollmentGroupId, Etag, IfMatch, RegistrationId};
use crate::linked_hub::{LinkedHub, LinkedHubRequest};
use crate::model::{
    AllocationPolicy, AttestationMechanism, AttestationType, BulkEnrollmentOperationError,
    BulkEnrollmentOperationResult, DeviceRegistrationState, Enrollment, EnrollmentGroup,
    IndividualEnrollment, OperationMode, SymmetricKeyAttestation, X509CertificateWithInfo,
    X509Certificates,
};
use crate::sas;
use crate::store::{EnrollmentKind, Precondition, Store, StoreError, StoredDoc};
use crate::time::format_utc;

/// Most items a bulk operation may carry.
pub const MAX_BULK_ITEMS: usize = 10;
/// Page size when the client does not send `x-ms-max-item-count`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a client may ask for.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Paging headers of a query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paging {
    /// `x-ms-max-item-count`.
    pub max_item_count: Option<usize>,
    /// `x-ms-continuation`.
    pub continuation: Option<String>,
}

/// Operations on one kind of enrollment.
#[derive(Debug, Clone)]
pub enum EnrollmentRequest<T> {
    /// `PUT /{kind}/{id}`: create or replace.
    Put {
        /// Id from the path.
        id: String,
        /// The body (boxed: enrollments are large).
        body: Box<T>,
        /// `If-Match`.
        if_match: IfMatch,
    },
    /// `GET /{kind}/{id}`.
    Get {
        /// Id from the path.
        id: String,
    },
    /// `DELETE /{kind}/{id}`.
    Delete {
        /// Id from the path.
        id: String,
        /// `If-Match`.
        if_match: IfMatch,
    },
    /// `POST /{kind}/{id}/attestationmechanism`: the attestation with its secrets.
    Attestation {
        /// Id from the path.
        id: String,
    },
    /// `POST /{kind}/query`.
    Query(Paging),
    /// `POST /{kind}`: bulk operation.
    Bulk {
        /// What to do.
        mode: OperationMode,
        /// Up to ten items.
        items: Vec<T>,
    },
}

/// Operations on registration states.
#[derive(Debug, Clone)]
pub enum RegistrationRequest {
    /// `GET /registrations/{id}`.
    Get {
        /// Registration id.
        id: String,
    },
    /// `DELETE /registrations/{id}`.
    Delete {
        /// Registration id.
        id: String,
        /// `If-Match`.
        if_match: IfMatch,
    },
    /// `GET /registrations/{id}/trace` (opendps extension): what the allocation webhook was asked
    /// and answered for the device's last registration.
    Trace {
        /// Registration id.
        id: String,
    },
    /// `POST /registrations/{groupId}/query`.
    QueryGroup {
        /// Enrollment group id.
        group_id: String,
        /// Paging.
        paging: Paging,
    },
}

/// Operations on linked hubs (an opendps extension; Azure does this through ARM).
#[derive(Debug, Clone)]
pub enum LinkedHubOp {
    /// `POST /linkedHubs`: link or relink a hub.
    Put(LinkedHubRequest),
    /// `GET /linkedHubs`.
    List,
    /// `DELETE /linkedHubs/{name}`.
    Delete {
        /// Hub host name.
        name: String,
    },
}

/// Operations on CA certificates (an opendps extension; Azure does this through ARM, as
/// `az iot dps certificate …`).
#[derive(Debug, Clone)]
pub enum CertificateOp {
    /// `PUT /certificates/{name}`: upload or replace.
    Put {
        /// Certificate name.
        name: String,
        /// The certificate and whether it is verified already.
        body: CertificateBody,
        /// `If-Match`.
        if_match: IfMatch,
    },
    /// `GET /certificates/{name}`.
    Get {
        /// Certificate name.
        name: String,
    },
    /// `GET /certificates`.
    List,
    /// `DELETE /certificates/{name}`.
    Delete {
        /// Certificate name.
        name: String,
        /// `If-Match`.
        if_match: IfMatch,
    },
    /// `POST /certificates/{name}/generateVerificationCode`.
    GenerateVerificationCode {
        /// Certificate name.
        name: String,
        /// `If-Match`.
        if_match: IfMatch,
    },
    /// `POST /certificates/{name}/verify` with `{"certificate": …}`: proof of possession.
    Verify {
        /// Certificate name.
        name: String,
        /// The proof: a certificate with the verification code as CN, signed by the CA's key.
        body: CertificateBody,
        /// `If-Match`.
        if_match: IfMatch,
    },
}

/// A decoded service API request.
#[derive(Debug, Clone)]
pub enum ServiceRequest {
    /// Individual enrollments.
    Enrollment(EnrollmentRequest<IndividualEnrollment>),
    /// Enrollment groups.
    Group(EnrollmentRequest<EnrollmentGroup>),
    /// Registration states.
    Registration(RegistrationRequest),
    /// Linked hubs.
    LinkedHub(LinkedHubOp),
    /// CA certificates.
    Certificate(CertificateOp),
}

impl ServiceRequest {
    /// The right a policy needs for this request.
    pub fn required_right(&self) -> Right {
        fn enrollment<T>(req: &EnrollmentRequest<T>) -> Right {
            match req {
                EnrollmentRequest::Put { .. }
                | EnrollmentRequest::Delete { .. }
                | EnrollmentRequest::Bulk { .. } => Right::EnrollmentWrite,
                EnrollmentRequest::Get { .. }
                | EnrollmentRequest::Attestation { .. }
                | EnrollmentRequest::Query(_) => Right::EnrollmentRead,
            }
        }
        match self {
            Self::Enrollment(req) => enrollment(req),
            Self::Group(req) => enrollment(req),
            Self::Registration(RegistrationRequest::Delete { .. }) => {
                Right::RegistrationStatusWrite
            }
            Self::Registration(_) => Right::RegistrationStatusRead,
            Self::LinkedHub(_) | Self::Certificate(_) => Right::ServiceConfig,
        }
    }
}

/// What the front end sends back.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceResponse {
    /// 200 with a JSON body.
    Json(Value),
    /// 200 with a page of a query: body, `x-ms-item-type`, `x-ms-continuation`, `x-ms-max-item-count`.
    Page {
        /// The items, as a JSON array.
        items: Value,
        /// `x-ms-item-type`.
        item_type: &'static str,
        /// `x-ms-continuation`, if more items follow.
        continuation: Option<String>,
        /// The page size used.
        max_item_count: usize,
    },
    /// 204.
    NoContent,
}

/// The service API.
pub struct Management {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    authorizer: Authorizer,
    hubs: Arc<dyn HubClient>,
}

impl Management {
    /// The service API over `store`, checking tokens with `authorizer`; hubs are checked through
    /// `hubs` before they are linked.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        authorizer: Authorizer,
        hubs: Arc<dyn HubClient>,
    ) -> Self {
        Self {
            store,
            clock,
            authorizer,
            hubs,
        }
    }

    /// Who is calling: `authorization` is the `Authorization` header and `host` the host the
    /// request was addressed to. Front ends call this first, before they decode the request.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        host: &str,
    ) -> Result<Caller, ProvisioningError> {
        self.authorizer.authenticate(authorization, host)
    }

    /// Carries out one request of `caller`, if its policy grants the right the request needs.
    pub async fn handle(
        &self,
        caller: &Caller,
        request: ServiceRequest,
    ) -> Result<ServiceResponse, ProvisioningError> {
        caller.require(request.required_right())?;
        match request {
            ServiceRequest::Enrollment(req) => self.enrollment_op(req).await,
            ServiceRequest::Group(req) => self.enrollment_op(req).await,
            ServiceRequest::Registration(req) => self.registration_op(req).await,
            ServiceRequest::LinkedHub(op) => self.linked_hub_op(op).await,
            ServiceRequest::Certificate(op) => self.certificate_op(op).await,
        }
    }

    async fn enrollment_op<T: Enrollment>(
        &self,
        req: EnrollmentRequest<T>,
    ) -> Result<ServiceResponse, ProvisioningError> {
        Ok(match req {
            EnrollmentRequest::Put { id, body, if_match } => {
                ServiceResponse::Json(to_json(&redact(self.put(&id, *body, if_match).await?))?)
            }
            EnrollmentRequest::Get { id } => {
                ServiceResponse::Json(to_json(&redact(self.load::<T>(&id).await?.0))?)
            }
            EnrollmentRequest::Delete { id, if_match } => {
                self.delete::<T>(&id, &if_match).await?;
                ServiceResponse::NoContent
            }
            EnrollmentRequest::Attestation { id } => {
                ServiceResponse::Json(to_json(self.load::<T>(&id).await?.0.attestation())?)
            }
            EnrollmentRequest::Query(paging) => {
                let limit = page_size(&paging)?;
                let after = decode_continuation(&paging)?;
                let page = self
                    .store
                    .list_enrollments(T::KIND, after.as_deref(), limit)
                    .await?;
                let items = page
                    .items
                    .iter()
                    .map(|d| parse_doc::<T>(d).map(redact).and_then(|e| to_json(&e)))
                    .collect::<Result<Vec<_>, _>>()?;
                ServiceResponse::Page {
                    items: Value::Array(items),
                    item_type: T::KIND.item_type(),
                    continuation: page.next.map(|k| B64URL.encode(k)),
                    max_item_count: limit,
                }
            }
            EnrollmentRequest::Bulk { mode, items } => {
                ServiceResponse::Json(to_json(&self.bulk(mode, items).await?)?)
            }
        })
    }

    /// Validates the id for `kind` and returns its storage key.
    fn key_of(kind: EnrollmentKind, id: &str) -> Result<String, ProvisioningError> {
        Ok(match kind {
            EnrollmentKind::Individual => RegistrationId::parse(id)?.key(),
            EnrollmentKind::Group => EnrollmentGroupId::parse(id)?.key(),
        })
    }

    async fn load<T: Enrollment>(&self, id: &str) -> Result<(T, Etag), ProvisioningError> {
        self.try_load(id).await?.ok_or_else(|| {
            ProvisioningError::NotFound(format!("The {} '{id}' does not exist.", T::KIND.label()))
        })
    }

    async fn try_load<T: Enrollment>(
        &self,
        id: &str,
    ) -> Result<Option<(T, Etag)>, ProvisioningError> {
        let key = Self::key_of(T::KIND, id)?;
        match self.store.get_enrollment(T::KIND, &key).await? {
            Some(doc) => Ok(Some((parse_doc(&doc)?, doc.etag))),
            None => Ok(None),
        }
    }

    /// Create or replace, with Azure's rules: no `If-Match` creates (409 if it exists), `*` creates
    /// or replaces, an etag replaces that version only (412 otherwise).
    async fn put<T: Enrollment>(
        &self,
        id: &str,
        mut body: T,
        if_match: IfMatch,
    ) -> Result<T, ProvisioningError> {
        let key = Self::key_of(T::KIND, id)?;
        if !body.id().is_empty() && !body.id().eq_ignore_ascii_case(id) {
            return Err(ProvisioningError::InvalidArgument(format!(
                "The id in the body ('{}') differs from the id in the path ('{id}').",
                body.id()
            )));
        }
        body.set_id(id.to_owned());
        body.clear_read_only();
        body.fill_defaults();
        let existing = self.try_load::<T>(id).await?;
        let label = T::KIND.label();
        match (&if_match, &existing) {
            (IfMatch::Absent, Some(_)) => {
                return Err(ProvisioningError::Conflict(format!(
                    "The {label} '{id}' already exists; send If-Match with its etag (or *) to replace it."
                )));
            }
            (IfMatch::Etag(wanted), Some((_, current))) if !current.matches(wanted) => {
                return Err(ProvisioningError::PreconditionFailed(format!(
                    "The etag {wanted} does not match the current version of the {label} '{id}'."
                )));
            }
            (IfMatch::Etag(wanted), None) => {
                return Err(ProvisioningError::PreconditionFailed(format!(
                    "If-Match {wanted} was sent but the {label} '{id}' does not exist."
                )));
            }
            _ => {}
        }
        prepare_attestation(
            T::KIND,
            body.attestation_mut(),
            existing.as_ref().map(|(e, _)| e.attestation()),
        )?;
        self.check_x509_certificates(T::KIND, &key, body.attestation_mut())
            .await?;
        validate_allocation(&body)?;
        let now = format_utc(self.clock.now());
        let created = existing
            .as_ref()
            .and_then(|(e, _)| e.created().map(str::to_owned))
            .unwrap_or_else(|| now.clone());
        let etag = Etag::generate();
        body.set_server_fields(etag.as_str().to_owned(), created, now);
        let cond = match existing {
            Some((_, current)) => Precondition::EtagIs(current),
            None => Precondition::MustNotExist,
        };
        let doc = StoredDoc {
            etag,
            doc: serde_json::to_string(&body)
                .map_err(|e| ProvisioningError::internal("serializing an enrollment", e))?,
        };
        self.store.put_enrollment(T::KIND, &key, doc, cond).await?;
        Ok(body)
    }

    async fn delete<T: Enrollment>(
        &self,
        id: &str,
        if_match: &IfMatch,
    ) -> Result<(), ProvisioningError> {
        let key = Self::key_of(T::KIND, id)?;
        let cond = self.delete_condition(
            T::KIND.label(),
            id,
            if_match,
            self.store.get_enrollment(T::KIND, &key).await?,
        )?;
        self.store.delete_enrollment(T::KIND, &key, cond).await?;
        Ok(())
    }

    /// Deletes are unconditional without `If-Match`, and 412 on a mismatching etag.
    fn delete_condition(
        &self,
        label: &str,
        id: &str,
        if_match: &IfMatch,
        current: Option<StoredDoc>,
    ) -> Result<Precondition, ProvisioningError> {
        let current = current.ok_or_else(|| {
            ProvisioningError::NotFound(format!("The {label} '{id}' does not exist."))
        })?;
        match if_match {
            IfMatch::Etag(wanted) if !current.etag.matches(wanted) => {
                Err(ProvisioningError::PreconditionFailed(format!(
                    "The etag {wanted} does not match the current version of the {label} '{id}'."
                )))
            }
            IfMatch::Etag(_) => Ok(Precondition::EtagIs(current.etag)),
            IfMatch::Absent | IfMatch::Any => Ok(Precondition::None),
        }
    }

    async fn bulk<T: Enrollment>(
        &self,
        mode: OperationMode,
        items: Vec<T>,
    ) -> Result<BulkEnrollmentOperationResult, ProvisioningError> {
        if items.is_empty() || items.len() > MAX_BULK_ITEMS {
            return Err(ProvisioningError::InvalidArgument(format!(
                "A bulk operation carries 1 to {MAX_BULK_ITEMS} items, not {}.",
                items.len()
            )));
        }
        let mut errors = Vec::new();
        for item in items {
            let id = item.id().to_owned();
            let etag = serde_json::to_value(&item)
                .ok()
                .and_then(|v| v.get("etag").and_then(Value::as_str).map(str::to_owned));
            let result = match mode {
                OperationMode::Create => self.put(&id, item, IfMatch::Absent).await.map(drop),
                OperationMode::Update => self.put(&id, item, IfMatch::Any).await.map(drop),
                OperationMode::UpdateIfMatchETag => {
                    let if_match = etag
                        .map(IfMatch::Etag)
                        .unwrap_or(IfMatch::Etag(String::new()));
                    self.put(&id, item, if_match).await.map(drop)
                }
                OperationMode::Delete => {
                    self.delete::<T>(&id, &IfMatch::from_header(etag.as_deref()))
                        .await
                }
            };
            if let Err(err) = result {
                if let Some(cause) = err.internal_cause() {
                    tracing::error!(%cause, id = %id, "bulk item failed");
                }
                let (registration_id, enrollment_group_id) = match T::KIND {
                    EnrollmentKind::Individual => (Some(id), None),
                    EnrollmentKind::Group => (None, Some(id)),
                };
                errors.push(BulkEnrollmentOperationError {
                    registration_id,
                    enrollment_group_id,
                    error_code: err.error_code(),
                    error_status: err.client_message(),
                });
            }
        }
        Ok(BulkEnrollmentOperationResult {
            is_successful: errors.is_empty(),
            errors,
        })
    }

    async fn registration_op(
        &self,
        req: RegistrationRequest,
    ) -> Result<ServiceResponse, ProvisioningError> {
        let not_found = |id: &str| {
            ProvisioningError::NotFound(format!("The registration '{id}' does not exist."))
        };
        Ok(match req {
            RegistrationRequest::Get { id } => {
                let key = RegistrationId::parse(&id)?.key();
                let doc = self
                    .store
                    .get_registration(&key)
                    .await?
                    .ok_or_else(|| not_found(&id))?;
                ServiceResponse::Json(to_json(&parse_doc::<DeviceRegistrationState>(&doc)?)?)
            }
            RegistrationRequest::Trace { id } => {
                let key = RegistrationId::parse(&id)?.key();
                let doc = self
                    .store
                    .get_registration(&key)
                    .await?
                    .ok_or_else(|| not_found(&id))?;
                let record: Value = parse_doc(&doc)?;
                let mut trace = record.get("allocationTrace").cloned();
                if let Some(stale) = record.get("staleIdentity") {
                    trace.get_or_insert_with(|| serde_json::json!({}))["staleIdentity"] =
                        stale.clone();
                }
                match trace {
                    Some(trace) => ServiceResponse::Json(trace),
                    None => {
                        return Err(ProvisioningError::NotFound(format!(
                            "The registration '{id}' has no trace: its last registration did not use custom allocation and left no identity behind on a hub."
                        )));
                    }
                }
            }
            RegistrationRequest::Delete { id, if_match } => {
                let key = RegistrationId::parse(&id)?.key();
                let cond = self.delete_condition(
                    "registration",
                    &id,
                    &if_match,
                    self.store.get_registration(&key).await?,
                )?;
                self.store.delete_registration(&key, cond).await?;
                ServiceResponse::NoContent
            }
            RegistrationRequest::QueryGroup { group_id, paging } => {
                let key = EnrollmentGroupId::parse(&group_id)?.key();
                let limit = page_size(&paging)?;
                let after = decode_continuation(&paging)?;
                let page = self
                    .store
                    .list_registrations_by_group(&key, after.as_deref(), limit)
                    .await?;
                let items = page
                    .items
                    .iter()
                    .map(|d| parse_doc::<DeviceRegistrationState>(d).and_then(|s| to_json(&s)))
                    .collect::<Result<Vec<_>, _>>()?;
                ServiceResponse::Page {
                    items: Value::Array(items),
                    item_type: "deviceRegistration",
                    continuation: page.next.map(|k| B64URL.encode(k)),
                    max_item_count: limit,
                }
            }
        })
    }

    async fn linked_hub_op(&self, op: LinkedHubOp) -> Result<ServiceResponse, ProvisioningError> {
        Ok(match op {
            LinkedHubOp::Put(req) => {
                let mut hub = LinkedHub::from_request(req)?;
                // Refuse a hub that registrations would fail on, before any device is sent there.
                let probe = self
                    .hubs
                    .probe(&hub)
                    .await
                    .map_err(|e| ProvisioningError::InvalidArgument(e.to_string()))?;
                hub.twins = probe.twins;
                self.store.put_linked_hub(&hub).await?;
                tracing::info!(hub = %hub.host_name, weight = hub.allocation_weight, twins = hub.twins, "linked hub saved");
                if !hub.twins {
                    tracing::warn!(hub = %hub.host_name, "linked hub has no device twins (Basic tier): registrations that carry an initial twin or migrate device data to it will fail with 400301");
                }
                ServiceResponse::Json(to_json(&hub.describe())?)
            }
            LinkedHubOp::List => {
                let hubs: Vec<_> = self
                    .store
                    .list_linked_hubs()
                    .await?
                    .iter()
                    .map(LinkedHub::describe)
                    .collect();
                ServiceResponse::Json(to_json(&hubs)?)
            }
            LinkedHubOp::Delete { name } => {
                self.store
                    .delete_linked_hub(&name.to_ascii_lowercase())
                    .await
                    .map_err(|err| match err {
                        StoreError::NotFound(_) => {
                            ProvisioningError::NotFound(format!("No linked hub is named '{name}'."))
                        }
                        other => other.into(),
                    })?;
                ServiceResponse::NoContent
            }
        })
    }
}

/// A CA certificate's name: 1 to 64 letters, digits, `-`, `.` or `_`.
fn certificate_key(name: &str) -> Result<String, ProvisioningError> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !valid {
        return Err(ProvisioningError::InvalidArgument(format!(
            "The certificate name '{name}' is not valid: use 1 to 64 letters, digits, '-', '.' or '_'."
        )));
    }
    Ok(name.to_ascii_lowercase())
}

impl Management {
    async fn certificate_op(
        &self,
        op: CertificateOp,
    ) -> Result<ServiceResponse, ProvisioningError> {
        let now = format_utc(self.clock.now());
        Ok(match op {
            CertificateOp::Put {
                name,
                body,
                if_match,
            } => {
                let key = certificate_key(&name)?;
                let (text, is_verified) = body.parts();
                let text = text.ok_or_else(|| {
                    ProvisioningError::InvalidArgument(
                        "The body needs a 'certificate' (PEM, base64 DER or base64 PEM).".into(),
                    )
                })?;
                let der = ca::parse_ca(&text)?;
                let existing = self.store.get_certificate(&key).await?;
                let cond =
                    self.put_condition("certificate", &name, &if_match, existing.as_ref())?;
                let created = match &existing {
                    Some(doc) => parse_doc::<CaCertificate>(doc)?.created,
                    None => now.clone(),
                };
                let cert = CaCertificate {
                    name: name.clone(),
                    certificate: base64::engine::general_purpose::STANDARD.encode(&der),
                    is_verified,
                    verification_code: None,
                    created,
                    updated: now,
                };
                let etag = self.write_certificate(&key, &cert, cond).await?;
                tracing::info!(certificate = %name, verified = is_verified, "CA certificate saved");
                ServiceResponse::Json(cert.describe(etag.as_str(), false)?)
            }
            CertificateOp::Get { name } => {
                let (_, doc, cert) = self.load_certificate(&name).await?;
                ServiceResponse::Json(cert.describe(doc.etag.as_str(), false)?)
            }
            CertificateOp::List => {
                let mut value = Vec::new();
                for doc in self.store.list_certificates().await? {
                    let cert: CaCertificate = parse_doc(&doc)?;
                    value.push(cert.describe(doc.etag.as_str(), false)?);
                }
                ServiceResponse::Json(serde_json::json!({ "value": value }))
            }
            CertificateOp::Delete { name, if_match } => {
                let key = certificate_key(&name)?;
                let existing = self.store.get_certificate(&key).await?;
                let cond = self.delete_condition("certificate", &name, &if_match, existing)?;
                self.store.delete_certificate(&key, cond).await?;
                ServiceResponse::NoContent
            }
            CertificateOp::GenerateVerificationCode { name, if_match } => {
                let (key, doc, mut cert) = self.load_certificate(&name).await?;
                let cond = self.put_condition("certificate", &name, &if_match, Some(&doc))?;
                cert.verification_code = Some(ca::new_verification_code());
                cert.updated = now;
                let etag = self.write_certificate(&key, &cert, cond).await?;
                ServiceResponse::Json(cert.describe(etag.as_str(), true)?)
            }
            CertificateOp::Verify {
                name,
                body,
                if_match,
            } => {
                let (key, doc, mut cert) = self.load_certificate(&name).await?;
                let cond = self.put_condition("certificate", &name, &if_match, Some(&doc))?;
                let code = cert.verification_code.clone().ok_or_else(|| {
                    ProvisioningError::InvalidArgument(format!(
                        "The certificate '{name}' has no verification code; generate one with `opendps certificate generate-verification-code --certificate-name {name}` first."
                    ))
                })?;
                let (proof, _) = body.parts();
                let proof = proof.ok_or_else(|| {
                    ProvisioningError::InvalidArgument(
                        "The body needs the verification 'certificate'.".into(),
                    )
                })?;
                ca::check_proof(&cert.der()?, &proof, &code, self.clock.now().as_second())?;
                cert.is_verified = true;
                cert.verification_code = None;
                cert.updated = now;
                let etag = self.write_certificate(&key, &cert, cond).await?;
                tracing::info!(certificate = %name, "CA certificate verified");
                ServiceResponse::Json(cert.describe(etag.as_str(), false)?)
            }
        })
    }

    /// An X.509 enrollment's CA references must name uploaded certificates, and no certificate may
    /// belong to two enrollments (Azure's rule): its certificates are compared with every
    /// enrollment group's (individual enrollments are told apart by their leaf's CN, which is their
    /// registration id).
    async fn check_x509_certificates(
        &self,
        kind: EnrollmentKind,
        key: &str,
        attestation: &mut AttestationMechanism,
    ) -> Result<(), ProvisioningError> {
        let Some(x509) = attestation
            .x509
            .as_ref()
            .filter(|_| attestation.kind == AttestationType::X509)
        else {
            return Ok(());
        };
        let mut mine = x509_thumbprints(x509);
        for name in ca_reference_names(x509) {
            let doc = self
                .store
                .get_certificate(&name.to_ascii_lowercase())
                .await?
                .ok_or_else(|| {
                    ProvisioningError::InvalidArgument(format!(
                        "x509.caReferences names '{name}', but no CA certificate has that name; upload it first (opendps certificate create --certificate-name {name} --path FILE)."
                    ))
                })?;
            let ca: CaCertificate = parse_doc(&doc)?;
            mine.push((
                certificate::sha256_thumbprint(&ca.der()?),
                format!("CA certificate '{name}'"),
            ));
        }
        let mut after = None;
        loop {
            let page = self
                .store
                .list_enrollments(EnrollmentKind::Group, after.as_deref(), MAX_PAGE_SIZE)
                .await?;
            for doc in &page.items {
                let group: EnrollmentGroup = parse_doc(doc)?;
                if kind == EnrollmentKind::Group
                    && group.enrollment_group_id.eq_ignore_ascii_case(key)
                {
                    continue;
                }
                let Some(theirs) = group.attestation.x509.as_ref() else {
                    continue;
                };
                let mut held = x509_thumbprints(theirs);
                for name in ca_reference_names(theirs) {
                    if let Some(doc) = self
                        .store
                        .get_certificate(&name.to_ascii_lowercase())
                        .await?
                    {
                        let ca: CaCertificate = parse_doc(&doc)?;
                        held.push((certificate::sha256_thumbprint(&ca.der()?), String::new()));
                    }
                }
                if let Some((_, what)) = mine
                    .iter()
                    .find(|(thumbprint, _)| held.iter().any(|(t, _)| t == thumbprint))
                {
                    return Err(ProvisioningError::InvalidArgument(format!(
                        "The {what} already belongs to enrollment group '{}'; a certificate may belong to one enrollment only.",
                        group.enrollment_group_id
                    )));
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// The precondition of a write to a resource that may exist (ARM's create-or-update): an
    /// `If-Match` etag must be the current one; otherwise the write must not race another.
    fn put_condition(
        &self,
        label: &str,
        id: &str,
        if_match: &IfMatch,
        existing: Option<&StoredDoc>,
    ) -> Result<Precondition, ProvisioningError> {
        match (if_match, existing) {
            (IfMatch::Etag(wanted), Some(current)) if !current.etag.matches(wanted) => {
                Err(ProvisioningError::PreconditionFailed(format!(
                    "The etag {wanted} does not match the current version of the {label} '{id}'."
                )))
            }
            (IfMatch::Etag(wanted), None) => Err(ProvisioningError::PreconditionFailed(format!(
                "If-Match {wanted} was sent but the {label} '{id}' does not exist."
            ))),
            (_, Some(current)) => Ok(Precondition::EtagIs(current.etag.clone())),
            (_, None) => Ok(Precondition::MustNotExist),
        }
    }

    /// A stored CA certificate by name: its key, its stored form and the certificate.
    async fn load_certificate(
        &self,
        name: &str,
    ) -> Result<(String, StoredDoc, CaCertificate), ProvisioningError> {
        let key = certificate_key(name)?;
        let doc = self.store.get_certificate(&key).await?.ok_or_else(|| {
            ProvisioningError::NotFound(format!(
                "No CA certificate is named '{name}'; upload it with `opendps certificate create`."
            ))
        })?;
        let cert = parse_doc(&doc)?;
        Ok((key, doc, cert))
    }

    async fn write_certificate(
        &self,
        key: &str,
        cert: &CaCertificate,
        cond: Precondition,
    ) -> Result<Etag, ProvisioningError> {
        let etag = Etag::generate();
        let doc = StoredDoc {
            etag: etag.clone(),
            doc: serde_json::to_string(cert)
                .map_err(|e| ProvisioningError::internal("serializing a certificate", e))?,
        };
        self.store.put_certificate(key, doc, cond).await?;
        Ok(etag)
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, ProvisioningError> {
    serde_json::to_value(value)
        .map_err(|e| ProvisioningError::internal("serializing a response", e))
}

fn parse_doc<T: serde::de::DeserializeOwned>(doc: &StoredDoc) -> Result<T, ProvisioningError> {
    serde_json::from_str(&doc.doc)
        .map_err(|e| ProvisioningError::internal("a stored document does not parse", e))
}

fn page_size(paging: &Paging) -> Result<usize, ProvisioningError> {
    match paging.max_item_count {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(n) => parse_page_size(&n.to_string()),
    }
}

/// The page size an `x-ms-max-item-count` of `text` asks for: an integer from 1 to
/// [`MAX_PAGE_SIZE`]; anything else (0, negative, huge, not a number) is refused alike.
pub fn parse_page_size(text: &str) -> Result<usize, ProvisioningError> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
        .ok_or_else(|| {
            ProvisioningError::InvalidArgument(format!(
                "x-ms-max-item-count must be an integer from 1 to {MAX_PAGE_SIZE}, not '{text}'; leave it out for pages of {DEFAULT_PAGE_SIZE}."
            ))
        })
}

fn decode_continuation(paging: &Paging) -> Result<Option<String>, ProvisioningError> {
    paging
        .continuation
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| {
            B64URL
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ProvisioningError::InvalidArgument(
                        "The x-ms-continuation token is not one this service issued.".into(),
                    )
                })
        })
        .transpose()
}

/// What GET shows: symmetric keys are left out entirely (as DPS does) and certificates are shown by
/// their `info` only. The attestationmechanism call returns them.
fn redact<T: Enrollment>(mut enrollment: T) -> T {
    let attestation = enrollment.attestation_mut();
    attestation.symmetric_key = None;
    if let Some(x509) = attestation.x509.as_mut() {
        for certs in [
            x509.client_certificates.as_mut(),
            x509.signing_certificates.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            for slot in [certs.primary.as_mut(), certs.secondary.as_mut()]
                .into_iter()
                .flatten()
            {
                slot.certificate = None;
            }
        }
    }
    enrollment
}

/// Validates an attestation and fills in what the server owns: generated keys, certificate info.
/// On replace, secrets left out of the body are kept from the stored version.
fn prepare_attestation(
    kind: EnrollmentKind,
    att: &mut AttestationMechanism,
    existing: Option<&AttestationMechanism>,
) -> Result<(), ProvisioningError> {
    let invalid = |m: String| ProvisioningError::InvalidArgument(m);
    match att.kind {
        AttestationType::None => {
            return Err(invalid("Attestation type 'none' cannot be used for an enrollment; use symmetricKey, x509 or tpm.".into()));
        }
        AttestationType::SymmetricKey => {
            let given = att.symmetric_key.take().unwrap_or_default();
            let kept = existing
                .and_then(|e| e.symmetric_key.clone())
                .unwrap_or_default();
            let pick = |given: Option<String>,
                        kept: Option<String>,
                        which: &str|
             -> Result<String, ProvisioningError> {
                match given.filter(|k| !k.is_empty()) {
                    Some(key) if sas::decode_key(&key).is_some() => Ok(key.trim().to_owned()),
                    Some(_) => Err(invalid(format!(
                        "The {which} symmetric key must be base64 of 16 to 64 bytes."
                    ))),
                    None => Ok(kept.unwrap_or_else(sas::generate_key)),
                }
            };
            att.symmetric_key = Some(SymmetricKeyAttestation {
                primary_key: Some(pick(given.primary_key, kept.primary_key, "primary")?),
                secondary_key: Some(pick(given.secondary_key, kept.secondary_key, "secondary")?),
            });
            att.tpm = None;
            att.x509 = None;
        }
        AttestationType::Tpm => {
            let tpm = att
                .tpm
                .as_ref()
                .ok_or_else(|| invalid("A tpm attestation needs tpm.endorsementKey.".into()))?;
            use base64::engine::general_purpose::STANDARD;
            if tpm.endorsement_key.trim().is_empty()
                || STANDARD.decode(tpm.endorsement_key.trim()).is_err()
            {
                return Err(invalid("tpm.endorsementKey must be base64.".into()));
            }
            if tpm
                .storage_root_key
                .as_ref()
                .is_some_and(|srk| STANDARD.decode(srk.trim()).is_err())
            {
                return Err(invalid("tpm.storageRootKey must be base64.".into()));
            }
            att.symmetric_key = None;
            att.x509 = None;
        }
        AttestationType::X509 => {
            let x509 = att
                .x509
                .as_mut()
                .ok_or_else(|| invalid("An x509 attestation needs an x509 object.".into()))?;
            let old = existing.and_then(|e| e.x509.as_ref());
            prepare_certificates(
                x509.client_certificates.as_mut(),
                old.and_then(|o| o.client_certificates.as_ref()),
                "clientCertificates",
            )?;
            prepare_certificates(
                x509.signing_certificates.as_mut(),
                old.and_then(|o| o.signing_certificates.as_ref()),
                "signingCertificates",
            )?;
            let has_primary =
                |c: &Option<X509Certificates>| c.as_ref().is_some_and(|c| c.primary.is_some());
            let has_ca = x509
                .ca_references
                .as_ref()
                .is_some_and(|c| c.primary.as_deref().is_some_and(|p| !p.is_empty()));
            match kind {
                EnrollmentKind::Individual if !has_primary(&x509.client_certificates) => {
                    return Err(invalid("An individual x509 enrollment needs x509.clientCertificates.primary.certificate.".into()));
                }
                EnrollmentKind::Group if !has_primary(&x509.signing_certificates) && !has_ca => {
                    return Err(invalid(
                        "An x509 enrollment group needs x509.signingCertificates.primary.certificate or x509.caReferences.primary.".into(),
                    ));
                }
                _ => {}
            }
            att.symmetric_key = None;
            att.tpm = None;
        }
    }
    Ok(())
}

/// The CA certificate names an X.509 attestation refers to.
fn ca_reference_names(x509: &crate::model::X509Attestation) -> Vec<String> {
    x509.ca_references
        .iter()
        .flat_map(|r| [r.primary.clone(), r.secondary.clone()])
        .flatten()
        .collect()
}

/// The SHA-256 thumbprints of an X.509 attestation's certificates, with what each is.
fn x509_thumbprints(x509: &crate::model::X509Attestation) -> Vec<(String, String)> {
    [
        ("clientCertificates", &x509.client_certificates),
        ("signingCertificates", &x509.signing_certificates),
    ]
    .into_iter()
    .flat_map(|(field, certs)| {
        certs
            .iter()
            .flat_map(move |c| [("primary", &c.primary), ("secondary", &c.secondary)])
            .filter_map(move |(which, c)| {
                let der = certificate::decode_to_der(c.as_ref()?.certificate.as_deref()?).ok()?;
                Some((
                    certificate::sha256_thumbprint(&der),
                    format!("certificate in x509.{field}.{which}"),
                ))
            })
    })
    .collect()
}

fn prepare_certificates(
    certs: Option<&mut X509Certificates>,
    old: Option<&X509Certificates>,
    field: &str,
) -> Result<(), ProvisioningError> {
    let Some(certs) = certs else { return Ok(()) };
    let slots = [
        (
            &mut certs.primary,
            old.and_then(|o| o.primary.as_ref()),
            "primary",
        ),
        (
            &mut certs.secondary,
            old.and_then(|o| o.secondary.as_ref()),
            "secondary",
        ),
    ];
    for (slot, old, which) in slots {
        let Some(entry) = slot.as_mut() else { continue };
        let text = match entry
            .certificate
            .as_deref()
            .filter(|c| !c.trim().is_empty())
        {
            Some(text) => text.to_owned(),
            // A client that read the enrollment and sends it back has only `info`: keep the stored certificate.
            None => match old.and_then(|o| o.certificate.clone()) {
                Some(stored) => stored,
                None if entry.info.is_none() => {
                    *slot = None;
                    continue;
                }
                None => {
                    return Err(ProvisioningError::InvalidArgument(format!(
                        "x509.{field}.{which}.certificate is missing."
                    )));
                }
            },
        };
        let parsed = certificate::parse(&text).map_err(|e| {
            ProvisioningError::InvalidArgument(format!("x509.{field}.{which}.certificate: {e}."))
        })?;
        use base64::engine::general_purpose::STANDARD;
        *entry = X509CertificateWithInfo {
            certificate: Some(STANDARD.encode(&parsed.der)),
            info: Some(parsed.info),
        };
    }
    Ok(())
}

fn validate_allocation<T: Enrollment>(enrollment: &T) -> Result<(), ProvisioningError> {
    let invalid = |m: &str| Err(ProvisioningError::InvalidArgument(m.to_owned()));
    let (policy, hubs, custom) = enrollment.allocation();
    if hubs.is_some_and(|hubs| hubs.iter().any(|h| h.trim().is_empty())) {
        return invalid("iotHubs must not contain empty host names.");
    }
    match policy {
        Some(AllocationPolicy::Static) if hubs.map_or(0, <[String]>::len) > 1 => invalid(
            "The static allocation policy takes one hub: name it in iotHubs, or name none for the first linked hub that accepts allocation.",
        ),
        Some(AllocationPolicy::Custom) => match custom {
            None => invalid(
                "The custom allocation policy needs customAllocationDefinition with webhookUrl and apiVersion.",
            ),
            Some(def)
                if !(def.webhook_url.starts_with("https://")
                    || def.webhook_url.starts_with("http://")) =>
            {
                invalid("customAllocationDefinition.webhookUrl must be an http:// or https:// URL.")
            }
            Some(def) if def.api_version.trim().is_empty() => {
                invalid("customAllocationDefinition.apiVersion must not be empty.")
            }
            Some(_) => Ok(()),
        },
        _ => Ok(()),
    }
}
