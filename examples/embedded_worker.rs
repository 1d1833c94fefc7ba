//! A worker embedded in your own binary: `jobbroker::worker::run` holds the lease stream, heartbeats, enforces
//! execution timeouts, reports outcomes and reconnects; you write the handler.
//!
//! ```sh
//! cargo run --example embedded_worker -- http://127.0.0.1:50051 emails
//! ```
//!
//! Ctrl-C drains: no new jobs, running ones finish, then it exits.

use std::time::Duration;

use jobbroker::worker::{self, ActiveJob, Control, Outcome, WorkerOptions};

#[tokio::main]
async fn main() -> Result<(), tonic::Status> {
    let mut args = std::env::args().skip(1);
    let broker = args.next().unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let queue = args.next().unwrap_or_else(|| "emails".into());

    // The handler: any async closure from a job to an outcome.
    let handler = |job: ActiveJob| async move {
        job.report_progress(10, "starting");
        let work = async {
            tokio::time::sleep(Duration::from_millis(100)).await; // your work here
            job.payload().to_ascii_uppercase()
        };
        tokio::select! {
            result = work => Outcome::Success(result),
            // Cancelled, lease lost, timed out or shutting down: stop at once (the loop decides what to report).
            () = job.stopped() => Outcome::retry("stopped"),
        }
    };

    let control = Control::default();
    let worker = worker::run(WorkerOptions::new([broker], [queue], 8), handler, control.clone());
    tokio::pin!(worker);
    tokio::select! {
        result = &mut worker => return result,
        _ = tokio::signal::ctrl_c() => control.drain.cancel(),
    }
    worker.await
}
