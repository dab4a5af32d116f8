//! [`SqliteStore`]: the control store in a SQLite file of the data directory (one node).

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::OptionalExtension;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::watch;

use super::rows;
use super::{
    CommitJob, ControlStore, NodeRecord, SCHEMA_VERSION, StoredDeployment, StoredRevision, Write,
    Written, finish_columns, now_ms, restrict, to_json,
};
use crate::writer::{Writer, sqlite_error};
use crate::{Error, EventKind, SessionInfo, TaskEvent, TaskInfo, TaskStatus};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS deployments (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        origin TEXT NOT NULL,
        base_path TEXT NOT NULL,
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL,
        state TEXT,
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tasks (
        id TEXT PRIMARY KEY,
        deployment TEXT NOT NULL,
        service TEXT NOT NULL,
        session_id TEXT NOT NULL,
        input TEXT NOT NULL,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS tasks_by_deployment ON tasks (deployment, created_at)",
    // A session's tasks, and a deployment's sessions newest first (schema version 2).
    "CREATE INDEX IF NOT EXISTS tasks_by_session ON tasks (session_id)",
    // Superseded by `tasks_unfinished`, which holds only the tasks that have not ended.
    "DROP INDEX IF EXISTS tasks_by_status",
    "CREATE TABLE IF NOT EXISTS events (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID",
    "DROP INDEX IF EXISTS tasks_waiting",
    // Only the tasks that have not ended: a task leaves it when it ends, so the index stays as
    // small as the work in flight, and a task's writes touch one index entry, not two.
    "CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (deployment, service, status, updated_at)
       WHERE status IN ('queued', 'running')",
    // The leases of the nodes that use the store: one, with SQLite.
    "CREATE TABLE IF NOT EXISTS nodes (
        id TEXT PRIMARY KEY,
        address TEXT,
        version TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        lease_until INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sessions_by_deployment ON sessions (deployment, created_at, id)",
    // Every deploy, reload and rollback of a deployment (schema version 2).
    "CREATE TABLE IF NOT EXISTS revisions (
        deployment TEXT NOT NULL,
        revision INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        by_whom TEXT NOT NULL,
        kind TEXT NOT NULL,
        rollback_of INTEGER,
        outcome TEXT NOT NULL,
        error TEXT,
        sources TEXT NOT NULL,
        spec TEXT NOT NULL,
        origin TEXT NOT NULL,
        base_path TEXT NOT NULL,
        origin_kind TEXT NOT NULL,
        PRIMARY KEY (deployment, revision)
    )",
];

/// Columns added after a table was first created: `(table, column, definition)`, added to a
/// store made by an older deployd.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("events", "attempt", "INTEGER NOT NULL DEFAULT 0"),
    // Files stored before deployd told their origins apart were read with every variable.
    (
        "deployments",
        "origin_kind",
        "TEXT NOT NULL DEFAULT 'operator'",
    ),
    // The node a running task runs on.
    ("tasks", "owner", "TEXT"),
];

fn store_error(err: sqlx::Error) -> Error {
    Error::Store(err.to_string())
}

/// The SQLite control store.
///
/// Every write goes through one connection, on the writer's own thread ([`Writer`]), and every
/// transaction on it starts with `BEGIN IMMEDIATE`: deployd never has two writers racing for
/// SQLite's lock, so no write fails with `SQLITE_BUSY` (a deferred transaction that reads, then
/// writes after another connection committed, fails with `SQLITE_BUSY_SNAPSHOT`, which no busy
/// timeout retries). Reads use their own small pool (sqlx) and never block the writer (WAL).
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    read: SqlitePool,
    write: Writer,
}

