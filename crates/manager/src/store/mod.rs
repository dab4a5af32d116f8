//! The control plane's durable state: deployments, tasks, their events, sessions and the
//! nodes of a cluster, behind one seam ([`ControlStore`]) with two backends: SQLite in the
//! data directory (the embedded default, one node) and PostgreSQL (shared by the nodes of a
//! cluster).
//!
//! Invariant: an event is in the store before anyone is told about it, so a reader that catches
//! up from the store after a notification never misses one.
//!
//! Invariant: writes handed to [`ControlStore::commit`] commit in the order they were handed
//! over, one transaction per job, and a job that fails is retried before any later one.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;

use crate::{Error, SessionInfo, TaskEvent, TaskInfo, TaskStatus};

#[cfg(test)]
mod conformance;
mod postgres;
mod rows;
mod sqlite;

pub(crate) use postgres::PostgresStore;
pub(crate) use sqlite::SqliteStore;

/// The version of the control store's schema this deployd writes. A store whose schema is
/// newer (written by a later deployd) is refused.
pub(crate) const SCHEMA_VERSION: i64 = 2;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Makes `path` readable and writable by its owner only, if it exists.
pub(crate) fn restrict(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if path.exists()
        && let Err(err) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    {
        tracing::warn!(path = %path.display(), error = %err, "cannot restrict permissions");
    }
}

fn to_json(text: Option<String>) -> Option<Value> {
    text.map(|t| serde_json::from_str(&t).unwrap_or(Value::String(t)))
}

/// A deployment as persisted: enough to bring it back after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredDeployment {
    pub(crate) name: String,
    pub(crate) spec: String,
    pub(crate) origin: String,
    pub(crate) base_path: String,
    /// Where the file came from (`client` or `operator`), which decides what its `${VAR}` read.
    pub(crate) from: String,
}

/// A revision as stored: one deploy, reload or rollback of a deployment.
pub(crate) type StoredRevision = crate::Revision;

/// A node of a cluster as its lease row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeRecord {
    pub(crate) id: String,
    /// Where other nodes reach its HTTP API (`http://host:port`), when it said.
    pub(crate) address: Option<String>,
    pub(crate) version: String,
    pub(crate) started_ms: i64,
    /// Until when its lease holds (ms since the epoch); renewed while the node lives.
    pub(crate) lease_until_ms: i64,
}

/// What one [`Write`] did.
#[derive(Debug)]
pub(crate) struct Written {
    /// Whether it applied (a conditional write may not).
    pub(crate) applied: bool,
    /// The log entry it appended.
    pub(crate) event: Option<TaskEvent>,
    /// Of a [`Write::Running`] that applied: the task and its session's state.
    pub(crate) started: Option<(TaskInfo, Option<Value>)>,
}

impl Written {
    fn applied(event: Option<TaskEvent>) -> Self {
        Self {
            applied: true,
            event,
            started: None,
        }
    }

    fn not_applied() -> Self {
        Self {
            applied: false,
            event: None,
            started: None,
        }
    }
}

/// One write to the task tables.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// A new task, `queued`, and its session when it is new.
    Create { task: TaskInfo, new_session: bool },
    /// The task runs its attempt `attempt` on node `node`; applies only to a task that is
    /// `queued`, or `running` on `node` or on a node without a live lease (of two nodes, one
    /// runs a task at a time), and gives back the task and its session's state.
    Running {
        task_id: String,
        attempt: u32,
        node: Arc<str>,
    },
    /// An event the service streamed during attempt `attempt`; applies only to a stored task.
    Event {
        task_id: String,
        attempt: u32,
        data: Value,
    },
    /// The task's end: its final entry, its outcome and its session's new state. With
    /// `only_if_queued`, nothing is written unless the task is still `queued`. With
    /// `cancelled`, the task ends `cancelled` (its outcome is then the message that says by
    /// whom).
    Finish {
        task_id: String,
        session_id: String,
        attempt: u32,
        outcome: Result<Value, String>,
        state: Option<Value>,
        only_if_queued: bool,
        cancelled: bool,
    },
}

/// What a finish writes: `(kind, data, status, result column, error column)`.
fn finish_columns(
    outcome: &Result<Value, String>,
    cancelled: bool,
) -> (
    crate::EventKind,
    Value,
    TaskStatus,
    Option<String>,
    Option<&str>,
) {
    match outcome {
        Err(message) if cancelled => (
            crate::EventKind::Cancelled,
            Value::String(message.clone()),
            TaskStatus::Cancelled,
            None,
            Some(message.as_str()),
        ),
        Ok(result) => (
            crate::EventKind::Result,
            result.clone(),
            TaskStatus::Succeeded,
            Some(result.to_string()),
            None,
        ),
        Err(message) => (
            crate::EventKind::Error,
            Value::String(message.clone()),
            TaskStatus::Failed,
            None,
            Some(message.as_str()),
        ),
    }
}

