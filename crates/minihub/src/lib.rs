//! minihub: a self-hosted stand-in for Azure IoT Hub, enough for opendps and the official service
//! SDKs. Any number of virtual hubs, told apart by the `Host` header, share one router and one
//! SQLite file: device identities, twins, a query subset, and device-to-cloud telemetry over HTTPS.
//!
//! Read [`Minihub`] for the operations and [`router`] for the REST surface that exposes them.

mod auth;
mod error;
mod etag;
mod http;
mod hub_client;
mod model;
pub mod mqtt;
mod query;
mod store;
mod twin;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use dps_core::clock::{Clock, SystemClock};
use dps_core::secret::Secret;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

pub use error::{JSON_CONTENT_TYPE, MinihubError};
pub use etag::IfMatch;
pub use http::router;
pub use hub_client::DirectHubClient;
pub use model::{
    AccessRight, AuthenticationMechanism, AuthenticationRequest, AuthenticationType, Device,
    DeviceCapabilities, DeviceMessage, DeviceRequest, DeviceStatus, HubInfo, HubPolicy,
    SymmetricKey, Twin, TwinProperties, X509Thumbprint,
};
pub use mqtt::HubMqtt;

use crate::model::NEVER;
use crate::store::{Change, HubStore, PgHubStore, RemotePatch, Row};
use crate::twin::{Mode, TwinState, TwinUpdate};

/// Desired-property updates buffered per device for slow connections; a connection that falls
/// further behind misses the oldest.
const DESIRED_BUFFER: usize = 64;
/// Messages kept per device; older ones are dropped.
const MAX_MESSAGES: usize = 100;
/// Longest device id IoT Hub accepts.
const MAX_DEVICE_ID: usize = 128;
/// Most devices one list call returns, and the default page of a query.
const MAX_PAGE: usize = 1000;
/// .NET ticks (100 ns since 0001-01-01) at the Unix epoch; IoT Hub's generation ids are ticks.
const UNIX_EPOCH_TICKS: i128 = 621_355_968_000_000_000;

/// All virtual hubs. Cheap to clone; clones share the database and caches.
#[derive(Clone)]
pub struct Minihub {
    inner: Arc<Inner>,
    /// Whether this handle's device and twin writes go through `Inner::flushed_later`.
    flush_later: bool,
}

struct Inner {
    /// Hubs, identities and twins; writes to a device follow one another, so If-Match checks stay
    /// atomic.
    store: HubStore,
    /// `store` committing without waiting for the flush, for
    /// [`Minihub::flushed_with_callers_commit`] (PostgreSQL only).
    flushed_later: Option<HubStore>,
    /// Every hub by lower-case host name; hubs and their keys never change once created, so the
    /// request path reads them without touching the database.
    hubs: RwLock<HashMap<String, HubInfo>>,
    /// The latest telemetry per (hub, device), newest last. Not persisted, as on a real hub the
    /// messages go on to a separate event store.
    messages: Mutex<HashMap<(String, String), VecDeque<DeviceMessage>>>,
    /// Desired-property updates per (hub, device), for the device's MQTT connections. A channel
    /// lives while someone listens; it is made on the first [`Minihub::watch_desired`].
    desired: Mutex<HashMap<(String, String), broadcast::Sender<DesiredPatch>>>,
    clock: Arc<dyn Clock>,
}

/// A change of a twin's desired properties, as pushed to the device on
/// `$iothub/twin/PATCH/properties/desired/?$version={version}`.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPatch {
    /// The new desired `$version`.
    pub version: u64,
    /// The patch (for a replaced twin: all desired properties), with `"$version"`.
    pub body: Value,
}

impl DesiredPatch {
    /// `body` as the patch of desired `$version` `version`.
    fn new(mut body: Map<String, Value>, version: u64) -> Self {
        body.insert("$version".into(), version.into());
        Self {
            version,
            body: Value::Object(body),
        }
    }

    /// Every desired property of `twin`, as sent after a replacement.
    fn all_of(twin: &TwinState) -> Self {
        Self::new(twin.desired_props().clone(), twin.desired_version())
    }
}

impl std::fmt::Debug for Minihub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minihub").finish_non_exhaustive()
    }
}

