//! The registration worker: claims due operations from the store (with a lease, so another node can
//! take over if this one dies), drives each to a terminal state, and prunes old finished ones.
//!
//! Claiming is continuous: whenever a registration is recorded (or every scan interval, for retries
//! that come due) the worker claims what fits under its limit, while earlier operations are still in
//! progress, so a new operation never waits for a slow one. Operations of different devices run
//! concurrently; those of one device run in order, one at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dps_core::clock::Clock;
use dps_core::provisioning::{Intake, Provisioning};
use dps_core::store::{LeaseOwner, Store, StoredOperation};
use tokio::sync::{Notify, watch};
use tokio::task::{Id, JoinSet};

/// Operations held at once (running, or queued behind another of the same device).
const MAX_HELD: usize = 512;
/// How often the store is scanned when nothing wakes the worker (retries that come due).
const SCAN: Duration = Duration::from_millis(250);
/// Finished operations deleted in one store write; more wait for the next write.
const PRUNE_BATCH: usize = 5000;
/// How often finished operations are looked for, at most.
const PRUNE_EVERY_MS: i64 = 60_000;

/// How one attempt at an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The operation was worked on: finished, rescheduled in the store, or failed in a way the
    /// next claim after its lease expires retries.
    Done,
    /// The store was out of reach, so the attempt changed nothing and the work is still due: the
    /// worker tries again while it holds the lease.
    Interrupted,
}

/// What the worker does with each operation it claimed: [`Provisioning::process`] in the service.
#[async_trait]
pub trait Process: Send + Sync + 'static {
    /// Works on `op` once.
    async fn process(&self, op: &StoredOperation) -> Attempt;
}

#[async_trait]
impl Process for Provisioning {
    async fn process(&self, op: &StoredOperation) -> Attempt {
        match Provisioning::process(self, op).await {
            Ok(_) => Attempt::Done,
            Err(err) if err.retry_after_secs().is_some() => {
                tracing::warn!(operation = %op.operation_id, %err, "the database is out of reach; the operation will be tried again");
                Attempt::Interrupted
            }
            Err(err) => {
                tracing::error!(operation = %op.operation_id, %err, "processing failed; the operation will be retried when its lease expires");
                Attempt::Done
            }
        }
    }
}

/// How the worker holds its operations: whose leases, for how long, renewed how often.
#[derive(Clone)]
struct Leases {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    owner: LeaseOwner,
    lease_ms: i64,
}

impl Leases {
    /// Renews the lease on `id` every third of its length while the future this races with runs
    /// (a call to a slow hub or webhook does not let the lease lapse); stops renewing once the
    /// lease is no longer this worker's. Never returns.
    async fn keep(&self, id: &str) -> std::convert::Infallible {
        let period = Duration::from_millis(u64::try_from(self.lease_ms / 3).unwrap_or(1).max(1));
        loop {
            tokio::time::sleep(period).await;
            match self.renew(id).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(err) => tracing::warn!(operation = id, %err, "could not renew a lease"),
            }
        }
        std::future::pending().await
    }

    async fn renew(&self, id: &str) -> Result<bool, dps_core::store::StoreError> {
        let until = self.clock.now().as_millisecond() + self.lease_ms;
        self.store.renew_lease(&self.owner, id, until).await
    }

    /// Works on `op` until an attempt is done, renewing its lease meanwhile. An interrupted
    /// attempt (the store out of reach) is tried again after a pause, once the lease is renewed;
    /// when the lease cannot be renewed before it runs out, or has gone to another node, the
    /// operation is left to whoever claims it next.
    async fn work_on(&self, process: &dyn Process, op: &StoredOperation) {
        let id = op.operation_id.as_str();
        let mut held_until = self.clock.now().as_millisecond() + self.lease_ms;
        let mut pause = Duration::from_millis(500);
        loop {
            let attempt = tokio::select! {
                attempt = process.process(op) => attempt,
                never = self.keep(id) => match never {},
            };
            if attempt == Attempt::Done {
                return;
            }
            loop {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                match self.renew(id).await {
                    Ok(true) => {
                        held_until = self.clock.now().as_millisecond() + self.lease_ms;
                        break;
                    }
                    Ok(false) => return,
                    Err(_) if self.clock.now().as_millisecond() < held_until => {}
                    Err(err) => {
                        tracing::warn!(operation = id, %err, "the database stayed out of reach for a whole lease; the operation is left to the next claim");
                        return;
                    }
                }
            }
        }
    }
}

