//! `--otlp-endpoint`: deployd's spans (see `deployd_manager::trace`) exported with OTLP over
//! HTTP (protobuf) to `<endpoint>/v1/traces`, in batches (every 5 s, or
//! `OTEL_BSP_SCHEDULE_DELAY` ms), under the service name `deployd`.

use anyhow::Context as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The exporter, running; [`Telemetry::shutdown`] sends what is left.
pub(crate) struct Telemetry {
    provider: SdkTracerProvider,
}

/// Starts exporting to `endpoint` (`http://collector:4318`) and turns deployd's spans on.
pub(crate) fn start(endpoint: &str) -> anyhow::Result<Telemetry> {
    let endpoint = endpoint.trim_end_matches('/');
    let url = if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .build()
        .with_context(|| format!("cannot export traces to {url}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("deployd").build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    deployd_manager::trace::enable();
    tracing::info!(endpoint = %url, "exporting traces with OTLP");
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Exports the spans not sent yet, then stops. Blocking: the exporter has its own thread.
    pub(crate) fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "cannot send the last traces");
        }
    }
}
