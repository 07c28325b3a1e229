//! The IoT hub seam: what provisioning needs from a hub (create the device identity, set its twin,
//! read it back for migration, delete it). The REST implementation lives in `dps-outbound`.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::linked_hub::LinkedHub;
use crate::model::{InitialTwin, TwinCollection};
use crate::secret::Secret;

/// The identity DPS creates on a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDevice {
    /// Device id.
    pub device_id: String,
    /// How the device authenticates to the hub.
    pub authentication: HubAuthentication,
    /// IoT Edge capability.
    pub iot_edge: bool,
}

/// How a device authenticates to its hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubAuthentication {
    /// SAS tokens signed with one of two keys (symmetric-key attestation).
    Sas {
        /// Primary key, base64.
        primary_key: Secret,
        /// Secondary key, base64.
        secondary_key: Secret,
    },
    /// An X.509 certificate identified by its thumbprint (IoT Hub's `selfSigned`, which Azure DPS
    /// uses for every X.509 device, CA-issued or not).
    SelfSigned {
        /// Primary thumbprint, upper-case hex SHA-256.
        primary_thumbprint: String,
        /// Secondary thumbprint (the primary again when there is only one).
        secondary_thumbprint: String,
    },
}

impl HubAuthentication {
    /// The `authentication` object of a device identity.
    pub fn document(&self) -> serde_json::Value {
        match self {
            Self::Sas {
                primary_key,
                secondary_key,
            } => serde_json::json!({
                "type": "sas",
                "symmetricKey": {"primaryKey": primary_key.expose(), "secondaryKey": secondary_key.expose()},
                "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            }),
            Self::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            } => serde_json::json!({
                "type": "selfSigned",
                "symmetricKey": {"primaryKey": null, "secondaryKey": null},
                "x509Thumbprint": {"primaryThumbprint": primary_thumbprint, "secondaryThumbprint": secondary_thumbprint},
            }),
        }
    }

    /// Whether an identity's `authentication` object (as the hub returned it) says the same.
    fn matches(&self, existing: &serde_json::Value) -> bool {
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        match self {
            Self::Sas {
                primary_key,
                secondary_key,
            } => {
                existing["type"].as_str() == Some("sas")
                    && text(&existing["symmetricKey"]["primaryKey"]).as_deref()
                        == Some(primary_key.expose())
                    && text(&existing["symmetricKey"]["secondaryKey"]).as_deref()
                        == Some(secondary_key.expose())
            }
            Self::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            } => {
                let same = |v: &serde_json::Value, want: &str| {
                    v.as_str().is_some_and(|t| t.eq_ignore_ascii_case(want))
                };
                existing["type"].as_str() == Some("selfSigned")
                    && same(
                        &existing["x509Thumbprint"]["primaryThumbprint"],
                        primary_thumbprint,
                    )
                    && same(
                        &existing["x509Thumbprint"]["secondaryThumbprint"],
                        secondary_thumbprint,
                    )
            }
        }
    }
}

/// The parts of a twin that move with a device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HubTwin {
    /// Tags.
    pub tags: TwinCollection,
    /// Desired properties, without `$metadata`/`$version`.
    pub desired: TwinCollection,
}

impl HubTwin {
    /// The twin an enrollment's initial twin describes.
    pub fn from_initial(initial: Option<&InitialTwin>) -> Self {
        Self {
            tags: initial.and_then(|t| t.tags.clone()).unwrap_or_default(),
            desired: initial
                .and_then(|t| t.properties.as_ref())
                .and_then(|p| p.desired.clone())
                .unwrap_or_default(),
        }
    }

    /// Whether there is anything to write.
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.desired.is_empty()
    }
}