/// The host part of a `Host` header or SAS audience: port removed, lower case, no trailing dot.
pub(crate) fn host_without_port(authority: &str) -> String {
    let authority = authority.trim();
    let host = if authority.starts_with('[') {
        authority
            .find(']')
            .map_or(authority, |end| &authority[..=end])
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn check_host_name(host_name: &str) -> Result<String, MinihubError> {
    let name = host_name.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if valid {
        Ok(name)
    } else {
        Err(MinihubError::ArgumentInvalid(format!(
            "'{host_name}' is not a valid hub host name (letters, digits, '-' and '.', no port)"
        )))
    }
}

/// The scope IoT Hub gives an IoT Edge device that was created without one.
fn edge_scope(device_id: &str, generation_id: &str) -> String {
    format!("ms-azure-iot-edge://{device_id}-{generation_id}")
}

fn check_device_id(device_id: &str) -> Result<(), MinihubError> {
    let valid = !device_id.is_empty()
        && device_id.len() <= MAX_DEVICE_ID
        && device_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.+%_#*?!(),:=@$'".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(MinihubError::ArgumentInvalid(format!(
            "device id '{device_id}' is invalid: up to {MAX_DEVICE_ID} ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '"
        )))
    }
}

fn present(key: Option<Secret>) -> Option<Secret> {
    key.filter(|k| !k.expose().trim().is_empty())
}

fn check_thumbprint(value: Option<String>, which: &str) -> Result<Option<String>, MinihubError> {
    match value.filter(|t| !t.trim().is_empty()) {
        None => Ok(None),
        Some(t) if matches!(t.len(), 40 | 64) && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(t))
        }
        Some(t) => Err(MinihubError::ArgumentInvalid(format!(
            "{which} thumbprint '{t}' is not 40 or 64 hex digits"
        ))),
    }
}

/// Builds the stored mechanism from a request: `sas` without keys gets two fresh keys.
fn authentication(
    request: Option<AuthenticationRequest>,
) -> Result<AuthenticationMechanism, MinihubError> {
    let request = request.unwrap_or_default();
    let kind = match request
        .kind
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("sas") => AuthenticationType::Sas,
        Some("selfsigned") => AuthenticationType::SelfSigned,
        Some("certificateauthority") => AuthenticationType::CertificateAuthority,
        Some(other) => {
            return Err(MinihubError::ArgumentInvalid(format!(
                "authentication type '{other}' is not one of sas, selfSigned, certificateAuthority"
            )));
        }
    };
    let mut mechanism = AuthenticationMechanism {
        symmetric_key: SymmetricKey::default(),
        x509_thumbprint: X509Thumbprint::default(),
        kind,
    };
    match kind {
        AuthenticationType::Sas => {
            let keys = request.symmetric_key.unwrap_or_default();
            let (primary, secondary) =
                match (present(keys.primary_key), present(keys.secondary_key)) {
                    (None, None) => (
                        Secret::new(dps_core::sas::generate_key()),
                        Secret::new(dps_core::sas::generate_key()),
                    ),
                    (Some(p), Some(s)) => (p, s),
                    _ => {
                        return Err(MinihubError::ArgumentInvalid(
                            "give both symmetric keys, or neither to have them generated".into(),
                        ));
                    }
                };
            for (which, key) in [("primary", &primary), ("secondary", &secondary)] {
                if dps_core::sas::decode_key(key.expose()).is_none() {
                    return Err(MinihubError::ArgumentInvalid(format!(
                        "the {which} key is not base64 of 16 to 64 bytes"
                    )));
                }
            }
            mechanism.symmetric_key = SymmetricKey {
                primary_key: Some(primary),
                secondary_key: Some(secondary),
            };
        }
        AuthenticationType::SelfSigned => {
            let prints = request.x509_thumbprint.unwrap_or_default();
            let primary = check_thumbprint(prints.primary_thumbprint, "the primary")?;
            let secondary = check_thumbprint(prints.secondary_thumbprint, "the secondary")?;
            if primary.is_none() {
                return Err(MinihubError::ArgumentInvalid(
                    "a selfSigned device needs a primary thumbprint".into(),
                ));
            }
            mechanism.x509_thumbprint = X509Thumbprint {
                primary_thumbprint: primary,
                secondary_thumbprint: secondary,
            };
        }
        AuthenticationType::CertificateAuthority => {}
    }
    Ok(mechanism)
}

