//! What a store keeps in memory of the documents every registration reads and that seldom change:
//! enrollments, the list of each kind's enrollments (which tells that a device has no individual
//! enrollment, as most have not, without asking: see [`MAX_LISTED`]) and the linked hubs.
//!
//! It is used only while the store hears every change ([`ReadCache::set_listening`]). A SQLite
//! store hears them all from the start: the serving process is its file's only writer (it holds
//! the data directory's lock) and clears the cache after each change it commits. A PostgreSQL
//! node hears the changes other nodes announce (`NOTIFY`, sent by the statement or transaction
//! that makes the change and delivered when it commits) while its listening connection is up, and
//! clears the cache at each; between another node's commit and the announcement's arrival, a few
//! milliseconds on a healthy network, it may still answer from the previous version.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use dps_core::ids::Etag;
use dps_core::linked_hub::LinkedHub;
use dps_core::store::{StoreError, StoredDoc};

/// Enrollments kept at most (a kilobyte or two each, so a few megabytes in all); past that the
/// cache starts afresh. Absent individual enrollments are told by the list, not kept one by one.
const MAX_ENTRIES: usize = 10_000;

/// Enrollments of one kind listed at most to answer lookups of enrollments that do not exist; with
/// more, each such lookup asks the database.
pub(crate) const MAX_LISTED: usize = 10_000;

/// The cache. A read that misses notes the generation before it asks the database and keeps its
/// answer only if nothing was cleared meanwhile, so an answer older than a change is never kept.
pub(crate) struct ReadCache {
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
    /// By kind, then key (looked up without building a key).
    enrollments: HashMap<&'static str, HashMap<String, Option<StoredDoc>>>,
    versions: HashMap<&'static str, Vec<(String, Etag)>>,
    /// Kinds with more enrollments than are listed.
    too_many: HashSet<&'static str>,
    linked_hubs: Option<Vec<LinkedHub>>,
}

/// A read that missed: the generation it began in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Miss(u64);

