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

/// An endless sequence of reconnect delays, for loops that retry by hand.
#[cfg(any(
    feature = "redis",
    feature = "rabbitmq",
    feature = "nats",
    feature = "sqs"
))]
pub(crate) struct Delays(Box<dyn Iterator<Item = Duration> + Send>);

#[cfg(any(
    feature = "redis",
    feature = "rabbitmq",
    feature = "nats",
    feature = "sqs"
))]
impl Delays {
    pub(crate) fn new(bounds: &Bounds) -> Self {
        use backon::BackoffBuilder as _;
        Self(Box::new(backoff(bounds).build()))
    }

    /// The next delay, or the longest one if the backoff ran out.
    pub(crate) fn next_delay(&mut self, bounds: &Bounds) -> Duration {
        self.0.next().unwrap_or(bounds.reconnect_max_delay)
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
