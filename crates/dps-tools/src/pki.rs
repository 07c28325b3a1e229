//! A test PKI for trying X.509 attestation: a root CA, an intermediate CA the root signs, and
//! device certificates the intermediate signs, all made in memory with fresh keys. It backs
//! `opendps certificate make-test-chain` and `opendps bench --attestation x509`. Test material
//! only: the keys are not encrypted and the CA names say so.

use anyhow::Context as _;
use dps_device::ClientIdentity;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A root, an intermediate, and the means to sign device certificates with the intermediate.
pub struct TestChain {
    /// The root CA certificate (PEM): upload it to the service and verify it.
    pub root_pem: String,
    /// The root's private key (PEM), to sign a proof of possession with.
    pub root_key_pem: String,
    /// The intermediate CA certificate (PEM), which devices send after their own.
    pub intermediate_pem: String,
    /// The intermediate's private key (PEM).
    pub intermediate_key_pem: String,
    intermediate: CertificateParams,
    intermediate_key: KeyPair,
}

impl TestChain {
    /// Makes a root and an intermediate with new keys.
    pub fn generate() -> anyhow::Result<Self> {
        let root = ca_params("opendps TEST root CA - not for production")?;
        let root_key = KeyPair::generate()?;
        let root_cert = root.self_signed(&root_key)?;
        let intermediate = ca_params("opendps TEST intermediate CA - not for production")?;
        let intermediate_key = KeyPair::generate()?;
        let intermediate_cert =
            intermediate.signed_by(&intermediate_key, &Issuer::from_params(&root, &root_key))?;
        Ok(Self {
            root_pem: root_cert.pem(),
            root_key_pem: root_key.serialize_pem(),
            intermediate_pem: intermediate_cert.pem(),
            intermediate_key_pem: intermediate_key.serialize_pem(),
            intermediate,
            intermediate_key,
        })
    }

    /// A device certificate for `registration_id` (its subject CN, for client authentication)
    /// with a new key: the chain is the device's certificate followed by the intermediate, which
    /// is what a device sends.
    pub fn device(&self, registration_id: &str) -> anyhow::Result<ClientIdentity> {
        let mut params = CertificateParams::new(Vec::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, registration_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.intermediate, &self.intermediate_key);
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("while signing the certificate of {registration_id}"))?;
        Ok(ClientIdentity {
            chain_pem: format!("{}{}", cert.pem(), self.intermediate_pem).into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        })
    }
}

fn ca_params(cn: &str) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_core::certificate;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;

    #[test]
    fn a_device_certificate_chains_to_the_root_for_client_auth_and_names_the_device() {
        let chain = TestChain::generate().expect("chain");
        let device = chain.device("sensor-1").expect("device");
        let sent: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&device.chain_pem)
            .map(|c| c.expect("pem").to_vec())
            .collect();
        assert_eq!(
            sent.len(),
            2,
            "the device's certificate, then the intermediate"
        );
        assert_eq!(
            certificate::common_name(&sent[0]).expect("cn").as_deref(),
            Some("sensor-1")
        );
        let root = certificate::decode_to_der(&chain.root_pem).expect("root");
        assert!(certificate::is_ca(&root).expect("parses"));
        let now = dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_second();
        let path = certificate::verify_path(&sent, std::slice::from_ref(&root), now)
            .expect("a valid path");
        assert_eq!(path.len(), 3);
        assert_eq!(path[2], root);
    }
}
