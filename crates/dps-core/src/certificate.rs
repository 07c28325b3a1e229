//! X.509 certificates as enrollments carry them: PEM text, base64 DER, or base64 of PEM text.
//!
//! The service API stores the DER and answers with `X509CertificateInfo`, the summary DPS shows.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::model::X509CertificateInfo;

/// A parsed certificate.
#[derive(Debug, Clone)]
pub struct ParsedCertificate {
    /// The DER bytes.
    pub der: Vec<u8>,
    /// The summary shown by the service API.
    pub info: X509CertificateInfo,
}

/// Why a certificate string was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The text is neither PEM, base64 DER nor base64 PEM.
    #[error("the certificate is not PEM, base64-encoded DER or base64-encoded PEM")]
    Encoding,
    /// The bytes are not an X.509 certificate.
    #[error("the certificate could not be parsed: {0}")]
    Parse(String),
}

/// Decodes any of the three accepted encodings into DER bytes.
pub fn decode_to_der(text: &str) -> Result<Vec<u8>, CertificateError> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        return pem_to_der(text);
    }
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = B64
        .decode(compact.as_bytes())
        .map_err(|_| CertificateError::Encoding)?;
    match std::str::from_utf8(&bytes) {
        Ok(inner) if inner.trim_start().starts_with("-----BEGIN") => pem_to_der(inner),
        _ => Ok(bytes),
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertificateError> {
    let body: String = pem
        .lines()
        .skip_while(|line| !line.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END"))
        .flat_map(|line| line.trim().chars())
        .collect();
    if body.is_empty() {
        return Err(CertificateError::Encoding);
    }
    B64.decode(body.as_bytes())
        .map_err(|_| CertificateError::Encoding)
}

/// Parses a certificate string in any accepted encoding.
pub fn parse(text: &str) -> Result<ParsedCertificate, CertificateError> {
    let der = decode_to_der(text)?;
    let info = info_of(&der)?;
    Ok(ParsedCertificate { der, info })
}

/// The `X509CertificateInfo` summary of a DER certificate.
pub fn info_of(der: &[u8]) -> Result<X509CertificateInfo, CertificateError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertificateError::Parse(
            "trailing bytes after the certificate".into(),
        ));
    }
    let timestamp = |t: x509_parser::time::ASN1Time| {
        jiff::Timestamp::from_second(t.timestamp())
            .map(crate::time::format_utc)
            .map_err(|e| CertificateError::Parse(e.to_string()))
    };
    Ok(X509CertificateInfo {
        subject_name: cert.subject().to_string(),
        sha1_thumbprint: hex_upper(&Sha1::digest(der)),
        sha256_thumbprint: hex_upper(&Sha256::digest(der)),
        issuer_name: cert.issuer().to_string(),
        not_before_utc: timestamp(cert.validity().not_before)?,
        not_after_utc: timestamp(cert.validity().not_after)?,
        serial_number: hex_upper(cert.raw_serial()),
        version: i32::try_from(cert.version().0).unwrap_or(0) + 1,
    })
}

/// What device authentication needs of a presented certificate.
#[derive(Debug, Clone)]
pub struct Presented {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// Start of validity (unix seconds).
    pub not_before: i64,
    /// End of validity (unix seconds).
    pub not_after: i64,
    /// Whether the subject and issuer names are the same (a self-issued certificate).
    pub self_issued: bool,
    /// The summary results and the service API show.
    pub info: X509CertificateInfo,
}

/// Reads a DER certificate a device presented.
pub fn presented(der: &[u8]) -> Result<Presented, CertificateError> {
    let info = info_of(der)?;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::Parse(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(Presented {
        common_name,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
        info,
    })
}

/// The SHA-256 thumbprint of a DER certificate, upper-case hex (as IoT Hub shows it).
pub fn sha256_thumbprint(der: &[u8]) -> String {
    hex_upper(&Sha256::digest(der))
}

/// Whether a DER certificate is a CA (basic constraints `CA:TRUE`).
pub fn is_ca(der: &[u8]) -> Result<bool, CertificateError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::Parse(e.to_string()))?;
    Ok(cert.is_ca())
}

/// The subject CN of a DER certificate, if it has one.
pub fn common_name(der: &[u8]) -> Result<Option<String>, CertificateError> {
    Ok(presented(der)?.common_name)
}

/// Whether `issuer`'s subject name is `cert`'s issuer name (byte for byte, as path building
/// compares them): the cheap test before a signature is checked. False when either does not parse.
pub fn names_issuer(issuer: &[u8], cert: &[u8]) -> bool {
    let (Ok((_, issuer)), Ok((_, cert))) = (
        X509Certificate::from_der(issuer),
        X509Certificate::from_der(cert),
    ) else {
        return false;
    };
    issuer.subject().as_raw() == cert.issuer().as_raw()
}

