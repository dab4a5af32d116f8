//! Snapshots: one per step of a run, their lifecycle, and their JSON form.
//!
//! A run's history is the list of its snapshots in `seq` order. A snapshot holds the node to run
//! and the state *before* it runs (as pydantic_graph's `NodeSnapshot`), or, for the last one, the
//! run's output (`EndSnapshot`). Its status moves along
//!
//! ```text
//! created ──claim──▶ pending ──start──▶ running ──▶ success | error
//!    ▲                  │                  │
//!    └──── lease expired (attempt + 1) ────┘
//! waiting ──answer──▶ created            pending ──replace──▶ skipped
//! ```
//!
//! and every other move is an [`Error::IllegalTransition`]. Snapshots are never deleted: a retry
//! or a replacement is a new snapshot.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::Error;
use crate::clock::Timestamp;

/// Serialized JSON, kept as text: nodes, states, outputs, requests and answers.
///
/// Written into a snapshot's JSON as it is (not as a string). Made by [`Json::encode`] (an
/// allocation of the exact size, no second parse) or [`Json::from_string`] (checked). A store
/// that keeps snapshots in memory may get states as values instead, encoded when first read.
#[derive(Clone)]
pub struct Json(Repr);

#[derive(Clone)]
enum Repr {
    Text(Box<str>),
    Value(Arc<dyn Deferred>),
}

/// A value whose JSON is made when first asked for.
trait Deferred: Send + Sync {
    fn text(&self) -> &str;
}

struct Lazy<T> {
    value: T,
    text: std::sync::OnceLock<Box<str>>,
}

impl<T: Serialize + Send + Sync> Deferred for Lazy<T> {
    fn text(&self) -> &str {
        self.text.get_or_init(|| match Json::encode(&self.value) {
            Ok(Json(Repr::Text(text))) => text,
            Ok(json) => Box::from(json.get()),
            Err(err) => {
                // The state encoded when its run started; a value of it that cannot is read
                // as `null`, which does not decode into the state type.
                tracing::warn!(error = %err, "cannot encode a state kept in memory");
                Box::from("null")
            }
        })
    }
}

impl Json {
    /// `value` as JSON.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Json, serde_json::Error> {
        Json::encode_with(|buffer| serde_json::to_writer(buffer, value))
    }

    /// The JSON `write` puts in an empty buffer (which must be one JSON value).
    pub(crate) fn encode_with(
        write: impl Fn(&mut Vec<u8>) -> Result<(), serde_json::Error>,
    ) -> Result<Json, serde_json::Error> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let encode = |buffer: &mut Vec<u8>| -> Result<Json, serde_json::Error> {
            buffer.clear();
            write(buffer)?;
            let text = std::str::from_utf8(buffer).map_err(serde::ser::Error::custom)?;
            Ok(Json(Repr::Text(Box::from(text))))
        };
        // The scratch buffer spares the grow-then-shrink of a fresh one on every call; a
        // `Serialize` that encodes JSON itself gets a buffer of its own.
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut buffer) => encode(&mut buffer),
            Err(_) => encode(&mut Vec::new()),
        })
    }

    /// `text`, checked to be one JSON value.
    pub fn from_string(text: String) -> Result<Json, serde_json::Error> {
        RawValue::from_string(text).map(Json::from)
    }

    /// `value`, encoded when first read (for stores that keep snapshots in memory).
    pub(crate) fn deferred<T: Serialize + Send + Sync + 'static>(value: T) -> Json {
        Json(Repr::Value(Arc::new(Lazy {
            value,
            text: std::sync::OnceLock::new(),
        })))
    }

    /// `null`.
    pub fn null() -> Json {
        Json(Repr::Text(Box::from("null")))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        match &self.0 {
            Repr::Text(text) => text,
            Repr::Value(value) => value.text(),
        }
    }

    /// Decodes it as `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.get())
    }
}