/// A batch of writes for the group commit, and what to do with its outcome.
pub(crate) struct CommitJob {
    pub(crate) writes: Vec<Write>,
    /// Turns true when the control plane closes: a failing commit stops being retried.
    pub(crate) closed: watch::Receiver<bool>,
    /// Counts the commits that failed (and were retried).
    pub(crate) failures: Arc<AtomicU64>,
    /// Called once with what the writes did (or the last error, once closed).
    pub(crate) done: Box<dyn FnOnce(Result<Vec<Written>, Error>) + Send>,
}

/// The control plane's store. Every backend passes the conformance suite in
/// `store/conformance.rs`.
#[async_trait]
pub(crate) trait ControlStore: Send + Sync + std::fmt::Debug {
    /// Creates or replaces a deployment's file.
    async fn put_deployment(&self, d: &StoredDeployment) -> Result<(), Error>;
    /// Creates a deployment's file; `false` when one of that name is stored already.
    async fn insert_deployment(&self, d: &StoredDeployment) -> Result<bool, Error>;
    async fn deployment(&self, name: &str) -> Result<Option<StoredDeployment>, Error>;
    async fn deployments(&self) -> Result<Vec<StoredDeployment>, Error>;
    /// Removes a deployment with its tasks, events and sessions, in one transaction.
    async fn delete_deployment(&self, name: &str) -> Result<(), Error>;

