//! OpenTelemetry traces of tasks: one trace per task, from the HTTP request that created it
//! (the server's span) through the queue to the service call.
//!
//! The W3C trace context crosses the queue in the task message's `traceparent` header (with
//! `deployd-enqueued-at`, the time it was published), so that the worker that takes the task,
//! on this node or another and after a restart, continues the trace: a `task queued` span from
//! publication to delivery, and a `service call` span around `POST /tasks`, whose context goes
//! to the service in a `traceparent` header. Spans go through the global tracer provider,
//! which the binary sets up (`--otlp-endpoint`); until it does ([`enable`]), nothing here
//! makes a span or a header.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};

/// The W3C trace context header (and queue message header).
pub const TRACEPARENT: &str = "traceparent";

/// The queue message header with the time the task was published (ms since the epoch).
pub(crate) const ENQUEUED_AT: &str = "deployd-enqueued-at";

/// The name deployd's spans are made under.
pub const TRACER: &str = "deployd";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns tracing on: call once the global tracer provider exports somewhere.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are made.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The `traceparent` of the span active in `cx`, when there is a valid one.
pub fn traceparent_of(cx: &Context) -> Option<String> {
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        )
    })
}

/// A context whose remote parent is the span a `traceparent` names; `None` when the text is
/// not one (a malformed header is ignored, as W3C asks).
pub fn context_of(traceparent: &str) -> Option<Context> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; a later version may add more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    context
        .is_valid()
        .then(|| Context::new().with_remote_span_context(context))
}

/// The headers a task's queue message carries for its trace: none when tracing is off or no
/// span is active.
pub(crate) fn message_headers() -> Option<[(&'static str, String); 2]> {
    if !enabled() {
        return None;
    }
    let traceparent = traceparent_of(&Context::current())?;
    Some([
        (TRACEPARENT, traceparent),
        (ENQUEUED_AT, crate::store::now_ms().to_string()),
    ])
}

/// The spans of one delivery of a task: `task queued` is recorded at once (from publication
/// to now); the `service call` span runs until [`TaskTrace::end`].
pub(crate) struct TaskTrace {
    call: Context,
}

impl TaskTrace {
    /// Starts the trace of a delivery from its message's headers; `None` without them or
    /// with tracing off.
    pub(crate) fn start(
        headers: &std::collections::BTreeMap<String, String>,
        task_id: &str,
        service: &str,
        attempt: u32,
    ) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let parent = context_of(headers.get(TRACEPARENT)?)?;
        let tracer = global::tracer(TRACER);
        let attributes = [
            KeyValue::new("deployd.task_id", task_id.to_owned()),
            KeyValue::new("deployd.service", service.to_owned()),
            KeyValue::new("deployd.attempt", i64::from(attempt)),
        ];
        let enqueued = headers
            .get(ENQUEUED_AT)
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        let mut queued = tracer
            .span_builder("task queued")
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes.clone());
        if let Some(enqueued) = enqueued {
            queued = queued.with_start_time(enqueued);
        }
        queued.start_with_context(&tracer, &parent).end();
        let call = tracer
            .span_builder(format!("service call {service}"))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        Some(Self {
            call: parent.with_span(call),
        })
    }

    /// The `traceparent` the service is sent: the service call's span.
    pub(crate) fn traceparent(&self) -> Option<String> {
        traceparent_of(&self.call)
    }

    /// Ends the service call's span, as an error when the task failed or broke off.
    pub(crate) fn end(self, error: Option<&str>) {
        let span = self.call.span();
        if let Some(error) = error {
            span.set_status(Status::error(error.to_owned()));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_ignored() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_of(text).expect("a valid traceparent");
        assert_eq!(traceparent_of(&cx).as_deref(), Some(text));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(context_of(bad).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(context_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
    }
}