impl From<Box<RawValue>> for Json {
    fn from(raw: Box<RawValue>) -> Self {
        Json(Repr::Text(Box::<str>::from(raw)))
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Json {}

impl std::hash::Hash for Json {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.get().hash(state);
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Checked again here (serialization is for dumps and logs, not the step's path), so
        // that only JSON is ever written as it is.
        let raw: &RawValue = serde_json::from_str(self.get()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(Json::from)
    }
}

/// The id of a run. Cheap to clone (shared text).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunId(Arc<str>);

/// The id of a snapshot: `{node_id}:{32 hex digits}`, or `end:{hex}` for the end of a run.
/// Cheap to clone (shared text).
///
/// The id of a `waiting` snapshot is the id of its interrupt.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotId(Arc<str>);

impl RunId {
    /// The id whose text is `hex` as 32 lowercase hex digits.
    pub(crate) fn from_hex(hex: u128) -> Self {
        let digits = crate::clock::hex_digits(hex);
        RunId(Arc::from(std::str::from_utf8(&digits).unwrap_or_default()))
    }

    /// The run of a deployd task: the task's id (a UUID, as deployd makes them) as 32 hex
    /// digits, so that a task delivered again finds the run its first delivery started.
    /// `None` when `task_id` is not a UUID.
    pub fn for_task(task_id: &str) -> Option<Self> {
        uuid::Uuid::parse_str(task_id)
            .ok()
            .map(|id| Self::from_hex(id.as_u128()))
    }
}

impl SnapshotId {
    /// `{node_id}:{hex as 32 lowercase hex digits}`, formatted without a temporary string.
    pub(crate) fn from_parts(node_id: &str, hex: u128) -> Self {
        const MAX: usize = 96;
        let len = node_id.len() + 33;
        if len <= MAX {
            let mut buffer = [0u8; MAX];
            buffer[..node_id.len()].copy_from_slice(node_id.as_bytes());
            buffer[node_id.len()] = b':';
            buffer[node_id.len() + 1..len].copy_from_slice(&crate::clock::hex_digits(hex));
            if let Ok(text) = std::str::from_utf8(&buffer[..len]) {
                return SnapshotId(Arc::from(text));
            }
        }
        SnapshotId(Arc::from(format!("{node_id}:{hex:032x}")))
    }
}

macro_rules! string_id {
    ($name:ident) => {
        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(Arc::from(id))
            }
        }
        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(Arc::from(id))
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
        // Hashes the length and the last 16 bytes only: where the ids this crate makes differ
        // (their random hex), for a cheaper hash of a key looked up several times a step.
        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                let bytes = self.0.as_bytes();
                state.write(&bytes[bytes.len().saturating_sub(16)..]);
                state.write_usize(bytes.len());
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <Cow<'de, str>>::deserialize(deserializer)?;
                Ok(Self(Arc::from(text.as_ref())))
            }
        }
    };
}
string_id!(RunId);
string_id!(SnapshotId);

/// Where a snapshot is in its lifecycle.
///
/// The first five are pydantic_graph's; `waiting` (an interrupt waits for its answer) and
/// `skipped` (the caller replaced a pending node before it ran) are deployd's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded, runnable, not yet claimed.
    Created,
    /// Claimed by a worker (it holds the lease) but not started.
    Pending,
    /// Its node is running.
    Running,
    /// Its node finished and its successor was recorded (for an end snapshot: the run ended).
    Success,
    /// Its node failed or panicked; `error` says why.
    Error,
    /// An interrupt waits for its answer.
    Waiting,
    /// Replaced by the caller before it ran.
    Skipped,
}

impl Status {
    /// The lowercase name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Success => "success",
            Status::Error => "error",
            Status::Waiting => "waiting",
            Status::Skipped => "skipped",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "created" => Status::Created,
            "pending" => Status::Pending,
            "running" => Status::Running,
            "success" => Status::Success,
            "error" => Status::Error,
            "waiting" => Status::Waiting,
            "skipped" => Status::Skipped,
            _ => return Err(Error::Storage(format!("unknown snapshot status {s:?}"))),
        })
    }
}

/// A node to run, or the end of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// pydantic_graph's `NodeSnapshot`.
    Node,
    /// pydantic_graph's `EndSnapshot`.
    End,
}

impl Kind {
    /// `node` or `end`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::End => "end",
        }
    }
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "node" => Ok(Kind::Node),
            "end" => Ok(Kind::End),
            _ => Err(Error::Storage(format!("unknown snapshot kind {s:?}"))),
        }
    }
}

/// Who holds a snapshot, and until when. Past `until`, anyone may take it back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The worker holding it (shared text: cheap to clone).
    pub owner: Arc<str>,
    /// When the lease expires unless renewed.
    pub until: Timestamp,
}

