//! Shared access signatures: parsing, signing, verification, and group-derived device keys.
//!
//! A token is `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` with fields in any order. The
//! signature covers the `sr` exactly as sent, a newline, and `se`; it is compared in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// What the SDKs escape in a token's `sr`: everything but RFC 3986 unreserved characters.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a token was refused. The message is safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The text is not a SharedAccessSignature.
    #[error("the Authorization header is not a SharedAccessSignature token")]
    NotSas,
    /// A required field is absent.
    #[error("the token has no '{0}' field")]
    MissingField(&'static str),
    /// A field is malformed.
    #[error("the token's '{0}' field is malformed")]
    Malformed(&'static str),
    /// The token expired.
    #[error("the token expired at {0} (unix seconds)")]
    Expired(i64),
    /// The token was issued for another resource.
    #[error("the token is for '{0}', not for this resource")]
    WrongAudience(String),
    /// No key produced this signature.
    #[error("the signature does not match any key")]
    BadSignature,
}

/// A parsed token. `sr` is kept exactly as received because the signature covers those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// The resource (audience) as sent, still percent-encoded if it was.
    pub raw_sr: String,
    /// The expiry, as sent.
    pub raw_se: String,
    /// The expiry in unix seconds.
    pub expiry: i64,
    /// The signature bytes (percent-decoded, base64-decoded).
    pub signature: Vec<u8>,
    /// The key name (`skn`), if any.
    pub key_name: Option<String>,
}

impl SasToken {
    /// Parses a token such as an `Authorization` header value or an MQTT password.
    pub fn parse(text: &str) -> Result<Self, SasError> {
        let text = text.trim();
        let fields = text
            .get(..21)
            .filter(|p| p.eq_ignore_ascii_case("SharedAccessSignature"))
            .map(|_| text[21..].trim_start())
            .ok_or(SasError::NotSas)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in fields.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or(SasError::Malformed("field"))?;
            let slot = match key.to_ascii_lowercase().as_str() {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            *slot = Some(value);
        }
        let raw_sr = sr.ok_or(SasError::MissingField("sr"))?.to_owned();
        let raw_se = se.ok_or(SasError::MissingField("se"))?.to_owned();
        let expiry = raw_se
            .parse::<i64>()
            .map_err(|_| SasError::Malformed("se"))?;
        // Percent-decoding only: a '+' in a signature is base64, never a space.
        let sig_text = percent_decode_str(sig.ok_or(SasError::MissingField("sig"))?)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sig"))?;
        let signature = B64
            .decode(sig_text.as_bytes())
            .map_err(|_| SasError::Malformed("sig"))?;
        let key_name = skn
            .map(|v| percent_decode_str(v).decode_utf8_lossy().into_owned())
            .filter(|v| !v.is_empty());
        Ok(Self {
            raw_sr,
            raw_se,
            expiry,
            signature,
            key_name,
        })
    }

    /// The resource, percent-decoded.
    pub fn audience(&self) -> String {
        percent_decode_str(&self.raw_sr)
            .decode_utf8_lossy()
            .into_owned()
    }

    /// Checks expiry against `now` (unix seconds) allowing `skew_secs` of clock difference.
    pub fn check_expiry(&self, now: i64, skew_secs: i64) -> Result<(), SasError> {
        if self.expiry < now.saturating_sub(skew_secs) {
            return Err(SasError::Expired(self.expiry));
        }
        Ok(())
    }

    /// Checks the signature against each key in turn (constant-time per key).
    /// Returns the index of the key that matched.
    pub fn verify_signature<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Result<usize, SasError> {
        let message = format!("{}\n{}", self.raw_sr, self.raw_se);
        keys.into_iter()
            .position(|key| {
                HmacSha256::new_from_slice(key)
                    .map(|mut mac| {
                        mac.update(message.as_bytes());
                        mac.verify_slice(&self.signature).is_ok()
                    })
                    .unwrap_or(false)
            })
            .ok_or(SasError::BadSignature)
    }
}

/// HMAC-SHA256 of `message` under `key`, base64-encoded.
pub fn sign(key: &[u8], message: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(message);
    B64.encode(mac.finalize().into_bytes())
}

/// Builds a token for `resource` (percent-encoded here) signed with the base64 `key`, valid until
/// `expiry` (unix seconds). Used by the CLI and tests to talk to the service API.
pub fn generate_token(
    resource: &str,
    key_b64: &str,
    key_name: Option<&str>,
    expiry: i64,
) -> Result<String, SasError> {
    let key = B64
        .decode(key_b64.trim())
        .map_err(|_| SasError::Malformed("key"))?;
    let sr = utf8_percent_encode(resource, URL_COMPONENT).to_string();
    let sig = sign(&key, format!("{sr}\n{expiry}").as_bytes());
    let sig = utf8_percent_encode(&sig, NON_ALPHANUMERIC);
    let mut token = format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&utf8_percent_encode(name, NON_ALPHANUMERIC).to_string());
    }
    Ok(token)
}

/// The device key for `registration_id` in a symmetric-key enrollment group:
/// `base64(HMAC-SHA256(base64decode(group_key), registration_id))`.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, SasError> {
    let key = B64
        .decode(group_key_b64.trim())
        .map_err(|_| SasError::Malformed("key"))?;
    Ok(sign(&key, registration_id.as_bytes()))
}

