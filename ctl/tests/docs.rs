//! README's "Operating a broker" section, run: its `jobctl` lines in order against one fresh broker, its `grpcurl` and `buf` lines
//! (grpcurl through `buf curl`, installed by `support::buf`) in order against another. A worker `reporting-1` is
//! connected on queue `reports`, as the doc says; the doc's example job id stands for the job its first enqueue
//! created. A line passes when it exits as the doc says (`# exits N`, `# fails: CODE`, else success); the answers
//! the doc's story depends on are checked too. `cli.rs` checks the output of each command in detail.

mod support;

use serde_json::{Value, json};
use support::{TestBroker, buf};

const README: &str = include_str!("../../README.md");
/// The README's operations section: from its heading to the next section.
static DOC: std::sync::LazyLock<&str> = std::sync::LazyLock::new(|| {
    let start = README.find("\n## Operating a broker\n").expect("README has an operations section");
    let section = &README[start + 1..];
    section.find("\n## ").map_or(section, |end| &section[..end])
});
const DOC_ID: &str = "01a20611-b21f-760b-ab30-02bd21ea3d80";
const DOC_ADDR: &str = "127.0.0.1:50051";

/// A command line of the doc and how it is to end.
struct Example {
    words: Vec<String>,
    expect: Expect,
}

#[derive(Debug, PartialEq)]
enum Expect {
    Success,
    /// `# exits N`
    Exit(i32),
    /// `# fails: CODE`
    Fails(String),
}

/// The lines of `sh` blocks that run one of `programs`, in order.
fn examples(programs: &[&str]) -> Vec<Example> {
    let mut in_sh = false;
    let mut found = Vec::new();
    for line in DOC.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh || !programs.iter().any(|program| line.starts_with(&format!("{program} "))) {
            continue;
        }
        let (command, comment) = line.split_once("  # ").unwrap_or((line, ""));
        let expect = if let Some(code) = comment.strip_prefix("exits ") {
            Expect::Exit(code.parse().unwrap_or_else(|_| panic!("`# exits N` takes a number: {line}")))
        } else if let Some(code) = comment.strip_prefix("fails: ") {
            Expect::Fails(code.to_owned())
        } else {
            assert!(comment.is_empty(), "unknown marker in: {line}");
            Expect::Success
        };
        found.push(Example { words: shell_words(command), expect });
    }
    found
}

/// Splits on blanks outside single quotes, dropping the quotes: all the shell syntax the doc uses.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted) = (Vec::new(), None::<String>, false);
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                word.get_or_insert_default();
            }
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_default().push(c),
        }
    }
    assert!(!quoted, "unbalanced quote in: {line}");
    words.extend(word);
    words
}

/// `words` with the doc's job id replaced by the real one.
fn with_id(words: &[String], id: &Option<String>) -> Vec<String> {
    let id = id.as_deref().unwrap_or(DOC_ID);
    words.iter().map(|word| word.replace(DOC_ID, id)).collect()
}

async fn started() -> (TestBroker, support::TestWorker) {
    let broker = TestBroker::start().await;
    let worker = broker.worker("reporting-1", &["reports"]);
    broker.ready().await;
    (broker, worker)
}

#[tokio::test]
async fn every_jobctl_example_runs() {
    let (broker, _worker) = started().await;
    let examples = examples(&["jobctl"]);
    let mut id = None;
    for example in &examples {
        let args = with_id(&example.words[1..], &id);
        let run = broker.jobctl(&args).await;
        let stdout = match &example.expect {
            Expect::Success => run.ok(),
            Expect::Exit(code) => {
                run.fails_with(*code);
                continue;
            }
            Expect::Fails(code) => panic!("`# fails: {code}` is for grpcurl lines; jobctl lines say `# exits N`"),
        };
        if args[0] == "enqueue" && id.is_none() {
            let created = stdout.strip_prefix("enqueued job ").and_then(|rest| rest.split_whitespace().next());
            id = Some(created.unwrap_or_else(|| panic!("no job id in: {stdout}")).to_owned());
        }
    }

    // The doc shows every command jobctl has.
    let help = broker.jobctl(&["--help"]).await.ok();
    let commands = help.split("Commands:\n").nth(1).expect("a command list").split("\n\n").next().unwrap_or_default();
    for command in commands.lines().filter_map(|line| line.split_whitespace().next()).filter(|c| *c != "help") {
        let shown = examples
            .iter()
            .any(|example| example.words.iter().skip(1).find(|w| !w.starts_with('-')) == Some(&command.to_owned()));
        assert!(shown, "README's operations section has no `jobctl {command}` example");
    }
}

