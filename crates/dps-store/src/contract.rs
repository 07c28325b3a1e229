//! The backend contract: one suite every `Store` implementation must pass.
//!
//! Each case is a public async function taking a fresh, empty store. A backend runs them all with
//! [`contract_tests!`](crate::contract_tests), giving an expression that yields `(guard, store)`;
//! the guard (a temp dir, a database schema) lives until the case ends.

use std::sync::Arc;

use dps_core::access::ServiceIdentity;
use dps_core::ids::Etag;
use dps_core::linked_hub::LinkedHub;
use dps_core::secret::Secret;
use dps_core::store::{
    Durability, EnrollmentKind, LeaseOwner, Precondition, Store, StoreError, StoredDoc,
    StoredOperation,
};

/// A document with a fresh etag.
pub fn doc(text: &str) -> StoredDoc {
    StoredDoc {
        etag: Etag::generate(),
        doc: text.to_owned(),
    }
}

/// A linked hub for tests.
pub fn sample_hub(host: &str, weight: u32) -> LinkedHub {
    LinkedHub {
        host_name: host.to_owned(),
        connection_string: Secret::new(format!(
            "HostName={host};SharedAccessKeyName=iothubowner;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        )),
        allocation_weight: weight,
        apply_allocation_policy: true,
        location: None,
        twins: true,
    }
}

/// Create, conditional replace, conditional delete.
pub async fn enrollment_lifecycle(store: Arc<dyn Store>) {
    let kind = EnrollmentKind::Individual;
    let first = doc(r#"{"v":1}"#);
    store
        .put_enrollment(kind, "dev-1", first.clone(), Precondition::MustNotExist)
        .await
        .expect("create");
    assert_eq!(
        store.get_enrollment(kind, "dev-1").await.expect("get"),
        Some(first.clone())
    );
    assert!(matches!(
        store
            .put_enrollment(kind, "dev-1", doc("{}"), Precondition::MustNotExist)
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        store
            .put_enrollment(
                kind,
                "dev-1",
                doc("{}"),
                Precondition::EtagIs(Etag::generate())
            )
            .await,
        Err(StoreError::EtagMismatch(_))
    ));
    let second = doc(r#"{"v":2}"#);
    store
        .put_enrollment(
            kind,
            "dev-1",
            second.clone(),
            Precondition::EtagIs(first.etag.clone()),
        )
        .await
        .expect("replace");
    assert_eq!(
        store.get_enrollment(kind, "dev-1").await.expect("get"),
        Some(second.clone())
    );
    assert!(matches!(
        store
            .delete_enrollment(kind, "dev-1", Precondition::EtagIs(first.etag))
            .await,
        Err(StoreError::EtagMismatch(_))
    ));
    store
        .delete_enrollment(kind, "dev-1", Precondition::EtagIs(second.etag))
        .await
        .expect("delete");
    assert_eq!(
        store.get_enrollment(kind, "dev-1").await.expect("get"),
        None
    );
    assert!(matches!(
        store
            .delete_enrollment(kind, "dev-1", Precondition::None)
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .put_enrollment(
                kind,
                "dev-1",
                doc("{}"),
                Precondition::EtagIs(Etag::generate())
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
}

/// Individual enrollments and groups with the same key are different documents.
pub async fn kinds_are_separate(store: Arc<dyn Store>) {
    store
        .put_enrollment(
            EnrollmentKind::Individual,
            "same",
            doc("1"),
            Precondition::MustNotExist,
        )
        .await
        .expect("individual");
    store
        .put_enrollment(
            EnrollmentKind::Group,
            "same",
            doc("2"),
            Precondition::MustNotExist,
        )
        .await
        .expect("group");
    let individual = store
        .get_enrollment(EnrollmentKind::Individual, "same")
        .await
        .expect("get")
        .expect("exists");
    let group = store
        .get_enrollment(EnrollmentKind::Group, "same")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!((individual.doc.as_str(), group.doc.as_str()), ("1", "2"));
    assert_eq!(
        store
            .enrollment_versions(EnrollmentKind::Group)
            .await
            .expect("versions"),
        vec![("same".to_owned(), group.etag.clone())],
        "each kind lists its own keys and current etags"
    );
    store
        .delete_enrollment(EnrollmentKind::Group, "same", Precondition::None)
        .await
        .expect("delete");
    assert!(
        store
            .enrollment_versions(EnrollmentKind::Group)
            .await
            .expect("versions")
            .is_empty()
    );
    assert!(
        store
            .get_enrollment(EnrollmentKind::Individual, "same")
            .await
            .expect("get")
            .is_some()
    );
}

/// Listing returns pages in key order and a continuation key while more remain.
pub async fn listing_pages_in_key_order(store: Arc<dyn Store>) {
    for key in ["e", "a", "d", "b", "c"] {
        store
            .put_enrollment(
                EnrollmentKind::Group,
                key,
                doc(&format!("\"{key}\"")),
                Precondition::MustNotExist,
            )
            .await
            .expect("put");
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store
            .list_enrollments(EnrollmentKind::Group, after.as_deref(), 2)
            .await
            .expect("list");
        pages += 1;
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|d| d.doc));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, ["\"a\"", "\"b\"", "\"c\"", "\"d\"", "\"e\""]);
    assert_eq!(pages, 3);
    let empty = store
        .list_enrollments(EnrollmentKind::Individual, None, 10)
        .await
        .expect("list");
    assert!(empty.items.is_empty() && empty.next.is_none());
}

/// Registration states are listed per group.
pub async fn registrations_by_group(store: Arc<dyn Store>) {
    for (key, group) in [
        ("r1", Some("g1")),
        ("r2", Some("g1")),
        ("r3", Some("g2")),
        ("r4", None),
        ("r0", Some("g1")),
    ] {
        store
            .put_registration(
                key,
                group,
                doc(&format!("\"{key}\"")),
                Precondition::MustNotExist,
            )
            .await
            .expect("put");
    }
    let page = store
        .list_registrations_by_group("g1", None, 2)
        .await
        .expect("list");
    assert_eq!(
        page.items
            .iter()
            .map(|d| d.doc.as_str())
            .collect::<Vec<_>>(),
        ["\"r0\"", "\"r1\""]
    );
    let rest = store
        .list_registrations_by_group("g1", page.next.as_deref(), 2)
        .await
        .expect("list");
    assert_eq!(
        rest.items
            .iter()
            .map(|d| d.doc.as_str())
            .collect::<Vec<_>>(),
        ["\"r2\""]
    );
    assert!(rest.next.is_none());
    assert!(
        store
            .list_registrations_by_group("nope", None, 10)
            .await
            .expect("list")
            .items
            .is_empty()
    );
    let r1 = store
        .get_registration("r1")
        .await
        .expect("get")
        .expect("exists");
    assert!(matches!(
        store
            .delete_registration("r1", Precondition::EtagIs(Etag::generate()))
            .await,
        Err(StoreError::EtagMismatch(_))
    ));
    store
        .delete_registration("r1", Precondition::EtagIs(r1.etag))
        .await
        .expect("delete");
    assert!(store.get_registration("r1").await.expect("get").is_none());
    assert!(matches!(
        store.delete_registration("r1", Precondition::None).await,
        Err(StoreError::NotFound(_))
    ));
}

/// Linked hubs are upserted by host name and listed in order.
pub async fn linked_hubs(store: Arc<dyn Store>) {
    store
        .put_linked_hub(&sample_hub("b.example", 1))
        .await
        .expect("put");
    store
        .put_linked_hub(&sample_hub("a.example", 2))
        .await
        .expect("put");
    store
        .put_linked_hub(&sample_hub("b.example", 7))
        .await
        .expect("replace");
    let hubs = store.list_linked_hubs().await.expect("list");
    assert_eq!(
        hubs,
        vec![sample_hub("a.example", 2), sample_hub("b.example", 7)]
    );
    store.delete_linked_hub("a.example").await.expect("delete");
    assert!(matches!(
        store.delete_linked_hub("a.example").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.list_linked_hubs().await.expect("list").len(), 1);
}

/// The identity is created once; later candidates are ignored.
pub async fn identity_is_created_once(store: Arc<dyn Store>) {
    assert_eq!(store.identity().await.expect("read"), None);
    let first = ServiceIdentity::generate();
    assert_eq!(store.init_identity(&first).await.expect("init"), first);
    assert_eq!(
        store
            .init_identity(&ServiceIdentity::generate())
            .await
            .expect("init again"),
        first
    );
    assert_eq!(store.identity().await.expect("read"), Some(first));
}

/// Of many concurrent creates of one key exactly one wins, and the winner is what is stored.
pub async fn concurrent_creates_have_one_winner(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let d = doc(&i.to_string());
                let result = store
                    .put_enrollment(
                        EnrollmentKind::Individual,
                        "contested",
                        d.clone(),
                        Precondition::MustNotExist,
                    )
                    .await;
                (result, d)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.expect("join") {
            (Ok(()), d) => winners.push(d),
            (Err(StoreError::AlreadyExists(_)), _) => {}
            (Err(other), _) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(
        store
            .get_enrollment(EnrollmentKind::Individual, "contested")
            .await
            .expect("get"),
        winners.pop()
    );
}

/// A write that fails leaves the writes around it intact.
pub async fn failed_write_spoils_nothing_else(store: Arc<dyn Store>) {
    store
        .put_enrollment(
            EnrollmentKind::Group,
            "exists",
            doc("0"),
            Precondition::MustNotExist,
        )
        .await
        .expect("seed");
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let key = if i % 2 == 0 {
                    "exists".to_owned()
                } else {
                    format!("new-{i}")
                };
                store
                    .put_enrollment(
                        EnrollmentKind::Group,
                        &key,
                        doc("1"),
                        Precondition::MustNotExist,
                    )
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        if task.await.expect("join").is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 8);
    let page = store
        .list_enrollments(EnrollmentKind::Group, None, 100)
        .await
        .expect("list");
    assert_eq!(page.items.len(), 9);
}

fn operation(id: &str, pending: bool, next_attempt_ms: i64) -> StoredOperation {
    StoredOperation {
        operation_id: id.to_owned(),
        registration_key: format!("reg-{id}"),
        pending,
        next_attempt_ms,
        doc: format!("{{\"id\":\"{id}\"}}"),
    }
}

/// A lease is renewed only by the incarnation that holds it and only while the operation is
/// pending; a renewed lease keeps other nodes away past the first expiry.
pub async fn leases_are_renewed_by_their_holder(store: Arc<dyn Store>) {
    let now = 1_000_000;
    store
        .put_operation(&operation("op-1", true, now))
        .await
        .expect("put");
    let node_a = LeaseOwner::new("node-a");
    let node_b = LeaseOwner::new("node-b");
    assert!(
        !store
            .renew_lease(&node_a, "op-1", now + 10_000)
            .await
            .expect("renew"),
        "nobody holds it yet"
    );
    assert_eq!(
        store
            .claim_operations(&node_a, now, 10_000, 10)
            .await
            .expect("claim")
            .len(),
        1
    );
    assert!(
        store
            .renew_lease(&node_a, "op-1", now + 30_000)
            .await
            .expect("renew")
    );
    assert!(
        !store
            .renew_lease(&node_b, "op-1", now + 40_000)
            .await
            .expect("renew"),
        "another node's lease"
    );
    assert!(
        !store
            .renew_lease(&LeaseOwner::new("node-a"), "op-1", now + 40_000)
            .await
            .expect("renew"),
        "another incarnation of the same node"
    );
    assert!(
        store
            .claim_operations(&node_b, now + 20_000, 10_000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "past the first expiry, the renewed lease still holds"
    );
    assert!(
        !store
            .renew_lease(&node_a, "missing", now)
            .await
            .expect("renew")
    );
    store
        .put_operation(&operation("op-1", false, now))
        .await
        .expect("finish");
    assert!(
        !store
            .renew_lease(&node_a, "op-1", now + 50_000)
            .await
            .expect("renew"),
        "a finished operation has no lease"
    );
}

/// An operation recorded with a lease is its holder's: nobody claims it (the holder neither) until
/// the lease runs out or the holder restarts; its holder renews it and finishes it as one it
/// claimed. Recording it reads the device's registration state; a deferred one is seen at once.
pub async fn operations_recorded_leased(store: Arc<dyn Store>) {
    let now = 1_000_000;
    let node_a = LeaseOwner::new("node-a");
    let node_b = LeaseOwner::new("node-b");
    let registration = store
        .put_leased_operation(
            &operation("op-1", true, now),
            &node_a,
            now + 30_000,
            Durability::Deferred,
        )
        .await
        .expect("put leased");
    assert_eq!(registration, None, "the device has not registered");
    store.make_durable("op-1").await.expect("make durable");
    assert_eq!(
        store.get_operation("op-1").await.expect("get"),
        Some(operation("op-1", true, now))
    );
    for owner in [&node_a, &node_b] {
        assert!(
            store
                .claim_operations(owner, now + 1, 30_000, 10)
                .await
                .expect("claim")
                .is_empty(),
            "{} claimed an operation leased at its recording",
            owner.node
        );
    }
    assert!(
        store
            .renew_lease(&node_a, "op-1", now + 40_000)
            .await
            .expect("renew")
    );
    assert!(
        !store
            .renew_lease(&node_b, "op-1", now + 40_000)
            .await
            .expect("renew")
    );
    let resumed = store
        .claim_operations(&LeaseOwner::new("node-a"), now + 2, 30_000, 10)
        .await
        .expect("claim");
    assert_eq!(resumed.len(), 1, "node-a restarted resumes it at once");
    let registered = doc("{\"registrationId\":\"reg-op-2\"}");
    store
        .put_registration("reg-op-2", None, registered.clone(), Precondition::None)
        .await
        .expect("put registration");
    let registration = store
        .put_leased_operation(
            &operation("op-2", true, now),
            &node_a,
            now + 30_000,
            Durability::Now,
        )
        .await
        .expect("put leased");
    assert_eq!(registration, Some(registered), "read with the operation");
    let taken = store
        .claim_operations(&node_b, now + 30_001, 30_000, 10)
        .await
        .expect("claim");
    let ids: Vec<_> = taken.iter().map(|o| o.operation_id.as_str()).collect();
    assert_eq!(ids, ["op-2"], "taken over once its lease ran out");
    assert!(
        store
            .put_leased_operation(
                &operation("op-2", true, now),
                &node_a,
                now + 30_000,
                Durability::Now
            )
            .await
            .is_err(),
        "only a new operation is recorded leased"
    );
}

/// Pending operations are leased to one worker at a time, become claimable again when the lease
/// expires, and are never claimed once finished.
pub async fn operations_are_leased(store: Arc<dyn Store>) {
    let now = 1_000_000;
    store
        .put_operation(&operation("op-1", true, now - 10))
        .await
        .expect("put");
    store
        .put_operation(&operation("op-2", true, now - 5))
        .await
        .expect("put");
    store
        .put_operation(&operation("later", true, now + 60_000))
        .await
        .expect("put");
    store
        .put_operation(&operation("done", false, now - 100))
        .await
        .expect("put");

    let node_a = LeaseOwner::new("node-a");
    let node_b = LeaseOwner::new("node-b");
    let claimed = store
        .claim_operations(&node_a, now, 30_000, 10)
        .await
        .expect("claim");
    let ids: Vec<_> = claimed.iter().map(|o| o.operation_id.as_str()).collect();
    assert_eq!(ids, ["op-1", "op-2"], "due operations, oldest first");
    assert_eq!(claimed[0], operation("op-1", true, now - 10));
    assert!(
        store
            .claim_operations(&node_b, now + 1, 30_000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "leased elsewhere"
    );
    assert!(
        store
            .claim_operations(&node_a, now + 2, 30_000, 10)
            .await
            .expect("claim")
            .is_empty(),
        "a worker never gets its own leases back while it holds them"
    );

    // node-a restarts under the same name: the new incarnation resumes its leases at once.
    let node_a_again = LeaseOwner::new("node-a");
    let resumed = store
        .claim_operations(&node_a_again, now + 3, 30_000, 1)
        .await
        .expect("claim");
    assert_eq!(resumed.len(), 1);

    // node-a dies again; after its lease expires node-b takes over.
    let taken = store
        .claim_operations(&node_b, now + 30_004, 30_000, 10)
        .await
        .expect("claim");
    assert_eq!(taken.len(), 2);

    // Finishing an operation releases it for good.
    store
        .put_operation(&operation("op-1", false, now))
        .await
        .expect("finish");
    store
        .put_operation(&operation("op-2", false, now))
        .await
        .expect("finish");
    assert!(
        store
            .claim_operations(&LeaseOwner::new("node-c"), now + 120_000, 30_000, 10)
            .await
            .expect("claim")
            .iter()
            .all(|o| o.operation_id == "later")
    );
    assert_eq!(
        store
            .get_operation("op-1")
            .await
            .expect("get")
            .map(|o| o.pending),
        Some(false)
    );
    assert_eq!(store.get_operation("missing").await.expect("get"), None);
}

/// A registration state and its finished operation are written together or not at all.
pub async fn registration_and_operation_together(store: Arc<dyn Store>) {
    let first = doc("\"first\"");
    store
        .put_registration_and_operation(
            "dev",
            Some("g"),
            first.clone(),
            Precondition::MustNotExist,
            &operation("op-a", false, 1),
        )
        .await
        .expect("both written");
    assert_eq!(
        store.get_registration("dev").await.expect("get"),
        Some(first.clone())
    );
    assert_eq!(
        store.get_operation("op-a").await.expect("get"),
        Some(operation("op-a", false, 1))
    );

    // A stale precondition writes neither.
    let stale = store
        .put_registration_and_operation(
            "dev",
            Some("g"),
            doc("\"second\""),
            Precondition::EtagIs(Etag::generate()),
            &operation("op-b", false, 2),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::EtagMismatch(_))),
        "{stale:?}"
    );
    assert_eq!(
        store.get_registration("dev").await.expect("get"),
        Some(first)
    );
    assert_eq!(store.get_operation("op-b").await.expect("get"), None);
}

/// Pruning removes finished operations only.
pub async fn pruning_keeps_pending_operations(store: Arc<dyn Store>) {
    store
        .put_operation(&operation("finished", false, 0))
        .await
        .expect("put");
    store
        .put_operation(&operation("pending", true, 0))
        .await
        .expect("put");
    store
        .put_operation(&operation("finished-too", false, 0))
        .await
        .expect("put");
    let far_future =
        dps_core::clock::Clock::now(&dps_core::clock::SystemClock).as_millisecond() + 1_000_000;
    assert_eq!(
        store.prune_operations(far_future, 1).await.expect("prune"),
        1,
        "at most the limit at once"
    );
    assert_eq!(
        store.prune_operations(far_future, 10).await.expect("prune"),
        1
    );
    assert_eq!(
        store.prune_operations(far_future, 10).await.expect("prune"),
        0
    );
    assert!(
        store
            .get_operation("finished")
            .await
            .expect("get")
            .is_none()
    );
    assert!(store.get_operation("pending").await.expect("get").is_some());
}

/// Generates one `#[tokio::test]` per contract case. `$make` is an expression evaluating to
/// `(guard, Arc<dyn Store>)` (or a concrete store type coercible to it).
#[macro_export]
macro_rules! contract_tests {
    ($make:expr) => {
        $crate::contract_tests!(@cases $make;
            enrollment_lifecycle, kinds_are_separate, listing_pages_in_key_order, registrations_by_group,
            linked_hubs, identity_is_created_once, concurrent_creates_have_one_winner, failed_write_spoils_nothing_else,
            operations_are_leased, operations_recorded_leased, leases_are_renewed_by_their_holder, pruning_keeps_pending_operations, registration_and_operation_together);
    };
    (@cases $make:expr; $($case:ident),*) => {
        mod contract {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_guard, store) = $make;
                    $crate::contract::$case(store).await;
                }
            )*
        }
    };
}