/// One step of a run. See the [module docs](self) for the lifecycle.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `{node_id}:{hex}`, or `end:{hex}`.
    pub id: SnapshotId,
    /// The run it belongs to.
    pub run_id: RunId,
    /// Its position in the run's history, from 0; unique within the run.
    pub seq: u64,
    /// A node to run or the end.
    pub kind: Kind,
    /// The node's id (`end` for the end): borrowed from the graph when the runner wrote it,
    /// owned when it was read back.
    pub node_id: Cow<'static, str>,
    /// The node's fields and `node_id`, or for the end, the run's output.
    pub node: Json,
    /// The graph's state before the node runs (for the end: the final state).
    pub state: Json,
    /// Where it is in its lifecycle.
    pub status: Status,
    /// When it was recorded (pydantic_graph's `ts` of an end snapshot).
    pub created_ts: Timestamp,
    /// When its node started running.
    pub start_ts: Option<Timestamp>,
    /// How long its node ran, in seconds.
    pub duration: Option<f64>,
    /// 1 for the first try, plus one per retry or expired lease.
    pub attempt: u32,
    /// The worker holding it while `pending` or `running` (kept afterwards, for the record).
    pub lease: Option<Lease>,
    /// Why its node failed.
    pub error: Option<String>,
    /// The request of the interrupt it waits on.
    pub request: Option<Json>,
    /// The answer to that interrupt.
    pub answer: Option<Json>,
}

impl Snapshot {
    /// A `created` snapshot of a node. `node` must be the node's JSON object including `node_id`.
    pub fn node(
        run_id: RunId,
        seq: u64,
        node_id: &str,
        hex: &str,
        node: Json,
        state: Json,
        now: Timestamp,
    ) -> Self {
        let mut id = String::with_capacity(node_id.len() + 1 + hex.len());
        id.push_str(node_id);
        id.push(':');
        id.push_str(hex);
        Snapshot::with_id(
            SnapshotId::from(id),
            run_id,
            seq,
            Cow::Owned(node_id.to_owned()),
            node,
            state,
            now,
        )
    }

    /// A `created` snapshot of node `node_id` whose id ends in `hex` (the runner's path: no
    /// temporary strings).
    pub(crate) fn fresh(
        run_id: RunId,
        seq: u64,
        node_id: &'static str,
        hex: u128,
        node: Json,
        state: Json,
        now: Timestamp,
    ) -> Self {
        Snapshot::with_id(
            SnapshotId::from_parts(node_id, hex),
            run_id,
            seq,
            Cow::Borrowed(node_id),
            node,
            state,
            now,
        )
    }

    /// The end of a run whose id ends in `hex` (the runner's path).
    pub(crate) fn fresh_end(
        run_id: RunId,
        seq: u64,
        hex: u128,
        output: Json,
        state: Json,
        now: Timestamp,
    ) -> Self {
        Snapshot {
            kind: Kind::End,
            status: Status::Success,
            ..Snapshot::fresh(run_id, seq, "end", hex, output, state, now)
        }
    }

    fn with_id(
        id: SnapshotId,
        run_id: RunId,
        seq: u64,
        node_id: Cow<'static, str>,
        node: Json,
        state: Json,
        now: Timestamp,
    ) -> Self {
        Snapshot {
            id,
            run_id,
            seq,
            kind: Kind::Node,
            node_id,
            node,
            state,
            status: Status::Created,
            created_ts: now,
            start_ts: None,
            duration: None,
            attempt: 1,
            lease: None,
            error: None,
            request: None,
            answer: None,
        }
    }

    /// The end of a run (`success` from the start: there is nothing left to run).
    pub fn end(
        run_id: RunId,
        seq: u64,
        hex: &str,
        output: Json,
        state: Json,
        now: Timestamp,
    ) -> Self {
        Snapshot {
            kind: Kind::End,
            status: Status::Success,
            ..Snapshot::node(run_id, seq, "end", hex, output, state, now)
        }
    }

    /// Whether nothing will ever run from this snapshot again (`success`, `error`, `skipped`).
    pub fn is_final(&self) -> bool {
        matches!(
            self.status,
            Status::Success | Status::Error | Status::Skipped
        )
    }
}