impl SqliteStore {
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
        let created: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT created_at FROM {table} WHERE id = ? AND deployment = ?"
        )))
        .bind(id)
        .bind(deployment)
        .fetch_optional(&self.read)
        .await
        .map_err(store_error)?;
        Ok(rows::Cursor::of(id, created))
    }

    pub(crate) async fn open(path: &Path) -> Result<Self, Error> {
        let write = Writer::open(path)?;
        // The database holds literal secrets of deployment files: only its owner reads it.
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            restrict(Path::new(&file));
        }
        let shown = path.display().to_string();
        write
            .call(move |conn| {
                let failed = |err: rusqlite::Error| {
                    Error::Store(format!("cannot prepare the store {shown}: {err}"))
                };
                for statement in SCHEMA {
                    conn.execute_batch(statement).map_err(failed)?;
                }
                for (table, column, definition) in ADDED_COLUMNS {
                    let present = conn
                        .query_row(
                            // The names are this file's constants.
                            &format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?"),
                            [column],
                            |_| Ok(()),
                        )
                        .optional()
                        .map_err(failed)?
                        .is_some();
                    if !present {
                        conn.execute_batch(&format!(
                            "ALTER TABLE {table} ADD COLUMN {column} {definition}"
                        ))
                        .map_err(failed)?;
                    }
                }
                let version: Option<i64> = conn
                    .query_row("SELECT MAX(version) FROM schema_version", [], |row| {
                        row.get(0)
                    })
                    .map_err(failed)?;
                match version {
                    Some(version) if version > SCHEMA_VERSION => {
                        return Err(Error::Store(format!(
                            "the store {shown} has schema version {version}, written by a newer \
                             deployd; this one knows versions up to {SCHEMA_VERSION}"
                        )));
                    }
                    Some(version) if version == SCHEMA_VERSION => {}
                    _ => {
                        conn.execute("DELETE FROM schema_version", [])
                            .map_err(failed)?;
                        conn.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
                            .map_err(failed)?;
                    }
                }
                Ok(())
            })
            .await?;
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(store_error)?
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(30));
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(|err| Error::Store(format!("cannot open {}: {err}", path.display())))?;
        Ok(Self { read, write })
    }
}

#[async_trait]
impl ControlStore for SqliteStore {
    async fn close(&self) {
        self.read.close().await;
    }

