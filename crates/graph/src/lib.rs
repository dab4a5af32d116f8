//! A typed graph runtime whose runs survive crashes.
//!
//! A workflow is a graph of steps. Each step is a *node*: a Rust type that carries its inputs
//! and whose [`run`](Node::run) returns the next node or the end. The nodes a node may lead to
//! are part of its type, so an undeclared edge does not compile. A [`Runner`] runs a graph and
//! records every step as a [`Snapshot`] in a [`Store`]; finishing a node and recording what
//! comes next is one atomic commit, so after a crash [`Runner::resume`] continues where the run
//! stopped and no committed node runs again.
//!
//! This crate does not know HTTP, queues or deployments: the server streams a run's events and
//! the manager decides which worker runs what.
//!
//! # Five-minute tour
//!
//! ```
//! use deployd_graph::{graph, store::MemoryStore, Ctx, End, Node, NodeError, Outcome, Runner};
//! use serde::{Deserialize, Serialize};
//!
//! // The state every node reads and changes; persisted with each step.
//! #[derive(Clone, Debug, Default, Serialize, Deserialize)]
//! struct Count {
//!     n: u64,
//! }
//!
//! // Nodes are types carrying their inputs.
//! #[derive(Serialize, Deserialize)]
//! struct Increment {
//!     by: u64,
//! }
//! #[derive(Serialize, Deserialize)]
//! struct Check {
//!     target: u64,
//! }
//!
//! // The graph: state, output, and for each node its successor enum and edges.
//! graph! {
//!     Counter {
//!         state: Count,
//!         output: u64,
//!         event: String,
//!         nodes {
//!             /// Adds `by` to the count.
//!             Increment => IncrementNext [Check],
//!             /// Loops until the target is reached.
//!             Check => CheckNext [Increment "again", End "done"],
//!         }
//!     }
//! }
//!
//! impl Node<Counter> for Increment {
//!     async fn run(self, ctx: Ctx<'_, Counter>) -> Result<IncrementNext, NodeError> {
//!         ctx.state.n += self.by;
//!         ctx.emit(format!("now {}", ctx.state.n));
//!         Ok(Check { target: 3 }.into()) // only `Check` compiles here
//!     }
//! }
//!
//! impl Node<Counter> for Check {
//!     async fn run(self, ctx: Ctx<'_, Counter>) -> Result<CheckNext, NodeError> {
//!         Ok(if ctx.state.n < self.target {
//!             Increment { by: 1 }.into()
//!         } else {
//!             End(ctx.state.n).into()
//!         })
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let runner = Runner::<Counter>::new(MemoryStore::full_history(), ());
//! let done = runner.run(Increment { by: 1 }, Count::default()).await?;
//! assert!(matches!(done.outcome, Outcome::End(3)));
//! assert_eq!(done.state.n, 3);
//!
//! // Every step is in the history, in pydantic_graph's JSON layout.
//! let history = runner.history(&done.run_id).await?;
//! assert_eq!(history.len(), 7); // Increment, Check, Increment, Check, Increment, Check, end
//! println!("{}", deployd_graph::mermaid::run::<Counter>(&history));
//! # Ok::<_, deployd_graph::Error>(()) }).unwrap();
//! ```
//!
//! - Step by step: [`Runner::start`] returns a [`GraphRun`]; [`GraphRun::next`] runs one node,
//!   [`GraphRun::next_node`] shows what runs next and [`GraphRun::replace_next`] swaps it.
//! - After a crash: [`Runner::resume`] with the run's id. A node whose worker died is retried
//!   once its lease expires, with `attempt + 1`.
//! - Human in the loop: a node declared with `asks Request => Answer` returns
//!   `Interrupt(request)`; the run ends with [`Outcome::Interrupted`], and
//!   [`Runner::resume_with`] continues it with the answer, which the node reads with
//!   [`Ctx::answer`].
//! - Events: [`Ctx::emit`] sends to the channel given to [`Runner::events`].
//! - Worker pools: [`Runner::submit`] records a run without running it; any runner sharing the
//!   store takes it with [`Runner::run_next`] (on Postgres, from any machine).
//! - Tests: inject a [`ManualClock`] and [`SequentialIds`] for reproducible ids and times.
//! - Stores: [`store::MemoryStore`], [`store::FileStore`], [`store::SqliteStore`],
//!   [`store::PostgresStore`], each with a [`store::Durability`]. A store of your own implements
//!   [`Store`]: each method answers at once with [`StoreFuture::ready`] or wraps its async code
//!   in [`StoreFuture::new`].
//! - Cost: [`Runner::run`] commits once per step (the successor is recorded `running` in the
//!   commit that completes its predecessor); [`GraphRun::next`] twice (the successor waits
//!   `pending` for the caller). Ids, leases and owners are shared text, cheap to clone.
//! - Diagrams: [`mermaid::graph`] and [`mermaid::run`].

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
#[doc(hidden)]
pub mod fault;
mod macros;
pub mod mermaid;
mod node;
mod runner;
#[cfg(feature = "service")]
pub mod service;
pub mod snapshot;
pub mod store;

