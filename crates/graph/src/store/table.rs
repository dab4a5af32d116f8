//! The in-memory index of snapshots shared by [`MemoryStore`](super::MemoryStore) and
//! [`FileStore`](super::FileStore): the lifecycle rules applied to a map.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::Error;
use crate::clock::Timestamp;
use crate::snapshot::{Lease, RunId, Snapshot, SnapshotId, Status, Transition};

/// rustc's FxHash: several times faster than SipHash on the short ids used as keys here. Ids
/// end in random hex, and the table is in-process only.
#[derive(Debug, Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Fx = BuildHasherDefault<FxHasher>;

#[derive(Debug, Default)]
pub(crate) struct Table {
    /// Where each snapshot is: its run and its seq.
    ids: HashMap<SnapshotId, (RunId, u64), Fx>,
    /// Each run's snapshots in `seq` order (only the latest unless `keep_history`).
    runs: HashMap<RunId, Vec<Snapshot>, Fx>,
    /// The indexes of snapshots by status.
    index: Index,
    /// Whether to keep every snapshot, or only each run's latest.
    keep_history: bool,
}

#[derive(Debug, Default)]
struct Index {
    /// `created` snapshots, oldest first.
    created: BTreeSet<(Timestamp, SnapshotId)>,
    /// `pending` and `running` snapshots.
    leased: HashSet<SnapshotId, Fx>,
}

impl Index {
    fn add(&mut self, snapshot: &Snapshot) {
        match snapshot.status {
            Status::Created => {
                self.created
                    .insert((snapshot.created_ts, snapshot.id.clone()));
            }
            Status::Pending | Status::Running => {
                self.leased.insert(snapshot.id.clone());
            }
            _ => {}
        }
    }

    fn remove(&mut self, snapshot: &Snapshot) {
        match snapshot.status {
            Status::Created => {
                self.created
                    .remove(&(snapshot.created_ts, snapshot.id.clone()));
            }
            Status::Pending | Status::Running => {
                self.leased.remove(&snapshot.id);
            }
            _ => {}
        }
    }
}

impl Table {
    pub(crate) fn new(keep_history: bool) -> Self {
        Table {
            keep_history,
            ..Table::default()
        }
    }

    /// Whether `snapshot` is new (`Ok(false)`: its id exists), or `Conflict` if its place in
    /// the run is taken.
    fn check_insert(&self, snapshot: &Snapshot) -> Result<bool, Error> {
        if self.ids.contains_key(&snapshot.id) {
            return Ok(false);
        }
        let taken = self
            .runs
            .get(&snapshot.run_id)
            .is_some_and(|run| run.binary_search_by_key(&snapshot.seq, |s| s.seq).is_ok());
        if taken {
            return Err(Error::Conflict {
                id: snapshot.id.to_string(),
                reason: format!(
                    "run {} already has a snapshot at seq {}",
                    snapshot.run_id, snapshot.seq
                ),
            });
        }
        Ok(true)
    }

    pub(crate) fn insert(&mut self, snapshot: &Snapshot) -> Result<bool, Error> {
        let new = self.check_insert(snapshot)?;
        if new {
            self.add(snapshot.clone());
        }
        Ok(new)
    }

    /// Stores `snapshot`, replacing any version with its id, and keeps the indexes right.
    pub(crate) fn put(&mut self, snapshot: Snapshot) {
        if let Some((run, seq)) = self.ids.remove(&snapshot.id)
            && let Some(snapshots) = self.runs.get_mut(&run)
            && let Ok(position) = snapshots.binary_search_by_key(&seq, |s| s.seq)
        {
            let old = snapshots.remove(position);
            self.index.remove(&old);
            if snapshots.is_empty() {
                self.runs.remove(&run);
            }
        }
        // A version at the same place with another id is replaced too.
        if let Some(snapshots) = self.runs.get_mut(&snapshot.run_id)
            && let Ok(position) = snapshots.binary_search_by_key(&snapshot.seq, |s| s.seq)
        {
            let old = snapshots.remove(position);
            self.index.remove(&old);
            self.ids.remove(&old.id);
        }
        self.add(snapshot);
    }

    /// Adds a snapshot whose id and place are free (in memory-only mode, dropping every older
    /// snapshot of its run).
    fn add(&mut self, snapshot: Snapshot) {
        self.index.add(&snapshot);
        self.ids
            .insert(snapshot.id.clone(), (snapshot.run_id.clone(), snapshot.seq));
        let snapshots = match self.runs.get_mut(&snapshot.run_id) {
            Some(snapshots) => snapshots,
            None => {
                let run = snapshot.run_id.clone();
                self.runs.insert(run.clone(), vec![snapshot]);
                return;
            }
        };
        if !self.keep_history
            && let [latest] = snapshots.as_mut_slice()
            && latest.seq < snapshot.seq
        {
            // The usual step of a latest-only store: the new snapshot takes the old one's slot.
            let old = std::mem::replace(latest, snapshot);
            self.index.remove(&old);
            self.ids.remove(&old.id);
            return;
        }
        // A new snapshot almost always goes last.
        let position = snapshots.partition_point(|s| s.seq < snapshot.seq);
        snapshots.insert(position, snapshot);
        if !self.keep_history && snapshots.len() > 1 {
            let last = snapshots.len() - 1;
            for old in snapshots.drain(..last) {
                self.index.remove(&old);
                self.ids.remove(&old.id);
            }
        }
    }

