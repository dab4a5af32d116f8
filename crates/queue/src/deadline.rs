//! Client-side ack deadlines: one watcher task per consumer for all the deliveries it handed
//! out, instead of a timer task per delivery, and the settle-once state of each of those
//! deliveries ([`Settlement`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Where an entry sits in a [`Deadlines`]; removes it with [`Deadlines::remove`].
pub(crate) type Key = (Instant, u64);

/// Whether a delivery handed out was settled, and where it waits in its consumer's
/// [`Deadlines`]. Whichever of its acker, its deadline and the consumer's drop (or the loss of
/// its channel) comes first settles it, through [`Deadlines::claim`]; the others find it
/// settled and leave it alone, so that a late ack or nack changes nothing.
#[derive(Default)]
pub(crate) struct Settlement {
    settled: AtomicBool,
    key: Mutex<Option<Key>>,
}

impl Settlement {
    /// Whether it was settled already.
    #[cfg(feature = "nats")]
    pub(crate) fn is_settled(&self) -> bool {
        self.settled.load(Ordering::SeqCst)
    }
}

/// A delivery watched in a [`Deadlines`].
pub(crate) trait Settles {
    fn settlement(&self) -> &Settlement;
}

/// The deliveries of one consumer by deadline.
pub(crate) struct Deadlines<T> {
    state: Mutex<State<T>>,
    notify: Notify,
    next: AtomicU64,
    /// How many times the watcher looked at the entries.
    #[cfg(test)]
    looks: AtomicU64,
}

struct State<T> {
    entries: BTreeMap<Key, Arc<T>>,
    /// When the watcher wakes up by itself; `None` while it waits for a notification only.
    /// An entry due earlier than this wakes it up.
    wake_at: Option<Instant>,
}