    async fn create_session(&self, id: &str, deployment: &str) -> Result<(), Error>;
    /// The session's deployment and state, if the session exists.
    async fn session(&self, id: &str) -> Result<Option<(String, Option<Value>)>, Error>;
    /// The sessions of a deployment with their task ids and state, oldest first.
    async fn sessions(&self, deployment: &str) -> Result<Vec<SessionInfo>, Error>;
    /// At most `limit` sessions of a deployment with their task ids and state, newest first,
    /// starting before the session `before`; `None` when `before` names no session of the
    /// deployment.
    async fn search_sessions(
        &self,
        deployment: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<SessionInfo>>, Error>;
    /// Deletes a session; its tasks stay readable. Returns whether it existed.
    async fn delete_session(&self, deployment: &str, id: &str) -> Result<bool, Error>;

    async fn task(&self, id: &str) -> Result<Option<TaskInfo>, Error>;
    /// A task with when it was created and last changed.
    async fn task_record(&self, id: &str) -> Result<Option<crate::TaskRecord>, Error>;
    /// At most `limit` tasks of a deployment, newest first, that match `filter`, starting
    /// before the task `before` (in the same order); `None` when `before` names no task of the
    /// deployment.
    async fn search_tasks(
        &self,
        deployment: &str,
        filter: &crate::TaskFilter,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<crate::TaskRecord>>, Error>;

    /// Records a new revision of `revision.deployment`, numbered one past its last; returns
    /// the number (the given `revision.revision` is ignored).
    async fn add_revision(&self, revision: &StoredRevision) -> Result<u64, Error>;
    /// Sets how a revision's deploy ended.
    async fn end_revision(
        &self,
        deployment: &str,
        revision: u64,
        outcome: &str,
        error: Option<&str>,
    ) -> Result<(), Error>;
    /// A deployment's revisions, newest first, at most `limit`.
    async fn revisions(&self, deployment: &str, limit: usize)
    -> Result<Vec<StoredRevision>, Error>;
    /// One revision of a deployment, with its file.
    async fn revision(
        &self,
        deployment: &str,
        revision: u64,
    ) -> Result<Option<StoredRevision>, Error>;
    /// The tasks of a deployment, oldest first.
    async fn tasks(&self, deployment: &str) -> Result<Vec<TaskInfo>, Error>;
    /// At most `limit` tasks of a deployment, oldest first, starting after the task `after`
    /// (in the same order); `None` when `after` names no task of the deployment.
    async fn tasks_page(
        &self,
        deployment: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<TaskInfo>>, Error>;
    /// How many tasks each deployment, service and status has, with the oldest's creation.
    async fn task_counts(&self) -> Result<Vec<crate::TaskCount>, Error>;
    /// Per deployment and service: how many ended tasks took at most each of `bounds`
    /// seconds, their count and their total.
    async fn task_durations(&self, bounds: &[f64]) -> Result<Vec<crate::TaskDurations>, Error>;
    /// Deletes up to `limit` tasks that ended before `before` (ms since the epoch), with
    /// their events; how many.
    async fn prune_ended(&self, before: i64, limit: usize) -> Result<usize, Error>;
    /// The tasks of a deployment that have not ended, oldest first.
    async fn unfinished_tasks(&self, deployment: &str) -> Result<Vec<TaskInfo>, Error>;
    /// Sets a task's status and attempt unless it has ended; whether it did.
    async fn set_task_status(
        &self,
        id: &str,
        status: TaskStatus,
        attempt: u32,
    ) -> Result<bool, Error>;
    /// Puts a task that was cut off while running back to `queued`, keeping its attempt.
    async fn requeue(&self, id: &str) -> Result<(), Error>;
    /// Tasks of a service that have waited in `queued` since before `before` (ms since the
    /// epoch), oldest first, at most `limit`.
    async fn waiting_tasks(
        &self,
        deployment: &str,
        service: &str,
        before: i64,
        limit: usize,
    ) -> Result<Vec<TaskInfo>, Error>;
    /// The entries of a task's log after `after`, and whether the task had ended, read so
    /// that the two agree; `None` when the task is not stored.
    async fn log_after(
        &self,
        task_id: &str,
        after: u64,
    ) -> Result<Option<(Vec<TaskEvent>, bool)>, Error>;

    /// Commits `writes` in one transaction, in order; returns, for each, whether it applied
    /// and the log entry it appended (a conditional write that did not apply appends nothing).
    /// The task path uses [`ControlStore::commit`]; this is for one-off writes (and tests).
    #[cfg_attr(not(test), allow(dead_code))]
    async fn write(&self, writes: Vec<Write>) -> Result<Vec<Written>, Error>;
    /// Hands a batch to the store's writer, which commits it after every batch handed over
    /// before it, retrying while the store fails until `closed`, then calls `done`.
    fn commit(&self, job: CommitJob) -> Result<(), Error>;
    /// Commits `writes` right now on the calling thread when that is cheap (SQLite with an
    /// idle writer); `None` when the caller should use [`ControlStore::commit`].
    fn commit_here(&self, _writes: &[Write]) -> Option<Result<Vec<Written>, Error>> {
        None
    }

    /// Takes or renews node `id`'s lease for `ttl_ms` from now (the store's clock), with its
    /// address and version; fails, naming both versions, when the cluster has a live node of
    /// another deployd version.
    async fn hold_lease(
        &self,
        id: &str,
        address: Option<&str>,
        version: &str,
        ttl_ms: i64,
    ) -> Result<(), Error>;
    /// Gives up a node's lease (a clean shutdown): its row goes.
    async fn release_lease(&self, id: &str) -> Result<(), Error>;
    /// The nodes with a lease row, live or not, by id, and the store's clock now.
    async fn nodes(&self) -> Result<(Vec<NodeRecord>, i64), Error>;
    /// The node a task runs on, when it is `running`.
    async fn owner(&self, task_id: &str) -> Result<Option<String>, Error>;
    /// Tasks `running` on a node whose lease has expired, or that has none: put back to
    /// `queued` with their owner cleared, in one transaction, and returned so that they can
    /// be queued again. Of two nodes that call this at once, each task goes to one.
    async fn take_orphans(&self) -> Result<Vec<TaskInfo>, Error>;

    async fn close(&self);

    #[cfg(test)]
    async fn insert_task(&self, task: &TaskInfo) -> Result<(), Error> {
        self.write(vec![Write::Create {
            task: task.clone(),
            new_session: false,
        }])
        .await
        .map(drop)
    }

    #[cfg(test)]
    async fn events_after(
        &self,
        task_id: &str,
        after: u64,
    ) -> Result<Option<Vec<TaskEvent>>, Error> {
        Ok(self
            .log_after(task_id, after)
            .await?
            .map(|(events, _)| events))
    }
}

/// Where the control store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The SQLite file `deployd.db` in the data directory.
    DataDir,
    /// A PostgreSQL database (`postgres://user:password@host:port/db`), in `schema`: the
    /// URL's `?schema=`, else `deployd_<cluster>` (`-` as `_`) for a node of a cluster, else
    /// `deployd`.
    Postgres { url: String, schema: Option<String> },
}

impl StoreLocation {
    /// Reads `--store`: `sqlite` (or empty) for the data directory, a `postgres://` or
    /// `postgresql://` URL (with `?schema=NAME` naming the schema, `public` by default).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() || text == "sqlite" {
            return Ok(Self::DataDir);
        }
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(format!(
                "store {:?}: expected `sqlite` or a postgres:// URL",
                redact(text)
            ));
        }
        let (url, schema) = postgres::split_schema(text)?;
        Ok(Self::Postgres { url, schema })
    }

    /// How the location is shown: a URL's password is replaced by `***`.
    pub fn shown(&self) -> String {
        match self {
            Self::DataDir => "sqlite (the data directory)".to_owned(),
            Self::Postgres {
                url,
                schema: Some(schema),
            } => format!("{} (schema {schema})", redact(url)),
            Self::Postgres { url, schema: None } => redact(url),
        }
    }
}

