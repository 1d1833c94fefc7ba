//! Retry policy: what a failed, released or lost attempt does to its job.
//!
//! Pure functions over [`LeaseFacts`]; the store applies the decision with a fenced write. Cancellation is not
//! decided here: the store's settle statement turns any outcome of a cancel-requested job into CANCELLED.

use std::time::Duration;

use rand::Rng;

use crate::model::{LeaseFacts, Outcome, RetryPolicy, Settle};

/// Share of the delay that jitter may take off, so retries of many jobs failed together spread out.
const JITTER: f64 = 0.2;

/// `initial × multiplier^(attempt−1)`, capped at `max`, minus up to 20 % jitter.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(1000) as i32;
    let raw = policy.initial.as_secs_f64() * policy.multiplier.powi(exponent);
    let capped = raw.min(policy.max.as_secs_f64());
    let jitter = 1.0 - JITTER * rand::rng().random::<f64>();
    Duration::from_secs_f64(capped * jitter)
}

/// What a worker's outcome does to the job it leased. A failure needs the lease's facts (attempt, policy);
/// without them (the lease is not current) there is nothing to decide: `None`.
pub fn settle(facts: Option<&LeaseFacts>, outcome: Outcome) -> Option<Settle> {
    Some(match outcome {
        Outcome::Success { result } => Settle::Succeed { result },
        Outcome::Release => Settle::Release,
        Outcome::Failure { message, non_retryable, retry_after } => {
            fail_or_retry(facts?, message, non_retryable, retry_after)
        }
    })
}

/// What losing a lease does: a retryable failure with SPEC's error `lease expired` (naming the execution timeout when
/// that was the cause), due again at once: the lease's deadline or the reconnect grace already delayed it, the job
/// is not to blame for its worker's crash, and the re-lease bar (grace + 1 s) leaves no room for a backoff.
pub fn lost(facts: &LeaseFacts) -> Settle {
    let message = if facts.timed_out { "lease expired: execution timeout exceeded" } else { "lease expired" };
    fail_or_retry(facts, message.into(), false, Some(Duration::ZERO))
}

/// A failure fails the job for good when it says so or when attempts have run out; otherwise it is retried after
/// `retry_after`, or the policy's backoff.
fn fail_or_retry(facts: &LeaseFacts, message: String, non_retryable: bool, retry_after: Option<Duration>) -> Settle {
    if non_retryable || facts.attempt >= facts.max_attempts {
        Settle::Fail { error: message }
    } else {
        let delay = retry_after.unwrap_or_else(|| backoff(&facts.retry, facts.attempt));
        Settle::Retry { delay, error: message }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn facts(attempt: u32, max_attempts: u32) -> LeaseFacts {
        LeaseFacts {
            lease_id: Uuid::nil(),
            job_id: Uuid::nil(),
            attempt,
            max_attempts,
            retry: RetryPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(10), multiplier: 2.0 },
            timed_out: false,
        }
    }

    #[test]
    fn backoff_grows_then_caps_within_jitter() {
        let policy = facts(1, 5).retry;
        for (attempt, full) in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (60, 10.0)] {
            let delay = backoff(&policy, attempt).as_secs_f64();
            assert!(delay <= full && delay >= full * (1.0 - JITTER), "attempt {attempt}: {delay}");
        }
    }

    #[test]
    fn failures_retry_until_attempts_run_out() {
        let failure = |non_retryable| Outcome::Failure { message: "boom".into(), non_retryable, retry_after: None };
        assert!(matches!(settle(Some(&facts(1, 3)), failure(false)), Some(Settle::Retry { .. })));
        assert!(matches!(settle(Some(&facts(3, 3)), failure(false)), Some(Settle::Fail { .. })));
        assert!(matches!(settle(Some(&facts(1, 3)), failure(true)), Some(Settle::Fail { .. })));
        assert_eq!(settle(None, failure(false)), None, "a failure of a lease that is not current decides nothing");
        assert_eq!(settle(None, Outcome::Release), Some(Settle::Release));
        let after = Outcome::Failure {
            message: "later".into(),
            non_retryable: false,
            retry_after: Some(Duration::from_secs(42)),
        };
        assert_eq!(
            settle(Some(&facts(1, 3)), after),
            Some(Settle::Retry { delay: Duration::from_secs(42), error: "later".into() })
        );
        assert_eq!(lost(&facts(3, 3)), Settle::Fail { error: "lease expired".into() });
    }
}
