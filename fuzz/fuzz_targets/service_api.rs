//! A whole HTTP request through the service API decoder: method, path, `If-Match` and paging
//! headers, and JSON bodies (enrollments, groups, bulk operations, linked hubs, CA certificates
//! and proofs of possession) become a typed
//! request or a client error, never a panic. What the decoded request carries is then parsed the way
//! the management layer parses it: ids, certificates (PEM, base64 DER or base64 PEM, then X.509)
//! and linked-hub connection strings.

#![no_main]

use dps_core::ids::{EnrollmentGroupId, RegistrationId};
use dps_core::linked_hub::LinkedHub;
use dps_core::management::{
    CertificateOp, EnrollmentRequest, LinkedHubOp, RegistrationRequest, ServiceRequest,
};
use dps_core::model::{AttestationMechanism, X509Certificates};
use dps_core::{ca, certificate};
use libfuzzer_sys::fuzz_target;
use opendps_fuzz::HttpRequest;

fuzz_target!(|data: &[u8]| {
    let Some(request) = HttpRequest::parse(data) else {
        return;
    };
    let Ok(decoded) = dps_http::decode_service_request(
        &request.method,
        &request.path,
        &request.headers,
        request.body,
    ) else {
        return;
    };
    let _ = decoded.required_right();
    match decoded {
        ServiceRequest::Enrollment(request) => {
            enrollment(request, RegistrationId::parse, |e| &e.attestation)
        }
        ServiceRequest::Group(request) => {
            enrollment(request, EnrollmentGroupId::parse, |g| &g.attestation)
        }
        ServiceRequest::Registration(
            RegistrationRequest::Get { id }
            | RegistrationRequest::Delete { id, .. }
            | RegistrationRequest::Trace { id },
        ) => {
            let _ = RegistrationId::parse(&id);
        }
        ServiceRequest::Registration(RegistrationRequest::QueryGroup { group_id, .. }) => {
            let _ = EnrollmentGroupId::parse(&group_id);
        }
        ServiceRequest::LinkedHub(LinkedHubOp::Put(request)) => {
            if let Ok(hub) = LinkedHub::from_request(request) {
                let _ = hub.describe();
            }
        }
        ServiceRequest::LinkedHub(LinkedHubOp::List | LinkedHubOp::Delete { .. }) => {}
        ServiceRequest::Certificate(CertificateOp::Put { body, .. }) => {
            if let (Some(text), _) = body.parts() {
                let _ = ca::parse_ca(&text);
            }
        }
        ServiceRequest::Certificate(CertificateOp::Verify { body, .. }) => {
            if let (Some(proof), _) = body.parts() {
                // The proof is checked against itself as the CA: every parse path runs.
                if let Ok(der) = certificate::decode_to_der(&proof) {
                    let _ = ca::check_proof(&der, &proof, "0123456789ABCDEF", 0);
                }
            }
        }
        ServiceRequest::Certificate(
            CertificateOp::Get { .. }
            | CertificateOp::List
            | CertificateOp::Delete { .. }
            | CertificateOp::GenerateVerificationCode { .. },
        ) => {}
    }
});

/// Validates the path id and parses every certificate of each enrollment in the request.
fn enrollment<T, I, E>(
    request: EnrollmentRequest<T>,
    parse_id: fn(&str) -> Result<I, E>,
    attestation: fn(&T) -> &AttestationMechanism,
) {
    match request {
        EnrollmentRequest::Put { id, body, .. } => {
            let _ = parse_id(&id);
            certificates(attestation(&body));
        }
        EnrollmentRequest::Bulk { items, .. } => {
            for item in &items {
                certificates(attestation(item));
            }
        }
        EnrollmentRequest::Get { id }
        | EnrollmentRequest::Delete { id, .. }
        | EnrollmentRequest::Attestation { id } => {
            let _ = parse_id(&id);
        }
        EnrollmentRequest::Query(_) => {}
    }
}

fn certificates(attestation: &AttestationMechanism) {
    let Some(x509) = &attestation.x509 else {
        return;
    };
    let all: [&Option<X509Certificates>; 2] =
        [&x509.client_certificates, &x509.signing_certificates];
    for certs in all.into_iter().flatten() {
        for entry in [&certs.primary, &certs.secondary].into_iter().flatten() {
            if let Some(text) = &entry.certificate {
                let _ = certificate::parse(text);
            }
        }
    }
}