/// [`derive_device_key`] on a decoded group key, returning the decoded device key.
pub fn derive_device_key_bytes(group_key: &[u8], registration_id: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(group_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(registration_id.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A new random 64-byte key, base64-encoded, as DPS generates them.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 64];
    fill_random(&mut bytes);
    B64.encode(bytes)
}

/// Decodes a user-supplied base64 key, which must be 16 to 64 bytes long.
pub fn decode_key(key_b64: &str) -> Option<Vec<u8>> {
    B64.decode(key_b64.trim())
        .ok()
        .filter(|k| (16..=64).contains(&k.len()))
}

/// Fills `buf` from the operating system's random source.
pub fn fill_random(buf: &mut [u8]) {
    if let Err(err) = getrandom::fill(buf) {
        // Without an entropy source no key or scope can be made safely; there is no sane fallback.
        panic!("the operating system random source failed: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_is_escaped_as_the_sdks_escape_it() {
        let token = generate_token(
            "contoso-hub_1.azure-devices.net/devices/dev 1~x",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            None,
            1,
        )
        .expect("token");
        assert!(
            token.contains("sr=contoso-hub_1.azure-devices.net%2Fdevices%2Fdev%201~x&"),
            "{token}"
        );
    }

    const TUTORIAL_GROUP_KEY: &str =
        "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==";

    #[test]
    fn derives_the_tutorial_keys() {
        assert_eq!(
            derive_device_key(TUTORIAL_GROUP_KEY, "breakroom499-contoso-tstrsd-007")
                .ok()
                .as_deref(),
            Some("JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs=")
        );
        assert_eq!(
            derive_device_key(TUTORIAL_GROUP_KEY, "mainbuilding167-contoso-hpsd-088")
                .ok()
                .as_deref(),
            Some("6uejA9PfkQgmYylj8Zerp3kcbeVrGZ172YLa7VSnJzg=")
        );
        let group_key = B64.decode(TUTORIAL_GROUP_KEY).expect("base64");
        assert_eq!(
            B64.encode(derive_device_key_bytes(
                &group_key,
                "breakroom499-contoso-tstrsd-007"
            )),
            "JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs="
        );
    }

    #[test]
    fn generated_token_round_trips() {
        let key = generate_key();
        let token =
            generate_token("dps.example.net", &key, Some("owner"), 2_000_000_000).expect("token");
        let parsed = SasToken::parse(&token).expect("parse");
        assert_eq!(parsed.audience(), "dps.example.net");
        assert_eq!(parsed.key_name.as_deref(), Some("owner"));
        let raw = B64.decode(&key).expect("b64");
        assert_eq!(parsed.verify_signature([raw.as_slice()]), Ok(0));
        let other = B64.decode(generate_key()).expect("b64");
        assert_eq!(
            parsed.verify_signature([other.as_slice()]),
            Err(SasError::BadSignature)
        );
        assert_eq!(
            parsed.verify_signature([other.as_slice(), raw.as_slice()]),
            Ok(1)
        );
    }

    #[test]
    fn signature_covers_sr_as_sent() {
        // Node sends sr unencoded, Python encodes '/' as %2F: each signs its own text.
        let key = B64.decode(generate_key()).expect("b64");
        for sr in [
            "0ne00000001/registrations/dev1",
            "0ne00000001%2Fregistrations%2Fdev1",
            "0ne00000001%2fregistrations%2fdev1",
        ] {
            let sig = sign(&key, format!("{sr}\n1700000000").as_bytes());
            let sig = utf8_percent_encode(&sig, NON_ALPHANUMERIC);
            let token = SasToken::parse(&format!(
                "SharedAccessSignature sig={sig}&se=1700000000&sr={sr}"
            ))
            .expect("parse");
            assert_eq!(token.verify_signature([key.as_slice()]), Ok(0), "sr={sr}");
            assert_eq!(token.audience(), "0ne00000001/registrations/dev1");
        }
    }

    #[test]
    fn plus_in_signature_is_not_a_space() {
        let token = SasToken::parse("SharedAccessSignature sr=a&sig=ab+/cQ==&se=1").expect("parse");
        assert_eq!(token.signature, B64.decode("ab+/cQ==").expect("b64"));
    }

    #[test]
    fn malformed_tokens() {
        assert_eq!(SasToken::parse("Bearer abc"), Err(SasError::NotSas));
        assert_eq!(
            SasToken::parse("SharedAccessSignature sig=YQ==&se=1"),
            Err(SasError::MissingField("sr"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=YQ==&se=soon"),
            Err(SasError::Malformed("se"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=!!&se=1"),
            Err(SasError::Malformed("sig"))
        );
    }

    #[test]
    fn expiry_allows_skew_only() {
        let token = SasToken::parse("SharedAccessSignature sr=a&sig=YQ==&se=1000").expect("parse");
        assert!(token.check_expiry(1000, 0).is_ok());
        assert!(token.check_expiry(1100, 300).is_ok());
        assert_eq!(token.check_expiry(1400, 300), Err(SasError::Expired(1000)));
    }

    #[test]
    fn key_sizes() {
        assert!(decode_key(&generate_key()).is_some());
        assert!(decode_key(&B64.encode([0u8; 15])).is_none());
        assert!(decode_key(&B64.encode([0u8; 16])).is_some());
        assert!(decode_key(&B64.encode([0u8; 65])).is_none());
        assert!(decode_key("not base64!").is_none());
    }
}
