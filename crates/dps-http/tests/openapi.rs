//! The served OpenAPI document against the server's own rules: every `$ref` resolves, the id and key
//! patterns accept exactly what the core accepts, the bulk and paging limits are the core's constants,
//! required fields are serde's, enums are the model's, and every conditional write declares 412.

use dps_core::ProvisioningError;
use dps_core::ids::{EnrollmentGroupId, MAX_ID_LEN, RegistrationId};
use dps_core::management::{DEFAULT_PAGE_SIZE, MAX_BULK_ITEMS, MAX_PAGE_SIZE};
use dps_core::model::{
    AllocationPolicy, AssignedDeviceSubstatus, AttestationMechanism, AttestationType,
    BulkEnrollmentGroupOperation, BulkEnrollmentOperation, CustomAllocationDefinition,
    DeviceCapabilities, EnrollmentGroup, EnrollmentStatus, IndividualEnrollment, OperationMode,
    ProvisioningServiceErrorDetails, ProvisioningStatus, ReprovisionPolicy, TpmAttestation,
};
use dps_core::sas;
use serde_json::{Value, json};

/// The id pattern, hand-translated in [`id_pattern_matches`].
const ID_PATTERN: &str = r"^[A-Za-z0-9](?:[A-Za-z0-9._:-]*[A-Za-z0-9-])?$";
/// Empty, or padded base64 of 16 to 64 bytes with surrounding whitespace; see [`key_pattern_matches`].
const SYMMETRIC_KEY_PATTERN: &str = r"^(?:\s*(?:(?:[A-Za-z0-9+/]{4}){5}(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)|(?:[A-Za-z0-9+/]{4}){6,20}(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?|(?:[A-Za-z0-9+/]{4}){21}(?:[A-Za-z0-9+/][AQgw]==)?)\s*)?$";
/// Padded base64 of at least one byte with surrounding whitespace (a TPM endorsement key).
const BASE64_NONEMPTY_PATTERN: &str = r"^\s*(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)\s*$";
/// Padded base64, possibly empty, with surrounding whitespace (a TPM storage root key).
const BASE64_PATTERN: &str =
    r"^\s*(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?\s*$";

fn doc() -> Value {
    serde_json::from_str(dps_http::OPENAPI_JSON).expect("openapi.json is valid JSON")
}

/// Follows a local `$ref` (`#/a/b`), or returns `value` itself when it is not a reference.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(target) => {
            let pointer = target
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{target} is not a local reference"));
            resolve(
                doc,
                doc.pointer(pointer)
                    .unwrap_or_else(|| panic!("{target} does not resolve")),
            )
        }
        None => value,
    }
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.pointer(&format!("/components/schemas/{name}"))
        .unwrap_or_else(|| panic!("no schema {name}"))
}

/// Every operation, as (method, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            out.push((method.clone(), path.clone(), op));
        }
    }
    out
}

fn parameters<'a>(doc: &'a Value, op: &'a Value) -> Vec<&'a Value> {
    op["parameters"]
        .as_array()
        .map(|params| params.iter().map(|p| resolve(doc, p)).collect())
        .unwrap_or_default()
}

