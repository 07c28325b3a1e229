//! X.509 attestation end to end: a device presents its certificate in the TLS handshake (HTTPS or
//! MQTT), registers through an individual enrollment that holds it, is created on its hub as a
//! `selfSigned` identity and connects there with the same certificate; and every way a
//! certificate is refused, on both transports. Certificates are made here with rcgen.

use std::path::{Path, PathBuf};

use dps_device::{Attestation, ClientIdentity, Device, Transport};
use dps_testkit::TestServer;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, date_time_ymd};
use serde_json::json;

const HUB: &str = "contoso-x509-hub.azure-devices.net";

/// A certificate and its key, written as PEM files.
struct DeviceCertificate {
    pem: String,
    der: Vec<u8>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl DeviceCertificate {
    fn identity(&self) -> ClientIdentity {
        ClientIdentity::from_files(&self.cert_file, &self.key_file).expect("identity")
    }

    fn sha256(&self) -> String {
        dps_core::certificate::sha256_thumbprint(&self.der)
    }
}

/// A self-signed client certificate for `cn`, valid from `from` to `to` (years).
fn self_signed(dir: &Path, cn: &str, from: i32, to: i32) -> DeviceCertificate {
    let mut params = CertificateParams::new(Vec::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = date_time_ymd(from, 1, 1);
    params.not_after = date_time_ymd(to, 1, 1);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let cert_file = dir.join(format!("{cn}-{from}.pem"));
    let key_file = dir.join(format!("{cn}-{from}.key"));
    std::fs::write(&cert_file, cert.pem()).expect("write");
    std::fs::write(&key_file, key.serialize_pem()).expect("write");
    DeviceCertificate {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        cert_file,
        key_file,
    }
}

fn current(dir: &Path, cn: &str) -> DeviceCertificate {
    self_signed(dir, cn, 2020, 2090)
}

async fn enroll(server: &TestServer, rid: &str, certificate_pem: &str) {
    let reply = server
        .api()
        .expect("client")
        .put(
            &format!("/enrollments/{rid}"),
            json!({
                "registrationId": rid,
                "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": certificate_pem}}}},
                "initialTwin": {"tags": {"attestation": "x509"}},
            }),
            None,
        )
        .await
        .expect("enroll");
    assert_eq!(reply.status, 200, "{reply:?}");
}

