//! [`PostgresStore`]: the control store in PostgreSQL, shared by the nodes of a cluster.
//!
//! Every time it writes is the database's clock (`clock_timestamp()`), not a node's: leases
//! and waits compare times written by different machines.
//!
//! Invariant: a task's log grows through its row (`tasks.last_seq`), so two nodes appending to
//! one task's log serialize on the row's lock and never take the same sequence number.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};
use tokio::sync::mpsc;

use super::rows;
use super::{
    CommitJob, ControlStore, NodeRecord, SCHEMA_VERSION, StoredDeployment, StoredRevision, Write,
    Written, finish_columns, redact, to_json,
};
use crate::{Error, EventKind, SessionInfo, TaskEvent, TaskInfo, TaskStatus};

/// The database's clock in milliseconds since the epoch.
macro_rules! now {
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    };
}

/// The columns of a task, which `rows::task` reads.
macro_rules! task_columns {
    () => {
        "id, deployment, service, session_id, input, status, attempt, result, error"
    };
}

/// The schema's migrations: `MIGRATIONS[n]` takes a store from version `n` to `n + 1`.
const MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE deployments (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        origin TEXT NOT NULL,
        base_path TEXT NOT NULL,
        origin_kind TEXT NOT NULL,
        created_at BIGINT NOT NULL
    )",
        "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL,
        state TEXT,
        created_at BIGINT NOT NULL
    )",
        "CREATE INDEX sessions_by_deployment ON sessions (deployment, created_at, id)",
        "CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL,
        service TEXT NOT NULL,
        session_id TEXT NOT NULL,
        input TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt BIGINT NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        owner TEXT,
        last_seq BIGINT NOT NULL DEFAULT 0
    )",
        "CREATE INDEX tasks_by_deployment ON tasks (deployment, created_at, id)",
        "CREATE INDEX tasks_by_session ON tasks (session_id)",
        "CREATE INDEX tasks_unfinished ON tasks (deployment, service, status, updated_at)
       WHERE status IN ('queued', 'running')",
        "CREATE INDEX tasks_ended ON tasks (updated_at) WHERE status IN ('succeeded', 'failed')",
        "CREATE TABLE events (
        task_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        attempt BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, seq)
    )",
        "CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        address TEXT,
        version TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        lease_until BIGINT NOT NULL
    )",
    ],
    &[
        "DROP INDEX tasks_ended",
        "CREATE INDEX tasks_ended ON tasks (updated_at)
       WHERE status IN ('succeeded', 'failed', 'cancelled')",
        "CREATE TABLE revisions (
        deployment TEXT NOT NULL,
        revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        by_whom TEXT NOT NULL,
        kind TEXT NOT NULL,
        rollback_of BIGINT,
        outcome TEXT NOT NULL,
        error TEXT,
        sources TEXT NOT NULL,
        spec TEXT NOT NULL,
        origin TEXT NOT NULL,
        base_path TEXT NOT NULL,
        origin_kind TEXT NOT NULL,
        PRIMARY KEY (deployment, revision)
    )",
    ],
];

/// The advisory lock taken while the schema is migrated, so that nodes starting together do
/// not race on it.
const SCHEMA_LOCK: i64 = 0x6465_706c_6f79_6402;

fn store_error(err: sqlx::Error) -> Error {
    Error::Store(err.to_string())
}

/// Splits `?schema=NAME` off a store URL; the schema must be a plain lowercase identifier.
pub(super) fn split_schema(url: &str) -> Result<(String, Option<String>), String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut schema = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("schema", name)) => schema = Some(name.to_owned()),
            _ => rest.push(pair),
        }
    }
    let Some(name) = schema else {
        return Ok((join_query(base, &rest), None));
    };
    let schema = name;
    let valid = schema
        .bytes()
        .enumerate()
        .all(|(i, c)| c == b'_' || c.is_ascii_lowercase() || (i > 0 && c.is_ascii_digit()));
    if schema.is_empty() || schema.len() > 63 || !valid {
        return Err(format!(
            "store {}: schema {schema:?} is not a plain lowercase identifier",
            redact(url)
        ));
    }
    Ok((join_query(base, &rest), Some(schema)))
}

fn join_query(base: &str, pairs: &[&str]) -> String {
    if pairs.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", pairs.join("&"))
    }
}

