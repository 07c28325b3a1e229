//! The contract every minihub store must keep, run against SQLite and PostgreSQL.
//!
//! Each case takes two handles on one fresh, empty store: for SQLite the same one twice, for
//! PostgreSQL two stores with their own pools, as two nodes would have. Concurrent writes go
//! through both.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::{Change, HubStore, Row};
use crate::error::MinihubError;
use crate::model::{
    AuthenticationMechanism, AuthenticationType, Device, DeviceCapabilities, DeviceStatus, HubInfo,
    HubPolicy, SymmetricKey, X509Thumbprint,
};
use crate::twin::TwinState;

const NOW: &str = "2026-12-07T00:00:00Z";

fn hub(name: &str) -> HubInfo {
    HubInfo {
        host_name: name.to_owned(),
        policies: HubPolicy::defaults(),
    }
}

fn device(id: &str, etag: &str) -> Device {
    Device {
        device_id: id.to_owned(),
        generation_id: "638000000000000000".into(),
        etag: etag.to_owned(),
        connection_state: "Disconnected".into(),
        status: DeviceStatus::Enabled,
        status_reason: None,
        connection_state_updated_time: NOW.into(),
        status_updated_time: NOW.into(),
        last_activity_time: NOW.into(),
        cloud_to_device_message_count: 0,
        authentication: AuthenticationMechanism {
            symmetric_key: SymmetricKey::default(),
            x509_thumbprint: X509Thumbprint::default(),
            kind: AuthenticationType::Sas,
        },
        capabilities: DeviceCapabilities::default(),
        device_scope: None,
        parent_scopes: Vec::new(),
    }
}

async fn put(store: &HubStore, hub: &str, id: &str) {
    let row = (device(id, "e1"), TwinState::new(NOW));
    store
        .update(hub.into(), id.into(), move |_| {
            Ok(Change::Put(Box::new(row.clone()), ()))
        })
        .await
        .expect("put");
}

fn ids(rows: &[Row]) -> Vec<&str> {
    rows.iter().map(|(d, _)| d.device_id.as_str()).collect()
}

/// A hub is stored once: a second insert of the same name keeps the first keys, for every node.
pub(super) async fn hubs_are_created_once(a: Arc<HubStore>, b: Arc<HubStore>) {
    let first = a.insert_hub(hub("b.example")).await.expect("insert");
    let second = b.insert_hub(hub("b.example")).await.expect("insert again");
    assert_eq!(first, second, "the second insert replaced the keys");
    assert_ne!(first, hub("b.example"), "fresh keys differ each time");
    a.insert_hub(hub("a.example")).await.expect("insert a");
    let names: Vec<_> = b
        .hubs()
        .await
        .expect("hubs")
        .into_iter()
        .map(|h| h.host_name)
        .collect();
    assert_eq!(names, ["a.example", "b.example"]);
}

/// Put, read back, replace, delete.
pub(super) async fn a_device_round_trips(a: Arc<HubStore>, b: Arc<HubStore>) {
    assert!(a.device("h", "dev").await.expect("read").is_none());
    put(&a, "h", "dev").await;
    let (stored, twin) = b.device("h", "dev").await.expect("read").expect("stored");
    assert_eq!(stored, device("dev", "e1"));
    assert_eq!(twin, TwinState::new(NOW));
    assert!(
        b.device("other", "dev").await.expect("read").is_none(),
        "hubs are apart"
    );
    let seen = b
        .update("h".into(), "dev".into(), |row| {
            let (mut dev, twin) = row.expect("present");
            dev.etag = "e2".into();
            Ok(Change::Put(Box::new((dev, twin)), "seen"))
        })
        .await
        .expect("replace");
    assert_eq!(seen, "seen");
    assert_eq!(
        a.device("h", "dev")
            .await
            .expect("read")
            .expect("stored")
            .0
            .etag,
        "e2"
    );
    a.update("h".into(), "dev".into(), |row| {
        assert!(row.is_some());
        Ok(Change::Delete(()))
    })
    .await
    .expect("delete");
    assert!(b.device("h", "dev").await.expect("read").is_none());
}