/// A hub call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The hub could not be reached or did not answer in time.
    #[error("IoT hub {hub} did not answer: {reason}")]
    Unreachable {
        /// Hub host name.
        hub: String,
        /// What went wrong.
        reason: String,
    },
    /// The hub answered with an error status.
    #[error("IoT hub {hub} refused {operation} with HTTP {status}: {message}")]
    Refused {
        /// Hub host name.
        hub: String,
        /// What was attempted.
        operation: &'static str,
        /// HTTP status.
        status: u16,
        /// The hub's message (truncated).
        message: String,
        /// How long the hub asked callers to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// The hub's tier has no device twins (IoT Hub Basic answers 403010
    /// OperationNotAvailableInCurrentTier).
    #[error(
        "IoT hub {hub} has no device twins (a Basic-tier hub), so it cannot take an initial twin or migrated device data; allocate twin-carrying enrollments to a Standard-tier hub"
    )]
    TwinsUnsupported {
        /// Hub host name.
        hub: String,
    },
    /// The hub's connection string cannot be used.
    #[error("the connection string of linked hub {0} is not usable")]
    BadConnectionString(String),
}

impl HubError {
    /// Whether the same call may succeed later: the hub did not answer, throttled (429), timed
    /// out (408) or failed on its side (5xx). 400, 401, 403, 404 and the rest are answers that a
    /// retry cannot change.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            Self::TwinsUnsupported { .. } | Self::BadConnectionString(_) => false,
        }
    }

    /// Whether the hub said it is too busy (429 or 503), so that every call to it should wait.
    pub fn is_throttling(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                status: 429 | 503,
                ..
            }
        )
    }

    /// The wait the hub asked for in `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The host name of the hub that failed.
    pub fn hub(&self) -> &str {
        match self {
            Self::Unreachable { hub, .. }
            | Self::Refused { hub, .. }
            | Self::TwinsUnsupported { hub }
            | Self::BadConnectionString(hub) => hub,
        }
    }
}

/// What an identity write did on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityWrite {
    /// The device did not exist and was created.
    Created,
    /// The device existed; its authentication or capabilities were rewritten.
    Updated,
    /// The device existed with exactly these keys and capabilities: nothing was written.
    Unchanged,
}

/// How a twin is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinWrite {
    /// `PATCH /twins/{id}`: the given tags and desired properties are merged into the twin.
    Merge,
    /// `PUT /twins/{id}`: the twin's tags and desired properties become exactly the given ones.
    Replace,
}

/// What linking a hub found out about it, beyond the rights DPS needs (which it must have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubProbe {
    /// Whether the hub keeps device twins (Standard tier); Basic-tier hubs do not.
    pub twins: bool,
}

/// Counts one call to a hub in `opendps_hub_calls_total` and its duration in
/// `opendps_hub_call_duration_seconds`: `via` is `rest` or `direct`, `status` the HTTP status (or
/// `error` when there was none). Answers of 429 and 503 also count in
/// `opendps_hub_throttled_total`, per hub.
pub fn record_call(
    via: &'static str,
    hub: &str,
    operation: &'static str,
    status: &str,
    started: Instant,
) {
    let labels = [
        ("operation", operation.to_owned()),
        ("status", status.to_owned()),
        ("via", via.to_owned()),
    ];
    metrics::counter!("opendps_hub_calls_total", &labels).increment(1);
    metrics::histogram!("opendps_hub_call_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    if status == "429" || status == "503" {
        let labels = [("hub", hub.to_owned()), ("status", status.to_owned())];
        metrics::counter!("opendps_hub_throttled_total", &labels).increment(1);
    }
}

impl HubDevice {
    /// A new device identity as the IoT Hub REST API takes it (`PUT /devices/{id}`).
    pub fn identity_document(&self) -> serde_json::Value {
        serde_json::json!({
            "deviceId": self.device_id,
            "status": "enabled",
            "authentication": self.authentication.document(),
            "capabilities": {"iotEdge": self.iot_edge},
        })
    }

