//! Device registration in the core, with the real SQLite store, a fake hub and a manual clock:
//! authentication outcomes, allocation, each reprovision policy, hub failures, and a device racing
//! itself.

use std::sync::Arc;

use dps_core::clock::ManualClock;
use dps_core::device::DeviceRegistration;
use dps_core::hub::HubTwin;
use dps_core::ids::IdScope;
use dps_core::linked_hub::LinkedHub;
use dps_core::model::{
    AssignedDeviceSubstatus, EnrollmentGroup, EnrollmentStatus, IndividualEnrollment,
};
use dps_core::provisioning::{Intake, Provisioning, ProvisioningSettings, Transport};
use dps_core::sas;
use dps_core::secret::Secret;
use dps_core::store::{
    EnrollmentKind, LeaseOwner, Precondition, Store, StoredDoc, StoredOperation,
};
use dps_core::{ProvisioningError, ids::Etag};
use dps_testkit::{FakeHub, FakeWebhook};
use serde_json::json;

const SCOPE: &str = "0ne00000042";
const GROUP_KEY: &str =
    "oiK77Oy7rBw8YB6IS6ukRChAw+Yq6GC61RMrPLSTiOOtdI+XDu0LmLuNm11p+qv2I+adqGUdZHm46zXAQdZoOA==";
const NOW: i64 = 1_900_000_000;

/// The primary SAS key of a device identity on the fake hub.
fn primary_key(device: &dps_core::hub::HubDevice) -> String {
    match &device.authentication {
        dps_core::hub::HubAuthentication::Sas { primary_key, .. } => {
            primary_key.expose().to_owned()
        }
        other => panic!("not a SAS identity: {other:?}"),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    hub: Arc<FakeHub>,
    webhook: Arc<FakeWebhook>,
    clock: Arc<ManualClock>,
    dps: Provisioning,
}

fn fixture() -> Fixture {
    fixture_answering_within(std::time::Duration::ZERO)
}

/// A fixture whose register requests wait up to `within` for their operation to finish.
fn fixture_answering_within(within: std::time::Duration) -> Fixture {
    fixture_with(within, None)
}

/// A fixture as [`fixture_answering_within`], handing the operations it records to `intake`.
fn fixture_with(within: std::time::Duration, intake: Option<Arc<dyn Intake>>) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(dps_store::SqliteStore::open(dir.path().join("db")).expect("open"));
    let hub = Arc::new(FakeHub::default());
    let webhook = Arc::new(FakeWebhook::default());
    let clock = Arc::new(ManualClock::new(
        jiff::Timestamp::from_second(NOW).expect("ts"),
    ));
    let settings = ProvisioningSettings {
        hub_retry_ms: 1000,
        hub_retry_max_ms: 8000,
        // Retries over minutes, as in production, would need many steps of simulated time.
        hub_retry_for_ms: 60_000,
        // Webhook retries as Azure spaces them would need minutes of simulated time.
        webhook_first_retry_ms: 1000,
        webhook_retry_increment_ms: 1000,
        answer_within: within,
        ..ProvisioningSettings::default()
    };
    let dps = Provisioning::new(
        Arc::clone(&store),
        hub.clone(),
        webhook.clone(),
        clock.clone(),
        IdScope::new(SCOPE),
        settings,
        Box::new(|| ()),
    )
    .answering_inline(Arc::new(|wait| Box::pin(tokio::time::sleep(wait))));
    let dps = match intake {
        Some(intake) => dps.with_intake(intake),
        None => dps,
    };
    Fixture {
        _dir: dir,
        store,
        hub,
        webhook,
        clock,
        dps,
    }
}

impl Fixture {
    async fn link(&self, host: &str, weight: u32) {
        let hub = LinkedHub {
            host_name: host.into(),
            connection_string: Secret::new(format!(
                "HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey={GROUP_KEY}"
            )),
            allocation_weight: weight,
            apply_allocation_policy: true,
            location: None,
            twins: true,
        };
        self.store.put_linked_hub(&hub).await.expect("link");
    }

