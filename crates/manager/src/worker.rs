//! A worker consumes a service's task topic and forwards each task over the service protocol.
//!
//! Invariant: a task's message is acknowledged only after the task's outcome is committed;
//! whatever happens before that (the service dies, deployd dies) leads to a redelivery.
//!
//! Invariant: an outcome the service returned is never thrown away because a commit failed:
//! the commit is retried (see `Control`), and the service is not called again.
//!
//! Invariant: a worker told to stop drains: it takes no new delivery, lets the tasks in flight
//! finish until the drain deadline, and only then cuts off what is left, which goes back to
//! `queued` (and to the queue) without counting as a failed attempt.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployd_queue::{Consumer, Delivery};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::control::Control;
use crate::protocol::{self, CallError, Outcome, TaskRequest};
use crate::supervisor::stopped;
use crate::{Phase, ServiceStatus, TaskStatus};

/// After this many attempts that broke off, a task fails for good.
pub(crate) const MAX_ATTEMPTS: u32 = 10;

pub(crate) struct WorkerContext {
    pub(crate) service: String,
    pub(crate) control: Arc<Control>,
    pub(crate) service_state: watch::Receiver<ServiceStatus>,
    pub(crate) max_concurrency: usize,
    /// How long one task may run.
    pub(crate) timeout: Option<Duration>,
    /// How long a service may take to start answering a task (its response head).
    pub(crate) head_timeout: Duration,
    /// How long the tasks in flight may take to finish once the worker is told to stop.
    pub(crate) drain_timeout: Duration,
}

/// Runs until `stop` turns true; then drains (see the module's invariant) and returns.
pub(crate) async fn run(
    context: WorkerContext,
    mut consumer: Box<dyn Consumer>,
    mut stop: watch::Receiver<bool>,
) {
    let context = Arc::new(context);
    let client = protocol::client();
    let permits = Arc::new(Semaphore::new(context.max_concurrency.max(1)));
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut running = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            () = stopped(&mut stop) => break,
        };
        let Ok(permit) = permit else { break };
        let mut state = context.service_state.clone();
        let port = tokio::select! {
            ready = state.wait_for(|s| s.phase == Phase::Ready) => match ready {
                Ok(status) => status.port,
                Err(_) => break,
            },
            () = stopped(&mut stop) => break,
        };
        let delivery = tokio::select! {
            delivery = consumer.next() => delivery,
            () = stopped(&mut stop) => break,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(deployd_queue::Error::Closed) => break,
            Err(err) => {
                tracing::warn!(service = %context.service, error = %err, "cannot receive a task");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let context = Arc::clone(&context);
        let client = client.clone();
        let in_flight = Arc::clone(&in_flight);
        running.spawn(async move {
            handle(&context, &client, port, delivery, &in_flight).await;
            drop(permit);
        });
        // Reap finished handlers so the set does not grow.
        while running.try_join_next().is_some() {}
    }
    // Drain: no new delivery; the tasks in flight finish until the deadline. The consumer
    // stays open meanwhile: a broker backend settles their deliveries through it.
    let drained = tokio::time::timeout(context.drain_timeout, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    drop(consumer);
    if drained.is_err() {
        // Read before the handlers are aborted: each one leaves the set as it is dropped.
        let cut: Vec<String> = lock(&in_flight).iter().cloned().collect();
        running.shutdown().await;
        tracing::warn!(
            service = %context.service,
            tasks = cut.len(),
            "tasks still running at the drain deadline were cut off; they run again later"
        );
        for task in cut {
            if let Err(err) = context.control.store().requeue(&task).await {
                tracing::warn!(task = %task, error = %err, "cannot mark a cut-off task queued");
            }
        }
    }
}

fn lock(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes a task from the in-flight set when its handler ends (or is cut off before).
struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    task: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.task);
    }
}

