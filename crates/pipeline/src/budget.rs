//! A budget of items and bytes in flight, shared by the stages after the point it is set.

use std::fmt;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A bound on the items and bytes in flight, shared by every stage after the point where
/// [`Pipeline::budget`](crate::Pipeline::budget) attaches it (and by every pipeline the same
/// `Budget` is attached to; clones share it).
///
/// An item takes one item and its weight in bytes before it enters the next stage, and gives
/// them back when it leaves the pipeline (handed to the caller, dropped by the caller's drain)
/// or is dropped anywhere (a filter, an error, a cancelled pipeline). An item that weighs more
/// than the whole byte budget takes the whole budget: it waits until nothing else is in
/// flight, then passes alone. Waiters are served in order.
#[derive(Clone)]
pub struct Budget {
    items: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_items: u32,
    max_bytes: u32,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("max_items", &self.max_items)
            .field("max_bytes", &self.max_bytes)
            .field("available_items", &self.available_items())
            .field("available_bytes", &self.available_bytes())
            .finish()
    }
}

impl Budget {
    /// A budget of at most `max_items` items and `max_bytes` bytes in flight (each at least 1).
    pub fn new(max_items: u32, max_bytes: u32) -> Self {
        let max_items = max_items.max(1);
        let max_bytes = max_bytes.max(1);
        Budget {
            items: Arc::new(Semaphore::new(max_items as usize)),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_items,
            max_bytes,
        }
    }

    /// Items that may enter now.
    pub fn available_items(&self) -> usize {
        self.items.available_permits()
    }

    /// Bytes that may enter now.
    pub fn available_bytes(&self) -> usize {
        self.bytes.available_permits()
    }

    fn bytes_for(&self, weight: usize) -> u32 {
        u32::try_from(weight).map_or(self.max_bytes, |w| w.min(self.max_bytes))
    }

    /// A permit if one is free now, without waiting.
    pub(crate) fn try_acquire(&self, weight: usize) -> Option<Permit> {
        let bytes = self.bytes_for(weight);
        // Only take items when the bytes are free too, so a failed try holds nothing.
        if self.items.available_permits() == 0
            || (self.bytes.available_permits() as u64) < u64::from(bytes)
        {
            return None;
        }
        let items = Arc::clone(&self.items).try_acquire_owned().ok()?;
        let bytes = Arc::clone(&self.bytes).try_acquire_many_owned(bytes).ok()?;
        Some(Permit {
            _items: Some(items),
            _bytes: Some(bytes),
        })
    }

    /// Waits for a permit for an item of `weight` bytes.
    pub(crate) async fn acquire(&self, weight: usize) -> Permit {
        let bytes = self.bytes_for(weight);
        // The semaphores are never closed, so both acquisitions succeed.
        let items = Arc::clone(&self.items).acquire_owned().await.ok();
        let bytes = Arc::clone(&self.bytes).acquire_many_owned(bytes).await.ok();
        Permit {
            _items: items,
            _bytes: bytes,
        }
    }
}

/// One item's share of a [`Budget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    _items: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// A budget attached to a link, with the way to weigh the items entering it.
pub(crate) struct BudgetGate<T> {
    pub(crate) budget: Budget,
    pub(crate) weigh: Box<dyn Fn(&T) -> usize + Send + Sync>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_item_heavier_than_the_budget_takes_all_of_it() {
        let budget = Budget::new(10, 100);
        let small = budget.try_acquire(10);
        assert!(small.is_some());
        assert!(
            budget.try_acquire(1_000).is_none(),
            "must wait for the small one"
        );
        drop(small);
        let big = budget.try_acquire(1_000);
        assert!(big.is_some());
        assert_eq!(budget.available_bytes(), 0);
        assert_eq!(budget.available_items(), 9);
        drop(big);
        assert_eq!(budget.available_bytes(), 100);
        assert_eq!(budget.available_items(), 10);
    }
}