/// Validates the path from `chain[0]` (the end entity) through the intermediates in
/// `chain[1..]` to one of `anchors` at `now` (unix seconds): signatures, validity periods, basic
/// constraints and path lengths, and TLS client authentication where the end entity names
/// extended key usages at all. Returns the DER of every certificate on the path found, the end
/// entity first and the anchor last.
pub fn verify_path(
    chain: &[Vec<u8>],
    anchors: &[Vec<u8>],
    now: i64,
) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let leaf = chain.first().ok_or("no certificate")?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| e.to_string())?;
    let anchor_ders: Vec<CertificateDer<'_>> = anchors
        .iter()
        .map(|a| CertificateDer::from(a.as_slice()))
        .collect();
    let trust: Vec<_> = anchor_ders
        .iter()
        .filter_map(|a| webpki::anchor_from_trusted_cert(a).ok())
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now).unwrap_or(0),
    ));
    let path = end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &trust,
            &intermediates,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| e.to_string())?;
    let mut on_path = vec![leaf.clone()];
    on_path.extend(path.intermediate_certificates().map(|c| c.der().to_vec()));
    let anchor = path.anchor();
    // The anchor is one of `anchors`: find its DER by its subject and key.
    if let Some(found) = anchors.iter().zip(&anchor_ders).find_map(|(der, cert)| {
        webpki::anchor_from_trusted_cert(cert)
            .ok()
            .filter(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            })
            .map(|_| der.clone())
    }) {
        on_path.push(found);
    }
    Ok(on_path)
}

/// Checks that the key of `issuer` (DER) signed `cert` (DER) and that `cert` is valid at `now`
/// (unix seconds). Unlike [`verify_path`] this takes any certificate version: proofs of
/// possession made with `openssl x509 -req`, as the DPS documentation shows, are version 1.
pub fn signed_by(cert: &[u8], issuer: &[u8], now: i64) -> Result<(), String> {
    use rustls_pki_types::CertificateDer;
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| e.to_string())?;
    let validity = parsed.validity();
    if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
        return Err(format!(
            "it is valid from {} to {} only",
            validity.not_before, validity.not_after
        ));
    }
    let issuer_der = CertificateDer::from(issuer);
    let issuer = webpki::EndEntityCert::try_from(&issuer_der).map_err(|e| e.to_string())?;
    let message = parsed.tbs_certificate.as_ref();
    let signature = parsed.signature_value.data.as_ref();
    // A signature that verifies under any algorithm with the issuer's key was made with that key.
    webpki::ALL_VERIFICATION_ALGS
        .iter()
        .any(|alg| issuer.verify_signature(*alg, message, signature).is_ok())
        .then_some(())
        .ok_or_else(|| "the signature does not verify with the CA's public key".to_owned())
}

/// The SHA-1 thumbprint of a DER certificate, upper-case hex.
pub fn sha1_thumbprint(der: &[u8]) -> String {
    hex_upper(&Sha1::digest(der))
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_cert() -> (String, Vec<u8>) {
        let cert = rcgen::generate_simple_self_signed(vec!["device-1".into()]).expect("rcgen");
        (cert.cert.pem(), cert.cert.der().to_vec())
    }

    #[test]
    fn three_encodings_give_the_same_der() {
        let (pem, der) = test_cert();
        assert_eq!(decode_to_der(&pem).expect("pem"), der);
        assert_eq!(decode_to_der(&B64.encode(&der)).expect("b64 der"), der);
        assert_eq!(
            decode_to_der(&B64.encode(pem.as_bytes())).expect("b64 pem"),
            der
        );
    }

    #[test]
    fn info_is_filled() {
        let (pem, der) = test_cert();
        let parsed = parse(&pem).expect("parse");
        assert_eq!(parsed.info.version, 3);
        assert_eq!(parsed.info.sha256_thumbprint.len(), 64);
        assert_eq!(parsed.info.sha1_thumbprint.len(), 40);
        assert_eq!(
            parsed.info.sha256_thumbprint,
            hex_upper(&Sha256::digest(&der))
        );
        assert!(parsed.info.not_after_utc.ends_with('Z'));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(parse("hello"), Err(CertificateError::Encoding)));
        assert!(matches!(
            parse(&B64.encode(b"not a certificate")),
            Err(CertificateError::Parse(_))
        ));
        assert!(parse("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----").is_err());
    }

    #[test]
    fn signed_by_accepts_the_issuers_signature_only_while_valid() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_der = ca.self_signed(&ca_key).expect("ca").der().to_vec();
        let other_key = KeyPair::generate().expect("key");
        let mut proof = CertificateParams::new(vec!["ABC123".into()]).expect("params");
        proof.not_before = rcgen::date_time_ymd(2020, 1, 1);
        proof.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let leaf_key = KeyPair::generate().expect("key");
        let signed = |key: &KeyPair| {
            proof
                .signed_by(&leaf_key, &Issuer::from_params(&ca, key))
                .expect("signed")
                .der()
                .to_vec()
        };
        let now = 1_800_000_000; // 2027
        assert_eq!(signed_by(&signed(&ca_key), &ca_der, now), Ok(()));
        let forged = signed_by(&signed(&other_key), &ca_der, now).expect_err("another key");
        assert!(forged.contains("does not verify"), "{forged}");
        let expired = signed_by(&signed(&ca_key), &ca_der, 1_900_000_000).expect_err("2030");
        assert!(expired.contains("valid from"), "{expired}");
    }
}