fn string_set(value: &Value) -> Vec<String> {
    let mut out: Vec<String> = value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not an array"))
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn every_ref_resolves_and_operation_ids_are_unique() {
    fn walk(doc: &Value, value: &Value, refs: &mut usize) {
        match value {
            Value::Object(map) => {
                if map.contains_key("$ref") {
                    resolve(doc, value);
                    *refs += 1;
                }
                map.values().for_each(|v| walk(doc, v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(doc, v, refs)),
            _ => {}
        }
    }
    let doc = doc();
    assert_eq!(doc["openapi"], "3.0.3");
    let mut refs = 0;
    walk(&doc, &doc, &mut refs);
    assert!(
        refs > 50,
        "only {refs} references: was the document flattened?"
    );
    let mut ids: Vec<&str> = operations(&doc)
        .iter()
        .map(|(m, p, op)| {
            op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{m} {p} has no operationId"))
        })
        .collect();
    let count = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), count, "duplicate operationId");
}

/// The hand translation of [`ID_PATTERN`].
fn id_pattern_matches(id: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
    let first = id.chars().next();
    let last = id.chars().last();
    first.is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(allowed)
        && last.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn id_samples() -> Vec<String> {
    let alphabet = ["a", "Z", "7", "-", ".", "_", ":", "/", " ", "%", "é", "+"];
    let mut samples = vec![String::new()];
    for a in alphabet {
        samples.push(a.to_owned());
        for b in alphabet {
            samples.push(format!("{a}{b}"));
            for c in alphabet {
                samples.push(format!("{a}{b}{c}"));
            }
        }
    }
    for len in [MAX_ID_LEN - 1, MAX_ID_LEN, MAX_ID_LEN + 1] {
        samples.push("a".repeat(len));
        samples.push(format!("{}-", "b".repeat(len - 1)));
        samples.push(format!("{}.", "c".repeat(len - 1)));
    }
    samples.extend(
        [
            "breakroom499-contoso-tstrsd-007",
            "a.b_c:d-",
            "Dev:1.x_y",
            "é1",
        ]
        .map(str::to_owned),
    );
    samples
}

#[test]
fn id_schemas_accept_exactly_what_the_core_accepts() {
    let doc = doc();
    type Parse = fn(&str) -> bool;
    let kinds: [(&str, Parse); 2] = [
        ("RegistrationId", |s| RegistrationId::parse(s).is_ok()),
        ("EnrollmentGroupId", |s| EnrollmentGroupId::parse(s).is_ok()),
    ];
    for (name, server_accepts) in kinds {
        let s = schema(&doc, name);
        assert_eq!(s["type"], "string", "{name}");
        assert_eq!(
            s["pattern"], ID_PATTERN,
            "{name}: update the hand translation"
        );
        assert_eq!(s["minLength"], 1, "{name}");
        assert_eq!(s["maxLength"], MAX_ID_LEN, "{name}");
        for id in id_samples() {
            let length = id.chars().count();
            let doc_accepts = id_pattern_matches(&id) && (1..=MAX_ID_LEN).contains(&length);
            assert_eq!(
                doc_accepts,
                server_accepts(&id),
                "{name} '{id}': document and server disagree"
            );
        }
    }
}

#[test]
fn id_path_parameters_and_body_fields_use_the_id_schemas() {
    let doc = doc();
    let expected = [
        ("/enrollments/{id}", "RegistrationId"),
        ("/enrollments/{id}/attestationmechanism", "RegistrationId"),
        ("/registrations/{id}", "RegistrationId"),
        ("/registrations/{id}/trace", "RegistrationId"),
        ("/enrollmentGroups/{id}", "EnrollmentGroupId"),
        (
            "/enrollmentGroups/{id}/attestationmechanism",
            "EnrollmentGroupId",
        ),
        ("/registrations/{id}/query", "EnrollmentGroupId"),
    ];
    let want = |name: &str| schema(&doc, name) as *const Value;
    for (method, path, op) in operations(&doc) {
        if !path.contains("{id}") {
            continue;
        }
        let (_, kind) = expected
            .iter()
            .find(|(p, _)| *p == path)
            .unwrap_or_else(|| panic!("{path}: which id does it take?"));
        let id = parameters(&doc, op)
            .into_iter()
            .find(|p| p["name"] == "id" && p["in"] == "path")
            .unwrap_or_else(|| panic!("{method} {path} lacks the id parameter"));
        assert!(
            std::ptr::eq(resolve(&doc, &id["schema"]), want(kind)),
            "{method} {path}: id must be a {kind}"
        );
    }
    for (object, field, kind) in [
        ("IndividualEnrollment", "registrationId", "RegistrationId"),
        ("EnrollmentGroup", "enrollmentGroupId", "EnrollmentGroupId"),
        (
            "DeviceRegistrationState",
            "registrationId",
            "RegistrationId",
        ),
    ] {
        let property = &schema(&doc, object)["properties"][field];
        assert!(
            std::ptr::eq(resolve(&doc, property), want(kind)),
            "{object}.{field} must be a {kind}"
        );
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How many bytes `text` decodes to as canonical padded base64 (the `(?:[A-Za-z0-9+/]{4})*` groups
/// plus a `[AQgw]==` or `[AEIMQUYcgkosw048]=` tail of the patterns), or `None`.
fn canonical_base64_len(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let pad = bytes.iter().rev().take_while(|b| **b == b'=').count();
    let data = &bytes[..bytes.len() - pad];
    if pad > 2
        || !data
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/'))
    {
        return None;
    }
    let last = data.last().copied();
    let canonical_tail = match pad {
        0 => true,
        1 => last.is_some_and(|b| b"AEIMQUYcgkosw048".contains(&b)),
        _ => last.is_some_and(|b| b"AQgw".contains(&b)),
    };
    canonical_tail.then(|| bytes.len() / 4 * 3 - pad)
}

/// The hand translation of [`SYMMETRIC_KEY_PATTERN`].
fn key_pattern_matches(text: &str) -> bool {
    text.is_empty() || canonical_base64_len(text.trim()).is_some_and(|n| (16..=64).contains(&n))
}

fn key_samples() -> Vec<String> {
    let mut samples = vec![String::new(), " ".into(), "====".into()];
    for len in 0..=70usize {
        for fill in [0u8, 0xff, 0x5a] {
            let bytes: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
            let key = base64_encode(&bytes);
            samples.push(format!(" {key}\n"));
            samples.push(key.trim_end_matches('=').to_owned());
            samples.push(format!("{key}="));
            samples.push(key.replace('+', "-").replace('/', "_"));
            if key.len() > 8 {
                samples.push(format!("{} {}", &key[..4], &key[4..]));
            }
            if let Some(at) = key.find('=') {
                // The character before the padding with a non-zero unused bit: not canonical.
                let mut odd = key.clone().into_bytes();
                odd[at - 1] = if odd[at - 1] == b'B' { b'C' } else { b'B' };
                samples.push(String::from_utf8(odd).expect("ascii"));
            }
            samples.push(key);
        }
    }
    samples
}

#[test]
fn key_schemas_accept_exactly_what_the_core_accepts() {
    let doc = doc();
    let key = schema(&doc, "SymmetricKey");
    assert_eq!(key["format"], "byte");
    assert_eq!(
        key["pattern"], SYMMETRIC_KEY_PATTERN,
        "update the hand translation"
    );
    for field in ["primaryKey", "secondaryKey"] {
        let property = &schema(&doc, "SymmetricKeyAttestation")["properties"][field];
        assert!(std::ptr::eq(resolve(&doc, property), key), "{field}");
    }
    for sample in key_samples() {
        // Management treats an empty key as absent (one is generated), and decodes any other.
        let server_accepts = sample.is_empty() || sas::decode_key(&sample).is_some();
        assert_eq!(
            key_pattern_matches(&sample),
            server_accepts,
            "{sample:?}: document and server disagree"
        );
    }
    let tpm = &schema(&doc, "TpmAttestation")["properties"];
    assert_eq!(tpm["endorsementKey"]["pattern"], BASE64_NONEMPTY_PATTERN);
    assert_eq!(tpm["storageRootKey"]["pattern"], BASE64_PATTERN);
    assert_eq!(tpm["endorsementKey"]["format"], "byte");
    assert_eq!(tpm["storageRootKey"]["format"], "byte");
}

#[test]
fn bulk_and_paging_limits_are_the_core_constants() {
    let doc = doc();
    for (bulk, list) in [
        ("BulkEnrollmentOperation", "enrollments"),
        ("BulkEnrollmentGroupOperation", "enrollmentGroups"),
    ] {
        let items = &schema(&doc, bulk)["properties"][list];
        assert_eq!(
            items["minItems"], 1,
            "{bulk}: the core refuses an empty list"
        );
        assert_eq!(items["maxItems"], MAX_BULK_ITEMS, "{bulk}");
    }
    let mut paged = 0;
    for (method, path, op) in operations(&doc) {
        let params = parameters(&doc, op);
        let Some(count) = params.iter().find(|p| p["name"] == "x-ms-max-item-count") else {
            continue;
        };
        paged += 1;
        assert_eq!(count["in"], "header");
        let s = &count["schema"];
        assert_eq!(s["type"], "integer", "{method} {path}");
        assert_eq!(s["minimum"], 1, "{method} {path}");
        assert_eq!(s["maximum"], MAX_PAGE_SIZE, "{method} {path}");
        assert_eq!(s["default"], DEFAULT_PAGE_SIZE, "{method} {path}");
        assert!(
            params.iter().any(|p| p["name"] == "x-ms-continuation"),
            "{method} {path} pages without x-ms-continuation"
        );
        let echoed = &op["responses"]["200"]["headers"]["x-ms-max-item-count"]["schema"];
        assert_eq!(echoed["maximum"], MAX_PAGE_SIZE, "{method} {path}");
    }
    assert_eq!(paged, 3, "the three queries are paged");
}

#[test]
fn status_codes_are_declared_where_the_server_answers_them() {
    let doc = doc();
    let error_body = schema(&doc, "ProvisioningServiceErrorDetails") as *const Value;
    for (method, path, op) in operations(&doc) {
        let responses = op["responses"].as_object().expect("responses");
        let declares = |code: &str| responses.contains_key(code);
        let params = parameters(&doc, op);
        if params.iter().any(|p| p["name"] == "If-Match") {
            assert!(
                declares("412"),
                "{method} {path} takes If-Match but lacks 412"
            );
            if method == "put" {
                assert!(declares("409"), "{method} {path} creates but lacks 409");
            }
        }
        let public = op["security"].as_array().is_some_and(Vec::is_empty);
        if !public {
            for code in ["401", "403", "default"] {
                assert!(declares(code), "{method} {path} lacks {code}");
            }
        }
        if op.get("requestBody").is_some() {
            assert!(
                declares("413"),
                "{method} {path} takes a body but lacks 413"
            );
        }
        for (code, response) in responses {
            if code.starts_with(['4', '5']) || code == "default" {
                let body = &resolve(&doc, response)["content"]["application/json"]["schema"];
                assert!(
                    std::ptr::eq(resolve(&doc, body), error_body),
                    "{method} {path} {code} is not a ProvisioningServiceErrorDetails"
                );
            }
        }
    }
}

#[test]
fn error_schema_is_the_error_body() {
    let doc = doc();
    let s = schema(&doc, "ProvisioningServiceErrorDetails");
    let errors = [
        ProvisioningError::InvalidBody(String::new()),
        ProvisioningError::InvalidArgument(String::new()),
        ProvisioningError::Unauthorized(String::new()),
        ProvisioningError::Forbidden {
            policy: "p".into(),
            right: "EnrollmentWrite",
        },
        ProvisioningError::NotFound(String::new()),
        ProvisioningError::NoRoute {
            method: "GET".into(),
            path: "/".into(),
        },
        ProvisioningError::Conflict(String::new()),
        ProvisioningError::PreconditionFailed(String::new()),
        ProvisioningError::PayloadTooLarge { limit: 1 },
        ProvisioningError::Internal(dps_core::error::Internal::new("")),
    ];
    for err in errors {
        let body = ProvisioningServiceErrorDetails::from_error(
            &err,
            "t".into(),
            jiff::Timestamp::UNIX_EPOCH,
        );
        let body = serde_json::to_value(body).expect("json");
        let keys: Vec<String> = body.as_object().expect("object").keys().cloned().collect();
        for key in &keys {
            assert!(s["properties"].get(key).is_some(), "undocumented {key}");
        }
        for required in string_set(&s["required"]) {
            assert!(keys.contains(&required), "{required} is not always sent");
        }
        let code = body["errorCode"].as_u64().expect("code");
        assert!(s["properties"]["errorCode"]["minimum"].as_u64() <= Some(code));
        assert!(s["properties"]["errorCode"]["maximum"].as_u64() >= Some(code));
        let status = code / 1000;
        assert!(
            [400, 401, 403, 404, 409, 412, 413, 500].contains(&status),
            "{status}: is it declared?"
        );
    }
}

/// Each enum with all its variants; the `match` stops compiling when a variant is added.
#[test]
fn enums_are_the_model_enums() {
    fn names<T: serde::Serialize>(values: &[T]) -> Vec<String> {
        let mut out: Vec<String> = values
            .iter()
            .map(|v| {
                serde_json::to_value(v)
                    .expect("json")
                    .as_str()
                    .expect("str")
                    .to_owned()
            })
            .collect();
        out.sort();
        out
    }
    let all_policies = [
        AllocationPolicy::Hashed,
        AllocationPolicy::GeoLatency,
        AllocationPolicy::Static,
        AllocationPolicy::Custom,
    ];
    for p in all_policies {
        match p {
            AllocationPolicy::Hashed
            | AllocationPolicy::GeoLatency
            | AllocationPolicy::Static
            | AllocationPolicy::Custom => {}
        }
    }
    let all_modes = [
        OperationMode::Create,
        OperationMode::Update,
        OperationMode::UpdateIfMatchETag,
        OperationMode::Delete,
    ];
    for m in all_modes {
        match m {
            OperationMode::Create
            | OperationMode::Update
            | OperationMode::UpdateIfMatchETag
            | OperationMode::Delete => {}
        }
    }
    let all_statuses = [ProvisioningStatus::Enabled, ProvisioningStatus::Disabled];
    for s in all_statuses {
        match s {
            ProvisioningStatus::Enabled | ProvisioningStatus::Disabled => {}
        }
    }
    let all_states = [
        EnrollmentStatus::Unassigned,
        EnrollmentStatus::Assigning,
        EnrollmentStatus::Assigned,
        EnrollmentStatus::Failed,
        EnrollmentStatus::Disabled,
    ];
    for s in all_states {
        match s {
            EnrollmentStatus::Unassigned
            | EnrollmentStatus::Assigning
            | EnrollmentStatus::Assigned
            | EnrollmentStatus::Failed
            | EnrollmentStatus::Disabled => {}
        }
    }
    let all_substatuses = [
        AssignedDeviceSubstatus::InitialAssignment,
        AssignedDeviceSubstatus::DeviceDataMigrated,
        AssignedDeviceSubstatus::DeviceDataReset,
        AssignedDeviceSubstatus::ReprovisionedToInitialAssignment,
    ];
    for s in all_substatuses {
        match s {
            AssignedDeviceSubstatus::InitialAssignment
            | AssignedDeviceSubstatus::DeviceDataMigrated
            | AssignedDeviceSubstatus::DeviceDataReset
            | AssignedDeviceSubstatus::ReprovisionedToInitialAssignment => {}
        }
    }
    // `none` parses but every enrollment write refuses it, so the document leaves it out.
    let usable_attestations = [
        AttestationType::Tpm,
        AttestationType::X509,
        AttestationType::SymmetricKey,
    ];
    for a in usable_attestations {
        match a {
            AttestationType::None
            | AttestationType::Tpm
            | AttestationType::X509
            | AttestationType::SymmetricKey => {}
        }
    }

    let doc = doc();
    let state = &schema(&doc, "DeviceRegistrationState")["properties"];
    for (documented, model) in [
        (
            &schema(&doc, "AllocationPolicy")["enum"],
            names(&all_policies),
        ),
        (&schema(&doc, "OperationMode")["enum"], names(&all_modes)),
        (
            &schema(&doc, "ProvisioningStatus")["enum"],
            names(&all_statuses),
        ),
        (&state["status"]["enum"], names(&all_states)),
        (&state["substatus"]["enum"], names(&all_substatuses)),
        (
            &schema(&doc, "AttestationMechanism")["properties"]["type"]["enum"],
            names(&usable_attestations),
        ),
    ] {
        assert_eq!(string_set(documented), model);
    }
    assert_eq!(
        schema(&doc, "ProvisioningStatus")["default"],
        serde_json::to_value(ProvisioningStatus::default()).expect("json")
    );
}

/// For each request schema, read as the server reads bodies: a body with exactly the documented
/// required fields parses, leaving out any one of them does not, and an array in place of a
/// writable `type: object` property is refused.
#[test]
fn required_and_object_fields_are_the_ones_the_server_reads() {
    type Parses = fn(Value) -> bool;
    fn parses<T: serde::de::DeserializeOwned>(body: Value) -> bool {
        dps_core::request_body::read::<T>(body.to_string().as_bytes()).is_ok()
    }
    let attestation = json!({"type": "symmetricKey"});
    let cases: [(&str, Value, Parses); 11] = [
        (
            "AttestationMechanism",
            attestation.clone(),
            parses::<AttestationMechanism>,
        ),
        (
            "TpmAttestation",
            json!({"endorsementKey": "AAAA"}),
            parses::<TpmAttestation>,
        ),
        (
            "ReprovisionPolicy",
            json!({"updateHubAssignment": true, "migrateDeviceData": false}),
            parses::<ReprovisionPolicy>,
        ),
        (
            "CustomAllocationDefinition",
            json!({"webhookUrl": "https://h/", "apiVersion": "2021-10-01"}),
            parses::<CustomAllocationDefinition>,
        ),
        (
            "DeviceCapabilities",
            json!({}),
            parses::<DeviceCapabilities>,
        ),
        (
            "IndividualEnrollment",
            json!({"attestation": attestation}),
            parses::<IndividualEnrollment>,
        ),
        (
            "EnrollmentGroup",
            json!({"attestation": attestation}),
            parses::<EnrollmentGroup>,
        ),
        (
            "BulkEnrollmentOperation",
            json!({"enrollments": [{"registrationId": "d", "attestation": attestation}], "mode": "create"}),
            parses::<BulkEnrollmentOperation>,
        ),
        (
            "BulkEnrollmentGroupOperation",
            json!({"enrollmentGroups": [{"enrollmentGroupId": "g", "attestation": attestation}], "mode": "delete"}),
            parses::<BulkEnrollmentGroupOperation>,
        ),
        (
            "LinkedHubRequest",
            json!({"connectionString": "HostName=h;SharedAccessKeyName=n;SharedAccessKey=k"}),
            parses::<dps_core::linked_hub::LinkedHubRequest>,
        ),
        (
            "QuerySpecification",
            json!({}),
            parses::<dps_core::model::QuerySpecification>,
        ),
    ];
    let doc = doc();
    for (name, minimal, parses) in cases {
        let s = schema(&doc, name);
        let required = s.get("required").map(string_set).unwrap_or_default();
        let mut given: Vec<String> = minimal
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        given.sort();
        assert_eq!(required, given, "{name}: required fields");
        assert!(
            parses(minimal.clone()),
            "{name}: the minimal body is refused"
        );
        for field in &required {
            let mut without = minimal.clone();
            without.as_object_mut().expect("object").remove(field);
            assert!(
                !parses(without),
                "{name}: {field} is documented as required but optional"
            );
        }
        for (field, property) in s["properties"].as_object().expect("properties") {
            let property = resolve(&doc, property);
            if property["type"] == "object" && property["readOnly"] != true {
                let mut with_array = minimal.clone();
                with_array[field] = json!([]);
                assert!(!parses(with_array), "{name}.{field}: an array is read");
            }
        }
    }
}

#[test]
fn server_set_fields_are_read_only() {
    let doc = doc();
    for object in ["IndividualEnrollment", "EnrollmentGroup"] {
        let properties = &schema(&doc, object)["properties"];
        for field in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc"] {
            assert_eq!(properties[field]["readOnly"], true, "{object}.{field}");
        }
        assert_ne!(
            properties["etag"]["readOnly"], true,
            "{object}.etag is the If-Match of a bulk item"
        );
    }
    assert_eq!(
        schema(&doc, "IndividualEnrollment")["properties"]["registrationState"]["readOnly"],
        true
    );
    assert_eq!(
        schema(&doc, "X509CertificateWithInfo")["properties"]["info"]["readOnly"],
        true
    );
}
