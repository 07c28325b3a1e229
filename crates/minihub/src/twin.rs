//! Device twin state and its update rules: JSON merge patch for tags and desired properties (`null`
//! deletes, objects merge), `$metadata` with `$lastUpdated`/`$lastUpdatedVersion`, and the desired
//! `$version` and twin `version` counters, bumped only when something changed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::MinihubError;
use crate::model::{AuthenticationType, Device, Twin, TwinProperties, X509Thumbprint};

/// Deepest nesting of tags and properties IoT Hub accepts.
const MAX_DEPTH: usize = 10;
/// Largest serialized tags, in bytes (IoT Hub's limit).
const MAX_TAGS_BYTES: usize = 8 * 1024;
/// Largest serialized desired properties, in bytes (IoT Hub's limit).
const MAX_DESIRED_BYTES: usize = 32 * 1024;
/// Largest serialized reported properties, in bytes (IoT Hub's limit).
const MAX_REPORTED_BYTES: usize = 32 * 1024;

/// One property section (desired or reported) with its bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Section {
    /// The user's properties.
    props: Map<String, Value>,
    /// A tree shaped like `props` whose nodes carry `$lastUpdated` (and, for desired,
    /// `$lastUpdatedVersion`).
    metadata: Map<String, Value>,
    /// `$version`.
    version: u64,
    /// When the section last changed.
    last_updated: String,
}

impl Section {
    fn new(now: &str) -> Self {
        Self {
            props: Map::new(),
            metadata: Map::new(),
            version: 1,
            last_updated: now.to_owned(),
        }
    }

    /// The section as sent: properties plus `$metadata` and `$version`.
    fn render(&self, with_versions: bool) -> Map<String, Value> {
        let mut out = self.props.clone();
        let mut metadata = Map::new();
        metadata.insert("$lastUpdated".into(), self.last_updated.clone().into());
        if with_versions {
            metadata.insert("$lastUpdatedVersion".into(), self.version.into());
        }
        metadata.extend(self.metadata.clone());
        out.insert("$metadata".into(), Value::Object(metadata));
        out.insert("$version".into(), self.version.into());
        out
    }
}

/// A twin as stored: everything but what comes from the device identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TwinState {
    version: u64,
    tags: Map<String, Value>,
    desired: Section,
    reported: Section,
}

/// What a `PATCH`/`PUT /twins/{id}` body asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TwinUpdate {
    /// New or patched tags; `None` when the body had none.
    pub tags: Option<Map<String, Value>>,
    /// New or patched desired properties, without `$metadata`/`$version`.
    pub desired: Option<Map<String, Value>>,
}

impl TwinUpdate {
    /// Reads a twin body. Reported properties and identity fields are ignored: the service side may
    /// not write them, and clients often send back a whole twin they read.
    pub fn from_body(body: &Value) -> Result<Self, MinihubError> {
        let Value::Object(body) = body else {
            return Err(MinihubError::ArgumentInvalid(
                "the twin must be a JSON object".into(),
            ));
        };
        let tags = object_field(body.get("tags"), "tags")?;
        let desired = match body.get("properties") {
            None | Some(Value::Null) => None,
            Some(Value::Object(props)) => object_field(props.get("desired"), "desired")?,
            Some(_) => {
                return Err(MinihubError::ArgumentInvalid(
                    "'properties' must be an object".into(),
                ));
            }
        };
        let desired = desired.map(|mut d| {
            d.remove("$metadata");
            d.remove("$version");
            d
        });
        if let Some(tags) = &tags {
            validate(tags, 1, "tags")?;
        }
        if let Some(desired) = &desired {
            validate(desired, 1, "properties.desired")?;
        }
        Ok(Self { tags, desired })
    }
}

fn object_field(
    value: Option<&Value>,
    name: &str,
) -> Result<Option<Map<String, Value>>, MinihubError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map.clone())),
        Some(_) => Err(MinihubError::ArgumentInvalid(format!(
            "'{name}' must be a JSON object"
        ))),
    }
}

/// Property names may not contain `.`, `$`, spaces or control characters; nesting is bounded.
fn validate(map: &Map<String, Value>, depth: usize, path: &str) -> Result<(), MinihubError> {
    if depth > MAX_DEPTH {
        return Err(MinihubError::ArgumentInvalid(format!(
            "'{path}' is nested deeper than {MAX_DEPTH} levels"
        )));
    }
    for (key, value) in map {
        if key.is_empty()
            || key
                .chars()
                .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control())
        {
            return Err(MinihubError::ArgumentInvalid(format!(
                "property name '{key}' in '{path}' is invalid: names may not be empty or contain '.', '$', spaces or control characters"
            )));
        }
        if let Value::Object(child) = value {
            validate(child, depth + 1, &format!("{path}.{key}"))?;
        }
    }
    Ok(())
}

