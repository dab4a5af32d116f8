//! [`Runner`]: runs graphs, records every step, resumes runs.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{Instrument, warn};

use crate::clock::{Clock, IdSource, RandomIds, SystemClock, Timestamp};
use crate::node::{BoxNode, Ctx, DynNode, Emitted, Graph, Node, Step};
use crate::snapshot::{self, Json, Kind, Lease, RunId, Snapshot, SnapshotId, Status, Transition};
use crate::store::Store;
use crate::{Error, fault};

/// Runs graphs of type `G` against a [`Store`]. Cheap to clone.
///
/// Each runner is a worker with its own id ([`owner`](Self::owner)): the leases it takes carry
/// it, and a snapshot leased by a worker that stopped renewing is taken back once the lease
/// expires.
pub struct Runner<G: Graph> {
    store: Arc<dyn Store>,
    /// The store's [`keeps_values`](Store::keeps_values), asked once.
    keeps_values: bool,
    deps: Arc<G::Deps>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdSource>,
    owner: Arc<str>,
    lease: Duration,
    max_attempts: u32,
    events: Option<UnboundedSender<Emitted<G::Event>>>,
}

impl<G: Graph> Clone for Runner<G> {
    fn clone(&self) -> Self {
        Runner {
            store: self.store.clone(),
            keeps_values: self.keeps_values,
            deps: self.deps.clone(),
            clock: self.clock.clone(),
            ids: self.ids.clone(),
            owner: self.owner.clone(),
            lease: self.lease,
            max_attempts: self.max_attempts,
            events: self.events.clone(),
        }
    }
}

impl<G: Graph> fmt::Debug for Runner<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("graph", &G::NAME)
            .field("owner", &self.owner)
            .field("lease", &self.lease)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// How a run stopped.
#[derive(Debug)]
pub enum Outcome<O> {
    /// It ended with this output.
    End(O),
    /// It waits for an answer: [`Runner::resume_with`].
    Interrupted(Interrupt),
}

/// An interrupt a run waits on.
#[derive(Debug, Clone)]
pub struct Interrupt {
    /// Pass it to [`Runner::resume_with`].
    pub id: SnapshotId,
    /// The node that asked.
    pub node_id: String,
    /// What it asks, as JSON.
    pub request: Json,
}

impl Interrupt {
    /// The request as `T` (the node's declared request type).
    pub fn request<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_str(self.request.get()).map_err(|source| Error::Codec {
            what: "an interrupt's request",
            source,
        })
    }
}

/// A run that stopped: ended or interrupted.
#[derive(Debug)]
pub struct Finished<G: Graph> {
    /// The run.
    pub run_id: RunId,
    /// How it stopped.
    pub outcome: Outcome<G::Output>,
    /// The state at that point.
    pub state: G::State,
}

impl<G: Graph> Runner<G> {
    /// A runner on `store`, giving `deps` to every node. Its worker id is random, its lease
    /// 30 s, and a failed node is not retried.
    pub fn new(store: impl Store, deps: G::Deps) -> Self {
        Self::with_store(Arc::new(store), deps)
    }

    /// A runner on a store shared with other runners.
    pub fn with_store(store: Arc<dyn Store>, deps: G::Deps) -> Self {
        let ids: Arc<dyn IdSource> = Arc::new(RandomIds::new());
        // The random half of an id: its first digits are the source's start time.
        let owner = Arc::from(format!("worker-{}", &ids.next_hex()[16..28]));
        Runner {
            keeps_values: store.keeps_values(),
            store,
            deps: Arc::new(deps),
            clock: Arc::new(SystemClock),
            ids,
            owner,
            lease: Duration::from_secs(30),
            max_attempts: 1,
            events: None,
        }
    }

    /// Reads time from `clock` instead of the system's.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Takes ids from `ids` instead of random ones.
    pub fn ids(mut self, ids: Arc<dyn IdSource>) -> Self {
        self.ids = ids;
        self
    }