fn parse_status(status: Option<&str>) -> Result<DeviceStatus, MinihubError> {
    match status.map(str::to_ascii_lowercase).as_deref() {
        None | Some("enabled") => Ok(DeviceStatus::Enabled),
        Some("disabled") => Ok(DeviceStatus::Disabled),
        Some(other) => Err(MinihubError::ArgumentInvalid(format!(
            "status '{other}' is not enabled or disabled"
        ))),
    }
}

impl Minihub {
    /// Opens (creating if needed) the database at `db_path`, with the system clock.
    pub fn open(db_path: &Path) -> Result<Self, MinihubError> {
        Self::open_with_clock(db_path, Arc::new(SystemClock))
    }

    /// The hubs recorded in the database at `db_path`, read only: no writer, no migration, no lock.
    pub fn read_hubs(db_path: &Path) -> Result<Vec<HubInfo>, MinihubError> {
        crate::store::read_hubs(db_path)
    }

    /// Opens the database with `clock` deciding token expiry and timestamps.
    pub fn open_with_clock(db_path: &Path, clock: Arc<dyn Clock>) -> Result<Self, MinihubError> {
        let (store, hubs) = HubStore::open_sqlite(db_path)?;
        Ok(Self::with_store(store, hubs, clock))
    }

    /// minihub in the PostgreSQL database of `conns` (its search path; the connections are shared
    /// with the provisioning service's store), shared with the other nodes of a provisioning
    /// service: its tables are created or migrated as needed, and desired-property changes made
    /// through any node reach the device connections of this one.
    pub async fn open_postgres(
        conns: Arc<pg_schema::WarmPool>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, MinihubError> {
        let store = PgHubStore::open(conns).await?;
        let hubs = store.hubs().await?;
        let watched = Self::with_store(HubStore::Postgres(store.clone()), hubs, clock);
        let weak = Arc::downgrade(&watched.inner);
        let watcher = store
            .watch_desired(move |patch| match weak.upgrade() {
                Some(inner) => {
                    Self {
                        inner,
                        flush_later: false,
                    }
                    .heard_desired(patch);
                    true
                }
                None => false,
            })
            .await?;
        drop(watcher);
        Ok(watched)
    }

    /// Creates or migrates minihub's tables in the PostgreSQL database of `pool`, without serving.
    pub async fn migrate_postgres(pool: &sqlx::PgPool) -> Result<(), MinihubError> {
        PgHubStore::migrate(pool).await
    }

    /// Copies the minihub SQLite file at `path` into `target`, a transaction on a PostgreSQL
    /// database whose minihub tables are up to date ([`Minihub::migrate_postgres`]) and empty;
    /// `progress` is told each table's running count. Returns the rows copied per table.
    pub async fn import_sqlite(
        path: &Path,
        target: &mut sqlx::PgConnection,
        progress: &mut dyn FnMut(&str, u64),
    ) -> Result<Vec<(&'static str, u64)>, MinihubError> {
        crate::store::import_sqlite(path, target, progress).await
    }

    /// The hubs recorded in the PostgreSQL database of `pool`, read only: nothing is migrated.
    pub async fn read_hubs_postgres(pool: &sqlx::PgPool) -> Result<Vec<HubInfo>, MinihubError> {
        PgHubStore::read_hubs(pool).await
    }

    fn with_store(store: HubStore, hubs: Vec<HubInfo>, clock: Arc<dyn Clock>) -> Self {
        let hubs = hubs.into_iter().map(|h| (h.host_name.clone(), h)).collect();
        Self {
            flush_later: false,
            inner: Arc::new(Inner {
                flushed_later: store.flushed_later(),
                store,
                hubs: RwLock::new(hubs),
                messages: Mutex::new(HashMap::new()),
                desired: Mutex::new(HashMap::new()),
                clock,
            }),
        }
    }

    /// A handle on the same hubs whose device and twin writes, on PostgreSQL, return once committed
    /// without waiting for the commit's flush to disk: for a caller that, after each such write,
    /// commits something of its own in the same database and waits for that flush, which makes the
    /// hub's write durable too (PostgreSQL flushes its log in order). DPS's provisioning is such a
    /// caller: every registration ends with its state or its rescheduled operation committed, and a
    /// crash of the database before that leaves the operation to be done again, hub writes and all.
    /// This saves a flush per hub write. On SQLite, the same as `self`.
    pub fn flushed_with_callers_commit(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            flush_later: true,
        }
    }