/// What this node's registrations hand to its worker (see [`dps_core::provisioning::Intake`]): the
/// operations they recorded under the worker's lease, which it starts on without a claim.
pub struct Handoff {
    owner: LeaseOwner,
    clock: Arc<dyn Clock>,
    lease_ms: i64,
    /// Whether the worker runs: a stopping worker takes nothing.
    open: AtomicBool,
    taken: Mutex<Vec<StoredOperation>>,
    ready: Notify,
}

impl Handoff {
    /// For the worker of `node` (in a fresh incarnation), leasing for `lease_ms`: how long a claim
    /// is exclusive, so that an operation still leased after that (its node died) is taken over by
    /// any node. The worker's claims and renewals use the same length.
    pub fn new(node: String, clock: Arc<dyn Clock>, lease_ms: i64) -> Arc<Self> {
        Arc::new(Self {
            owner: LeaseOwner::new(node),
            clock,
            lease_ms,
            open: AtomicBool::new(true),
            taken: Mutex::default(),
            ready: Notify::new(),
        })
    }

    fn drain(&self) -> Vec<StoredOperation> {
        std::mem::take(&mut *self.taken.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Intake for Handoff {
    fn lease(&self) -> Option<(LeaseOwner, i64)> {
        self.open.load(Ordering::SeqCst).then(|| {
            let until = self.clock.now().as_millisecond() + self.lease_ms;
            (self.owner.clone(), until)
        })
    }

    fn take(&self, op: StoredOperation) {
        self.taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op);
        self.ready.notify_one();
    }
}

/// Runs until `stop` turns true, then finishes the operations in progress. Operations claimed but
/// not started keep their lease; this node takes them again when it restarts. Finished operations
/// are deleted once `retention_ms` has passed since they finished (a device polling one later gets
/// the answer for an operation that does not exist); the registration states stay.
pub async fn run(
    provisioning: Arc<dyn Process>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    wake: Arc<Notify>,
    handoff: Arc<Handoff>,
    retention_ms: i64,
    mut stop: watch::Receiver<bool>,
) {
    let lease_ms = handoff.lease_ms;
    let prune_every = (retention_ms / 2).clamp(250, PRUNE_EVERY_MS);
    let owner = handoff.owner.clone();
    let mut work = Work::new(
        provisioning,
        Leases {
            store: Arc::clone(&store),
            clock: Arc::clone(&clock),
            owner: owner.clone(),
            lease_ms,
        },
    );
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
        let room = MAX_HELD.saturating_sub(work.schedule.held());
        if claim && room > 0 {
            match store.claim_operations(&owner, now, lease_ms, room).await {
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
        for op in handoff.drain() {
            work.add(op);
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
            () = handoff.ready.notified() => {}
            _ = scan.tick() => claim = true,
            _ = stop.changed() => {}
        }
    }
    // Operations handed over from now on are left leased: this node resumes them when it restarts
    // (or another once the leases run out).
    handoff.open.store(false, Ordering::SeqCst);
    while let Some(done) = work.tasks.join_next().await {
        if let Err(err) = done {
            tracing::error!(%err, "a registration task panicked");
        }
    }
}

/// Which claimed operations run and which wait their turn: one at a time per device (by its
/// lower-cased registration id), in the order they were claimed. Plain bookkeeping, no tasks.
#[derive(Debug, Default)]
pub struct Schedule {
    /// Every device with a running operation, and its operations waiting their turn.
    devices: HashMap<String, VecDeque<StoredOperation>>,
    queued: usize,
}

impl Schedule {
    /// Takes `op`: returns it when it may start now (no operation of its device runs), else keeps
    /// it until [`Schedule::finished`] hands it out.
    pub fn add(&mut self, op: StoredOperation) -> Option<StoredOperation> {
        match self.devices.get_mut(&op.registration_key) {
            Some(queue) => {
                queue.push_back(op);
                self.queued += 1;
                None
            }
            None => {
                self.devices
                    .insert(op.registration_key.clone(), VecDeque::new());
                Some(op)
            }
        }
    }

    /// The running operation of `device` ended: its next operation, which starts now, if any.
    pub fn finished(&mut self, device: &str) -> Option<StoredOperation> {
        let next = self.devices.get_mut(device).and_then(VecDeque::pop_front);
        match next {
            Some(op) => {
                self.queued -= 1;
                Some(op)
            }
            None => {
                self.devices.remove(device);
                None
            }
        }
    }

    /// Operations running.
    pub fn running(&self) -> usize {
        self.devices.len()
    }

    /// Operations held: running, or waiting behind another of their device.
    pub fn held(&self) -> usize {
        self.devices.len() + self.queued
    }
}

/// The operations this worker holds, and the tasks running them.
struct Work {
    process: Arc<dyn Process>,
    leases: Leases,
    tasks: JoinSet<()>,
    /// The device each running task works for.
    running: HashMap<Id, String>,
    schedule: Schedule,
}

impl Work {
    fn new(process: Arc<dyn Process>, leases: Leases) -> Self {
        Self {
            process,
            leases,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            schedule: Schedule::default(),
        }
    }

    /// Starts `op`, or queues it behind its device's running operation.
    fn add(&mut self, op: StoredOperation) {
        if let Some(op) = self.schedule.add(op) {
            self.start(op);
        }
    }

    /// A task ended: start its device's next operation, if one waits.
    fn finished(&mut self, id: Id) {
        if let Some(next) = self
            .running
            .remove(&id)
            .and_then(|device| self.schedule.finished(&device))
        {
            self.start(next);
        }
    }

    fn start(&mut self, op: StoredOperation) {
        let key = op.registration_key.clone();
        let (process, leases) = (Arc::clone(&self.process), self.leases.clone());
        let handle = self.tasks.spawn(async move {
            let in_progress = metrics::gauge!("opendps_operations_in_progress");
            in_progress.increment(1.0);
            leases.work_on(process.as_ref(), &op).await;
            in_progress.decrement(1.0);
        });
        self.running.insert(handle.id(), key);
    }
}

#[cfg(test)]
mod tests {

    use dps_core::clock::ManualClock;
    use dps_core::store::Durability;

    use super::*;

    fn op(id: &str, device: &str, next_attempt_ms: i64) -> StoredOperation {
        StoredOperation {
            operation_id: id.to_owned(),
            registration_key: device.to_owned(),
            pending: true,
            next_attempt_ms,
            doc: "{}".to_owned(),
        }
    }

    #[test]
    fn one_operation_per_device_at_a_time_in_claim_order() {
        let mut schedule = Schedule::default();
        assert!(schedule.add(op("a1", "a", 0)).is_some(), "a is idle");
        assert!(schedule.add(op("b1", "b", 0)).is_some(), "b is idle");
        assert!(schedule.add(op("a2", "a", 0)).is_none(), "a is busy");
        assert!(schedule.add(op("a3", "a", 0)).is_none());
        assert_eq!((schedule.running(), schedule.held()), (2, 4));
        assert_eq!(
            schedule.finished("a").map(|o| o.operation_id).as_deref(),
            Some("a2")
        );
        assert_eq!(schedule.finished("b"), None, "b has nothing waiting");
        assert_eq!(
            schedule.finished("a").map(|o| o.operation_id).as_deref(),
            Some("a3")
        );
        assert_eq!(schedule.finished("a"), None);
        assert_eq!((schedule.running(), schedule.held()), (0, 0));
        assert!(schedule.add(op("a4", "a", 0)).is_some(), "a is idle again");
    }

    /// Records when each operation ran (in paused time), takes a second over each, and finishes
    /// it in the store as the service would.
    struct Recorder {
        store: Arc<dyn Store>,
        clock: Arc<ManualClock>,
        ran: Mutex<Vec<(String, tokio::time::Instant, tokio::time::Instant)>>,
    }

    #[async_trait]
    impl Process for Recorder {
        async fn process(&self, op: &StoredOperation) -> Attempt {
            let started = tokio::time::Instant::now();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let finished = StoredOperation {
                pending: false,
                next_attempt_ms: self.clock.now().as_millisecond(),
                ..op.clone()
            };
            self.store.put_operation(&finished).await.expect("finish");
            self.ran.lock().expect("lock").push((
                op.operation_id.clone(),
                started,
                tokio::time::Instant::now(),
            ));
            Attempt::Done
        }
    }

    /// Answers `Interrupted` a number of times, then finishes the operation after `takes`.
    struct Flaky {
        store: Arc<dyn Store>,
        interruptions: Mutex<u32>,
        takes: Duration,
        attempts: Mutex<u32>,
    }

    #[async_trait]
    impl Process for Flaky {
        async fn process(&self, op: &StoredOperation) -> Attempt {
            *self.attempts.lock().expect("lock") += 1;
            {
                let mut left = self.interruptions.lock().expect("lock");
                if *left > 0 {
                    *left -= 1;
                    return Attempt::Interrupted;
                }
            }
            tokio::time::sleep(self.takes).await;
            let finished = StoredOperation {
                pending: false,
                ..op.clone()
            };
            self.store.put_operation(&finished).await.expect("finish");
            Attempt::Done
        }
    }

    /// Runs one operation through a worker with `process` and a lease of `lease_ms`, while another
    /// node tries to claim it every 50 ms; returns once it is finished, with whether the other node
    /// ever got it.
    async fn run_one(process: Arc<Flaky>, lease_ms: i64) -> bool {
        let store = Arc::clone(&process.store);
        let clock: Arc<dyn Clock> = Arc::new(dps_core::clock::SystemClock);
        store
            .put_operation(&op("op", "dev", clock.now().as_millisecond() - 1))
            .await
            .expect("put");
        let (stop_tx, stop_rx) = watch::channel(false);
        let worker = tokio::spawn(run(
            process,
            Arc::clone(&store),
            Arc::clone(&clock),
            Arc::new(Notify::new()),
            Handoff::new("node-a".into(), Arc::clone(&clock), lease_ms),
            600_000,
            stop_rx,
        ));
        let other = LeaseOwner::new("node-b");
        let mut taken = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store
            .get_operation("op")
            .await
            .expect("get")
            .is_some_and(|o| o.pending)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the operation did not finish"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = clock.now().as_millisecond();
            taken |= !store
                .claim_operations(&other, now, lease_ms, 10)
                .await
                .expect("claim")
                .is_empty();
        }
        stop_tx.send(true).expect("stop");
        worker.await.expect("worker ends");
        taken
    }

    fn sqlite_store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(dps_store::SqliteStore::open(dir.path().join("db")).expect("open"))
    }

    /// An operation handed over as it was recorded runs at once, though no claim returns it (it is
    /// leased to the worker already); once the worker stops, nothing more is taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handed_over_operations_run_without_a_claim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = sqlite_store(&dir);
        let flaky = Arc::new(Flaky {
            store: Arc::clone(&store),
            interruptions: Mutex::new(0),
            takes: Duration::ZERO,
            attempts: Mutex::new(0),
        });
        let clock: Arc<dyn Clock> = Arc::new(dps_core::clock::SystemClock);
        let handoff = Handoff::new("node-a".into(), Arc::clone(&clock), 60_000);
        let (stop_tx, stop_rx) = watch::channel(false);
        let worker = tokio::spawn(run(
            flaky.clone(),
            Arc::clone(&store),
            Arc::clone(&clock),
            Arc::new(Notify::new()),
            Arc::clone(&handoff),
            600_000,
            stop_rx,
        ));
        let (owner, until) = handoff.lease().expect("a running worker takes work");
        let handed = op("op", "dev", clock.now().as_millisecond());
        store
            .put_leased_operation(&handed, &owner, until, Durability::Now)
            .await
            .expect("put");
        handoff.take(handed);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store
            .get_operation("op")
            .await
            .expect("get")
            .is_some_and(|o| o.pending)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the operation did not run"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*flaky.attempts.lock().expect("lock"), 1);
        stop_tx.send(true).expect("stop");
        worker.await.expect("worker ends");
        assert!(handoff.lease().is_none(), "a stopped worker takes nothing");
    }

