//! Shared access signatures as a device (HTTP `Authorization` or MQTT password) or a service client
//! sends them: parsing, audience, expiry and signature checks never panic; a parsed token's
//! audience, expiry and key name survive being signed again; and the service authorizer
//! (audience against `Host`, policy lookup, rights) refuses or accepts without panicking.
//!
//! Input: UTF-8 text. With a newline, the first line is the `Host` header and the rest the token;
//! without, the whole input is the token, sent to `dps.example.net`.

#![no_main]

use std::sync::{Arc, LazyLock};

use dps_core::access::{AccessPolicy, Authorizer, Right, ServiceIdentity};
use dps_core::clock::ManualClock;
use dps_core::ids::IdScope;
use dps_core::sas::{self, SasToken};
use dps_core::secret::Secret;
use libfuzzer_sys::fuzz_target;

/// The seeds are signed with this key (base64 of the 32 bytes 0..32).
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const HOST: &str = "dps.example.net";
const NOW: i64 = 1_800_000_000;

static KEY_BYTES: LazyLock<Vec<u8>> =
    LazyLock::new(|| sas::decode_key(KEY).expect("KEY is a valid key"));

static AUTHORIZER: LazyLock<Authorizer> = LazyLock::new(|| {
    let policy = |name: &str, rights: &[Right]| AccessPolicy {
        name: name.into(),
        rights: rights.to_vec(),
        primary_key: Secret::new(KEY),
        secondary_key: Secret::new("not base64!"),
    };
    let identity = ServiceIdentity {
        id_scope: IdScope::new("0ne00000001"),
        policies: vec![
            policy("provisioningserviceowner", &Right::ALL),
            policy("enrollmentread", &[Right::EnrollmentRead]),
        ],
    };
    let clock = jiff::Timestamp::from_second(NOW).expect("a valid time");
    Authorizer::new(identity, Arc::new(ManualClock::new(clock)), 300)
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (host, text) = text.split_once('\n').unwrap_or((HOST, text));
    let _ = AUTHORIZER.authorize(Some(text), host, Right::EnrollmentWrite);
    let Ok(token) = SasToken::parse(text) else {
        return;
    };
    let audience = token.audience();
    let _ = token.check_expiry(NOW, 300);
    let _ = token.check_expiry(i64::MIN, i64::MAX);
    let _ = token.check_expiry(i64::MAX, i64::MIN);
    // A device of a symmetric-key group signs with the group key derived for its registration id.
    let registration_id = audience.rsplit('/').next().unwrap_or_default();
    let derived = sas::derive_device_key_bytes(&KEY_BYTES, registration_id);
    let _ = token.verify_signature([derived.as_slice(), KEY_BYTES.as_slice()]);

    let again = sas::generate_token(&audience, KEY, token.key_name.as_deref(), token.expiry)
        .expect("KEY is a valid key");
    let again = SasToken::parse(&again).expect("a generated token parses");
    assert_eq!(again.audience(), audience);
    assert_eq!(again.expiry, token.expiry);
    assert_eq!(again.key_name, token.key_name);
    assert_eq!(again.verify_signature([KEY_BYTES.as_slice()]), Ok(0));
});
