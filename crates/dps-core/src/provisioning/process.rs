//! The work on one operation: allocation (a policy, or the webhook with its retries), the hub
//! writes, the reprovision policy, and the terminal state, each step durable.

use super::plan::{Situation, TwinAction, plan_twin};
use super::*;
use crate::hub::TwinWrite;

/// Where a registration assigned the device.
pub(super) struct Assignment<'a> {
    pub(super) hub: &'a str,
    pub(super) device_id: &'a str,
    pub(super) substatus: crate::model::AssignedDeviceSubstatus,
    pub(super) payload: Option<Value>,
    pub(super) initial_hub: String,
    pub(super) cleanup: Cleanup,
}

/// What became of the device's previous identity.
pub(super) enum Cleanup {
    /// It had none to delete.
    Nothing,
    /// It was deleted from `hub` under `device_id`.
    Deleted { hub: String, device_id: String },
    /// The deletion failed: the identity stays, reported in the trace.
    Failed(StaleIdentity),
}

/// A registration state to record, with the precondition that keeps racing registrations of one
/// device from both winning.
pub(super) struct RecordWrite {
    pub(super) record: RegistrationRecord,
    pub(super) etag: Etag,
    pub(super) cond: Precondition,
}

/// A hub failure as far as retrying is concerned.
pub(super) struct HubRetry<'a> {
    /// How long the hub asked to be left alone.
    wait: Option<std::time::Duration>,
    /// Whether the failure may pass.
    transient: bool,
    /// What happened, for the log.
    reason: &'a (dyn std::fmt::Display + Sync),
}

pub(super) enum Failure {
    /// A hub call failed: retried later if the failure may pass, else the registration fails.
    Hub(HubError),
    /// A hub throttled recently: no call is made to it before `until_ms`.
    HubBusy {
        /// The hub's host name.
        hub: String,
        /// Unix milliseconds.
        until_ms: i64,
    },
    /// The webhook answered 429 or above; ask again later.
    WebhookRetry(String),
    /// The enrollment is disabled.
    Disabled,
    /// The registration fails with this code.
    Final { code: u32, message: String },
    /// Storage failed; the operation stays leased and is retried after the lease.
    Store(ProvisioningError),
}

pub(super) fn store_failure(err: StoreError) -> Failure {
    Failure::Store(err.into())
}

/// A hub failure that fails the registration: the hub's tier, or the hub's answer.
fn hub_failure_of(err: HubError) -> Failure {
    match err {
        HubError::TwinsUnsupported { .. } => Failure::Final {
            code: HUB_HAS_NO_TWINS,
            message: err.to_string(),
        },
        other => Failure::Hub(other),
    }
}

pub(super) fn allocation_failure(err: AllocationError) -> Failure {
    Failure::Final {
        code: err.error_code(),
        message: err.to_string(),
    }
}

impl Provisioning {
    /// Works on one claimed operation: finishes it, or reschedules it after a hub failure. Errors
    /// are storage failures; the lease then expires and the operation is claimed again. A register
    /// request waiting for the operation gets its final status, or is let go.
    pub async fn process(
        &self,
        stored: &StoredOperation,
    ) -> Result<EnrollmentStatus, ProvisioningError> {
        let processed = self.drive(stored).await;
        if let Some(answers) = &self.answers {
            answers.release(&stored.operation_id);
        }
        self.prefetched.forget(&stored.operation_id);
        processed
    }

