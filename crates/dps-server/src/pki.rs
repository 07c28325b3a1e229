//! TLS for the listeners: a development CA made on first start, a server certificate issued by it at
//! every start (so it always covers the configured names), or the operator's own files.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::datadir::{DataDir, write_private};

/// The names every development certificate covers.
const DEFAULT_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A certificate chain and key to serve.
pub struct ServerIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

/// Loads the configured certificate, or issues one from the development CA (creating the CA on
/// first start). Returns whether the CA was created just now.
pub fn server_identity(
    config: &TlsConfig,
    data: &DataDir,
) -> anyhow::Result<(ServerIdentity, bool)> {
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        return Ok((load_files(cert, key)?, false));
    }
    let (issuer, created) = development_ca(data)?;
    let key = KeyPair::generate().context("while generating the server key")?;
    let mut names: Vec<String> = DEFAULT_NAMES.iter().map(|n| (*n).to_owned()).collect();
    for name in config
        .names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
    {
        if !names.iter().any(|known| known.eq_ignore_ascii_case(name)) {
            names.push(name.to_owned());
        }
    }
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "opendps server");
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .with_context(|| format!("'{n}' is not a valid DNS name")),
        })
        .collect::<anyhow::Result<_>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params
        .signed_by(&key, &issuer)
        .context("while issuing the server certificate")?;
    let tls = data.tls_dir();
    std::fs::write(tls.join("server.pem"), cert.pem())?;
    write_private(&tls.join("server-key.pem"), key.serialize_pem().as_bytes())?;
    let identity = ServerIdentity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("server key: {e}"))?,
    };
    Ok((identity, created))
}

fn development_ca(data: &DataDir) -> anyhow::Result<(Issuer<'static, KeyPair>, bool)> {
    let (cert_path, key_path) = (data.ca_file(), data.tls_dir().join("ca-key.pem"));
    if cert_path.exists() && key_path.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path)?)
            .context("while reading the development CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(&cert_path)?, key)
            .context("while reading the development CA")?;
        return Ok((issuer, false));
    }
    let key = KeyPair::generate().context("while generating the CA key")?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "opendps development CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params
        .self_signed(&key)
        .context("while creating the development CA")?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())?;
    Ok((Issuer::new(params, key), true))
}

fn load_files(cert: &Path, key: &Path) -> anyhow::Result<ServerIdentity> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("while reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("while reading {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("while reading {}", key.display()))?;
    Ok(ServerIdentity { chain, key })
}

impl Clone for ServerIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The TLS configuration of the MQTT and AMQP listeners: as [`server_config`], without ALPN
/// (their clients offer none, or names of their own that must not make the handshake fail).
pub fn device_server_config(identity: ServerIdentity) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = Arc::unwrap_or_clone(server_config(identity)?);
    config.alpn_protocols.clear();
    Ok(Arc::new(config))
}

/// A rustls server configuration offering TLS 1.3 and 1.2 (the Python device SDK speaks 1.2 only),
/// asking clients for a certificate without requiring one.
pub fn server_config(identity: ServerIdentity) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // X.509 devices present their certificates; every other client may present none.
    let client_auth = tls_accept::RequestClientCertificates::new(&provider);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("while choosing TLS versions")?
        .with_client_cert_verifier(client_auth)
        .with_single_cert(identity.chain, identity.key)
        .context("the server certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