    /// Names this worker (the owner of its leases).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Arc::from(owner.into());
        self
    }

    /// How long a lease lasts; a running node's lease is renewed every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// How many times a node is tried before its run fails (1: no retry).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sends the events nodes emit to `events`.
    pub fn events(mut self, events: UnboundedSender<Emitted<G::Event>>) -> Self {
        self.events = Some(events);
        self
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.owner
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Runs `node` on `state` until the run ends or is interrupted.
    ///
    /// The run's first snapshot is recorded `running` under this worker's lease: nobody else
    /// knows the run yet, so there is nothing to claim, and the whole run costs one commit per
    /// step.
    pub async fn run<N: Node<G>>(&self, node: N, state: G::State) -> Result<Finished<G>, Error> {
        self.begin(node, state, Status::Running)
            .await?
            .finish()
            .await
    }

    /// Records a new run starting at `node`, leased by this worker (`pending`), for running
    /// step by step.
    pub async fn start<N: Node<G>>(&self, node: N, state: G::State) -> Result<GraphRun<G>, Error> {
        self.begin(node, state, Status::Pending).await
    }

    /// Runs the run `run_id`: starts it at `node` on `state` when the store has none of that
    /// id; otherwise continues it from its last committed step as [`resume`](Self::resume)
    /// does (a run that ended or waits returns at once, one leased by a live worker is an
    /// [`Error::Conflict`]). A task delivered again (`RunId::for_task`) so resumes the run its
    /// first delivery started, and no committed node runs again.
    pub async fn run_as<N: Node<G>>(
        &self,
        run_id: &RunId,
        node: N,
        state: G::State,
    ) -> Result<Finished<G>, Error> {
        if self.store.latest(run_id).await?.is_some() {
            return self.resume(run_id).await;
        }
        match self
            .begin_as(Some(run_id), node, state, Status::Running)
            .await
        {
            Ok(run) => run.finish().await,
            // Started meanwhile by another delivery.
            Err(Error::Conflict { .. }) => self.resume(run_id).await,
            Err(err) => Err(err),
        }
    }

    /// [`start`](Self::start) with the run's id given (see [`run_as`](Self::run_as)): a
    /// conflict when the store has a run of that id.
    pub async fn start_as<N: Node<G>>(
        &self,
        run_id: &RunId,
        node: N,
        state: G::State,
    ) -> Result<GraphRun<G>, Error> {
        if self.store.latest(run_id).await?.is_some() {
            return Err(Error::Conflict {
                id: run_id.to_string(),
                reason: "a run of this id exists".to_owned(),
            });
        }
        self.begin_as(Some(run_id), node, state, Status::Pending)
            .await
    }

    async fn begin<N: Node<G>>(
        &self,
        node: N,
        state: G::State,
        status: Status,
    ) -> Result<GraphRun<G>, Error> {
        self.begin_as(None, node, state, status).await
    }

    async fn begin_as<N: Node<G>>(
        &self,
        run_id: Option<&RunId>,
        node: N,
        state: G::State,
        status: Status,
    ) -> Result<GraphRun<G>, Error> {
        let now = self.clock.now();
        let mut first = self.first_snapshot(run_id, &node, &state, now)?;
        first.status = status;
        first.lease = Some(self.lease_from(now));
        if status == Status::Running {
            first.start_ts = Some(now);
        }
        if !self.store.insert(&first).await? {
            return Err(Error::Conflict {
                id: first.id.to_string(),
                reason: "a snapshot with this id exists".to_owned(),
            });
        }
        let mut run = GraphRun::new(
            self.clone(),
            first.run_id.clone(),
            state,
            Position::Ready {
                current: Current::of(&first),
                node: Box::new(node),
            },
        );
        run.next_start = first.start_ts;
        Ok(run)
    }

    /// Records a new run starting at `node`, runnable (`created`) but not claimed: any worker
    /// sharing the store picks it up with [`run_next`](Self::run_next).
    pub async fn submit<N: Node<G>>(&self, node: &N, state: &G::State) -> Result<RunId, Error> {
        let first = self.first_snapshot(None, node, state, self.clock.now())?;
        self.store.insert(&first).await?;
        Ok(first.run_id)
    }

    fn first_snapshot<N: Node<G>>(
        &self,
        run_id: Option<&RunId>,
        node: &N,
        state: &G::State,
        now: Timestamp,
    ) -> Result<Snapshot, Error> {
        Ok(Snapshot::fresh(
            run_id
                .cloned()
                .unwrap_or_else(|| RunId::from_hex(self.ids.next_id())),
            0,
            N::ID,
            self.ids.next_id(),
            node.to_json().map_err(|source| Error::Codec {
                what: "a node",
                source,
            })?,
            snapshot::encode("a state", state)?,
            now,
        ))
    }

    /// Continues a persisted run until it ends or is interrupted.
    ///
    /// A run that ended or waits returns at once; a run whose node failed returns
    /// [`Error::NodeFailed`] (see [`retry`](Self::retry)); a run leased by a live worker is an
    /// [`Error::Conflict`].
    pub async fn resume(&self, run_id: &RunId) -> Result<Finished<G>, Error> {
        self.open(run_id).await?.finish().await
    }

    /// Opens a persisted run for running step by step, claiming it if it is runnable.
    pub async fn open(&self, run_id: &RunId) -> Result<GraphRun<G>, Error> {
        let now = self.clock.now();
        self.store.expire_leases(now).await?;
        let latest = self
            .store
            .latest(run_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "run",
                id: run_id.to_string(),
            })?;
        let position = match (latest.kind, latest.status) {
            (Kind::End, _) => Position::Ended(decode_json("an output", &latest.node)?),
            (Kind::Node, Status::Created) => {
                let claimed = self
                    .store
                    .claim(Some(run_id), self.lease_from(now))
                    .await?
                    .ok_or_else(|| Error::Conflict {
                        id: run_id.to_string(),
                        reason: "another worker claimed it".to_owned(),
                    })?;
                let node = decode_node::<G>(&claimed)?;
                Position::Ready {
                    current: Current::of(&claimed),
                    node,
                }
            }
            (Kind::Node, Status::Pending)
                if latest.lease.as_ref().is_some_and(|l| l.owner == self.owner) =>
            {
                let node = decode_node::<G>(&latest)?;
                Position::Ready {
                    current: Current::of(&latest),
                    node,
                }
            }
            (Kind::Node, Status::Pending | Status::Running) => {
                let (owner, until) = latest
                    .lease
                    .as_ref()
                    .map(|l| (&*l.owner, l.until.to_string()))
                    .unwrap_or(("nobody", String::new()));
                return Err(Error::Conflict {
                    id: run_id.to_string(),
                    reason: format!("leased by {owner} until {until}"),
                });
            }
            (Kind::Node, Status::Waiting) => Position::Waiting(interrupt_of(&latest)),
            (Kind::Node, Status::Error) => Position::Failed(failure(&latest)),
            (Kind::Node, Status::Success | Status::Skipped) => {
                return Err(Error::Storage(format!(
                    "run {run_id} ends with {} snapshot {} and nothing after it",
                    latest.status, latest.id
                )));
            }
        };
        let state = decode_json("a state", &latest.state)?;
        Ok(GraphRun::new(self.clone(), run_id.clone(), state, position))
    }

    /// Answers the interrupt `interrupt_id` the run waits on and continues the run: the node
    /// that asked runs again and reads `answer` with [`Ctx::answer`].
    ///
    /// The answer must deserialize into the node's declared answer type
    /// ([`Error::InvalidAnswer`]); another interrupt's id is [`Error::UnknownInterrupt`]; a
    /// second answer is [`Error::AlreadyAnswered`].
    pub async fn resume_with<A: Serialize>(
        &self,
        run_id: &RunId,
        interrupt_id: &SnapshotId,
        answer: A,
    ) -> Result<Finished<G>, Error> {
        self.answer(run_id, interrupt_id, answer).await?;
        self.resume(run_id).await
    }

    /// Records the answer to the interrupt `interrupt_id` the run waits on, as
    /// [`resume_with`](Self::resume_with) does, without running the run: it is runnable again
    /// ([`open`](Self::open) it to go on step by step).
    pub async fn answer<A: Serialize>(
        &self,
        run_id: &RunId,
        interrupt_id: &SnapshotId,
        answer: A,
    ) -> Result<(), Error> {
        let latest = self
            .store
            .latest(run_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "run",
                id: run_id.to_string(),
            })?;
        let unknown = || Error::UnknownInterrupt {
            run_id: run_id.clone(),
            interrupt_id: interrupt_id.clone(),
        };
        let answered = || Error::AlreadyAnswered {
            interrupt_id: interrupt_id.clone(),
        };
        if latest.id != *interrupt_id {
            return match self.store.get(interrupt_id).await {
                Ok(s) if s.run_id == *run_id && s.answer.is_some() => Err(answered()),
                Ok(_) | Err(Error::NotFound { .. }) => Err(unknown()),
                Err(err) => Err(err),
            };
        }
        if latest.status != Status::Waiting {
            return Err(if latest.answer.is_some() {
                answered()
            } else {
                unknown()
            });
        }
        let answer = snapshot::encode("an answer", &answer)?;
        match G::check_answer(&latest.node_id, answer.get()) {
            None => {
                return Err(Error::UnknownNode {
                    graph: G::NAME,
                    node_id: latest.node_id.into_owned(),
                });
            }
            Some(Err(err)) => {
                return Err(Error::InvalidAnswer {
                    node_id: latest.node_id.into_owned(),
                    message: err.to_string(),
                });
            }
            Some(Ok(())) => {}
        }
        match self
            .store
            .transition(interrupt_id, Transition::Answer { answer })
            .await
        {
            Ok(()) => Ok(()),
            Err(Error::IllegalTransition { .. }) => Err(answered()),
            Err(err) => Err(err),
        }
    }

    /// Tries a failed run's node again (with `attempt + 1`) and continues the run.
    pub async fn retry(&self, run_id: &RunId) -> Result<Finished<G>, Error> {
        let latest = self
            .store
            .latest(run_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "run",
                id: run_id.to_string(),
            })?;
        if latest.status != Status::Error {
            return Err(Error::Conflict {
                id: run_id.to_string(),
                reason: format!("its last snapshot is {}, not error", latest.status),
            });
        }
        let mut again = self.again(&latest, self.clock.now());
        again.status = Status::Created;
        again.lease = None;
        self.store.insert(&again).await?;
        self.resume(run_id).await
    }

    /// Claims a runnable snapshot of any run in the store (for a worker pool sharing a store
    /// that holds runs of this graph only) and runs that run until it stops.
    pub async fn run_next(&self) -> Result<Option<Finished<G>>, Error> {
        let now = self.clock.now();
        self.store.expire_leases(now).await?;
        let Some(claimed) = self.store.claim(None, self.lease_from(now)).await? else {
            return Ok(None);
        };
        let node = decode_node::<G>(&claimed)?;
        let state = decode_json("a state", &claimed.state)?;
        let run = GraphRun::new(
            self.clone(),
            claimed.run_id.clone(),
            state,
            Position::Ready {
                current: Current::of(&claimed),
                node,
            },
        );
        run.finish().await.map(Some)
    }

    /// The run's snapshots in order.
    pub async fn history(&self, run_id: &RunId) -> Result<Vec<Snapshot>, Error> {
        self.store.history(run_id).await
    }

    fn lease_from(&self, now: Timestamp) -> Lease {
        Lease {
            owner: self.owner.clone(),
            until: now.plus(self.lease),
        }
    }

    /// A new try of `failed`'s node, after it, pending under this worker's lease.
    fn again(&self, failed: &Snapshot, now: Timestamp) -> Snapshot {
        let mut again = Snapshot::node(
            failed.run_id.clone(),
            failed.seq + 1,
            &failed.node_id,
            &self.ids.next_hex(),
            failed.node.clone(),
            failed.state.clone(),
            now,
        );
        again.node_id = failed.node_id.clone();
        again.attempt = failed.attempt + 1;
        again.status = Status::Pending;
        again.lease = Some(self.lease_from(now));
        again
    }
}

