//! OTLP export of the broker's own spans: with `--otlp-endpoint` the `broker` binary sends its spans to an OTLP/gRPC
//! collector (here a minimal one served by the test), the Enqueue span continuing the producer's `traceparent`, and
//! flushes them on exit; without the flag it exports nothing.

mod common;

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{test_database, wait_for};
use jobbroker::v1::{self as pb, broker_service_client::BrokerServiceClient};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::ResourceSpans,
};
use tokio::process::{Child, Command};
use tonic::{Request, Response, Status, transport::Channel};

const WAIT: Duration = Duration::from_secs(20);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// An OTLP trace collector that keeps every export it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ResourceSpans>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().expect("not poisoned").extend(request.into_inner().resource_spans);
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves the collector on a free local port until the test ends; returns its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(self.clone()));
        tokio::spawn(server.serve_with_incoming(incoming));
        url
    }

    /// `(service name, span name, trace id, parent span id)` of every span received, ids in hex.
    fn spans(&self) -> Vec<(String, String, String, String)> {
        let received = self.0.lock().expect("not poisoned");
        let mut spans = Vec::new();
        for resource_spans in received.iter() {
            let attributes = resource_spans.resource.iter().flat_map(|r| &r.attributes);
            let service = attributes
                .filter(|a| a.key == "service.name")
                .find_map(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                let (trace_id, parent_id) = (hex(&span.trace_id), hex(&span.parent_span_id));
                spans.push((service.clone(), span.name.clone(), trace_id, parent_id));
            }
        }
        spans
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `broker` binary on a free port with `extra` arguments and no OTLP settings from the environment.
async fn start_broker(extra: &[&str], env: &[(&str, &str)]) -> (Child, BrokerServiceClient<Channel>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("bound").port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port)).to_string();
    let database = test_database().await;
    let child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--database-url", &database, "--metrics-listen", "off", "--listen", &listen])
        .args(extra)
        .env_remove("JOBBROKER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the broker starts");
    let url = format!("http://{listen}");
    let client =
        wait_for("the broker to serve", WAIT, || async { BrokerServiceClient::connect(url.clone()).await.ok() }).await;
    (child, client)
}

/// Enqueues one job in a request carrying a `traceparent`.
async fn enqueue_traced(client: &mut BrokerServiceClient<Channel>) {
    let spec = pb::JobSpec::new("otlp", "traced", b"payload".to_vec());
    let mut request = tonic::Request::new(pb::EnqueueRequest { jobs: vec![spec] });
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().expect("ASCII"));
    client.enqueue(request).await.expect("enqueue");
}

/// Stops the broker with SIGTERM (a graceful exit) and waits for it to exit successfully.
async fn terminate(mut broker: Child) {
    let pid = broker.id().expect("running").to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill runs");
    assert!(killed.success(), "kill -TERM {pid}");
    let status = tokio::time::timeout(WAIT, broker.wait()).await.expect("the broker exits").expect("its status");
    assert!(status.success(), "the broker exited with {status}");
}

#[tokio::test]
async fn enqueue_spans_reach_the_collector_in_the_producers_trace_and_only_when_asked() {
    let collector = Collector::default();
    let url = collector.serve().await;

    // Off by default: even with the OTLP SDK's own per-signal variable pointing at the collector, nothing is sent.
    let (broker, mut client) = start_broker(&[], &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &url)]).await;
    enqueue_traced(&mut client).await;
    terminate(broker).await;
    assert_eq!(collector.spans(), [], "a broker without --otlp-endpoint exported spans");

    let (broker, mut client) = start_broker(&["--otlp-endpoint", &url], &[]).await;
    enqueue_traced(&mut client).await;
    // Spans are batched (every 5 s): a graceful exit flushes them, so they arrive at once.
    terminate(broker).await;
    let spans = collector.spans();
    let enqueue = spans.iter().find(|(_, name, _, _)| name == "enqueue");
    let expected = ("jobbroker-broker".to_owned(), "enqueue".to_owned(), TRACE_ID.to_owned(), PARENT_ID.to_owned());
    assert_eq!(enqueue, Some(&expected), "no Enqueue span in the producer's trace among {spans:?}");
}