impl<T: Send + Sync + 'static> Deadlines<T> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                entries: BTreeMap::new(),
                wake_at: None,
            }),
            notify: Notify::new(),
            next: AtomicU64::new(0),
            #[cfg(test)]
            looks: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `value` until `at`.
    fn insert(&self, at: Instant, value: Arc<T>) -> Key {
        let key = (at, self.next.fetch_add(1, Ordering::Relaxed));
        let wake = {
            let mut state = self.lock();
            state.entries.insert(key, value);
            // Waking the watcher costs a task switch per delivery: only when it would sleep
            // past this deadline.
            let wake = state.wake_at.is_none_or(|wake_at| at < wake_at);
            if wake {
                state.wake_at = Some(at);
            }
            wake
        };
        if wake {
            self.notify.notify_one();
        }
        key
    }

    /// Stops watching the entry at `key`; `None` if it fired or was removed already.
    fn remove(&self, key: Key) -> Option<Arc<T>> {
        self.lock().entries.remove(&key)
    }

    /// Removes and returns every entry.
    fn drain(&self) -> Vec<Arc<T>> {
        std::mem::take(&mut self.lock().entries)
            .into_values()
            .collect()
    }

    /// Watches `held` until `at`, remembering where, so that [`Deadlines::claim`] can stop
    /// watching it; called again, it moves `held` to a later time.
    pub(crate) fn watch_until(&self, at: Instant, held: &Arc<T>)
    where
        T: Settles,
    {
        let key = self.insert(at, Arc::clone(held));
        *held
            .settlement()
            .key
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    /// Settles `held`: true for the first caller only, which also stops watching it.
    pub(crate) fn claim(&self, held: &T) -> bool
    where
        T: Settles,
    {
        let settlement = held.settlement();
        let first = !settlement.settled.swap(true, Ordering::SeqCst);
        if first
            && let Some(key) = settlement
                .key
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        {
            self.remove(key);
        }
        first
    }

    /// Stops watching every entry and settles them; returns those that were not settled yet,
    /// for the caller to hand back.
    pub(crate) fn drain_unsettled(&self) -> Vec<Arc<T>>
    where
        T: Settles,
    {
        self.drain()
            .into_iter()
            .filter(|held| !held.settlement().settled.swap(true, Ordering::SeqCst))
            .collect()
    }

    /// Calls `fire` for every entry whose deadline passed, in deadline order; runs until the
    /// task is aborted.
    pub(crate) async fn watch<F, Fut>(self: Arc<Self>, fire: F)
    where
        F: Fn(Arc<T>) -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            #[cfg(test)]
            self.looks.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let due = {
                let mut state = self.lock();
                let later = state.entries.split_off(&(now, u64::MAX));
                let due = std::mem::replace(&mut state.entries, later);
                state.wake_at = if due.is_empty() {
                    let earliest = state.entries.keys().next().map(|(at, _)| *at);
                    // A wake-up still ahead is kept even when what it was for was settled: it
                    // costs one look at that time, while dropping it would make the next
                    // insertion wake the watcher, a task switch per delivery of a consumer
                    // that settles each delivery before taking the next.
                    let ahead = state.wake_at.filter(|at| *at > now);
                    earliest.into_iter().chain(ahead).min()
                } else {
                    // Fire, then look again at once.
                    Some(now)
                };
                due
            };
            if !due.is_empty() {
                for (_, value) in due {
                    fire(value).await;
                }
                continue;
            }
            let wake_at = self.lock().wake_at;
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;

    struct Held {
        id: u32,
        settlement: Settlement,
    }

    impl Settles for Held {
        fn settlement(&self) -> &Settlement {
            &self.settlement
        }
    }

    fn held(id: u32) -> Arc<Held> {
        Arc::new(Held {
            id,
            settlement: Settlement::default(),
        })
    }

    /// A watcher that reports what fires, with the time it fired at.
    fn watched() -> (
        Arc<Deadlines<Held>>,
        mpsc::UnboundedReceiver<(u32, Instant)>,
    ) {
        let deadlines = Arc::new(Deadlines::new());
        let (fired, receiver) = mpsc::unbounded_channel();
        tokio::spawn(Arc::clone(&deadlines).watch(move |held: Arc<Held>| {
            let fired = fired.clone();
            async move {
                if held.settlement.settled.swap(true, Ordering::SeqCst) {
                    return;
                }
                let _ = fired.send((held.id, Instant::now()));
            }
        }));
        (deadlines, receiver)
    }

    async fn settle_a_little() {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsettled_entry_fires_at_its_deadline_and_a_settled_one_never() {
        let (deadlines, mut fired) = watched();
        let start = Instant::now();
        let settled = held(1);
        deadlines.watch_until(start + Duration::from_secs(5), &settled);
        let kept = held(2);
        deadlines.watch_until(start + Duration::from_secs(7), &kept);
        settle_a_little().await;
        assert!(deadlines.claim(&settled));
        assert!(!deadlines.claim(&settled), "a delivery settles once");
        let (id, at) = fired.recv().await.expect("a deadline fires");
        assert_eq!(id, 2);
        assert_eq!(at - start, Duration::from_secs(7));
        assert!(
            tokio::time::timeout(Duration::from_secs(60), fired.recv())
                .await
                .is_err(),
            "nothing else fires"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_watched_after_the_watcher_kept_an_earlier_wake_up_still_fires_on_time() {
        let (deadlines, mut fired) = watched();
        let start = Instant::now();
        let first = held(1);
        deadlines.watch_until(start + Duration::from_secs(10), &first);
        settle_a_little().await;
        assert!(deadlines.claim(&first));
        // The watcher still wakes at 10 s for the settled entry; this one is due later.
        let later = held(2);
        deadlines.watch_until(start + Duration::from_secs(25), &later);
        // And this one earlier than that wake-up.
        let earlier = held(3);
        deadlines.watch_until(start + Duration::from_secs(3), &earlier);
        let (id, at) = fired.recv().await.expect("a deadline fires");
        assert_eq!((id, at - start), (3, Duration::from_secs(3)));
        let (id, at) = fired.recv().await.expect("a deadline fires");
        assert_eq!((id, at - start), (2, Duration::from_secs(25)));
    }

    #[tokio::test(start_paused = true)]
    async fn settling_each_delivery_before_the_next_does_not_wake_the_watcher_for_each() {
        let (deadlines, _fired) = watched();
        for id in 0..1000 {
            let delivery = held(id);
            deadlines.watch_until(Instant::now() + Duration::from_secs(30), &delivery);
            // Settled before the watcher gets to look, as a quick consumer on another thread
            // does.
            assert!(deadlines.claim(&delivery));
            settle_a_little().await;
        }
        let looks = deadlines.looks.load(Ordering::Relaxed);
        assert!(
            looks <= 3,
            "the watcher looked {looks} times for 1000 deliveries settled one after another"
        );
    }
}