/// A decision that fails writes nothing.
pub(super) async fn a_failed_decision_writes_nothing(a: Arc<HubStore>, b: Arc<HubStore>) {
    put(&a, "h", "dev").await;
    let refused = b
        .update("h".into(), "dev".into(), |_| -> Result<Change<()>, _> {
            Err(MinihubError::PreconditionFailed("no".into()))
        })
        .await;
    assert!(matches!(refused, Err(MinihubError::PreconditionFailed(_))));
    assert_eq!(
        a.device("h", "dev").await.expect("read").expect("kept").0,
        device("dev", "e1")
    );
    let refused = b
        .update("h".into(), "new".into(), |row| {
            assert!(row.is_none());
            Err::<Change<()>, _>(MinihubError::ArgumentInvalid("no".into()))
        })
        .await;
    assert!(refused.is_err());
    assert!(a.device("h", "new").await.expect("read").is_none());
}

/// Listings are per hub, in bytewise id order, and page after a given id.
pub(super) async fn listings_page_in_id_order(a: Arc<HubStore>, b: Arc<HubStore>) {
    for id in ["b", "a", "B", "a-1", "z", "a.1"] {
        put(&a, "h", id).await;
    }
    put(&a, "other", "c").await;
    let all = b.devices("h", None, 100).await.expect("list");
    assert_eq!(ids(&all), ["B", "a", "a-1", "a.1", "b", "z"]);
    let page = b.devices("h", Some("a"), 2).await.expect("page");
    assert_eq!(ids(&page), ["a-1", "a.1"]);
    let rest = b.devices("h", Some("a.1"), 100).await.expect("rest");
    assert_eq!(ids(&rest), ["b", "z"]);
    assert!(b.devices("empty", None, 10).await.expect("list").is_empty());
}

