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
    snapshots: HashMap<SnapshotId, Snapshot, Fx>,
    /// Each run's snapshot ids in `seq` order.
    runs: HashMap<RunId, Vec<SnapshotId>, Fx>,
    /// `created` snapshots, oldest first.
    created: BTreeSet<(Timestamp, SnapshotId)>,
    /// `pending` and `running` snapshots.
    leased: HashSet<SnapshotId, Fx>,
    /// Whether to keep every snapshot, or only each run's latest.
    keep_history: bool,
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
        if self.snapshots.contains_key(&snapshot.id) {
            return Ok(false);
        }
        let taken = self.runs.get(&snapshot.run_id).is_some_and(|ids| {
            ids.binary_search_by_key(&snapshot.seq, |id| self.seq_of(id))
                .is_ok()
        });
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
            self.put(snapshot.clone());
        }
        Ok(new)
    }

    /// Stores `snapshot`, replacing any version with its id, and keeps the indexes right.
    pub(crate) fn put(&mut self, snapshot: Snapshot) {
        let known = self.snapshots.contains_key(&snapshot.id);
        self.unindex(&snapshot.id);
        self.index(&snapshot);
        if !known {
            match self.runs.get_mut(&snapshot.run_id) {
                Some(ids) => {
                    // Ids are in seq order; a new snapshot almost always goes last.
                    let position = ids
                        .iter()
                        .rposition(|id| {
                            self.snapshots.get(id).is_some_and(|s| s.seq < snapshot.seq)
                        })
                        .map_or(0, |p| p + 1);
                    ids.insert(position, snapshot.id.clone());
                }
                None => {
                    self.runs
                        .insert(snapshot.run_id.clone(), vec![snapshot.id.clone()]);
                }
            }
        }
        if self.keep_history {
            self.snapshots.insert(snapshot.id.clone(), snapshot);
        } else {
            let run = snapshot.run_id.clone();
            self.snapshots.insert(snapshot.id.clone(), snapshot);
            self.keep_latest(&run);
        }
    }

    fn seq_of(&self, id: &SnapshotId) -> u64 {
        self.snapshots.get(id).map_or(0, |s| s.seq)
    }

    fn index(&mut self, snapshot: &Snapshot) {
        self.index_entry(snapshot.status, snapshot.created_ts, &snapshot.id);
    }

    fn index_entry(&mut self, status: Status, created_ts: Timestamp, id: &SnapshotId) {
        if status == Status::Created {
            self.created.insert((created_ts, id.clone()));
        }
        if matches!(status, Status::Pending | Status::Running) {
            self.leased.insert(id.clone());
        }
    }

    fn unindex(&mut self, id: &SnapshotId) {
        if let Some(old) = self.snapshots.get(id) {
            if old.status == Status::Created {
                self.created.remove(&(old.created_ts, id.clone()));
            }
            self.leased.remove(id);
        }
    }

    /// Drops every snapshot of `run` but the one with the highest seq.
    fn keep_latest(&mut self, run: &RunId) {
        loop {
            let oldest = match self.runs.get_mut(run) {
                Some(ids) if ids.len() > 1 => ids.remove(0),
                _ => return,
            };
            self.unindex(&oldest);
            self.snapshots.remove(&oldest);
        }
    }

    /// Applies `transition` to `id` and inserts the snapshot it carries (returning its id), or
    /// changes nothing.
    pub(crate) fn transition(
        &mut self,
        id: &SnapshotId,
        transition: Transition,
    ) -> Result<Option<SnapshotId>, Error> {
        let current = self.snapshots.get(id).ok_or_else(|| not_found(id))?;
        transition.check(current)?;
        if let Some(next) = transition.inserted()
            && !self.check_insert(next)?
        {
            return Err(Error::Conflict {
                id: next.id.to_string(),
                reason: "a snapshot with this id exists".to_owned(),
            });
        }
        // Most transitions keep the snapshot in the index it is in (`pending → running`) or
        // take it out of every index (`running → success`): touch the indexes only as needed.
        let before = index_of(current.status);
        let after = index_of(transition.target());
        if before == after && before != Some(Status::Created) {
            if let Some(current) = self.snapshots.get_mut(id) {
                transition.apply(current);
            }
        } else {
            self.unindex(id);
            if let Some(current) = self.snapshots.get_mut(id) {
                transition.apply(current);
            }
            if let Some((status, created_ts)) =
                self.snapshots.get(id).map(|s| (s.status, s.created_ts))
            {
                self.index_entry(status, created_ts, id);
            }
        }
        let inserted = match transition {
            Transition::Succeed { next, .. } | Transition::Replace { next, .. } => Some(next),
            Transition::Fail { retry, .. } => retry,
            _ => None,
        };
        Ok(inserted.map(|next| {
            let id = next.id.clone();
            self.put(*next);
            id
        }))
    }

    pub(crate) fn claim(&mut self, run: Option<&RunId>, lease: &Lease) -> Option<Snapshot> {
        let id = match run {
            Some(run) => {
                let id = self.runs.get(run)?.last()?;
                (self.snapshots.get(id)?.status == Status::Created).then(|| id.clone())?
            }
            None => self.created.first()?.1.clone(),
        };
        let mut snapshot = self.snapshots.get(&id)?.clone();
        let claim = Transition::Claim {
            lease: lease.clone(),
        };
        claim.apply(&mut snapshot);
        self.put(snapshot.clone());
        Some(snapshot)
    }

    pub(crate) fn expire(&mut self, now: Timestamp) -> Vec<SnapshotId> {
        let expired: Vec<SnapshotId> = self
            .leased
            .iter()
            .filter(|id| {
                self.snapshots
                    .get(*id)
                    .and_then(|s| s.lease.as_ref())
                    .is_some_and(|l| l.until < now)
            })
            .cloned()
            .collect();
        for id in &expired {
            if let Some(mut snapshot) = self.snapshots.get(id).cloned()
                && snapshot.expire(now)
            {
                self.put(snapshot);
            }
        }
        expired
    }

    pub(crate) fn get(&self, id: &SnapshotId) -> Result<&Snapshot, Error> {
        self.snapshots.get(id).ok_or_else(|| not_found(id))
    }

    pub(crate) fn latest(&self, run: &RunId) -> Option<&Snapshot> {
        self.snapshots.get(self.runs.get(run)?.last()?)
    }

    pub(crate) fn history(&self, run: &RunId) -> Vec<Snapshot> {
        self.runs
            .get(run)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| self.snapshots.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
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