    /// Where this handle writes devices and twins.
    fn writes(&self) -> &HubStore {
        match (&self.inner.flushed_later, self.flush_later) {
            (Some(store), true) => store,
            _ => &self.inner.store,
        }
    }

    /// The time by the hub's clock.
    pub fn now(&self) -> jiff::Timestamp {
        self.inner.clock.now()
    }

    fn now_text(&self) -> String {
        dps_core::time::format_utc(self.now())
    }

    /// The hub named `hub` (a host name, any case).
    pub fn hub(&self, hub: &str) -> Result<HubInfo, MinihubError> {
        self.inner
            .hubs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hub.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| MinihubError::UnknownHub(hub.to_owned()))
    }

    /// Creates the hub `host_name` with fresh keys unless it exists, and returns it. Keys are made
    /// once and kept in the database.
    pub async fn ensure_hub(&self, host_name: &str) -> Result<HubInfo, MinihubError> {
        let name = check_host_name(host_name)?;
        if let Ok(hub) = self.hub(&name) {
            return Ok(hub);
        }
        let fresh = HubInfo {
            host_name: name.clone(),
            policies: HubPolicy::defaults(),
        };
        let stored = self.inner.store.insert_hub(fresh).await?;
        self.inner
            .hubs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, stored.clone());
        Ok(stored)
    }

    /// Every hub, by host name.
    pub async fn hubs(&self) -> Result<Vec<HubInfo>, MinihubError> {
        self.inner.store.hubs().await
    }

    /// Which hub serves a request with this `Host` header (port and case ignored), if any.
    pub fn hub_for_host(&self, host_header: &str) -> Option<String> {
        let host = host_without_port(host_header);
        self.inner
            .hubs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&host)
            .then_some(host)
    }

    /// Checks a service request's `Authorization` header against `hub`'s policies.
    pub(crate) fn authorize_service(
        &self,
        hub: &str,
        header: Option<&str>,
        any_of: &[AccessRight],
    ) -> Result<(), MinihubError> {
        auth::authorize_service(&self.hub(hub)?, header, any_of, self.now().as_second())
    }

    /// Checks that the policy `key_name` of `hub` has the key `key` and grants one of `any_of`:
    /// what a token signed with that key would be allowed, for callers in the same process.
    pub fn authorize_policy(
        &self,
        hub: &str,
        key_name: &str,
        key: &str,
        any_of: &[AccessRight],
    ) -> Result<(), MinihubError> {
        auth::authorize_policy(&self.hub(hub)?, key_name, key, any_of)
    }

    /// Checks a device SAS token (`sr={hub}/devices/{id}`, signed with one of the device's keys,
    /// or a policy token with `DeviceConnect`). Disabled devices are refused.
    pub async fn verify_device_sas(
        &self,
        hub: &str,
        device_id: &str,
        token: &str,
    ) -> Result<(), MinihubError> {
        let info = self.hub(hub)?;
        let device = self.get_device(hub, device_id).await?;
        auth::authorize_device(
            &info,
            device_id,
            device.as_ref(),
            token,
            self.now().as_second(),
        )
    }

    /// Checks the certificate a device presented in its TLS handshake (`leaf`, DER; the handshake
    /// proved the device holds its key) against a `selfSigned` identity: its SHA-256 or SHA-1
    /// thumbprint must be the identity's primary or secondary thumbprint. Disabled devices are
    /// refused.
    pub async fn verify_device_certificate(
        &self,
        hub: &str,
        device_id: &str,
        leaf: &[u8],
    ) -> Result<(), MinihubError> {
        let device = self.get_device(hub, device_id).await?;
        auth::authorize_certificate(device_id, device.as_ref(), leaf)
    }

    /// A device identity.
    pub async fn get_device(
        &self,
        hub: &str,
        device_id: &str,
    ) -> Result<Option<Device>, MinihubError> {
        Ok(self.device_and_twin(hub, device_id).await?.map(|(d, _)| d))
    }

    /// A device twin.
    pub async fn get_twin(&self, hub: &str, device_id: &str) -> Result<Option<Twin>, MinihubError> {
        Ok(self
            .device_and_twin(hub, device_id)
            .await?
            .map(|(d, t)| t.render(&d)))
    }

    async fn device_and_twin(
        &self,
        hub: &str,
        device_id: &str,
    ) -> Result<Option<Row>, MinihubError> {
        let hub = self.hub(hub)?.host_name;
        self.inner.store.device(&hub, device_id).await
    }

    /// Up to `top` devices (at most 1000), in id order.
    pub async fn list_devices(
        &self,
        hub: &str,
        top: Option<usize>,
    ) -> Result<Vec<Device>, MinihubError> {
        let hub = self.hub(hub)?.host_name;
        let limit = top.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
        let rows = self.inner.store.devices(&hub, None, limit).await?;
        Ok(rows.into_iter().map(|(d, _)| d).collect())
    }

    /// `PUT /devices/{id}`: creates the device when `if_match` is absent (conflict if it exists),
    /// replaces it when `if_match` is `*` or its etag (`*` also creates). Its twin is created with it
    /// and survives replacement.
    pub async fn put_device(
        &self,
        hub: &str,
        device_id: &str,
        request: DeviceRequest,
        if_match: IfMatch,
    ) -> Result<Device, MinihubError> {
        let hub = self.hub(hub)?.host_name;
        check_device_id(device_id)?;
        if let Some(body_id) = request.device_id.as_deref().filter(|id| *id != device_id) {
            return Err(MinihubError::ArgumentInvalid(format!(
                "the body's deviceId '{body_id}' does not match '{device_id}' in the path"
            )));
        }
        let status = parse_status(request.status.as_deref())?;
        let authentication = authentication(request.authentication)?;
        let capabilities = request.capabilities.unwrap_or_default();
        let status_reason = request.status_reason;
        let device_scope = request.device_scope.filter(|s| !s.is_empty());
        let parent_scopes = request.parent_scopes.unwrap_or_default();
        let now = self.now();
        let now_text = self.now_text();
        let device_id = device_id.to_owned();
        let key = device_id.clone();
        let creating = matches!(if_match, IfMatch::Absent);
        let decide = move |existing: Option<store::Row>| {
            // Decided afresh when another node's write came first: work on copies.
            let (device_id, device_scope, status_reason, authentication, parent_scopes) = (
                device_id.clone(),
                device_scope.clone(),
                status_reason.clone(),
                authentication.clone(),
                parent_scopes.clone(),
            );
            let (device, twin) = match (existing, &if_match) {
                (Some(_), IfMatch::Absent) => {
                    return Err(MinihubError::DeviceAlreadyExists(device_id));
                }
                (Some((old, _)), wanted) if !wanted.allows(&old.etag) => {
                    return Err(MinihubError::PreconditionFailed(format!(
                        "device '{device_id}' has changed since etag {}",
                        etag::quoted(&old.etag)
                    )));
                }
                (None, IfMatch::Etag(_)) => {
                    return Err(MinihubError::DeviceNotFound(device_id));
                }
                (Some((old, twin)), _) => {
                    let status_updated_time = if old.status == status {
                        old.status_updated_time.clone()
                    } else {
                        now_text.clone()
                    };
                    let device_scope = device_scope.or_else(|| {
                        capabilities
                            .iot_edge
                            .then(|| edge_scope(&device_id, &old.generation_id))
                    });
                    let device = Device {
                        etag: etag::new_device_etag(Some(&old.etag)),
                        status,
                        status_reason,
                        status_updated_time,
                        authentication,
                        capabilities,
                        device_scope,
                        parent_scopes,
                        ..old
                    };
                    (device, twin)
                }
                (None, _) => {
                    let ticks = now.as_nanosecond() / 100 + UNIX_EPOCH_TICKS;
                    let generation_id = ticks.to_string();
                    let device_scope = device_scope.or_else(|| {
                        capabilities
                            .iot_edge
                            .then(|| edge_scope(&device_id, &generation_id))
                    });
                    let device = Device {
                        device_id: device_id.clone(),
                        generation_id,
                        etag: etag::new_device_etag(None),
                        connection_state: "Disconnected".into(),
                        status,
                        status_reason,
                        connection_state_updated_time: NEVER.into(),
                        status_updated_time: NEVER.into(),
                        last_activity_time: NEVER.into(),
                        cloud_to_device_message_count: 0,
                        authentication,
                        capabilities,
                        device_scope,
                        parent_scopes,
                    };
                    (device, TwinState::new(&now_text))
                }
            };
            Ok(Change::Put(Box::new((device.clone(), twin)), device))
        };
        match creating {
            true => self.writes().create(hub, key, decide).await,
            false => self.writes().update(hub, key, decide).await,
        }
    }

    /// `DELETE /devices/{id}`: removes the device and its twin (`If-Match` absent or `*` deletes
    /// whatever version is current).
    pub async fn delete_device(
        &self,
        hub: &str,
        device_id: &str,
        if_match: IfMatch,
    ) -> Result<(), MinihubError> {
        let hub = self.hub(hub)?.host_name;
        let key = (hub.clone(), device_id.to_owned());
        let device_id = device_id.to_owned();
        self.writes()
            .update(hub, device_id.clone(), move |existing| {
                let Some((device, _)) = existing else {
                    return Err(MinihubError::DeviceNotFound(device_id.clone()));
                };
                if !if_match.allows(&device.etag) {
                    return Err(MinihubError::PreconditionFailed(format!(
                        "device '{device_id}' has changed since that etag"
                    )));
                }
                Ok(Change::Delete(()))
            })
            .await?;
        self.inner
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        Ok(())
    }

    /// `PATCH /twins/{id}`: merges `tags` and `properties.desired` from `body` (`null` deletes).
    pub async fn patch_twin(
        &self,
        hub: &str,
        device_id: &str,
        body: &Value,
        if_match: IfMatch,
    ) -> Result<Twin, MinihubError> {
        self.write_twin(hub, device_id, body, Mode::Merge, if_match)
            .await
    }

    /// `PUT /twins/{id}`: replaces `tags` and `properties.desired` with those in `body`.
    pub async fn replace_twin(
        &self,
        hub: &str,
        device_id: &str,
        body: &Value,
        if_match: IfMatch,
    ) -> Result<Twin, MinihubError> {
        self.write_twin(hub, device_id, body, Mode::Replace, if_match)
            .await
    }

    async fn write_twin(
        &self,
        hub: &str,
        device_id: &str,
        body: &Value,
        mode: Mode,
        if_match: IfMatch,
    ) -> Result<Twin, MinihubError> {
        let hub = self.hub(hub)?.host_name;
        let update = TwinUpdate::from_body(body)?;
        let now = self.now_text();
        let key = (hub.clone(), device_id.to_owned());
        let owned_id = device_id.to_owned();
        let (twin, pushed) = self
            .writes()
            .update(hub.clone(), owned_id.clone(), move |existing| {
                let device_id = owned_id.clone();
                let Some((device, mut twin)) = existing else {
                    return Err(MinihubError::DeviceNotFound(device_id));
                };
                if !if_match.allows(&etag::twin_etag(twin.version())) {
                    return Err(MinihubError::PreconditionFailed(format!(
                        "the twin of '{device_id}' has changed since that etag"
                    )));
                }
                let before = twin.desired_version();
                twin.apply(&update, mode, &now)?;
                let version = twin.desired_version();
                // What the device is told: the patch as sent, or for a replacement everything.
                let pushed = (version != before).then(|| match mode {
                    Mode::Merge => {
                        DesiredPatch::new(update.desired.clone().unwrap_or_default(), version)
                    }
                    Mode::Replace => DesiredPatch::all_of(&twin),
                });
                let rendered = twin.render(&device);
                Ok(Change::Put(Box::new((device, twin)), (rendered, pushed)))
            })
            .await?;
        if let Some(patch) = pushed {
            // The twin is written: a failed announcement only means that devices connected to
            // other nodes hear of the change when they next read their twin.
            if let Err(err) = self
                .inner
                .store
                .announce_desired(&hub, device_id, &patch)
                .await
            {
                tracing::warn!(%err, hub, device = device_id, "could not tell other nodes about a desired-property change");
            }
            self.push_desired(key, patch);
        }
        Ok(twin)
    }

    /// Tells the device's connections about a desired-property change; forgets the channel when
    /// nobody listens any more.
    fn push_desired(&self, key: (String, String), patch: DesiredPatch) {
        let mut channels = self.inner.desired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = channels.get(&key)
            && sender.send(patch).is_err()
        {
            channels.remove(&key);
        }
    }

    /// A desired-property change made through another node: pushed to this node's connections of
    /// the device. An announcement without the patch (it was too large to carry) is followed by
    /// the device's desired properties as they are now.
    fn heard_desired(&self, remote: RemotePatch) {
        let key = (remote.hub, remote.device);
        let listening = self
            .inner
            .desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key);
        if !listening {
            return;
        }
        match remote.body {
            Some(body) => self.push_desired(
                key,
                DesiredPatch {
                    version: remote.version,
                    body,
                },
            ),
            None => {
                let hub = self.clone();
                tokio::spawn(async move {
                    match hub.inner.store.device(&key.0, &key.1).await {
                        Ok(Some((_, twin))) => hub.push_desired(key, DesiredPatch::all_of(&twin)),
                        Ok(None) => {}
                        Err(err) => {
                            tracing::warn!(%err, "could not read a twin another node changed");
                        }
                    }
                });
            }
        }
    }

    /// Desired-property changes of `device_id` from now on, for a device connection.
    pub fn watch_desired(
        &self,
        hub: &str,
        device_id: &str,
    ) -> Result<broadcast::Receiver<DesiredPatch>, MinihubError> {
        let key = (self.hub(hub)?.host_name, device_id.to_owned());
        let mut channels = self.inner.desired.lock().unwrap_or_else(|e| e.into_inner());
        Ok(channels
            .entry(key)
            .or_insert_with(|| broadcast::channel(DESIRED_BUFFER).0)
            .subscribe())
    }

    /// The twin as the device reads it: `{"desired": {…, "$version": n}, "reported": {…,
    /// "$version": m}}`.
    pub async fn device_twin(&self, hub: &str, device_id: &str) -> Result<Value, MinihubError> {
        self.device_and_twin(hub, device_id)
            .await?
            .map(|(_, twin)| twin.device_view())
            .ok_or_else(|| MinihubError::DeviceNotFound(device_id.to_owned()))
    }

    /// A device's reported-properties patch (merge patch: `null` deletes, objects merge). Returns
    /// the new reported `$version`.
    pub async fn patch_reported(
        &self,
        hub: &str,
        device_id: &str,
        patch: &Map<String, Value>,
    ) -> Result<u64, MinihubError> {
        let hub = self.hub(hub)?.host_name;
        let now = self.now_text();
        let device_id = device_id.to_owned();
        let patch = patch.clone();
        self.writes()
            .update(hub, device_id.clone(), move |existing| {
                let Some((device, mut twin)) = existing else {
                    return Err(MinihubError::DeviceNotFound(device_id.clone()));
                };
                let version = twin.patch_reported(&patch, &now)?;
                Ok(Change::Put(Box::new((device, twin)), version))
            })
            .await
    }

    /// `POST /devices/query`: the twins `query` selects, at most `page_size` (default and cap 1000)
    /// after the `continuation` token of the previous page. Returns the page and the token of the
    /// next one, if there is more.
    pub async fn query_twins(
        &self,
        hub: &str,
        query: &str,
        page_size: Option<usize>,
        continuation: Option<&str>,
    ) -> Result<(Vec<Twin>, Option<String>), MinihubError> {
        let hub = self.hub(hub)?.host_name;
        let query = query::Query::parse(query)?;
        let page_size = page_size.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
        let mut after = match continuation {
            None => None,
            Some(token) => Some(
                B64URL
                    .decode(token.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        MinihubError::ArgumentInvalid(
                            "the continuation token is not one this hub issued".into(),
                        )
                    })?,
            ),
        };
        let mut page = Vec::new();
        loop {
            let rows = self
                .inner
                .store
                .devices(&hub, after.as_deref(), MAX_PAGE)
                .await?;
            let exhausted = rows.len() < MAX_PAGE;
            for (device, twin) in rows {
                after = Some(device.device_id.clone());
                let twin = twin.render(&device);
                let json = serde_json::to_value(&twin)?;
                if query.matches(&json) {
                    if page.len() == page_size {
                        // One match beyond the page: there is a next page, starting after the
                        // last twin returned.
                        let last = page
                            .last()
                            .map(|t: &Twin| B64URL.encode(t.device_id.as_bytes()));
                        return Ok((page, last));
                    }
                    page.push(twin);
                }
            }
            if exhausted {
                return Ok((page, None));
            }
        }
    }

    /// `POST /devices/{id}/messages/events`: accepts a telemetry message if `authorization` is a
    /// valid device token for `device_id`, keeping the newest 100 per device.
    pub async fn receive_telemetry(
        &self,
        hub: &str,
        device_id: &str,
        authorization: Option<&str>,
        message: DeviceMessage,
    ) -> Result<(), MinihubError> {
        let token = authorization.ok_or_else(|| {
            MinihubError::Unauthorized(
                "the request has no Authorization header with a SharedAccessSignature".into(),
            )
        })?;
        self.verify_device_sas(hub, device_id, token).await?;
        self.record_telemetry(hub, device_id, message)
    }

    /// Keeps a telemetry message of an already authenticated device (the newest 100 per device).
    pub fn record_telemetry(
        &self,
        hub: &str,
        device_id: &str,
        message: DeviceMessage,
    ) -> Result<(), MinihubError> {
        let key = (self.hub(hub)?.host_name, device_id.to_owned());
        let mut messages = self
            .inner
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let queue = messages.entry(key).or_default();
        if queue.len() == MAX_MESSAGES {
            queue.pop_front();
        }
        queue.push_back(message);
        Ok(())
    }

    /// The newest telemetry messages of a device, oldest first (at most 100; kept in memory only).
    pub async fn messages(&self, hub: &str, device_id: &str) -> Vec<DeviceMessage> {
        let key = (host_without_port(hub), device_id.to_owned());
        self.inner
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The time the hub stamps on what it receives.
    pub fn timestamp(&self) -> jiff::Timestamp {
        self.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers() {
        assert_eq!(host_without_port("Hub.Example:8443"), "hub.example");
        assert_eq!(host_without_port("hub.example."), "hub.example");
        assert_eq!(host_without_port("[::1]:443"), "[::1]");
        assert_eq!(host_without_port("localhost"), "localhost");
    }

    #[test]
    fn names_and_ids() {
        assert_eq!(
            check_host_name("Contoso-Hub.azure-devices.net")
                .ok()
                .as_deref(),
            Some("contoso-hub.azure-devices.net")
        );
        assert!(check_host_name("hub:443").is_err());
        assert!(check_host_name("a..b").is_err());
        assert!(check_device_id("dev-1.x_y:z@w").is_ok());
        assert!(check_device_id("dev/1").is_err());
        assert!(check_device_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn sas_without_keys_generates_them() {
        let mech = authentication(Some(AuthenticationRequest {
            symmetric_key: Some(SymmetricKey {
                primary_key: Some(Secret::new("")),
                secondary_key: None,
            }),
            x509_thumbprint: None,
            kind: Some("sas".into()),
        }))
        .expect("generated");
        let keys = mech.symmetric_key;
        let (p, s) = (keys.primary_key.expect("p"), keys.secondary_key.expect("s"));
        assert_eq!(
            dps_core::sas::decode_key(p.expose()).map(|k| k.len()),
            Some(64)
        );
        assert_ne!(p, s);
        let one_key = AuthenticationRequest {
            symmetric_key: Some(SymmetricKey {
                primary_key: Some(Secret::new(dps_core::sas::generate_key())),
                secondary_key: None,
            }),
            ..Default::default()
        };
        assert!(authentication(Some(one_key)).is_err());
        let x509 = AuthenticationRequest {
            x509_thumbprint: Some(X509Thumbprint {
                primary_thumbprint: Some("ab".repeat(20)),
                secondary_thumbprint: None,
            }),
            kind: Some("selfSigned".into()),
            ..Default::default()
        };
        let mech = authentication(Some(x509)).expect("x509");
        assert_eq!(mech.kind, AuthenticationType::SelfSigned);
        assert!(mech.symmetric_key.primary_key.is_none());
    }
}