/// A change of a snapshot's status, applied atomically by [`Store::transition`](crate::Store).
///
/// Transitions that carry an `owner` are refused with [`Error::Conflict`] unless `owner` holds
/// the snapshot's lease.
#[derive(Clone, Debug)]
pub enum Transition {
    /// `created → pending`: the lease is taken.
    Claim {
        /// The new lease.
        lease: Lease,
    },
    /// `pending → running`.
    Start {
        /// The lease holder.
        owner: Arc<str>,
        /// The start time, recorded as `start_ts`.
        at: Timestamp,
        /// The lease's new expiry.
        until: Timestamp,
    },
    /// `pending | running` stays, with the lease extended.
    Renew {
        /// The lease holder.
        owner: Arc<str>,
        /// The lease's new expiry.
        until: Timestamp,
    },
    /// `running → success`, and `next` (the successor, the end, or a waiting interrupt) is
    /// inserted in the same commit.
    Succeed {
        /// The lease holder.
        owner: Arc<str>,
        /// How long the node ran, in seconds.
        duration: f64,
        /// The snapshot that follows.
        next: Box<Snapshot>,
    },
    /// `running → error`, and `retry`, if any, is inserted in the same commit.
    Fail {
        /// The lease holder.
        owner: Arc<str>,
        /// How long the node ran, in seconds.
        duration: f64,
        /// Why it failed.
        error: String,
        /// A new try of the same node.
        retry: Option<Box<Snapshot>>,
    },
    /// `pending → skipped`, and `next` is inserted in the same commit.
    Replace {
        /// The lease holder.
        owner: Arc<str>,
        /// The replacement.
        next: Box<Snapshot>,
    },
    /// `waiting → created`, with the answer recorded.
    Answer {
        /// The answer, as JSON.
        answer: Json,
    },
}

impl Transition {
    /// The status the snapshot moves to.
    pub fn target(&self) -> Status {
        match self {
            Transition::Claim { .. } => Status::Pending,
            Transition::Start { .. } | Transition::Renew { .. } => Status::Running,
            Transition::Succeed { .. } => Status::Success,
            Transition::Fail { .. } => Status::Error,
            Transition::Replace { .. } => Status::Skipped,
            Transition::Answer { .. } => Status::Created,
        }
    }

    /// Whether a snapshot in `from` may take this transition.
    pub fn allowed_from(&self, from: Status) -> bool {
        match self {
            Transition::Claim { .. } => from == Status::Created,
            Transition::Start { .. } | Transition::Replace { .. } => from == Status::Pending,
            Transition::Renew { .. } => matches!(from, Status::Pending | Status::Running),
            Transition::Succeed { .. } | Transition::Fail { .. } => from == Status::Running,
            Transition::Answer { .. } => from == Status::Waiting,
        }
    }

    /// The lease holder the transition requires.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Transition::Claim { .. } | Transition::Answer { .. } => None,
            Transition::Start { owner, .. }
            | Transition::Renew { owner, .. }
            | Transition::Succeed { owner, .. }
            | Transition::Fail { owner, .. }
            | Transition::Replace { owner, .. } => Some(owner),
        }
    }

    /// The snapshot inserted with the transition, if any.
    pub fn inserted(&self) -> Option<&Snapshot> {
        match self {
            Transition::Succeed { next, .. } | Transition::Replace { next, .. } => Some(next),
            Transition::Fail { retry, .. } => retry.as_deref(),
            _ => None,
        }
    }

    /// Checks that `current` may take this transition: the status, then the lease holder.
    pub(crate) fn check(&self, current: &Snapshot) -> Result<(), Error> {
        if !self.allowed_from(current.status) {
            return Err(Error::IllegalTransition {
                id: current.id.clone(),
                from: current.status,
                to: self.target(),
            });
        }
        check_owner(
            &current.id,
            current.lease.as_ref().map(|l| &*l.owner),
            self.owner(),
        )
    }

    /// Applies the transition to `current`, which [`check`](Self::check) accepted.
    pub(crate) fn apply(&self, current: &mut Snapshot) {
        if !matches!(self, Transition::Renew { .. }) {
            current.status = self.target();
        }
        match self {
            Transition::Claim { lease } => current.lease = Some(lease.clone()),
            Transition::Start { at, until, .. } => {
                current.start_ts = Some(*at);
                set_until(current, *until);
            }
            Transition::Renew { until, .. } => set_until(current, *until),
            Transition::Succeed { duration, .. } => current.duration = Some(*duration),
            Transition::Fail {
                duration, error, ..
            } => {
                current.duration = Some(*duration);
                current.error = Some(error.clone());
            }
            Transition::Replace { .. } => {}
            Transition::Answer { answer } => current.answer = Some(answer.clone()),
        }
    }
}

