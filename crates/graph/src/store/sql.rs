//! What the SQLite and Postgres backends share: the schema, the statements (written with
//! `$n` parameters, which both understand) and, through [`sql_backend!`], the code that runs
//! them for one database type.

use crate::Error;
use crate::snapshot::{SnapshotId, Status, Transition, check_owner};

/// The columns of `graph_snapshots`, in the order [`sql_backend!`]'s `from_row` reads them.
macro_rules! columns {
    () => {
        "id, run_id, seq, kind, node_id, node, state, status, created_ts, start_ts, duration, \
         attempt, lease_owner, lease_until, error, request, answer"
    };
}

/// The first 14 of [`columns!`]: a snapshot without an error, a request or an answer (almost
/// every one) is inserted with these.
macro_rules! slim_columns {
    () => {
        "id, run_id, seq, kind, node_id, node, state, status, created_ts, start_ts, duration, \
         attempt, lease_owner, lease_until"
    };
}

/// The table and its indexes; times are microseconds since the Unix epoch.
///
/// Claims of any run (`status = 'created' ORDER BY created_ts, id`) and lease expiry
/// (`status IN ('pending', 'running') AND lease_until < $1`) use the two partial indexes,
/// whose conditions their queries repeat word for word (SQLite uses a partial index only
/// then).
pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS graph_snapshots (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        node_id TEXT NOT NULL,
        node TEXT NOT NULL,
        state TEXT NOT NULL,
        status TEXT NOT NULL,
        created_ts BIGINT NOT NULL,
        start_ts BIGINT,
        duration DOUBLE PRECISION,
        attempt BIGINT NOT NULL,
        lease_owner TEXT,
        lease_until BIGINT,
        error TEXT,
        request TEXT,
        answer TEXT,
        UNIQUE (run_id, seq)
    )",
    // Partial indexes: a run that goes on without pausing inserts its snapshots `running`
    // and never touches the first; each step adds one entry to the second and drops one.
    "CREATE INDEX IF NOT EXISTS graph_snapshots_created
        ON graph_snapshots (created_ts, id) WHERE status = 'created'",
    "CREATE INDEX IF NOT EXISTS graph_snapshots_leased
        ON graph_snapshots (lease_until) WHERE status IN ('pending', 'running')",
];

pub(crate) const INSERT: &str = concat!(
    "INSERT INTO graph_snapshots (",
    columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
);
pub(crate) const INSERT_IF_NEW: &str = concat!(
    "INSERT INTO graph_snapshots (",
    columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
     ON CONFLICT (id) DO NOTHING"
);
pub(crate) const GET: &str = concat!("SELECT ", columns!(), " FROM graph_snapshots WHERE id = $1");
pub(crate) const LATEST: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM graph_snapshots WHERE run_id = $1 ORDER BY seq DESC LIMIT 1"
);
pub(crate) const HISTORY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM graph_snapshots WHERE run_id = $1 ORDER BY seq"
);
pub(crate) const STATUS_OF: &str = "SELECT status, lease_owner FROM graph_snapshots WHERE id = $1";
pub(crate) const EXPIRE: &str = "UPDATE graph_snapshots
    SET status = 'created', attempt = attempt + 1, lease_owner = NULL, lease_until = NULL,
        start_ts = NULL
    WHERE status IN ('pending', 'running') AND lease_until < $1
    RETURNING id";

pub(crate) const CLAIM: &str = "UPDATE graph_snapshots SET status = 'pending', lease_owner = $2,
    lease_until = $3 WHERE id = $1 AND status = 'created'";
pub(crate) const START: &str = "UPDATE graph_snapshots SET status = 'running', start_ts = $2,
    lease_until = $3 WHERE id = $1 AND status = 'pending' AND lease_owner = $4";
pub(crate) const RENEW: &str = "UPDATE graph_snapshots SET lease_until = $2
    WHERE id = $1 AND status IN ('pending', 'running') AND lease_owner = $3";
pub(crate) const SUCCEED: &str = "UPDATE graph_snapshots SET status = 'success', duration = $2
    WHERE id = $1 AND status = 'running' AND lease_owner = $3";