#[tokio::test]
async fn every_grpcurl_example_runs_with_buf_curl() {
    let (broker, _worker) = started().await;
    let buf = tokio::task::spawn_blocking(buf::install).await.expect("the install task ran");
    let base = format!("http://{}", broker.addr);
    let mut id = None;
    let mut methods_shown = Vec::new();
    for example in examples(&["grpcurl", "buf"]) {
        let words = with_id(&example.words, &id);
        let args: Vec<String> = match words[0].as_str() {
            "buf" => {
                assert_eq!(words[1..5], ["curl", "--protocol", "grpc", "--http2-prior-knowledge"]);
                words[5..].iter().map(|word| word.replace(DOC_ADDR, &broker.addr.to_string())).collect()
            }
            _ => grpcurl_as_buf_curl(&words, &base),
        };
        let output = buf::curl(&buf, &args).await;
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let target = words.last().expect("a target");
        match &example.expect {
            Expect::Success => assert!(output.status.success(), "{}: {stderr}{stdout}", words.join(" ")),
            Expect::Fails(code) => {
                assert!(!output.status.success(), "{} succeeded: {stdout}", words.join(" "));
                assert!(stderr.contains(&code.to_lowercase()), "{} failed otherwise: {stderr}", words.join(" "));
                continue;
            }
            Expect::Exit(code) => panic!("`# exits {code}` is for jobctl lines; grpcurl lines say `# fails: CODE`"),
        }
        match target.as_str() {
            "list" => {
                for service in ["jobbroker.v1.AdminService", "jobbroker.v1.BrokerService", "grpc.health.v1.Health"] {
                    assert!(stdout.lines().any(|line| line == service), "{service} not listed: {stdout}");
                }
            }
            _ if words.contains(&"describe".to_owned()) => {
                assert!(stdout.contains(&format!("{target}/PauseQueue")), "{target} not described: {stdout}");
            }
            method => {
                methods_shown.push(method.rsplit('/').next().unwrap_or_default().to_owned());
                // A streaming call prints one document per message; the last one tells how it ended.
                let answers: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(&stdout).into_iter().collect();
                let answers = answers.unwrap_or_else(|e| panic!("{method} answered no JSON ({e}): {stdout}"));
                let last = answers.last().unwrap_or_else(|| panic!("{method} answered nothing"));
                check_answer(method, last, &mut id);
            }
        }
    }
    for method in [
        "ListQueues",
        "GetQueueStats",
        "ListJobs",
        "RetryJob",
        "RetryJobs",
        "PurgeQueue",
        "PauseQueue",
        "ResumeQueue",
        "SetQueueMaxDepth",
        "ListWorkers",
    ] {
        assert!(
            methods_shown.iter().any(|m| m == method),
            "README's operations section has no AdminService/{method} example"
        );
    }
}

/// `grpcurl -plaintext [-d DATA] ADDR TARGET` and `grpcurl -plaintext ADDR (list | describe SERVICE)` as the
/// arguments of `buf curl`.
fn grpcurl_as_buf_curl(words: &[String], base: &str) -> Vec<String> {
    assert_eq!(words[1], "-plaintext", "{words:?}");
    let (data, rest) = match words[2].as_str() {
        "-d" => (Some(words[3].clone()), &words[4..]),
        _ => (None, &words[2..]),
    };
    assert_eq!(rest[0], DOC_ADDR, "{words:?}");
    match &rest[1..] {
        [list] if list == "list" => vec!["--list-services".into(), base.into()],
        [describe, _] if describe == "describe" => vec!["--list-methods".into(), base.into()],
        [method] => data.into_iter().flat_map(|data| ["-d".into(), data]).chain([format!("{base}/{method}")]).collect(),
        _ => panic!("not a grpcurl line the test knows: {words:?}"),
    }
}

/// What the doc's story relies on, per method: the first Enqueue creates the job the later lines name.
fn check_answer(method: &str, answer: &Value, id: &mut Option<String>) {
    let job_state = || answer["job"]["state"].as_str().unwrap_or_default().to_owned();
    match method.rsplit('/').next().unwrap_or_default() {
        "Enqueue" if id.is_none() => {
            assert_eq!(answer["jobs"][0]["created"], true, "{answer}");
            *id = answer["jobs"][0]["id"].as_str().map(str::to_owned);
        }
        "GetJob" => assert_eq!(answer["job"]["id"].as_str(), id.as_deref(), "{answer}"),
        "Check" => assert_eq!(answer["status"], "SERVING", "{answer}"),
        "PauseQueue" => assert_eq!(answer["stats"]["paused"], true, "{answer}"),
        "ListWorkers" => assert_eq!(answer["workers"][0]["workerId"], "reporting-1", "{answer}"),
        "CancelJob" => assert_eq!(job_state(), "JOB_STATE_CANCELLED", "{answer}"),
        "WatchJob" => assert_eq!(job_state(), "JOB_STATE_CANCELLED", "{answer}"),
        "RetryJob" => assert_eq!(job_state(), "JOB_STATE_QUEUED", "{answer}"),
        "ListQueues" if id.is_some() => assert_eq!(answer["queues"][0]["queue"], "emails", "{answer}"),
        "GetQueueStats" => assert_eq!(answer["stats"]["queued"], json!("1"), "{answer}"),
        _ => {}
    }
}

#[test]
fn shell_words_keep_quoted_json_whole() {
    let words = shell_words(r#"grpcurl -d '{"queue": "emails"}' 127.0.0.1:50051 x/Y"#);
    assert_eq!(words, ["grpcurl", "-d", r#"{"queue": "emails"}"#, "127.0.0.1:50051", "x/Y"]);
    assert_eq!(shell_words("a '' b"), ["a", "", "b"]);
}