pub use clock::{Clock, IdSource, ManualClock, RandomIds, SequentialIds, SystemClock, Timestamp};
#[doc(hidden)]
pub use node::{__private, NodeFuture};
pub use node::{
    BoxNode, Ctx, DynNode, EdgeSpec, EdgeTarget, Emitted, End, Graph, GraphSpec, NoAnswer, Node,
    NodeDef, NodeError, NodeSpec, Step, Successors,
};
pub use runner::{Finished, GraphRun, Interrupt, Outcome, Runner};
pub use snapshot::{Json, Kind, Lease, RunId, Snapshot, SnapshotId, Status, Transition};
pub use store::{Durability, Store, StoreFuture};

/// What can go wrong, in a form a caller can match.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No such run, snapshot or store.
    #[error("{what} {id} not found")]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The snapshot's status does not allow this move.
    #[error("snapshot {id} cannot go from {from} to {to}")]
    IllegalTransition {
        /// The snapshot.
        id: SnapshotId,
        /// Its status.
        from: Status,
        /// The status asked for.
        to: Status,
    },
    /// Someone else holds it, or got there first.
    #[error("conflict on {id}: {reason}")]
    Conflict {
        /// The snapshot or run.
        id: String,
        /// What happened.
        reason: String,
    },
    /// The run is not waiting on this interrupt.
    #[error("run {run_id} is not waiting on interrupt {interrupt_id}")]
    UnknownInterrupt {
        /// The run.
        run_id: RunId,
        /// The interrupt given.
        interrupt_id: SnapshotId,
    },
    /// The interrupt has been answered already.
    #[error("interrupt {interrupt_id} was already answered")]
    AlreadyAnswered {
        /// The interrupt.
        interrupt_id: SnapshotId,
    },
    /// The answer does not deserialize into the node's answer type.
    #[error("answer does not fit node {node_id}: {message}")]
    InvalidAnswer {
        /// The node that asked.
        node_id: String,
        /// Why it does not fit.
        message: String,
    },
    /// A node returned an error or panicked; the run can be retried.
    #[error("node {node_id} of run {run_id} failed: {message}")]
    NodeFailed {
        /// The run.
        run_id: RunId,
        /// The node.
        node_id: String,
        /// Its snapshot, now `error`.
        snapshot_id: SnapshotId,
        /// The error or panic message.
        message: String,
    },
    /// A snapshot names a node the graph does not have.
    #[error("graph {graph} has no node {node_id}")]
    UnknownNode {
        /// The graph.
        graph: &'static str,
        /// The node id.
        node_id: String,
    },
    /// A node, state, output, request or answer did not (de)serialize.
    #[error("cannot encode or decode {what}: {source}")]
    Codec {
        /// What it was.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A file store's file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the file store's lock.
    #[error("{path} is locked by another process")]
    Locked {
        /// The lock file.
        path: std::path::PathBuf,
    },
    /// The database failed, or what it holds is not what this crate wrote.
    #[error("storage: {0}")]
    Storage(String),
    /// The store was shut down (or its writer died after an error).
    #[error("the store is closed: {0}")]
    Closed(String),
}
