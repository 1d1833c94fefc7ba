//! Fan-out: thousands of idle Lease streams on one broker, all on the same queue. Measured: the broker's
//! resident memory and CPU while they sit idle (and Postgres's CPU meanwhile: idle streams must not poll it),
//! then pickup latency with all of them connected.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use jobbroker::v1::{ListWorkersRequest, admin_service_client::AdminServiceClient};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    env::Env,
    latency,
    report::{self, Bar, Figure},
    usage::Window,
};

/// Streams per HTTP/2 connection (the broker allows a few hundred per connection).
const STREAMS_PER_CONNECTION: usize = 100;
const QUEUE: &str = "fanout";

pub async fn run(env: &Env, streams: usize, idle: Duration, samples: usize) -> anyhow::Result<Vec<Figure>> {
    let (to, mut assignments) = mpsc::channel(16);
    let mut forwarding = JoinSet::new();
    let started = Instant::now();
    let mut client = env.client().await?;
    for i in 0..streams {
        if i > 0 && i % STREAMS_PER_CONNECTION == 0 {
            client = env.client().await?;
        }
        let stream = latency::open(&mut client, &format!("idle-{i}"), QUEUE, 1).await?;
        forwarding.spawn(stream.forward(to.clone()));
    }
    wait_registered(env, streams).await?;
    let connected = started.elapsed();

    let window = Window::start(env.broker()?, env.postmaster)?;
    tokio::time::sleep(idle).await;
    let used = window.finish().await?;
    let percent = |cpu: f64| 100.0 * cpu / used.wall.as_secs_f64();
    let mut figures = vec![
        Figure::new(
            "fanout.connect",
            format!("fan-out: {streams} streams connected and registered in"),
            connected.as_secs_f64(),
            "s",
        ),
        Figure::new(
            "fanout.rss",
            format!("fan-out: broker RSS with {streams} idle streams"),
            env.broker()?.memory("VmRSS")?,
            "MiB",
        )
        .bar(Bar::AtMost(300.0)),
        Figure::new("fanout.cpu", "fan-out: broker CPU while idle (% of one core)", percent(used.broker_cpu), "%")
            .bar(Bar::AtMost(5.0)),
    ];
    if let Some(cpu) = used.postgres_cpu {
        figures.push(Figure::new(
            "fanout.postgres_cpu",
            "fan-out: Postgres CPU while idle (% of one core)",
            percent(cpu),
            "%",
        ));
    }
    let mut producer = env.client().await?;
    let mut took = latency::pickups(&mut producer, QUEUE, samples, &mut assignments).await?;
    let name = format!("pickup latency with {streams} idle streams:");
    figures.extend(report::percentiles("fanout.pickup", &name, &mut took, [None, None]));
    forwarding.abort_all();
    Ok(figures)
}

/// Waits until the broker lists `streams` connected workers on the queue.
async fn wait_registered(env: &Env, streams: usize) -> anyhow::Result<()> {
    let mut admin = AdminServiceClient::connect(env.address.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (mut listed, mut page_token) = (0, String::new());
        loop {
            let request = ListWorkersRequest { queue: QUEUE.into(), page_size: 1000, page_token };
            let page = admin.list_workers(request).await.context("ListWorkers")?.into_inner();
            listed += page.workers.len();
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        if listed >= streams {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {listed} of {streams} streams registered within 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
