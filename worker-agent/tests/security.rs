//! The real `worker-agent` binary against a broker that requires bearer tokens and mutual TLS: with its token
//! (from the environment), the CA and a client certificate it runs jobs; with a wrong token it is refused, says so
//! in its log and gets no job; the commands it runs do not get its token; with `--exec-user` (when the tests run
//! as root) they run as that user, in its groups only. Certificates are made by the test.

mod support;

use std::time::Duration;

use broker::{auth::Role, config::Tls};
use jobbroker::{client::ConnectOptions, v1 as pb};
use support::{common::tls::TestPki, *};
use tokio_stream::StreamExt as _;

const WORKER_TOKEN: &str = "agent-token-5e1f";
const PRODUCER_TOKEN: &str = "producer-token-9a3b";
const SOON: Duration = Duration::from_secs(20);

/// Watches job `id` until it ends; the last state seen.
async fn watch_to_the_end(options: &ConnectOptions, url: &str, id: &str) -> pb::Job {
    let mut client = options.connect(url.to_owned()).await.expect("the producer connects");
    let mut changes = client.watch_job(pb::WatchJobRequest { id: id.into() }).await.expect("watch").into_inner();
    let last = async {
        let mut last = None;
        while let Some(change) = changes.next().await {
            last = change.expect("a healthy watch").job;
        }
        last
    };
    tokio::time::timeout(SOON, last).await.expect("the job ends in time").expect("the watch sent the job")
}

/// A broker with fast timings that knows [`WORKER_TOKEN`] and [`PRODUCER_TOKEN`].
async fn broker_with_tokens() -> TestBroker {
    let mut settings = fast_settings(test_database().await);
    settings.security.tokens.add(Role::Worker, WORKER_TOKEN, "test").expect("a valid token");
    settings.security.tokens.add(Role::Producer, PRODUCER_TOKEN, "test").expect("a valid token");
    TestBroker::start(settings).await
}

/// Enqueues a job of `kind` on queue `secure` with the producer token and watches it to its end.
async fn run_job(url: &str, kind: &str) -> pb::Job {
    let producer = ConnectOptions::default().with_token(PRODUCER_TOKEN).expect("a valid token");
    let mut client = producer.connect(url.to_owned()).await.expect("the producer connects");
    let jobs = vec![pb::JobSpec::new("secure", kind, Vec::new())];
    let id = client.enqueue(pb::EnqueueRequest { jobs }).await.expect("enqueued").into_inner().jobs[0].id.clone();
    watch_to_the_end(&producer, url, &id).await
}

#[tokio::test]
async fn the_agent_works_with_a_token_and_mutual_tls() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("a scratch directory");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("written");
        path.to_str().expect("a UTF-8 path").to_owned()
    };
    let (ca, cert, key) =
        (file("ca.pem", &pki.ca), file("client.pem", &pki.client.cert), file("client.key", &pki.client.key));

    let mut settings = fast_settings(test_database().await);
    settings.security.tokens.add(Role::Worker, WORKER_TOKEN, "test").expect("a valid token");
    settings.security.tokens.add(Role::Producer, PRODUCER_TOKEN, "test").expect("a valid token");
    settings.security.tls = Some(Tls {
        cert_pem: pki.server.cert.clone().into_bytes(),
        key_pem: pki.server.key.clone().into_bytes(),
        client_ca_pem: Some(pki.ca.clone().into_bytes()),
    });
    let broker = TestBroker::start(settings).await;
    let url = format!("https://localhost:{}", broker.addr.port());
    let producer = ConnectOptions::default()
        .with_token(PRODUCER_TOKEN)
        .expect("a valid token")
        .with_ca_pem(pki.ca.as_bytes())
        .with_client_identity(pki.client.cert.as_bytes(), pki.client.key.as_bytes());

    let tls_flags = ["--tls-ca", &ca, "--tls-client-cert", &cert, "--tls-client-key", &key];
    let mut args = vec!["--queue", "secure", "--exec", "tr a-z A-Z", "--worker-id", "intruder"];
    args.extend(tls_flags);
    let intruder = spawn_agent(&url, &args, &[("JOBBROKER_TOKEN", "not-a-known-token")]);
    intruder.wait_for_log("the bearer token is not one this broker knows", SOON).await;

    let mut client = producer.connect(url.clone()).await.expect("the producer connects");
    let jobs = vec![pb::JobSpec::new("secure", "shout", b"hello".to_vec())];
    let id = client.enqueue(pb::EnqueueRequest { jobs }).await.expect("enqueued").into_inner().jobs[0].id.clone();

    args[5] = "trusted";
    let _agent = spawn_agent(&url, &args, &[("JOBBROKER_TOKEN", WORKER_TOKEN)]);
    let job = watch_to_the_end(&producer, &url, &id).await;
    assert_eq!((job.state(), job.result.as_slice()), (pb::JobState::Succeeded, b"HELLO".as_slice()));
    assert_eq!(job.worker_id, "trusted", "only the agent with a valid token ran it");
    broker.stop().await;
}

