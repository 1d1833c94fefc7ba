//! Re-lease time: a worker holding a job is lost, and a second worker waits for the job. Lost two ways: killed
//! (its stream closes: the broker shortens its leases to the reconnect grace) and hung (stream open, no
//! heartbeats: the lease runs out its TTL and the reaper, every second, re-queues it).

use std::time::{Duration, Instant};

use jobbroker::v1 as pb;

use crate::{
    enqueue::spec,
    env::Env,
    latency,
    report::{Bar, Figure},
};

/// Both scenarios; `grace` is the broker's `--reconnect-grace`, `ttl` the hung job's lease TTL.
pub async fn run(env: &Env, grace: Duration, ttl: Duration) -> anyhow::Result<Vec<Figure>> {
    let killed = after_kill(env).await?;
    let hung = after_hang(env, ttl).await?;
    let name = format!("re-lease after a killed worker (grace {})", humantime::format_duration(grace));
    Ok(vec![
        Figure::millis("relet.killed", name, killed).bar(Bar::AtMost((grace.as_secs_f64() + 1.0) * 1000.0)),
        Figure::millis(
            "relet.hung",
            format!("re-lease after a hung worker (lease TTL {})", humantime::format_duration(ttl)),
            hung,
        ),
    ])
}

/// From dropping the holder's connection to the rescuer's assignment.
async fn after_kill(env: &Env) -> anyhow::Result<Duration> {
    let mut doomed = env.client().await?;
    let mut held = latency::open(&mut doomed, "doomed", "killed", 1).await?;
    doomed.enqueue(pb::EnqueueRequest { jobs: vec![spec("killed", Vec::new())] }).await?;
    held.assignment().await?;
    let mut rescuer = env.client().await?;
    let mut rescue = latency::open(&mut rescuer, "rescuer", "killed", 1).await?;
    let killed = Instant::now();
    drop((held, doomed));
    rescue.assignment().await?;
    Ok(killed.elapsed())
}

/// From the hung worker's assignment to the rescuer's.
async fn after_hang(env: &Env, ttl: Duration) -> anyhow::Result<Duration> {
    let mut client = env.client().await?;
    let mut hung = latency::open(&mut client, "hung", "hung", 1).await?;
    let mut job = spec("hung", Vec::new());
    job.lease_ttl = Some(ttl.try_into()?);
    client.enqueue(pb::EnqueueRequest { jobs: vec![job] }).await?;
    hung.assignment().await?;
    let assigned = Instant::now();
    let mut rescue = latency::open(&mut client, "rescuer", "hung", 1).await?;
    rescue.assignment().await?;
    let took = assigned.elapsed();
    drop(hung);
    Ok(took)
}