impl Snapshot {
    /// Takes back a `pending` or `running` snapshot whose lease expired before `now`: it becomes
    /// `created` again with `attempt + 1`. Returns whether it did.
    pub(crate) fn expire(&mut self, now: Timestamp) -> bool {
        let expired = matches!(self.status, Status::Pending | Status::Running)
            && self.lease.as_ref().is_some_and(|l| l.until < now);
        if expired {
            self.status = Status::Created;
            self.attempt += 1;
            self.lease = None;
            self.start_ts = None;
        }
        expired
    }
}

fn set_until(snapshot: &mut Snapshot, until: Timestamp) {
    if let Some(lease) = &mut snapshot.lease {
        lease.until = until;
    }
}

/// The lease check shared by every backend: `Conflict` unless `required` holds the lease.
pub(crate) fn check_owner(
    id: &SnapshotId,
    holder: Option<&str>,
    required: Option<&str>,
) -> Result<(), Error> {
    match required {
        Some(owner) if holder != Some(owner) => Err(Error::Conflict {
            id: id.to_string(),
            reason: match holder {
                Some(holder) => format!("leased by {holder}, not {owner}"),
                None => format!("not leased by {owner}"),
            },
        }),
        _ => Ok(()),
    }
}

/// The history of one or more runs as a JSON array (pydantic_graph's layout, plus deployd's
/// fields).
pub fn to_json(snapshots: &[Snapshot]) -> Result<String, Error> {
    serde_json::to_string_pretty(snapshots).map_err(|source| Error::Codec {
        what: "snapshots",
        source,
    })
}

/// Reads a history written by [`to_json`], or by pydantic_graph (missing deployd fields get
/// defaults: an empty run id and `seq` = position in the array).
pub fn from_json(json: &str) -> Result<Vec<Snapshot>, Error> {
    let wire: Vec<Wire> = serde_json::from_str(json).map_err(|source| Error::Codec {
        what: "snapshots",
        source,
    })?;
    wire.into_iter()
        .enumerate()
        .map(|(i, w)| w.into_snapshot(i as u64))
        .collect()
}

impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Result_<'a> {
            data: &'a Json,
        }
        impl Serialize for Result_<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("data", self.data)?;
                map.end()
            }
        }
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("state", &self.state)?;
        match self.kind {
            Kind::Node => {
                map.serialize_entry("node", &self.node)?;
                map.serialize_entry("start_ts", &self.start_ts)?;
                map.serialize_entry("duration", &self.duration)?;
                map.serialize_entry("status", &self.status)?;
                map.serialize_entry("kind", "node")?;
            }
            Kind::End => {
                map.serialize_entry("result", &Result_ { data: &self.node })?;
                map.serialize_entry("ts", &self.created_ts)?;
                map.serialize_entry("kind", "end")?;
                map.serialize_entry("status", &self.status)?;
            }
        }
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("run_id", &self.run_id)?;
        map.serialize_entry("seq", &self.seq)?;
        map.serialize_entry("attempt", &self.attempt)?;
        if self.kind == Kind::Node {
            map.serialize_entry("created_ts", &self.created_ts)?;
        }
        map.serialize_entry("lease_owner", &self.lease.as_ref().map(|l| &*l.owner))?;
        map.serialize_entry("lease_until", &self.lease.as_ref().map(|l| l.until))?;
        map.serialize_entry("error", &self.error)?;
        map.serialize_entry("request", &self.request)?;
        map.serialize_entry("answer", &self.answer)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let seq = wire.seq.unwrap_or(0);
        wire.into_snapshot(seq).map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
struct WireResult {
    data: Json,
}

#[derive(Deserialize)]
struct WireNodeId {
    node_id: String,
}