    async fn drive(&self, stored: &StoredOperation) -> Result<EnrollmentStatus, ProvisioningError> {
        let mut op: Operation = parse(&stored.doc)?;
        if op.status.is_terminal() {
            return Ok(op.status);
        }
        loop {
            match self.attempt(&mut op).await {
                Ok(write) => match self.finish(&mut op, write).await? {
                    Some(status) => return Ok(status),
                    // Another registration of the same device finished first: decide again.
                    None => continue,
                },
                Err(Failure::Hub(err)) => {
                    if err.is_throttling() {
                        self.close_gate(&err);
                    }
                    let failure = |op: &Operation| self.hub_failure(op, &err);
                    let later = HubRetry {
                        wait: err.retry_after(),
                        transient: err.is_transient(),
                        reason: &err,
                    };
                    return self.retry_hub_later(&mut op, later, failure).await;
                }
                Err(Failure::HubBusy { hub, until_ms }) => {
                    let left = until_ms - self.clock.now().as_millisecond();
                    let failure = |op: &Operation| {
                        let message = format!(
                            "IoT hub {hub} kept throttling for {} s (provisioning.hub_retry_for_secs); the registration gave up after {} attempts",
                            self.settings.hub_retry_for_ms / 1000,
                            op.attempts
                        );
                        (HUB_WRITE_FAILED, message)
                    };
                    let reason = format!("IoT hub {hub} is throttling; not calling it yet");
                    let later = HubRetry {
                        wait: Some(std::time::Duration::from_millis(
                            u64::try_from(left).unwrap_or(0),
                        )),
                        transient: true,
                        reason: &reason,
                    };
                    return self.retry_hub_later(&mut op, later, failure).await;
                }
                Err(Failure::Final { code, message }) => {
                    let write = self.unassigned_record(&op, Some((code, message))).await?;
                    return self.finish_unassigned(&mut op, write).await;
                }
                Err(Failure::WebhookRetry(reason))
                    if op.webhook_retries < self.settings.webhook_retries =>
                {
                    op.webhook_retries += 1;
                    let delay = self.settings.webhook_first_retry_ms
                        + self.settings.webhook_retry_increment_ms
                            * i64::from(op.webhook_retries - 1);
                    tracing::info!(operation = %op.operation_id, retry = op.webhook_retries, delay_ms = delay, %reason, "allocation webhook busy; will ask again");
                    self.save_operation(&op, self.clock.now().as_millisecond() + delay)
                        .await?;
                    return Ok(EnrollmentStatus::Assigning);
                }
                Err(Failure::WebhookRetry(reason)) => {
                    let message = format!(
                        "Custom allocation failed after {} retries: {reason}",
                        op.webhook_retries
                    );
                    let write = self
                        .unassigned_record(&op, Some((CUSTOM_ALLOCATION_FAILED, message)))
                        .await?;
                    return self.finish_unassigned(&mut op, write).await;
                }
                Err(Failure::Disabled) => {
                    let write = self.unassigned_record(&op, None).await?;
                    return self.finish_unassigned(&mut op, write).await;
                }
                Err(Failure::Store(err)) => return Err(err),
            }
        }
    }

    /// Reschedules the operation after a hub failure that may pass, or fails the registration
    /// with `failure` when it will not, or when the retry window is over.
    async fn retry_hub_later(
        &self,
        op: &mut Operation,
        later: HubRetry<'_>,
        failure: impl FnOnce(&Operation) -> (u32, String),
    ) -> Result<EnrollmentStatus, ProvisioningError> {
        match self.hub_retry_at(op, later.wait, later.transient) {
            Some(at) => {
                let retry_in_ms = at - self.clock.now().as_millisecond();
                tracing::warn!(operation = %op.operation_id, attempt = op.attempts, retry_in_ms, reason = %later.reason, "hub call failed or deferred; will retry");
                self.save_operation(op, at).await?;
                Ok(EnrollmentStatus::Assigning)
            }
            None => {
                let write = self.unassigned_record(op, Some(failure(op))).await?;
                self.finish_unassigned(op, write).await
            }
        }
    }

    /// Remembers that a hub throttled: calls to it wait for its `Retry-After` (or the first
    /// retry delay when it gave none).
    fn close_gate(&self, err: &HubError) {
        let wait = err.retry_after().map_or(self.settings.hub_retry_ms, |d| {
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
        });
        let until = self.clock.now().as_millisecond().saturating_add(wait);
        let mut gates = self.hub_gates.lock().unwrap_or_else(|e| e.into_inner());
        let gate = gates.entry(err.hub().to_ascii_lowercase()).or_insert(until);
        *gate = (*gate).max(until);
    }