    async fn put_group(&self, id: &str, extra: serde_json::Value) {
        let mut doc = json!({
            "enrollmentGroupId": id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}},
            "initialTwin": {"tags": {"deviceType": "toaster"}, "properties": {"desired": {"state": "ready"}}},
        });
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            doc[k] = v;
        }
        let group: EnrollmentGroup = serde_json::from_value(doc).expect("group");
        let stored = StoredDoc {
            etag: Etag::generate(),
            doc: serde_json::to_string(&group).expect("json"),
        };
        self.store
            .put_enrollment(
                EnrollmentKind::Group,
                &id.to_ascii_lowercase(),
                stored,
                Precondition::None,
            )
            .await
            .expect("put");
    }

    async fn put_individual(&self, id: &str, extra: serde_json::Value) {
        let mut doc = json!({"registrationId": id, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": GROUP_KEY, "secondaryKey": GROUP_KEY}}});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            doc[k] = v;
        }
        let e: IndividualEnrollment = serde_json::from_value(doc).expect("enrollment");
        let stored = StoredDoc {
            etag: Etag::generate(),
            doc: serde_json::to_string(&e).expect("json"),
        };
        self.store
            .put_enrollment(
                EnrollmentKind::Individual,
                &id.to_ascii_lowercase(),
                stored,
                Precondition::None,
            )
            .await
            .expect("put");
    }

    fn token(&self, rid: &str, key: &str, expiry: i64) -> String {
        sas::generate_token(
            &format!("{SCOPE}/registrations/{rid}"),
            key,
            Some("registration"),
            expiry,
        )
        .expect("token")
    }

    fn device_key(rid: &str) -> String {
        sas::derive_device_key(GROUP_KEY, rid).expect("derive")
    }

    /// Registers with the derived key and runs the worker until the operation is terminal.
    async fn register(&self, rid: &str) -> dps_core::device::RegistrationOperationStatus {
        self.register_with(rid, DeviceRegistration::default()).await
    }

    /// Registers with a body (a custom payload) and runs the worker until the operation is terminal.
    async fn register_with(
        &self,
        rid: &str,
        body: DeviceRegistration,
    ) -> dps_core::device::RegistrationOperationStatus {
        let token = self.token(rid, &Self::device_key(rid), NOW + 3600);
        let accepted = self
            .dps
            .register(Transport::Https, SCOPE, rid, body, Some(&token))
            .await
            .expect("accepted");
        assert_eq!(accepted.status, EnrollmentStatus::Assigning);
        for _ in 0..100 {
            self.drain().await;
            let status = self.poll(rid, &accepted.operation_id, &token).await;
            if status.status.is_terminal() {
                return status;
            }
            // A hub failure rescheduled the operation: let time pass.
            self.clock.set(
                self.clock_now()
                    .checked_add(jiff::SignedDuration::from_secs(5))
                    .expect("ts"),
            );
        }
        panic!("registration of {rid} did not finish");
    }

    /// Registers with the derived key; returns the operation id and the token to poll with.
    async fn start(&self, rid: &str) -> (String, String) {
        let token = self.token(rid, &Self::device_key(rid), NOW + 3600);
        let accepted = self
            .dps
            .register(
                Transport::Https,
                SCOPE,
                rid,
                DeviceRegistration::default(),
                Some(&token),
            )
            .await
            .expect("accepted");
        (accepted.operation_id, token)
    }

    async fn status(&self, rid: &str, (operation, token): &(String, String)) -> EnrollmentStatus {
        self.poll(rid, operation, token).await.status
    }

    /// The device's poll of `operation` over HTTPS with `token`, which must be accepted.
    async fn poll(
        &self,
        rid: &str,
        operation: &str,
        token: &str,
    ) -> dps_core::device::RegistrationOperationStatus {
        self.dps
            .operation_status(Transport::Https, SCOPE, rid, operation, Some(token))
            .await
            .expect("poll")
    }

    fn advance(&self, secs: i64) {
        self.clock.set(
            self.clock_now()
                .checked_add(jiff::SignedDuration::from_secs(secs))
                .expect("ts"),
        );
    }

    /// The stored registration record of `rid`, as JSON.
    async fn record(&self, rid: &str) -> serde_json::Value {
        let doc = self
            .store
            .get_registration(&rid.to_ascii_lowercase())
            .await
            .expect("read")
            .expect("registration");
        serde_json::from_str(&doc.doc).expect("json")
    }

    fn clock_now(&self) -> jiff::Timestamp {
        dps_core::clock::Clock::now(&*self.clock)
    }

    /// Works on every operation due; how many there were.
    async fn drain(&self) -> usize {
        let now = self.clock_now().as_millisecond();
        let claimed = self
            .store
            .claim_operations(&LeaseOwner::new("test"), now, 60_000, 1000)
            .await
            .expect("claim");
        for op in &claimed {
            self.dps.process(op).await.expect("process");
        }
        claimed.len()
    }

    /// A register request as it waits for its answer while a worker (this test, draining the
    /// store) works on its operation; bounded so that a request the worker never lets go fails
    /// the test rather than waiting out its bound.
    async fn register_answered(
        &self,
        rid: &str,
        body: DeviceRegistration,
    ) -> dps_core::device::RegistrationOperationStatus {
        let token = self.token(rid, &Self::device_key(rid), NOW + 3600);
        let register = self
            .dps
            .register(Transport::Https, SCOPE, rid, body, Some(&token));
        let work = async {
            while self.drain().await == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        let (answer, ()) = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            tokio::join!(register, work)
        })
        .await
        .expect("the register request is answered well before its 60 s bound");
        answer.expect("accepted")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_device_is_created_with_derived_keys_and_initial_twin() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    let status = b.register("breakroom499-contoso-tstrsd-007").await;
    let state = status.registration_state.clone().expect("state");
    assert_eq!(state.status, EnrollmentStatus::Assigned);
    assert_eq!(state.assigned_hub.as_deref(), Some("hub-a"));
    assert_eq!(
        state.device_id.as_deref(),
        Some("breakroom499-contoso-tstrsd-007")
    );
    assert_eq!(
        state.substatus,
        Some(AssignedDeviceSubstatus::InitialAssignment)
    );
    assert_eq!(
        state
            .symmetric_key
            .and_then(|s| s.enrollment_group_id)
            .as_deref(),
        Some("grp")
    );
    let (device, twin) = b
        .hub
        .device("hub-a", "breakroom499-contoso-tstrsd-007")
        .expect("on the hub");
    assert_eq!(
        primary_key(&device),
        "JC8F96eayuQwwz+PkE7IzjH2lIAjCUnAa61tDigBnSs="
    );
    assert_eq!(twin.tags["deviceType"], "toaster");
    assert_eq!(twin.desired["state"], "ready");

    // Polling checks the token against the enrollment the operation was authenticated with.
    let rid = "breakroom499-contoso-tstrsd-007";
    let wrong = b.token(rid, &sas::generate_key(), NOW + 60);
    let polled = b
        .dps
        .operation_status(
            Transport::Https,
            SCOPE,
            rid,
            &status.operation_id,
            Some(&wrong),
        )
        .await;
    assert!(
        matches!(polled, Err(ProvisioningError::Unauthorized(_))),
        "{polled:?}"
    );
    let other_device = b.token(
        "someone-else",
        &Fixture::device_key("someone-else"),
        NOW + 60,
    );
    let polled = b
        .dps
        .operation_status(
            Transport::Https,
            SCOPE,
            rid,
            &status.operation_id,
            Some(&other_device),
        )
        .await;
    assert!(
        matches!(polled, Err(ProvisioningError::Unauthorized(_))),
        "{polled:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_outcomes() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    let rid = "dev-1";
    let key = Fixture::device_key(rid);
    let refused =
        |r: Result<_, ProvisioningError>| matches!(r, Err(ProvisioningError::Unauthorized(_)));
    let body = DeviceRegistration::default;
    assert!(
        refused(
            b.dps
                .register(
                    Transport::Https,
                    SCOPE,
                    rid,
                    body(),
                    Some(&b.token(rid, &key, NOW - 3600))
                )
                .await
        ),
        "expired"
    );
    assert!(
        refused(
            b.dps
                .register(
                    Transport::Https,
                    SCOPE,
                    rid,
                    body(),
                    Some(&b.token("dev-2", &key, NOW + 60))
                )
                .await
        ),
        "another registration id"
    );
    assert!(
        refused(
            b.dps
                .register(
                    Transport::Https,
                    SCOPE,
                    rid,
                    body(),
                    Some(&b.token(rid, GROUP_KEY, NOW + 60))
                )
                .await
        ),
        "the group key itself"
    );
    assert!(
        refused(
            b.dps
                .register(
                    Transport::Https,
                    SCOPE,
                    rid,
                    body(),
                    Some(&b.token(rid, &sas::generate_key(), NOW + 60))
                )
                .await
        ),
        "wrong key"
    );
    assert!(
        refused(
            b.dps
                .register(Transport::Https, SCOPE, rid, body(), None::<&str>)
                .await
        ),
        "no token"
    );
    assert!(
        refused(
            b.dps
                .register(
                    Transport::Https,
                    "0ne99999999",
                    rid,
                    body(),
                    Some(&b.token(rid, &key, NOW + 60))
                )
                .await
        ),
        "another scope"
    );
    let mismatch = DeviceRegistration {
        registration_id: Some("other".into()),
        ..Default::default()
    };
    assert!(matches!(
        b.dps
            .register(
                Transport::Https,
                SCOPE,
                rid,
                mismatch,
                Some(&b.token(rid, &key, NOW + 60))
            )
            .await,
        Err(ProvisioningError::InvalidArgument(_))
    ));
    assert!(matches!(
        b.dps
            .register(Transport::Https, SCOPE, "bad id", body(), None::<&str>)
            .await,
        Err(ProvisioningError::InvalidArgument(_))
    ));
    assert!(
        b.store
            .claim_operations(&LeaseOwner::new("t"), NOW * 1000 + 1, 1, 100)
            .await
            .expect("claim")
            .is_empty(),
        "nothing recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_individual_enrollment_wins_over_an_enabled_group() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    let rid = "dev-disabled";
    // The individual enrollment's key is the derived one, so the same device token works for both.
    b.put_individual(rid, json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": Fixture::device_key(rid)}}})).await;
    let status = b.register(rid).await;
    assert_eq!(status.status, EnrollmentStatus::Disabled);
    assert!(b.hub.hubs_holding(rid).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registering_keeps_the_hub_and_the_twin() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.link("hub-b", 3).await;
    b.put_group("grp", json!({})).await;
    let first = b
        .register("sticky")
        .await
        .registration_state
        .expect("state")
        .assigned_hub;
    let hub = first.clone().expect("hub");
    b.hub.set_twin(
        &hub,
        "sticky",
        HubTwin {
            tags: serde_json::from_value(json!({"changed": true})).expect("map"),
            desired: Default::default(),
        },
    );
    let again = b
        .register("sticky")
        .await
        .registration_state
        .expect("state");
    assert_eq!(again.assigned_hub, first);
    assert_eq!(
        b.hub.device(&hub, "sticky").expect("device").1.tags["changed"],
        true,
        "twin untouched"
    );
    assert_eq!(b.hub.hubs_holding("sticky"), [hub]);
}

async fn moved(policy: serde_json::Value) -> (Fixture, dps_core::device::DeviceRegistrationResult) {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.link("hub-b", 1).await;
    b.put_group(
        "grp",
        json!({"iotHubs": ["hub-a"], "reprovisionPolicy": policy}),
    )
    .await;
    assert_eq!(
        b.register("mover")
            .await
            .registration_state
            .expect("state")
            .assigned_hub
            .as_deref(),
        Some("hub-a")
    );
    b.hub.set_twin(
        "hub-a",
        "mover",
        HubTwin {
            tags: serde_json::from_value(json!({"deviceType": "toaster", "room": "499"}))
                .expect("map"),
            desired: serde_json::from_value(json!({"state": "toasting"})).expect("map"),
        },
    );
    b.put_group(
        "grp",
        json!({"iotHubs": ["hub-b"], "reprovisionPolicy": policy}),
    )
    .await;
    let state = b.register("mover").await.registration_state.expect("state");
    (b, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovision_and_migrate_data() {
    let (b, state) = moved(json!({"updateHubAssignment": true, "migrateDeviceData": true})).await;
    assert_eq!(state.assigned_hub.as_deref(), Some("hub-b"));
    assert_eq!(
        state.substatus,
        Some(AssignedDeviceSubstatus::DeviceDataMigrated)
    );
    let twin = b.hub.device("hub-b", "mover").expect("moved").1;
    assert_eq!(twin.tags["room"], "499");
    assert_eq!(twin.desired["state"], "toasting");
    assert_eq!(b.hub.hubs_holding("mover"), ["hub-b"]);

    // Back to the first hub: reprovisionedToInitialAssignment.
    b.put_group("grp", json!({"iotHubs": ["hub-a"]})).await;
    let back = b.register("mover").await.registration_state.expect("state");
    assert_eq!(back.assigned_hub.as_deref(), Some("hub-a"));
    assert_eq!(
        back.substatus,
        Some(AssignedDeviceSubstatus::ReprovisionedToInitialAssignment)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovision_and_reset_data() {
    let (b, state) = moved(json!({"updateHubAssignment": true, "migrateDeviceData": false})).await;
    assert_eq!(state.assigned_hub.as_deref(), Some("hub-b"));
    assert_eq!(
        state.substatus,
        Some(AssignedDeviceSubstatus::DeviceDataReset)
    );
    let twin = b.hub.device("hub-b", "mover").expect("moved").1;
    assert!(twin.tags.get("room").is_none(), "reset to the initial twin");
    assert_eq!(twin.desired["state"], "ready");
    assert_eq!(b.hub.hubs_holding("mover"), ["hub-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reprovision() {
    let (b, state) = moved(json!({"updateHubAssignment": false, "migrateDeviceData": true})).await;
    assert_eq!(state.assigned_hub.as_deref(), Some("hub-a"));
    assert_eq!(
        state.substatus,
        Some(AssignedDeviceSubstatus::InitialAssignment)
    );
    assert_eq!(b.hub.hubs_holding("mover"), ["hub-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_hub_is_retried_and_a_dead_one_fails_the_registration() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    b.hub.fail("hub-a", 2);
    let ok = b.register("flaky").await;
    assert_eq!(
        ok.status,
        EnrollmentStatus::Assigned,
        "third attempt succeeds"
    );

    b.hub.fail("hub-a", 100);
    let failed = b
        .register("doomed")
        .await
        .registration_state
        .expect("state");
    assert_eq!(failed.status, EnrollmentStatus::Failed);
    assert_eq!(failed.error_code, Some(500_002));
    assert!(failed.error_message.unwrap_or_default().contains("hub-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_registering_twenty_times_at_once_ends_on_one_hub() {
    let b = Arc::new(fixture());
    let (rid, token, ops) = register_twenty_times(&b).await;
    let claimed = b
        .store
        .claim_operations(&LeaseOwner::new("w"), NOW * 1000, 60_000, 100)
        .await
        .expect("claim");
    race_to_one_hub(b, rid, &token, ops, claimed).await;
}

/// What a node's worker is handed: each operation as it is recorded, leased to it.
#[derive(Default)]
struct Handed(std::sync::Mutex<Vec<StoredOperation>>);

impl Intake for Handed {
    fn lease(&self) -> Option<(LeaseOwner, i64)> {
        Some((LeaseOwner::new("w"), (NOW + 3600) * 1000))
    }

    fn take(&self, op: StoredOperation) {
        self.0.lock().expect("lock").push(op);
    }
}

/// As above, with the operations handed over as they are recorded: each comes with the device's
/// registration as it was then (none), which is stale for all but the first to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_registering_twenty_times_at_once_through_a_handoff_ends_on_one_hub() {
    let handed = Arc::new(Handed::default());
    let b = Arc::new(fixture_with(
        std::time::Duration::ZERO,
        Some(Arc::clone(&handed) as Arc<dyn Intake>),
    ));
    let (rid, token, ops) = register_twenty_times(&b).await;
    let taken = std::mem::take(&mut *handed.0.lock().expect("lock"));
    assert_eq!(taken.len(), 20, "every operation handed over");
    race_to_one_hub(b, rid, &token, ops, taken).await;
}

/// Three hubs, a group, and its device `racer` registering twenty times before any operation is
/// worked on: the device, its token and the operation ids.
async fn register_twenty_times(b: &Fixture) -> (&'static str, String, Vec<String>) {
    for hub in ["hub-a", "hub-b", "hub-c"] {
        b.link(hub, 1).await;
    }
    b.put_group("grp", json!({})).await;
    let rid = "racer";
    let token = b.token(rid, &Fixture::device_key(rid), NOW + 3600);
    let mut ops = Vec::new();
    for _ in 0..20 {
        ops.push(
            b.dps
                .register(
                    Transport::Https,
                    SCOPE,
                    rid,
                    DeviceRegistration::default(),
                    Some(&token),
                )
                .await
                .expect("accepted")
                .operation_id,
        );
    }
    (rid, token, ops)
}

/// Two workers race over `claimed`, the operations `ops` of device `rid`: each ends assigned, and
/// the device is on one hub.
async fn race_to_one_hub(
    b: Arc<Fixture>,
    rid: &str,
    token: &str,
    ops: Vec<String>,
    claimed: Vec<StoredOperation>,
) {
    let (left, right) = claimed.split_at(claimed.len() / 2);
    let (l, r) = (left.to_vec(), right.to_vec());
    let (b1, b2) = (Arc::clone(&b), Arc::clone(&b));
    let t1 = tokio::spawn(async move {
        for op in l {
            b1.dps.process(&op).await.expect("process");
        }
    });
    let t2 = tokio::spawn(async move {
        for op in r {
            b2.dps.process(&op).await.expect("process");
        }
    });
    t1.await.expect("join");
    t2.await.expect("join");
    for op in ops {
        let status = b.poll(rid, &op, token).await;
        assert_eq!(status.status, EnrollmentStatus::Assigned);
    }
    assert_eq!(b.hub.hubs_holding(rid).len(), 1);
}

const WEBHOOK: &str = "https://contoso-function-app.example/api/HttpTrigger1?code=s3cret";

async fn custom_bench(reprovision: serde_json::Value) -> Fixture {
    custom_bench_of(fixture(), reprovision).await
}

async fn custom_bench_of(b: Fixture, reprovision: serde_json::Value) -> Fixture {
    b.link("contoso-toasters-hub", 1).await;
    b.link("contoso-heatpumps-hub", 1).await;
    b.put_group(
        "contoso-custom-allocated-devices",
        json!({
            "allocationPolicy": "custom",
            "iotHubs": ["contoso-toasters-hub", "contoso-heatpumps-hub"],
            "customAllocationDefinition": {"webhookUrl": WEBHOOK, "apiVersion": "2021-10-01"},
            "reprovisionPolicy": reprovision,
        }),
    )
    .await;
    b
}

fn tutorial_payload() -> DeviceRegistration {
    DeviceRegistration {
        payload: Some(
            json!({"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"}),
        ),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_decides_the_hub_twin_and_payload() {
    let b = custom_bench(json!({"updateHubAssignment": true, "migrateDeviceData": true})).await;
    b.webhook.answer(200, r#"{"iotHubHostName":"contoso-heatpumps-hub","initialTwin":{"tags":{"deviceType":"heatpump"},"properties":{"desired":{"state":"on","temperatureSetting":"65"}}},"payload":{"hello":"device"}}"#);
    let rid = "mainbuilding167-contoso-hpsd-088";
    let done = b.register_with(rid, tutorial_payload()).await;
    let state = done.registration_state.expect("state");
    assert_eq!(state.status, EnrollmentStatus::Assigned);
    assert_eq!(state.assigned_hub.as_deref(), Some("contoso-heatpumps-hub"));
    assert_eq!(
        state.payload,
        Some(json!({"hello": "device"})),
        "the webhook's payload reaches the device"
    );
    let twin = b
        .hub
        .device("contoso-heatpumps-hub", rid)
        .expect("on the hub")
        .1;
    assert_eq!(
        twin.tags["deviceType"], "heatpump",
        "the webhook's twin replaces the enrollment's"
    );
    assert_eq!(twin.desired["temperatureSetting"], "65");

    let (url, request) = b.webhook.requests().pop().expect("called");
    assert_eq!(url, WEBHOOK);
    assert_eq!(
        request["enrollmentGroup"]["enrollmentGroupId"],
        "contoso-custom-allocated-devices"
    );
    assert_eq!(
        request["enrollmentGroup"]["attestation"],
        json!({"type": "symmetricKey"}),
        "no keys sent"
    );
    assert_eq!(request["deviceRuntimeContext"]["registrationId"], rid);
    assert_eq!(
        request["deviceRuntimeContext"]["payload"],
        json!({"MyDeviceFirmwareVersion": "12.0.2.5", "MyDeviceProvisioningVersion": "1.0.0.0"})
    );
    assert_eq!(request["deviceRuntimeContext"]["symmetricKey"], json!({}));
    assert!(
        request["deviceRuntimeContext"]
            .get("currentIotHubHostName")
            .is_none()
    );
    assert_eq!(
        request["linkedHubs"],
        json!(["contoso-toasters-hub", "contoso-heatpumps-hub"])
    );
}

async fn outcome(answers: &[(u16, &str)]) -> (Fixture, dps_core::device::DeviceRegistrationResult) {
    let b = custom_bench(json!({"updateHubAssignment": true, "migrateDeviceData": true})).await;
    for (status, body) in answers {
        b.webhook.answer(*status, body);
    }
    let state = b
        .register("breakroom499-contoso-tstrsd-007")
        .await
        .registration_state
        .expect("state");
    (b, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_troubleshooting_table() {
    let (_, empty) = outcome(&[(200, r#"{"iotHubHostName":""}"#)]).await;
    assert_eq!(
        (empty.status, empty.error_code),
        (EnrollmentStatus::Failed, Some(400_208))
    );
    let (_, null) = outcome(&[(200, r#"{"iotHubHostName":null}"#)]).await;
    assert_eq!(null.error_code, Some(400_208));
    let (_, unauthorized) = outcome(&[(401, "")]).await;
    assert_eq!(
        (unauthorized.status, unauthorized.error_code),
        (EnrollmentStatus::Failed, Some(400_209))
    );
    let (_, bad_request) = outcome(&[(400, "Unrecognized device registration.")]).await;
    assert_eq!(bad_request.error_code, Some(400_207));
    assert!(
        bad_request
            .error_message
            .unwrap_or_default()
            .contains("Unrecognized device registration.")
    );
    let (_, not_json) = outcome(&[(200, "<html>oops</html>")]).await;
    assert_eq!(not_json.error_code, Some(400_207));
    let (_, unknown_hub) = outcome(&[(200, r#"{"iotHubHostName":"somewhere-else"}"#)]).await;
    assert_eq!(unknown_hub.error_code, Some(400_207));

    let (b, retried) = outcome(&[
        (429, "slow down"),
        (503, "busy"),
        (200, r#"{"iotHubHostName":"contoso-toasters-hub"}"#),
    ])
    .await;
    assert_eq!(
        retried.status,
        EnrollmentStatus::Assigned,
        "assigned after two retries"
    );
    assert_eq!(b.webhook.requests().len(), 3);

    let (b, exhausted) = outcome(&[(500, "down")]).await;
    assert_eq!(
        (exhausted.status, exhausted.error_code),
        (EnrollmentStatus::Failed, Some(400_207))
    );
    assert_eq!(
        b.webhook.requests().len(),
        11,
        "the first call and 10 retries"
    );
}

/// A register request that waits gets the final status of its operation as the worker commits
/// it: `assigned` with the whole registration state, or `failed` with its error; the operation
/// polled afterwards reads the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_register_request_gets_the_final_status() {
    let within = std::time::Duration::from_secs(60);
    let b = custom_bench_of(
        fixture_answering_within(within),
        json!({"updateHubAssignment": true, "migrateDeviceData": true}),
    )
    .await;
    b.webhook.answer(
        200,
        r#"{"iotHubHostName":"contoso-heatpumps-hub","payload":{"hello":"device"}}"#,
    );
    let rid = "mainbuilding167-contoso-hpsd-088";
    let answer = b.register_answered(rid, tutorial_payload()).await;
    assert_eq!(answer.status, EnrollmentStatus::Assigned);
    let state = answer
        .registration_state
        .clone()
        .expect("the registration state");
    assert_eq!(state.assigned_hub.as_deref(), Some("contoso-heatpumps-hub"));
    assert_eq!(state.device_id.as_deref(), Some(rid));
    assert_eq!(state.payload, Some(json!({"hello": "device"})));
    assert!(
        b.hub.device("contoso-heatpumps-hub", rid).is_some(),
        "created before the answer"
    );
    let token = b.token(rid, &Fixture::device_key(rid), NOW + 3600);
    let polled = b.poll(rid, &answer.operation_id, &token).await;
    assert_eq!(polled, answer);

    b.webhook.answer(404, "no such device type");
    let rid = "mainbuilding167-contoso-unknown-001";
    let answer = b.register_answered(rid, tutorial_payload()).await;
    assert_eq!(answer.status, EnrollmentStatus::Failed);
    let state = answer.registration_state.expect("the registration state");
    assert_eq!(state.error_code, Some(400_207));
}

/// An operation the worker leaves for later (a throttling webhook, to be asked again) lets its
/// register request go at once with `assigning`: the device polls, as it would without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_request_is_let_go_when_its_operation_waits_for_a_retry() {
    let within = std::time::Duration::from_secs(60);
    let b = custom_bench_of(
        fixture_answering_within(within),
        json!({"updateHubAssignment": true, "migrateDeviceData": true}),
    )
    .await;
    b.webhook.answer(429, "slow down");
    b.webhook
        .answer(200, r#"{"iotHubHostName":"contoso-toasters-hub"}"#);
    let rid = "breakroom499-contoso-tstrsd-007";
    let answer = b.register_answered(rid, tutorial_payload()).await;
    assert_eq!(answer.status, EnrollmentStatus::Assigning);
    assert!(answer.registration_state.is_none());
    assert_eq!(b.webhook.requests().len(), 1);
    b.advance(5);
    b.drain().await;
    let token = b.token(rid, &Fixture::device_key(rid), NOW + 3600);
    let polled = b.poll(rid, &answer.operation_id, &token).await;
    assert_eq!(polled.status, EnrollmentStatus::Assigned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_fails_the_registration() {
    let b = custom_bench(json!({"updateHubAssignment": true, "migrateDeviceData": true})).await;
    b.webhook.time_out();
    let state = b
        .register("breakroom499-contoso-tstrsd-007")
        .await
        .registration_state
        .expect("state");
    assert_eq!(
        (state.status, state.error_code),
        (EnrollmentStatus::Failed, Some(400_207))
    );
    assert!(
        state
            .error_message
            .unwrap_or_default()
            .contains("did not answer")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovisioning_tells_the_webhook_the_current_hub_and_reset_applies_its_twin() {
    let b = custom_bench(json!({"updateHubAssignment": true, "migrateDeviceData": false})).await;
    let rid = "breakroom499-contoso-tstrsd-007";
    b.webhook.answer(
        200,
        r#"{"iotHubHostName":"contoso-toasters-hub","initialTwin":{"tags":{"v":1}}}"#,
    );
    assert_eq!(b.register(rid).await.status, EnrollmentStatus::Assigned);
    b.webhook.answer(
        200,
        r#"{"iotHubHostName":"contoso-heatpumps-hub","initialTwin":{"tags":{"v":2}}}"#,
    );
    b.webhook.answer(
        200,
        r#"{"iotHubHostName":"contoso-heatpumps-hub","initialTwin":{"tags":{"v":2}}}"#,
    );
    let moved = b.register(rid).await.registration_state.expect("state");
    assert_eq!(moved.assigned_hub.as_deref(), Some("contoso-heatpumps-hub"));
    assert_eq!(
        moved.substatus,
        Some(AssignedDeviceSubstatus::DeviceDataReset)
    );
    assert_eq!(
        b.hub
            .device("contoso-heatpumps-hub", rid)
            .expect("moved")
            .1
            .tags["v"],
        2,
        "reset applies the webhook's twin"
    );
    assert_eq!(b.hub.hubs_holding(rid), ["contoso-heatpumps-hub"]);
    let (_, second) = b.webhook.requests().pop().expect("called");
    assert_eq!(
        second["deviceRuntimeContext"]["currentIotHubHostName"],
        "contoso-toasters-hub"
    );
    assert_eq!(second["deviceRuntimeContext"]["currentDeviceId"], rid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_enrollment_never_calls_the_webhook() {
    let b = custom_bench(json!({"updateHubAssignment": true, "migrateDeviceData": true})).await;
    let rid = "dev-off";
    b.put_individual(rid, json!({"provisioningStatus": "disabled", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": Fixture::device_key(rid)}}})).await;
    assert_eq!(b.register(rid).await.status, EnrollmentStatus::Disabled);
    assert!(b.webhook.requests().is_empty());
}

/// `static` without `iotHubs` (as Microsoft's SDK tests create groups) lands on the first linked
/// hub that accepts allocation; the legacy `iotHubHostName` names the hub as `iotHubs` would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_allocation_without_iot_hubs_and_with_the_legacy_field() {
    let b = fixture();
    b.link("hub-b", 1).await;
    b.link("hub-a", 1).await;
    b.put_group("static-any", json!({"allocationPolicy": "static"}))
        .await;
    for rid in ["static-dev-1", "static-dev-2"] {
        let state = b.register(rid).await.registration_state.expect("state");
        assert_eq!(state.status, EnrollmentStatus::Assigned, "{state:?}");
        assert_eq!(state.assigned_hub.as_deref(), Some("hub-a"));
    }
    let legacy = fixture();
    legacy.link("hub-b", 1).await;
    legacy.link("hub-a", 1).await;
    legacy
        .put_group(
            "legacy",
            json!({"allocationPolicy": "static", "iotHubHostName": "hub-b"}),
        )
        .await;
    let state = legacy
        .register("legacy-dev")
        .await
        .registration_state
        .expect("state");
    assert_eq!(state.assigned_hub.as_deref(), Some("hub-b"), "{state:?}");
}

/// Registration ids are case-insensitive: registering as `Case-Dev-1`, then `case-dev-1`, then
/// `CASE-DEV-1` is one registration and one hub identity, which keeps the first device id and
/// carries only the keys of the latest spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_id_in_another_case_is_the_same_device() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    for (i, rid) in ["Case-Dev-1", "case-dev-1", "CASE-DEV-1"]
        .iter()
        .enumerate()
    {
        let state = b.register(rid).await.registration_state.expect("state");
        assert_eq!(state.status, EnrollmentStatus::Assigned, "{rid}: {state:?}");
        assert_eq!(state.device_id.as_deref(), Some("Case-Dev-1"), "{rid}");
        assert_eq!(
            state.registration_id, *rid,
            "the state shows the id as last sent"
        );
        if i == 0 {
            assert_eq!(
                state.substatus,
                Some(AssignedDeviceSubstatus::InitialAssignment)
            );
        }
        assert_eq!(
            b.hub.device_ids("hub-a"),
            vec!["Case-Dev-1".to_owned()],
            "one identity after registering as {rid}"
        );
    }
    let (device, _) = b.hub.device("hub-a", "Case-Dev-1").expect("on the hub");
    assert_eq!(
        primary_key(&device),
        Fixture::device_key("CASE-DEV-1"),
        "the earlier spellings' keys no longer open the identity"
    );
}

/// A device whose enrollment changes its `deviceId` between registrations ends with the new
/// identity only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_device_id_leaves_no_identity_behind() {
    let b = fixture();
    b.link("hub-a", 1).await;
    let rid = "renamed-device";
    b.put_individual(rid, json!({"deviceId": "first-name"}))
        .await;
    let token = b.token(rid, GROUP_KEY, NOW + 3600);
    for (name, expected) in [("first-name", "first-name"), ("second-name", "second-name")] {
        b.put_individual(rid, json!({"deviceId": name})).await;
        let accepted = b
            .dps
            .register(
                Transport::Https,
                SCOPE,
                rid,
                DeviceRegistration::default(),
                Some(&token),
            )
            .await
            .expect("accepted");
        b.drain().await;
        let status = b.poll(rid, &accepted.operation_id, &token).await;
        let state = status.registration_state.expect("state");
        assert_eq!(state.device_id.as_deref(), Some(expected), "{state:?}");
        assert_eq!(b.hub.device_ids("hub-a"), vec![expected.to_owned()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_hub_is_waited_for_as_long_as_it_asks() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    b.hub
        .refuse("hub-a", 1, 429, Some(std::time::Duration::from_secs(30)));
    let first = b.start("first").await;
    b.drain().await;
    assert_eq!(b.status("first", &first).await, EnrollmentStatus::Assigning);
    assert_eq!(b.hub.calls(), ["upsert hub-a first"]);

    // While the hub asked to be left alone, another registration does not call it either.
    let second = b.start("second").await;
    b.drain().await;
    b.advance(25);
    b.drain().await;
    assert_eq!(b.hub.calls().len(), 1, "{:?}", b.hub.calls());
    assert_eq!(
        b.status("second", &second).await,
        EnrollmentStatus::Assigning
    );

    // After Retry-After (and at most a fifth more, the spread), both finish.
    b.advance(12);
    b.drain().await;
    assert_eq!(b.status("first", &first).await, EnrollmentStatus::Assigned);
    assert_eq!(
        b.status("second", &second).await,
        EnrollmentStatus::Assigned
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_a_retry_cannot_change_fails_at_once() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    for status in [400, 401, 403] {
        b.hub.refuse("hub-a", 1, status, None);
        let rid = format!("refused-{status}");
        let op = b.start(&rid).await;
        b.drain().await;
        assert_eq!(b.status(&rid, &op).await, EnrollmentStatus::Failed);
        let record = b.record(&rid).await;
        assert_eq!(record["errorCode"], 500_002);
        let message = record["errorMessage"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("HTTP {status}")), "{message}");
        if status != 400 {
            assert!(message.contains("ServiceConnect"), "{message}");
        }
    }
    assert_eq!(b.hub.calls().len(), 3, "one call each: {:?}", b.hub.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_stays_down_fails_the_registration_after_the_retry_window() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.put_group("grp", json!({})).await;
    b.hub.refuse("hub-a", 1000, 503, None);
    let op = b.start("patient").await;
    let started = b.clock_now();
    while b.status("patient", &op).await == EnrollmentStatus::Assigning {
        b.drain().await;
        b.advance(1);
        assert!(
            b.clock_now().duration_since(started).as_secs() < 120,
            "still assigning long after the 60 s window"
        );
    }
    let waited = b.clock_now().duration_since(started).as_secs();
    assert!(
        waited >= 50,
        "gave up after {waited} s, before the 60 s window"
    );
    let record = b.record("patient").await;
    assert_eq!(record["errorCode"], 500_002);
    let message = record["errorMessage"].as_str().unwrap_or_default();
    assert!(message.contains("gave up after"), "{message}");
    // Doubling from 1 s up to 8 s: a handful of calls, not one per second.
    let calls = b.hub.calls().len();
    assert!((5..=15).contains(&calls), "{calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_replaces_the_twin_and_a_failed_cleanup_is_in_the_trace() {
    let b = fixture();
    b.link("hub-a", 1).await;
    b.link("hub-b", 1).await;
    let policy = json!({"updateHubAssignment": true, "migrateDeviceData": false});
    b.put_group(
        "grp",
        json!({"iotHubs": ["hub-a"], "reprovisionPolicy": policy}),
    )
    .await;
    b.register("mover").await;
    b.put_group(
        "grp",
        json!({"iotHubs": ["hub-b"], "reprovisionPolicy": policy}),
    )
    .await;
    // hub-a answers its next call (the deletion of the old identity) with 500.
    b.hub.refuse("hub-a", 1, 500, None);
    let state = b.register("mover").await.registration_state.expect("state");
    assert_eq!(state.assigned_hub.as_deref(), Some("hub-b"));
    let calls = b.hub.calls();
    assert!(
        calls.contains(&"replace-twin hub-b mover".to_owned()),
        "{calls:?}"
    );
    let stale = &b.record("mover").await["staleIdentity"];
    assert_eq!(stale["hub"], "hub-a", "{stale}");
    assert_eq!(stale["deviceId"], "mover", "{stale}");
    assert!(
        stale["error"]
            .as_str()
            .unwrap_or_default()
            .contains("HTTP 500"),
        "{stale}"
    );
    assert_eq!(b.hub.hubs_holding("mover"), ["hub-a", "hub-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_without_twins_takes_only_devices_without_a_twin() {
    let b = fixture();
    let basic = LinkedHub {
        host_name: "basic-hub".into(),
        connection_string: Secret::new(format!(
            "HostName=basic-hub;SharedAccessKeyName=iothubowner;SharedAccessKey={GROUP_KEY}"
        )),
        allocation_weight: 1,
        apply_allocation_policy: true,
        location: None,
        twins: false,
    };
    b.store.put_linked_hub(&basic).await.expect("link");
    // The fixture's group carries an initial twin.
    b.put_group("twinned", json!({})).await;
    let failed = b
        .register("with-twin")
        .await
        .registration_state
        .expect("state");
    assert_eq!(failed.status, EnrollmentStatus::Failed);
    assert_eq!(failed.error_code, Some(400_301));
    assert!(
        failed
            .error_message
            .unwrap_or_default()
            .contains("Basic-tier"),
        "a message that names the cause"
    );
    assert!(b.hub.device_ids("basic-hub").is_empty());

    b.put_individual("plain", json!({})).await;
    let token = b.token("plain", GROUP_KEY, NOW + 3600);
    let accepted = b
        .dps
        .register(
            Transport::Https,
            SCOPE,
            "plain",
            DeviceRegistration::default(),
            Some(&token),
        )
        .await
        .expect("accepted");
    b.drain().await;
    let done = b.poll("plain", &accepted.operation_id, &token).await;
    assert_eq!(done.status, EnrollmentStatus::Assigned);
    assert_eq!(b.hub.calls(), ["upsert basic-hub plain"], "no twin call");
}