/// Merges `patch` into `props` (JSON merge patch), stamping changed keys' metadata. Returns whether
/// anything changed.
fn merge(
    props: &mut Map<String, Value>,
    metadata: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    stamp: &Map<String, Value>,
) -> bool {
    let mut changed = false;
    for (key, value) in patch {
        match value {
            Value::Null => {
                if props.remove(key).is_some() {
                    metadata.remove(key);
                    changed = true;
                }
            }
            Value::Object(child) => {
                if !matches!(props.get(key), Some(Value::Object(_))) {
                    props.insert(key.clone(), Value::Object(Map::new()));
                    metadata.insert(key.clone(), Value::Object(stamp.clone()));
                    changed = true;
                }
                let node = metadata
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(stamp.clone()));
                if !node.is_object() {
                    *node = Value::Object(stamp.clone());
                }
                if let (Some(Value::Object(target)), Value::Object(node)) =
                    (props.get_mut(key), node)
                    && merge(target, node, child, stamp)
                {
                    node.extend(stamp.clone());
                    changed = true;
                }
            }
            leaf => {
                if props.get(key) != Some(leaf) {
                    props.insert(key.clone(), leaf.clone());
                    metadata.insert(key.clone(), Value::Object(stamp.clone()));
                    changed = true;
                }
            }
        }
    }
    changed
}

/// How an update applies: merged into what is there, or replacing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `PATCH`: merge patch.
    Merge,
    /// `PUT`: tags and desired properties are replaced (absent means empty).
    Replace,
}

impl TwinState {
    /// The empty twin of a new device.
    pub fn new(now: &str) -> Self {
        Self {
            version: 1,
            tags: Map::new(),
            desired: Section::new(now),
            reported: Section::new(now),
        }
    }

    /// The twin's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The desired `$version`.
    pub fn desired_version(&self) -> u64 {
        self.desired.version
    }

    /// The desired properties, without `$metadata` and `$version`.
    pub fn desired_props(&self) -> &Map<String, Value> {
        &self.desired.props
    }

    /// Merges a device's reported-properties patch (JSON merge patch: `null` deletes, objects
    /// merge). Bumps reported `$version` and the twin `version` if anything changed; returns the
    /// reported `$version`.
    pub fn patch_reported(
        &mut self,
        patch: &Map<String, Value>,
        now: &str,
    ) -> Result<u64, MinihubError> {
        validate(patch, 1, "properties.reported")?;
        let mut next = self.reported.clone();
        let mut stamp = Map::new();
        stamp.insert("$lastUpdated".into(), now.into());
        if merge(&mut next.props, &mut next.metadata, patch, &stamp) {
            check_size(&next.props, MAX_REPORTED_BYTES, "properties.reported")?;
            next.version += 1;
            next.last_updated = now.to_owned();
            self.reported = next;
            self.version += 1;
        }
        Ok(self.reported.version)
    }

    /// The twin as a device reads it (`$iothub/twin/GET`): both sections with `$version`, no
    /// `$metadata`.
    pub fn device_view(&self) -> Value {
        let section = |s: &Section| {
            let mut out = s.props.clone();
            out.insert("$version".into(), s.version.into());
            Value::Object(out)
        };
        serde_json::json!({
            "desired": section(&self.desired),
            "reported": section(&self.reported),
        })
    }

