//! A development minihub: `cargo run -p minihub --example serve -- [HUB_NAME] [PORT] [MQTT_PORT]`.
//!
//! Opens a throwaway database, ensures the hub (default `localhost`), issues a CA and a server
//! certificate for it, serves the REST API on 127.0.0.1:PORT (default: any free port) and the
//! device MQTT API on 127.0.0.1:MQTT_PORT (default 8883, where the device SDKs connect), and prints
//! the CA file and the `iothubowner` connection string with the port, ready for the official service
//! SDKs (`REQUESTS_CA_BUNDLE=<ca file>` for Python). Stops on Ctrl-C.

use std::error::Error;
use std::net::IpAddr;
use std::sync::Arc;

use minihub::Minihub;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn san(name: &str) -> Result<SanType, Box<dyn Error>> {
    Ok(match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.to_owned().try_into()?),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let hub_name = args.next().unwrap_or_else(|| "localhost".to_owned());
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(0);
    let mqtt_port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(8883);

    let dir = tempfile::tempdir()?;
    let minihub = Arc::new(Minihub::open(&dir.path().join("minihub.db"))?);
    let hub = minihub.ensure_hub(&hub_name).await?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "minihub development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name
        .push(DnType::CommonName, hub.host_name.clone());
    let mut names = vec![
        hub.host_name.clone(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    names.dedup();
    leaf.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
    let leaf = leaf.signed_by(&key, &issuer)?;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem())?;

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::try_from(key.serialize_der())?,
        )?;
    // MQTT clients offer no ALPN; the HTTPS listener gets its own copy with h2.
    let mqtt_tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls.clone()));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    let mqtt_listener = tokio::net::TcpListener::bind(("127.0.0.1", mqtt_port)).await?;
    let owner = hub
        .policy("iothubowner")
        .ok_or("the hub has no iothubowner policy")?;
    println!("CA file: {}", ca_file.display());
    println!(
        "connection string: {}",
        owner.connection_string(&format!("{}:{port}", hub.host_name))
    );
    println!(
        "device MQTT: 127.0.0.1:{}",
        mqtt_listener.local_addr()?.port()
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    tokio::spawn(dps_mqtt::serve(
        mqtt_listener,
        mqtt_tls,
        Arc::new(minihub::HubMqtt::new(Arc::clone(&minihub))),
        dps_mqtt::MqttLimits::default(),
        stopped.clone(),
    ));
    dps_http::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        minihub::router(minihub),
        dps_http::HttpLimits::default(),
        stopped,
    )
    .await;
    Ok(())
}
