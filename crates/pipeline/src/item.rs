//! Items, the little that travels with them, and the chunks that carry them between stages.

use std::collections::VecDeque;
use std::mem;
use std::ops::{Deref, DerefMut};

use crate::budget::Permit;

/// What travels with an item besides its value. Most items have none, and carry only a null
/// pointer (`MetaBox` is `None`); the box exists once an item is urgent, tracked or budgeted.
#[derive(Debug, Default)]
pub(crate) struct Meta {
    /// Releases the batch the item lands in at once.
    pub(crate) urgent: bool,
    /// The item's entry in the pipeline's per-item progress.
    pub(crate) track: Option<usize>,
    /// Budget permits, released when the item is dropped or leaves the pipeline.
    pub(crate) permits: Vec<Permit>,
}

pub(crate) type MetaBox = Option<Box<Meta>>;

pub(crate) fn is_urgent(meta: &MetaBox) -> bool {
    meta.as_ref().is_some_and(|m| m.urgent)
}

pub(crate) fn track_id(meta: &MetaBox) -> Option<usize> {
    meta.as_ref().and_then(|m| m.track)
}

/// Items in order, with their metadata. `metas` is empty when no item has any, or exactly as
/// long as `values`: pipelines without budget, tracking or urgent items never touch it.
#[derive(Debug)]
pub(crate) struct Chunk<T> {
    values: VecDeque<T>,
    metas: VecDeque<MetaBox>,
}

impl<T> Default for Chunk<T> {
    fn default() -> Self {
        Chunk {
            values: VecDeque::new(),
            metas: VecDeque::new(),
        }
    }
}

