//! Optional OpenTelemetry export of the trace spans (`--otlp-endpoint`,
//! built only with the cargo feature `otlp`).
//!
//! The spans are the debug-level ones under `raftwork::request`,
//! `raftwork::propose`, `raftwork::persist`, `raftwork::replicate` and
//! `raftwork::apply` (see ARCHITECTURE.md, "Observability"), whatever
//! `--log-level` says: the exporter has a filter of its own, so turning
//! traces on does not turn on debug logs. They go out over OTLP/HTTP with
//! protobuf bodies to `<endpoint>/v1/traces` (the endpoint is the
//! collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` is), in batches
//! from a thread of the exporter's own, service name `raftwork`. Plain
//! HTTP only: the exporter is built without TLS (run the collector beside
//! the node). Spans still queued are flushed when the server stops.

/// Keeps the exporter alive; [`Exporter::shutdown`] flushes it.
pub struct Exporter {
    #[cfg(feature = "otlp")]
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Exporter {
    /// Flushes queued spans and stops the exporter.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Err(e) = self.provider.shutdown() {
            eprintln!("raftwork: OTLP export: {e}");
        }
    }
}

/// Checks an `--otlp-endpoint` value.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .ok_or("the OTLP endpoint must be http://host:port (the exporter has no TLS)")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("the OTLP endpoint needs a host: http://host:port".into());
    }
    if !cfg!(feature = "otlp") {
        return Err(
            "this raftwork was built without OTLP export (cargo feature `otlp`: \
             cargo build --release -p raftwork-server --features otlp)"
                .into(),
        );
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// The exporting layer for `endpoint`, and its handle.
#[cfg(feature = "otlp")]
pub fn layer<S>(
    endpoint: &str,
) -> Result<(impl tracing_subscriber::Layer<S> + Send + Sync, Exporter), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
    use tracing_subscriber::Layer as _;

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .with_headers(Default::default())
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("raftwork")
                .build(),
        )
        .build();
    let tracer = provider.tracer("raftwork");
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("raftwork::request", tracing::Level::DEBUG)
        .with_target("raftwork::propose", tracing::Level::DEBUG)
        .with_target("raftwork::persist", tracing::Level::DEBUG)
        .with_target("raftwork::replicate", tracing::Level::DEBUG)
        .with_target("raftwork::apply", tracing::Level::DEBUG);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter);
    Ok((layer, Exporter { provider }))
}