enum Position<G: Graph> {
    /// The next node, its snapshot `pending` (or `running`) under this worker's lease.
    Ready {
        current: Current,
        node: BoxNode<G>,
    },
    Ended(G::Output),
    Waiting(Interrupt),
    Failed(Error),
    /// A step is under way (or was abandoned by an error).
    Busy,
}

/// What a runner keeps of the snapshot of the node that runs next: what the step needs, not
/// the node's and state's JSON (read back from the store on the rare paths that need them).
#[derive(Debug)]
struct Current {
    id: SnapshotId,
    seq: u64,
    attempt: u32,
    status: Status,
    answer: Option<Json>,
}

impl Current {
    fn of(snapshot: &Snapshot) -> Self {
        Current {
            id: snapshot.id.clone(),
            seq: snapshot.seq,
            attempt: snapshot.attempt,
            status: snapshot.status,
            answer: snapshot.answer.clone(),
        }
    }
}

/// A run driven step by step: see what runs next, replace it, run it.
///
/// ```
/// # use deployd_graph::{graph, store::MemoryStore, Ctx, End, Node, NodeError, Runner};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct Hop { left: u32 }
/// # graph! { Hops { state: (), output: (), nodes { Hop => HopNext [Hop, End] } } }
/// # impl Node<Hops> for Hop {
/// #     async fn run(self, _: Ctx<'_, Hops>) -> Result<HopNext, NodeError> {
/// #         Ok(if self.left == 0 { End(()).into() } else { Hop { left: self.left - 1 }.into() })
/// #     }
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let runner = Runner::<Hops>::new(MemoryStore::full_history(), ());
/// let mut run = runner.start(Hop { left: 100 }, ()).await?;
/// run.next().await?; // runs Hop { left: 100 }
/// assert_eq!(run.next_node().and_then(|n| n.downcast_ref::<Hop>()).map(|h| h.left), Some(99));
/// run.replace_next(Hop { left: 1 }).await?; // skip ahead
/// let done = run.finish().await?;
/// assert_eq!(runner.history(&done.run_id).await?.len(), 5); // 100, 99 (skipped), 1, 0, end
/// # Ok::<_, deployd_graph::Error>(()) }).unwrap();
/// ```
pub struct GraphRun<G: Graph> {
    runner: Runner<G>,
    run_id: RunId,
    state: G::State,
    position: Position<G>,
    /// The `start_ts` the next snapshot was recorded `running` with, if it was.
    next_start: Option<Timestamp>,
    span: tracing::Span,
}

