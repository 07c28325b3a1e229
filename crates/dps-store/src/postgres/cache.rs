//! What a node keeps in memory of the documents every registration reads and that seldom change:
//! enrollments, the list of each kind's enrollments (which tells that a device has no individual
//! enrollment, as most have not, without asking: see [`MAX_LISTED`]) and the linked hubs. It is
//! used only while the node listens for the changes other nodes announce: each change is announced
//! (`NOTIFY`) by the statement or transaction that makes it, and clears every node's copy when it
//! commits; a change made through this node clears it at once. Between another node's commit and
//! the announcement's arrival, a few milliseconds on a healthy network, this node may still answer
//! from the previous version. While the announcements cannot be heard (the listening connection is
//! lost) nothing is kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use dps_core::ids::Etag;
use dps_core::linked_hub::LinkedHub;
use dps_core::store::{StoredDoc, StoredOperation};

/// Entries kept at most; past that the cache starts afresh (individual-enrollment misses are one
/// per device).
const MAX_ENTRIES: usize = 100_000;

/// Enrollments of one kind listed at most to answer lookups of enrollments that do not exist; with
/// more, each such lookup asks the database.
pub(super) const MAX_LISTED: usize = 10_000;

/// The cache. A read that misses notes the generation before it asks the database and keeps its
/// answer only if nothing was cleared meanwhile, so an answer older than a change is never kept.
pub(super) struct ReadCache {
    listening: AtomicBool,
    entries: Mutex<Entries>,
    /// Enrollments of one kind listed at most: [`MAX_LISTED`], but for tests.
    max_listed: usize,
}

impl Default for ReadCache {
    fn default() -> Self {
        Self::listing_at_most(MAX_LISTED)
    }
}

#[derive(Default)]
struct Entries {
    generation: u64,
    enrollments: HashMap<(&'static str, String), Option<StoredDoc>>,
    versions: HashMap<&'static str, Vec<(String, Etag)>>,
    /// Kinds with more enrollments than are listed.
    too_many: HashSet<&'static str>,
    linked_hubs: Option<Vec<LinkedHub>>,
}

/// A read that missed: the generation it began in.
#[derive(Debug, Clone, Copy)]
pub(super) struct Miss(u64);

impl ReadCache {
    /// A cache that lists at most `max_listed` enrollments of a kind.
    pub(super) fn listing_at_most(max_listed: usize) -> Self {
        Self {
            listening: AtomicBool::new(false),
            entries: Mutex::default(),
            max_listed,
        }
    }

