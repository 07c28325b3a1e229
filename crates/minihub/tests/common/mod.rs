//! Scaffolding shared by minihub's test binaries: a throwaway CA with a server certificate for the
//! hub names a test uses, and the time tokens count from.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA (its PEM, for clients to trust) and a server configuration with a certificate it issued.
pub struct TestTls {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// TLS 1.2 and 1.3, offering HTTP/2 and HTTP/1.1.
    pub server: Arc<rustls::ServerConfig>,
}

/// A new CA and a server certificate for `names`.
pub fn tls_for(names: &[&str]) -> TestTls {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let leaf = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .expect("leaf params")
        .signed_by(&key, &issuer)
        .expect("leaf cert");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("server config");
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestTls {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    }
}

/// Unix seconds now, for token expiries.
pub fn now() -> i64 {
    dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_second()
}
