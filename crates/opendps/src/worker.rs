//! The registration worker: claims due operations from the store (with a lease, so another node can
//! take over if this one dies), drives each to a terminal state, and prunes old finished ones.
//!
//! Claiming is continuous: whenever a registration is recorded (or every scan interval, for retries
//! that come due) the worker claims what fits under its limit, while earlier operations are still in
//! progress, so a new operation never waits for a slow one. Operations of different devices run
//! concurrently; those of one device run in order, one at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use dps_core::clock::Clock;
use dps_core::provisioning::Provisioning;
use dps_core::store::{LeaseOwner, Store, StoredOperation};
use tokio::sync::{Notify, watch};
use tokio::task::{Id, JoinSet};

/// Operations held at once (running, or queued behind another of the same device).
const MAX_HELD: usize = 512;
/// How long a claim is exclusive; an operation still leased after that is taken over.
const LEASE_MS: i64 = 60_000;
/// How often the store is scanned when nothing wakes the worker (retries that come due).
const SCAN: Duration = Duration::from_millis(250);
/// Finished operations deleted in one store write; more wait for the next write.
const PRUNE_BATCH: usize = 5000;
/// How often finished operations are looked for, at most.
const PRUNE_EVERY_MS: i64 = 60_000;

/// Runs until `stop` turns true, then finishes the operations in progress. Operations claimed but
/// not started keep their lease; this node takes them again when it restarts. Finished operations
/// are deleted once `retention_ms` has passed since they finished (a device polling one later gets
/// the answer for an operation that does not exist); the registration states stay.
pub async fn run(
    provisioning: Arc<Provisioning>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    node: String,
    retention_ms: i64,
    mut stop: watch::Receiver<bool>,
) {
    let prune_every = (retention_ms / 2).clamp(250, PRUNE_EVERY_MS);
    let owner = LeaseOwner::new(node);
    let mut work = Work::new(provisioning);
    let mut scan = tokio::time::interval(SCAN);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut claim = true;
    let mut last_prune = 0;
    while !*stop.borrow() {
        let now = clock.now().as_millisecond();
        if now - last_prune >= prune_every {
            last_prune = now;
            match store
                .prune_operations(now - retention_ms, PRUNE_BATCH)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(
                        pruned = n,
                        "removed finished operations past their retention"
                    );
                    if n == PRUNE_BATCH {
                        // More are due: prune again on the next turn.
                        last_prune = i64::MIN / 2;
                    }
                }
                Err(err) => tracing::warn!(%err, "pruning operations failed"),
            }
        }
        let room = MAX_HELD.saturating_sub(work.held());
        if claim && room > 0 {
            match store.claim_operations(&owner, now, LEASE_MS, room).await {
                Ok(claimed) => {
                    // A full claim may have left due operations behind: claim again at once.
                    claim = claimed.len() == room;
                    for op in claimed {
                        work.add(op);
                    }
                }
                Err(err) => {
                    tracing::error!(%err, "claiming operations failed; retrying");
                    claim = false;
                }
            }
        }
        tokio::select! {
            Some(done) = work.tasks.join_next_with_id(), if !work.tasks.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(err) => {
                        tracing::error!(%err, "a registration task panicked; its lease will expire and it will be retried");
                        err.id()
                    }
                };
                work.finished(id);
            }
            () = wake.notified() => claim = true,
            _ = scan.tick() => claim = true,
            _ = stop.changed() => {}
        }
    }
    while let Some(done) = work.tasks.join_next().await {
        if let Err(err) = done {
            tracing::error!(%err, "a registration task panicked");
        }
    }
}

/// The operations this worker holds.
struct Work {
    provisioning: Arc<Provisioning>,
    tasks: JoinSet<()>,
    /// The device each running task works for.
    running: HashMap<Id, String>,
    /// Every device with a running task, and its operations waiting their turn.
    devices: HashMap<String, VecDeque<StoredOperation>>,
    queued_count: usize,
}

impl Work {
    fn new(provisioning: Arc<Provisioning>) -> Self {
        Self {
            provisioning,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            devices: HashMap::new(),
            queued_count: 0,
        }
    }

    fn held(&self) -> usize {
        self.running.len() + self.queued_count
    }

    /// Starts `op`, or queues it behind its device's running operation.
    fn add(&mut self, op: StoredOperation) {
        match self.devices.get_mut(&op.registration_key) {
            Some(queue) => {
                queue.push_back(op);
                self.queued_count += 1;
            }
            None => {
                self.devices
                    .insert(op.registration_key.clone(), VecDeque::new());
                self.start(op);
            }
        }
    }

    /// A task ended: start its device's next operation, if one waits.
    fn finished(&mut self, id: Id) {
        let Some(key) = self.running.remove(&id) else {
            return;
        };
        match self.devices.get_mut(&key).and_then(VecDeque::pop_front) {
            Some(op) => {
                self.queued_count -= 1;
                self.start(op);
            }
            None => {
                self.devices.remove(&key);
            }
        }
    }

    fn start(&mut self, op: StoredOperation) {
        let key = op.registration_key.clone();
        let provisioning = Arc::clone(&self.provisioning);
        let handle = self.tasks.spawn(async move {
            let in_progress = metrics::gauge!("opendps_operations_in_progress");
            in_progress.increment(1.0);
            if let Err(err) = provisioning.process(&op).await {
                tracing::error!(operation = %op.operation_id, %err, "processing failed; the operation will be retried when its lease expires");
            }
            in_progress.decrement(1.0);
        });
        self.running.insert(handle.id(), key);
    }
}