impl<G: Graph> fmt::Debug for GraphRun<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphRun")
            .field("run_id", &self.run_id)
            .field("next_node", &self.next_node().map(|n| n.node_id()))
            .finish_non_exhaustive()
    }
}

impl<G: Graph> GraphRun<G> {
    fn new(runner: Runner<G>, run_id: RunId, state: G::State, position: Position<G>) -> Self {
        let span = tracing::info_span!("graph_run", graph = G::NAME, run_id = %run_id);
        GraphRun {
            runner,
            run_id,
            state,
            position,
            next_start: None,
            span,
        }
    }

    /// The run's id.
    pub fn id(&self) -> &RunId {
        &self.run_id
    }

    /// The state the next node will see (the final state once ended).
    pub fn state(&self) -> &G::State {
        &self.state
    }

    /// The node that runs next, if the run can go on. Downcast it with
    /// `next_node()?.downcast_ref::<MyNode>()`.
    pub fn next_node(&self) -> Option<&dyn DynNode<G>> {
        match &self.position {
            Position::Ready { node, .. } => Some(node.as_ref()),
            _ => None,
        }
    }

    /// The id of the snapshot of the node that runs next (read it with
    /// [`Store::get`](crate::Store::get)).
    pub fn next_snapshot_id(&self) -> Option<&SnapshotId> {
        match &self.position {
            Position::Ready { current, .. } => Some(&current.id),
            _ => None,
        }
    }

