//! TLS and mutual TLS on the gRPC port, with certificates made by the test (`common::tls`): the handshake works
//! for a client trusting the CA, a plaintext client and a client not trusting the CA are refused, mutual TLS
//! refuses clients without a certificate or with one from another CA, and the plaintext health port answers
//! probes while the main port is TLS. The broker is configured through its real flags (files by path).

mod common;

use std::{path::Path, time::Duration};

use broker::config::{Cli, Settings};
use clap::Parser as _;
use common::{TestBroker, test_database, tls::TestPki, wait_for};
use jobbroker::{
    client::ConnectOptions,
    v1::{self as pb, broker_service_client::BrokerServiceClient},
};
use tonic::{Code, transport::Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const SOON: Duration = Duration::from_secs(10);

/// The PKI's files in a scratch directory, and settings that name them as an operator would.
async fn tls_settings(pki: &TestPki, dir: &Path, mutual: bool) -> Settings {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("written");
        path.to_str().expect("a UTF-8 path").to_owned()
    };
    let (cert, key, ca) =
        (write("server.pem", &pki.server.cert), write("server.key", &pki.server.key), write("ca.pem", &pki.ca));
    let database = test_database().await;
    let mut args = vec!["broker", "--database-url", &database, "--tls-cert", &cert, "--tls-key", &key];
    if mutual {
        args.extend(["--tls-client-ca", &ca]);
    }
    Cli::try_parse_from(args).expect("valid flags").serve.validate().expect("valid settings")
}

fn https(broker: &TestBroker) -> String {
    format!("https://localhost:{}", broker.addr.port())
}

fn trusting(pki: &TestPki) -> ConnectOptions {
    ConnectOptions::default().with_ca_pem(pki.ca.as_bytes())
}

/// One GetJob for a job that does not exist: NOT_FOUND means the call went through TLS and reached the broker.
async fn get_missing_job(options: &ConnectOptions, url: &str) -> Result<(), String> {
    let mut client = options.connect(url.to_owned()).await.map_err(|e| format!("connect: {e:?}"))?;
    let request = pb::GetJobRequest { id: uuid::Uuid::new_v4().to_string() };
    match client.get_job(request).await {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        other => Err(format!("call: {other:?}")),
    }
}

#[tokio::test]
async fn tls_port_and_plaintext_health_port() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("a scratch directory");
    let broker = TestBroker::start_with_health_port(tls_settings(&pki, dir.path(), false).await).await;
    let url = https(&broker);

    wait_for("a TLS call to reach the broker", SOON, || async { get_missing_job(&trusting(&pki), &url).await.ok() })
        .await;
    // By IP address too (the certificate names 127.0.0.1), and by another name with --tls-domain.
    get_missing_job(&trusting(&pki), &format!("https://127.0.0.1:{}", broker.addr.port())).await.expect("by IP");
    let renamed = trusting(&pki).with_domain("localhost");
    get_missing_job(&renamed, &format!("https://127.0.0.1:{}", broker.addr.port())).await.expect("--tls-domain");

    // The platform's roots do not include the test CA: the handshake fails.
    let error = get_missing_job(&ConnectOptions::default(), &url).await.expect_err("an untrusted certificate");
    assert!(error.contains("connect"), "{error}");
    // A plaintext client gets nowhere on the TLS port.
    let plaintext = async {
        let mut client = BrokerServiceClient::connect(broker.url.clone()).await?;
        client.get_job(pb::GetJobRequest { id: "x".into() }).await.map_err(Into::into).map(drop)
    };
    let outcome: Result<(), Box<dyn std::error::Error>> =
        tokio::time::timeout(SOON, plaintext).await.expect("an answer");
    assert!(outcome.is_err(), "plaintext must not work on the TLS port");

    // Probes: plaintext, health only.
    let health_url = format!("http://{}", broker.health_addr.expect("a health port"));
    let channel = Endpoint::from_shared(health_url).expect("a URL").connect().await.expect("the health port");
    let health = HealthClient::new(channel.clone());
    wait_for("the health port to say SERVING", SOON, || {
        let mut health = health.clone();
        async move {
            let answer = health.check(HealthCheckRequest { service: "jobbroker.v1.BrokerService".into() }).await;
            (answer.ok()?.into_inner().status() == ServingStatus::Serving).then_some(())
        }
    })
    .await;
    let status = BrokerServiceClient::new(channel).get_job(pb::GetJobRequest { id: "x".into() }).await;
    assert_eq!(status.expect_err("no broker service there").code(), Code::Unimplemented);
    broker.stop().await;
}

#[tokio::test]
async fn mutual_tls_admits_only_certificates_from_the_client_ca() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("a scratch directory");
    let broker = TestBroker::start(tls_settings(&pki, dir.path(), true).await).await;
    let url = https(&broker);

    let member = trusting(&pki).with_client_identity(pki.client.cert.as_bytes(), pki.client.key.as_bytes());
    wait_for("a call with a CA-signed client certificate", SOON, || async {
        get_missing_job(&member, &url).await.ok()
    })
    .await;

    let anonymous = get_missing_job(&trusting(&pki), &url).await.expect_err("no client certificate");
    let stranger = trusting(&pki).with_client_identity(pki.stranger.cert.as_bytes(), pki.stranger.key.as_bytes());
    let stranger = get_missing_job(&stranger, &url).await.expect_err("a certificate from another CA");
    // With TLS 1.3 the server's verdict on the client certificate may arrive with the first call rather than
    // during connect: either way, nothing gets through.
    for refused in [anonymous, stranger] {
        assert!(
            refused.starts_with("connect") || refused.contains("Unavailable") || refused.contains("Unknown"),
            "{refused}"
        );
    }
    // The broker keeps serving its members.
    get_missing_job(&member, &url).await.expect("still served");
    broker.stop().await;
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_fails_the_start() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("a scratch directory");
    let mut settings = tls_settings(&pki, dir.path(), false).await;
    settings.security.tls.as_mut().expect("TLS on").key_pem = pki.client.key.clone().into_bytes();
    let broker = TestBroker::start(settings).await;
    let error = broker.try_stop().await.expect_err("serve refuses the identity");
    assert!(format!("{error:#}").contains("--tls-cert and --tls-key"), "{error:#}");
}
