//! What both backends read back the same way: rows of their sqlx pools turned into the
//! Manager's types, through [`Columns`] (implemented for SQLite's and PostgreSQL's rows).

use serde_json::Value;
use sqlx::Row;

use super::{NodeRecord, StoredDeployment, StoredRevision, to_json};
use crate::{Error, EventKind, SessionInfo, TaskEvent, TaskInfo, TaskStatus};

fn store_error(err: sqlx::Error) -> Error {
    Error::Store(err.to_string())
}

/// A row's columns by name (or place), as the types the store writes: text and integers.
pub(super) trait Columns {
    fn text(&self, name: &str) -> Result<String, Error>;
    fn maybe_text(&self, name: &str) -> Result<Option<String>, Error>;
    fn int(&self, name: &str) -> Result<i64, Error>;
    fn maybe_int(&self, name: &str) -> Result<Option<i64>, Error>;
    fn int_at(&self, index: usize) -> Result<i64, Error>;
}

macro_rules! columns_of {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, name: &str) -> Result<String, Error> {
                self.try_get(name).map_err(store_error)
            }
            fn maybe_text(&self, name: &str) -> Result<Option<String>, Error> {
                self.try_get(name).map_err(store_error)
            }
            fn int(&self, name: &str) -> Result<i64, Error> {
                self.try_get(name).map_err(store_error)
            }
            fn maybe_int(&self, name: &str) -> Result<Option<i64>, Error> {
                self.try_get(name).map_err(store_error)
            }
            fn int_at(&self, index: usize) -> Result<i64, Error> {
                self.try_get(index).map_err(store_error)
            }
        }
    };
}

columns_of!(sqlx::sqlite::SqliteRow);
columns_of!(sqlx::postgres::PgRow);

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A row of `id, deployment, service, session_id, input, status, attempt, result, error`.
pub(super) fn task(row: &impl Columns) -> Result<TaskInfo, Error> {
    let input = row.text("input")?;
    Ok(TaskInfo {
        id: row.text("id")?,
        deployment: row.text("deployment")?,
        service: row.text("service")?,
        session_id: row.text("session_id")?,
        input: serde_json::from_str(&input).unwrap_or(Value::String(input)),
        status: TaskStatus::parse(&row.text("status")?),
        attempt: u32::try_from(row.int("attempt")?).unwrap_or(0),
        result: to_json(row.maybe_text("result")?),
        error: row.maybe_text("error")?,
    })
}

pub(super) fn tasks<R: Columns>(rows: &[R]) -> Result<Vec<TaskInfo>, Error> {
    rows.iter().map(task).collect()
}

/// A row of `name, spec, origin, base_path, origin_kind`.
pub(super) fn deployment(row: &impl Columns) -> Result<StoredDeployment, Error> {
    Ok(StoredDeployment {
        name: row.text("name")?,
        spec: row.text("spec")?,
        origin: row.text("origin")?,
        base_path: row.text("base_path")?,
        from: row.text("origin_kind")?,
    })
}

/// A row of `id, address, version, started_at, lease_until`.
pub(super) fn node(row: &impl Columns) -> Result<NodeRecord, Error> {
    Ok(NodeRecord {
        id: row.text("id")?,
        address: row.maybe_text("address")?,
        version: row.text("version")?,
        started_ms: row.int("started_at")?,
        lease_until_ms: row.int("lease_until")?,
    })
}

/// Rows of `id, state, task_id` (a session joined with its tasks, in order) as sessions.
pub(super) fn sessions<R: Columns>(rows: &[R]) -> Result<Vec<SessionInfo>, Error> {
    let mut sessions: Vec<SessionInfo> = Vec::new();
    for row in rows {
        let id = row.text("id")?;
        let task = row.maybe_text("task_id")?;
        if sessions.last().is_none_or(|s| s.id != id) {
            sessions.push(SessionInfo {
                id,
                task_ids: Vec::new(),
                state: to_json(row.maybe_text("state")?),
            });
        }
        if let (Some(task), Some(session)) = (task, sessions.last_mut()) {
            session.task_ids.push(task);
        }
    }
    Ok(sessions)
}

/// A row of `deployment, service, status, n, oldest`.
pub(super) fn task_count(row: &impl Columns) -> Result<crate::TaskCount, Error> {
    Ok(crate::TaskCount {
        deployment: row.text("deployment")?,
        service: row.text("service")?,
        status: TaskStatus::parse(&row.text("status")?),
        count: count(row.int("n")?),
        oldest_ms: row.int("oldest")?,
    })
}

/// The statement [`durations`] reads: per deployment and service, the ended tasks, their total
/// time (ms), and how many took at most each of `bounds` (seconds); SQL both databases run.
pub(super) fn durations_statement(bounds: &[f64]) -> String {
    // The bounds are numbers of ours, written into the statement in milliseconds.
    let columns: String = bounds
        .iter()
        .enumerate()
        .map(|(i, bound)| {
            format!(
                ", CAST(SUM(CASE WHEN updated_at - created_at <= {} THEN 1 ELSE 0 END) AS BIGINT) \
                 AS b{i}",
                (bound * 1000.0).round() as i64
            )
        })
        .collect();
    format!(
        "SELECT deployment, service, COUNT(*) AS n,
           CAST(COALESCE(SUM(updated_at - created_at), 0) AS BIGINT) AS total{columns}
         FROM tasks WHERE status IN ('succeeded', 'failed', 'cancelled')
         GROUP BY deployment, service ORDER BY deployment, service"
    )
}