    /// The output, once the run has ended.
    pub fn output(&self) -> Option<&G::Output> {
        match &self.position {
            Position::Ended(output) => Some(output),
            _ => None,
        }
    }

    /// The interrupt the run waits on, if it does.
    pub fn interrupt(&self) -> Option<&Interrupt> {
        match &self.position {
            Position::Waiting(interrupt) => Some(interrupt),
            _ => None,
        }
    }

    /// Replaces the node that runs next with `node`: the pending snapshot becomes `skipped` and
    /// a snapshot of `node` (same state) takes its place, in one commit.
    pub async fn replace_next<N: Node<G>>(&mut self, node: N) -> Result<(), Error> {
        let Position::Ready { current, .. } = &self.position else {
            return Err(Error::Conflict {
                id: self.run_id.to_string(),
                reason: "the run has no next node to replace".to_owned(),
            });
        };
        let replaced = self.runner.store.get(&current.id).await?;
        let now = self.runner.clock.now();
        let mut next = Snapshot::fresh(
            self.run_id.clone(),
            current.seq + 1,
            N::ID,
            self.runner.ids.next_id(),
            node.to_json().map_err(|source| Error::Codec {
                what: "a node",
                source,
            })?,
            replaced.state,
            now,
        );
        next.status = Status::Pending;
        next.lease = Some(self.runner.lease_from(now));
        let position = Position::Ready {
            current: Current::of(&next),
            node: Box::new(node),
        };
        let transition = Transition::Replace {
            owner: self.runner.owner.clone(),
            next: Box::new(next),
        };
        self.runner
            .store
            .transition(&replaced.id, transition)
            .await?;
        self.position = position;
        Ok(())
    }

