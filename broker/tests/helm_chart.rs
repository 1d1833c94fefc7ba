//! The Helm chart (`helm/jobbroker`), checked offline and against the real binaries.
//!
//! `chart_passes_the_offline_checks` runs `helm/tests/chart_check.py check`: strict lint, the values schema (good
//! values pass, every file of `helm/tests/bad-values` is refused with its message), rendering with the default
//! values and each file of `helm/jobbroker/ci/`, validation of every object against the Kubernetes 1.30 schemas
//! (KEDA and Prometheus Operator objects by hand), the properties that matter (probes on the health service, grace
//! periods beyond the drains, secrets referenced and never inlined, non-root pods) and the Dockerfile.
//!
//! The other tests start the rendered containers as processes of the real binaries (see `helm/mod.rs`) with a test
//! database: every probe must find SERVING where it looks, metrics must be served where the chart says, the
//! `helm test` pod must pass, a job must flow through the rendered worker agent, and SIGTERM must end each process
//! within the grace period its pod is given.

mod common;
mod helm;

use std::time::Duration;

use common::{test_database, wait_for};
use helm::{LocalCluster, Process, Rendered, container, containers, env_value, pod_spec};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Generous for a start, a probe, a job: each normally takes well under a second.
const ARRIVES: Duration = Duration::from_secs(30);