    async fn put_deployment(&self, d: &StoredDeployment) -> Result<(), Error> {
        let d = d.clone();
        self.write
            .call(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO deployments (name, spec, origin, base_path, origin_kind,
                       created_at) VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (name) DO UPDATE SET spec = excluded.spec,
                       origin = excluded.origin, base_path = excluded.base_path,
                       origin_kind = excluded.origin_kind",
                )
                .and_then(|mut statement| {
                    statement.execute(rusqlite::params![
                        d.name,
                        d.spec,
                        d.origin,
                        d.base_path,
                        d.from,
                        now_ms()
                    ])
                })
                .map_err(sqlite_error)?;
                Ok(())
            })
            .await
    }

    async fn deployments(&self) -> Result<Vec<StoredDeployment>, Error> {
        let rows = sqlx::query(
            "SELECT name, spec, origin, base_path, origin_kind FROM deployments
             ORDER BY created_at, name",
        )
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        rows.iter().map(rows::deployment).collect()
    }

    /// Removes a deployment with its tasks, events and sessions, in one transaction.
    async fn delete_deployment(&self, name: &str) -> Result<(), Error> {
        let name = name.to_owned();
        self.write
            .transaction(move |tx| {
                for statement in [
                    "DELETE FROM events WHERE task_id IN
                       (SELECT id FROM tasks WHERE deployment = ?)",
                    "DELETE FROM tasks WHERE deployment = ?",
                    "DELETE FROM sessions WHERE deployment = ?",
                    "DELETE FROM revisions WHERE deployment = ?",
                    "DELETE FROM deployments WHERE name = ?",
                ] {
                    tx.execute(statement, [&name]).map_err(sqlite_error)?;
                }
                Ok(())
            })
            .await
    }

    async fn create_session(&self, id: &str, deployment: &str) -> Result<(), Error> {
        let (id, deployment) = (id.to_owned(), deployment.to_owned());
        self.write
            .call(move |conn| {
                conn.prepare_cached(
                    "INSERT INTO sessions (id, deployment, state, created_at)
                     VALUES (?, ?, NULL, ?)",
                )
                .and_then(|mut statement| {
                    statement.execute(rusqlite::params![id, deployment, now_ms()])
                })
                .map_err(sqlite_error)?;
                Ok(())
            })
            .await
    }

    /// The session's deployment and state, if the session exists.
    async fn session(&self, id: &str) -> Result<Option<(String, Option<Value>)>, Error> {
        let row = sqlx::query("SELECT deployment, state FROM sessions WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await
            .map_err(store_error)?;
        row.map(|row| {
            let deployment: String = row.try_get("deployment").map_err(store_error)?;
            let state: Option<String> = row.try_get("state").map_err(store_error)?;
            Ok((deployment, to_json(state)))
        })
        .transpose()
    }

    /// The sessions of a deployment with their task ids and state, oldest first.
    async fn sessions(&self, deployment: &str) -> Result<Vec<SessionInfo>, Error> {
        let rows = sqlx::query(
            "SELECT s.id AS id, s.state AS state, t.id AS task_id
             FROM sessions s LEFT JOIN tasks t ON t.session_id = s.id
             WHERE s.deployment = ?
             ORDER BY s.created_at, s.id, t.created_at, t.id",
        )
        .bind(deployment)
        .fetch_all(&self.read)
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
        let sql = rows::session_search_statement(cursor.is_some(), |_| "?".to_owned());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(deployment);
        if let Some((created_at, id)) = cursor {
            query = query.bind(created_at).bind(id);
        }
        let rows = query
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.read)
            .await
            .map_err(store_error)?;
        rows::sessions(&rows).map(Some)
    }

    /// Deletes a session; its tasks stay readable. Returns whether it existed.
    async fn delete_session(&self, deployment: &str, id: &str) -> Result<bool, Error> {
        let (id, deployment) = (id.to_owned(), deployment.to_owned());
        self.write
            .call(move |conn| {
                let deleted = conn
                    .execute(
                        "DELETE FROM sessions WHERE id = ? AND deployment = ?",
                        [&id, &deployment],
                    )
                    .map_err(sqlite_error)?;
                Ok(deleted > 0)
            })
            .await
    }

    async fn task(&self, id: &str) -> Result<Option<TaskInfo>, Error> {
        let row = sqlx::query(
            "SELECT id, deployment, service, session_id, input, status, attempt, result, error
             FROM tasks WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.read)
        .await
        .map_err(store_error)?;
        row.as_ref().map(rows::task).transpose()
    }

    async fn task_record(&self, id: &str) -> Result<Option<crate::TaskRecord>, Error> {
        let row = sqlx::query(
            "SELECT id, deployment, service, session_id, input, status, attempt, result, error,
               created_at, updated_at
             FROM tasks WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.read)
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
        let sql = rows::search_statement(filter, cursor.is_some(), |_| "?".to_owned());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(deployment);
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
            .fetch_all(&self.read)
            .await
            .map_err(store_error)?;
        rows.iter()
            .map(rows::task_record)
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    async fn add_revision(&self, revision: &StoredRevision) -> Result<u64, Error> {
        let r = revision.clone();
        let sources = serde_json::to_string(&r.sources).unwrap_or_else(|_| "{}".to_owned());
        self.write
            .call(move |conn| {
                let number: i64 = conn
                    .prepare_cached(
                        "INSERT INTO revisions (deployment, revision, created_at, by_whom, kind,
                           rollback_of, outcome, error, sources, spec, origin, base_path,
                           origin_kind)
                         SELECT ?1, COALESCE(MAX(revision), 0) + 1, ?2, ?3, ?4, ?5, ?6, ?7, ?8,
                           ?9, ?10, ?11, ?12 FROM revisions WHERE deployment = ?1
                         RETURNING revision",
                    )
                    .and_then(|mut statement| {
                        statement.query_row(
                            rusqlite::params![
                                r.deployment,
                                r.created_ms,
                                r.by,
                                r.kind,
                                r.rollback_of.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
                                r.outcome,
                                r.error,
                                sources,
                                r.spec,
                                r.origin,
                                r.base_path,
                                r.from,
                            ],
                            |row| row.get(0),
                        )
                    })
                    .map_err(sqlite_error)?;
                Ok(u64::try_from(number).unwrap_or(0))
            })
            .await
    }

    async fn end_revision(
        &self,
        deployment: &str,
        revision: u64,
        outcome: &str,
        error: Option<&str>,
    ) -> Result<(), Error> {
        let (deployment, outcome) = (deployment.to_owned(), outcome.to_owned());
        let error = error.map(str::to_owned);
        let revision = i64::try_from(revision).unwrap_or(i64::MAX);
        self.write
            .call(move |conn| {
                conn.prepare_cached(
                    "UPDATE revisions SET outcome = ?, error = ?
                     WHERE deployment = ? AND revision = ?",
                )
                .and_then(|mut statement| {
                    statement.execute(rusqlite::params![outcome, error, deployment, revision])
                })
                .map_err(sqlite_error)?;
                Ok(())
            })
            .await
    }

    async fn revisions(
        &self,
        deployment: &str,
        limit: usize,
    ) -> Result<Vec<StoredRevision>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM revisions WHERE deployment = ? ORDER BY revision DESC LIMIT ?",
            rows::REVISION_COLUMNS
        )))
        .bind(deployment)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        rows.iter().map(rows::revision).collect()
    }

    async fn revision(
        &self,
        deployment: &str,
        revision: u64,
    ) -> Result<Option<StoredRevision>, Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM revisions WHERE deployment = ? AND revision = ?",
            rows::REVISION_COLUMNS
        )))
        .bind(deployment)
        .bind(i64::try_from(revision).unwrap_or(i64::MAX))
        .fetch_optional(&self.read)
        .await
        .map_err(store_error)?;
        row.as_ref().map(rows::revision).transpose()
    }

    async fn tasks(&self, deployment: &str) -> Result<Vec<TaskInfo>, Error> {
        let rows = sqlx::query(
            "SELECT id, deployment, service, session_id, input, status, attempt, result, error
             FROM tasks WHERE deployment = ? ORDER BY created_at, id",
        )
        .bind(deployment)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        rows::tasks(&rows)
    }

    /// At most `limit` tasks of a deployment, oldest first, starting after the task `after`
    /// (in the same order); `None` when `after` names no task of the deployment.
    async fn tasks_page(
        &self,
        deployment: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<TaskInfo>>, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            None => sqlx::query(
                "SELECT id, deployment, service, session_id, input, status, attempt, result, error
                 FROM tasks WHERE deployment = ? ORDER BY created_at, id LIMIT ?",
            )
            .bind(deployment)
            .bind(limit)
            .fetch_all(&self.read)
            .await
            .map_err(store_error)?,
            Some(after) => {
                let cursor =
                    sqlx::query("SELECT created_at FROM tasks WHERE id = ? AND deployment = ?")
                        .bind(after)
                        .bind(deployment)
                        .fetch_optional(&self.read)
                        .await
                        .map_err(store_error)?;
                let Some(cursor) = cursor else {
                    return Ok(None);
                };
                let created_at: i64 = cursor.try_get("created_at").map_err(store_error)?;
                sqlx::query(
                    "SELECT id, deployment, service, session_id, input, status, attempt, result,
                       error
                     FROM tasks WHERE deployment = ? AND (created_at, id) > (?, ?)
                     ORDER BY created_at, id LIMIT ?",
                )
                .bind(deployment)
                .bind(created_at)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.read)
                .await
                .map_err(store_error)?
            }
        };
        rows.iter()
            .map(rows::task)
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    async fn task_counts(&self) -> Result<Vec<crate::TaskCount>, Error> {
        let rows = sqlx::query(
            "SELECT deployment, service, status, COUNT(*) AS n, MIN(created_at) AS oldest
             FROM tasks GROUP BY deployment, service, status
             ORDER BY deployment, service, status",
        )
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        rows.iter().map(rows::task_count).collect()
    }

    async fn task_durations(&self, bounds: &[f64]) -> Result<Vec<crate::TaskDurations>, Error> {
        // Only numbers of ours are written into the statement.
        let rows = sqlx::query(sqlx::AssertSqlSafe(rows::durations_statement(bounds)))
            .fetch_all(&self.read)
            .await
            .map_err(store_error)?;
        rows.iter()
            .map(|row| rows::durations(row, bounds.len()))
            .collect()
    }

    /// Deletes up to `limit` tasks that ended before `before` (ms since the epoch), with their
    /// events; how many.
    async fn prune_ended(&self, before: i64, limit: usize) -> Result<usize, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.write
            .transaction(move |tx| {
                let ids: Vec<String> = tx
                    .prepare_cached(
                        "SELECT id FROM tasks WHERE status IN ('succeeded', 'failed', 'cancelled')
                         AND updated_at < ? LIMIT ?",
                    )
                    .and_then(|mut statement| {
                        statement
                            .query_map(rusqlite::params![before, limit], |row| row.get(0))?
                            .collect()
                    })
                    .map_err(sqlite_error)?;
                for id in &ids {
                    tx.prepare_cached("DELETE FROM events WHERE task_id = ?")
                        .and_then(|mut statement| statement.execute([id]))
                        .map_err(sqlite_error)?;
                    tx.prepare_cached("DELETE FROM tasks WHERE id = ?")
                        .and_then(|mut statement| statement.execute([id]))
                        .map_err(sqlite_error)?;
                }
                Ok(ids.len())
            })
            .await
    }

    async fn unfinished_tasks(&self, deployment: &str) -> Result<Vec<TaskInfo>, Error> {
        let rows = sqlx::query(
            "SELECT id, deployment, service, session_id, input, status, attempt, result, error
             FROM tasks INDEXED BY tasks_unfinished
             WHERE deployment = ? AND status IN ('queued', 'running')
             ORDER BY created_at, id",
        )
        .bind(deployment)
        .fetch_all(&self.read)
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
        // A task that has ended stays as it ended.
        let id = id.to_owned();
        self.write
            .call(move |conn| {
                let updated = conn
                    .prepare_cached(
                        "UPDATE tasks SET status = ?, attempt = ?, updated_at = ?
                         WHERE id = ? AND status IN ('queued', 'running')",
                    )
                    .and_then(|mut statement| {
                        statement.execute(rusqlite::params![
                            status.as_str(),
                            i64::from(attempt),
                            now_ms(),
                            id
                        ])
                    })
                    .map_err(sqlite_error)?;
                Ok(updated > 0)
            })
            .await
    }

    /// Puts a task that was cut off while running back to `queued`, keeping its attempt.
    async fn requeue(&self, id: &str) -> Result<(), Error> {
        let id = id.to_owned();
        self.write
            .call(move |conn| {
                conn.execute(
                    "UPDATE tasks SET status = 'queued', updated_at = ?
                     WHERE id = ? AND status = 'running'",
                    rusqlite::params![now_ms(), id],
                )
                .map_err(sqlite_error)?;
                Ok(())
            })
            .await
    }

    /// Tasks of a service that have waited in `queued` since before `before` (ms since the
    /// epoch), oldest first, at most `limit`.
    async fn waiting_tasks(
        &self,
        deployment: &str,
        service: &str,
        before: i64,
        limit: usize,
    ) -> Result<Vec<TaskInfo>, Error> {
        let rows = sqlx::query(
            "SELECT id, deployment, service, session_id, input, status, attempt, result, error
             FROM tasks INDEXED BY tasks_unfinished
             WHERE deployment = ? AND service = ? AND status = 'queued'
               AND status IN ('queued', 'running')
               AND updated_at < ?
             ORDER BY updated_at, id LIMIT ?",
        )
        .bind(deployment)
        .bind(service)
        .bind(before)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        rows::tasks(&rows)
    }

    /// The entries of a task's log after `after`, and whether the task had ended, read in one
    /// statement (so the two agree); `None` when the task is not stored.
    async fn log_after(
        &self,
        task_id: &str,
        after: u64,
    ) -> Result<Option<(Vec<TaskEvent>, bool)>, Error> {
        let rows = sqlx::query(
            "SELECT t.status AS status, e.seq AS seq, e.kind AS kind, e.data AS data,
                    e.attempt AS attempt
             FROM tasks t LEFT JOIN events e ON e.task_id = t.id AND e.seq > ?
             WHERE t.id = ? ORDER BY e.seq",
        )
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(task_id)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        rows::log(task_id, &rows)
    }

    async fn insert_deployment(&self, d: &StoredDeployment) -> Result<bool, Error> {
        let d = d.clone();
        self.write
            .call(move |conn| {
                let inserted = conn
                    .prepare_cached(
                        "INSERT INTO deployments (name, spec, origin, base_path, origin_kind,
                           created_at) VALUES (?, ?, ?, ?, ?, ?)
                         ON CONFLICT (name) DO NOTHING",
                    )
                    .and_then(|mut statement| {
                        statement.execute(rusqlite::params![
                            d.name,
                            d.spec,
                            d.origin,
                            d.base_path,
                            d.from,
                            now_ms()
                        ])
                    })
                    .map_err(sqlite_error)?;
                Ok(inserted > 0)
            })
            .await
    }

    async fn deployment(&self, name: &str) -> Result<Option<StoredDeployment>, Error> {
        let row = sqlx::query(
            "SELECT name, spec, origin, base_path, origin_kind FROM deployments WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.read)
        .await
        .map_err(store_error)?;
        row.as_ref().map(rows::deployment).transpose()
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<Written>, Error> {
        self.write.call(move |conn| write_in(conn, &writes)).await
    }

    fn commit(&self, job: CommitJob) -> Result<(), Error> {
        self.write.spawn(move |conn| {
            let written = commit_until_closed(conn, &job.writes, &job.closed, &job.failures);
            (job.done)(written);
        })
    }

    fn commit_here(&self, writes: &[Write]) -> Option<Result<Vec<Written>, Error>> {
        self.write.run_here(|conn| write_in(conn, writes))
    }

    async fn hold_lease(
        &self,
        id: &str,
        address: Option<&str>,
        version: &str,
        ttl_ms: i64,
    ) -> Result<(), Error> {
        let (id, address, version) = (
            id.to_owned(),
            address.map(str::to_owned),
            version.to_owned(),
        );
        self.write
            .transaction(move |tx| {
                let now = now_ms();
                let other: Option<(String, String)> = tx
                    .query_row(
                        "SELECT id, version FROM nodes
                         WHERE id <> ? AND version <> ? AND lease_until >= ? LIMIT 1",
                        rusqlite::params![id, version, now],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()
                    .map_err(sqlite_error)?;
                if let Some((other, theirs)) = other {
                    return Err(Error::Store(version_conflict(&version, &other, &theirs)));
                }
                tx.execute(
                    "INSERT INTO nodes (id, address, version, started_at, lease_until)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (id) DO UPDATE SET address = excluded.address,
                       version = excluded.version, lease_until = excluded.lease_until,
                       started_at = CASE WHEN nodes.lease_until < ?4 THEN excluded.started_at
                         ELSE nodes.started_at END",
                    rusqlite::params![id, address, version, now, now.saturating_add(ttl_ms)],
                )
                .map_err(sqlite_error)?;
                Ok(())
            })
            .await
    }

    async fn release_lease(&self, id: &str) -> Result<(), Error> {
        let id = id.to_owned();
        self.write
            .call(move |conn| {
                conn.execute("DELETE FROM nodes WHERE id = ?", [id])
                    .map_err(sqlite_error)?;
                Ok(())
            })
            .await
    }

    async fn nodes(&self) -> Result<(Vec<NodeRecord>, i64), Error> {
        let rows = sqlx::query(
            "SELECT id, address, version, started_at, lease_until FROM nodes ORDER BY id",
        )
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        let nodes = rows
            .iter()
            .map(rows::node)
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((nodes, now_ms()))
    }

    async fn owner(&self, task_id: &str) -> Result<Option<String>, Error> {
        let row = sqlx::query("SELECT owner FROM tasks WHERE id = ? AND status = 'running'")
            .bind(task_id)
            .fetch_optional(&self.read)
            .await
            .map_err(store_error)?;
        Ok(row.and_then(|row| row.try_get("owner").ok().flatten()))
    }

    async fn take_orphans(&self) -> Result<Vec<TaskInfo>, Error> {
        self.write
            .transaction(move |tx| {
                let now = now_ms();
                let mut statement = tx
                    .prepare(
                        "UPDATE tasks SET status = 'queued', owner = NULL, updated_at = ?1
                         WHERE status = 'running' AND (owner IS NULL OR NOT EXISTS
                           (SELECT 1 FROM nodes WHERE nodes.id = tasks.owner
                              AND nodes.lease_until >= ?1))
                         RETURNING id, deployment, service, session_id, input, status, attempt,
                           result, error",
                    )
                    .map_err(sqlite_error)?;
                let tasks = statement
                    .query_map([now], |row| {
                        let input: String = row.get(4)?;
                        let status: String = row.get(5)?;
                        let attempt: i64 = row.get(6)?;
                        Ok(TaskInfo {
                            id: row.get(0)?,
                            deployment: row.get(1)?,
                            service: row.get(2)?,
                            session_id: row.get(3)?,
                            input: serde_json::from_str(&input).unwrap_or(Value::String(input)),
                            status: TaskStatus::parse(&status),
                            attempt: u32::try_from(attempt).unwrap_or(0),
                            result: to_json(row.get(7)?),
                            error: row.get(8)?,
                        })
                    })
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(sqlite_error)?;
                Ok(tasks)
            })
            .await
    }
}

/// The error of a node that would join a cluster whose live node `other` runs another
/// deployd version.
pub(super) fn version_conflict(ours: &str, other: &str, theirs: &str) -> String {
    format!(
        "this node runs deployd {ours}, but node `{other}` of the same cluster runs deployd \
         {theirs}: the nodes of a cluster must run one version (stop the others, or use \
         another cluster or store)"
    )
}

/// Commits `writes` on the writer's thread, retrying with backoff while the store fails (a
/// full disk, an I/O error), until it succeeds or the control plane closes: an outcome a service
/// returned is never thrown away because one commit failed. The writer takes no other job
/// meanwhile, so writes are committed in the order they were queued, retries included.
fn commit_until_closed(
    conn: &mut rusqlite::Connection,
    writes: &[Write],
    closed: &watch::Receiver<bool>,
    failures: &AtomicU64,
) -> Result<Vec<Written>, Error> {
    let mut pause = Duration::from_millis(50);
    loop {
        match write_in(conn, writes) {
            Ok(written) => return Ok(written),
            Err(err) if *closed.borrow() => return Err(err),
            Err(err) => {
                failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, writes = writes.len(), "cannot commit task log writes; retrying");
                let until = std::time::Instant::now() + pause;
                while std::time::Instant::now() < until {
                    if *closed.borrow() {
                        return Err(err);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Commits `writes` in one `BEGIN IMMEDIATE` transaction on the writer's connection, in order.
pub(crate) fn write_in(
    conn: &mut rusqlite::Connection,
    writes: &[Write],
) -> Result<Vec<Written>, Error> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sqlite_error)?;
    let written = writes
        .iter()
        .map(|write| apply(&tx, write))
        .collect::<Result<Vec<_>, Error>>()?;
    tx.commit().map_err(sqlite_error)?;
    Ok(written)
}

/// Applies one write inside the writer's transaction.
fn apply(tx: &rusqlite::Transaction<'_>, write: &Write) -> Result<Written, Error> {
    match write {
        Write::Create { task, new_session } => {
            let now = now_ms();
            if *new_session {
                tx.prepare_cached(
                    "INSERT INTO sessions (id, deployment, state, created_at)
                     VALUES (?, ?, NULL, ?)",
                )
                .and_then(|mut statement| {
                    statement.execute(rusqlite::params![task.session_id, task.deployment, now])
                })
                .map_err(sqlite_error)?;
            }
            tx.prepare_cached(
                "INSERT INTO tasks (id, deployment, service, session_id, input, status,
                   attempt, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
            )
            .and_then(|mut statement| {
                statement.execute(rusqlite::params![
                    task.id,
                    task.deployment,
                    task.service,
                    task.session_id,
                    task.input.to_string(),
                    TaskStatus::Queued.as_str(),
                    now,
                    now
                ])
            })
            .map_err(sqlite_error)?;
            Ok(Written::applied(None))
        }
        Write::Running {
            task_id,
            attempt,
            node,
        } => {
            // A task that has ended stays as it ended, and one that runs on a live node stays
            // there. The task and its session's state come back with the update: a worker
            // needs no read of its own.
            let now = now_ms();
            let started = tx
                .prepare_cached(
                    "UPDATE tasks SET status = 'running', attempt = ?1, updated_at = ?2,
                       owner = ?4
                     WHERE id = ?3 AND (status = 'queued' OR (status = 'running' AND
                       (owner IS NULL OR owner = ?4 OR NOT EXISTS (SELECT 1 FROM nodes
                         WHERE nodes.id = tasks.owner AND nodes.lease_until >= ?2))))
                     RETURNING id, deployment, service, session_id, input, status, attempt,
                       result, error,
                       (SELECT state FROM sessions WHERE sessions.id = tasks.session_id)",
                )
                .and_then(|mut statement| {
                    statement
                        .query_row(
                            rusqlite::params![i64::from(*attempt), now, task_id, &**node],
                            |row| {
                                let input: String = row.get(4)?;
                                let status: String = row.get(5)?;
                                let attempt: i64 = row.get(6)?;
                                let result: Option<String> = row.get(7)?;
                                let state: Option<String> = row.get(9)?;
                                Ok((
                                    TaskInfo {
                                        id: row.get(0)?,
                                        deployment: row.get(1)?,
                                        service: row.get(2)?,
                                        session_id: row.get(3)?,
                                        input: serde_json::from_str(&input)
                                            .unwrap_or(Value::String(input)),
                                        status: TaskStatus::parse(&status),
                                        attempt: u32::try_from(attempt).unwrap_or(0),
                                        result: to_json(result),
                                        error: row.get(8)?,
                                    },
                                    to_json(state),
                                ))
                            },
                        )
                        .optional()
                })
                .map_err(sqlite_error)?;
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
            match append_in(tx, task_id, *attempt, EventKind::Event, data.clone())? {
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
            let event = finish_in(
                tx,
                task_id,
                session_id,
                *attempt,
                outcome,
                state.as_ref(),
                *only_if_queued,
                *cancelled,
            )?;
            Ok(Written {
                applied: event.is_some(),
                event,
                started: None,
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn finish_in(
    tx: &rusqlite::Transaction<'_>,
    task_id: &str,
    session_id: &str,
    attempt: u32,
    outcome: &Result<Value, String>,
    state: Option<&Value>,
    only_if_queued: bool,
    cancelled: bool,
) -> Result<Option<TaskEvent>, Error> {
    let (kind, data, status, result, error) = finish_columns(outcome, cancelled);
    // A finished task stays as it ended: its first outcome is the one kept.
    let updated = tx
        .prepare_cached(
            "UPDATE tasks SET status = ?, result = ?, error = ?, updated_at = ?, owner = NULL
             WHERE id = ? AND status IN (?, 'queued')",
        )
        .and_then(|mut statement| {
            statement.execute(rusqlite::params![
                status.as_str(),
                result,
                error,
                now_ms(),
                task_id,
                if only_if_queued { "queued" } else { "running" }
            ])
        })
        .map_err(sqlite_error)?;
    if updated == 0 {
        return Ok(None);
    }
    let event = append_in(tx, task_id, attempt, kind, data)?;
    let Some(event) = event else {
        return Ok(None);
    };
    if let Some(state) = state {
        tx.prepare_cached("UPDATE sessions SET state = ? WHERE id = ?")
            .and_then(|mut statement| {
                statement.execute(rusqlite::params![state.to_string(), session_id])
            })
            .map_err(sqlite_error)?;
    }
    Ok(Some(event))
}

fn append_in(
    tx: &rusqlite::Transaction<'_>,
    task_id: &str,
    attempt: u32,
    kind: EventKind,
    data: Value,
) -> Result<Option<TaskEvent>, Error> {
    // One statement: the next sequence number of the task's log and the entry.
    let seq: Option<i64> = tx
        .prepare_cached(
            "INSERT INTO events (task_id, seq, kind, data, attempt)
             SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4 FROM events WHERE task_id = ?1
             HAVING EXISTS (SELECT 1 FROM tasks WHERE id = ?1)
             RETURNING seq",
        )
        .and_then(|mut statement| {
            statement
                .query_row(
                    rusqlite::params![task_id, kind.as_str(), data.to_string(), i64::from(attempt)],
                    |row| row.get(0),
                )
                .optional()
        })
        .map_err(sqlite_error)?;
    let Some(seq) = seq else {
        return Ok(None);
    };
    Ok(Some(TaskEvent {
        task_id: task_id.to_owned(),
        seq: u64::try_from(seq).unwrap_or(0),
        kind,
        attempt,
        data,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queries for unfinished and waiting tasks walk the index of unfinished tasks, which
    /// finished tasks leave (they name it with `INDEXED BY`, which SQLite refuses when the index
    /// cannot serve the query: an index and a query that drift apart fail here).
    #[tokio::test]
    async fn unfinished_and_waiting_tasks_use_the_index_of_unfinished_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        let task = |id: &str| TaskInfo {
            id: id.into(),
            deployment: "d".into(),
            service: "svc".into(),
            session_id: "s".into(),
            input: Value::Null,
            status: TaskStatus::Queued,
            attempt: 0,
            result: None,
            error: None,
        };
        store.insert_task(&task("waits")).await.unwrap();
        store.insert_task(&task("ended")).await.unwrap();
        store
            .write(vec![Write::Finish {
                task_id: "ended".into(),
                session_id: "s".into(),
                attempt: 1,
                outcome: Ok(Value::Null),
                state: None,
                only_if_queued: false,
                cancelled: false,
            }])
            .await
            .unwrap();
        let ids = |tasks: Vec<TaskInfo>| tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(store.unfinished_tasks("d").await.unwrap()), ["waits"]);
        assert_eq!(
            ids(store
                .waiting_tasks("d", "svc", now_ms() + 1, 10)
                .await
                .unwrap()),
            ["waits"]
        );
        let plan: Vec<String> = sqlx::query(
            "EXPLAIN QUERY PLAN SELECT id FROM tasks INDEXED BY tasks_unfinished
             WHERE deployment = ? AND status IN ('queued', 'running')",
        )
        .bind("d")
        .fetch_all(&store.read)
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get::<String, _>("detail").unwrap())
        .collect();
        assert!(
            plan.iter().any(|line| line.contains("tasks_unfinished")),
            "{plan:?}"
        );
    }

    /// A store made before events carried their attempt opens, keeps its events and gains the
    /// column.
    #[tokio::test]
    async fn an_older_store_gains_the_added_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let options = SqliteConnectOptions::from_str("sqlite://")
                .unwrap()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .unwrap();
            sqlx::query(
                "CREATE TABLE events (task_id TEXT NOT NULL, seq INTEGER NOT NULL,
                   kind TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (task_id, seq))
                 WITHOUT ROWID",
            )
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("INSERT INTO events VALUES ('t', 1, 'event', '\"old\"')")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = SqliteStore::open(&path).await.unwrap();
        // Stores of that age had their tasks table too.
        let task = TaskInfo {
            id: "t".into(),
            deployment: "d".into(),
            service: "svc".into(),
            session_id: "s".into(),
            input: Value::Null,
            status: TaskStatus::Succeeded,
            attempt: 1,
            result: None,
            error: None,
        };
        store.insert_task(&task).await.unwrap();
        let events = store.events_after("t", 0).await.unwrap().expect("the task");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, Value::String("old".into()));
        assert_eq!(events[0].attempt, 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
