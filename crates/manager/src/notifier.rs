//! The notifier: carries "new entries in task X's log", "deployment Y changed" and "an event
//! for task Z" between the nodes of a cluster. In-process with SQLite (one node: nothing to
//! carry), PostgreSQL `LISTEN/NOTIFY` with PostgreSQL.
//!
//! Invariant: a note is a hint, never the truth: whoever gets one reads the store, and whoever
//! may have missed some (a lost connection, a full channel) gets [`Note::Lost`] and reads the
//! store again. A note about a task's log is sent inside the transaction that commits the
//! entries, so it is delivered exactly when they are committed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

use crate::{Error, EventKind, TaskEvent};

/// The longest payload PostgreSQL's `NOTIFY` carries is 8000 bytes; an entry whose note would
/// be longer goes without its data, and the receivers read it from the store.
const MAX_PAYLOAD: usize = 7900;

/// Notes a slow receiver may have waiting before it gets [`Note::Lost`].
const CAPACITY: usize = 4096;

/// What one node tells the others.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub(crate) enum Note {
    /// An entry committed to a task's log; `data` is left out (`None`) when it was too large.
    #[serde(rename = "e")]
    Entry {
        t: String,
        s: u64,
        a: u32,
        e: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        d: Option<Value>,
    },
    /// A deployment was created, reloaded or deleted: its stored file is the truth.
    #[serde(rename = "d")]
    Deployment { name: String },
    /// A human-in-the-loop event for a task that runs on node `to`.
    #[serde(rename = "h")]
    TaskEvent {
        to: String,
        deployment: String,
        task: String,
        data: Value,
    },
    /// Task `task`, which runs on node `to`, was cancelled: that node stops it.
    #[serde(rename = "x")]
    Cancel { to: String, task: String },
    /// Notes may have been missed: read the store again.
    #[serde(skip)]
    Lost,
}

/// A note with the node that sent it.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    n: String,
    #[serde(flatten)]
    note: Note,
}

impl Note {
    /// The note of a committed entry.
    pub(crate) fn entry(event: &TaskEvent) -> Self {
        Self::Entry {
            t: event.task_id.clone(),
            s: event.seq,
            a: event.attempt,
            e: event.kind.as_str().to_owned(),
            d: Some(event.data.clone()),
        }
    }

    /// The entry a note carries, when it carries it whole.
    pub(crate) fn event(&self) -> Option<TaskEvent> {
        match self {
            Self::Entry {
                t,
                s,
                a,
                e,
                d: Some(data),
            } => Some(TaskEvent {
                task_id: t.clone(),
                seq: *s,
                kind: EventKind::parse(e),
                attempt: *a,
                data: data.clone(),
            }),
            _ => None,
        }
    }
}

/// Encodes `note` from node `node` for `NOTIFY`, leaving an entry's data out when the whole
/// would be too long.
pub(crate) fn encode(node: &str, note: &Note) -> String {
    let envelope = Envelope {
        n: node.to_owned(),
        note: note.clone(),
    };
    let text = serde_json::to_string(&envelope).unwrap_or_default();
    if text.len() <= MAX_PAYLOAD {
        return text;
    }
    match note {
        Note::Entry { t, s, a, e, .. } => serde_json::to_string(&Envelope {
            n: node.to_owned(),
            note: Note::Entry {
                t: t.clone(),
                s: *s,
                a: *a,
                e: e.clone(),
                d: None,
            },
        })
        .unwrap_or_default(),
        // Other notes are small (a name, an id); a human-in-the-loop event's data may not be,
        // and is refused by `publish`.
        _ => text,
    }
}

/// The channel of a store's notes: one per schema (one cluster per schema).
pub(crate) fn channel(schema: &str) -> String {
    let mut channel = format!("deployd_{schema}");
    channel.truncate(63);
    channel
}

/// The notifier of one node.
pub(crate) struct Notifier {
    node: Arc<str>,
    /// Entries of task logs (many: one per event of every task).
    entries: broadcast::Sender<Arc<Note>>,
    /// The other notes (deployments, human-in-the-loop events): few, and never crowded out by
    /// entries.
    notes: broadcast::Sender<Arc<Note>>,
    postgres: Option<(PgPool, String)>,
}