/// `url` with the password of its user info replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The schema of a PostgreSQL store: the URL's `?schema=`, else `deployd_<cluster>` (`-` as
/// `_`), else `deployd`.
pub(crate) fn schema_of(schema: Option<&String>, cluster: Option<&str>) -> String {
    match (schema, cluster) {
        (Some(schema), _) => schema.clone(),
        (None, Some(cluster)) => {
            format!("deployd_{}", cluster.to_ascii_lowercase().replace('-', "_"))
        }
        (None, None) => "deployd".to_owned(),
    }
}

/// Where graph services keep their runs by default on a node whose control store is
/// PostgreSQL: the same database, in the schema `<control schema>_graphs`. `None` with SQLite
/// (each service then keeps a SQLite file in its data folder).
pub(crate) fn default_graph_store(
    location: &StoreLocation,
    cluster: Option<&str>,
) -> Option<String> {
    match location {
        StoreLocation::DataDir => None,
        StoreLocation::Postgres { url, schema } => {
            let schema = schema_of(schema.as_ref(), cluster);
            let separator = if url.contains('?') { '&' } else { '?' };
            Some(format!("{url}{separator}schema={schema}_graphs"))
        }
    }
}

/// Opens the store at `location` (the SQLite file lives in `data_dir`) for node `node`, with
/// the notifier that goes with it.
pub(crate) async fn open(
    location: &StoreLocation,
    data_dir: &std::path::Path,
    node: &str,
    cluster: Option<&str>,
) -> Result<(Arc<dyn ControlStore>, crate::notifier::Notifier), Error> {
    Ok(match location {
        StoreLocation::DataDir => (
            Arc::new(SqliteStore::open(&data_dir.join("deployd.db")).await?),
            crate::notifier::Notifier::local(node),
        ),
        StoreLocation::Postgres { url, schema } => {
            let schema = schema_of(schema.as_ref(), cluster);
            let store = PostgresStore::connect(url, &schema).await?;
            store.notify_as(node);
            let notifier = crate::notifier::Notifier::postgres(
                node,
                store.pool().clone(),
                crate::notifier::channel(store.schema()),
            )
            .await?;
            (Arc::new(store), notifier)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_shows_without_its_password() {
        assert_eq!(
            redact("postgres://me:s3cret@db:5432/x?schema=a"),
            "postgres://me:***@db:5432/x?schema=a"
        );
        assert_eq!(redact("postgres://me@db/x"), "postgres://me@db/x");
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
        let location = StoreLocation::parse("postgres://me:pw@h/db?schema=c1").unwrap();
        assert_eq!(
            location,
            StoreLocation::Postgres {
                url: "postgres://me:pw@h/db".into(),
                schema: Some("c1".into())
            }
        );
        assert!(!location.shown().contains("pw"));
        assert_eq!(
            StoreLocation::parse("sqlite").unwrap(),
            StoreLocation::DataDir
        );
        let err = StoreLocation::parse("mysql://u:pw@h/db").unwrap_err();
        assert!(err.contains("postgres://") && !err.contains("pw"), "{err}");
        let err = StoreLocation::parse("postgres://h/db?schema=Bad-Name").unwrap_err();
        assert!(err.contains("Bad-Name"), "{err}");
    }

    #[test]
    fn graph_services_default_to_a_schema_beside_the_control_store() {
        let cluster = StoreLocation::parse("postgres://u:p@h/db").unwrap();
        assert_eq!(
            default_graph_store(&cluster, Some("prod-eu")).as_deref(),
            Some("postgres://u:p@h/db?schema=deployd_prod_eu_graphs")
        );
        let named = StoreLocation::parse("postgres://u@h/db?sslmode=disable&schema=c1").unwrap();
        assert_eq!(
            default_graph_store(&named, None).as_deref(),
            Some("postgres://u@h/db?sslmode=disable&schema=c1_graphs")
        );
        assert_eq!(default_graph_store(&StoreLocation::DataDir, None), None);
    }
}
