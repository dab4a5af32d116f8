//! A worker consumes a service's task topic and forwards each task over the service protocol.
//!
//! Invariant: a task's message is acknowledged only after the task's outcome is committed;
//! whatever happens before that (the service dies, deployd dies) leads to a redelivery.

use std::sync::Arc;
use std::time::Duration;

use deployd_queue::{Consumer, Delivery};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::control::Control;
use crate::protocol::{self, CallError, Outcome, TaskRequest};
use crate::supervisor::stopped;
use crate::{Phase, ServiceStatus, TaskStatus};

/// After this many attempts that broke off, a task fails for good.
const MAX_ATTEMPTS: u32 = 10;

pub(crate) struct WorkerContext {
    pub(crate) service: String,
    pub(crate) control: Arc<Control>,
    pub(crate) service_state: watch::Receiver<ServiceStatus>,
    pub(crate) max_concurrency: usize,
    /// How long one task may run.
    pub(crate) timeout: Option<Duration>,
}

/// Runs until `stop` turns true; then drops what it holds, which the queue redelivers.
pub(crate) async fn run(
    context: WorkerContext,
    mut consumer: Box<dyn Consumer>,
    mut stop: watch::Receiver<bool>,
) {
    let context = Arc::new(context);
    let client = protocol::client();
    let permits = Arc::new(Semaphore::new(context.max_concurrency.max(1)));
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
        running.spawn(async move {
            handle(&context, &client, port, delivery).await;
            drop(permit);
        });
        // Reap finished handlers so the set does not grow.
        while running.try_join_next().is_some() {}
    }
    running.shutdown().await;
}

async fn handle(context: &WorkerContext, client: &reqwest::Client, port: u16, delivery: Delivery) {
    let control = &context.control;
    let store = control.store();
    let task_id = String::from_utf8_lossy(&delivery.message.payload).into_owned();
    let attempt = delivery.message.attempt;
    let Some(_claim) = control.claim(&task_id) else {
        // Another delivery of the same task is running here; it acks or redelivers the task.
        tracing::debug!(task = %task_id, "duplicate delivery of a running task");
        let _ = delivery.ack().await;
        return;
    };
    // Read after the claim: a delivery that ran meanwhile has committed its outcome.
    let task = match store.task(&task_id).await {
        Ok(Some(task)) if !task.status.is_finished() => task,
        Ok(_) => {
            // Deleted, or finished by an earlier delivery: nothing to do.
            let _ = delivery.ack().await;
            return;
        }
        Err(err) => {
            tracing::warn!(task = %task_id, error = %err, "cannot read task");
            let _ = delivery.nack(Some(Duration::from_secs(1))).await;
            return;
        }
    };
    let state = match store.session(&task.session_id).await {
        Ok(session) => session.and_then(|(_, state)| state),
        Err(err) => {
            tracing::warn!(task = %task_id, error = %err, "cannot read session");
            let _ = delivery.nack(Some(Duration::from_secs(1))).await;
            return;
        }
    };
    if let Err(err) = store
        .set_task_status(&task.id, TaskStatus::Running, attempt)
        .await
    {
        tracing::warn!(task = %task_id, error = %err, "cannot mark task running");
        let _ = delivery.nack(Some(Duration::from_secs(1))).await;
        return;
    }
    let request = TaskRequest {
        task_id: &task.id,
        session_id: &task.session_id,
        attempt,
        input: &task.input,
        state: state.as_ref(),
    };
    let call = protocol::call(client, port, &request, |data| control.event(&task.id, data));
    let called = match context.timeout {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(called) => called,
            Err(_) => Ok(Outcome::Error(format!(
                "the task timed out after {limit:?}"
            ))),
        },
        None => call.await,
    };
    let (outcome, state) = match called {
        Ok(Outcome::Result { data, state }) => (Ok(data), state),
        Ok(Outcome::Error(message)) => (Err(message), None),
        Err(CallError::Protocol(message)) => (
            Err(format!("the service broke the protocol: {message}")),
            None,
        ),
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