impl Notifier {
    /// The in-process notifier of a node alone.
    pub(crate) fn local(node: &str) -> Self {
        Self {
            node: Arc::from(node),
            entries: broadcast::channel(CAPACITY).0,
            notes: broadcast::channel(CAPACITY).0,
            postgres: None,
        }
    }

    /// The notifier of a node of the cluster whose store is the PostgreSQL database `pool`:
    /// listens on `channel` from now on (a listener that loses its connection reconnects
    /// and hands out [`Note::Lost`]).
    pub(crate) async fn postgres(node: &str, pool: PgPool, channel: String) -> Result<Self, Error> {
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|err| Error::Store(format!("cannot listen for the cluster's notes: {err}")))?;
        listener
            .listen(&channel)
            .await
            .map_err(|err| Error::Store(format!("cannot listen for the cluster's notes: {err}")))?;
        let notes = broadcast::channel(CAPACITY).0;
        let entries = broadcast::channel(CAPACITY).0;
        let node: Arc<str> = Arc::from(node);
        {
            let notes = notes.clone();
            let entries = entries.clone();
            let node = Arc::clone(&node);
            let pool = pool.clone();
            tokio::spawn(async move {
                loop {
                    match listener.try_recv().await {
                        Ok(Some(notification)) => {
                            let Ok(envelope) =
                                serde_json::from_str::<Envelope>(notification.payload())
                            else {
                                tracing::warn!("a cluster note that is not deployd's was ignored");
                                continue;
                            };
                            if *envelope.n == *node {
                                continue;
                            }
                            let channel = match envelope.note {
                                Note::Entry { .. } => &entries,
                                _ => &notes,
                            };
                            let _ = channel.send(Arc::new(envelope.note));
                            // Nobody holds the notifier any more (the Manager is gone).
                            if Arc::strong_count(&node) == 1 {
                                return;
                            }
                        }
                        Ok(None) => {
                            tracing::warn!(
                                "lost the connection that carries the cluster's notes; reconnecting"
                            );
                            let _ = notes.send(Arc::new(Note::Lost));
                            let _ = entries.send(Arc::new(Note::Lost));
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot receive the cluster's notes; retrying");
                            let _ = notes.send(Arc::new(Note::Lost));
                            let _ = entries.send(Arc::new(Note::Lost));
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                    if pool.is_closed() {
                        return;
                    }
                }
            });
        }
        Ok(Self {
            node,
            entries,
            notes,
            postgres: Some((pool, channel)),
        })
    }

    /// Whether notes go to other nodes.
    pub(crate) fn is_shared(&self) -> bool {
        self.postgres.is_some()
    }

    /// Notes from the other nodes but entries, from now on. A receiver that lags gets
    /// `RecvError::Lagged`: it missed some and reads the store again.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Note>> {
        self.notes.subscribe()
    }

    /// The entries other nodes commit (and [`Note::Lost`]), from now on.
    pub(crate) fn subscribe_entries(&self) -> broadcast::Receiver<Arc<Note>> {
        self.entries.subscribe()
    }

    /// Tells the other nodes `note`.
    pub(crate) async fn publish(&self, note: &Note) -> Result<(), Error> {
        let Some((pool, channel)) = &self.postgres else {
            return Ok(());
        };
        let payload = encode(&self.node, note);
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::BadRequest(format!(
                "the event is {} bytes encoded; an event for a task on another node of the \
                 cluster may be at most {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(pool)
            .await
            .map_err(|err| Error::Unavailable(format!("cannot notify the cluster: {err}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_entry_too_large_for_a_note_goes_without_its_data() {
        let event = TaskEvent {
            task_id: "t".into(),
            seq: 3,
            kind: EventKind::Event,
            attempt: 1,
            data: json!({"text": "x".repeat(10_000)}),
        };
        let text = encode("n1", &Note::entry(&event));
        assert!(text.len() <= MAX_PAYLOAD);
        let envelope: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(envelope.n, "n1");
        assert!(
            envelope.note.event().is_none(),
            "read from the store instead"
        );
        let small = TaskEvent {
            data: json!("hi"),
            ..event
        };
        let envelope: Envelope = serde_json::from_str(&encode("n1", &Note::entry(&small))).unwrap();
        assert_eq!(envelope.note.event(), Some(small));
        let note = Note::Deployment { name: "d".into() };
        let envelope: Envelope = serde_json::from_str(&encode("n2", &note)).unwrap();
        assert_eq!(envelope.note, note);
    }
}