async fn handle(
    context: &WorkerContext,
    client: &reqwest::Client,
    port: u16,
    delivery: Delivery,
    in_flight: &Mutex<HashSet<String>>,
) {
    let control = &context.control;
    let store = control.store();
    let task_id = String::from_utf8_lossy(&delivery.message.payload).into_owned();
    let attempt = delivery.message.attempt;
    let Some(claim) = control.claim(&task_id) else {
        // Another delivery of the same task is running here; it acks or redelivers the task.
        tracing::debug!(task = %task_id, "duplicate delivery of a running task");
        let _ = delivery.ack().await;
        return;
    };
    // After the claim: a delivery that ran meanwhile has committed its outcome. A task this
    // server created a moment ago in a new session is known (no state yet): its running mark is
    // queued, not waited for. Any other: one batched write marks it running and gives it back
    // with its session's state.
    let fresh = match control.take_fresh(&task_id) {
        Some(task) => match control.mark_running(&task_id, attempt).await {
            Ok(()) => Some((task, None)),
            Err(err) => {
                tracing::warn!(task = %task_id, error = %err, "cannot mark task running");
                let _ = delivery.nack(Some(Duration::from_secs(1))).await;
                return;
            }
        },
        None => None,
    };
    let started = match fresh {
        Some(fresh) => Ok(Some(fresh)),
        None => control.start(&task_id, attempt).await,
    };
    let (mut task, state) = match started {
        Ok(Some(started)) => started,
        Ok(None) => {
            // Deleted, finished by an earlier delivery, or failed while it waited: nothing to
            // do.
            let _ = delivery.ack().await;
            return;
        }
        Err(err) => {
            tracing::warn!(task = %task_id, error = %err, "cannot mark task running");
            let _ = delivery.nack(Some(Duration::from_secs(1))).await;
            return;
        }
    };
    task.attempt = attempt;
    claim.calls(port);
    lock(in_flight).insert(task.id.clone());
    let _in_flight = InFlight {
        set: in_flight,
        task: task.id.clone(),
    };
    let request = TaskRequest {
        task_id: &task.id,
        session_id: &task.session_id,
        attempt,
        input: &task.input,
        state: state.as_ref(),
    };
    let trace = crate::trace::TaskTrace::start(
        &delivery.message.headers,
        &task.id,
        &context.service,
        attempt,
    );
    let traceparent = trace
        .as_ref()
        .and_then(crate::trace::TaskTrace::traceparent);
    let call = protocol::call(
        client,
        port,
        context.head_timeout,
        &request,
        traceparent.as_deref(),
        |data| control.event(&task.id, attempt, data),
    );
    let limited = async {
        match context.timeout {
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(called) => called,
                Err(_) => Ok(Outcome::Error(format!(
                    "the task timed out after {limit:?}"
                ))),
            },
            None => call.await,
        }
    };
    tokio::pin!(limited);
    let cancelled = claim.cancelled();
    let called = tokio::select! {
        called = &mut limited => called,
        () = cancelled.notified() => {
            // Cancelled: its outcome is stored. The service was asked to stop; its answer
            // gets a grace to end, then the call is abandoned (its connection closed).
            if tokio::time::timeout(crate::CANCEL_GRACE, &mut limited).await.is_err() {
                tracing::info!(task = %task.id, "abandoned the call of a cancelled task");
            }
            if let Some(trace) = trace {
                trace.end(Some("cancelled"));
            }
            let _ = delivery.ack().await;
            return;
        }
    };
    if let Some(trace) = trace {
        let error = match &called {
            Ok(Outcome::Error(message)) => Some(message.clone()),
            Err(err) => Some(err.to_string()),
            Ok(Outcome::Result { .. }) => None,
        };
        trace.end(error.as_deref());
    }
    let (outcome, state) = match called {
        Ok(Outcome::Result { data, state }) => (Ok(data), state),
        Ok(Outcome::Error(message)) => (Err(message), None),
        Err(CallError::Protocol(message)) => (
            Err(format!("the service broke the protocol: {message}")),
            None,
        ),
        Err(CallError::Sink(err)) => {
            // The task log's writer stopped: deployd is shutting down. The task runs again
            // after the restart.
            tracing::warn!(task = %task.id, error = %err, "cannot record the task's events");
            let _ = delivery.nack(None).await;
            return;
        }
        Err(err) if attempt >= MAX_ATTEMPTS => (
            Err(format!("gave up after {attempt} attempts: {err}")),
            None,
        ),
        Err(err) => {
            tracing::warn!(task = %task.id, attempt, error = %err, "task attempt failed; will retry");
            let _ = store
                .set_task_status(&task.id, TaskStatus::Queued, attempt)
                .await;
            let delay = Duration::from_millis(200 * u64::from(attempt)).min(Duration::from_secs(5));
            let _ = delivery.nack(Some(delay)).await;
            return;
        }
    };
    // `finish` retries a failing commit until it succeeds; it fails only when deployd shuts
    // down, and then the message is not acknowledged: the task runs again after the restart.
    match control.finish(&task, outcome, state).await {
        Ok(()) => {
            if let Err(err) = delivery.ack().await {
                tracing::warn!(task = %task.id, error = %err, "cannot acknowledge task");
            }
        }
        Err(err) => {
            tracing::error!(task = %task.id, error = %err, "cannot record the task's outcome");
            let _ = delivery.nack(Some(Duration::from_secs(1))).await;
        }
    }
}