    /// Runs the next node and commits what follows it. Returns whether another node is ready
    /// to run (false once the run ended or waits for an answer).
    ///
    /// A node that fails is retried while attempts remain (the call returns `true`); after
    /// the last attempt the call returns [`Error::NodeFailed`].
    pub async fn next(&mut self) -> Result<bool, Error> {
        if self.span.is_disabled() {
            self.step(false).await?;
        } else {
            let span = self.span.clone();
            self.step(false).instrument(span).await?;
        }
        Ok(matches!(self.position, Position::Ready { .. }))
    }

    /// Runs the next node as [`finish`](Self::finish) runs each: what follows it is recorded
    /// `running` under this worker's lease in the same commit (one commit per step, where
    /// [`next`](Self::next) makes two). Returns whether another node is ready to run.
    pub async fn advance(&mut self) -> Result<bool, Error> {
        if self.span.is_disabled() {
            self.step(true).await?;
        } else {
            let span = self.span.clone();
            self.step(true).instrument(span).await?;
        }
        Ok(matches!(self.position, Position::Ready { .. }))
    }

    /// Runs the rest of the run.
    pub async fn finish(mut self) -> Result<Finished<G>, Error> {
        let span = self.span.clone();
        let steps = async {
            while matches!(self.position, Position::Ready { .. }) {
                self.step(true).await?;
            }
            Ok::<_, Error>(())
        };
        if span.is_disabled() {
            steps.await?;
        } else {
            steps.instrument(span).await?;
        }
        let outcome = match self.position {
            Position::Ended(output) => Outcome::End(output),
            Position::Waiting(interrupt) => Outcome::Interrupted(interrupt),
            Position::Failed(err) => return Err(err),
            Position::Ready { .. } | Position::Busy => {
                return Err(Error::Conflict {
                    id: self.run_id.to_string(),
                    reason: "the run was left mid-step by an earlier error".to_owned(),
                });
            }
        };
        Ok(Finished {
            run_id: self.run_id,
            outcome,
            state: self.state,
        })
    }

