//! The `broker` binary: parse the command line, set up logging (and, when asked, OTLP span export), run.

use std::process::ExitCode;

use anyhow::Context as _;
use broker::config::{Cli, LogFormat};
use clap::Parser as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let spans = match cli.otlp_collector().map_err(anyhow::Error::msg).and_then(|to| init_logging(cli.log_format, to)) {
        Ok(spans) => spans,
        Err(error) => {
            eprintln!("broker: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = broker::run(cli).await;
    // Sends the spans still buffered before the process ends.
    if let Some(Err(error)) = spans.map(|provider| provider.shutdown()) {
        eprintln!("broker: flushing spans to the OTLP collector: {error}");
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stdout as text or as JSON lines (with the current span and its parents: `trace_id`, `job_id`, …),
/// filtered by `RUST_LOG` (default `info,sqlx=warn`). With an OTLP collector, the same spans are also exported
/// there (batched); the returned provider must be shut down on exit.
fn init_logging(format: LogFormat, otlp_collector: Option<String>) -> anyhow::Result<Option<SdkTracerProvider>> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    };
    let provider = otlp_collector.map(span_exporter).transpose()?;
    // Without context activation a span starts when it closes (or gets a child), so the Enqueue handler can still
    // set its parent from the request's `traceparent` after the span was entered.
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("jobbroker-broker")).with_context_activation(false)
    });
    tracing_subscriber::registry().with(filter).with(logs).with(spans).init();
    Ok(provider)
}

/// A tracer provider that batches spans to the OTLP/gRPC collector at `endpoint`, as service `jobbroker-broker`.
fn span_exporter(endpoint: String) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&endpoint)
        .build()
        .with_context(|| format!("cannot set up OTLP export to {endpoint}"))?;
    let resource = Resource::builder().with_service_name("jobbroker-broker").build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}
