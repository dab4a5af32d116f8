//! The in-memory index of snapshots shared by [`MemoryStore`](super::MemoryStore) and
//! [`FileStore`](super::FileStore): the lifecycle rules applied to a map.

use std::collections::{BTreeSet, HashMap};
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
        // Fx's multiply moves differences only upward: ids that differ in their last
        // characters differ in the high bits alone. A final avalanche (MurmurHash3's fmix64)
        // spreads them over the low bits, which pick the bucket.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

type Fx = BuildHasherDefault<FxHasher>;

// Snapshots are boxed in their runs' vectors on purpose: a transition's successor arrives
// boxed, and a step then moves a pointer instead of a snapshot.
#[allow(clippy::vec_box)]
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// Where each snapshot is: its run and its seq.
    ids: HashMap<SnapshotId, (RunId, u64), Fx>,
    /// Each run's snapshots in `seq` order (only the latest unless `keep_history`), boxed: a
    /// transition's successor comes boxed and stays in its box.
    runs: HashMap<RunId, Vec<Box<Snapshot>>, Fx>,
    /// The indexes of snapshots by status.
    index: Index,
    /// Whether to keep every snapshot, or only each run's latest.
    keep_history: bool,
}

#[derive(Debug, Default)]
struct Index {
    /// `created` snapshots, oldest first.
    created: BTreeSet<(Timestamp, SnapshotId)>,
    /// How many `pending` or `running` snapshots each run has. Counted by run, so that a step
    /// (its snapshot leaves, its successor in the same run enters) leaves it untouched.
    leased: HashMap<RunId, usize, Fx>,
}

fn is_leased(status: Status) -> bool {
    matches!(status, Status::Pending | Status::Running)
}

impl Index {
    fn add(&mut self, snapshot: &Snapshot) {
        match snapshot.status {
            Status::Created => {
                self.created
                    .insert((snapshot.created_ts, snapshot.id.clone()));
            }
            Status::Pending | Status::Running => self.count(&snapshot.run_id, 1),
            _ => {}
        }
    }

    fn remove(&mut self, snapshot: &Snapshot) {
        match snapshot.status {
            Status::Created => {
                self.created
                    .remove(&(snapshot.created_ts, snapshot.id.clone()));
            }
            Status::Pending | Status::Running => self.count(&snapshot.run_id, -1),
            _ => {}
        }
    }

