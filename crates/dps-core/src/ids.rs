//! Validated identifiers. Each is a newtype so a registration id can never be passed as a group id.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ProvisioningError;

/// Longest registration or enrollment group id DPS accepts.
pub const MAX_ID_LEN: usize = 128;

fn validate_id(kind: &str, value: &str) -> Result<(), ProvisioningError> {
    let invalid = |why: &str| {
        ProvisioningError::InvalidArgument(format!("{kind} '{value}' is invalid: {why}"))
    };
    if value.is_empty() {
        return Err(invalid("it is empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(invalid("it is longer than 128 characters"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')))
    {
        return Err(invalid(&format!(
            "'{bad}' is not allowed; use letters, digits and - . _ :"
        )));
    }
    let first = value.chars().next().unwrap_or('-');
    let last = value.chars().last().unwrap_or('-');
    if !first.is_ascii_alphanumeric() || !(last.is_ascii_alphanumeric() || last == '-') {
        return Err(invalid(
            "it must start with a letter or digit and end with a letter, digit or '-'",
        ));
    }
    Ok(())
}

macro_rules! case_insensitive_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` (case is kept, but comparisons ignore it).
            pub fn parse(value: &str) -> Result<Self, ProvisioningError> {
                validate_id($kind, value)?;
                Ok(Self(value.to_owned()))
            }

            /// The id as given.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The lower-cased form under which the id is stored and looked up.
            pub fn key(&self) -> String {
                self.0.to_ascii_lowercase()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

case_insensitive_id!(
    /// A device's registration id: case-insensitive, up to 128 of `[A-Za-z0-9-._:]`.
    RegistrationId,
    "registration id"
);
case_insensitive_id!(
    /// An enrollment group's id, with the same rules as a registration id.
    EnrollmentGroupId,
    "enrollment group id"
);

/// The ID scope that prefixes every device request, `0ne` followed by 8 hex digits when generated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdScope(String);

impl IdScope {
    /// Generates a fresh scope in Azure's shape.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 4];
        crate::sas::fill_random(&mut bytes);
        Self(format!("0ne{:08X}", u32::from_be_bytes(bytes)))
    }

    /// Wraps a stored or configured scope.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The scope text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An opaque entity tag; the quotes are part of the value, as DPS sends them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Etag(String);

impl Etag {
    /// A new, unique etag such as `"5b0d1c3e-…"` (quotes included).
    pub fn generate() -> Self {
        Self(format!("\"{}\"", uuid::Uuid::new_v4()))
    }

    /// Wraps a stored etag.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The etag text, quotes included.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether an `If-Match` value names this etag. One layer of quotes is ignored on both sides,
    /// because C# quotes the header and Node sends it raw.
    pub fn matches(&self, if_match: &str) -> bool {
        unquote(&self.0) == unquote(if_match)
    }
}

/// How an `If-Match` header constrains a write. Shared by the DPS service API and minihub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// No header.
    Absent,
    /// `*` or `"*"` (the C# and Python clients quote the wildcard): any version.
    Any,
    /// A specific version, unquoted.
    Etag(String),
}

impl IfMatch {
    /// Reads an optional header value.
    pub fn from_header(value: Option<&str>) -> Self {
        match value.map(str::trim).filter(|v| !v.is_empty()) {
            None => Self::Absent,
            Some(v) if unquote(v) == "*" => Self::Any,
            Some(v) => Self::Etag(unquote(v).to_owned()),
        }
    }

    /// Whether an item whose etag is `current` satisfies the header. `Absent` allows anything here;
    /// callers for which a missing header means "create" check that first.
    pub fn allows(&self, current: &str) -> bool {
        match self {
            Self::Absent | Self::Any => true,
            Self::Etag(wanted) => wanted == unquote(current),
        }
    }
}

/// Removes a weak `W/` prefix and one layer of double quotes.
pub fn unquote(value: &str) -> &str {
    let value = value.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_rules() {
        assert!(RegistrationId::parse("breakroom499-contoso-tstrsd-007").is_ok());
        assert!(RegistrationId::parse("a.b_c:d-").is_ok());
        assert!(RegistrationId::parse("").is_err());
        assert!(RegistrationId::parse("-leading").is_err());
        assert!(RegistrationId::parse("trailing.").is_err());
        assert!(RegistrationId::parse("has space").is_err());
        assert!(RegistrationId::parse("slash/inside").is_err());
        assert!(RegistrationId::parse(&"a".repeat(128)).is_ok());
        assert!(RegistrationId::parse(&"a".repeat(129)).is_err());
        assert_eq!(
            RegistrationId::parse("MiXed")
                .map(|r| r.key())
                .ok()
                .as_deref(),
            Some("mixed")
        );
    }

    #[test]
    fn id_scope_shape() {
        let scope = IdScope::generate();
        assert_eq!(scope.as_str().len(), 11);
        assert!(scope.as_str().starts_with("0ne"));
        assert!(scope.as_str()[3..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn etag_matching_ignores_one_layer_of_quotes() {
        let etag = Etag::new("\"abc\"");
        assert!(etag.matches("\"abc\""));
        assert!(etag.matches("abc"));
        assert!(!etag.matches("\"abd\""));
        assert_eq!(IfMatch::from_header(Some("\"*\"")), IfMatch::Any);
        assert_eq!(IfMatch::from_header(Some("*")), IfMatch::Any);
        assert_eq!(IfMatch::from_header(None), IfMatch::Absent);
        assert_eq!(IfMatch::from_header(Some("x")), IfMatch::Etag("x".into()));
        assert_eq!(IfMatch::from_header(Some("  ")), IfMatch::Absent);
        assert_eq!(
            IfMatch::from_header(Some("W/\"MTIz\"")),
            IfMatch::Etag("MTIz".into())
        );
        assert_eq!(
            IfMatch::from_header(Some("\"MTIz\"")),
            IfMatch::Etag("MTIz".into())
        );
    }

    #[test]
    fn if_match_allows_the_current_version_only() {
        let wanted = IfMatch::from_header(Some("\"MTIz\""));
        assert!(wanted.allows("MTIz"));
        assert!(wanted.allows("\"MTIz\""));
        assert!(!wanted.allows("MTI0"));
        // Only one layer: a client that double-quoted asked for a different tag.
        assert!(!IfMatch::from_header(Some("\"\"MTIz\"\"")).allows("MTIz"));
        assert!(IfMatch::Any.allows("anything"));
    }
}
