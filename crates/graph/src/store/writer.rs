//! The write path of the SQL backends: one task that takes the writes of every caller and
//! commits them in batches (group commit), so concurrent runs share transactions and syncs.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{Durability, MAX_BATCH};
use crate::Error;
use crate::clock::Timestamp;
use crate::snapshot::{Lease, RunId, Snapshot, SnapshotId, Transition};

/// A write.
#[derive(Debug)]
pub(crate) enum Op {
    Insert(Snapshot),
    Transition(SnapshotId, Transition),
    Claim(Option<RunId>, Lease),
    Expire(Timestamp),
}

/// What a write did.
#[derive(Debug)]
pub(crate) enum Done {
    Inserted(bool),
    Transitioned,
    Claimed(Option<Box<Snapshot>>),
    Expired(Vec<SnapshotId>),
}

/// Runs writes against a database.
#[async_trait]
pub(crate) trait Batch: Send + Sync + 'static {
    /// Runs `ops` in one transaction. An op refused by the lifecycle rules gets its error and
    /// writes nothing; an error of the database fails the whole batch (rolled back).
    async fn run(&self, ops: &[Op]) -> Result<Vec<Result<Done, Error>>, Error>;
}

type Request = (Op, oneshot::Sender<Result<Done, Error>>);

/// The handle to the writer task; the task ends when every handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    tx: mpsc::UnboundedSender<Request>,
}

impl Writer {
    pub(crate) fn spawn(batch: Arc<dyn Batch>, durability: Durability) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(batch, rx, durability));
        Writer { tx }
    }

    pub(crate) async fn submit(&self, op: Op) -> Result<Done, Error> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((op, done))
            .map_err(|_| Error::Closed("the writer task stopped".to_owned()))?;
        wait.await
            .map_err(|_| Error::Closed("the writer task stopped".to_owned()))?
    }
}

async fn write_loop(
    batch: Arc<dyn Batch>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    durability: Durability,
) {
    let mut last_batch = 1;
    while let Some(first) = rx.recv().await {
        let mut requests = vec![first];
        while requests.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        // Wait for more only when commits are concurrent: a lone sequential run would just
        // pay the window on every step.
        if let Some(window) = durability.window()
            && (last_batch > 1 || requests.len() > 1)
        {
            let deadline = tokio::time::Instant::now() + window;
            while requests.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(request)) => requests.push(request),
                    _ => break,
                }
            }
        }
        last_batch = requests.len();
        let (ops, replies): (Vec<Op>, Vec<_>) = requests.into_iter().unzip();
        match batch.run(&ops).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(err) if ops.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(err));
                }
            }
            Err(_) => {
                // One op failed the batch (a conflict, a deadlock): run each alone so only
                // that one fails.
                for (op, reply) in ops.into_iter().zip(replies) {
                    let result = match batch.run(std::slice::from_ref(&op)).await {
                        Ok(mut results) => results
                            .pop()
                            .unwrap_or_else(|| Err(Error::Storage("no result".to_owned()))),
                        Err(err) => Err(err),
                    };
                    let _ = reply.send(result);
                }
            }
        }
    }
}