    /// Adds `delta` to the count of leased snapshots of `run`.
    fn count(&mut self, run: &RunId, delta: isize) {
        if delta == 0 {
            return;
        }
        let n = match self.leased.get_mut(run) {
            Some(n) => n,
            None => self.leased.entry(run.clone()).or_default(),
        };
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.leased.remove(run);
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
            return Err(place_taken(snapshot));
        }
        Ok(true)
    }

    pub(crate) fn insert(&mut self, snapshot: &Snapshot) -> Result<bool, Error> {
        let new = self.check_insert(snapshot)?;
        if new {
            self.add(Box::new(snapshot.clone()));
        }
        Ok(new)
    }

    /// Stores `snapshot`, replacing any version with its id, and keeps the indexes right.
    pub(crate) fn put(&mut self, snapshot: Snapshot) {
        let snapshot = Box::new(snapshot);
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

    /// Adds a snapshot whose id and place are free.
    fn add(&mut self, snapshot: Box<Snapshot>) {
        self.index.add(&snapshot);
        self.ids
            .insert(snapshot.id.clone(), (snapshot.run_id.clone(), snapshot.seq));
        match self.runs.get_mut(&snapshot.run_id) {
            Some(snapshots) => {
                let dropped = place(snapshots, snapshot, self.keep_history);
                self.forget(dropped);
            }
            None => {
                self.runs.insert(snapshot.run_id.clone(), vec![snapshot]);
            }
        }
    }

    /// Takes snapshots dropped by a latest-only store out of the id map and the indexes.
    fn forget(&mut self, dropped: Dropped) {
        for old in dropped {
            self.index.remove(&old);
            self.ids.remove(&old.id);
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
        let (run, seq) = match self.ids.get(id) {
            Some((run, seq)) => (run.clone(), *seq),
            None => return Err(not_found(id)),
        };
        // The place of a successor in another run (rare) is checked before the run of `id`
        // is borrowed.
        let elsewhere_taken = transition.inserted().is_some_and(|next| {
            next.run_id != run
                && self.runs.get(&next.run_id).is_some_and(|snapshots| {
                    snapshots.binary_search_by_key(&next.seq, |s| s.seq).is_ok()
                })
        });
        let Some(snapshots) = self.runs.get_mut(&run) else {
            return Err(not_found(id));
        };
        let Ok(position) = snapshots.binary_search_by_key(&seq, |s| s.seq) else {
            return Err(not_found(id));
        };
        transition.check(&snapshots[position])?;
        if let Some(next) = transition.inserted() {
            if self.ids.contains_key(&next.id) {
                return Err(Error::Conflict {
                    id: next.id.to_string(),
                    reason: "a snapshot with this id exists".to_owned(),
                });
            }
            let taken = elsewhere_taken
                || (next.run_id == run
                    && snapshots.binary_search_by_key(&next.seq, |s| s.seq).is_ok());
            if taken {
                return Err(place_taken(next));
            }
        }
        let current = &mut snapshots[position];
        let before = current.status;
        if before == Status::Created {
            self.index
                .created
                .remove(&(current.created_ts, current.id.clone()));
        }
        transition.apply(current);
        let after = current.status;
        if after == Status::Created {
            self.index
                .created
                .insert((current.created_ts, current.id.clone()));
        }
        let mut leased_delta = isize::from(is_leased(after)) - isize::from(is_leased(before));
        let inserted = match transition {
            Transition::Succeed { next, .. } | Transition::Replace { next, .. } => Some(next),
            Transition::Fail { retry, .. } => retry,
            _ => None,
        };
        let Some(next) = inserted else {
            self.index.count(&run, leased_delta);
            return Ok(None);
        };
        let next_id = next.id.clone();
        if next.run_id != run {
            self.index.count(&run, leased_delta);
            self.add(next);
            return Ok(Some(next_id));
        }
        // The usual step: the successor joins the same run, with no more hash lookups than
        // its id needs.
        leased_delta += isize::from(is_leased(next.status));
        if next.status == Status::Created {
            self.index
                .created
                .insert((next.created_ts, next.id.clone()));
        }
        self.ids.insert(next_id.clone(), (run.clone(), next.seq));
        let dropped = place(snapshots, next, self.keep_history);
        for old in dropped.iter() {
            if is_leased(old.status) {
                leased_delta -= 1;
            }
        }
        self.index.count(&run, leased_delta);
        for old in dropped {
            if old.status == Status::Created {
                self.index.created.remove(&(old.created_ts, old.id.clone()));
            }
            self.ids.remove(&old.id);
        }
        Ok(Some(next_id))
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
        Some((**snapshot).clone())
    }

    pub(crate) fn expire(&mut self, now: Timestamp) -> Vec<SnapshotId> {
        let mut expired = Vec::new();
        for (run, &count) in &self.index.leased {
            let Some(snapshots) = self.runs.get(run) else {
                continue;
            };
            // Leased snapshots are almost always the last: look from the end, and stop once
            // all of them are found.
            let mut found = 0;
            for snapshot in snapshots.iter().rev() {
                if found == count {
                    break;
                }
                if is_leased(snapshot.status) {
                    found += 1;
                    if snapshot.lease.as_ref().is_some_and(|l| l.until < now) {
                        expired.push(snapshot.id.clone());
                    }
                }
            }
        }
        expired.sort();
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
            .and_then(|(run, position)| self.runs.get(run)?.get(position).map(|s| &**s))
            .ok_or_else(|| not_found(id))
    }

    pub(crate) fn latest(&self, run: &RunId) -> Option<&Snapshot> {
        self.runs.get(run)?.last().map(|s| &**s)
    }

    pub(crate) fn history(&self, run: &RunId) -> Vec<Snapshot> {
        self.runs
            .get(run)
            .map(|snapshots| snapshots.iter().map(|s| (**s).clone()).collect())
            .unwrap_or_default()
    }

    /// Every snapshot, run by run, each run in `seq` order.
    pub(crate) fn all(&self) -> Vec<Snapshot> {
        let mut runs: Vec<&RunId> = self.runs.keys().collect();
        runs.sort();
        runs.into_iter().flat_map(|run| self.history(run)).collect()
    }
}

/// Snapshots a latest-only store dropped from a run: the one a step replaces (no allocation),
/// or several.
#[allow(clippy::vec_box)]
struct Dropped(Option<Box<Snapshot>>, Vec<Box<Snapshot>>);

impl Dropped {
    fn iter(&self) -> impl Iterator<Item = &Snapshot> {
        self.0.iter().chain(&self.1).map(|s| &**s)
    }
}

impl IntoIterator for Dropped {
    type Item = Box<Snapshot>;
    type IntoIter =
        std::iter::Chain<std::option::IntoIter<Box<Snapshot>>, std::vec::IntoIter<Box<Snapshot>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter().chain(self.1)
    }
}

/// Puts `snapshot` in its run's `snapshots` (in `seq` order); without `keep_history`, only the
/// latest stays, and the others are returned.
#[allow(clippy::vec_box)]
fn place(
    snapshots: &mut Vec<Box<Snapshot>>,
    snapshot: Box<Snapshot>,
    keep_history: bool,
) -> Dropped {
    if !keep_history
        && let [latest] = snapshots.as_mut_slice()
        && latest.seq < snapshot.seq
    {
        // The usual step of a latest-only store: the successor takes the old one's slot.
        return Dropped(Some(std::mem::replace(latest, snapshot)), Vec::new());
    }
    // A new snapshot almost always goes last.
    let position = snapshots.partition_point(|s| s.seq < snapshot.seq);
    snapshots.insert(position, snapshot);
    if keep_history || snapshots.len() == 1 {
        return Dropped(None, Vec::new());
    }
    let last = snapshots.len() - 1;
    Dropped(None, snapshots.drain(..last).collect())
}

fn place_taken(snapshot: &Snapshot) -> Error {
    Error::Conflict {
        id: snapshot.id.to_string(),
        reason: format!(
            "run {} already has a snapshot at seq {}",
            snapshot.run_id, snapshot.seq
        ),
    }
}

pub(crate) fn not_found(id: &SnapshotId) -> Error {
    Error::NotFound {
        what: "snapshot",
        id: id.to_string(),
    }
}