    /// Runs the next node. With `eager`, the commit that completes it also claims and starts
    /// its successor (inserted `running`), so a run that goes on without pausing costs one
    /// commit per step; otherwise the successor is inserted `pending`, for the caller to
    /// inspect or replace.
    async fn step(&mut self, eager: bool) -> Result<(), Error> {
        let (current, node) = match std::mem::replace(&mut self.position, Position::Busy) {
            Position::Ready { current, node } => (current, node),
            Position::Failed(err) => {
                self.position = Position::Failed(clone_failure(&err));
                return Err(err);
            }
            other => {
                self.position = other;
                return Ok(());
            }
        };
        let runner = &self.runner;
        let owner = &runner.owner;
        // A successor recorded `running` started when it was recorded.
        let started = match self.next_start.take() {
            Some(at) if current.status == Status::Running => at,
            _ => runner.clock.now(),
        };
        if current.status != Status::Running {
            let start = Transition::Start {
                owner: owner.clone(),
                at: started,
                until: started.plus(runner.lease),
            };
            runner.store.transition(&current.id, start).await?;
        }

        let node_id = node.node_id();
        let mut state = self.state.clone();
        let ctx = Ctx {
            state: &mut state,
            deps: &*runner.deps,
            run_id: &self.run_id,
            node_id,
            attempt: current.attempt,
            answer: current.answer.as_ref().map(Json::get),
            events: runner.events.as_ref(),
        };
        let mut future = AssertUnwindSafe(node.run_dyn(ctx)).catch_unwind();
        // Spans cost a few allocations per step: only when someone listens. Without one, a
        // node that finishes at its first poll (most do) needs no timer and no other future.
        let result = if self.span.is_disabled() {
            match (&mut future).now_or_never() {
                Some(caught) => {
                    drop(future);
                    outcome(caught)
                }
                None => run_node(runner, &current.id, future).await,
            }
        } else {
            let future = run_node(runner, &current.id, future);
            let span = tracing::info_span!(
                parent: &self.span,
                "graph_node",
                node_id,
                attempt = current.attempt,
                snapshot_id = %current.id
            );
            future.instrument(span).await
        };
        let ended = runner.clock.now();
        let duration = ended.since(started).as_secs_f64();
        fault::point(fault::AFTER_NODE);

        // An interrupt's snapshot repeats the node and state of the one that asked.
        let asked = match &result {
            Ok(Step::Interrupt(_)) => Some(runner.store.get(&current.id).await?),
            _ => None,
        };
        let outcome = match result {
            Ok(step) => follow(
                runner,
                &self.run_id,
                &current,
                step,
                &state,
                ended,
                eager,
                asked,
            ),
            Err(message) => Err(message),
        };
        let runner = &self.runner;
        match outcome {
            Ok((next, position)) => {
                let transition = Transition::Succeed {
                    owner: runner.owner.clone(),
                    duration,
                    next,
                };
                runner.store.transition(&current.id, transition).await?;
                if !matches!(position, Position::Waiting(_)) {
                    self.state = state;
                }
                if eager && matches!(position, Position::Ready { .. }) {
                    self.next_start = Some(ended);
                }
                self.position = position;
                Ok(())
            }
            Err(message) => {
                warn!(
                    run_id = %self.run_id,
                    node_id,
                    attempt = current.attempt,
                    error = %message,
                    "node failed"
                );
                let retry = if current.attempt < runner.max_attempts {
                    let failed = runner.store.get(&current.id).await?;
                    Some(runner.again(&failed, ended))
                } else {
                    None
                };
                let transition = Transition::Fail {
                    owner: runner.owner.clone(),
                    duration,
                    error: message.clone(),
                    retry: retry.clone().map(Box::new),
                };
                runner.store.transition(&current.id, transition).await?;
                match retry {
                    Some(retry) => {
                        let node = decode_node::<G>(&retry)?;
                        self.position = Position::Ready {
                            current: Current::of(&retry),
                            node,
                        };
                        Ok(())
                    }
                    None => {
                        let err = Error::NodeFailed {
                            run_id: self.run_id.clone(),
                            node_id: node_id.to_owned(),
                            snapshot_id: current.id.clone(),
                            message,
                        };
                        self.position = Position::Failed(clone_failure(&err));
                        Err(err)
                    }
                }
            }
        }
    }
}

/// The snapshot that follows `current` after its node returned `step`, and the position the
/// run is then in; `Err(message)` if what the node returned cannot be recorded. `asked` is
/// `current`'s snapshot, read back for an interrupt.
#[allow(clippy::too_many_arguments)]
fn follow<G: Graph>(
    runner: &Runner<G>,
    run_id: &RunId,
    current: &Current,
    step: Step<G>,
    state: &G::State,
    now: Timestamp,
    eager: bool,
    asked: Option<Snapshot>,
) -> Result<(Box<Snapshot>, Position<G>), String> {
    let hex = runner.ids.next_id();
    let seq = current.seq + 1;
    let encode_state = || {
        if runner.keeps_values {
            Ok(Json::deferred(state.clone()))
        } else {
            snapshot::encode("a state", state).map_err(|e| e.to_string())
        }
    };
    Ok(match step {
        Step::Next(node) => {
            let json = match node.to_json() {
                Ok(json) => json,
                Err(e) => {
                    return Err(format!("cannot encode node {}: {e}", node.node_id()));
                }
            };
            let state = encode_state()?;
            let mut next = Box::new(Snapshot::fresh(
                run_id.clone(),
                seq,
                node.node_id(),
                hex,
                json,
                state,
                now,
            ));
            next.lease = Some(runner.lease_from(now));
            if eager {
                next.status = Status::Running;
                next.start_ts = Some(now);
            } else {
                next.status = Status::Pending;
            }
            let position = Position::Ready {
                current: Current::of(&next),
                node,
            };
            (next, position)
        }
        Step::End(output) => {
            let json = match snapshot::encode("an output", &output) {
                Ok(json) => json,
                Err(e) => return Err(e.to_string()),
            };
            let state = encode_state()?;
            let end = Box::new(Snapshot::fresh_end(
                run_id.clone(),
                seq,
                hex,
                json,
                state,
                now,
            ));
            (end, Position::Ended(output))
        }
        Step::Interrupt(request) => {
            // The node runs again from the same state once answered: its snapshot's node
            // and state are those of the waiting one.
            let Some(asked) = asked else {
                return Err("the snapshot that asked was not read back".to_owned());
            };
            let mut waiting = Box::new(Snapshot::fresh(
                run_id.clone(),
                seq,
                "",
                hex,
                asked.node,
                asked.state,
                now,
            ));
            waiting.id = SnapshotId::from_parts(&asked.node_id, hex);
            waiting.node_id = asked.node_id;
            waiting.status = Status::Waiting;
            waiting.request = Some(request);
            let interrupt = interrupt_of(&waiting);
            (waiting, Position::Waiting(interrupt))
        }
    })
}

