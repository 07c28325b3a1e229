//! The operations a PostgreSQL node knows without asking (see [`OwnOperations`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use dps_core::store::StoredOperation;

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
}