/// The control store in PostgreSQL, in one schema of one database. Several nodes share it:
/// every conditional write is one statement whose condition PostgreSQL re-checks on the row it
/// locked, so of two nodes racing on a task, one wins.
#[derive(Debug, Clone)]
pub(crate) struct PostgresStore {
    pool: PgPool,
    jobs: mpsc::UnboundedSender<CommitJob>,
    schema: Arc<str>,
    /// Once set (see [`PostgresStore::notify_as`]): the notes channel and this node's id; the
    /// writer then notes every entry it commits, in the same transaction.
    notes: Notes,
}

type Notes = Arc<std::sync::OnceLock<(String, String)>>;

impl PostgresStore {
    /// Where a page of `table` (`tasks` or `sessions`) of a deployment starts.
    async fn cursor<'a>(
        &self,
        table: &'static str,
        before: Option<&'a str>,
        deployment: &str,
    ) -> Result<rows::Cursor<'a>, Error> {
        let Some(id) = before else {
            return Ok(rows::Cursor::Newest);
        };
        // `table` is one of this file's names.
        let created: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT created_at FROM {table} WHERE id = $1 AND deployment = $2"
        )))
        .bind(id)
        .bind(deployment)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(rows::Cursor::of(id, created))
    }

    /// Connects to `url` and keeps the tables in `schema`, created or migrated as needed.
    /// Fails, naming the URL without its password, when PostgreSQL cannot be reached; and when
    /// the schema was written by a newer deployd.
    pub(crate) async fn connect(url: &str, schema: &str) -> Result<Self, Error> {
        let shown = redact(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|err| Error::Store(format!("invalid store URL {shown}: {err}")))?
            .options([("search_path", schema)])
            .application_name("deployd");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|err| {
                Error::Store(format!("cannot connect to PostgreSQL at {shown}: {err}"))
            })?;
        migrate(&pool, schema).await.map_err(|err| {
            Error::Store(format!(
                "cannot prepare the store at {shown} (schema {schema}): {err}"
            ))
        })?;
        let (jobs, queued) = mpsc::unbounded_channel();
        let notes = Notes::default();
        tokio::spawn(commit_jobs(pool.clone(), queued, Arc::clone(&notes)));
        Ok(Self {
            pool,
            jobs,
            schema: Arc::from(schema),
            notes,
        })
    }

    /// From now on, the entries the group commit writes are noted on the schema's notes
    /// channel as node `node`'s (see `notifier.rs`).
    pub(crate) fn notify_as(&self, node: &str) {
        let _ = self
            .notes
            .set((crate::notifier::channel(&self.schema), node.to_owned()));
    }

    /// The pool, for the notifier's listener.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema the tables are in.
    pub(crate) fn schema(&self) -> &str {
        &self.schema
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] under an advisory lock, in one transaction.
async fn migrate(pool: &PgPool, schema: &str) -> Result<(), Error> {
    let mut tx = pool.begin().await.map_err(store_error)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
    // The schema name was checked to be a plain identifier.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut *tx)
    .await
    .map_err(store_error)?;
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
    let version: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(store_error)?;
    let version = version.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(Error::Store(format!(
            "its schema version is {version}, written by a newer deployd; this one knows \
             versions up to {SCHEMA_VERSION}"
        )));
    }
    for migration in &MIGRATIONS[usize::try_from(version).unwrap_or(0)..] {
        for statement in *migration {
            sqlx::query(*statement)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
    }
    if version < SCHEMA_VERSION {
        sqlx::query("DELETE FROM schema_version")
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        sqlx::query("INSERT INTO schema_version VALUES ($1)")
            .bind(SCHEMA_VERSION)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
    }
    tx.commit().await.map_err(store_error)
}

