//! The listener's TLS: versions 1.2 and 1.3 are both offered, and the development certificate covers
//! the names given with --tls-name.

use std::path::Path;

use dps_testkit::TestServer;
use reqwest::tls::Version;

async fn healthz(
    server: &TestServer,
    host: &str,
    min: Version,
    max: Version,
) -> reqwest::Result<reqwest::StatusCode> {
    let ca = reqwest::Certificate::from_pem_bundle(&server.ca_pem().expect("ca")).expect("pem");
    let addr = server.https_addr().expect("addr");
    let client = reqwest::Client::builder()
        .tls_certs_only(ca)
        .min_tls_version(min)
        .max_tls_version(max)
        .resolve(host, addr)
        .build()?;
    Ok(client
        .get(format!("https://{host}:{}/healthz", addr.port()))
        .send()
        .await?
        .status())
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_offered() {
    let server = crate::server().await;
    assert_eq!(
        healthz(&server, "localhost", Version::TLS_1_2, Version::TLS_1_2)
            .await
            .expect("TLS 1.2"),
        200
    );
    assert_eq!(
        healthz(&server, "localhost", Version::TLS_1_3, Version::TLS_1_3)
            .await
            .expect("TLS 1.3"),
        200
    );
}

#[tokio::test]
async fn certificate_covers_extra_names() {
    let bin = Path::new(env!("CARGO_BIN_EXE_opendps"));
    let server = TestServer::start_with(bin, &["--tls-name", "dps.contoso.test"])
        .await
        .expect("start");
    assert_eq!(
        healthz(
            &server,
            "dps.contoso.test",
            Version::TLS_1_2,
            Version::TLS_1_3
        )
        .await
        .expect("extra name"),
        200
    );
    let other = healthz(
        &server,
        "not-in-cert.test",
        Version::TLS_1_2,
        Version::TLS_1_3,
    )
    .await;
    assert!(
        other.is_err(),
        "a name outside the certificate must fail verification"
    );
}