impl ReadCache {
    /// A cache that lists at most `max_listed` enrollments of a kind.
    pub(crate) fn listing_at_most(max_listed: usize) -> Self {
        Self {
            listening: AtomicBool::new(false),
            entries: Mutex::default(),
            max_listed,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether changes are heard; when not, nothing is kept or answered.
    pub(crate) fn set_listening(&self, on: bool) {
        self.clear();
        self.listening.store(on, Ordering::SeqCst);
    }

    /// Forgets everything: something changed.
    pub(crate) fn clear(&self) {
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
        if entries
            .enrollments
            .values()
            .map(HashMap::len)
            .sum::<usize>()
            >= MAX_ENTRIES
        {
            entries.enrollments.clear();
        }
        put(&mut entries);
    }

    fn enrollment(&self, kind: &'static str, key: &str) -> Result<Option<StoredDoc>, Option<Miss>> {
        self.lookup(|e| e.enrollments.get(kind)?.get(key).cloned())
    }

    fn keep_enrollment(
        &self,
        miss: Option<Miss>,
        kind: &'static str,
        key: &str,
        doc: &Option<StoredDoc>,
    ) {
        self.keep(miss, |e| {
            e.enrollments
                .entry(kind)
                .or_default()
                .insert(key.to_owned(), doc.clone());
        });
    }

    fn versions(&self, kind: &'static str) -> Result<Vec<(String, Etag)>, Option<Miss>> {
        self.lookup(|e| e.versions.get(kind).cloned())
    }

    fn keep_versions(&self, miss: Option<Miss>, kind: &'static str, versions: &[(String, Etag)]) {
        self.keep(miss, |e| {
            e.versions.insert(kind, versions.to_vec());
        });
    }

    /// Whether an enrollment of `kind` may exist under `key`, as far as the kept list of that
    /// kind tells (true when the kind has too many to list); else the miss. Searched in place: the
    /// list is not copied.
    fn may_exist(&self, kind: &'static str, key: &str) -> Result<bool, Option<Miss>> {
        self.lookup(|e| match e.too_many.contains(kind) {
            true => Some(true),
            false => e.versions.get(kind).map(|versions| lists(versions, key)),
        })
    }

    /// Whether the kind's enrollments are too many to list (`Ok(true)`), or a list of them is kept
    /// (`Ok(false)`: see [`ReadCache::versions`]); else the miss.
    #[cfg(test)]
    pub(crate) fn listed(&self, kind: &'static str) -> Result<bool, Option<Miss>> {
        self.lookup(|e| match e.too_many.contains(kind) {
            true => Some(true),
            false => e.versions.contains_key(kind).then_some(false),
        })
    }

    fn keep_too_many(&self, miss: Option<Miss>, kind: &'static str) {
        self.keep(miss, |e| {
            e.too_many.insert(kind);
        });
    }

    fn linked_hubs(&self) -> Result<Vec<LinkedHub>, Option<Miss>> {
        self.lookup(|e| e.linked_hubs.clone())
    }

    fn keep_linked_hubs(&self, miss: Option<Miss>, hubs: &[LinkedHub]) {
        self.keep(miss, |e| e.linked_hubs = Some(hubs.to_vec()));
    }

    /// An enrollment: as kept; or absent, when the kept list of its kind says so; or as `fetch`
    /// reads it (then kept). `list` lists the kind's keys and etags, at most as many as it is given
    /// and one more (to tell that there are more).
    pub(crate) async fn enrollment_or<L, LF, F, FF>(
        &self,
        kind: &'static str,
        key: &str,
        list: L,
        fetch: F,
    ) -> Result<Option<StoredDoc>, StoreError>
    where
        L: FnOnce(Option<usize>) -> LF,
        LF: Future<Output = Result<Vec<(String, Etag)>, StoreError>>,
        F: FnOnce() -> FF,
        FF: Future<Output = Result<Option<StoredDoc>, StoreError>>,
    {
        let miss = match self.enrollment(kind, key) {
            Ok(kept) => return Ok(kept),
            Err(miss) => miss,
        };
        // Most devices have no individual enrollment: the list tells so without asking.
        if miss.is_some() && !self.may_exist_or(kind, key, list).await? {
            return Ok(None);
        }
        let found = fetch().await?;
        self.keep_enrollment(miss, kind, key, &found);
        Ok(found)
    }

    /// Whether an enrollment of `kind` may exist under `key`, told by the kept list of that kind
    /// (listed now by `list` when it is not kept and has at most as many entries as this cache
    /// lists, [`MAX_LISTED`] but in tests). True when the list cannot tell: more enrollments than
    /// that, or nothing may be kept.
    async fn may_exist_or<L, LF>(
        &self,
        kind: &'static str,
        key: &str,
        list: L,
    ) -> Result<bool, StoreError>
    where
        L: FnOnce(Option<usize>) -> LF,
        LF: Future<Output = Result<Vec<(String, Etag)>, StoreError>>,
    {
        let miss = match self.may_exist(kind, key) {
            Ok(may) => return Ok(may),
            Err(None) => return Ok(true),
            Err(miss) => miss,
        };
        let most = self.max_listed;
        let versions = list(Some(most)).await?;
        if versions.len() > most {
            self.keep_too_many(miss, kind);
            return Ok(true);
        }
        let may = lists(&versions, key);
        self.keep_versions(miss, kind, &versions);
        Ok(may)
    }

    /// The key and etag of every enrollment of `kind`: as kept, or as `list` reads them (given no
    /// limit; then kept).
    pub(crate) async fn versions_or<L, LF>(
        &self,
        kind: &'static str,
        list: L,
    ) -> Result<Vec<(String, Etag)>, StoreError>
    where
        L: FnOnce(Option<usize>) -> LF,
        LF: Future<Output = Result<Vec<(String, Etag)>, StoreError>>,
    {
        let miss = match self.versions(kind) {
            Ok(kept) => return Ok(kept),
            Err(miss) => miss,
        };
        let versions = list(None).await?;
        self.keep_versions(miss, kind, &versions);
        Ok(versions)
    }

    /// The linked hubs: as kept, or as `fetch` reads them (then kept).
    pub(crate) async fn linked_hubs_or<F, FF>(&self, fetch: F) -> Result<Vec<LinkedHub>, StoreError>
    where
        F: FnOnce() -> FF,
        FF: Future<Output = Result<Vec<LinkedHub>, StoreError>>,
    {
        let miss = match self.linked_hubs() {
            Ok(kept) => return Ok(kept),
            Err(miss) => miss,
        };
        let hubs = fetch().await?;
        self.keep_linked_hubs(miss, &hubs);
        Ok(hubs)
    }
}

/// Whether `versions` (in key order, bytewise as the `C` collation sorts) hold `key`.
fn lists(versions: &[(String, Etag)], key: &str) -> bool {
    versions
        .binary_search_by(|(k, _)| k.as_str().cmp(key))
        .is_ok()
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

    /// What the database is asked, lookup by lookup: a listed kind answers absences from its list
    /// and reads only what exists; a kind too long to list reads every lookup.
    #[tokio::test]
    async fn enrollments_are_read_only_when_the_list_cannot_tell() {
        use std::sync::atomic::AtomicUsize;
        let lists = AtomicUsize::new(0);
        let reads = AtomicUsize::new(0);
        let cache = ReadCache::listing_at_most(1);
        cache.set_listening(true);
        let lookup = async |key: &str, existing: &[&str]| {
            let list = async |limit: Option<usize>| {
                lists.fetch_add(1, Ordering::SeqCst);
                let all = existing.iter().map(|k| ((*k).to_owned(), Etag::new("e")));
                Ok(all.take(limit.map_or(usize::MAX, |l| l + 1)).collect())
            };
            let fetch = async || {
                reads.fetch_add(1, Ordering::SeqCst);
                Ok(existing.contains(&key).then(|| doc("{}")).flatten())
            };
            cache.enrollment_or("individual", key, list, fetch).await
        };
        let counts = || (lists.load(Ordering::SeqCst), reads.load(Ordering::SeqCst));

        assert_eq!(lookup("missing", &["a"]).await.expect("lookup"), None);
        assert_eq!(counts(), (1, 0), "absent by the list");
        assert_eq!(lookup("other", &["a"]).await.expect("lookup"), None);
        assert_eq!(lookup("a", &["a"]).await.expect("lookup"), doc("{}"));
        assert_eq!(lookup("a", &["a"]).await.expect("lookup"), doc("{}"));
        assert_eq!(counts(), (1, 1), "listed once, the enrollment read once");

        cache.clear();
        assert_eq!(lookup("missing", &["a", "b"]).await.expect("lookup"), None);
        assert_eq!(lookup("missing", &["a", "b"]).await.expect("lookup"), None);
        assert_eq!(
            counts(),
            (2, 2),
            "too many to list: the absence is read, then kept"
        );
    }
}