pub(crate) const FAIL: &str = "UPDATE graph_snapshots SET status = 'error', duration = $2,
    error = $3 WHERE id = $1 AND status = 'running' AND lease_owner = $4";
pub(crate) const REPLACE: &str = "UPDATE graph_snapshots SET status = 'skipped'
    WHERE id = $1 AND status = 'pending' AND lease_owner = $2";
pub(crate) const ANSWER: &str = "UPDATE graph_snapshots SET status = 'created', answer = $2
    WHERE id = $1 AND status = 'waiting'";

/// The row counts of the multi-row statements ([`MultiRow`]): a batch is cut into chunks of
/// these sizes, so that a few statements, each prepared once, cover every batch.
pub(crate) const CHUNKS: [usize; 5] = [256, 64, 16, 4, 1];

/// `items` cut into chunks of the sizes in [`CHUNKS`], largest first, each with the index of
/// its size.
pub(crate) fn chunks<T>(mut items: &[T]) -> Vec<(usize, &[T])> {
    let mut out = Vec::new();
    for (k, &size) in CHUNKS.iter().enumerate() {
        while items.len() >= size {
            let (chunk, rest) = items.split_at(size);
            out.push((k, chunk));
            items = rest;
        }
    }
    out
}

/// SQLite statements that write many rows at once (`?` parameters, `UPDATE … FROM (VALUES …)`),
/// one per size in [`CHUNKS`]: a batch of commits costs a few statements instead of one or two
/// per commit. Whether each row applied is told by the count of rows changed: when a
/// statement changes fewer rows than it was given, the batch is rolled back and its ops run
/// one by one, so that each refused op gets its own error.
pub(crate) struct MultiRow {
    /// `pending → running`; rows `(id, start_ts, lease_until, owner)`.
    pub(crate) start: Vec<String>,
    /// `running → success`; rows `(id, duration, owner)`.
    pub(crate) succeed: Vec<String>,
    /// Snapshots inserted by transitions; a duplicate fails the statement.
    pub(crate) insert: Vec<String>,
    /// The same, for snapshots without error, request or answer ([`slim_columns!`]).
    pub(crate) insert_slim: Vec<String>,
    /// Snapshots inserted unless their id exists.
    pub(crate) insert_if_new: Vec<String>,
    /// The same, for snapshots without error, request or answer.
    pub(crate) insert_if_new_slim: Vec<String>,
}

pub(crate) static MULTI_ROW: std::sync::LazyLock<MultiRow> = std::sync::LazyLock::new(|| {
    let values = |rows: usize, width: usize| {
        let row = format!("({})", vec!["?"; width].join(", "));
        vec![row; rows].join(", ")
    };
    let each = |f: &dyn Fn(usize) -> String| CHUNKS.iter().map(|&rows| f(rows)).collect();
    MultiRow {
        start: each(&|rows| {
            format!(
                "UPDATE graph_snapshots SET status = 'running', start_ts = v.column2, \
                 lease_until = v.column3 FROM (VALUES {}) AS v \
                 WHERE graph_snapshots.id = v.column1 AND graph_snapshots.status = 'pending' \
                 AND graph_snapshots.lease_owner = v.column4",
                values(rows, 4)
            )
        }),
        succeed: each(&|rows| {
            format!(
                "UPDATE graph_snapshots SET status = 'success', duration = v.column2 \
                 FROM (VALUES {}) AS v \
                 WHERE graph_snapshots.id = v.column1 AND graph_snapshots.status = 'running' \
                 AND graph_snapshots.lease_owner = v.column3",
                values(rows, 3)
            )
        }),
        insert: each(&|rows| {
            format!(
                "INSERT INTO graph_snapshots ({}) VALUES {}",
                columns!(),
                values(rows, 17)
            )
        }),
        insert_slim: each(&|rows| {
            format!(
                "INSERT INTO graph_snapshots ({}) VALUES {}",
                slim_columns!(),
                values(rows, 14)
            )
        }),
        insert_if_new: each(&|rows| {
            format!(
                "INSERT INTO graph_snapshots ({}) VALUES {} ON CONFLICT (id) DO NOTHING",
                columns!(),
                values(rows, 17)
            )
        }),
        insert_if_new_slim: each(&|rows| {
            format!(
                "INSERT INTO graph_snapshots ({}) VALUES {} ON CONFLICT (id) DO NOTHING",
                slim_columns!(),
                values(rows, 14)
            )
        }),
    }
});