fn device(
    server: &TestServer,
    rid: &str,
    attestation: Attestation,
    transport: Transport,
) -> Device {
    crate::device(server, rid, attestation, transport)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_device_registers_and_connects_to_its_hub_with_its_certificate() {
    let (server, _) = crate::server_with_hub(HUB).await;
    let dir = tempfile::tempdir().expect("tempdir");
    for (rid, transport) in [
        ("x509-over-https", Transport::Https),
        ("x509-over-mqtt", Transport::Mqtt),
        ("x509-over-mqtt-ws", Transport::MqttWs),
        ("x509-over-amqp", Transport::Amqp),
        ("x509-over-amqp-ws", Transport::AmqpWs),
    ] {
        let certificate = current(dir.path(), rid);
        enroll(&server, rid, &certificate.pem).await;
        let device = device(
            &server,
            rid,
            Attestation::X509(certificate.identity()),
            transport,
        );
        let done = device.provision(&|_| ()).await.expect("provision");
        let done = serde_json::to_value(&done).expect("json");
        assert_eq!(done["status"], "assigned", "{done}");
        let state = &done["registrationState"];
        assert_eq!(state["assignedHub"], HUB, "{done}");
        assert_eq!(
            state["x509"]["certificateInfo"]["sha256Thumbprint"],
            certificate.sha256(),
            "{done}"
        );
        assert!(state.get("symmetricKey").is_none(), "{done}");

        // On the hub: a selfSigned identity with the certificate's thumbprint.
        let identity = server
            .hub_api(HUB)
            .expect("hub")
            .get(&format!("/devices/{rid}?api-version=2021-04-12"))
            .await
            .expect("identity");
        assert_eq!(
            identity.body["authentication"]["type"], "selfSigned",
            "{identity:?}"
        );
        assert_eq!(
            identity.body["authentication"]["x509Thumbprint"]["primaryThumbprint"],
            certificate.sha256()
        );
        // And the device connects there with the same certificate and reads its twin.
        let twin = device.read_twin(HUB, rid).await.expect("twin");
        assert!(twin["desired"].is_object(), "{twin}");
    }
}

/// Registers over one transport and returns the refusal's status and body.
async fn refused(
    server: &TestServer,
    rid: &str,
    attestation: Attestation,
    transport: Transport,
) -> String {
    let outcome = device(server, rid, attestation, transport)
        .provision(&|_| ())
        .await;
    match outcome {
        Err(err) => format!("{err:#}"),
        Ok(done) => panic!("{rid} over {transport:?} was not refused: {done:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_certificate_is_refused_with_401002_on_both_transports() {
    let (server, _) = crate::server_with_hub(HUB).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let enrolled = current(dir.path(), "x509-enrolled");
    enroll(&server, "x509-enrolled", &enrolled.pem).await;
    let expired = self_signed(dir.path(), "x509-expired", 2001, 2002);
    enroll(&server, "x509-expired", &expired.pem).await;
    let early = self_signed(dir.path(), "x509-early", 2080, 2090);
    enroll(&server, "x509-early", &early.pem).await;
    let stranger = current(dir.path(), "x509-enrolled-other-key");
    let key = dps_core::sas::generate_key();
    let symmetric = server
        .api()
        .expect("client")
        .put(
            "/enrollments/x509-symmetric",
            json!({"registrationId": "x509-symmetric", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}),
            None,
        )
        .await
        .expect("enroll");
    assert_eq!(symmetric.status, 200);
    let on_symmetric = current(dir.path(), "x509-symmetric");

    for transport in [Transport::Https, Transport::Mqtt] {
        let cases: Vec<(&str, Attestation, &str)> = vec![
            // The CN is not the registration id.
            (
                "x509-not-my-name",
                Attestation::X509(enrolled.identity()),
                "is 'x509-enrolled', not the registration id",
            ),
            (
                "x509-expired",
                Attestation::X509(expired.identity()),
                "expired",
            ),
            (
                "x509-early",
                Attestation::X509(early.identity()),
                "not valid before",
            ),
            // Another certificate with the enrolled CN.
            (
                "x509-enrolled",
                Attestation::X509(self_signed(dir.path(), "x509-enrolled", 2021, 2091).identity()),
                "not one of the enrollment's client certificates",
            ),
            // No enrollment at all.
            (
                "x509-enrolled-other-key",
                Attestation::X509(stranger.identity()),
                "no enrollment holds this certificate",
            ),
            // A certificate on a symmetric-key enrollment, and a key on an X.509 one.
            (
                "x509-symmetric",
                Attestation::X509(on_symmetric.identity()),
                "does not use X.509 attestation",
            ),
            (
                "x509-enrolled",
                Attestation::SymmetricKey(key.clone()),
                "does not use symmetric-key attestation",
            ),
        ];
        for (rid, attestation, why) in cases {
            let message = refused(&server, rid, attestation, transport).await;
            assert!(
                message.contains("401002") && message.contains(why),
                "{rid} over {transport:?}: {message}"
            );
        }
    }
    // Nothing was registered.
    for rid in ["x509-enrolled", "x509-expired", "x509-symmetric"] {
        let reply = server
            .api()
            .expect("client")
            .get(&format!("/registrations/{rid}"))
            .await
            .expect("get");
        assert_eq!(reply.status, 404, "{rid}: {reply:?}");
    }
}

/// A CA made here: its certificate, key and issuer.
struct Ca {
    pem: String,
    key: KeyPair,
    params: CertificateParams,
}

impl Ca {
    fn root(cn: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("root").pem();
        Self { pem, key, params }
    }

    fn intermediate(&self, cn: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("key");
        let pem = params
            .signed_by(&key, &self.issuer())
            .expect("intermediate")
            .pem();
        Self { pem, key, params }
    }

    fn issuer(&self) -> rcgen::Issuer<'_, &KeyPair> {
        rcgen::Issuer::from_params(&self.params, &self.key)
    }

    /// A device certificate for `cn` signed by this CA, written with `chain_above` (PEM) after it.
    fn leaf(&self, dir: &Path, cn: &str, chain_above: &[&str]) -> DeviceCertificate {
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer()).expect("leaf");
        let mut chain = cert.pem();
        for above in chain_above {
            chain.push_str(above);
        }
        let cert_file = dir.join(format!("{cn}.pem"));
        let key_file = dir.join(format!("{cn}.key"));
        std::fs::write(&cert_file, &chain).expect("write");
        std::fs::write(&key_file, key.serialize_pem()).expect("write");
        DeviceCertificate {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            cert_file,
            key_file,
        }
    }

    /// A proof-of-possession certificate: subject CN `code`, signed with this CA's key.
    fn proof(&self, code: &str) -> String {
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, code);
        let key = KeyPair::generate().expect("key");
        params.signed_by(&key, &self.issuer()).expect("proof").pem()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_under_a_verified_root_admits_its_devices_and_an_individual_enrollment_disables_one()
 {
    let (server, _) = crate::server_with_hub(HUB).await;
    let api = server.api().expect("client");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = Ca::root("opendps test root");
    let intermediate = root.intermediate("opendps test intermediate");

    // A certificate that is not a CA cannot be uploaded.
    let not_ca = current(dir.path(), "not-a-ca");
    let refused = api
        .put(
            "/certificates/not-a-ca",
            json!({"certificate": not_ca.pem}),
            None,
        )
        .await
        .expect("put");
    crate::assert_error(&refused, 400);
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not a CA")
    );

    let uploaded = api
        .put("/certificates/root", json!({"certificate": root.pem}), None)
        .await
        .expect("upload");
    assert_eq!(uploaded.status, 200, "{uploaded:?}");
    assert_eq!(uploaded.body["properties"]["isVerified"], false);
    let group = api
        .put(
            "/enrollmentGroups/sensors",
            json!({"attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": intermediate.pem}}}}}),
            None,
        )
        .await
        .expect("group");
    assert_eq!(group.status, 200, "{group:?}");

    // A certificate belongs to one enrollment only, and a CA reference must name an upload.
    for (body, why) in [
        (
            json!({"attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": intermediate.pem}}}}}),
            "already belongs to enrollment group 'sensors'",
        ),
        (
            json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "no-such-ca"}}}}),
            "no CA certificate has that name",
        ),
        (
            json!({"attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"}}}}}),
            "x509.signingCertificates.primary.certificate",
        ),
    ] {
        let reply = api
            .put("/enrollmentGroups/copycat", body, None)
            .await
            .expect("group");
        crate::assert_error(&reply, 400);
        let message = reply.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{message}");
    }

    let above = [intermediate.pem.as_str()];
    let first = intermediate.leaf(dir.path(), "sensor-1", &above);
    let second = intermediate.leaf(dir.path(), "sensor-2", &above);
    // The root is not verified yet: the chain leads nowhere trusted.
    for transport in [Transport::Https, Transport::Mqtt] {
        let message = refused_message(&server, "sensor-1", &first, transport).await;
        assert!(
            message.contains("401002") && message.contains("verified CA"),
            "{transport:?}: {message}"
        );
    }

    // Proof of possession: a wrong CN, then a certificate from another key, then the right one.
    let code = api
        .post("/certificates/root/generateVerificationCode", json!({}))
        .await
        .expect("code");
    let code = code.body["properties"]["verificationCode"]
        .as_str()
        .expect("a code")
        .to_owned();
    for (proof, why) in [
        (root.proof("not-the-code"), "not the verification code"),
        (
            Ca::root("impostor").proof(&code),
            "does not verify with the CA's public key",
        ),
    ] {
        let reply = api
            .post("/certificates/root/verify", json!({"certificate": proof}))
            .await
            .expect("verify");
        crate::assert_error(&reply, 400);
        assert!(
            reply.body["message"]
                .as_str()
                .unwrap_or_default()
                .contains(why),
            "{reply:?}"
        );
    }
    let verified = api
        .post(
            "/certificates/root/verify",
            json!({"certificate": root.proof(&code)}),
        )
        .await
        .expect("verify");
    assert_eq!(verified.status, 200, "{verified:?}");
    assert_eq!(verified.body["properties"]["isVerified"], true);

    for (device_cert, rid, transport) in [
        (&first, "sensor-1", Transport::Https),
        (&second, "sensor-2", Transport::Mqtt),
    ] {
        let device = device(
            &server,
            rid,
            Attestation::X509(device_cert.identity()),
            transport,
        );
        let done = serde_json::to_value(device.provision(&|_| ()).await.expect("provision"))
            .expect("json");
        assert_eq!(done["status"], "assigned", "{done}");
        let x509 = &done["registrationState"]["x509"];
        assert_eq!(x509["enrollmentGroupId"], "sensors", "{done}");
        assert_eq!(
            x509["signingCertificateInfo"]["subjectName"], "CN=opendps test intermediate",
            "{done}"
        );
        assert_eq!(
            x509["certificateInfo"]["sha256Thumbprint"],
            device_cert.sha256()
        );
        let twin = device
            .read_twin(HUB, rid)
            .await
            .expect("connects to its hub");
        assert!(twin["desired"].is_object());
    }

    // Azure's way to stop one device of a group: a disabled individual enrollment for it.
    let disabled = api
        .put(
            "/enrollments/sensor-2",
            json!({"registrationId": "sensor-2", "provisioningStatus": "disabled", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": second.pem}}}}}),
            None,
        )
        .await
        .expect("disable");
    assert_eq!(disabled.status, 200, "{disabled:?}");
    let again = device(
        &server,
        "sensor-2",
        Attestation::X509(second.identity()),
        Transport::Https,
    )
    .provision(&|_| ())
    .await
    .expect("provision");
    assert_eq!(
        serde_json::to_value(&again).expect("json")["status"],
        "disabled"
    );
    let still = device(
        &server,
        "sensor-1",
        Attestation::X509(first.identity()),
        Transport::Mqtt,
    )
    .provision(&|_| ())
    .await
    .expect("provision");
    assert_eq!(
        serde_json::to_value(&still).expect("json")["status"],
        "assigned"
    );
}

async fn refused_message(
    server: &TestServer,
    rid: &str,
    certificate: &DeviceCertificate,
    transport: Transport,
) -> String {
    refused(
        server,
        rid,
        Attestation::X509(certificate.identity()),
        transport,
    )
    .await
}