/// Writes to one device through both handles at once follow one another: each sees the one
/// before it, none is lost.
pub(super) async fn writes_to_one_device_follow_one_another(a: Arc<HubStore>, b: Arc<HubStore>) {
    put(&a, "h", "dev").await;
    let writes = 40u64;
    let tasks: Vec<_> = (0..writes)
        .map(|i| {
            let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
            tokio::spawn(async move {
                store
                    .update("h".into(), "dev".into(), move |row| {
                        let (dev, mut twin) = row.expect("present");
                        let mut patch = Map::new();
                        patch.insert(format!("w{i}"), json!(i));
                        let version = twin.patch_reported(&patch, NOW)?;
                        Ok(Change::Put(Box::new((dev, twin)), version))
                    })
                    .await
                    .expect("write")
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.expect("join"));
    }
    versions.sort_unstable();
    let expected: Vec<u64> = (2..writes + 2).collect();
    assert_eq!(versions, expected, "two writes saw the same version");
    let (_, twin) = a.device("h", "dev").await.expect("read").expect("present");
    let reported = twin.device_view()["reported"].clone();
    for i in 0..writes {
        assert_eq!(
            reported[format!("w{i}")],
            Value::from(i),
            "write {i} was lost"
        );
    }
}

/// Creates racing through both handles, half through `create` and half through `update`:
/// exactly one finds the device absent.
pub(super) async fn one_of_racing_creates_wins(a: Arc<HubStore>, b: Arc<HubStore>) {
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
            tokio::spawn(async move {
                let decide = move |row: Option<Row>| match row {
                    Some(_) => Err(MinihubError::DeviceAlreadyExists("dev".into())),
                    None => Ok(Change::Put(
                        Box::new((device("dev", &format!("e{i}")), TwinState::new(NOW))),
                        i,
                    )),
                };
                match i % 4 < 2 {
                    true => store.create("h".into(), "dev".into(), decide).await,
                    false => store.update("h".into(), "dev".into(), decide).await,
                }
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("join") {
            Ok(i) => winners.push(i),
            Err(MinihubError::DeviceAlreadyExists(_)) => {}
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let (stored, _) = a.device("h", "dev").await.expect("read").expect("created");
    assert_eq!(stored.etag, format!("e{}", winners[0]));
}

/// `create` over a device that exists decides from that device, and writes what it decided.
pub(super) async fn a_create_over_a_device_sees_it(a: Arc<HubStore>, b: Arc<HubStore>) {
    put(&a, "h", "dev").await;
    let seen = b
        .create("h".into(), "dev".into(), |row| match row {
            None => Ok(Change::Put(
                Box::new((device("dev", "fresh"), TwinState::new(NOW))),
                None,
            )),
            Some((mut dev, twin)) => {
                let seen = dev.etag.clone();
                dev.etag = "e2".into();
                Ok(Change::Put(Box::new((dev, twin)), Some(seen)))
            }
        })
        .await
        .expect("create");
    assert_eq!(
        seen.as_deref(),
        Some("e1"),
        "the existing device was not seen"
    );
    let (stored, _) = a.device("h", "dev").await.expect("read").expect("kept");
    assert_eq!(stored.etag, "e2");
    let created = b
        .create("h".into(), "new".into(), |row| {
            assert!(row.is_none());
            Ok(Change::Put(
                Box::new((device("new", "n1"), TwinState::new(NOW))),
                "created",
            ))
        })
        .await
        .expect("create");
    assert_eq!(created, "created");
    assert!(a.device("h", "new").await.expect("read").is_some());
}

/// Runs every case against a backend; `$make` is an expression yielding `(guard, a, b)`.
macro_rules! hub_store_contract {
    ($make:expr) => {
        $crate::store::contract::hub_store_contract!(@cases $make;
            hubs_are_created_once,
            a_device_round_trips,
            a_failed_decision_writes_nothing,
            listings_page_in_id_order,
            writes_to_one_device_follow_one_another,
            one_of_racing_creates_wins,
            a_create_over_a_device_sees_it,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_guard, a, b) = $make;
                $crate::store::contract::$case(a, b).await;
            }
        )*
    };
}
pub(crate) use hub_store_contract;

mod sqlite {
    use super::*;

    async fn fresh() -> (tempfile::TempDir, Arc<HubStore>, Arc<HubStore>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = HubStore::open_sqlite(&dir.path().join("hub.db")).expect("open");
        let store = Arc::new(store);
        (dir, Arc::clone(&store), store)
    }

    hub_store_contract!(fresh().await);
}

mod postgres {
    use super::*;
    use crate::store::PgHubStore;
    use pg_schema::testing::TestSchema;

    /// Two nodes' stores, each with its own pool, on a fresh schema.
    pub(super) async fn two_nodes() -> (TestSchema, HubStore, HubStore) {
        let schema = TestSchema::create("minihub").await;
        let a = PgHubStore::open(warm(schema.pool(8).await))
            .await
            .expect("node a");
        let b = PgHubStore::open(warm(schema.pool(8).await))
            .await
            .expect("node b");
        (schema, HubStore::Postgres(a), HubStore::Postgres(b))
    }

    /// `pool`, keeping most of its connections between statements as the service does.
    pub(super) fn warm(pool: sqlx::PgPool) -> Arc<pg_schema::WarmPool> {
        Arc::new(pg_schema::WarmPool::new(pool, 6))
    }

    async fn fresh() -> (TestSchema, Arc<HubStore>, Arc<HubStore>) {
        let (schema, a, b) = two_nodes().await;
        (schema, Arc::new(a), Arc::new(b))
    }

    hub_store_contract!(fresh().await);
}

/// As `postgres`, with node b writing through sessions that do not wait for the flush
/// (`HubStore::flushed_later`, what DPS's provisioning writes through).
mod postgres_flushed_later {
    use super::*;
    use crate::store::PgHubStore;
    use pg_schema::testing::TestSchema;

    async fn fresh() -> (TestSchema, Arc<HubStore>, Arc<HubStore>) {
        let (schema, a, b) = super::postgres::two_nodes().await;
        let b = b.flushed_later().expect("on PostgreSQL");
        (schema, Arc::new(a), Arc::new(b))
    }

    hub_store_contract!(fresh().await);

    /// Its sessions commit without waiting for the flush; the store's own still wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_its_sessions_skip_the_flush() {
        let schema = TestSchema::create("minihub").await;
        let store = PgHubStore::open(super::postgres::warm(schema.pool(2).await))
            .await
            .expect("open");
        let setting = |store: &PgHubStore| {
            let pool = store.pool().clone();
            async move {
                sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
                    .fetch_one(&pool)
                    .await
                    .expect("show")
            }
        };
        assert_eq!(setting(&store.flushed_later()).await, "off");
        assert_eq!(setting(&store).await, "on");
    }
}