/// Why a conditional update changed no row, from the row as it is.
pub(crate) fn refused(
    id: &SnapshotId,
    row: Option<(String, Option<String>)>,
    transition: &Transition,
) -> Error {
    let Some((status, owner)) = row else {
        return super::table::not_found(id);
    };
    let status: Status = match status.parse() {
        Ok(status) => status,
        Err(err) => return err,
    };
    if !transition.allowed_from(status) {
        return Error::IllegalTransition {
            id: id.clone(),
            from: status,
            to: transition.target(),
        };
    }
    check_owner(id, owner.as_deref(), transition.owner())
        .err()
        .unwrap_or_else(|| Error::Storage(format!("snapshot {id} changed under the update")))
}

pub(crate) fn db_error(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => Error::Conflict {
            id: db.constraint().unwrap_or("graph_snapshots").to_owned(),
            reason: "a snapshot with this id, or at this place in its run, exists".to_owned(),
        },
        _ => Error::Storage(err.to_string()),
    }
}

pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The statements run for one database type `$db`; `$lock` is appended to the sub-selects of
/// claims (`FOR UPDATE SKIP LOCKED` on Postgres); with `$multi_row`, a batch's inserts, starts
/// and successes are written with [`MultiRow`]'s statements (SQLite).
macro_rules! sql_backend {
    ($db:ty, $lock:literal, $multi_row:literal) => {
        use std::sync::Arc;

        use async_trait::async_trait;
        use sqlx::Row as _;

        use super::sql::{self, db_error, to_i64};
        use super::writer::{Batch, Done, Op};
        use crate::Error;
        use crate::clock::Timestamp;
        use crate::snapshot::{Json, Lease, RunId, Snapshot, SnapshotId, Transition};

        type Pool = sqlx::Pool<$db>;
        type Conn = <$db as sqlx::Database>::Connection;

        const CLAIM_ANY: &str = concat!(
            "UPDATE graph_snapshots SET status = 'pending', lease_owner = $1, lease_until = $2 \
             WHERE status = 'created' AND id = (SELECT id FROM graph_snapshots \
             WHERE status = 'created' ORDER BY created_ts, id LIMIT 1",
            $lock,
            ") RETURNING ",
            columns!()
        );
        const CLAIM_RUN: &str = concat!(
            "UPDATE graph_snapshots SET status = 'pending', lease_owner = $1, lease_until = $2 \
             WHERE status = 'created' AND id = (SELECT id FROM graph_snapshots \
             WHERE run_id = $3 ORDER BY seq DESC LIMIT 1",
            $lock,
            ") RETURNING ",
            columns!()
        );

        pub(super) struct SqlBatch {
            pub(super) pool: Pool,
        }

        #[async_trait]
        impl Batch for SqlBatch {
            async fn run(&self, ops: &[Op]) -> Result<Vec<Result<Done, Error>>, Error> {
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                if $multi_row && ops.len() > 1 {
                    if let Some(results) = run_grouped(&mut tx, ops).await? {
                        tx.commit().await.map_err(db_error)?;
                        return Ok(results);
                    }
                    // An op was refused: start again, one op at a time.
                    tx.rollback().await.map_err(db_error)?;
                    tx = self.pool.begin().await.map_err(db_error)?;
                }
                let mut results = Vec::with_capacity(ops.len());
                for op in ops {
                    results.push(run_op(&mut tx, op).await?);
                }
                tx.commit().await.map_err(db_error)?;
                Ok(results)
            }
        }

        /// Runs `ops` in order, each run of consecutive inserts, starts and successes that
        /// touch distinct snapshots as a few multi-row statements; `None` if one of those was
        /// refused (what was written must then be rolled back).
        #[cfg_attr(not($multi_row), allow(dead_code))]
        async fn run_grouped(
            conn: &mut Conn,
            ops: &[Op],
        ) -> Result<Option<Vec<Result<Done, Error>>>, Error> {
            let mut results = Vec::with_capacity(ops.len());
            let mut rest = ops;
            while let Some(first) = rest.first() {
                if !groupable(first) {
                    results.push(run_op(conn, first).await?);
                    rest = &rest[1..];
                    continue;
                }
                let len = rest
                    .iter()
                    .position(|op| !groupable(op))
                    .unwrap_or(rest.len());
                let (segment, after) = rest.split_at(len);
                if segment.len() > 1 && independent(segment) {
                    if !run_segment(conn, segment).await? {
                        return Ok(None);
                    }
                    results.extend(segment.iter().map(|op| {
                        Ok(match op {
                            Op::Insert(_) => Done::Inserted(true),
                            _ => Done::Transitioned,
                        })
                    }));
                } else {
                    for op in segment {
                        results.push(run_op(conn, op).await?);
                    }
                }
                rest = after;
            }
            Ok(Some(results))
        }

        fn groupable(op: &Op) -> bool {
            matches!(
                op,
                Op::Insert(_)
                    | Op::Transition(_, Transition::Start { .. } | Transition::Succeed { .. })
            )
        }

        /// Whether no op of `segment` touches a snapshot another one updates or inserts, so
        /// that running all its updates, then all its inserts, does what running it in order
        /// does.
        fn independent(segment: &[Op]) -> bool {
            let mut seen = std::collections::HashSet::with_capacity(segment.len() * 2);
            segment.iter().all(|op| match op {
                Op::Insert(s) => seen.insert(s.id.as_str()),
                Op::Transition(id, t) => {
                    seen.insert(id.as_str())
                        && t.inserted()
                            .is_none_or(|next| seen.insert(next.id.as_str()))
                }
                _ => false,
            })
        }

        /// Runs a segment of [`groupable`], [`independent`] ops: the starts, the successes,
        /// then the snapshots inserted (by the transitions, and by inserts). Returns whether
        /// every op applied (if not, the caller rolls back).
        #[cfg_attr(not($multi_row), allow(dead_code))]
        async fn run_segment(conn: &mut Conn, segment: &[Op]) -> Result<bool, Error> {
            let statements = &*sql::MULTI_ROW;
            let mut starts = Vec::new();
            let mut succeeds = Vec::new();
            let mut fresh = Vec::new();
            let mut carried = Vec::new();
            for op in segment {
                match op {
                    Op::Transition(id, t @ Transition::Start { owner, at, until }) => {
                        starts.push((id.as_str(), &**owner, *at, *until));
                        carried.extend(t.inserted());
                    }
                    Op::Transition(
                        id,
                        t @ Transition::Succeed {
                            owner, duration, ..
                        },
                    ) => {
                        succeeds.push((id.as_str(), &**owner, *duration));
                        carried.extend(t.inserted());
                    }
                    Op::Insert(snapshot) => fresh.push(snapshot),
                    _ => {}
                }
            }
            for (k, chunk) in sql::chunks(&starts) {
                let mut query = sqlx::query(statements.start[k].as_str());
                for &(id, owner, at, until) in chunk {
                    query = query
                        .bind(id)
                        .bind(at.as_micros())
                        .bind(until.as_micros())
                        .bind(owner);
                }
                let done = query.execute(&mut *conn).await.map_err(db_error)?;
                if done.rows_affected() != chunk.len() as u64 {
                    return Ok(false);
                }
            }
            for (k, chunk) in sql::chunks(&succeeds) {
                let mut query = sqlx::query(statements.succeed[k].as_str());
                for &(id, owner, duration) in chunk {
                    query = query.bind(id).bind(duration).bind(owner);
                }
                let done = query.execute(&mut *conn).await.map_err(db_error)?;
                if done.rows_affected() != chunk.len() as u64 {
                    return Ok(false);
                }
            }
            for (rows, if_new) in [(&carried, false), (&fresh, true)] {
                for (k, chunk) in sql::chunks(rows) {
                    let slim = chunk
                        .iter()
                        .all(|s| s.error.is_none() && s.request.is_none() && s.answer.is_none());
                    let statement = match (if_new, slim) {
                        (false, false) => &statements.insert[k],
                        (false, true) => &statements.insert_slim[k],
                        (true, false) => &statements.insert_if_new[k],
                        (true, true) => &statements.insert_if_new_slim[k],
                    };
                    let mut query = sqlx::query(statement.as_str());
                    for snapshot in chunk {
                        query = if slim {
                            bind_slim(query, snapshot)
                        } else {
                            bind_snapshot(query, snapshot)
                        };
                    }
                    let done = query.execute(&mut *conn).await.map_err(db_error)?;
                    if done.rows_affected() != chunk.len() as u64 {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        }

        /// Why the update of `id` by `transition` changed no row.
        async fn refusal(
            conn: &mut Conn,
            id: &SnapshotId,
            transition: &Transition,
        ) -> Result<Error, Error> {
            let row = sqlx::query(sql::STATUS_OF)
                .bind(id.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_error)?;
            let row = match row {
                Some(row) => Some((
                    row.try_get::<String, _>(0).map_err(db_error)?,
                    row.try_get::<Option<String>, _>(1).map_err(db_error)?,
                )),
                None => None,
            };
            Ok(sql::refused(id, row, transition))
        }

        /// Runs one op: `Err` for a database error (the batch fails), `Ok(Err)` for an op the
        /// lifecycle refused (it wrote nothing).
        async fn run_op(conn: &mut Conn, op: &Op) -> Result<Result<Done, Error>, Error> {
            match op {
                Op::Insert(snapshot) => {
                    let done = insert(conn, snapshot, sql::INSERT_IF_NEW).await?;
                    Ok(Ok(Done::Inserted(done)))
                }
                Op::Transition(id, transition) => {
                    let changed = update(conn, id, transition).await?;
                    if !changed {
                        return Ok(Err(refusal(conn, id, transition).await?));
                    }
                    if let Some(next) = transition.inserted() {
                        // A duplicate fails the statement, and so the batch: nothing of this
                        // transition is committed.
                        insert(conn, next, sql::INSERT).await?;
                    }
                    Ok(Ok(Done::Transitioned))
                }
                Op::Claim(run, lease) => {
                    let query = match run {
                        Some(run) => sqlx::query(CLAIM_RUN)
                            .bind(&*lease.owner)
                            .bind(lease.until.as_micros())
                            .bind(run.as_str()),
                        None => sqlx::query(CLAIM_ANY)
                            .bind(&*lease.owner)
                            .bind(lease.until.as_micros()),
                    };
                    let row = query.fetch_optional(&mut *conn).await.map_err(db_error)?;
                    let claimed = match row {
                        Some(row) => Some(Box::new(from_row(&row)?)),
                        None => None,
                    };
                    Ok(Ok(Done::Claimed(claimed)))
                }
                Op::Expire(now) => {
                    let rows = sqlx::query(sql::EXPIRE)
                        .bind(now.as_micros())
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(db_error)?;
                    let ids = rows
                        .iter()
                        .map(|row| row.try_get::<String, _>(0).map(SnapshotId::from))
                        .collect::<Result<_, _>>()
                        .map_err(db_error)?;
                    Ok(Ok(Done::Expired(ids)))
                }
            }
        }

        async fn insert(
            conn: &mut Conn,
            s: &Snapshot,
            statement: &'static str,
        ) -> Result<bool, Error> {
            let done = bind_snapshot(sqlx::query(statement), s)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
            Ok(done.rows_affected() == 1)
        }

        type Query<'q> = sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments>;

        /// Binds the 17 columns of `s`, in [`columns!`]'s order.
        fn bind_snapshot<'q>(query: Query<'q>, s: &Snapshot) -> Query<'q> {
            bind_slim(query, s)
                .bind(s.error.as_deref())
                .bind(s.request.as_ref().map(|r| r.get()))
                .bind(s.answer.as_ref().map(|a| a.get()))
        }

        /// Binds the first 14 columns of `s` ([`slim_columns!`]).
        fn bind_slim<'q>(query: Query<'q>, s: &Snapshot) -> Query<'q> {
            query
                .bind(s.id.as_str())
                .bind(s.run_id.as_str())
                .bind(to_i64(s.seq))
                .bind(s.kind.as_str())
                .bind(s.node_id.as_ref())
                .bind(s.node.get())
                .bind(s.state.get())
                .bind(s.status.as_str())
                .bind(s.created_ts.as_micros())
                .bind(s.start_ts.map(Timestamp::as_micros))
                .bind(s.duration)
                .bind(i64::from(s.attempt))
                .bind(s.lease.as_ref().map(|l| &*l.owner))
                .bind(s.lease.as_ref().map(|l| l.until.as_micros()))
        }

        async fn update(conn: &mut Conn, id: &SnapshotId, t: &Transition) -> Result<bool, Error> {
            let id = id.as_str();
            let query = match t {
                Transition::Claim { lease } => sqlx::query(sql::CLAIM)
                    .bind(id)
                    .bind(&*lease.owner)
                    .bind(lease.until.as_micros()),
                Transition::Start { owner, at, until } => sqlx::query(sql::START)
                    .bind(id)
                    .bind(at.as_micros())
                    .bind(until.as_micros())
                    .bind(&**owner),
                Transition::Renew { owner, until } => sqlx::query(sql::RENEW)
                    .bind(id)
                    .bind(until.as_micros())
                    .bind(&**owner),
                Transition::Succeed {
                    owner, duration, ..
                } => sqlx::query(sql::SUCCEED)
                    .bind(id)
                    .bind(*duration)
                    .bind(&**owner),
                Transition::Fail {
                    owner,
                    duration,
                    error,
                    ..
                } => sqlx::query(sql::FAIL)
                    .bind(id)
                    .bind(*duration)
                    .bind(error.as_str())
                    .bind(&**owner),
                Transition::Replace { owner, .. } => {
                    sqlx::query(sql::REPLACE).bind(id).bind(&**owner)
                }
                Transition::Answer { answer } => {
                    sqlx::query(sql::ANSWER).bind(id).bind(answer.get())
                }
            };
            let done = query.execute(&mut *conn).await.map_err(db_error)?;
            Ok(done.rows_affected() == 1)
        }

        fn json(text: String) -> Result<Json, Error> {
            Json::from_string(text).map_err(|source| Error::Codec {
                what: "a stored snapshot",
                source,
            })
        }

        fn from_row(row: &<$db as sqlx::Database>::Row) -> Result<Snapshot, Error> {
            let text = |i: usize| row.try_get::<String, _>(i).map_err(db_error);
            let opt_text = |i: usize| row.try_get::<Option<String>, _>(i).map_err(db_error);
            let int = |i: usize| row.try_get::<i64, _>(i).map_err(db_error);
            let opt_int = |i: usize| row.try_get::<Option<i64>, _>(i).map_err(db_error);
            let lease = match (opt_text(12)?, opt_int(13)?) {
                (Some(owner), Some(until)) => Some(Lease {
                    owner: Arc::from(owner),
                    until: Timestamp::from_micros(until),
                }),
                _ => None,
            };
            Ok(Snapshot {
                id: SnapshotId::from(text(0)?),
                run_id: RunId::from(text(1)?),
                seq: u64::try_from(int(2)?).unwrap_or(0),
                kind: text(3)?.parse()?,
                node_id: std::borrow::Cow::Owned(text(4)?),
                node: json(text(5)?)?,
                state: json(text(6)?)?,
                status: text(7)?.parse()?,
                created_ts: Timestamp::from_micros(int(8)?),
                start_ts: opt_int(9)?.map(Timestamp::from_micros),
                duration: row.try_get::<Option<f64>, _>(10).map_err(db_error)?,
                attempt: u32::try_from(int(11)?).unwrap_or(u32::MAX),
                lease,
                error: opt_text(14)?,
                request: opt_text(15)?.map(json).transpose()?,
                answer: opt_text(16)?.map(json).transpose()?,
            })
        }

        pub(super) async fn get(pool: &Pool, id: &SnapshotId) -> Result<Snapshot, Error> {
            let row = sqlx::query(sql::GET)
                .bind(id.as_str())
                .fetch_optional(pool)
                .await
                .map_err(db_error)?;
            match row {
                Some(row) => from_row(&row),
                None => Err(super::table::not_found(id)),
            }
        }

        pub(super) async fn latest(pool: &Pool, run: &RunId) -> Result<Option<Snapshot>, Error> {
            let row = sqlx::query(sql::LATEST)
                .bind(run.as_str())
                .fetch_optional(pool)
                .await
                .map_err(db_error)?;
            row.as_ref().map(from_row).transpose()
        }

        pub(super) async fn history(pool: &Pool, run: &RunId) -> Result<Vec<Snapshot>, Error> {
            let rows = sqlx::query(sql::HISTORY)
                .bind(run.as_str())
                .fetch_all(pool)
                .await
                .map_err(db_error)?;
            rows.iter().map(from_row).collect()
        }

        /// The [`Store`](super::Store) methods on a pool and a writer.
        macro_rules! impl_store {
            ($store:ty) => {
                impl super::Store for $store {
                    fn insert<'a>(
                        &'a self,
                        snapshot: &'a Snapshot,
                    ) -> super::StoreFuture<'a, bool> {
                        let op = Op::Insert(snapshot.clone());
                        super::StoreFuture::new(async move {
                            match self.writer.submit(op).await? {
                                Done::Inserted(new) => Ok(new),
                                other => Err(unexpected(other)),
                            }
                        })
                    }

                    fn transition<'a>(
                        &'a self,
                        id: &'a SnapshotId,
                        transition: Transition,
                    ) -> super::StoreFuture<'a, ()> {
                        let op = Op::Transition(id.clone(), transition);
                        super::StoreFuture::new(async move {
                            match self.writer.submit(op).await? {
                                Done::Transitioned => Ok(()),
                                other => Err(unexpected(other)),
                            }
                        })
                    }

                    fn claim<'a>(
                        &'a self,
                        run: Option<&'a RunId>,
                        lease: Lease,
                    ) -> super::StoreFuture<'a, Option<Snapshot>> {
                        let op = Op::Claim(run.cloned(), lease);
                        super::StoreFuture::new(async move {
                            match self.writer.submit(op).await? {
                                Done::Claimed(claimed) => Ok(claimed.map(|s| *s)),
                                other => Err(unexpected(other)),
                            }
                        })
                    }

                    fn expire_leases(
                        &self,
                        now: Timestamp,
                    ) -> super::StoreFuture<'_, Vec<SnapshotId>> {
                        super::StoreFuture::new(async move {
                            match self.writer.submit(Op::Expire(now)).await? {
                                Done::Expired(ids) => Ok(ids),
                                other => Err(unexpected(other)),
                            }
                        })
                    }

                    fn get<'a>(&'a self, id: &'a SnapshotId) -> super::StoreFuture<'a, Snapshot> {
                        super::StoreFuture::new(get(&self.pool, id))
                    }

                    fn latest<'a>(
                        &'a self,
                        run: &'a RunId,
                    ) -> super::StoreFuture<'a, Option<Snapshot>> {
                        super::StoreFuture::new(latest(&self.pool, run))
                    }

                    fn history<'a>(
                        &'a self,
                        run: &'a RunId,
                    ) -> super::StoreFuture<'a, Vec<Snapshot>> {
                        super::StoreFuture::new(history(&self.pool, run))
                    }
                }
            };
        }

        fn unexpected(done: Done) -> Error {
            Error::Storage(format!("the writer answered {done:?}"))
        }

        fn spawn_writer(pool: &Pool, durability: super::Durability) -> super::writer::Writer {
            super::writer::Writer::spawn(Arc::new(SqlBatch { pool: pool.clone() }), durability)
        }
    };
}
