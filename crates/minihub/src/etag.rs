//! ETags and `If-Match`. Bodies carry etags unquoted (`"etag": "MTIz"`), headers quoted
//! (`ETag: "MTIz"`); clients send either form, so comparison strips one layer of quotes (and a
//! weak `W/` prefix).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// The precondition of a write, from its `If-Match` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// No header: a create for devices, unconditional for twins.
    Absent,
    /// `*`: any current version.
    Any,
    /// A specific version, already unquoted.
    Etag(String),
}

impl IfMatch {
    /// Interprets a header value (`None` when the header is missing).
    pub fn parse(header: Option<&str>) -> Self {
        let Some(value) = header.map(str::trim).filter(|v| !v.is_empty()) else {
            return Self::Absent;
        };
        // The Python registry client quotes whatever it sends, the wildcard included (`"*"`).
        match unquote(value) {
            "*" => Self::Any,
            etag => Self::Etag(etag.to_owned()),
        }
    }

    /// Whether an existing item with `current` etag satisfies the precondition. `Absent` matches
    /// anything here; callers that treat it as "create" check that before.
    pub fn matches(&self, current: &str) -> bool {
        match self {
            Self::Absent | Self::Any => true,
            Self::Etag(wanted) => wanted == unquote(current),
        }
    }
}

/// Removes a weak prefix and one layer of double quotes.
pub fn unquote(value: &str) -> &str {
    let value = value.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

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
    fn if_match_forms() {
        assert_eq!(IfMatch::parse(None), IfMatch::Absent);
        assert_eq!(IfMatch::parse(Some("  ")), IfMatch::Absent);
        assert_eq!(IfMatch::parse(Some("*")), IfMatch::Any);
        assert_eq!(IfMatch::parse(Some("\"*\"")), IfMatch::Any);
        assert_eq!(
            IfMatch::parse(Some("\"MTIz\"")),
            IfMatch::Etag("MTIz".into())
        );
        assert_eq!(
            IfMatch::parse(Some("W/\"MTIz\"")),
            IfMatch::Etag("MTIz".into())
        );
        assert_eq!(IfMatch::parse(Some("MTIz")), IfMatch::Etag("MTIz".into()));
    }

    #[test]
    fn matching_strips_one_layer_of_quotes() {
        let wanted = IfMatch::parse(Some("\"MTIz\""));
        assert!(wanted.matches("MTIz"));
        assert!(wanted.matches("\"MTIz\""));
        assert!(!wanted.matches("MTI0"));
        // Only one layer: a client that double-quoted asked for a different tag.
        assert!(!IfMatch::parse(Some("\"\"MTIz\"\"")).matches("MTIz"));
        assert!(IfMatch::Any.matches("anything"));
    }

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
