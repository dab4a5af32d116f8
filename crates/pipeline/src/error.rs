//! What can go wrong in a pipeline.

use std::fmt;

/// The error a stage returns to fail its pipeline: any error that is `Send + Sync`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a pipeline stopped before its end of stream.
///
/// The first error of any stage is the one returned; the errors that stages hit while they are
/// being cancelled are not reported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A stage returned an error (for a closure stage: the closure did, for one item).
    #[error("stage `{stage}` failed")]
    Stage {
        /// The name of the stage.
        stage: String,
        /// What the stage returned.
        #[source]
        source: BoxError,
    },
    /// A stage panicked. The panic was caught; the pipeline was cancelled like for an error.
    #[error("stage `{stage}` panicked: {message}")]
    Panicked {
        /// The name of the stage (`source` for the input stream of the pipeline).
        stage: String,
        /// The panic's message, when it was a string.
        message: String,
    },
    /// The pipeline was polled outside a tokio runtime; its stages run as tokio tasks.
    #[error("a pipeline needs a tokio runtime to run its stages")]
    NoRuntime,
}

impl Error {
    /// The name of the stage that failed, if a stage did.
    pub fn stage(&self) -> Option<&str> {
        match self {
            Error::Stage { stage, .. } | Error::Panicked { stage, .. } => Some(stage),
            Error::NoRuntime => None,
        }
    }
}

/// A `put` found the next stage gone: it stopped reading, or the pipeline is being cancelled.
///
/// A stage that returns this error (for example with `output.put(x).await?`) is taken to have
/// finished normally: a downstream stage that stops reading early is not a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the next stage no longer reads its input")]
pub struct Closed;

/// An item that failed in a stage, passed on as a value so that the other items go on.
///
/// Stages added with [`Pipeline::try_stage`](crate::Pipeline::try_stage) and
/// [`Pipeline::and_then`](crate::Pipeline::and_then) turn an item's error into
/// `Err(Failed { stage, error })`; later `and_then` stages pass it through untouched, so the
/// output of the pipeline holds one `Result` per input item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed<E> {
    /// The stage the item failed in.
    pub stage: String,
    /// The error the stage returned for the item.
    pub error: E,
}

impl<E: fmt::Display> fmt::Display for Failed<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage `{}` failed: {}", self.stage, self.error)
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for Failed<E> {}

/// The text of a caught panic's payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}
