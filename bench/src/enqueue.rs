//! Enqueue throughput: single-job RPCs from many concurrent clients, and batches from a few.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use jobbroker::v1 as pb;
use tokio::task::JoinSet;

use crate::{
    env::Env,
    report::{Bar, Figure},
    usage::Window,
};

/// Clients sending batches.
const BATCH_CLIENTS: usize = 4;
/// HTTP/2 connections the single-job clients share (each carries several clients' calls at once, as a web
/// server's pooled client would).
const SINGLE_CONNECTIONS: usize = 8;

pub fn spec(queue: &str, payload: impl Into<Vec<u8>>) -> pb::JobSpec {
    pb::JobSpec::new(queue, "noop", payload)
}

/// The enqueue scenario: `single` one-job RPCs from `clients` clients over a few connections, then `jobs` jobs in
/// batches of 100 and of 1000.
pub async fn run(env: &Env, single: usize, clients: usize, jobs: usize) -> anyhow::Result<Vec<Figure>> {
    let connections = clients.min(SINGLE_CONNECTIONS);
    let window = Window::start(env.broker()?, env.postmaster)?;
    let took = send(env, "single", single, 1, clients, connections).await?;
    let used = window.finish().await?;
    let name = format!("Enqueue: single-job RPCs, {clients} clients over {connections} connections");
    let mut figures = vec![Figure::rate("enqueue.single", name, single, took).bar(Bar::AtLeast(20_000.0))];
    figures.extend(used.per_10k("enqueue.single", "single-job Enqueue", "clients", single));
    let took = batches(env, "batch100", jobs, 100).await?;
    let name = format!("Enqueue: batches of 100, {BATCH_CLIENTS} clients");
    figures.push(Figure::rate("enqueue.batch100", name, jobs, took));
    let took = batches(env, "batch1000", jobs, 1000).await?;
    let name = format!("Enqueue: batches of 1000, {BATCH_CLIENTS} clients");
    figures.push(Figure::rate("enqueue.batch1000", name, jobs, took).bar(Bar::AtLeast(150_000.0)));
    Ok(figures)
}

/// `total` jobs on `queue` in Enqueue RPCs of `batch` jobs from 4 connections; how long they took.
pub async fn batches(env: &Env, queue: &str, total: usize, batch: usize) -> anyhow::Result<Duration> {
    send(env, queue, total, batch, BATCH_CLIENTS, BATCH_CLIENTS).await
}

/// `total` jobs on `queue` in Enqueue RPCs of `batch` jobs from `clients` concurrent clients sharing
/// `connections` connections; how long they took.
async fn send(
    env: &Env,
    queue: &str,
    total: usize,
    batch: usize,
    clients: usize,
    connections: usize,
) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut connected = Vec::new();
    for _ in 0..connections {
        connected.push(env.client().await?);
    }
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for index in 0..clients {
        let mut client = connected[index % connections].clone();
        let (next, queue) = (next.clone(), queue.to_owned());
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= total {
                    return anyhow::Ok(());
                }
                let jobs = (first..(first + batch).min(total)).map(|i| spec(&queue, i.to_le_bytes())).collect();
                client.enqueue(pb::EnqueueRequest { jobs }).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}
