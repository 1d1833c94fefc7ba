//! The standard services beside `BrokerService`: gRPC health (whole server and per service), server reflection
//! v1 and v1alpha (every service listed and described), and what graceful shutdown does to health, to open Lease
//! streams and to the leases they hold.

mod common;

use std::time::{Duration, Instant};

use broker::config::Settings;
use common::{TestBroker, test_database, wait_for, worker::*};
use jobbroker::v1 as pb;
use prost::Message as _;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const BROKER_SERVICE: &str = "jobbroker.v1.BrokerService";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
/// Every service the broker serves, as reflection must list them.
const SERVICES: [&str; 4] = [BROKER_SERVICE, HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA];
const ARRIVES: Duration = Duration::from_secs(5);

async fn check(health: &mut HealthClient<Channel>, service: &str) -> Result<ServingStatus, tonic::Status> {
    let answer = health.check(HealthCheckRequest { service: service.into() }).await?;
    Ok(answer.into_inner().status())
}

#[tokio::test]
async fn health_is_serving_for_the_server_and_for_the_broker_service() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let mut health = HealthClient::new(broker.channel().await);
    for service in ["", BROKER_SERVICE] {
        // SERVING once the first database probe has answered.
        wait_for(&format!("health of `{service}` to be SERVING"), ARRIVES, || {
            let mut health = health.clone();
            async move { (check(&mut health, service).await.ok()? == ServingStatus::Serving).then_some(()) }
        })
        .await;
    }
    let unknown = check(&mut health, "no.such.Service").await.expect_err("an unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
    broker.stop().await;
}

/// Asks a reflection service (`v1` or `v1alpha`) for its service list and for the file declaring each of
/// `SERVICES`; returns the list and, per service, the files (encoded `FileDescriptorProto`s) it answered.
macro_rules! reflect {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let list = std::iter::once(MessageRequest::ListServices(String::new()));
        let describe = SERVICES.iter().map(|service| MessageRequest::FileContainingSymbol(service.to_string()));
        let requests: Vec<_> = list
            .chain(describe)
            .map(|request| ServerReflectionRequest { host: String::new(), message_request: Some(request) })
            .collect();
        let mut client = ServerReflectionClient::new($channel);
        let answers = client.server_reflection_info(tokio_stream::iter(requests)).await;
        let mut answers = answers.expect(concat!("reflection ", stringify!($version))).into_inner();
        let mut listed = Vec::new();
        let mut described = Vec::new();
        while let Some(answer) = answers.message().await.expect("a reflection answer") {
            match answer.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    listed = list.service.into_iter().map(|s| s.name).collect()
                }
                Some(MessageResponse::FileDescriptorResponse(files)) => described.push(files.file_descriptor_proto),
                other => panic!("unexpected {} reflection answer: {other:?}", stringify!($version)),
            }
        }
        (listed, described)
    }};
}

/// Whether one of `files` declares `service` (fully qualified) and, for ours, all of its methods.
fn declares(files: &[Vec<u8>], service: &str) -> bool {
    let (package, name) = service.rsplit_once('.').expect("a qualified name");
    files.iter().map(|file| prost_types::FileDescriptorProto::decode(file.as_slice()).expect("a descriptor")).any(
        |file| {
            file.package() == package
                && file.service.iter().any(|declared| {
                    let methods: Vec<&str> = declared.method.iter().map(|m| m.name()).collect();
                    declared.name() == name
                        && (service != BROKER_SERVICE
                            || ["Enqueue", "Lease", "Heartbeat", "Complete", "GetJob", "WatchJob", "CancelJob"]
                                .iter()
                                .all(|m| methods.contains(m)))
                })
        },
    )
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_and_describe_every_service() {
    let broker = TestBroker::start(Settings::with_database(test_database().await)).await;
    let channel = broker.channel().await;
    let answers = [("v1", reflect!(v1, channel.clone())), ("v1alpha", reflect!(v1alpha, channel.clone()))];
    for (version, (listed, described)) in answers {
        for service in SERVICES {
            assert!(listed.iter().any(|s| s == service), "reflection {version} lists {service}: {listed:?}");
        }
        assert_eq!(described.len(), SERVICES.len(), "reflection {version} answers every symbol");
        for (service, files) in SERVICES.iter().zip(&described) {
            assert!(declares(files, service), "reflection {version} resolves {service} to the file declaring it");
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_turns_health_off_sends_workers_away_and_keeps_their_leases() {
    let database = test_database().await;
    let mut settings = Settings::with_database(&database);
    settings.shutdown_grace = Duration::from_secs(10);
    // Short, so a lease wrongly shortened at shutdown would show in its deadline.
    settings.reconnect_grace = Duration::from_secs(1);
    let first = TestBroker::start(settings.clone()).await;
    let mut client = first.client().await;
    let ids = enqueue(&mut client, vec![pb::JobSpec::new("q", "work", b"p".to_vec())]).await;
    let mut worker = TestWorker::connect(client, "w1", &["q"], 1).await;
    let assignment = worker.assignment(ARRIVES).await;

    let mut health = HealthClient::new(first.channel().await);
    let mut watches = Vec::new();
    for service in ["", BROKER_SERVICE] {
        let mut watch = health.watch(HealthCheckRequest { service: service.into() }).await.expect("watch").into_inner();
        loop {
            let status = tokio::time::timeout(ARRIVES, watch.message()).await.expect("a health status in time");
            if status.expect("watch").expect("a status").status() == ServingStatus::Serving {
                break;
            }
        }
        watches.push((service, watch));
    }

    let started = Instant::now();
    let stopping = tokio::spawn(first.stop());
    // The client keeps its watches: they must not hold the shutdown open. Each says NOT_SERVING, then ends.
    for (service, watch) in &mut watches {
        loop {
            let status = tokio::time::timeout(ARRIVES, watch.message()).await.expect("a health change in time");
            let status = status.expect("the watch stays open until NOT_SERVING").expect("a status").status();
            if status == ServingStatus::NotServing {
                break;
            }
        }
        println!("`{service}` NOT_SERVING {:?} after the shutdown began", started.elapsed());
        match tokio::time::timeout(ARRIVES, watch.message()).await.expect("the watch ends in time") {
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "the watch is sent elsewhere: {status:?}"),
            Ok(other) => panic!("expected the health watch to end UNAVAILABLE, got {other:?}"),
        }
    }
    match worker.next_message(ARRIVES).await {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "the worker is sent elsewhere: {status:?}"),
        other => panic!("expected the Lease stream to end UNAVAILABLE, got {other:?}"),
    }
    stopping.await.expect("stop ran");
    let took = started.elapsed();
    println!("graceful shutdown took {took:?}");
    assert!(took < settings.shutdown_grace / 2, "shutdown took {took:?}, close to the grace");
    drop(watches);

    // Another replica on the same database: the lease held at shutdown is intact and still current.
    let second = TestBroker::start(settings).await;
    let mut client = second.client().await;
    let job = get_job(&mut client, &ids[0]).await;
    assert_eq!(job.state(), pb::JobState::Leased);
    assert_eq!(job.lease_expires_at, assignment.lease_expires_at, "shutdown did not shorten the lease");
    let beat = pb::LeaseBeat { lease_id: assignment.lease_id.clone(), progress: None };
    let answer = client.heartbeat(pb::HeartbeatRequest { leases: vec![beat] }).await.expect("heartbeat");
    assert!(answer.into_inner().leases[0].active, "the lease is still active through another replica");
    second.stop().await;
}
