//! ETags. Bodies carry etags unquoted (`"etag": "MTIz"`), headers quoted (`ETag: "MTIz"`);
//! `If-Match` handling is shared with the DPS service API (`dps_core::ids::IfMatch`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

pub use dps_core::ids::{IfMatch, unquote};

/// `"{etag}"`, for the `ETag` response header.
pub fn quoted(etag: &str) -> String {
    format!("\"{}\"", unquote(etag))
}

/// A fresh identity etag, shaped like IoT Hub's (base64 of a decimal number) and different from
/// `previous`, so that an update always invalidates what clients hold.
pub fn new_device_etag(previous: Option<&str>) -> String {
    loop {
        let mut bytes = [0u8; 4];
        dps_core::sas::fill_random(&mut bytes);
        let etag = B64.encode(u32::from_be_bytes(bytes).to_string());
        if Some(etag.as_str()) != previous {
            return etag;
        }
    }
}

/// A twin's etag, derived from its version as IoT Hub does (`AAAAAAAAAAE=` for version 1).
pub fn twin_etag(version: u64) -> String {
    B64.encode(version.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_shapes() {
        assert_eq!(twin_etag(1), "AAAAAAAAAAE=");
        assert_eq!(quoted("MTIz"), "\"MTIz\"");
        assert_eq!(quoted("\"MTIz\""), "\"MTIz\"");
        let first = new_device_etag(None);
        let decoded = B64.decode(&first).expect("base64");
        assert!(decoded.iter().all(u8::is_ascii_digit));
        assert_ne!(new_device_etag(Some(&first)), first);
    }
}
