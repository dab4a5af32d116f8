//! A node of a cluster: several deployd nodes that share one PostgreSQL store and one broker.
//!
//! - Every node runs every deployment. The store's deployment files are the truth: a node
//!   brings what runs here in line with them (reconciles) when another node notes a change,
//!   when its notes were lost, and every [`RECONCILE_EVERY`] anyway.
//! - Topics are named after the cluster, so every node's workers consume the same ones and any
//!   node may run a task that any node created.
//! - Each node holds a lease in the store, renewed every quarter of its length. A task runs on
//!   one node at a time: a worker marks it running with its node as owner, which succeeds only
//!   when the task is queued, or already this node's, or its owner's lease has expired.
//! - When a node's lease expires (it died, or lost the store for longer than the lease), the
//!   tasks it was running are taken by one of the others (`take_orphans`, a row lock decides
//!   which) and published again with `attempt + 1`; their outcome is decided by whoever
//!   finishes first (the store keeps a task's first outcome).
//!
//! Invariant: only a node holding a task's ownership acks its message after committing its
//! outcome; a node that cannot take the ownership acks the delivery without running the task
//! (another node runs it, or will after the owner's lease expires).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use deployd_queue::Message;
use serde::{Deserialize, Serialize};

use crate::notifier::Note;
use crate::store::{StoredDeployment, now_ms};
use crate::{Error, Manager, TaskInfo, queues};

/// How often a node compares what runs here with the store, notes or not.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// The version nodes of one cluster must share: deployd's and its store schema's.
pub(crate) fn version() -> String {
    format!(
        "{}+schema.{}",
        env!("CARGO_PKG_VERSION"),
        crate::store::SCHEMA_VERSION
    )
}

/// A node of the cluster as `/status/` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id (its data directory's).
    pub id: String,
    /// Where its HTTP API is reached, when it said.
    pub address: Option<String>,
    /// Its deployd version.
    pub version: String,
    /// Whether its lease holds: it renewed it within the lease's length.
    pub live: bool,
    /// Whether it is the node that answers.
    pub this_node: bool,
    /// When it joined (ms since the epoch, the store's clock).
    pub started_ms: i64,
    /// How long its lease still holds (negative: expired that long ago), in ms.
    pub lease_left_ms: i64,
}

/// The cluster as this node sees it.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) name: String,
    address: Option<String>,
    lease: Duration,
    /// Whether the last renewal of this node's lease succeeded.
    healthy: AtomicBool,
    /// When the lease was last renewed (ms since the epoch, this node's clock).
    renewed_ms: AtomicI64,
    /// The last error of the store, while it fails.
    last_error: std::sync::Mutex<Option<String>>,
}

impl State {
    pub(crate) fn new(options: &crate::ClusterOptions) -> Self {
        Self {
            name: options.name.clone(),
            address: options.address.clone(),
            lease: options.lease,
            healthy: AtomicBool::new(false),
            renewed_ms: AtomicI64::new(0),
            last_error: std::sync::Mutex::new(None),
        }
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether this node holds its lease: the last renewal succeeded, within the lease.
    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && now_ms() - self.renewed_ms.load(Ordering::Relaxed) < self.lease_ms()
    }

    /// What is wrong, when the node is not healthy.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.healthy() {
            return None;
        }
        Some(
            self.last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| "the node's lease is not renewed".to_owned()),
        )
    }
}

impl Manager {
    fn cluster_state(&self) -> Option<&State> {
        self.inner.cluster.as_ref()
    }

    /// Joins the cluster: takes this node's lease (refused when a live node runs another
    /// version), and takes back the tasks a previous run of this node left running. Call it
    /// before any deployment runs here; returns those tasks, to be published again once the
    /// deployments run ([`Manager::run_cluster`]).
    pub(crate) async fn join_cluster(&self) -> Result<Vec<TaskInfo>, Error> {
        let Some(state) = self.cluster_state() else {
            return Ok(Vec::new());
        };
        let store = self.inner.control.store();
        self.hold_lease(state).await?;
        state.healthy.store(true, Ordering::Relaxed);
        state.renewed_ms.store(now_ms(), Ordering::Relaxed);
        // What this node was running before it restarted runs nowhere now: give it up and
        // take it back, with whatever other dead nodes left.
        store.release_lease(&self.inner.node_id).await?;
        let orphans = store.take_orphans().await;
        self.hold_lease(state).await?;
        let orphans = orphans?;
        if !orphans.is_empty() {
            tracing::info!(
                tasks = orphans.len(),
                "took back the tasks that were running on dead nodes"
            );
        }
        Ok(orphans)
    }