#[derive(Deserialize)]
struct Wire {
    kind: Kind,
    id: SnapshotId,
    state: Json,
    #[serde(default)]
    node: Option<Json>,
    #[serde(default)]
    result: Option<WireResult>,
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    start_ts: Option<Timestamp>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    ts: Option<Timestamp>,
    #[serde(default)]
    run_id: Option<RunId>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    attempt: Option<u32>,
    #[serde(default)]
    created_ts: Option<Timestamp>,
    #[serde(default)]
    lease_owner: Option<String>,
    #[serde(default)]
    lease_until: Option<Timestamp>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    request: Option<Json>,
    #[serde(default)]
    answer: Option<Json>,
}

impl Wire {
    fn into_snapshot(self, position: u64) -> Result<Snapshot, Error> {
        let invalid = |what: &str| Error::Storage(format!("snapshot {}: {what}", self.id));
        let (node_id, node, status) = match self.kind {
            Kind::Node => {
                let node = self
                    .node
                    .ok_or_else(|| invalid("a node snapshot needs `node`"))?;
                let WireNodeId { node_id } =
                    serde_json::from_str(node.get()).map_err(|source| Error::Codec {
                        what: "a node's node_id",
                        source,
                    })?;
                (
                    Cow::Owned(node_id),
                    node,
                    self.status.unwrap_or(Status::Created),
                )
            }
            Kind::End => {
                let result = self
                    .result
                    .ok_or_else(|| invalid("an end snapshot needs `result`"))?;
                (
                    Cow::Borrowed("end"),
                    result.data,
                    self.status.unwrap_or(Status::Success),
                )
            }
        };
        let lease = match (self.lease_owner, self.lease_until) {
            (Some(owner), Some(until)) => Some(Lease {
                owner: Arc::from(owner),
                until,
            }),
            _ => None,
        };
        Ok(Snapshot {
            id: self.id,
            run_id: self.run_id.unwrap_or_else(|| RunId::from("")),
            seq: self.seq.unwrap_or(position),
            kind: self.kind,
            node_id,
            node,
            state: self.state,
            status,
            created_ts: self
                .created_ts
                .or(self.ts)
                .unwrap_or(Timestamp::from_micros(0)),
            start_ts: self.start_ts,
            duration: self.duration,
            attempt: self.attempt.unwrap_or(1),
            lease,
            error: self.error,
            request: self.request,
            answer: self.answer,
        })
    }
}

/// Serializes `value` as [`Json`].
pub(crate) fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Json, Error> {
    Json::encode(value).map_err(|source| Error::Codec { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Json {
        Json::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn pydantic_graph_history_loads() {
        // Written by pydantic_graph 1.x's FileStatePersistence.
        let json = r#"[
          {"state": {"count": 0}, "node": {"by": 1, "node_id": "Increment"},
           "start_ts": "2025-01-01T00:00:00.000001Z", "duration": 0.5, "status": "success",
           "kind": "node", "id": "Increment:7d2f0d4ad1f54e3db8a3f6d7e8f9a0b1"},
          {"state": {"count": 1}, "result": {"data": 1}, "ts": "2025-01-01T00:00:01Z",
           "kind": "end", "id": "end:0a1b2c3d4e5f60718293a4b5c6d7e8f9"}
        ]"#;
        let history = from_json(json).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].node_id, "Increment");
        assert_eq!(history[0].status, Status::Success);
        assert_eq!(history[1].kind, Kind::End);
        assert_eq!(history[1].node.get(), "1");
        assert_eq!(history[1].seq, 1);
        let again = from_json(&to_json(&history).unwrap()).unwrap();
        assert_eq!(to_json(&again).unwrap(), to_json(&history).unwrap());
    }

    #[test]
    fn renew_keeps_pending() {
        let mut s = Snapshot::node(
            RunId::from("r"),
            0,
            "A",
            "00",
            raw(r#"{"node_id":"A"}"#),
            raw("null"),
            Timestamp::from_micros(0),
        );
        let lease = Lease {
            owner: "w".into(),
            until: Timestamp::from_micros(10),
        };
        let claim = Transition::Claim { lease };
        claim.check(&s).unwrap();
        claim.apply(&mut s);
        let renew = Transition::Renew {
            owner: "w".into(),
            until: Timestamp::from_micros(20),
        };
        renew.check(&s).unwrap();
        renew.apply(&mut s);
        assert_eq!(s.status, Status::Pending);
        assert_eq!(s.lease.as_ref().unwrap().until, Timestamp::from_micros(20));
    }
}
