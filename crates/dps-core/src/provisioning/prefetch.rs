//! Registration states read together with the operations this node records (one store call
//! instead of two), kept for the worker's first attempt at each operation.
//!
//! A kept state is used only while it is known to be current: every registration write of this
//! node counts in a slot of its device's key, and a state read before a write of its device is
//! dropped (read again). The worker runs one operation of a device at a time, so the write of an
//! earlier operation of the same device always counts before the later one starts. A write by
//! another node can race as it always could: the registration write's precondition refuses the
//! stale attempt, and the operation decides again from a fresh read.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::store::StoredDoc;

/// Write counters: devices whose keys fall in one slot share it, which costs at most a read.
const SLOTS: usize = 4096;

/// Kept registration states by operation id, and this node's registration writes per slot.
pub(super) struct Prefetched {
    kept: Mutex<HashMap<String, Kept>>,
    writes: Box<[AtomicU32]>,
}

struct Kept {
    key: String,
    /// The device's slot count before the state was read.
    stamp: u32,
    registration: Option<StoredDoc>,
}

impl Prefetched {
    pub(super) fn new() -> Self {
        Self {
            kept: Mutex::default(),
            writes: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn slot(&self, key: &str) -> &AtomicU32 {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        // The remainder is below SLOTS, so it fits.
        #[allow(clippy::cast_possible_truncation)]
        &self.writes[(hasher.finish() % SLOTS as u64) as usize]
    }

    /// Taken before the registration of `key` is read, for [`Prefetched::keep`].
    pub(super) fn stamp(&self, key: &str) -> u32 {
        self.slot(key).load(Ordering::SeqCst)
    }

    /// Keeps `registration`, read for `operation_id` after `stamp` was taken.
    pub(super) fn keep(
        &self,
        operation_id: &str,
        key: &str,
        stamp: u32,
        registration: Option<StoredDoc>,
    ) {
        let kept = Kept {
            key: key.to_owned(),
            stamp,
            registration,
        };
        lock(&self.kept).insert(operation_id.to_owned(), kept);
    }

    /// The state kept for `operation_id`, once, if no registration of its device was written
    /// on this node since it was read.
    pub(super) fn take(&self, operation_id: &str) -> Option<Option<StoredDoc>> {
        let kept = lock(&self.kept).remove(operation_id)?;
        (self.stamp(&kept.key) == kept.stamp).then_some(kept.registration)
    }

    /// Drops what is kept for `operation_id`, if anything.
    pub(super) fn forget(&self, operation_id: &str) {
        lock(&self.kept).remove(operation_id);
    }

    /// A registration of `key` was written (or a write of it was tried) on this node.
    pub(super) fn wrote(&self, key: &str) {
        self.slot(key).fetch_add(1, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Etag;

    fn doc() -> Option<StoredDoc> {
        Some(StoredDoc {
            etag: Etag::generate(),
            doc: "{}".into(),
        })
    }

    #[test]
    fn a_kept_state_is_taken_once() {
        let prefetched = Prefetched::new();
        let stamp = prefetched.stamp("dev-1");
        prefetched.keep("op-1", "dev-1", stamp, doc());
        assert!(prefetched.take("op-1").is_some_and(|r| r.is_some()));
        assert!(prefetched.take("op-1").is_none(), "taken already");
    }

    #[test]
    fn a_write_of_the_device_after_the_read_drops_the_state() {
        let prefetched = Prefetched::new();
        let stamp = prefetched.stamp("dev-1");
        prefetched.wrote("dev-1");
        prefetched.keep("op-1", "dev-1", stamp, None);
        assert!(prefetched.take("op-1").is_none(), "stale: read again");

        let stamp = prefetched.stamp("dev-1");
        prefetched.keep("op-2", "dev-1", stamp, None);
        assert_eq!(
            prefetched.take("op-2"),
            Some(None),
            "current: nothing to read"
        );
    }

    #[test]
    fn forgotten_states_are_gone() {
        let prefetched = Prefetched::new();
        prefetched.keep("op-1", "dev-1", prefetched.stamp("dev-1"), doc());
        prefetched.forget("op-1");
        assert!(prefetched.take("op-1").is_none());
    }
}
