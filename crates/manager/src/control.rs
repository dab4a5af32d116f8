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
        let event = self
            .store
            .append_event(task_id, EventKind::Event, data)
            .await?;
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::TaskStatus;

    async fn control() -> (tempfile::TempDir, Control, TaskInfo) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
        store.create_session("s", "d").await.unwrap();
        let task = TaskInfo {
            id: "t".into(),
            deployment: "d".into(),
            service: "svc".into(),
            session_id: "s".into(),
            input: json!({"a": 1}),
            status: TaskStatus::Queued,
            attempt: 0,
            result: None,
            error: None,
        };
        store.insert_task(&task).await.unwrap();
        (dir, Control::new(store), task)
    }

    async fn collect(mut rx: mpsc::Receiver<TaskEvent>) -> Vec<(u64, EventKind, Value)> {
        let mut seen = Vec::new();
        while let Some(event) = rx.recv().await {
            seen.push((event.seq, event.kind, event.data));
        }
        seen
    }

    #[tokio::test]
    async fn a_follower_sees_stored_then_live_entries_in_order() {
        let (_dir, control, task) = control().await;
        control.event("t", json!(1)).await.unwrap();
        let follower = tokio::spawn(collect(control.follow("t".into(), 0)));
        control.event("t", json!(2)).await.unwrap();
        control
            .finish(&task, Ok(json!("done")), Some(json!({"n": 1})))
            .await
            .unwrap();
        assert_eq!(
            follower.await.unwrap(),
            [
                (1, EventKind::Event, json!(1)),
                (2, EventKind::Event, json!(2)),
                (3, EventKind::Result, json!("done")),
            ]
        );
        let stored = control.store().task("t").await.unwrap().unwrap();
        assert_eq!(stored.status, TaskStatus::Succeeded);
        assert_eq!(stored.result, Some(json!("done")));
        let (_, state) = control.store().session("s").await.unwrap().unwrap();
        assert_eq!(state, Some(json!({"n": 1})));
    }

    #[tokio::test]
    async fn a_follower_resumes_after_the_last_entry_it_saw() {
        let (_dir, control, task) = control().await;
        for n in 1..=3 {
            control.event("t", json!(n)).await.unwrap();
        }
        control
            .finish(&task, Err("failed".into()), None)
            .await
            .unwrap();
        let seen = collect(control.follow("t".into(), 2)).await;
        assert_eq!(
            seen,
            [
                (3, EventKind::Event, json!(3)),
                (4, EventKind::Error, json!("failed")),
            ]
        );
        let stored = control.store().task("t").await.unwrap().unwrap();
        assert_eq!(stored.status, TaskStatus::Failed);
        assert_eq!(stored.error.as_deref(), Some("failed"));
    }

    #[tokio::test]
    async fn a_lagging_follower_catches_up_from_the_store() {
        let (_dir, control, task) = control().await;
        let rx = control.follow("t".into(), 0);
        // More entries than the bus holds, before the follower reads any.
        for n in 0..(BUS_CAPACITY + 10) {
            control.event("t", json!(n)).await.unwrap();
        }
        control.finish(&task, Ok(json!("end")), None).await.unwrap();
        let seen = collect(rx).await;
        assert_eq!(seen.len(), BUS_CAPACITY + 11);
        assert!(
            seen.iter()
                .enumerate()
                .all(|(i, (seq, _, _))| *seq == i as u64 + 1)
        );
    }

    #[tokio::test]
    async fn closing_ends_followers() {
        let (_dir, control, _task) = control().await;
        let rx = control.follow("t".into(), 0);
        control.close().await;
        assert!(collect(rx).await.is_empty());
    }
}
