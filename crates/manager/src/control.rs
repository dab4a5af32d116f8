//! The control plane: the store plus the live fan-out of task events.
//!
//! Invariant: every entry is committed to the store before it is broadcast.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};

use crate::store::Store;
use crate::{Error, EventKind, TaskEvent, TaskInfo};

/// Capacity of the live event bus; a follower that falls further behind catches up from the
/// store.
const BUS_CAPACITY: usize = 4096;

pub(crate) struct Control {
    store: Store,
    bus: broadcast::Sender<Arc<TaskEvent>>,
    closed: watch::Sender<bool>,
}

impl Control {
    pub(crate) fn new(store: Store) -> Self {
        let (bus, _) = broadcast::channel(BUS_CAPACITY);
        let (closed, _) = watch::channel(false);
        Self { store, bus, closed }
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.bus.subscribe()
    }

    /// Appends a streamed event to the task's log.
    pub(crate) async fn event(&self, task_id: &str, data: Value) -> Result<(), Error> {
        let event = self.store.append_event(task_id, EventKind::Event, data).await?;
        let _ = self.bus.send(Arc::new(event));
        Ok(())
    }

    /// Commits the task's outcome.
    pub(crate) async fn finish(
        &self,
        task: &TaskInfo,
        outcome: Result<Value, String>,
        state: Option<Value>,
    ) -> Result<(), Error> {
        let event = self.store.finish_task(task, outcome, state).await?;
        let _ = self.bus.send(Arc::new(event));
        Ok(())
    }

    /// Follows a task's log from the entry after `after` until its terminal entry, the
    /// receiver being dropped, or shutdown.
    pub(crate) fn follow(&self, task_id: String, after: u64) -> mpsc::Receiver<TaskEvent> {
        let (tx, rx) = mpsc::channel(64);
        let mut live = self.bus.subscribe();
        let store = self.store.clone();
        let mut closed = self.closed.subscribe();
        tokio::spawn(async move {
            let mut last = after;
            loop {
                // Catch up from the store: everything broadcast so far is in it.
                let stored = match store.events_after(&task_id, last).await {
                    Ok(events) => events,
                    Err(err) => {
                        tracing::warn!(task = %task_id, error = %err, "cannot read task events");
                        return;
                    }
                };
                for event in stored {
                    last = event.seq;
                    let terminal = event.kind.is_terminal();
                    if tx.send(event).await.is_err() || terminal {
                        return;
                    }
                }
                // Then live, until a gap or a lag sends us back to the store.
                loop {
                    let received = tokio::select! {
                        received = live.recv() => received,
                        _ = closed.wait_for(|closed| *closed) => return,
                        () = tx.closed() => return,
                    };
                    match received {
                        Ok(event) if event.task_id != task_id || event.seq <= last => {}
                        Ok(event) if event.seq == last + 1 => {
                            last = event.seq;
                            let terminal = event.kind.is_terminal();
                            if tx.send(TaskEvent::clone(&event)).await.is_err() || terminal {
                                return;
                            }
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        rx
    }

    pub(crate) async fn close(&self) {
        let _ = self.closed.send(true);
        self.store.close().await;
    }
}