    /// The identity `existing` (as the hub returned it) with this device's authentication and
    /// capabilities, everything else kept (status, status reason, scopes, etag, …); `None` when it
    /// already has them.
    pub fn updated_identity(&self, existing: &serde_json::Value) -> Option<serde_json::Value> {
        let same = self.authentication.matches(&existing["authentication"])
            && existing["capabilities"]["iotEdge"]
                .as_bool()
                .unwrap_or(false)
                == self.iot_edge;
        if same {
            return None;
        }
        let mut updated = existing.clone();
        let fields = updated.as_object_mut()?;
        fields.insert("authentication".into(), self.authentication.document());
        let capabilities = fields
            .entry("capabilities")
            .or_insert_with(|| serde_json::json!({}));
        if !capabilities.is_object() {
            *capabilities = serde_json::json!({});
        }
        capabilities["iotEdge"] = serde_json::Value::Bool(self.iot_edge);
        Some(updated)
    }
}

impl HubTwin {
    /// The twin as the IoT Hub REST API takes it (`PATCH` or `PUT /twins/{id}`).
    pub fn patch_document(&self) -> serde_json::Value {
        serde_json::json!({"tags": self.tags, "properties": {"desired": self.desired}})
    }

    /// A twin's user-visible tags and desired properties, from the hub's `tags` and
    /// `properties.desired` (leaving out the service's `$metadata` and `$version`).
    pub fn from_hub(tags: &serde_json::Value, desired: &serde_json::Value) -> Self {
        let user = |value: &serde_json::Value| -> TwinCollection {
            value
                .as_object()
                .map(|map| {
                    map.iter()
                        .filter(|(k, _)| !k.starts_with('$'))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            tags: user(tags),
            desired: user(desired),
        }
    }
}

/// Writes to IoT hubs.
#[async_trait]
pub trait HubClient: Send + Sync {
    /// Creates the device; if it exists, rewrites only what DPS owns (its symmetric keys and
    /// capabilities) under the identity's etag, keeping its status, status reason, scopes and
    /// everything else an operator set; writes nothing when those already match.
    async fn upsert_device(
        &self,
        hub: &LinkedHub,
        device: &HubDevice,
    ) -> Result<IdentityWrite, HubError>;
    /// Writes tags and desired properties onto the device's twin, merged or replacing.
    async fn write_twin(
        &self,
        hub: &LinkedHub,
        device_id: &str,
        twin: &HubTwin,
        mode: TwinWrite,
    ) -> Result<(), HubError>;
    /// Reads the device's twin; `None` if the device does not exist.
    async fn get_twin(&self, hub: &LinkedHub, device_id: &str)
    -> Result<Option<HubTwin>, HubError>;
    /// Deletes the device; succeeds if it is already gone.
    async fn delete_device(&self, hub: &LinkedHub, device_id: &str) -> Result<(), HubError>;
    /// One call of a link check, on a device id that does not exist.
    async fn probe_call(
        &self,
        hub: &LinkedHub,
        call: ProbeCall,
        device_id: &str,
    ) -> Result<ProbeAnswer, HubError>;

    /// Checks, with calls on a device that does not exist (so they change nothing), that the
    /// hub's policy grants what DPS needs (RegistryWrite, RegistryRead and ServiceConnect), and
    /// whether the hub keeps twins.
    async fn probe(&self, hub: &LinkedHub) -> Result<HubProbe, HubProbeError> {
        let mut random = [0u8; 8];
        crate::sas::fill_random(&mut random);
        let device_id = format!("opendps-link-check-{:016x}", u64::from_be_bytes(random));
        let mut refused = Vec::new();
        let mut twins = true;
        for call in [
            ProbeCall::DeleteDevice,
            ProbeCall::ReadDevice,
            ProbeCall::ReadTwin,
        ] {
            match self
                .probe_call(hub, call, &device_id)
                .await
                .map_err(HubProbeError::Failed)?
            {
                ProbeAnswer::Allowed => {}
                ProbeAnswer::NotInTier => twins = false,
                ProbeAnswer::Unauthorized(message) => refused.push((call, message)),
            }
        }
        let policy = crate::linked_hub::ConnectionString::parse(hub.connection_string.expose())
            .map(|c| c.key_name)
            .unwrap_or_default();
        match refused.len() {
            0 => Ok(HubProbe { twins }),
            3 => Err(HubProbeError::BadKey {
                hub: hub.host_name.clone(),
                policy,
                message: refused.swap_remove(0).1,
            }),
            _ => Err(HubProbeError::MissingRights {
                hub: hub.host_name.clone(),
                policy,
                missing: refused.iter().map(|(c, _)| c.right()).collect(),
                tried: refused.iter().map(|(c, _)| c.describe()).collect(),
            }),
        }
    }
}

/// The calls of a link check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeCall {
    /// `DELETE /devices/{id}`: needs RegistryWrite.
    DeleteDevice,
    /// `GET /devices/{id}`: needs RegistryRead (which RegistryWrite includes).
    ReadDevice,
    /// `GET /twins/{id}`: needs ServiceConnect, and a Standard-tier hub.
    ReadTwin,
}

impl ProbeCall {
    /// The right the call needs.
    pub fn right(self) -> &'static str {
        match self {
            Self::DeleteDevice => "RegistryWrite",
            Self::ReadDevice => "RegistryRead",
            Self::ReadTwin => "ServiceConnect",
        }
    }