    /// Applies `update`; bumps desired `$version` if desired properties changed and the twin
    /// `version` if anything did.
    pub fn apply(
        &mut self,
        update: &TwinUpdate,
        mode: Mode,
        now: &str,
    ) -> Result<(), MinihubError> {
        let mut next = self.clone();
        let desired_version = self.desired.version + 1;
        let mut stamp = Map::new();
        stamp.insert("$lastUpdated".into(), now.into());
        stamp.insert("$lastUpdatedVersion".into(), desired_version.into());
        let empty = Map::new();
        let (tags, desired) = match mode {
            Mode::Merge => (update.tags.as_ref(), update.desired.as_ref()),
            Mode::Replace => {
                next.tags.clear();
                next.desired.props.clear();
                next.desired.metadata.clear();
                (
                    Some(update.tags.as_ref().unwrap_or(&empty)),
                    Some(update.desired.as_ref().unwrap_or(&empty)),
                )
            }
        };
        if let Some(tags) = tags {
            // Tags carry no metadata; the scratch tree is dropped.
            merge(&mut next.tags, &mut Map::new(), tags, &stamp);
        }
        if let Some(desired) = desired {
            merge(
                &mut next.desired.props,
                &mut next.desired.metadata,
                desired,
                &stamp,
            );
        }
        check_size(&next.tags, MAX_TAGS_BYTES, "tags")?;
        check_size(&next.desired.props, MAX_DESIRED_BYTES, "properties.desired")?;
        let desired_changed = next.desired.props != self.desired.props;
        if desired_changed {
            next.desired.version = desired_version;
            next.desired.last_updated = now.to_owned();
        } else {
            // Nothing changed: keep the old stamps rather than what the no-op merge wrote.
            next.desired = self.desired.clone();
        }
        if desired_changed || next.tags != self.tags {
            next.version += 1;
            *self = next;
        }
        Ok(())
    }

    /// The twin as the service API returns it.
    pub fn render(&self, device: &Device) -> Twin {
        let thumbprint = match device.authentication.kind {
            AuthenticationType::SelfSigned => device.authentication.x509_thumbprint.clone(),
            _ => X509Thumbprint::default(),
        };
        Twin {
            device_id: device.device_id.clone(),
            etag: crate::etag::twin_etag(self.version),
            device_etag: device.etag.clone(),
            status: device.status,
            status_update_time: device.status_updated_time.clone(),
            connection_state: device.connection_state.clone(),
            last_activity_time: device.last_activity_time.clone(),
            cloud_to_device_message_count: device.cloud_to_device_message_count,
            authentication_type: device.authentication.kind,
            x509_thumbprint: thumbprint,
            model_id: String::new(),
            version: self.version,
            tags: self.tags.clone(),
            properties: TwinProperties {
                desired: self.desired.render(true),
                reported: self.reported.render(false),
            },
            capabilities: device.capabilities,
        }
    }
}