#[tokio::test]
async fn exec_commands_do_not_inherit_the_agents_token() {
    let broker = broker_with_tokens().await;
    // The command's whole environment, the variable by name, then the agent's own environment through /proc.
    let script = r#"env; echo "token=${JOBBROKER_TOKEN:-absent}"; cat /proc/$PPID/environ 2>&1 | tr '\0' '\n'"#;
    // As in a pod, the agent is not root (root may read any process's environment): the tests may run as root,
    // so the agent then runs as `nobody`.
    let agent = env!("CARGO_BIN_EXE_worker-agent");
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc")) == 0;
    let mut command = tokio::process::Command::new(if root { "setpriv" } else { agent });
    if root {
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", agent]);
    }
    command.args(["--broker", &broker.url, "--queue", "secure", "--exec", script]);
    command.env("JOBBROKER_TOKEN", WORKER_TOKEN).env("RUST_LOG", "info");
    let _agent = spawn_process("worker-agent", command);

    let job = run_job(&broker.url, "env").await;
    let id = &job.id;
    assert_eq!(job.state(), pb::JobState::Succeeded, "the agent authenticated with its token: {job:#?}");
    let environment = String::from_utf8_lossy(&job.result);
    assert!(environment.contains(&format!("JOB_ID={id}")), "the result is the command's environment: {environment}");
    assert!(environment.contains("\ntoken=absent\n"), "{environment}");
    assert!(environment.contains("Permission denied"), "the agent's /proc environ is closed: {environment}");
    assert!(!environment.contains(WORKER_TOKEN), "the token leaked to the command: {environment}");
    broker.stop().await;
}

#[tokio::test]
async fn exec_user_runs_commands_as_that_user_in_its_groups_only() {
    let broker = broker_with_tokens().await;
    let script = r#"id -u; id -g; id -G; echo "home=$HOME user=$USER"
        cat /proc/$PPID/environ >/dev/null 2>&1 && echo environ-readable || echo environ-closed"#;
    let args = ["--queue", "secure", "--exec-user", "nobody", "--exec", script];
    let mut agent = spawn_agent(&broker.url, &args, &[("JOBBROKER_TOKEN", WORKER_TOKEN)]);

    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        // Only root can switch users: the agent says so and does not start.
        let status = agent.wait_exit(SOON).await;
        assert_eq!(status.code(), Some(2), "a bad configuration exits 2: {}", agent.log());
        assert!(agent.log().contains("--exec-user: the agent runs as uid"), "{}", agent.log());
        return broker.stop().await;
    }
    let nobody = worker_agent::config::ExecUser::lookup("nobody").expect("a nobody user");
    let job = run_job(&broker.url, "id").await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{job:#?}\n{}", agent.log());
    let expected = format!(
        "{uid}\n{gid}\n{gid}\nhome={home} user=nobody\nenviron-closed\n",
        uid = nobody.uid,
        gid = nobody.gid,
        home = nobody.home.display()
    );
    assert_eq!(String::from_utf8_lossy(&job.result), expected, "the command ran as nobody, in nobody's groups only");
    broker.stop().await;
}
