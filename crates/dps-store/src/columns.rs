//! How every backend writes the values of its columns: the enrollment kind as a tag, and the
//! records it keeps as JSON text.

use dps_core::error::Internal;
use dps_core::store::{EnrollmentKind, StoreError};

/// The `kind` column of an enrollment.
pub(crate) fn kind_tag(kind: EnrollmentKind) -> &'static str {
    match kind {
        EnrollmentKind::Individual => "individual",
        EnrollmentKind::Group => "group",
    }
}

/// A record (the service identity, a linked hub) as stored.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Backend(Internal::caused("serializing", e)))
}

/// A record read back.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Backend(Internal::caused("a stored row does not parse", e)))
}
