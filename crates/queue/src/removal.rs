//! Which topics this process removed ([`MessageQueue::delete_topic`](crate::MessageQueue)):
//! a member keeps a [`Removal`] of its topic from its `subscribe` on, ends with
//! [`Error::Closed`] once the topic is removed, and settles what it still holds as nothing, so
//! that no old message comes back through it and it does not create its group again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::Error;

/// The topics of the members of one queue, each with how many times it was removed.
#[derive(Default)]
pub(crate) struct Removals {
    topics: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Removals {
    /// A watch on `topic` for a member subscribing now: it fires at the topic's next removal.
    pub(crate) fn watch(&self, topic: &str) -> Removal {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        // Topics without members need no entry.
        topics.retain(|_, sender| sender.receiver_count() > 0);
        let sender = topics
            .entry(topic.to_owned())
            .or_insert_with(|| watch::channel(0).0);
        Removal(sender.subscribe())
    }

    /// `topic` was removed: its members from before now end.
    pub(crate) fn remove(&self, topic: &str) {
        let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = topics.get(topic) {
            sender.send_modify(|removals| *removals += 1);
        }
    }
}

/// A member's watch on its topic's removal.
#[derive(Clone)]
pub(crate) struct Removal(watch::Receiver<u64>);

impl Removal {
    /// Whether the topic was removed since the member subscribed.
    pub(crate) fn is_removed(&self) -> bool {
        self.0.has_changed().unwrap_or(true)
    }

    /// Returns once the topic was removed since the member subscribed.
    pub(crate) async fn removed(&self) {
        let mut receiver = self.0.clone();
        // An error means the sender is gone, which happens only once nobody watches.
        let _ = receiver.changed().await;
    }

    /// `next` of a member: `Error::Closed` once the topic is removed, else what `next` gives.
    /// `next` must be cancel safe, as [`Consumer::next`](crate::Consumer::next) is.
    pub(crate) async fn or_closed<T>(
        &self,
        next: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        if self.is_removed() {
            return Err(Error::Closed);
        }
        tokio::select! {
            biased;
            () = self.removed() => Err(Error::Closed),
            result = next => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_removal_ends_the_members_from_before_it_only() {
        let removals = Removals::default();
        let before = removals.watch("t");
        let other = removals.watch("u");
        assert!(!before.is_removed());
        let waiting = {
            let before = before.clone();
            tokio::spawn(async move {
                before
                    .or_closed(std::future::pending::<Result<(), Error>>())
                    .await
            })
        };
        tokio::task::yield_now().await;
        removals.remove("t");
        let ended = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the removal wakes the waiting member")
            .expect("no panic");
        assert!(matches!(ended, Err(Error::Closed)), "{ended:?}");
        assert!(before.is_removed());
        assert!(!other.is_removed(), "another topic is not touched");
        let after = removals.watch("t");
        assert!(
            !after.is_removed(),
            "a member subscribed after the removal lives on"
        );
        assert!(matches!(
            after.or_closed(async { Ok::<_, Error>(7) }).await,
            Ok(7)
        ));
        // Removing a topic nobody watches is harmless.
        removals.remove("never");
    }
}