/// The writer: commits each job in turn (so jobs commit in the order they were handed over),
/// retrying a failing one with backoff until it succeeds or the control plane closes.
async fn commit_jobs(pool: PgPool, mut queued: mpsc::UnboundedReceiver<CommitJob>, notes: Notes) {
    while let Some(job) = queued.recv().await {
        let mut pause = Duration::from_millis(50);
        let written = loop {
            match write_all(&pool, &job.writes, notes.get()).await {
                Ok(written) => break Ok(written),
                Err(err) if *job.closed.borrow() => break Err(err),
                Err(err) => {
                    job.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %err, writes = job.writes.len(), "cannot commit task log writes; retrying");
                    let mut closed = job.closed.clone();
                    let stop = tokio::select! {
                        () = tokio::time::sleep(pause) => false,
                        _ = closed.wait_for(|closed| *closed) => true,
                    };
                    if stop {
                        break Err(err);
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        };
        (job.done)(written);
    }
}

/// Commits `writes` in one transaction, in order; with `notes` (channel, node), notes the
/// entries appended in the same transaction.
async fn write_all(
    pool: &PgPool,
    writes: &[Write],
    notes: Option<&(String, String)>,
) -> Result<Vec<Written>, Error> {
    let mut tx = pool.begin().await.map_err(store_error)?;
    let mut written = Vec::with_capacity(writes.len());
    for write in writes {
        written.push(apply(&mut tx, write).await?);
    }
    if let Some((channel, node)) = notes {
        let payloads: Vec<String> = written
            .iter()
            .filter_map(|w| w.event.as_ref())
            .map(|event| crate::notifier::encode(node, &crate::notifier::Note::entry(event)))
            .collect();
        if !payloads.is_empty() {
            sqlx::query("SELECT pg_notify($1, payload) FROM UNNEST($2::TEXT[]) AS payload")
                .bind(channel)
                .bind(&payloads)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
    }
    tx.commit().await.map_err(store_error)?;
    Ok(written)
}

async fn apply(tx: &mut Transaction<'_, Postgres>, write: &Write) -> Result<Written, Error> {
    match write {
        Write::Create { task, new_session } => {
            if *new_session {
                sqlx::query(concat!(
                    "INSERT INTO sessions (id, deployment, state, created_at) VALUES ($1, $2, NULL, ",
                    now!(),
                    ")"
                ))
                .bind(&task.session_id)
                .bind(&task.deployment)
                .execute(&mut **tx)
                .await
                .map_err(store_error)?;
            }
            sqlx::query(concat!(
                "INSERT INTO tasks (id, deployment, service, session_id, input, status, attempt,
                   created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'queued', 0, ",
                now!(),
                ", ",
                now!(),
                ")"
            ))
            .bind(&task.id)
            .bind(&task.deployment)
            .bind(&task.service)
            .bind(&task.session_id)
            .bind(task.input.to_string())
            .execute(&mut **tx)
            .await
            .map_err(store_error)?;
            Ok(Written::applied(None))
        }
        Write::Running {
            task_id,
            attempt,
            node,
        } => {
            let row = sqlx::query(concat!(
                "UPDATE tasks SET status = 'running', attempt = $1, updated_at = ",
                now!(),
                ", owner = $3
                 WHERE id = $2 AND (status = 'queued' OR (status = 'running' AND
                   (owner IS NULL OR owner = $3 OR NOT EXISTS (SELECT 1 FROM nodes
                     WHERE nodes.id = tasks.owner AND nodes.lease_until >= ",
                now!(),
                "))))
                 RETURNING ",
                task_columns!(),
                ", (SELECT state FROM sessions WHERE sessions.id = tasks.session_id) AS state"
            ))
            .bind(i64::from(*attempt))
            .bind(task_id)
            .bind(&**node)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_error)?;
            let started = match row {
                Some(row) => {
                    let state: Option<String> = row.try_get("state").map_err(store_error)?;
                    Some((rows::task(&row)?, to_json(state)))
                }
                None => None,
            };
            Ok(Written {
                applied: started.is_some(),
                event: None,
                started,
            })
        }
        Write::Event {
            task_id,
            attempt,
            data,
        } => Ok(
            match append(tx, task_id, *attempt, EventKind::Event, data.clone()).await? {
                Some(event) => Written::applied(Some(event)),
                None => Written::not_applied(),
            },
        ),
        Write::Finish {
            task_id,
            session_id,
            attempt,
            outcome,
            state,
            only_if_queued,
            cancelled,
        } => {
            let (kind, data, status, result, error) = finish_columns(outcome, *cancelled);
            // A finished task stays as it ended: its first outcome is the one kept.
            let updated = sqlx::query(concat!(
                "UPDATE tasks SET status = $1, result = $2, error = $3, owner = NULL,
                   updated_at = ",
                now!(),
                " WHERE id = $4 AND status IN ($5, 'queued')"
            ))
            .bind(status.as_str())
            .bind(result)
            .bind(error)
            .bind(task_id)
            .bind(if *only_if_queued { "queued" } else { "running" })
            .execute(&mut **tx)
            .await
            .map_err(store_error)?
            .rows_affected();
            if updated == 0 {
                return Ok(Written::not_applied());
            }
            let event = append(tx, task_id, *attempt, kind, data).await?;
            if let Some(state) = state {
                sqlx::query("UPDATE sessions SET state = $1 WHERE id = $2")
                    .bind(state.to_string())
                    .bind(session_id)
                    .execute(&mut **tx)
                    .await
                    .map_err(store_error)?;
            }
            Ok(match event {
                Some(event) => Written::applied(Some(event)),
                None => Written::not_applied(),
            })
        }
    }
}

/// Appends an entry to a stored task's log; `None` when the task is not stored.
async fn append(
    tx: &mut Transaction<'_, Postgres>,
    task_id: &str,
    attempt: u32,
    kind: EventKind,
    data: Value,
) -> Result<Option<TaskEvent>, Error> {
    let seq: Option<i64> = sqlx::query_scalar(
        "WITH next AS (UPDATE tasks SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq)
         INSERT INTO events (task_id, seq, kind, data, attempt)
         SELECT $1, last_seq, $2, $3, $4 FROM next RETURNING seq",
    )
    .bind(task_id)
    .bind(kind.as_str())
    .bind(data.to_string())
    .bind(i64::from(attempt))
    .fetch_optional(&mut **tx)
    .await
    .map_err(store_error)?;
    Ok(seq.map(|seq| TaskEvent {
        task_id: task_id.to_owned(),
        seq: u64::try_from(seq).unwrap_or(0),
        kind,
        attempt,
        data,
    }))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl ControlStore for PostgresStore {
    async fn put_deployment(&self, d: &StoredDeployment) -> Result<(), Error> {
        sqlx::query(concat!(
            "INSERT INTO deployments (name, spec, origin, base_path, origin_kind, created_at)
             VALUES ($1, $2, $3, $4, $5, ",
            now!(),
            ") ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, origin = excluded.origin,
               base_path = excluded.base_path, origin_kind = excluded.origin_kind"
        ))
        .bind(&d.name)
        .bind(&d.spec)
        .bind(&d.origin)
        .bind(&d.base_path)
        .bind(&d.from)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn insert_deployment(&self, d: &StoredDeployment) -> Result<bool, Error> {
        let inserted = sqlx::query(concat!(
            "INSERT INTO deployments (name, spec, origin, base_path, origin_kind, created_at)
             VALUES ($1, $2, $3, $4, $5, ",
            now!(),
            ") ON CONFLICT (name) DO NOTHING"
        ))
        .bind(&d.name)
        .bind(&d.spec)
        .bind(&d.origin)
        .bind(&d.base_path)
        .bind(&d.from)
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(inserted > 0)
    }

    async fn deployment(&self, name: &str) -> Result<Option<StoredDeployment>, Error> {
        let row = sqlx::query(
            "SELECT name, spec, origin, base_path, origin_kind FROM deployments WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.as_ref().map(rows::deployment).transpose()
    }

    async fn deployments(&self) -> Result<Vec<StoredDeployment>, Error> {
        let rows = sqlx::query(
            "SELECT name, spec, origin, base_path, origin_kind FROM deployments
             ORDER BY created_at, name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(rows::deployment).collect()
    }

    async fn delete_deployment(&self, name: &str) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        for statement in [
            "DELETE FROM events WHERE task_id IN (SELECT id FROM tasks WHERE deployment = $1)",
            "DELETE FROM tasks WHERE deployment = $1",
            "DELETE FROM sessions WHERE deployment = $1",
            "DELETE FROM revisions WHERE deployment = $1",
            "DELETE FROM deployments WHERE name = $1",
        ] {
            sqlx::query(statement)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
        }
        tx.commit().await.map_err(store_error)
    }

    async fn create_session(&self, id: &str, deployment: &str) -> Result<(), Error> {
        sqlx::query(concat!(
            "INSERT INTO sessions (id, deployment, state, created_at) VALUES ($1, $2, NULL, ",
            now!(),
            ")"
        ))
        .bind(id)
        .bind(deployment)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn session(&self, id: &str) -> Result<Option<(String, Option<Value>)>, Error> {
        let row = sqlx::query("SELECT deployment, state FROM sessions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        row.map(|row| {
            let deployment: String = row.try_get("deployment").map_err(store_error)?;
            let state: Option<String> = row.try_get("state").map_err(store_error)?;
            Ok((deployment, to_json(state)))
        })
        .transpose()
    }

    async fn sessions(&self, deployment: &str) -> Result<Vec<SessionInfo>, Error> {
        let rows = sqlx::query(
            "SELECT s.id AS id, s.state AS state, t.id AS task_id
             FROM sessions s LEFT JOIN tasks t ON t.session_id = s.id
             WHERE s.deployment = $1
             ORDER BY s.created_at, s.id, t.created_at, t.id",
        )
        .bind(deployment)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows::sessions(&rows)
    }

    async fn search_sessions(
        &self,
        deployment: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<SessionInfo>>, Error> {
        let cursor = match self.cursor("sessions", before, deployment).await? {
            rows::Cursor::Newest => None,
            rows::Cursor::Before(created_at, id) => Some((created_at, id)),
            rows::Cursor::Missing => return Ok(None),
        };
        let sql = rows::session_search_statement(cursor.is_some(), |n| format!("${n}"));
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(deployment);
        if let Some((created_at, id)) = cursor {
            query = query.bind(created_at).bind(id);
        }
        let rows = query
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows::sessions(&rows).map(Some)
    }

    async fn delete_session(&self, deployment: &str, id: &str) -> Result<bool, Error> {
        let deleted = sqlx::query("DELETE FROM sessions WHERE id = $1 AND deployment = $2")
            .bind(id)
            .bind(deployment)
            .execute(&self.pool)
            .await
            .map_err(store_error)?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn task(&self, id: &str) -> Result<Option<TaskInfo>, Error> {
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.as_ref().map(rows::task).transpose()
    }

    async fn task_record(&self, id: &str) -> Result<Option<crate::TaskRecord>, Error> {
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            ", created_at, updated_at FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.as_ref().map(rows::task_record).transpose()
    }

    async fn search_tasks(
        &self,
        deployment: &str,
        filter: &crate::TaskFilter,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<crate::TaskRecord>>, Error> {
        let cursor = match self.cursor("tasks", before, deployment).await? {
            rows::Cursor::Newest => None,
            rows::Cursor::Before(created_at, id) => Some((created_at, id)),
            rows::Cursor::Missing => return Ok(None),
        };
        let sql = rows::search_statement(filter, cursor.is_some(), |n| format!("${n}"));
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(deployment);
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(service) = &filter.service {
            query = query.bind(service.as_str());
        }
        if let Some((created_at, id)) = cursor {
            query = query.bind(created_at).bind(id);
        }
        let rows = query
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter()
            .map(rows::task_record)
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    async fn add_revision(&self, r: &StoredRevision) -> Result<u64, Error> {
        let sources = serde_json::to_string(&r.sources).unwrap_or_else(|_| "{}".to_owned());
        // Two nodes numbering a revision of one deployment at once: one insert conflicts on
        // the key, and numbers again.
        let mut tries = 0;
        loop {
            let number: Result<i64, sqlx::Error> = sqlx::query_scalar(
                "INSERT INTO revisions (deployment, revision, created_at, by_whom, kind,
                   rollback_of, outcome, error, sources, spec, origin, base_path, origin_kind)
                 SELECT $1, COALESCE(MAX(revision), 0) + 1, $2, $3, $4, $5, $6, $7, $8, $9,
                   $10, $11, $12 FROM revisions WHERE deployment = $1
                 RETURNING revision",
            )
            .bind(&r.deployment)
            .bind(r.created_ms)
            .bind(&r.by)
            .bind(&r.kind)
            .bind(r.rollback_of.map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
            .bind(&r.outcome)
            .bind(&r.error)
            .bind(&sources)
            .bind(&r.spec)
            .bind(&r.origin)
            .bind(&r.base_path)
            .bind(&r.from)
            .fetch_one(&self.pool)
            .await;
            match number {
                Ok(number) => return Ok(u64::try_from(number).unwrap_or(0)),
                Err(sqlx::Error::Database(err)) if err.is_unique_violation() && tries < 5 => {
                    tries += 1;
                }
                Err(err) => return Err(store_error(err)),
            }
        }
    }

    async fn end_revision(
        &self,
        deployment: &str,
        revision: u64,
        outcome: &str,
        error: Option<&str>,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE revisions SET outcome = $1, error = $2 WHERE deployment = $3 AND revision = $4",
        )
        .bind(outcome)
        .bind(error)
        .bind(deployment)
        .bind(i64::try_from(revision).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(store_error)
        .map(drop)
    }

    async fn revisions(
        &self,
        deployment: &str,
        limit: usize,
    ) -> Result<Vec<StoredRevision>, Error> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM revisions WHERE deployment = $1 ORDER BY revision DESC LIMIT $2",
            rows::REVISION_COLUMNS
        )))
        .bind(deployment)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(rows::revision).collect()
    }

    async fn revision(
        &self,
        deployment: &str,
        revision: u64,
    ) -> Result<Option<StoredRevision>, Error> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM revisions WHERE deployment = $1 AND revision = $2",
            rows::REVISION_COLUMNS
        )))
        .bind(deployment)
        .bind(i64::try_from(revision).unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        row.as_ref().map(rows::revision).transpose()
    }

    async fn tasks(&self, deployment: &str) -> Result<Vec<TaskInfo>, Error> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE deployment = $1 ORDER BY created_at, id"
        ))
        .bind(deployment)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows::tasks(&rows)
    }

    async fn tasks_page(
        &self,
        deployment: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Option<Vec<TaskInfo>>, Error> {
        let rows = match after {
            None => sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE deployment = $1 ORDER BY created_at, id LIMIT $2"
            ))
            .bind(deployment)
            .bind(limit(count))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?,
            Some(after) => {
                let cursor: Option<i64> = sqlx::query_scalar(
                    "SELECT created_at FROM tasks WHERE id = $1 AND deployment = $2",
                )
                .bind(after)
                .bind(deployment)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
                let Some(created_at) = cursor else {
                    return Ok(None);
                };
                sqlx::query(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE deployment = $1 AND (created_at, id) > ($2, $3)
                     ORDER BY created_at, id LIMIT $4"
                ))
                .bind(deployment)
                .bind(created_at)
                .bind(after)
                .bind(limit(count))
                .fetch_all(&self.pool)
                .await
                .map_err(store_error)?
            }
        };
        rows::tasks(&rows).map(Some)
    }

    async fn task_counts(&self) -> Result<Vec<crate::TaskCount>, Error> {
        let rows = sqlx::query(
            "SELECT deployment, service, status, COUNT(*) AS n, MIN(created_at) AS oldest
             FROM tasks GROUP BY deployment, service, status
             ORDER BY deployment, service, status",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(rows::task_count).collect()
    }

    async fn task_durations(&self, bounds: &[f64]) -> Result<Vec<crate::TaskDurations>, Error> {
        // Only numbers of ours are written into the statement.
        let rows = sqlx::query(sqlx::AssertSqlSafe(rows::durations_statement(bounds)))
            .fetch_all(&self.pool)
            .await
            .map_err(store_error)?;
        rows.iter()
            .map(|row| rows::durations(row, bounds.len()))
            .collect()
    }

    async fn prune_ended(&self, before: i64, count: usize) -> Result<usize, Error> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let ids: Vec<String> = sqlx::query_scalar(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks
               WHERE status IN ('succeeded', 'failed', 'cancelled') AND updated_at < $1
               LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .bind(before)
        .bind(limit(count))
        .fetch_all(&mut *tx)
        .await
        .map_err(store_error)?;
        sqlx::query("DELETE FROM events WHERE task_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        Ok(ids.len())
    }

    async fn unfinished_tasks(&self, deployment: &str) -> Result<Vec<TaskInfo>, Error> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE deployment = $1 AND status IN ('queued', 'running')
             ORDER BY created_at, id"
        ))
        .bind(deployment)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows::tasks(&rows)
    }

    async fn set_task_status(
        &self,
        id: &str,
        status: TaskStatus,
        attempt: u32,
    ) -> Result<bool, Error> {
        let updated = sqlx::query(concat!(
            "UPDATE tasks SET status = $1, attempt = $2, updated_at = ",
            now!(),
            " WHERE id = $3 AND status IN ('queued', 'running')"
        ))
        .bind(status.as_str())
        .bind(i64::from(attempt))
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(store_error)?
        .rows_affected();
        Ok(updated > 0)
    }

    async fn requeue(&self, id: &str) -> Result<(), Error> {
        sqlx::query(concat!(
            "UPDATE tasks SET status = 'queued', updated_at = ",
            now!(),
            " WHERE id = $1 AND status = 'running'"
        ))
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn waiting_tasks(
        &self,
        deployment: &str,
        service: &str,
        before: i64,
        count: usize,
    ) -> Result<Vec<TaskInfo>, Error> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE deployment = $1 AND service = $2 AND status = 'queued'
               AND status IN ('queued', 'running') AND updated_at < $3
             ORDER BY updated_at, id LIMIT $4"
        ))
        .bind(deployment)
        .bind(service)
        .bind(before)
        .bind(limit(count))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows::tasks(&rows)
    }

    async fn log_after(
        &self,
        task_id: &str,
        after: u64,
    ) -> Result<Option<(Vec<TaskEvent>, bool)>, Error> {
        let rows = sqlx::query(
            "SELECT t.status AS status, e.seq AS seq, e.kind AS kind, e.data AS data,
                    e.attempt AS attempt
             FROM tasks t LEFT JOIN events e ON e.task_id = t.id AND e.seq > $1
             WHERE t.id = $2 ORDER BY e.seq",
        )
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(task_id)
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows::log(task_id, &rows)
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<Written>, Error> {
        write_all(&self.pool, &writes, self.notes.get()).await
    }

    fn commit(&self, job: CommitJob) -> Result<(), Error> {
        self.jobs
            .send(job)
            .map_err(|_| Error::Store("the store's writer has stopped".to_owned()))
    }

    async fn hold_lease(
        &self,
        id: &str,
        address: Option<&str>,
        version: &str,
        ttl_ms: i64,
    ) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        // Nodes joining at once check each other's versions one after the other.
        sqlx::query("LOCK TABLE nodes IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
        let other: Option<(String, String)> = sqlx::query_as(concat!(
            "SELECT id, version FROM nodes WHERE id <> $1 AND version <> $2 AND lease_until >= ",
            now!(),
            " LIMIT 1"
        ))
        .bind(id)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(store_error)?;
        if let Some((other, theirs)) = other {
            return Err(Error::Store(super::sqlite::version_conflict(
                version, &other, &theirs,
            )));
        }
        sqlx::query(concat!(
            "INSERT INTO nodes (id, address, version, started_at, lease_until)
             VALUES ($1, $2, $3, ",
            now!(),
            ", ",
            now!(),
            " + $4)
             ON CONFLICT (id) DO UPDATE SET address = excluded.address,
               version = excluded.version, lease_until = excluded.lease_until,
               started_at = CASE WHEN nodes.lease_until < excluded.started_at
                 THEN excluded.started_at ELSE nodes.started_at END"
        ))
        .bind(id)
        .bind(address)
        .bind(version)
        .bind(ttl_ms)
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(store_error)
    }

    async fn release_lease(&self, id: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn nodes(&self) -> Result<(Vec<NodeRecord>, i64), Error> {
        let mut tx = self.pool.begin().await.map_err(store_error)?;
        let rows = sqlx::query(
            "SELECT id, address, version, started_at, lease_until FROM nodes ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(store_error)?;
        let now: i64 = sqlx::query_scalar(concat!("SELECT ", now!()))
            .fetch_one(&mut *tx)
            .await
            .map_err(store_error)?;
        tx.commit().await.map_err(store_error)?;
        let nodes = rows
            .iter()
            .map(rows::node)
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((nodes, now))
    }

    async fn owner(&self, task_id: &str) -> Result<Option<String>, Error> {
        let owner: Option<Option<String>> =
            sqlx::query_scalar("SELECT owner FROM tasks WHERE id = $1 AND status = 'running'")
                .bind(task_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_error)?;
        Ok(owner.flatten())
    }

    async fn take_orphans(&self) -> Result<Vec<TaskInfo>, Error> {
        // `SKIP LOCKED`: of two nodes taking orphans at once, each task goes to one.
        let rows = sqlx::query(concat!(
            "UPDATE tasks SET status = 'queued', owner = NULL, updated_at = ",
            now!(),
            " WHERE id IN (SELECT id FROM tasks WHERE status = 'running' AND (owner IS NULL OR
               NOT EXISTS (SELECT 1 FROM nodes WHERE nodes.id = tasks.owner
                 AND nodes.lease_until >= ",
            now!(),
            ")) FOR UPDATE SKIP LOCKED)
             RETURNING ",
            task_columns!()
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(store_error)?;
        rows::tasks(&rows)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