fn check_size(map: &Map<String, Value>, limit: usize, name: &str) -> Result<(), MinihubError> {
    let size = serde_json::to_string(map).map(|s| s.len()).unwrap_or(0);
    if size > limit {
        return Err(MinihubError::ArgumentInvalid(format!(
            "'{name}' would be {size} bytes, more than the {limit} allowed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn update(body: Value) -> TwinUpdate {
        TwinUpdate::from_body(&body).expect("valid body")
    }

    fn desired(state: &TwinState) -> &Map<String, Value> {
        &state.desired.props
    }

    #[test]
    fn merge_patch_with_null_deletion_and_nested_objects() {
        let mut twin = TwinState::new("t0");
        twin.apply(
            &update(json!({"tags": {"site": "a", "rack": {"row": 1, "slot": 2}},
                           "properties": {"desired": {"mode": "eco", "limits": {"lo": 1, "hi": 9}}}})),
            Mode::Merge,
            "t1",
        )
        .expect("apply");
        assert_eq!(twin.version, 2);
        assert_eq!(twin.desired.version, 2);
        twin.apply(
            &update(json!({"tags": {"rack": {"slot": null}},
                           "properties": {"desired": {"mode": null, "limits": {"hi": 10, "step": {"x": 1}}}}})),
            Mode::Merge,
            "t2",
        )
        .expect("apply");
        assert_eq!(
            Value::Object(twin.tags.clone()),
            json!({"site": "a", "rack": {"row": 1}})
        );
        assert_eq!(
            Value::Object(desired(&twin).clone()),
            json!({"limits": {"lo": 1, "hi": 10, "step": {"x": 1}}})
        );
        assert_eq!(twin.desired.version, 3);
        assert_eq!(twin.version, 3);
        let rendered = twin.desired.render(true);
        assert_eq!(rendered["$version"], 3);
        assert_eq!(rendered["$metadata"]["$lastUpdated"], "t2");
        assert_eq!(rendered["$metadata"]["limits"]["hi"]["$lastUpdated"], "t2");
        assert_eq!(
            rendered["$metadata"]["limits"]["hi"]["$lastUpdatedVersion"],
            3
        );
        assert_eq!(rendered["$metadata"]["limits"]["lo"]["$lastUpdated"], "t1");
        assert_eq!(rendered["$metadata"]["limits"]["$lastUpdated"], "t2");
        assert!(rendered["$metadata"].get("mode").is_none());
    }

    #[test]
    fn versions_move_only_on_change() {
        let mut twin = TwinState::new("t0");
        let patch = update(json!({"properties": {"desired": {"a": 1}}}));
        twin.apply(&patch, Mode::Merge, "t1").expect("apply");
        assert_eq!((twin.version, twin.desired.version), (2, 2));
        twin.apply(&patch, Mode::Merge, "t2").expect("apply");
        assert_eq!((twin.version, twin.desired.version), (2, 2));
        assert_eq!(twin.desired.last_updated, "t1");
        // Tags alone bump the twin but not desired.
        twin.apply(&update(json!({"tags": {"x": true}})), Mode::Merge, "t3")
            .expect("apply");
        assert_eq!((twin.version, twin.desired.version), (3, 2));
        // Deleting a key that is not there is no change.
        twin.apply(
            &update(json!({"properties": {"desired": {"zz": null}}})),
            Mode::Merge,
            "t4",
        )
        .expect("apply");
        assert_eq!(twin.version, 3);
    }

    #[test]
    fn replace_drops_what_is_not_sent() {
        let mut twin = TwinState::new("t0");
        twin.apply(
            &update(json!({"tags": {"a": 1}, "properties": {"desired": {"x": 1, "y": 2}}})),
            Mode::Merge,
            "t1",
        )
        .expect("apply");
        twin.apply(
            &update(json!({"properties": {"desired": {"y": 3, "gone": null,
                "$metadata": {"junk": 1}, "$version": 99}, "reported": {"r": 1}}})),
            Mode::Replace,
            "t2",
        )
        .expect("apply");
        assert!(twin.tags.is_empty());
        assert_eq!(Value::Object(desired(&twin).clone()), json!({"y": 3}));
        assert_eq!(twin.desired.version, 3);
        assert!(twin.reported.props.is_empty());
    }

    #[test]
    fn invalid_bodies() {
        for body in [
            json!([1]),
            json!({"tags": 5}),
            json!({"properties": {"desired": "x"}}),
            json!({"tags": {"a.b": 1}}),
            json!({"properties": {"desired": {"$x": 1}}}),
            json!({"tags": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": 1}}}}}}}}}}}}),
        ] {
            assert!(
                matches!(
                    TwinUpdate::from_body(&body),
                    Err(MinihubError::ArgumentInvalid(_))
                ),
                "{body}"
            );
        }
        let mut twin = TwinState::new("t0");
        let big = update(json!({"tags": {"a": "x".repeat(9000)}}));
        assert!(twin.apply(&big, Mode::Merge, "t1").is_err());
        assert_eq!(twin.version, 1);
    }

    #[test]
    fn reported_patches_merge_and_bump_versions() {
        let mut twin = TwinState::new("t0");
        let patch = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!("an object"),
        };
        let v = twin
            .patch_reported(
                &patch(json!({"fw": "1.0", "net": {"ip": "a", "rssi": -50}})),
                "t1",
            )
            .expect("patch");
        assert_eq!((v, twin.version), (2, 2));
        let v = twin
            .patch_reported(&patch(json!({"fw": null, "net": {"rssi": -40}})), "t2")
            .expect("patch");
        assert_eq!((v, twin.version), (3, 3));
        assert_eq!(
            twin.device_view(),
            json!({"desired": {"$version": 1}, "reported": {"net": {"ip": "a", "rssi": -40}, "$version": 3}})
        );
        // No change, no new version.
        let v = twin
            .patch_reported(&patch(json!({"net": {"ip": "a"}})), "t3")
            .expect("patch");
        assert_eq!((v, twin.version), (3, 3));
        let rendered = twin.reported.render(false);
        assert_eq!(rendered["$metadata"]["net"]["rssi"]["$lastUpdated"], "t2");
        assert!(
            twin.patch_reported(&patch(json!({"$bad": 1})), "t4")
                .is_err()
        );
        assert!(
            twin.patch_reported(&patch(json!({"big": "x".repeat(40_000)})), "t4")
                .is_err()
        );
        assert_eq!(twin.reported.version, 3);
    }

    #[test]
    fn new_twin_renders_empty_sections() {
        let twin = TwinState::new("t0");
        let reported = twin.reported.render(false);
        assert_eq!(
            Value::Object(reported),
            json!({"$metadata": {"$lastUpdated": "t0"}, "$version": 1})
        );
    }
}