    /// Enrollments of one kind listed at most.
    pub(super) fn max_listed(&self) -> usize {
        self.max_listed
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether changes are heard; when not, nothing is kept or answered.
    pub(super) fn set_listening(&self, on: bool) {
        self.clear();
        self.listening.store(on, Ordering::SeqCst);
    }

    /// Forgets everything: something changed.
    pub(super) fn clear(&self) {
        let mut entries = self.entries();
        let generation = entries.generation.wrapping_add(1);
        *entries = Entries {
            generation,
            ..Entries::default()
        };
    }

    /// A kept answer (`Ok`), or the miss to keep the database's answer with (`Err(Some)`); `Err(None)`
    /// when nothing may be kept.
    fn lookup<T>(&self, find: impl FnOnce(&Entries) -> Option<T>) -> Result<T, Option<Miss>> {
        if !self.listening.load(Ordering::SeqCst) {
            return Err(None);
        }
        let entries = self.entries();
        find(&entries).ok_or(Some(Miss(entries.generation)))
    }

    fn keep(&self, miss: Option<Miss>, put: impl FnOnce(&mut Entries)) {
        let Some(Miss(generation)) = miss else { return };
        let mut entries = self.entries();
        if entries.generation != generation || !self.listening.load(Ordering::SeqCst) {
            return;
        }
        if entries.enrollments.len() >= MAX_ENTRIES {
            entries.enrollments.clear();
        }
        put(&mut entries);
    }

    pub(super) fn enrollment(
        &self,
        kind: &'static str,
        key: &str,
    ) -> Result<Option<StoredDoc>, Option<Miss>> {
        self.lookup(|e| e.enrollments.get(&(kind, key.to_owned())).cloned())
    }

    pub(super) fn keep_enrollment(
        &self,
        miss: Option<Miss>,
        kind: &'static str,
        key: &str,
        doc: &Option<StoredDoc>,
    ) {
        self.keep(miss, |e| {
            e.enrollments.insert((kind, key.to_owned()), doc.clone());
        });
    }

    pub(super) fn versions(&self, kind: &'static str) -> Result<Vec<(String, Etag)>, Option<Miss>> {
        self.lookup(|e| e.versions.get(kind).cloned())
    }

    pub(super) fn keep_versions(
        &self,
        miss: Option<Miss>,
        kind: &'static str,
        versions: &[(String, Etag)],
    ) {
        self.keep(miss, |e| {
            e.versions.insert(kind, versions.to_vec());
        });
    }

    /// Whether an enrollment of `kind` may exist under `key`, as far as the kept list of that
    /// kind tells (true when the kind has too many to list); else the miss. Searched in place: the
    /// list is not copied.
    pub(super) fn may_exist(&self, kind: &'static str, key: &str) -> Result<bool, Option<Miss>> {
        self.lookup(|e| match e.too_many.contains(kind) {
            true => Some(true),
            false => e.versions.get(kind).map(|versions| lists(versions, key)),
        })
    }

    /// Whether the kind's enrollments are too many to list (`Ok(true)`), or a list of them is kept
    /// (`Ok(false)`: see [`ReadCache::versions`]); else the miss.
    #[cfg(test)]
    pub(super) fn listed(&self, kind: &'static str) -> Result<bool, Option<Miss>> {
        self.lookup(|e| match e.too_many.contains(kind) {
            true => Some(true),
            false => e.versions.contains_key(kind).then_some(false),
        })
    }

    pub(super) fn keep_too_many(&self, miss: Option<Miss>, kind: &'static str) {
        self.keep(miss, |e| {
            e.too_many.insert(kind);
        });
    }

    pub(super) fn linked_hubs(&self) -> Result<Vec<LinkedHub>, Option<Miss>> {
        self.lookup(|e| e.linked_hubs.clone())
    }

    pub(super) fn keep_linked_hubs(&self, miss: Option<Miss>, hubs: &[LinkedHub]) {
        self.keep(miss, |e| e.linked_hubs = Some(hubs.to_vec()));
    }
}

/// Whether `versions` (in key order, bytewise as the `C` collation sorts) hold `key`.
pub(super) fn lists(versions: &[(String, Etag)], key: &str) -> bool {
    versions
        .binary_search_by(|(k, _)| k.as_str().cmp(key))
        .is_ok()
}

/// Operations kept at most by [`OwnOperations`].
const MAX_OWN: usize = 10_000;

/// An operation as this node wrote it, when, and until when its copy is the truth.
type Own = (StoredOperation, i64, i64);
/// The operations by id, and their ids oldest first.
type Kept = (HashMap<String, Own>, VecDeque<String>);

/// The operations whose state this node knows without asking, so that the polls of the devices
/// whose registrations it works on are answered from memory: those it finished (a finished
/// operation never changes; it is only deleted once its retention has passed, and so is its copy
/// here when this node prunes, see [`OwnOperations::prune`], at most one prune interval later than
/// in the database), and those it recorded leased to itself, until that lease runs out (while it
/// holds the lease no other node may change the operation). Most recent last.
#[derive(Default)]
pub(super) struct OwnOperations {
    kept: Mutex<Kept>,
}

impl OwnOperations {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, op: &StoredOperation, now_ms: i64, until_ms: i64) {
        let mut kept = self.kept();
        let (ops, order) = &mut *kept;
        if ops
            .insert(op.operation_id.clone(), (op.clone(), now_ms, until_ms))
            .is_none()
        {
            order.push_back(op.operation_id.clone());
        }
        while order.len() > MAX_OWN {
            if let Some(oldest) = order.pop_front() {
                ops.remove(&oldest);
            }
        }
    }

    /// Notes that `op` was written at `now_ms`, with no lease: kept when finished, forgotten when
    /// not (any node may claim it).
    pub(super) fn written(&self, op: &StoredOperation, now_ms: i64) {
        match op.pending {
            true => {
                self.kept().0.remove(&op.operation_id);
            }
            false => self.keep(op, now_ms, i64::MAX),
        }
    }

    /// Notes that `op` was recorded at `now_ms` leased to this node until `until_ms`.
    pub(super) fn leased(&self, op: &StoredOperation, now_ms: i64, until_ms: i64) {
        self.keep(op, now_ms, until_ms);
    }