    /// What the call does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::DeleteDevice => "deleting a device",
            Self::ReadDevice => "reading a device",
            Self::ReadTwin => "reading a twin",
        }
    }
}

/// How the hub answered a link-check call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// The call was allowed (the device was, as expected, not found).
    Allowed,
    /// 401: the policy may not do this; the hub's message.
    Unauthorized(String),
    /// 403010: the hub's tier has no such operation.
    NotInTier,
}

/// Why a hub cannot be linked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubProbeError {
    /// The policy lacks rights DPS needs.
    #[error(
        "the policy '{policy}' of IoT hub {hub} does not grant {}: the hub answered 401 to {}. Link the hub with a policy that grants RegistryRead, RegistryWrite and ServiceConnect (the built-in iothubowner does; registryReadWrite lacks ServiceConnect)",
        missing.join(" or "),
        tried.join(" and ")
    )]
    MissingRights {
        /// Hub host name.
        hub: String,
        /// The policy name from the connection string.
        policy: String,
        /// The rights that are missing.
        missing: Vec<&'static str>,
        /// The calls that were refused.
        tried: Vec<&'static str>,
    },
    /// The hub refused every call: the policy name or its key is wrong.
    #[error(
        "IoT hub {hub} refused the key of policy '{policy}' ({message}); copy the connection string again from the hub's shared access policies"
    )]
    BadKey {
        /// Hub host name.
        hub: String,
        /// The policy name from the connection string.
        policy: String,
        /// The hub's message.
        message: String,
    },
    /// The hub could not be asked.
    #[error(
        "could not check IoT hub {hub}: {0}; check its host name, that it is running and that this service trusts its certificate",
        hub = .0.hub()
    )]
    Failed(HubError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use serde_json::json;

    fn device(iot_edge: bool) -> HubDevice {
        HubDevice {
            device_id: "leaf-1".into(),
            authentication: HubAuthentication::Sas {
                primary_key: Secret::new("cHJpbWFyeQ=="),
                secondary_key: Secret::new("c2Vjb25kYXJ5"),
            },
            iot_edge,
        }
    }

    #[test]
    fn an_existing_identity_keeps_everything_dps_does_not_own() {
        let existing = json!({
            "deviceId": "leaf-1", "etag": "MTIz", "status": "disabled", "statusReason": "stolen",
            "deviceScope": "ms-azure-iot-edge://gw-1-1", "parentScopes": ["ms-azure-iot-edge://gw-1-1"],
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "b2xk", "secondaryKey": "b2xk"}},
            "capabilities": {"iotEdge": false},
        });
        let updated = device(true)
            .updated_identity(&existing)
            .expect("keys differ");
        assert_eq!(updated["status"], "disabled");
        assert_eq!(updated["statusReason"], "stolen");
        assert_eq!(updated["deviceScope"], existing["deviceScope"]);
        assert_eq!(updated["parentScopes"], existing["parentScopes"]);
        assert_eq!(updated["etag"], "MTIz");
        assert_eq!(
            updated["authentication"]["symmetricKey"]["primaryKey"],
            "cHJpbWFyeQ=="
        );
        assert_eq!(updated["capabilities"]["iotEdge"], true);
        // Written back, it is what DPS wants: nothing more to write.
        assert_eq!(device(true).updated_identity(&updated), None);
        assert!(device(false).updated_identity(&updated).is_some());
    }

    /// Answers each link-check call from a table.
    struct Answers(Vec<(ProbeCall, ProbeAnswer)>);

    #[async_trait]
    impl HubClient for Answers {
        async fn upsert_device(
            &self,
            _: &LinkedHub,
            _: &HubDevice,
        ) -> Result<IdentityWrite, HubError> {
            unreachable!("the link check writes nothing")
        }
        async fn write_twin(
            &self,
            _: &LinkedHub,
            _: &str,
            _: &HubTwin,
            _: TwinWrite,
        ) -> Result<(), HubError> {
            unreachable!("the link check writes nothing")
        }
        async fn get_twin(&self, _: &LinkedHub, _: &str) -> Result<Option<HubTwin>, HubError> {
            unreachable!("the link check reads through probe_call")
        }
        async fn delete_device(&self, _: &LinkedHub, _: &str) -> Result<(), HubError> {
            unreachable!("the link check deletes through probe_call")
        }
        async fn probe_call(
            &self,
            _: &LinkedHub,
            call: ProbeCall,
            device_id: &str,
        ) -> Result<ProbeAnswer, HubError> {
            assert!(device_id.starts_with("opendps-link-check-"), "{device_id}");
            Ok(self
                .0
                .iter()
                .find(|(c, _)| *c == call)
                .map_or(ProbeAnswer::Allowed, |(_, a)| a.clone()))
        }
    }

    fn linked() -> LinkedHub {
        LinkedHub {
            host_name: "hub.example".into(),
            connection_string: Secret::new(
                "HostName=hub.example;SharedAccessKeyName=registryReadWrite;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAA==",
            ),
            allocation_weight: 1,
            apply_allocation_policy: true,
            location: None,
            twins: true,
        }
    }

    #[tokio::test]
    async fn the_link_check_names_what_is_missing() {
        let denied = || ProbeAnswer::Unauthorized("IotHubUnauthorizedAccess".into());
        assert_eq!(
            Answers(Vec::new()).probe(&linked()).await,
            Ok(HubProbe { twins: true })
        );
        assert_eq!(
            Answers(vec![(ProbeCall::ReadTwin, ProbeAnswer::NotInTier)])
                .probe(&linked())
                .await,
            Ok(HubProbe { twins: false })
        );
        let missing = Answers(vec![(ProbeCall::ReadTwin, denied())])
            .probe(&linked())
            .await
            .expect_err("no ServiceConnect");
        let text = missing.to_string();
        assert!(
            text.contains("'registryReadWrite'") && text.contains("does not grant ServiceConnect"),
            "{text}"
        );
        let all = Answers(vec![
            (ProbeCall::DeleteDevice, denied()),
            (ProbeCall::ReadDevice, denied()),
            (ProbeCall::ReadTwin, denied()),
        ])
        .probe(&linked())
        .await
        .expect_err("wrong key");
        assert!(matches!(all, HubProbeError::BadKey { .. }), "{all}");
    }

    #[test]
    fn bookkeeping_is_stripped_from_twins() {
        let twin = HubTwin::from_hub(
            &json!({"deviceType": "toaster", "$etag": "x"}),
            &json!({"state": "ready", "$version": 4, "$metadata": {"x": 1}}),
        );
        assert_eq!(
            serde_json::Value::Object(twin.desired),
            json!({"state": "ready"})
        );
        assert_eq!(
            serde_json::Value::Object(twin.tags),
            json!({"deviceType": "toaster"})
        );
    }
}
