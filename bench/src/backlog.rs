//! Backlog: the drain figure again with a large backlog already queued, first in another queue (the claim must
//! not wade through it), then behind the drained jobs in the same queue. Compare with the drain scenario's figure
//! (the report derives the ratio).

use crate::{
    drain::{self, Workers},
    enqueue,
    env::Env,
    report::Figure,
};

pub async fn run(env: &Env, backlog: usize, jobs: usize, workers: Workers) -> anyhow::Result<Vec<Figure>> {
    let took = enqueue::batches(env, "other", backlog, 1000).await?;
    let name = format!("backlog: Enqueue of {backlog} jobs in batches of 1000 (table growing)");
    let mut figures = vec![Figure::rate("backlog.enqueue", name, backlog, took)];

    enqueue::batches(env, "work", jobs, 1000).await?;
    let took = drain::drain(env, "work", jobs, workers).await?;
    let name = format!("backlog: drain of {jobs} jobs with {backlog} queued in another queue");
    figures.push(Figure::rate("backlog.other", name, jobs, took));

    enqueue::batches(env, "deep", jobs + backlog, 1000).await?;
    let took = drain::drain(env, "deep", jobs, workers).await?;
    let name = format!("backlog: drain of {jobs} jobs with {backlog} more behind them in the same queue");
    figures.push(Figure::rate("backlog.same", name, jobs, took));
    Ok(figures)
}
