//! Service API request bodies: strict about shape, lenient about what the server owns.
//!
//! Strict: serde's derived structs also accept their fields as a JSON array (`"reprovisionPolicy":
//! [false, false]`), which no client means; here an array where an object belongs is refused.
//! Lenient: read-only fields that clients send back with an item they read (`registrationState`,
//! a certificate's `info`) are dropped before the body is read, as Azure ignores them.

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Unexpected,
    Visitor,
};
use serde_json::Value;

use crate::error::ProvisioningError;

/// Reads an enrollment or enrollment group (or a bulk operation carrying them) from `body`.
pub fn read<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProvisioningError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ProvisioningError::InvalidBody(
            "the body is empty; send a JSON object".into(),
        ));
    }
    let mut value: Value =
        serde_json::from_slice(body).map_err(|e| ProvisioningError::InvalidBody(e.to_string()))?;
    drop_read_only(&mut value);
    for list in ["enrollments", "enrollmentGroups"] {
        if let Some(Value::Array(items)) = value.get_mut(list) {
            items.iter_mut().for_each(drop_read_only);
        }
    }
    T::deserialize(Strict(value)).map_err(|e| ProvisioningError::InvalidBody(e.to_string()))
}

/// Removes the fields of an enrollment that only the server writes.
fn drop_read_only(enrollment: &mut Value) {
    let Some(object) = enrollment.as_object_mut() else {
        return;
    };
    object.remove("registrationState");
    let x509 = object
        .get_mut("attestation")
        .and_then(|a| a.get_mut("x509"))
        .and_then(Value::as_object_mut);
    for certificates in x509.into_iter().flat_map(|x| x.values_mut()) {
        for slot in ["primary", "secondary"] {
            if let Some(Value::Object(certificate)) = certificates.get_mut(slot) {
                certificate.remove("info");
            }
        }
    }
}

/// A JSON value that deserializes like `serde_json::Value`, except that a struct is read from an
/// object only, at every depth.
struct Strict(Value);

impl<'de> Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(StrictSeq(items.into_iter())),
            Value::Object(map) => visitor.visit_map(StrictMap {
                entries: map.into_iter(),
                value: None,
            }),
            scalar => scalar.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let unexpected = match &self.0 {
            Value::Object(_) => return self.deserialize_any(visitor),
            Value::Array(_) => Unexpected::Seq,
            Value::Null => Unexpected::Unit,
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Number(_) => Unexpected::Other("number"),
            Value::String(s) => Unexpected::Str(s),
        };
        Err(de::Error::invalid_type(unexpected, &visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct StrictSeq(std::vec::IntoIter<Value>);

impl<'de> SeqAccess<'de> for StrictSeq {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0
            .next()
            .map(|v| seed.deserialize(Strict(v)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct StrictMap {
    entries: serde_json::map::IntoIter,
    value: Option<Value>,
}

impl<'de> MapAccess<'de> for StrictMap {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.entries.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(Strict(Value::String(key))).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let value = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("a map value was asked for before its key"))?;
        seed.deserialize(Strict(value))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BulkEnrollmentOperation, EnrollmentGroup, IndividualEnrollment};

    fn individual(body: Value) -> Result<IndividualEnrollment, ProvisioningError> {
        read(body.to_string().as_bytes())
    }

    #[test]
    fn arrays_where_objects_belong_are_refused() {
        for body in [
            serde_json::json!({"registrationId": "d", "attestation": ["symmetricKey"]}),
            serde_json::json!({"registrationId": "d", "attestation": {"type": "symmetricKey"}, "reprovisionPolicy": [false, false]}),
            serde_json::json!({"registrationId": "d", "attestation": {"type": "symmetricKey"}, "capabilities": [true]}),
            serde_json::json!({"registrationId": "d", "attestation": {"type": "symmetricKey", "symmetricKey": ["a", "b"]}}),
            serde_json::json!(["d", {"type": "symmetricKey"}]),
        ] {
            let refused = individual(body.clone());
            assert!(
                matches!(&refused, Err(ProvisioningError::InvalidBody(why)) if why.contains("sequence")),
                "{body}: {refused:?}"
            );
        }
    }

    #[test]
    fn well_formed_bodies_read_as_before() {
        let body = serde_json::json!({
            "registrationId": "d",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": null}},
            "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false},
            "capabilities": {"iotEdge": true},
            "iotHubs": ["a.example", "b.example"],
            "initialTwin": {"tags": {"list": [1, 2], "registrationState": "kept"}, "properties": {"desired": {"info": [3]}}},
            "provisioningStatus": "enabled",
        });
        let strict = individual(body.clone()).expect("reads");
        let plain: IndividualEnrollment = serde_json::from_value(body).expect("reads");
        assert_eq!(
            serde_json::to_value(&strict).expect("json"),
            serde_json::to_value(&plain).expect("json"),
            "user data in the initial twin is left alone"
        );
    }

    #[test]
    fn read_only_fields_sent_back_are_ignored() {
        let body = serde_json::json!({
            "registrationId": "d",
            "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "PEM", "info": "not an info object"}}}},
            "registrationState": {"status": ["not", "a", "state"]},
        });
        let enrollment = individual(body).expect("read-only fields are dropped, not validated");
        assert!(enrollment.registration_state.is_none());
        let certificate = enrollment
            .attestation
            .x509
            .and_then(|x| x.client_certificates)
            .and_then(|c| c.primary)
            .expect("certificate");
        assert!(certificate.info.is_none());

        let bulk: BulkEnrollmentOperation = read(
            serde_json::json!({"mode": "create", "enrollments": [
                {"registrationId": "d", "attestation": {"type": "symmetricKey"}, "registrationState": 7}
            ]})
            .to_string()
            .as_bytes(),
        )
        .expect("bulk items too");
        assert_eq!(bulk.enrollments.len(), 1);
        let group: Result<EnrollmentGroup, _> = read(b"  ");
        assert!(matches!(group, Err(ProvisioningError::InvalidBody(_))));
    }
}