/// A node's future, catching a panic.
type Caught<'a, G> = futures::future::CatchUnwind<AssertUnwindSafe<crate::node::NodeFuture<'a, G>>>;

/// What a node's run returned, or why it failed.
fn outcome<G: Graph>(
    caught: Result<Result<Step<G>, crate::NodeError>, Box<dyn std::any::Any + Send>>,
) -> Result<Step<G>, String> {
    match caught {
        Ok(Ok(step)) => Ok(step),
        Ok(Err(err)) => Err(err.to_string()),
        Err(panic) => Err(format!("panicked: {}", panic_message(panic.as_ref()))),
    }
}

/// Runs a node's future to its end, renewing the lease while it runs.
async fn run_node<G: Graph>(
    runner: &Runner<G>,
    id: &SnapshotId,
    mut future: Caught<'_, G>,
) -> Result<Step<G>, String> {
    // Most nodes finish at their first poll: no timer for them. (A future left pending here
    // is polled again below with the task's waker, as the `Future` contract allows.)
    let mut first = (&mut future).now_or_never();
    let every = runner.lease / 3;
    let caught = loop {
        if let Some(caught) = first.take() {
            break caught;
        }
        match tokio::time::timeout(every, &mut future).await {
            Ok(caught) => break caught,
            Err(_) => {
                let until = runner.clock.now().plus(runner.lease);
                let renew = Transition::Renew {
                    owner: runner.owner.clone(),
                    until,
                };
                if let Err(err) = runner.store.transition(id, renew).await {
                    warn!(snapshot_id = %id, error = %err, "cannot renew lease");
                }
            }
        }
    };
    outcome(caught)
}

fn interrupt_of(waiting: &Snapshot) -> Interrupt {
    Interrupt {
        id: waiting.id.clone(),
        node_id: waiting.node_id.to_string(),
        request: waiting.request.clone().unwrap_or_else(Json::null),
    }
}

fn failure(snapshot: &Snapshot) -> Error {
    Error::NodeFailed {
        run_id: snapshot.run_id.clone(),
        node_id: snapshot.node_id.to_string(),
        snapshot_id: snapshot.id.clone(),
        message: snapshot.error.clone().unwrap_or_default(),
    }
}

/// `Error` is not `Clone`; a failed run keeps the failure to report it again.
fn clone_failure(err: &Error) -> Error {
    match err {
        Error::NodeFailed {
            run_id,
            node_id,
            snapshot_id,
            message,
        } => Error::NodeFailed {
            run_id: run_id.clone(),
            node_id: node_id.clone(),
            snapshot_id: snapshot_id.clone(),
            message: message.clone(),
        },
        other => Error::Storage(other.to_string()),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "a non-string payload"
    }
}

fn decode_json<T: DeserializeOwned>(what: &'static str, json: &Json) -> Result<T, Error> {
    serde_json::from_str(json.get()).map_err(|source| Error::Codec { what, source })
}

fn decode_node<G: Graph>(snapshot: &Snapshot) -> Result<BoxNode<G>, Error> {
    match G::decode(&snapshot.node_id, snapshot.node.get()) {
        None => Err(Error::UnknownNode {
            graph: G::NAME,
            node_id: snapshot.node_id.to_string(),
        }),
        Some(result) => result.map_err(|source| Error::Codec {
            what: "a node",
            source,
        }),
    }
}