    /// An attempt the database interrupted is tried again by the same worker while it holds the
    /// lease, not left until the lease runs out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interrupted_attempts_are_tried_again_under_the_same_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flaky = Arc::new(Flaky {
            store: sqlite_store(&dir),
            interruptions: Mutex::new(2),
            takes: Duration::ZERO,
            attempts: Mutex::new(0),
        });
        let taken = run_one(Arc::clone(&flaky), 60_000).await;
        assert_eq!(*flaky.attempts.lock().expect("lock"), 3);
        assert!(!taken, "another node got the operation");
    }

    /// An attempt longer than the lease keeps it: the worker renews it, so no other node takes the
    /// operation over while it is in progress.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_attempt_keeps_its_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slow = Arc::new(Flaky {
            store: sqlite_store(&dir),
            interruptions: Mutex::new(0),
            takes: Duration::from_millis(2_000),
            attempts: Mutex::new(0),
        });
        let taken = run_one(Arc::clone(&slow), 600).await;
        assert!(!taken, "the lease lapsed while the attempt ran");
        assert_eq!(*slow.attempts.lock().expect("lock"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn operations_run_per_device_in_order_and_finished_ones_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(
            jiff::Timestamp::from_second(1_900_000_000).expect("ts"),
        ));
        let store: Arc<dyn Store> = Arc::new(
            dps_store::SqliteStore::open_with_clock(dir.path().join("db"), clock.clone())
                .expect("open"),
        );
        let now = clock.now().as_millisecond();
        for (id, device, at) in [
            ("a1", "a", 1),
            ("a2", "a", 2),
            ("a3", "a", 3),
            ("b1", "b", 4),
        ] {
            store
                .put_operation(&op(id, device, now - 100 + at))
                .await
                .expect("put");
        }
        let recorder = Arc::new(Recorder {
            store: Arc::clone(&store),
            clock: Arc::clone(&clock),
            ran: Mutex::new(Vec::new()),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let worker = tokio::spawn(run(
            recorder.clone(),
            Arc::clone(&store),
            clock.clone(),
            Arc::new(Notify::new()),
            Handoff::new("test-node".into(), clock.clone(), 60_000),
            10_000,
            stop_rx,
        ));
        while recorder.ran.lock().expect("lock").len() < 4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ran = recorder.ran.lock().expect("lock").clone();
        let of = |id: &str| ran.iter().find(|(o, ..)| o == id).expect("ran").clone();
        let (a1, a2, a3, b1) = (of("a1"), of("a2"), of("a3"), of("b1"));
        assert!(
            a1.2 <= a2.1 && a2.2 <= a3.1,
            "a's operations one after another: {ran:?}"
        );
        assert!(b1.1 < a1.2, "b does not wait for a: {ran:?}");

        // Past the retention, the finished operations go.
        assert!(store.get_operation("a1").await.expect("get").is_some());
        clock.set(
            clock
                .now()
                .checked_add(jiff::SignedDuration::from_secs(60))
                .expect("ts"),
        );
        // The store's writer is a real thread, so paused time is no bound here: wait in real time.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut pruned = false;
        while !pruned && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            std::thread::sleep(Duration::from_millis(5));
            pruned = store.get_operation("a1").await.expect("get").is_none();
        }
        assert!(
            pruned,
            "finished operations are pruned after their retention"
        );
        stop_tx.send(true).expect("stop");
        worker.await.expect("worker ends");
    }
}
