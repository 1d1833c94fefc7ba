//! `--peer PATH`: runs a peer's benchmark script (graphile-worker's `run.sh`) right after ours, on the same
//! Postgres, and reads its figures so the report can put ratios beside ours. Only ratios from such back-to-back
//! runs are meaningful on a shared machine.

use std::{path::Path, process::Stdio};

use anyhow::Context as _;
use tokio::process::Command;

use crate::report::Figure;

/// Runs `script JOBS` with `DATABASE_URL` set and parses its output; the lines with figures are echoed to stderr
/// (the rest is the peer's own logging).
pub async fn run(script: &Path, database_url: &str, jobs: usize) -> anyhow::Result<Vec<Figure>> {
    let output = Command::new(script)
        .arg(jobs.to_string())
        .env("DATABASE_URL", database_url)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(output.status.success(), "{} exited with {}", script.display(), output.status);
    let mut figures = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let parsed = parse(line);
        if !parsed.is_empty() {
            eprintln!("{line}");
        }
        figures.extend(parsed);
    }
    anyhow::ensure!(!figures.is_empty(), "no figures in the output of {}", script.display());
    Ok(figures)
}

/// The figures of one line of `run.sh`'s output, e.g. `graphile-worker drain: 100000 jobs, 2 process(es): 51234
/// jobs/s` or `graphile-worker pickup latency: n=500 p50=3.41 ms p99=6.20 ms max=9.00 ms`.
fn parse(line: &str) -> Vec<Figure> {
    let Some((what, figures)) = line.rsplit_once(": ") else { return Vec::new() };
    if what.contains("pickup latency") {
        return ["p50", "p99", "max"]
            .into_iter()
            .filter_map(|q| {
                let value = figures.split_whitespace().find_map(|word| word.strip_prefix(&format!("{q}=")))?;
                let name = format!("peer: {what} {q}");
                Some(Figure::new(format!("peer.pickup.{q}"), name, value.parse().ok()?, "ms"))
            })
            .collect();
    }
    let Some(value) = figures.strip_suffix(" jobs/s").and_then(|v| v.trim().parse::<f64>().ok()) else {
        return Vec::new();
    };
    let key = if what.contains("bulk") {
        "peer.bulk".to_owned()
    } else {
        // "…, 2 process(es)" or "…, 8 client(s)": the count names the figure.
        let count = what.rsplit(", ").next().and_then(|last| last.split_whitespace().next()).unwrap_or("");
        let kind = if what.contains("drain") { "drain" } else { "single" };
        format!("peer.{kind}{count}")
    };
    vec![Figure::new(key, format!("peer: {what}"), value, "jobs/s")]
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_every_line_kind_of_run_sh() {
        let keys = |line: &str| parse(line).into_iter().map(|f| (f.key, f.value)).collect::<Vec<_>>();
        assert_eq!(keys("graphile-worker bulk enqueue: 100000 jobs: 135000 jobs/s"), [("peer.bulk".into(), 135000.0)]);
        assert_eq!(
            keys("graphile-worker drain: 100000 jobs, 2 process(es): 52000 jobs/s"),
            [("peer.drain2".into(), 52000.0)]
        );
        assert_eq!(
            keys("graphile-worker single add_job: 20000 jobs, 8 client(s): 2400 jobs/s"),
            [("peer.single8".into(), 2400.0)]
        );
        assert_eq!(
            keys("graphile-worker pickup latency: n=500 p50=3.41 ms p99=6.20 ms max=9.00 ms"),
            [("peer.pickup.p50".into(), 3.41), ("peer.pickup.p99".into(), 6.2), ("peer.pickup.max".into(), 9.0)]
        );
        assert!(keys("added 3 packages").is_empty());
    }
}
