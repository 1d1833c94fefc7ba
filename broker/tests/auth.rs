//! Bearer-token authentication over real gRPC: every method of every jobbroker service (read from the descriptor
//! set, so a method added later is covered) × {no token, an unknown token, producer, worker, admin}, plus
//! reflection and health; and a whole job's life carried by the generated clients with producer and worker
//! tokens (`jobbroker::client::ConnectOptions`).
//!
//! The matrix calls each path with an empty message: an auth refusal is UNAUTHENTICATED or PERMISSION_DENIED;
//! any other answer (INVALID_ARGUMENT, OK, UNIMPLEMENTED while AdminService is not served…) means the request got
//! past authentication.

mod common;

use std::{io::Write as _, time::Duration};

use broker::config::{Cli, Settings};
use clap::Parser as _;
use common::{TestBroker, test_database, wait_for};
use jobbroker::{
    client::ConnectOptions,
    v1::{self as pb, lease_request, lease_response},
};
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::{Code, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const ADMIN: &str = "admin-7f3c9d2e";
const PRODUCER: &str = "producer-1b8e4a90";
/// Given by flag rather than in the tokens file, to cover both sources.
const WORKER: &str = "worker-c5d2e7f1";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Methods each role may call, besides admin (who may call everything).
const PRODUCER_METHODS: [&str; 4] = ["Enqueue", "GetJob", "WatchJob", "CancelJob"];
const WORKER_METHODS: [&str; 3] = ["Lease", "Heartbeat", "Complete"];

/// Settings parsed from the command line as an operator writes it: a tokens file and a token flag.
async fn settings_with_tokens() -> (Settings, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().expect("a tokens file");
    write!(file, "# jobbroker tokens\nadmin {ADMIN}\n\nproducer   {PRODUCER}\n").expect("written");
    let database = test_database().await;
    let path = file.path().to_str().expect("a UTF-8 path").to_owned();
    let args = ["broker", "--database-url", &database, "--tokens-file", &path, "--worker-tokens", WORKER];
    let settings = Cli::try_parse_from(args).expect("valid flags").serve.validate().expect("valid settings");
    (settings, file)
}

#[test]
fn a_tokens_file_with_no_token_stops_the_start_instead_of_turning_auth_off() {
    let mut file = tempfile::NamedTempFile::new().expect("a tokens file");
    write!(file, "# filled in later by the deployment\n\n").expect("written");
    let path = file.path().to_str().expect("a UTF-8 path").to_owned();
    let args = ["broker", "--database-url", "postgres://localhost/unused", "--tokens-file", &path];
    let problem = Cli::try_parse_from(args).expect("valid flags").serve.validate().expect_err("refused");
    assert!(problem.contains(&format!("--tokens-file {path} holds no token")), "{problem}");
}

/// `/package.Service/Method` of every method of every service in jobbroker's protos.
fn jobbroker_paths() -> Vec<(String, String)> {
    let files = prost_types::FileDescriptorSet::decode(jobbroker::FILE_DESCRIPTOR_SET).expect("a descriptor set");
    let mut paths = Vec::new();
    for file in files.file {
        for service in &file.service {
            for method in &service.method {
                let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                paths.push((path, method.name().to_owned()));
            }
        }
    }
    paths
}

/// Calls `path` with an empty message (`authorization: Bearer <token>` if given); the answer's code.
async fn call(channel: &Channel, path: &str, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("the channel is ready");
    let mut request = tonic::Request::new(());
    request.set_timeout(CALL_TIMEOUT);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ASCII"));
    }
    let path = PathAndQuery::try_from(path).expect("a gRPC path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc.unary(request, path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Unauthenticated,
    PermissionDenied,
    PastAuth,
}

fn observed(code: Code) -> Expect {
    match code {
        Code::Unauthenticated => Expect::Unauthenticated,
        Code::PermissionDenied => Expect::PermissionDenied,
        _ => Expect::PastAuth,
    }
}

#[tokio::test]
async fn every_method_against_every_kind_of_caller() {
    let (settings, _tokens_file) = settings_with_tokens().await;
    let broker = TestBroker::start(settings).await;
    let channel = broker.channel().await;
    let paths = jobbroker_paths();
    assert!(paths.iter().any(|(path, _)| path == "/jobbroker.v1.BrokerService/Lease"), "{paths:?}");
    assert!(paths.iter().any(|(path, _)| path.starts_with("/jobbroker.v1.AdminService/")), "{paths:?}");

    let mut failures = Vec::new();
    for (path, method) in &paths {
        let admin_only = !path.starts_with("/jobbroker.v1.BrokerService/");
        let allowed = |methods: &[&str]| {
            if !admin_only && methods.contains(&method.as_str()) { Expect::PastAuth } else { Expect::PermissionDenied }
        };
        let callers = [
            ("no token", None, Expect::Unauthenticated),
            ("unknown token", Some("not-a-token"), Expect::Unauthenticated),
            ("producer", Some(PRODUCER), allowed(&PRODUCER_METHODS)),
            ("worker", Some(WORKER), allowed(&WORKER_METHODS)),
            ("admin", Some(ADMIN), Expect::PastAuth),
        ];
        for (caller, token, expected) in callers {
            let code = call(&channel, path, token).await;
            if observed(code) != expected {
                failures.push(format!("{path} as {caller}: expected {expected:?}, got {code:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "auth matrix mismatches:\n{}", failures.join("\n"));
    broker.stop().await;
}

#[tokio::test]
async fn health_is_open_and_reflection_needs_any_valid_token() {
    let (settings, _tokens_file) = settings_with_tokens().await;
    let broker = TestBroker::start(settings).await;
    let channel = broker.channel().await;

    let health = HealthClient::new(channel.clone());
    wait_for("health SERVING without a token", Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let answer = health.check(HealthCheckRequest { service: String::new() }).await.ok()?;
            (answer.into_inner().status() == ServingStatus::Serving).then_some(())
        }
    })
    .await;

    for path in [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        assert_eq!(call(&channel, path, None).await, Code::Unauthenticated, "{path} without a token");
        assert_eq!(call(&channel, path, Some("nope")).await, Code::Unauthenticated, "{path} with a bad token");
        for token in [PRODUCER, WORKER, ADMIN] {
            assert_eq!(observed(call(&channel, path, Some(token)).await), Expect::PastAuth, "{path}");
        }
    }
    // Unknown services and methods are admin-only: nobody learns what exists by probing.
    assert_eq!(call(&channel, "/no.such.Service/Method", Some(PRODUCER)).await, Code::PermissionDenied);
    assert_eq!(call(&channel, "/no.such.Service/Method", Some(ADMIN)).await, Code::Unimplemented);
    broker.stop().await;
}

/// Refusals say what is missing, and never echo the token.
#[tokio::test]
async fn refusals_are_clear() {
    let (settings, _tokens_file) = settings_with_tokens().await;
    let broker = TestBroker::start(settings).await;
    let plain = broker.client().await;
    let status = plain.clone().get_job(pb::GetJobRequest { id: "x".into() }).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("authorization: Bearer"), "{status:?}");

    let worker = ConnectOptions::default().with_token(WORKER).expect("a valid token");
    let mut as_worker = worker.connect(broker.url.clone()).await.expect("connected");
    let status = as_worker.get_job(pb::GetJobRequest { id: "x".into() }).await.expect_err("wrong role");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("GetJob") && status.message().contains("producer"), "{status:?}");
    assert!(!status.message().contains(WORKER), "the token is not echoed: {status:?}");
    broker.stop().await;
}

/// A producer enqueues and watches, a worker leases and completes, each with its own token, through the
/// generated client as users connect.
#[tokio::test]
async fn producer_and_worker_tokens_carry_a_job_through() {
    let (settings, _tokens_file) = settings_with_tokens().await;
    let broker = TestBroker::start(settings).await;
    let producer = ConnectOptions::default().with_token(PRODUCER).expect("a valid token");
    let mut producer = producer.connect(broker.url.clone()).await.expect("connected");
    let worker = ConnectOptions::default().with_token(WORKER).expect("a valid token");
    let mut worker = worker.connect(broker.url.clone()).await.expect("connected");

    let jobs = vec![pb::JobSpec::new("auth-q", "echo", b"hi".to_vec())];
    let enqueued = producer.enqueue(pb::EnqueueRequest { jobs }).await.expect("producer may enqueue");
    let id = enqueued.into_inner().jobs[0].id.clone();
    let mut watch = producer.watch_job(pb::WatchJobRequest { id: id.clone() }).await.expect("may watch").into_inner();

    let register =
        pb::Register { worker_id: "w1".into(), queues: vec!["auth-q".into()], capacity: 1, ..Default::default() };
    let first = pb::LeaseRequest { request: Some(lease_request::Request::Register(register)) };
    // The stream stays open (pending) after the register message.
    let requests = tokio_stream::iter([first]).chain(tokio_stream::pending());
    let mut assignments = worker.lease(requests).await.expect("worker may lease").into_inner();
    let assignment = match tokio::time::timeout(CALL_TIMEOUT, assignments.next()).await {
        Ok(Some(Ok(pb::LeaseResponse { response: Some(lease_response::Response::Assignment(a)) }))) => a,
        other => panic!("expected an assignment, got {other:?}"),
    };
    let success = pb::complete_request::Outcome::Success(pb::Success { result: b"HI".to_vec() });
    let complete = pb::CompleteRequest { lease_id: assignment.lease_id, outcome: Some(success) };
    worker.complete(complete).await.expect("worker may complete");

    let last = tokio::time::timeout(CALL_TIMEOUT, async {
        let mut last = None;
        while let Some(change) = watch.next().await {
            last = change.expect("the watch stream is healthy").job;
        }
        last
    })
    .await
    .expect("the watch ends after the terminal state")
    .expect("the watch sent the job");
    assert_eq!((last.state(), last.result.as_slice()), (pb::JobState::Succeeded, b"HI".as_slice()));
    broker.stop().await;
}