impl<T> Chunk<T> {
    pub(crate) fn from_parts(values: Vec<T>, metas: Vec<MetaBox>) -> Self {
        let metas = if metas.len() == values.len() && metas.iter().any(Option::is_some) {
            VecDeque::from(metas)
        } else {
            VecDeque::new()
        };
        Chunk {
            values: VecDeque::from(values),
            metas,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.values.reserve(additional);
    }

    /// Adds an item with nothing attached.
    #[inline]
    fn push_value(&mut self, value: T) {
        if !self.metas.is_empty() {
            self.metas.push_back(None);
        }
        self.values.push_back(value);
    }

    pub(crate) fn push(&mut self, value: T, meta: MetaBox) {
        if meta.is_none() {
            self.push_value(value);
            return;
        }
        if self.metas.is_empty() {
            self.metas.resize_with(self.values.len(), || None);
        }
        self.metas.push_back(meta);
        self.values.push_back(value);
    }

    pub(crate) fn pop(&mut self) -> Option<(T, MetaBox)> {
        let value = self.values.pop_front()?;
        let meta = self.metas.pop_front().flatten();
        Some((value, meta))
    }

    /// Moves all of `other` to the end of `self` (without copying when `self` is empty).
    pub(crate) fn append_all(&mut self, mut other: Chunk<T>) {
        if self.is_empty() {
            *self = other;
            return;
        }
        let had = self.values.len();
        self.values.append(&mut other.values);
        if !other.metas.is_empty() {
            if self.metas.is_empty() {
                self.metas.resize_with(had, || None);
            }
            self.metas.append(&mut other.metas);
        } else if !self.metas.is_empty() {
            self.metas.resize_with(self.values.len(), || None);
        }
    }

    /// Splits off the first `n` items into a new chunk. The items after them are moved (one
    /// `memcpy`) into a new buffer; the first `n` keep this one, so both stay contiguous.
    pub(crate) fn split_front(&mut self, n: usize) -> Chunk<T> {
        let n = n.min(self.len());
        let rest = self.values.split_off(n);
        let values = mem::replace(&mut self.values, rest);
        let metas = if self.metas.is_empty() {
            VecDeque::new()
        } else {
            let rest = self.metas.split_off(n);
            mem::replace(&mut self.metas, rest)
        };
        Chunk { values, metas }
    }

    /// Whether any item is urgent.
    pub(crate) fn any_urgent(&self) -> bool {
        self.metas.iter().any(is_urgent)
    }

    /// Visits every item with a metadata slot of its own (creating the slots).
    pub(crate) fn for_each_meta(&mut self, mut f: impl FnMut(&T, &mut MetaBox)) {
        if self.metas.is_empty() {
            self.metas.resize_with(self.values.len(), || None);
        }
        for (value, meta) in self.values.iter().zip(self.metas.iter_mut()) {
            f(value, meta);
        }
    }

    /// The metadata of the items that have some.
    pub(crate) fn metas(&self) -> impl Iterator<Item = &Meta> {
        self.metas.iter().filter_map(|m| m.as_deref())
    }

    pub(crate) fn into_parts(self) -> (Vec<T>, Vec<MetaBox>) {
        (Vec::from(self.values), Vec::from(self.metas))
    }
}

/// Chunks in order: what a link holds, and what a stage has taken from it. Chunks move
/// whole between stages; only a consumer that wants part of one copies that part out.
#[derive(Debug)]
pub(crate) struct Queue<T> {
    chunks: VecDeque<Chunk<T>>,
    len: usize,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> Queue<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push_chunk(&mut self, chunk: Chunk<T>) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Adds one item at the end.
    pub(crate) fn push(&mut self, value: T, meta: MetaBox) {
        match self.chunks.back_mut() {
            Some(back) => back.push(value, meta),
            None => {
                let mut chunk = Chunk::default();
                chunk.push(value, meta);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub(crate) fn pop(&mut self) -> Option<(T, MetaBox)> {
        let front = self.chunks.front_mut()?;
        let item = front.pop();
        if front.is_empty() {
            self.chunks.pop_front();
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    /// The first chunk whole if it has at most `max` items, else its first `max` items.
    pub(crate) fn pop_chunk(&mut self, max: usize) -> Option<Chunk<T>> {
        let front = self.chunks.front_mut()?;
        let chunk = if front.len() <= max {
            self.chunks.pop_front()?
        } else {
            front.split_front(max)
        };
        self.len -= chunk.len();
        Some(chunk)
    }

    /// Visits every item with a metadata slot of its own (creating the slots).
    pub(crate) fn for_each_meta(&mut self, mut f: impl FnMut(&T, &mut MetaBox)) {
        for chunk in &mut self.chunks {
            chunk.for_each_meta(&mut f);
        }
    }
}

/// An item with what travels with it: its budget permit, its place in the per-item progress,
/// and whether it is urgent.
///
/// Stages written with [`Stage`](crate::Stage) read items with
/// [`Input::next_item`](crate::Input::next_item) and pass them on with
/// [`Output::put_item`](crate::Output::put_item) (after [`Item::map`]) when the output is the
/// same piece of work as the input: its budget permit then stays held until it leaves the
/// pipeline, and the per-item progress follows it. [`Input::next`](crate::Input::next) drops
/// all that and hands out the bare value.
#[derive(Debug)]
pub struct Item<T> {
    pub(crate) value: T,
    pub(crate) meta: MetaBox,
}

impl<T> Item<T> {
    /// A new item with nothing attached.
    pub fn new(value: T) -> Self {
        Item { value, meta: None }
    }

    /// A new urgent item: a stage reading batches releases the batch it lands in at once.
    pub fn urgent(value: T) -> Self {
        let meta = Meta {
            urgent: true,
            ..Meta::default()
        };
        Item {
            value,
            meta: Some(Box::new(meta)),
        }
    }

    /// Whether the item is urgent.
    pub fn is_urgent(&self) -> bool {
        is_urgent(&self.meta)
    }

    /// The value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The value, mutably.
    pub fn value_mut(&mut self) -> &mut T {
        &mut self.value
    }

    /// The value; what travelled with it (budget permits included) is released.
    pub fn into_value(self) -> T {
        self.value
    }

    /// Replaces the value, keeping what travels with it.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Item<U> {
        Item {
            value: f(self.value),
            meta: self.meta,
        }
    }
}

impl<T> From<T> for Item<T> {
    fn from(value: T) -> Self {
        Item::new(value)
    }
}

/// Items read together by [`Input::next_batch`](crate::Input::next_batch), never empty.
///
/// A batch dereferences to a slice of its values. [`Batch::into_vec`] hands out the values and
/// releases what travelled with them; [`Output::put_batch`](crate::Output::put_batch) passes
/// the whole batch on with it.
#[derive(Debug)]
pub struct Batch<T> {
    pub(crate) values: Vec<T>,
    /// Empty, or as long as `values`.
    pub(crate) metas: Vec<MetaBox>,
}

impl<T> Batch<T> {
    pub(crate) fn from_chunk(chunk: Chunk<T>) -> Self {
        let (values, metas) = chunk.into_parts();
        Batch { values, metas }
    }

    /// Whether an item of the batch is urgent (the batch was then released early).
    pub fn has_urgent(&self) -> bool {
        self.metas.iter().any(is_urgent)
    }

    /// The values; what travelled with them (budget permits included) is released.
    pub fn into_vec(self) -> Vec<T> {
        self.values
    }

    /// The items, each with what travels with it.
    pub fn into_items(self) -> Vec<Item<T>> {
        let mut metas = self.metas.into_iter();
        self.values
            .into_iter()
            .map(|value| Item {
                value,
                meta: metas.next().flatten(),
            })
            .collect()
    }

    pub(crate) fn into_parts(self) -> (Vec<T>, Vec<MetaBox>) {
        (self.values, self.metas)
    }
}

impl<T> Deref for Batch<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.values
    }
}

impl<T> DerefMut for Batch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urgent_meta() -> MetaBox {
        Some(Box::new(Meta {
            urgent: true,
            ..Meta::default()
        }))
    }

    #[test]
    fn metas_stay_aligned_with_values() {
        let mut a = Chunk::default();
        a.push(1, None);
        a.push(2, urgent_meta());
        a.push(3, None);
        let mut b = Chunk::default();
        b.push(4, None);
        b.append_all(a.split_front(2));
        assert_eq!(b.len(), 3);
        assert!(b.any_urgent());
        assert_eq!(b.pop().map(|(v, m)| (v, m.is_some())), Some((4, false)));
        assert_eq!(b.pop().map(|(v, m)| (v, m.is_some())), Some((1, false)));
        assert_eq!(b.pop().map(|(v, m)| (v, is_urgent(&m))), Some((2, true)));
        assert_eq!(b.pop().map(|(v, _)| v), None);
        assert_eq!(a.pop().map(|(v, m)| (v, m.is_some())), Some((3, false)));
        assert!(a.is_empty());
    }

    #[test]
    fn chunks_move_whole_unless_split() {
        let mut q = Queue::default();
        q.push_chunk(Chunk::from_parts(vec![1, 2, 3], Vec::new()));
        q.push_chunk(Chunk::from_parts(vec![4, 5], Vec::new()));
        assert_eq!(q.len(), 5);
        let first = q.pop_chunk(2).map(|c| c.into_parts().0);
        assert_eq!(first, Some(vec![1, 2]));
        assert_eq!(q.pop().map(|(v, _)| v), Some(3));
        let rest = q.pop_chunk(10).map(|c| c.into_parts().0);
        assert_eq!(rest, Some(vec![4, 5]));
        assert!(q.is_empty());
        assert!(q.pop().is_none());
    }
}
