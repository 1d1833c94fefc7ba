//! `broker dev`, the README's run command, as a user runs it: the real binary starts a private Postgres from
//! nothing, the worker agent next to it and the demo job; a Ctrl-C in its terminal (SIGINT to the whole process
//! group) lets the agent finish the job it runs before the broker and Postgres stop, and it exits 0.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use broker::devdb::{self, LocalPostgres, PgOptions};
use jobbroker::v1 as pb;
use sqlx::Row;

/// initdb, migrations and the agent's first connection, on a busy machine.
const START: Duration = Duration::from_secs(120);

#[tokio::test]
async fn dev_runs_the_demo_and_a_ctrl_c_lets_the_agent_finish_its_job() {
    let broker = Path::new(env!("CARGO_BIN_EXE_broker"));
    assert!(
        broker.with_file_name("worker-agent").is_file(),
        "`broker dev` starts the worker-agent built next to it: run `cargo test --workspace` (the README's test command)"
    );
    let dir = devdb::scratch_dir(&format!("dev-test-{}", uuid::Uuid::new_v4().simple()));
    let (pg_port, port) = (devdb::free_port().expect("a port"), devdb::free_port().expect("a port"));
    let log = std::env::temp_dir().join(format!("jobbroker-dev-test-{port}.log"));
    let mut dev = Command::new(broker)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "off", "dev", "--data-dir"])
        .arg(&dir)
        .args(["--pg-port", &pg_port.to_string(), "--agent-exec", "sleep 1; tr a-z A-Z"])
        .env_remove("DATABASE_URL")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .expect("start broker dev");
    let (lines, printed) = mpsc::channel();
    let stdout = dev.stdout.take().expect("stdout");
    std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).try_for_each(|l| lines.send(l)));
    let deadline = Instant::now() + START;
    let demo = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = printed.recv_timeout(left).unwrap_or_else(|_| {
            let _ = dev.kill();
            panic!("no demo job within {START:?}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        if line.starts_with("demo job") {
            break line;
        }
    };
    assert!(demo.contains(r#"Succeeded, result "HELLO FROM JOBBROKER""#), "{demo}");

    // A job the agent is running when the user presses Ctrl-C.
    let mut client = jobbroker::client::connect(format!("http://127.0.0.1:{port}")).await.expect("connect");
    let spec = pb::JobSpec::new("default", "k", b"finish me".to_vec());
    let id =
        client.enqueue(pb::EnqueueRequest { jobs: vec![spec] }).await.expect("enqueue").into_inner().jobs[0].id.clone();
    let leased = Instant::now() + Duration::from_secs(10);
    loop {
        let job = client.get_job(pb::GetJobRequest { id: id.clone() }).await.expect("get").into_inner().job;
        if job.is_some_and(|job| job.state() == pb::JobState::Leased) {
            break;
        }
        assert!(Instant::now() < leased, "the agent never took the job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    let group = format!("-{}", dev.id());
    assert!(Command::new("kill").args(["-INT", "--", &group]).status().expect("kill").success());
    let stopped = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = dev.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < stopped, "broker dev still runs 60 s after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}; log:\n{logged}");

    // The private Postgres was stopped with it; start it again to read what became of the job.
    let (data, port) = (dir.clone(), pg_port);
    let postgres = tokio::task::spawn_blocking(move || LocalPostgres::start(&data, port, &PgOptions::fast()))
        .await
        .expect("join")
        .expect("restart the dev Postgres");
    let pool = sqlx::PgPool::connect(&postgres.url()).await.expect("connect to the dev database");
    let row =
        sqlx::query("SELECT state, convert_from(result, 'UTF8') AS result FROM finished_jobs WHERE id = $1::uuid")
            .bind(&id)
            .fetch_optional(&pool)
            .await
            .expect("query");
    let outcome = row.map(|row| (row.get::<String, _>("state"), row.get::<String, _>("result")));
    assert_eq!(outcome, Some(("succeeded".into(), "FINISH ME".into())), "the running job finished; log:\n{logged}");
    pool.close().await;
    tokio::task::spawn_blocking(move || postgres.stop()).await.expect("join").expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
}