    /// The operation, if its copy here is the truth at `now_ms`.
    pub(super) fn get(&self, operation_id: &str, now_ms: i64) -> Option<StoredOperation> {
        self.kept()
            .0
            .get(operation_id)
            .filter(|(_, _, until)| now_ms < *until)
            .map(|(op, _, _)| op.clone())
    }

    /// Forgets the finished operations written before `before_ms` (they are being pruned) and the
    /// leased ones whose lease has run out by then.
    pub(super) fn prune(&self, before_ms: i64) {
        let mut kept = self.kept();
        let (ops, order) = &mut *kept;
        ops.retain(|_, (op, written, until)| match op.pending {
            true => *until > before_ms,
            false => *written >= before_ms,
        });
        order.retain(|id| ops.contains_key(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Option<StoredDoc> {
        Some(StoredDoc {
            etag: Etag::new("e"),
            doc: text.into(),
        })
    }

    #[test]
    fn nothing_is_kept_unless_changes_are_heard() {
        let cache = ReadCache::default();
        let miss = cache.enrollment("group", "g").expect_err("empty");
        assert!(miss.is_none(), "not listening: nothing may be kept");
        cache.keep_enrollment(miss, "group", "g", &doc("{}"));
        cache.set_listening(true);
        let miss = cache.enrollment("group", "g").expect_err("still empty");
        cache.keep_enrollment(miss, "group", "g", &doc("{}"));
        assert_eq!(cache.enrollment("group", "g").ok(), Some(doc("{}")));
        cache.set_listening(false);
        assert!(
            cache.enrollment("group", "g").is_err(),
            "forgotten when deaf"
        );
    }

    #[test]
    fn a_kind_is_listed_or_too_many() {
        let cache = ReadCache::default();
        cache.set_listening(true);
        let miss = cache.listed("individual").expect_err("empty");
        cache.keep_versions(miss, "individual", &[("a".into(), Etag::new("e"))]);
        assert_eq!(cache.listed("individual").ok(), Some(false));
        let miss = cache.listed("group").expect_err("empty");
        cache.keep_too_many(miss, "group");
        assert_eq!(cache.listed("group").ok(), Some(true));
        cache.clear();
        assert!(cache.listed("group").is_err(), "forgotten at a change");
    }

    fn finished(id: &str, pending: bool) -> StoredOperation {
        StoredOperation {
            operation_id: id.into(),
            registration_key: "dev".into(),
            pending,
            next_attempt_ms: 0,
            doc: "{}".into(),
        }
    }

    #[test]
    fn own_operations_are_kept_while_they_are_the_truth() {
        let kept = OwnOperations::default();
        kept.written(&finished("pending", true), 10);
        assert_eq!(
            kept.get("pending", 10),
            None,
            "work any node may claim is not kept"
        );
        kept.leased(&finished("leased", true), 10, 100);
        assert_eq!(kept.get("leased", 99), Some(finished("leased", true)));
        assert_eq!(
            kept.get("leased", 100),
            None,
            "not once the lease has run out"
        );
        kept.written(&finished("leased", true), 20);
        assert_eq!(kept.get("leased", 20), None, "rescheduled: forgotten");
        kept.written(&finished("old", false), 10);
        kept.written(&finished("new", false), 20);
        assert_eq!(kept.get("old", 1_000), Some(finished("old", false)));
        kept.prune(15);
        assert_eq!(kept.get("old", 1_000), None);
        assert_eq!(kept.get("new", 1_000), Some(finished("new", false)));
        for i in 0..MAX_OWN + 1 {
            kept.written(&finished(&format!("op-{i}"), false), 40);
        }
        assert_eq!(kept.get("op-0", 40), None, "the oldest goes first");
        assert!(kept.get(&format!("op-{MAX_OWN}"), 40).is_some());
    }

    #[test]
    fn an_answer_older_than_a_change_is_not_kept() {
        let cache = ReadCache::default();
        cache.set_listening(true);
        let miss = cache.enrollment("individual", "dev").expect_err("empty");
        // A change is heard while the database is being asked: its answer may predate the change.
        cache.clear();
        cache.keep_enrollment(miss, "individual", "dev", &None);
        assert!(cache.enrollment("individual", "dev").is_err());
        let miss = cache.enrollment("individual", "dev").expect_err("empty");
        cache.keep_enrollment(miss, "individual", "dev", &None);
        assert_eq!(
            cache.enrollment("individual", "dev").ok(),
            Some(None),
            "an absence is kept"
        );
    }
}