    /// `Err(HubBusy)` while `hub` is throttling.
    fn check_gate(&self, hub: &LinkedHub) -> Result<(), Failure> {
        let now = self.clock.now().as_millisecond();
        let mut gates = self.hub_gates.lock().unwrap_or_else(|e| e.into_inner());
        let key = hub.host_name.to_ascii_lowercase();
        match gates.get(&key) {
            Some(&until) if until > now => Err(Failure::HubBusy {
                hub: hub.host_name.clone(),
                until_ms: until,
            }),
            Some(_) => {
                gates.remove(&key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// When to try a failed hub call again: after the doubling delay (at most `hub_retry_max_ms`)
    /// or the hub's `Retry-After`, whichever is longer, spread by up to a fifth so that a burst
    /// does not come back at once. `None` when the failure will not pass, or when the retry would
    /// fall after `hub_retry_for_ms` from the first failure.
    fn hub_retry_at(
        &self,
        op: &mut Operation,
        retry_after: Option<std::time::Duration>,
        transient: bool,
    ) -> Option<i64> {
        if !transient {
            return None;
        }
        let now = self.clock.now().as_millisecond();
        let since = *op.hub_failing_since_ms.get_or_insert(now);
        op.attempts += 1;
        let backoff = self
            .settings
            .hub_retry_ms
            .saturating_mul(1 << (op.attempts - 1).min(20))
            .min(self.settings.hub_retry_max_ms);
        let asked = retry_after.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let delay = backoff.max(asked);
        let mut random = [0u8; 4];
        crate::sas::fill_random(&mut random);
        let spread = i64::from(u32::from_be_bytes(random)) % (delay / 5 + 1);
        let at = now.saturating_add(delay).saturating_add(spread);
        (at - since <= self.settings.hub_retry_for_ms).then_some(at)
    }

    /// The error code and message of a registration that a hub failed.
    fn hub_failure(&self, op: &Operation, err: &HubError) -> (u32, String) {
        let mut message = err.to_string();
        if matches!(
            err,
            HubError::Refused {
                status: 401 | 403,
                ..
            }
        ) {
            message.push_str("; the linked hub's policy must grant RegistryWrite and ServiceConnect (relink it with such a connection string)");
        }
        if err.is_transient() {
            let since = op.hub_failing_since_ms.unwrap_or_default();
            let secs = (self.clock.now().as_millisecond() - since) / 1000;
            message.push_str(&format!(
                " (gave up after {} attempts over {secs} s; provisioning.hub_retry_for_secs is {})",
                op.attempts,
                self.settings.hub_retry_for_ms / 1000
            ));
        }
        (HUB_WRITE_FAILED, message)
    }

    /// A failed or disabled registration: its state is recorded with the operation, unless a
    /// concurrent registration of the device recorded a newer outcome, which is kept.
    pub(super) async fn finish_unassigned(
        &self,
        op: &mut Operation,
        write: RecordWrite,
    ) -> Result<EnrollmentStatus, ProvisioningError> {
        let (done, stored_op) = self.finished(op, &write.record)?;
        match self.record(&stored_op, &write).await {
            Err(StoreError::AlreadyExists(_) | StoreError::EtagMismatch(_)) => {
                self.store.put_operation(&stored_op).await?;
            }
            written => written?,
        }
        Ok(self.complete(op, done, &write.record))
    }

    /// An assigned registration: its state and the finished operation in one store write. `None`
    /// when the state lost a race with another registration of the device (nothing was written):
    /// the caller decides again from the winner's result.
    pub(super) async fn finish(
        &self,
        op: &mut Operation,
        write: RecordWrite,
    ) -> Result<Option<EnrollmentStatus>, ProvisioningError> {
        let (done, stored_op) = self.finished(op, &write.record)?;
        match self.record(&stored_op, &write).await {
            Err(StoreError::AlreadyExists(_) | StoreError::EtagMismatch(_)) => Ok(None),
            written => {
                written?;
                Ok(Some(self.complete(op, done, &write.record)))
            }
        }
    }

    /// The operation as it is once `record` is its outcome, and its stored form.
    pub(super) fn finished(
        &self,
        op: &Operation,
        record: &RegistrationRecord,
    ) -> Result<(Operation, StoredOperation), ProvisioningError> {
        let mut done = op.clone();
        done.status = record.state.status;
        done.result = Some(result_of(record));
        // The trace now lives in the registration record; polls need only the result, which also
        // carries an X.509 device's certificate info.
        done.trace = None;
        if done.result.as_ref().is_some_and(|r| r.x509.is_some()) {
            done.certificate = None;
        }
        let stored = StoredOperation {
            operation_id: done.operation_id.clone(),
            registration_key: done.registration_id.to_ascii_lowercase(),
            pending: false,
            next_attempt_ms: self.clock.now().as_millisecond(),
            doc: serde_json::to_string(&done)
                .map_err(|e| ProvisioningError::internal("serializing an operation", e))?,
        };
        Ok((done, stored))
    }

    /// Writes the registration state under its precondition together with the operation.
    pub(super) async fn record(
        &self,
        op: &StoredOperation,
        write: &RecordWrite,
    ) -> Result<(), StoreError> {
        let doc = serde_json::to_string(&write.record).map_err(|e| {
            StoreError::Backend(crate::error::Internal::caused(
                "serializing a registration",
                e,
            ))
        })?;
        let group_key = write
            .record
            .enrollment_group_id
            .as_deref()
            .map(str::to_ascii_lowercase);
        let written = self
            .store
            .put_registration_and_operation(
                &op.registration_key,
                group_key.as_deref(),
                StoredDoc {
                    etag: write.etag.clone(),
                    doc,
                },
                write.cond.clone(),
                op,
            )
            .await;
        self.prefetched.wrote(&op.registration_key);
        written
    }

    /// The operation is finished (committed): metrics, the log line, and the answer to its register
    /// request if one waits.
    pub(super) fn complete(
        &self,
        op: &mut Operation,
        done: Operation,
        record: &RegistrationRecord,
    ) -> EnrollmentStatus {
        *op = done;
        let outcome = match op.status {
            EnrollmentStatus::Assigned => "assigned",
            EnrollmentStatus::Disabled => "disabled",
            _ => "failed",
        };
        let labels = [("transport", op.transport.as_str()), ("outcome", outcome)];
        metrics::counter!("opendps_registrations_total", &labels).increment(1);
        let took = self.clock.now().duration_since(op.created_date_time_utc.0);
        metrics::histogram!("opendps_registration_duration_seconds", &labels)
            .record(took.as_secs_f64().max(0.0));
        tracing::info!(
            operation = %op.operation_id,
            registration_id = %op.registration_id,
            status = ?op.status,
            hub = record.state.assigned_hub.as_deref().unwrap_or("-"),
            error_code = record.state.error_code.unwrap_or(0),
            "registration finished"
        );
        if let Some(answers) = &self.answers {
            answers.finished(&op.operation_id, || RegistrationOperationStatus {
                operation_id: op.operation_id.clone(),
                status: op.status,
                registration_state: op.result.clone(),
            });
        }
        op.status
    }

    /// A `failed` (with the error) or `disabled` (without) registration state, keeping what the
    /// device had before (its current hub).
    pub(super) async fn unassigned_record(
        &self,
        op: &Operation,
        error: Option<(u32, String)>,
    ) -> Result<RecordWrite, ProvisioningError> {
        let previous = self.registration_for(op).await?;
        let now = format_utc(self.clock.now());
        let mut record = previous
            .as_ref()
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| self.new_record(op, &now));
        record.state.status = if error.is_some() {
            EnrollmentStatus::Failed
        } else {
            EnrollmentStatus::Disabled
        };
        record.allocation_trace = op.trace.clone().map(|mut trace| {
            trace.decision = Some(match &error {
                Some((code, message)) => {
                    serde_json::json!({"errorCode": code, "errorMessage": message})
                }
                None => serde_json::json!({"status": "disabled"}),
            });
            trace
        });
        record.certificate.clone_from(&op.certificate);
        record.state.error_code = error.as_ref().map(|(code, _)| *code);
        record.state.error_message = error.map(|(_, message)| message);
        record.state.substatus = None;
        record.state.payload = None;
        record.state.last_updated_date_time_utc = Some(now);
        record.enrollment_group_id = op.enrollment.group_id();
        let etag = Etag::generate();
        record.state.etag = Some(etag.as_str().to_owned());
        let cond = previous.map_or(Precondition::MustNotExist, |(_, e)| Precondition::EtagIs(e));
        Ok(RecordWrite { record, etag, cond })
    }

    /// One pass: decide the hub, write the device there, record the state.
    pub(super) async fn attempt(&self, op: &mut Operation) -> Result<RecordWrite, Failure> {
        let kind = op.enrollment.kind;
        let Some(doc) = self
            .store
            .get_enrollment(kind, &op.enrollment.id.to_ascii_lowercase())
            .await
            .map_err(store_failure)?
        else {
            return Err(Failure::Final {
                code: ENROLLMENT_GONE,
                message: "The enrollment was deleted while the device was registering.".into(),
            });
        };
        let view = EnrollmentView::parse(op.enrollment.kind, &doc.doc, &op.registration_id)
            .map_err(Failure::Store)?;
        if view.status == ProvisioningStatus::Disabled {
            return Err(Failure::Disabled);
        }
        let previous = self.registration_for(op).await.map_err(Failure::Store)?;
        let linked = self.store.list_linked_hubs().await.map_err(store_failure)?;
        let current = previous
            .as_ref()
            .and_then(|(r, _)| r.state.assigned_hub.clone());
        let current_hub = current.as_deref().and_then(|name| {
            linked
                .iter()
                .find(|h| h.host_name.eq_ignore_ascii_case(name))
        });

        let (target, webhook_twin, payload) = self
            .choose_hub(op, &doc, &view, &linked, current_hub, previous.as_ref())
            .await?;
        let moved_from =
            current_hub.filter(|hub| !hub.host_name.eq_ignore_ascii_case(&target.host_name));
        // The webhook's initial twin replaces the enrollment's (used on first assignment and on reset).
        let initial = HubTwin::from_initial(webhook_twin.as_ref().or(view.initial_twin.as_ref()));
        let initial_hub = previous
            .as_ref()
            .and_then(|(r, _)| r.initial_hub.clone())
            .unwrap_or_else(|| target.host_name.clone());
        let back_home = initial_hub.eq_ignore_ascii_case(&target.host_name);
        let previous_device_id = previous
            .as_ref()
            .and_then(|(r, _)| r.state.device_id.clone());
        let device = HubDevice {
            // Registration ids are case-insensitive: a device keeps the device id of its first
            // assignment whatever case it registers with now, so it never has two identities.
            device_id: view
                .device_id
                .clone()
                .or_else(|| {
                    previous_device_id
                        .clone()
                        .filter(|d| d.eq_ignore_ascii_case(&op.registration_id))
                })
                .unwrap_or_else(|| op.registration_id.clone()),
            authentication: view.hub_authentication(op.certificate.as_ref()),
            iot_edge: view.iot_edge,
        };
        let (action, substatus) = plan_twin(Situation {
            previously_assigned: current.is_some(),
            moved: moved_from.is_some(),
            migrate_device_data: view.reprovision.migrate_device_data,
            back_home,
            previous_substatus: previous.as_ref().and_then(|(r, _)| r.state.substatus),
        });
        self.check_gate(target)?;
        let twin = match (action, moved_from) {
            (TwinAction::Leave, _) => None,
            (TwinAction::CarryFromOldHub, Some(old)) => {
                let carried = if old.twins {
                    self.check_gate(old)?;
                    match self
                        .hubs
                        .get_twin(
                            old,
                            previous_device_id.as_ref().unwrap_or(&device.device_id),
                        )
                        .await
                    {
                        Ok(twin) => twin,
                        Err(HubError::TwinsUnsupported { .. }) => None,
                        Err(err) => return Err(hub_failure_of(err)),
                    }
                } else {
                    None
                };
                Some((carried.unwrap_or(initial), TwinWrite::Merge))
            }
            (TwinAction::Reset, _) => Some((initial, TwinWrite::Replace)),
            (TwinAction::Initial | TwinAction::CarryFromOldHub, _) => {
                Some((initial, TwinWrite::Merge))
            }
        };
        // A hub without twins takes a device only if there is no twin to give it.
        let twin = match twin {
            Some((twin, _)) if !target.twins && !twin.is_empty() => {
                return Err(hub_failure_of(HubError::TwinsUnsupported {
                    hub: target.host_name.clone(),
                }));
            }
            Some(_) if !target.twins => None,
            // Merging nothing changes nothing; replacing with nothing clears the twin.
            Some((twin, TwinWrite::Merge)) if twin.is_empty() => None,
            other => other,
        };

        let stale = match (moved_from, current_hub, &previous_device_id) {
            (Some(old), _, previous_id) => {
                Some((old, previous_id.as_ref().unwrap_or(&device.device_id)))
            }
            (None, Some(same), Some(previous_id)) if *previous_id != device.device_id => {
                Some((same, previous_id))
            }
            _ => None,
        };
        let cleanup = self
            .write_device(&op.registration_id, target, &device, twin, stale)
            .await?;

        Ok(self.assigned_record(
            op,
            previous,
            Assignment {
                hub: &target.host_name,
                device_id: &device.device_id,
                substatus,
                payload,
                initial_hub,
                cleanup,
            },
        ))
    }

    /// The hub for this registration, with the webhook's initial twin and payload when a webhook
    /// chose it: the current hub when the reprovision policy keeps it, else the policy's choice.
    async fn choose_hub<'h>(
        &self,
        op: &mut Operation,
        doc: &StoredDoc,
        view: &EnrollmentView,
        linked: &'h [LinkedHub],
        current_hub: Option<&'h LinkedHub>,
        previous: Option<&(RegistrationRecord, Etag)>,
    ) -> Result<(&'h LinkedHub, Option<InitialTwin>, Option<Value>), Failure> {
        let policy = view
            .policy
            .unwrap_or(self.settings.default_allocation_policy);
        let keep_current = current_hub.filter(|_| !view.reprovision.update_hub_assignment);
        Ok(match (policy, keep_current) {
            // The webhook is asked on every registration, even one that keeps its hub (for the payload).
            (AllocationPolicy::Custom, _) => {
                let offered: Vec<&LinkedHub> = match keep_current {
                    Some(hub) => vec![hub],
                    None => allocation::candidates(linked, view.iot_hubs.as_deref())
                        .map_err(allocation_failure)?
                        .into_iter()
                        .filter(|h| h.apply_allocation_policy)
                        .collect(),
                };
                let current_device_id = current_hub
                    .and(previous)
                    .and_then(|(r, _)| r.state.device_id.clone());
                let context = DeviceRuntimeContext {
                    registration_id: op.registration_id.clone(),
                    current_iot_hub_host_name: current_hub.map(|h| h.host_name.clone()),
                    current_device_id,
                    symmetric_key: op.certificate.is_none().then(serde_json::Map::new),
                    x509: op.certificate.as_ref().map(|c| X509RegistrationResult {
                        certificate_info: Some(c.info.clone()),
                        enrollment_group_id: op.enrollment.group_id(),
                        signing_certificate_info: c.signing_certificate_info.clone(),
                    }),
                    payload: op.payload.clone(),
                };
                self.ask_webhook(op, &doc.doc, view.webhook_url.as_deref(), context, offered)
                    .await?
            }
            (_, Some(hub)) => (hub, None, None),
            (_, None) => {
                let candidates = allocation::candidates(linked, view.iot_hubs.as_deref())
                    .map_err(allocation_failure)?;
                let hub = allocation::allocate(
                    policy,
                    &op.registration_id,
                    &candidates,
                    self.settings.region.as_deref(),
                )
                .map_err(allocation_failure)?;
                (hub, None, None)
            }
        })
    }

    /// Writes the device's identity and (if any) twin to `target`, then deletes its `stale`
    /// identity, which would otherwise still accept the device's earlier credentials; what became
    /// of it is returned, for the registration's trace.
    async fn write_device(
        &self,
        registration_id: &str,
        target: &LinkedHub,
        device: &HubDevice,
        twin: Option<(HubTwin, TwinWrite)>,
        stale: Option<(&LinkedHub, &String)>,
    ) -> Result<Cleanup, Failure> {
        let written = self
            .hubs
            .upsert_device(target, device)
            .await
            .map_err(hub_failure_of)?;
        tracing::debug!(registration_id = %registration_id, hub = %target.host_name, ?written, "device identity written");
        if let Some((twin, mode)) = twin {
            self.hubs
                .write_twin(target, &device.device_id, &twin, mode)
                .await
                .map_err(hub_failure_of)?;
        }
        let Some((hub, stale_id)) = stale else {
            return Ok(Cleanup::Nothing);
        };
        match self.hubs.delete_device(hub, stale_id).await {
            Ok(()) => Ok(Cleanup::Deleted {
                hub: hub.host_name.clone(),
                device_id: stale_id.clone(),
            }),
            Err(err) => {
                tracing::warn!(registration_id = %registration_id, %err, hub = %hub.host_name, device_id = %stale_id, "the device's previous identity could not be deleted; delete it on the hub");
                Ok(Cleanup::Failed(StaleIdentity {
                    hub: hub.host_name.clone(),
                    device_id: stale_id.clone(),
                    error: err.to_string(),
                    at: format_utc(self.clock.now()),
                }))
            }
        }
    }

    /// The registration state of an assigned device, written under an etag precondition so two
    /// racing registrations of one device cannot both win.
    fn assigned_record(
        &self,
        op: &Operation,
        previous: Option<(RegistrationRecord, Etag)>,
        assignment: Assignment<'_>,
    ) -> RecordWrite {
        let now = format_utc(self.clock.now());
        let mut record = previous
            .as_ref()
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| self.new_record(op, &now));
        record.state.registration_id.clone_from(&op.registration_id);
        record.state.status = EnrollmentStatus::Assigned;
        record.state.assigned_hub = Some(assignment.hub.to_owned());
        record.state.device_id = Some(assignment.device_id.to_owned());
        record.state.substatus = Some(assignment.substatus);
        record.state.error_code = None;
        record.state.error_message = None;
        record.state.payload = assignment.payload;
        record.allocation_trace = op.trace.clone().map(|mut trace| {
            trace.decision = Some(serde_json::json!({"assignedHub": assignment.hub}));
            trace
        });
        record.state.last_updated_date_time_utc = Some(now);
        record.initial_hub = Some(assignment.initial_hub);
        record.certificate.clone_from(&op.certificate);
        // A stale identity reported earlier stays reported until it is the one deleted.
        match assignment.cleanup {
            Cleanup::Nothing => {}
            Cleanup::Deleted { hub, device_id } => {
                if record
                    .stale_identity
                    .as_ref()
                    .is_some_and(|s| s.hub.eq_ignore_ascii_case(&hub) && s.device_id == device_id)
                {
                    record.stale_identity = None;
                }
            }
            Cleanup::Failed(stale) => record.stale_identity = Some(stale),
        }
        record.enrollment_group_id = op.enrollment.group_id();
        let etag = Etag::generate();
        record.state.etag = Some(etag.as_str().to_owned());
        let cond = previous.map_or(Precondition::MustNotExist, |(_, e)| Precondition::EtagIs(e));
        RecordWrite { record, etag, cond }
    }

    /// Custom allocation: asks the enrollment's webhook to choose among `offered`, recording the
    /// call in the operation's allocation trace. Returns the chosen hub, the webhook's initial twin
    /// and its payload for the device.
    pub(super) async fn ask_webhook<'h>(
        &self,
        op: &mut Operation,
        enrollment_doc: &str,
        webhook_url: Option<&str>,
        context: DeviceRuntimeContext,
        offered: Vec<&'h LinkedHub>,
    ) -> Result<(&'h LinkedHub, Option<InitialTwin>, Option<Value>), Failure> {
        let url = webhook_url.ok_or_else(|| Failure::Final {
            code: CUSTOM_ALLOCATION_FAILED,
            message: "The enrollment's custom allocation has no webhook URL.".into(),
        })?;
        let names: Vec<String> = offered.iter().map(|h| h.host_name.clone()).collect();
        let kind = match op.enrollment.kind {
            EnrollmentKind::Group => "enrollmentGroup",
            EnrollmentKind::Individual => "individualEnrollment",
        };
        let request = serde_json::json!({
            kind: webhook::redacted_enrollment(enrollment_doc),
            "deviceRuntimeContext": context,
            "linkedHubs": names,
        });
        let called_at = format_utc(self.clock.now());
        let started = std::time::Instant::now();
        let reply = self
            .webhooks
            .post(url, &request, self.settings.webhook_timeout)
            .await;
        let latency = started.elapsed();
        let status = match &reply {
            Ok(r) => r.status.to_string(),
            Err(WebhookError::Timeout(_)) => "timeout".to_owned(),
            Err(WebhookError::Network(_)) => "error".to_owned(),
            Err(WebhookError::TooLarge { .. }) => "too_large".to_owned(),
            Err(WebhookError::Redirect { status, .. }) => status.to_string(),
        };
        metrics::counter!("opendps_webhook_calls_total", "status" => status.clone()).increment(1);
        metrics::histogram!("opendps_webhook_call_duration_seconds", "status" => status)
            .record(latency.as_secs_f64());
        tracing::info!(
            registration_id = %op.registration_id,
            webhook = webhook::loggable_url(url),
            status = reply.as_ref().map(|r| r.status).unwrap_or(0),
            "allocation webhook answered"
        );
        let trace = op.trace.get_or_insert_with(|| AllocationTrace {
            webhook_url: webhook::loggable_url(url).to_owned(),
            ..AllocationTrace::default()
        });
        trace
            .attempts
            .push(TraceAttempt::of(&reply, called_at, latency));
        trace.request = request;
        match webhook::judge(reply, &names) {
            Verdict::Allocate(response) => {
                let chosen = response
                    .iot_hub_host_name
                    .as_deref()
                    .unwrap_or_default()
                    .trim();
                let hub = offered
                    .iter()
                    .copied()
                    .find(|h| h.host_name.eq_ignore_ascii_case(chosen))
                    .ok_or_else(|| Failure::Final {
                        code: CUSTOM_ALLOCATION_FAILED,
                        message: format!("the webhook chose '{chosen}'"),
                    })?;
                Ok((hub, response.initial_twin, response.payload))
            }
            Verdict::Fail { code, message } => Err(Failure::Final { code, message }),
            Verdict::Retry(reason) => Err(Failure::WebhookRetry(reason)),
        }
    }
}
