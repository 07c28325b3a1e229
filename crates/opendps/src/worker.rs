//! The registration worker: claims due operations from the store (with a lease, so another node can
//! take over if this one dies), drives each to a terminal state, and prunes old finished ones.
//! Operations of different devices run concurrently; those of one device run in order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dps_core::clock::Clock;
use dps_core::provisioning::Provisioning;
use dps_core::store::{Store, StoredOperation};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// Operations claimed per round.
const BATCH: usize = 256;
/// How long a claim is exclusive; an operation still leased after that is taken over.
const LEASE_MS: i64 = 60_000;
/// How often the store is scanned when nothing wakes the worker (retries that come due).
const IDLE_SCAN: Duration = Duration::from_millis(250);
/// Finished operations are kept this long, so devices can still poll them.
const KEEP_FINISHED_MS: i64 = 24 * 3600 * 1000;

/// Runs until `stop` turns true, then finishes the round in progress.
pub async fn run(
    provisioning: Arc<Provisioning>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    node: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_prune = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let now = clock.now().as_millisecond();
        if now - last_prune > 600_000 {
            last_prune = now;
            match store.prune_operations(now - KEEP_FINISHED_MS).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "removed finished operations older than a day"),
                Err(err) => tracing::warn!(%err, "pruning operations failed"),
            }
        }
        let claimed = match store.claim_operations(&node, now, LEASE_MS, BATCH).await {
            Ok(claimed) => claimed,
            Err(err) => {
                tracing::error!(%err, "claiming operations failed; retrying");
                Vec::new()
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(IDLE_SCAN) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let mut by_device: BTreeMap<String, Vec<StoredOperation>> = BTreeMap::new();
        for op in claimed {
            by_device
                .entry(op.registration_key.clone())
                .or_default()
                .push(op);
        }
        let mut tasks = JoinSet::new();
        for (_, ops) in by_device {
            let provisioning = Arc::clone(&provisioning);
            tasks.spawn(async move {
                for op in ops {
                    let in_progress = metrics::gauge!("opendps_operations_in_progress");
                    in_progress.increment(1.0);
                    if let Err(err) = provisioning.process(&op).await {
                        tracing::error!(operation = %op.operation_id, %err, "processing failed; the operation will be retried when its lease expires");
                    }
                    in_progress.decrement(1.0);
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(err) = joined {
                tracing::error!(%err, "a registration task panicked");
            }
        }
    }
}