#[test]
fn chart_passes_the_offline_checks() {
    helm::chart_tool(&["check"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn default_values_serve_probes_metrics_and_pass_the_helm_test() {
    let rendered = Rendered::render("default");
    let database = test_database().await;
    let cluster = LocalCluster::new(rendered, vec![("rel-jobbroker-database", "database-url", database.into_bytes())]);
    let deployment = cluster.rendered.object("Deployment", "broker");
    let mut broker = cluster.start(deployment, "broker");
    probes_report_serving(&cluster, &mut broker).await;
    metrics_are_served(&cluster).await;
    helm_test_passes(&cluster).await;
    broker_drains_within_its_grace(&cluster, broker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn all_features_migrate_serve_run_a_job_through_the_agent_and_pass_the_helm_test() {
    let rendered = Rendered::render("all-features-values.yaml");
    let database = test_database().await;
    let certs = std::env::temp_dir().join(format!("jobbroker-helm-certs-{}", uuid::Uuid::new_v4().simple()));
    let service = "rel-jobbroker";
    let fqdn = format!("{service}.{}.svc", rendered.namespace);
    helm::chart_tool(&["certs", certs.to_str().expect("a UTF-8 path"), service, &fqdn]);
    let pem = |name: &str| std::fs::read(certs.join(name)).expect("a generated certificate file");
    let secrets = vec![
        ("jobbroker-db", "url", database.into_bytes()),
        ("jobbroker-tokens", "tokens", b"admin t-admin\nworker t-worker\nproducer t-test\nworker t-test\n".to_vec()),
        ("jobbroker-worker-token", "token", b"t-worker".to_vec()),
        ("jobbroker-test-token", "token", b"t-test".to_vec()),
        ("jobbroker-tls", "tls.crt", pem("tls.crt")),
        ("jobbroker-tls", "tls.key", pem("tls.key")),
        ("jobbroker-tls", "ca.crt", pem("ca.crt")),
        ("jobbroker-client-tls", "tls.crt", pem("client.crt")),
        ("jobbroker-client-tls", "tls.key", pem("client.key")),
        ("jobbroker-client-tls", "ca.crt", pem("ca.crt")),
    ];
    let _ = std::fs::remove_dir_all(&certs);
    let cluster = LocalCluster::new(rendered, secrets);

    // The hook Job migrates; the brokers start with migrations off and must find the schema in place.
    let job = cluster.rendered.object("Job", "migrations");
    assert_eq!(
        env_value(container(cluster.rendered.object("Deployment", "broker"), "broker"), "JOBBROKER_MIGRATE"),
        Some("false")
    );
    let mut migrate = cluster.start(job, "migrate");
    let status = migrate.wait(ARRIVES).await;
    assert!(status.success(), "the migration Job failed ({status}):\n{}", migrate.log());

    let mut broker = cluster.start(cluster.rendered.object("Deployment", "broker"), "broker");
    probes_report_serving(&cluster, &mut broker).await;
    metrics_are_served(&cluster).await;
    let mut agent = cluster.start(cluster.rendered.object("Deployment", "worker"), "worker-agent");
    helm_test_passes(&cluster).await;
    a_job_flows_through_the_agent(&cluster, &mut agent).await;
    agent.assert_running();
    agent_drains_within_its_grace(&cluster, agent).await;
    broker_drains_within_its_grace(&cluster, broker).await;
}

/// Each gRPC probe of the broker Deployment, asked on the local stand-in of its port, answers SERVING, and the TCP
/// liveness probe's port accepts: the chart probes the health service the binary serves, where it serves it
/// (plaintext even when gRPC has TLS).
async fn probes_report_serving(cluster: &LocalCluster, broker: &mut Process) {
    let spec = container(cluster.rendered.object("Deployment", "broker"), "broker");
    for probe in ["startupProbe", "readinessProbe"] {
        let grpc = &spec[probe]["grpc"];
        let port = cluster.local_port(grpc["port"].as_u64().unwrap_or_else(|| panic!("{probe} is not a gRPC probe")));
        let service = grpc["service"].as_str().unwrap_or_default();
        let url = format!("http://127.0.0.1:{port}");
        wait_for(&format!("{probe} (service {service:?} at {url}) to find SERVING"), ARRIVES, || {
            let url = url.clone();
            async move {
                let channel = tonic::transport::Endpoint::from_shared(url).ok()?.connect().await.ok()?;
                let request = HealthCheckRequest { service: service.into() };
                let answer = HealthClient::new(channel).check(request).await.ok()?.into_inner();
                (answer.status() == ServingStatus::Serving).then_some(())
            }
        })
        .await;
        broker.assert_running();
    }
    let liveness = spec["livenessProbe"]["tcpSocket"]["port"].as_u64().expect("a TCP liveness probe");
    let liveness = cluster.local_port(liveness);
    tokio::net::TcpStream::connect(("127.0.0.1", liveness)).await.expect("the liveness probe's port accepts");
}

/// `GET /metrics` on the port the chart declares as `metrics` (and scrapes) answers Prometheus text.
async fn metrics_are_served(cluster: &LocalCluster) {
    let spec = container(cluster.rendered.object("Deployment", "broker"), "broker");
    let ports = spec["ports"].as_array().expect("broker ports");
    let metrics = ports.iter().find(|p| p["name"] == "metrics").expect("the chart declares a metrics port");
    let port = cluster.local_port(metrics["containerPort"].as_u64().expect("a port"));
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connecting to the metrics port");
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n").await.expect("sending a request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reading the response");
    assert!(response.starts_with("HTTP/1.") && response.contains(" 200 "), "GET /metrics: {response}");
    assert!(response.contains("# TYPE "), "GET /metrics is not Prometheus text: {response}");
}

/// The `helm test` hook pod: each container, init containers first, runs to success.
async fn helm_test_passes(cluster: &LocalCluster) {
    let pod = cluster.rendered.object("Pod", "test");
    assert_eq!(pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    for spec in containers(pod) {
        let name = spec["name"].as_str().expect("a container name");
        let mut process = cluster.start(pod, name);
        let status = process.wait(ARRIVES).await;
        assert!(status.success(), "helm test container {name} failed ({status}):\n{}", process.log());
    }
}

/// With the test pod's settings (token, CA, client certificate), `jobctl` enqueues a job of a kind the agent's
/// rendered config runs with `cat`; it succeeds with its payload as result. Without the token, the broker refuses.
async fn a_job_flows_through_the_agent(cluster: &LocalCluster, agent: &mut Process) {
    let pod = cluster.rendered.object("Pod", "test");
    let worker = container(cluster.rendered.object("Deployment", "worker"), "worker-agent");
    let queue = env_value(worker, "JOBBROKER_QUEUES").and_then(|q| q.split(',').next()).expect("the agent's queues");
    let payload = "hello from the chart";
    let enqueued = jobctl(cluster, pod, &["--json", "enqueue", queue, "echo", "--payload", payload]).await;
    let id = enqueued["id"].as_str().expect("enqueue prints the job id").to_owned();
    let watched = cluster.exec(pod, "smoke", &["watch", &id], ARRIVES).await;
    agent.assert_running();
    assert!(watched.status.success(), "job {id} did not succeed: {}", String::from_utf8_lossy(&watched.stderr));
    let job = jobctl(cluster, pod, &["--json", "get", &id]).await;
    assert_eq!(job["result"], payload, "the agent ran `cat` on the payload: {job}");
    assert!(job["worker_id"].as_str().is_some_and(|w| !w.is_empty()), "a worker ran it: {job}");

    let mut anonymous = cluster.command(pod, "smoke", Some(&["get", &id]));
    anonymous.env_remove("JOBBROKER_TOKEN").kill_on_drop(true);
    let refused = tokio::time::timeout(ARRIVES, anonymous.output()).await.expect("jobctl in time").expect("jobctl");
    assert!(!refused.status.success(), "the broker answered a call without a token: the tokens file is not in use");
}

async fn jobctl(cluster: &LocalCluster, pod: &Value, args: &[&str]) -> Value {
    let output = cluster.exec(pod, "smoke", args, ARRIVES).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "jobctl {args:?} failed: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("jobctl {args:?} printed no JSON ({e}): {stderr}"))
}

/// After the preStop sleep the kubelet sends SIGTERM; the broker must be gone, cleanly, before the rest of
/// terminationGracePeriodSeconds runs out.
async fn broker_drains_within_its_grace(cluster: &LocalCluster, mut broker: Process) {
    let deployment = cluster.rendered.object("Deployment", "broker");
    let grace = pod_spec(deployment)["terminationGracePeriodSeconds"].as_u64().expect("a grace period");
    let pre_stop = container(deployment, "broker")["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap_or(0);
    let status = broker.terminate(Duration::from_secs(grace - pre_stop)).await;
    assert!(status.success(), "the broker's drain ended with {status}:\n{}", broker.log());
}

async fn agent_drains_within_its_grace(cluster: &LocalCluster, mut agent: Process) {
    let deployment = cluster.rendered.object("Deployment", "worker");
    let grace = pod_spec(deployment)["terminationGracePeriodSeconds"].as_u64().expect("a grace period");
    let status = agent.terminate(Duration::from_secs(grace)).await;
    assert!(status.success(), "the agent's drain ended with {status}:\n{}", agent.log());
}
