//! Register requests that wait for their operation to finish, so that the device gets its final
//! status in the register response instead of polling for it (`provisioning.answer_within_ms`).
//!
//! A register request announces its operation before handing it to the worker; the worker sends the
//! final status once it is committed ([`Answers::finished`]) or lets the request go when it leaves
//! the operation unfinished ([`Answers::release`]); the request gives up after its bound. The core
//! has no runtime: the bound is kept by the runtime's timer, given as [`Sleep`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_channel::oneshot;

use crate::device::RegistrationOperationStatus;

/// The runtime's timer: a future that is ready after the given time.
pub type Sleep =
    Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync + 'static>;

type Waiters = Mutex<HashMap<String, oneshot::Sender<RegistrationOperationStatus>>>;

/// The register requests of this node waiting for their operations, by operation id.
pub(super) struct Answers {
    within: Duration,
    sleep: Sleep,
    waiting: Arc<Waiters>,
}

impl Answers {
    pub(super) fn new(within: Duration, sleep: Sleep) -> Self {
        Self {
            within,
            sleep,
            waiting: Arc::default(),
        }
    }

    /// Starts waiting for `operation_id`: before the operation can finish, so no answer is missed.
    pub(super) fn expect(&self, operation_id: &str) -> Expected {
        let (send, receive) = oneshot::channel();
        lock(&self.waiting).insert(operation_id.to_owned(), send);
        Expected {
            operation_id: operation_id.to_owned(),
            receive,
            waiting: Arc::clone(&self.waiting),
            within: self.within,
            sleep: Arc::clone(&self.sleep),
        }
    }

    /// The operation `operation_id` finished, committed: its register request, if one waits,
    /// answers with the status `answer` makes (made only then).
    pub(super) fn finished(
        &self,
        operation_id: &str,
        answer: impl FnOnce() -> RegistrationOperationStatus,
    ) {
        let waiting = lock(&self.waiting).remove(operation_id);
        if let Some(send) = waiting {
            // The request may have given up in the meantime; the device then polls.
            let _ = send.send(answer());
        }
    }

    /// The worker left `operation_id` unfinished (a retry later, or a failure to store it): its
    /// register request answers `assigning` now rather than at the end of its wait.
    pub(super) fn release(&self, operation_id: &str) {
        lock(&self.waiting).remove(operation_id);
    }
}

/// A register request's wait for its operation.
pub(super) struct Expected {
    operation_id: String,
    receive: oneshot::Receiver<RegistrationOperationStatus>,
    waiting: Arc<Waiters>,
    within: Duration,
    sleep: Sleep,
}

impl Expected {
    /// The operation's final status if it finishes within the bound; `None` when it does not, or
    /// when the worker let it go unfinished.
    pub(super) async fn answer(mut self) -> Option<RegistrationOperationStatus> {
        let mut timer = (self.sleep)(self.within);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = Pin::new(&mut self.receive).poll(cx) {
                return Poll::Ready(answer.ok());
            }
            timer.as_mut().poll(cx).map(|()| None)
        })
        .await
    }
}

impl Drop for Expected {
    /// A request that stops waiting (answered, timed out, or its client gone) is forgotten.
    fn drop(&mut self) {
        lock(&self.waiting).remove(&self.operation_id);
    }
}

fn lock(
    waiting: &Waiters,
) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<RegistrationOperationStatus>>> {
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EnrollmentStatus;

    fn status(id: &str, status: EnrollmentStatus) -> RegistrationOperationStatus {
        RegistrationOperationStatus {
            operation_id: id.to_owned(),
            status,
            registration_state: None,
        }
    }

    fn tokio_sleep() -> Sleep {
        Arc::new(|d| Box::pin(tokio::time::sleep(d)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_operation_answers_its_request() {
        let answers = Answers::new(Duration::from_secs(1), tokio_sleep());
        let expected = answers.expect("op-1");
        answers.finished("op-2", || panic!("nobody waits for op-2"));
        answers.finished("op-1", || status("op-1", EnrollmentStatus::Assigned));
        let answer = expected.answer().await.expect("answered");
        assert_eq!(answer.status, EnrollmentStatus::Assigned);
        assert!(lock(&answers.waiting).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_no_longer_than_its_bound() {
        let answers = Answers::new(Duration::from_millis(800), tokio_sleep());
        let start = tokio::time::Instant::now();
        assert!(answers.expect("op-1").answer().await.is_none());
        assert_eq!(start.elapsed(), Duration::from_millis(800));
        assert!(
            lock(&answers.waiting).is_empty(),
            "a request that gave up is forgotten"
        );
        // The operation finishes later: nobody waits, no answer is made.
        answers.finished("op-1", || panic!("nobody waits any more"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_operation_lets_its_request_go_at_once() {
        let answers = Answers::new(Duration::from_secs(30), tokio_sleep());
        let expected = answers.expect("op-1");
        answers.release("op-1");
        let start = tokio::time::Instant::now();
        assert!(expected.answer().await.is_none());
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
