//! Retrying broker calls across lost connections, within the [`Bounds`].

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::{Bounds, Error};

/// The reconnect backoff of `bounds`: exponential with jitter, never giving up by itself.
pub(crate) fn backoff(bounds: &Bounds) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(bounds.reconnect_min_delay)
        .with_max_delay(bounds.reconnect_max_delay.max(bounds.reconnect_min_delay))
        .with_jitter()
        .without_max_times()
}

/// The pauses of a loop that retries a broker call by hand, such as a consumer's receive
/// loop: none before the first failure, then the reconnect backoff, started over after a
/// success.
#[cfg(any(
    feature = "redis",
    feature = "rabbitmq",
    feature = "nats",
    feature = "sqs"
))]
pub(crate) struct Reconnect {
    bounds: Bounds,
    delays: Option<Box<dyn Iterator<Item = Duration> + Send>>,
}

#[cfg(any(
    feature = "redis",
    feature = "rabbitmq",
    feature = "nats",
    feature = "sqs"
))]
impl Reconnect {
    pub(crate) fn new(bounds: &Bounds) -> Self {
        Self {
            bounds: bounds.clone(),
            delays: None,
        }
    }

    /// The call succeeded: the next failure waits the shortest delay again.
    pub(crate) fn succeeded(&mut self) {
        self.delays = None;
    }

    /// The call (`what`) failed with `error`: logs it and waits the next delay.
    pub(crate) async fn pause(&mut self, what: &str, error: &(dyn std::fmt::Display + Sync)) {
        use backon::BackoffBuilder as _;
        let bounds = &self.bounds;
        let delay = self
            .delays
            .get_or_insert_with(|| Box::new(backoff(bounds).build()))
            .next()
            .unwrap_or(bounds.reconnect_max_delay);
        tracing::warn!(%error, ?delay, "{what} failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Runs `op` until it succeeds, retrying [`Error::Unavailable`] with the reconnect backoff;
/// gives up with [`Error::Unavailable`] naming `what` and the last error once `limit` has
/// passed. Any other error is returned at once.
pub(crate) async fn bounded<T, F, Fut>(
    bounds: &Bounds,
    limit: Duration,
    what: &str,
    op: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let last = Arc::new(Mutex::new(None::<String>));
    let noted = Arc::clone(&last);
    let retried = op
        .retry(backoff(bounds))
        .sleep(tokio::time::sleep)
        .when(|err| matches!(err, Error::Unavailable(_)))
        .notify(move |err, delay| {
            tracing::debug!(error = %err, ?delay, "broker call failed; retrying");
            *noted.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
        });
    match tokio::time::timeout(limit, retried).await {
        Ok(result) => result,
        Err(_) => {
            let last = last.lock().unwrap_or_else(|e| e.into_inner()).take();
            Err(Error::Unavailable(match last {
                Some(last) => {
                    format!("{what} did not succeed within {limit:?}; last error: {last}")
                }
                None => format!("{what} did not succeed within {limit:?}"),
            }))
        }
    }
}