    /// Runs the node's part of the cluster in the background until the Manager shuts down: the
    /// lease, the orphans of dead nodes, the notes of the others and the periodic reconcile.
    /// `orphans` are published first.
    pub(crate) fn run_cluster(&self, orphans: Vec<TaskInfo>) {
        let Some(state) = self.cluster_state() else {
            return;
        };
        let lease = state.lease;
        // The lease.
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = inner.upgrade() else { return };
                let manager = Manager { inner };
                if manager.is_closing() {
                    return;
                }
                manager.renew_lease().await;
            }
        });
        // Orphans: the tasks of nodes whose lease expired.
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut pending = orphans;
            let mut tick = tokio::time::interval(lease / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let Some(manager) = inner.upgrade().map(|inner| Manager { inner }) else {
                    return;
                };
                if manager.is_closing() {
                    return;
                }
                if manager.cluster_state().is_some_and(State::healthy) {
                    match manager.inner.control.store().take_orphans().await {
                        Ok(taken) => {
                            if !taken.is_empty() {
                                tracing::warn!(
                                    tasks = taken.len(),
                                    "took the tasks of a node whose lease expired; they run again"
                                );
                            }
                            pending.extend(taken);
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot look for the tasks of dead nodes")
                        }
                    }
                }
                pending = manager.publish_again(pending).await;
                drop(manager);
                tick.tick().await;
            }
        });
        // Notes of the other nodes, and the periodic reconcile.
        let inner = Arc::downgrade(&self.inner);
        let mut notes = self.inner.control.notifier().subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECONCILE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let note = tokio::select! {
                    note = notes.recv() => match note {
                        Ok(note) => Some(note),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => None,
                };
                let Some(manager) = inner.upgrade().map(|inner| Manager { inner }) else {
                    return;
                };
                if manager.is_closing() {
                    return;
                }
                match note.as_deref() {
                    Some(Note::Deployment { name }) => manager.reconcile(Some(name)).await,
                    Some(Note::TaskEvent {
                        to,
                        deployment,
                        task,
                        data,
                    }) if **to == *manager.inner.node_id => {
                        // Delivered in its own task: a slow service does not hold up notes.
                        let manager = manager.clone();
                        let (deployment, task, data) =
                            (deployment.clone(), task.clone(), data.clone());
                        tokio::spawn(async move {
                            if let Err(err) = manager.deliver_event(&deployment, &task, data).await
                            {
                                tracing::warn!(task = %task, error = %err, "cannot deliver an event sent through another node");
                            }
                        });
                    }
                    Some(Note::TaskEvent { .. }) => {}
                    Some(Note::Cancel { to, task }) if **to == *manager.inner.node_id => {
                        manager.stop_cancelled(task);
                    }
                    Some(Note::Cancel { .. }) => {}
                    // Entries go to their own channel (see `Notifier::subscribe_entries`).
                    Some(Note::Entry { .. }) => {}
                    // Lost notes, a lagging receiver, or the tick: everything.
                    Some(Note::Lost) | None => manager.reconcile(None).await,
                }
            }
        });
    }

    /// Takes or renews this node's lease in the store.
    async fn hold_lease(&self, state: &State) -> Result<(), Error> {
        self.inner
            .control
            .store()
            .hold_lease(
                &self.inner.node_id,
                state.address.as_deref(),
                &version(),
                state.lease_ms(),
            )
            .await
    }

    fn is_closing(&self) -> bool {
        self.inner.closing.load(Ordering::Relaxed)
    }

    async fn renew_lease(&self) {
        let Some(state) = self.cluster_state() else {
            return;
        };
        let renewed = self.hold_lease(state).await;
        match renewed {
            Ok(()) => {
                if !state.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("the node holds its lease in the cluster's store again");
                }
                state.renewed_ms.store(now_ms(), Ordering::Relaxed);
                *state
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            }
            Err(err) => {
                if state.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %err, "cannot renew the node's lease; retrying");
                }
                *state
                    .last_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(format!("cannot renew the node's lease: {err}"));
            }
        }
    }

    /// Publishes `tasks` again with `attempt + 1`; returns those whose deployment does not run
    /// here yet, or whose publish failed, to try again later.
    async fn publish_again(&self, tasks: Vec<TaskInfo>) -> Vec<TaskInfo> {
        let mut left = Vec::new();
        for task in tasks {
            let Ok(deployment) = self.deployment(&task.deployment) else {
                // Deleted meanwhile, or not reconciled here yet.
                let stored = self.inner.control.store().task(&task.id).await;
                if matches!(stored, Ok(Some(_))) {
                    left.push(task);
                }
                continue;
            };
            let mut message = Message::new(task.id.clone());
            message.attempt = task.attempt + 1;
            let topic =
                queues::task_topic(&self.inner.topic_scope, &task.deployment, &task.service);
            if let Err(err) = deployment.queue().publish(&topic, message).await {
                tracing::warn!(task = %task.id, error = %err, "cannot queue a task again; retrying");
                left.push(task);
            }
        }
        left
    }

    /// Brings what runs here in line with the store's deployment files: `name`'s, or all.
    pub(crate) async fn reconcile(&self, name: Option<&str>) {
        let store = self.inner.control.store();
        let stored: Vec<StoredDeployment> = match name {
            Some(name) => match store.deployment(name).await {
                Ok(found) => found.into_iter().collect(),
                Err(err) => {
                    tracing::warn!(deployment = name, error = %err, "cannot read the cluster's deployments");
                    return;
                }
            },
            None => match store.deployments().await {
                Ok(all) => all,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the cluster's deployments");
                    return;
                }
            },
        };
        let names: BTreeSet<String> = stored.iter().map(|d| d.name.clone()).collect();
        for file in stored {
            if let Err(err) = self.adopt(&file).await {
                tracing::warn!(deployment = %file.name, error = %err, "cannot run a deployment of the cluster here");
            }
        }
        // What runs here and is not stored any more was deleted on another node.
        let gone: Vec<String> = self
            .read_deployments()
            .keys()
            .filter(|local| match name {
                Some(name) => *local == name && !names.contains(*local),
                None => !names.contains(*local),
            })
            .cloned()
            .collect();
        for name in gone {
            // Deleted on another node, or a deploy here that has not stored its file yet.
            if matches!(store.deployment(&name).await, Ok(None)) && !self.is_deploying_here(&name) {
                self.forget_here(&name).await;
            }
        }
    }

    /// Runs the stored deployment `file` here: starts it when it does not run here, reloads it
    /// when what runs here differs.
    async fn adopt(&self, file: &StoredDeployment) -> Result<(), Error> {
        let base = std::path::PathBuf::from(&file.base_path);
        let current = self.read_deployments().get(&file.name).cloned();
        match current {
            Some(current) if current.is_same(&file.spec, &base) => Ok(()),
            // A deploy of this node is under way: it stores its file when it is done.
            Some(_) if self.is_deploying_here(&file.name) => Ok(()),
            Some(_) => {
                // A reload waits for the new version to serve: not in the loop that hands out
                // the cluster's notes.
                tracing::info!(deployment = %file.name, "reloading a deployment changed on another node");
                let (manager, file) = (self.clone(), file.clone());
                self.inner
                    .deploying
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(file.name.clone());
                tokio::spawn(async move {
                    let reloaded = manager.deploy_here(&file).await;
                    manager
                        .inner
                        .deploying
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&file.name);
                    if let Err(err) = reloaded {
                        tracing::warn!(deployment = %file.name, error = %err, "cannot reload a deployment changed on another node");
                    }
                });
                Ok(())
            }
            None => {
                let ops = self.inner.ops.lock().await;
                if *ops || self.read_deployments().contains_key(&file.name) {
                    return Ok(());
                }
                tracing::info!(deployment = %file.name, "running a deployment of the cluster");
                self.restore_one(file).await?;
                drop(ops);
                Ok(())
            }
        }
    }

    /// Whether an API deploy of `name` is under way on this node.
    fn is_deploying_here(&self, name: &str) -> bool {
        self.inner
            .deploying
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name)
    }

    /// Delivers a human-in-the-loop event to a task a worker of this node runs.
    pub(crate) async fn deliver_event(
        &self,
        _deployment: &str,
        task_id: &str,
        data: serde_json::Value,
    ) -> Result<(), Error> {
        match self.inner.control.running_port(task_id) {
            Some(port) => crate::protocol::send_event(port, task_id, data).await,
            None => Err(Error::Conflict(format!(
                "task `{task_id}` is not running on this node"
            ))),
        }
    }

    /// The nodes of the cluster; `None` when this node is alone.
    pub async fn nodes(&self) -> Result<Option<Vec<NodeStatus>>, Error> {
        if self.cluster_state().is_none() {
            return Ok(None);
        }
        let (nodes, now) = self.inner.control.store().nodes().await?;
        Ok(Some(
            nodes
                .into_iter()
                .map(|node| NodeStatus {
                    this_node: node.id == self.inner.node_id,
                    live: node.lease_until_ms >= now,
                    lease_left_ms: node.lease_until_ms - now,
                    id: node.id,
                    address: node.address,
                    version: node.version,
                    started_ms: node.started_ms,
                })
                .collect(),
        ))
    }

    /// The cluster this node belongs to, and what is wrong with its part in it: `None` when
    /// it is alone; `Some((name, None))` when it holds its lease.
    pub fn cluster_health(&self) -> Option<(String, Option<String>)> {
        self.cluster_state()
            .map(|state| (state.name.clone(), state.problem()))
    }

    /// This node's id (its data directory's).
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Tells the other nodes that deployment `name` changed.
    pub(crate) async fn note_deployment(&self, name: &str) {
        if let Err(err) = self
            .inner
            .control
            .notifier()
            .publish(&Note::Deployment {
                name: name.to_owned(),
            })
            .await
        {
            // They reconcile within `RECONCILE_EVERY` anyway.
            tracing::warn!(deployment = name, error = %err, "cannot tell the cluster about a deployment");
        }
    }
}