/// A row of `deployment, service, n, total`, then one count per bound (columns 4 on).
pub(super) fn durations(row: &impl Columns, bounds: usize) -> Result<crate::TaskDurations, Error> {
    let at_most = (0..bounds)
        .map(|i| row.int_at(i + 4).map(count))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::TaskDurations {
        deployment: row.text("deployment")?,
        service: row.text("service")?,
        at_most,
        count: count(row.int("n")?),
        sum_seconds: row.int("total")? as f64 / 1000.0,
    })
}

/// Rows of `status, seq, kind, data, attempt` (a task left-joined with its entries): the
/// entries and whether the task had ended; `None` without rows (no such task).
pub(super) fn log<R: Columns>(
    task_id: &str,
    rows: &[R],
) -> Result<Option<(Vec<TaskEvent>, bool)>, Error> {
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let ended = TaskStatus::parse(&first.text("status")?).is_finished();
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(seq) = row.maybe_int("seq")? else {
            continue;
        };
        events.push(TaskEvent {
            task_id: task_id.to_owned(),
            seq: u64::try_from(seq).unwrap_or(0),
            kind: EventKind::parse(&row.text("kind")?),
            attempt: u32::try_from(row.int("attempt")?).unwrap_or(0),
            data: to_json(Some(row.text("data")?)).unwrap_or(Value::Null),
        });
    }
    Ok(Some((events, ended)))
}

/// A task row with `created_at` and `updated_at` too.
pub(super) fn task_record(row: &impl Columns) -> Result<crate::TaskRecord, Error> {
    Ok(crate::TaskRecord {
        task: task(row)?,
        created_ms: row.int("created_at")?,
        updated_ms: row.int("updated_at")?,
    })
}

/// The columns of a revision row.
pub(super) const REVISION_COLUMNS: &str = "deployment, revision, created_at, by_whom, kind, \
    rollback_of, outcome, error, sources, spec, origin, base_path, origin_kind";

/// A row of [`REVISION_COLUMNS`].
pub(super) fn revision(row: &impl Columns) -> Result<StoredRevision, Error> {
    let sources = row.text("sources")?;
    Ok(StoredRevision {
        deployment: row.text("deployment")?,
        revision: count(row.int("revision")?),
        created_ms: row.int("created_at")?,
        by: row.text("by_whom")?,
        kind: row.text("kind")?,
        rollback_of: row.maybe_int("rollback_of")?.map(count),
        outcome: row.text("outcome")?,
        error: row.maybe_text("error")?,
        sources: serde_json::from_str(&sources).unwrap_or_default(),
        spec: row.text("spec")?,
        origin: row.text("origin")?,
        base_path: row.text("base_path")?,
        from: row.text("origin_kind")?,
    })
}

/// The statement of a task search: the tasks of deployment `p(1)` newest first, filtered
/// by status and service when asked (each the next placeholder), starting before the
/// `(created_at, id)` of the next two when `before`, and at most the last placeholder's
/// count. `p(n)` writes the n-th placeholder (`?` for SQLite, `$n` for PostgreSQL).
pub(super) fn search_statement(
    filter: &crate::TaskFilter,
    before: bool,
    p: impl Fn(usize) -> String,
) -> String {
    let mut n = 1;
    let mut sql = format!(
        "SELECT id, deployment, service, session_id, input, status, attempt, result, error, \
         created_at, updated_at FROM tasks WHERE deployment = {}",
        p(n)
    );
    if filter.status.is_some() {
        n += 1;
        sql.push_str(&format!(" AND status = {}", p(n)));
    }
    if filter.service.is_some() {
        n += 1;
        sql.push_str(&format!(" AND service = {}", p(n)));
    }
    if before {
        sql.push_str(&format!(
            " AND (created_at, id) < ({}, {})",
            p(n + 1),
            p(n + 2)
        ));
        n += 2;
    }
    sql.push_str(&format!(
        " ORDER BY created_at DESC, id DESC LIMIT {}",
        p(n + 1)
    ));
    sql
}

/// The statement of a session search: the sessions of deployment `p(1)` newest first, starting
/// before the `(created_at, id)` of `p(2), p(3)` when `before`, at most the last placeholder's
/// count, each joined with its tasks (oldest first) as [`sessions`] reads them.
pub(super) fn session_search_statement(before: bool, p: impl Fn(usize) -> String) -> String {
    let (cursor, limit) = if before {
        (
            format!(" AND (created_at, id) < ({}, {})", p(2), p(3)),
            p(4),
        )
    } else {
        (String::new(), p(2))
    };
    format!(
        "WITH page AS (SELECT id, state, created_at FROM sessions WHERE deployment = {}{cursor} \
           ORDER BY created_at DESC, id DESC LIMIT {limit}) \
         SELECT page.id AS id, page.state AS state, t.id AS task_id \
         FROM page LEFT JOIN tasks t ON t.session_id = page.id \
         ORDER BY page.created_at DESC, page.id DESC, t.created_at, t.id",
        p(1)
    )
}

/// Where a page that starts before row `before` starts.
pub(super) enum Cursor<'a> {
    /// At the newest row: no `before`.
    Newest,
    /// Before the row `(created_at, id)`.
    Before(i64, &'a str),
    /// `before` names no row of the deployment.
    Missing,
}

impl<'a> Cursor<'a> {
    /// The cursor of the row `id`, whose `created_at` is `created` (`None` when it is no row of
    /// the deployment).
    pub(super) fn of(id: &'a str, created: Option<i64>) -> Self {
        match created {
            Some(created_at) => Self::Before(created_at, id),
            None => Self::Missing,
        }
    }
}
