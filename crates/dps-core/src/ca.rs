//! CA certificates uploaded to the service, as Azure keeps them on the DPS resource
//! (`az iot dps certificate …`): a root or intermediate that signs devices' certificates, verified
//! by proof of possession (a certificate whose subject CN is a verification code the service
//! generated, signed with the CA's key) or uploaded as already verified. Enrollment groups refer to
//! them by name (`caReferences`), and a device's chain must reach a verified one.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::certificate;
use crate::error::ProvisioningError;

/// A CA certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    /// Its name, as given.
    pub name: String,
    /// Base64 of the DER.
    pub certificate: String,
    /// Whether possession of its key was proven (or asserted at upload).
    pub is_verified: bool,
    /// The code the proof-of-possession certificate must carry as its subject CN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
    /// When it was uploaded.
    pub created: String,
    /// When it last changed.
    pub updated: String,
}

/// The body of an upload: `{"certificate": …, "isVerified": …}`, or the same inside
/// `"properties"` as ARM takes it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateBody {
    /// The certificate: PEM, base64 DER or base64 PEM.
    #[serde(default)]
    pub certificate: Option<String>,
    /// Upload as already verified.
    #[serde(default)]
    pub is_verified: Option<bool>,
    /// ARM's wrapping.
    #[serde(default)]
    pub properties: Option<Box<CertificateBody>>,
}

impl CertificateBody {
    /// The certificate text and the verified flag, from either shape.
    pub fn parts(self) -> (Option<String>, bool) {
        match self.properties {
            Some(inner) if self.certificate.is_none() => inner.parts(),
            _ => (self.certificate, self.is_verified.unwrap_or(false)),
        }
    }
}

impl CaCertificate {
    /// The DER bytes.
    pub fn der(&self) -> Result<Vec<u8>, ProvisioningError> {
        B64.decode(&self.certificate)
            .map_err(|e| ProvisioningError::internal("a stored CA certificate is not base64", e))
    }

    /// The certificate as the API shows it (Azure's `CertificateResponse`); `with_code` adds the
    /// verification code (the answer to generating one).
    pub fn describe(&self, etag: &str, with_code: bool) -> Result<Value, ProvisioningError> {
        let der = self.der()?;
        let info = certificate::info_of(&der).map_err(|e| {
            ProvisioningError::internal("a stored CA certificate does not parse", e)
        })?;
        let mut properties = serde_json::json!({
            "subject": info.subject_name,
            "expiry": info.not_after_utc,
            "thumbprint": info.sha1_thumbprint,
            "sha256Thumbprint": info.sha256_thumbprint,
            "isVerified": self.is_verified,
            "created": self.created,
            "updated": self.updated,
            "certificate": self.certificate,
        });
        if with_code {
            properties["verificationCode"] = Value::from(self.verification_code.clone());
        }
        Ok(serde_json::json!({
            "name": self.name,
            "etag": etag,
            "type": "Microsoft.Devices/provisioningServices/Certificates",
            "properties": properties,
        }))
    }
}

/// Decodes an uploaded CA certificate: it must parse and be a CA.
pub fn parse_ca(text: &str) -> Result<Vec<u8>, ProvisioningError> {
    let der = certificate::decode_to_der(text)
        .map_err(|e| ProvisioningError::InvalidArgument(format!("The certificate: {e}.")))?;
    let info = certificate::info_of(&der)
        .map_err(|e| ProvisioningError::InvalidArgument(format!("The certificate: {e}.")))?;
    let is_ca = certificate::is_ca(&der)
        .map_err(|e| ProvisioningError::InvalidArgument(format!("The certificate: {e}.")))?;
    if !is_ca {
        return Err(ProvisioningError::InvalidArgument(format!(
            "The certificate '{}' is not a CA certificate (its basic constraints do not say CA:TRUE); upload the root or intermediate CA that signs your devices' certificates.",
            info.subject_name
        )));
    }
    Ok(der)
}

/// A fresh verification code: 48 hex characters, like Azure's.
pub fn new_verification_code() -> String {
    let mut bytes = [0u8; 24];
    crate::sas::fill_random(&mut bytes);
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Checks a proof of possession: `proof` (any encoding) has the subject CN `code` and is signed by
/// the key of `ca` (DER), and is valid at `now`.
pub fn check_proof(ca: &[u8], proof: &str, code: &str, now: i64) -> Result<(), ProvisioningError> {
    let invalid = |why: String| ProvisioningError::InvalidArgument(why);
    let der = certificate::decode_to_der(proof)
        .map_err(|e| invalid(format!("The verification certificate: {e}.")))?;
    let cn = certificate::common_name(&der)
        .map_err(|e| invalid(format!("The verification certificate: {e}.")))?;
    if !cn
        .as_deref()
        .is_some_and(|cn| cn.eq_ignore_ascii_case(code))
    {
        return Err(invalid(format!(
            "The verification certificate's subject CN is '{}', not the verification code '{code}'; make a certificate with CN={code}, sign it with the CA's key, and verify again.",
            cn.unwrap_or_default()
        )));
    }
    certificate::signed_by(&der, ca, now).map_err(|why| {
        invalid(format!(
            "The verification certificate is not accepted ({why}); sign a certificate with CN={code} with the private key of the uploaded certificate, valid now."
        ))
    })?;
    Ok(())
}