    fn locate(&self, id: &SnapshotId) -> Option<(&RunId, usize)> {
        let (run, seq) = self.ids.get(id)?;
        let position = self
            .runs
            .get(run)?
            .binary_search_by_key(seq, |s| s.seq)
            .ok()?;
        Some((run, position))
    }

    /// Applies `transition` to `id` and inserts the snapshot it carries (returning its id), or
    /// changes nothing.
    pub(crate) fn transition(
        &mut self,
        id: &SnapshotId,
        transition: Transition,
    ) -> Result<Option<SnapshotId>, Error> {
        let (run, position) = self.locate(id).ok_or_else(|| not_found(id))?;
        let run = run.clone();
        let Some(current) = self.runs.get(&run).and_then(|s| s.get(position)) else {
            return Err(not_found(id));
        };
        transition.check(current)?;
        if let Some(next) = transition.inserted()
            && !self.check_insert(next)?
        {
            return Err(Error::Conflict {
                id: next.id.to_string(),
                reason: "a snapshot with this id exists".to_owned(),
            });
        }
        let Some(current) = self.runs.get_mut(&run).and_then(|s| s.get_mut(position)) else {
            return Err(not_found(id));
        };
        // Touch the indexes only when the snapshot moves between them.
        let before = index_of(current.status);
        let after = index_of(transition.target());
        if before == after && before != Some(Status::Created) {
            transition.apply(current);
        } else {
            self.index.remove(current);
            transition.apply(current);
            self.index.add(current);
        }
        let inserted = match transition {
            Transition::Succeed { next, .. } | Transition::Replace { next, .. } => Some(next),
            Transition::Fail { retry, .. } => retry,
            _ => None,
        };
        Ok(inserted.map(|next| {
            let id = next.id.clone();
            self.add(*next);
            id
        }))
    }

    pub(crate) fn claim(&mut self, run: Option<&RunId>, lease: &Lease) -> Option<Snapshot> {
        let (run, position) = match run {
            Some(run) => (run.clone(), self.runs.get(run)?.len().checked_sub(1)?),
            None => {
                let id = self.index.created.first()?.1.clone();
                let (run, position) = self.locate(&id)?;
                (run.clone(), position)
            }
        };
        let snapshot = self.runs.get_mut(&run)?.get_mut(position)?;
        if snapshot.status != Status::Created {
            return None;
        }
        self.index.remove(snapshot);
        Transition::Claim {
            lease: lease.clone(),
        }
        .apply(snapshot);
        self.index.add(snapshot);
        Some(snapshot.clone())
    }

    pub(crate) fn expire(&mut self, now: Timestamp) -> Vec<SnapshotId> {
        let expired: Vec<SnapshotId> = self
            .index
            .leased
            .iter()
            .filter(|id| {
                self.get(id)
                    .ok()
                    .and_then(|s| s.lease.as_ref())
                    .is_some_and(|l| l.until < now)
            })
            .cloned()
            .collect();
        for id in &expired {
            let Some((run, position)) = self.locate(id).map(|(r, p)| (r.clone(), p)) else {
                continue;
            };
            if let Some(snapshot) = self.runs.get_mut(&run).and_then(|s| s.get_mut(position)) {
                self.index.remove(snapshot);
                snapshot.expire(now);
                self.index.add(snapshot);
            }
        }
        expired
    }

    pub(crate) fn get(&self, id: &SnapshotId) -> Result<&Snapshot, Error> {
        self.locate(id)
            .and_then(|(run, position)| self.runs.get(run)?.get(position))
            .ok_or_else(|| not_found(id))
    }

    pub(crate) fn latest(&self, run: &RunId) -> Option<&Snapshot> {
        self.runs.get(run)?.last()
    }

    pub(crate) fn history(&self, run: &RunId) -> Vec<Snapshot> {
        self.runs.get(run).cloned().unwrap_or_default()
    }

    /// Every snapshot, run by run, each run in `seq` order.
    pub(crate) fn all(&self) -> Vec<Snapshot> {
        let mut runs: Vec<&RunId> = self.runs.keys().collect();
        runs.sort();
        runs.into_iter().flat_map(|run| self.history(run)).collect()
    }
}

/// The index a snapshot in `status` belongs to: `created`, leased (as `pending`), or none.
fn index_of(status: Status) -> Option<Status> {
    match status {
        Status::Created => Some(Status::Created),
        Status::Pending | Status::Running => Some(Status::Pending),
        _ => None,
    }
}

pub(crate) fn not_found(id: &SnapshotId) -> Error {
    Error::NotFound {
        what: "snapshot",
        id: id.to_string(),
    }
}
