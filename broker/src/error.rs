//! The broker's one error type, whose variants are meanings, and its single mapping to `tonic::Status`.
//!
//! Internal causes (SQL errors, bugs) are logged here with the current span and never sent to clients.
//! SQLSTATE and connection failures are classified once, in `From<sqlx::Error>`.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The `ErrorInfo.reason` a stale lease gets (SPEC: fencing).
pub const LEASE_LOST: &str = "LEASE_LOST";
const ERROR_DOMAIN: &str = "jobbroker.dev";

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Bad input; every violation names its field.
    #[error("invalid argument: {}", describe(.0))]
    Invalid(Vec<Violation>),
    #[error("{0} not found")]
    NotFound(String),
    /// The lease named is not the job's current lease.
    #[error("lease {0} is not the current lease of its job")]
    LeaseLost(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{message}")]
    ResourceExhausted { message: String, retry_after: Option<Duration> },
    /// The database cannot be reached or the broker is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected database answer; logged, never shown to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

/// One field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Violation {
        Violation { field: field.into(), description: description.into() }
    }
}

fn describe(violations: &[Violation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Error {
        Error::Invalid(vec![Violation::new(field, description)])
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Error {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                Error::Unavailable("the job store is unavailable; retry later".into())
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // admin_shutdown, crash_shutdown, cannot_connect_now, connection_failure family
                Some("57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006" | "08001" | "08004") => {
                    Error::Unavailable("the job store is unavailable; retry later".into())
                }
                // deadlock_detected (after the store's own retries), serialization_failure: safe to retry
                Some("40P01" | "40001") => Error::Unavailable("the job store was busy; retry".into()),
                // query_canceled (statement_timeout)
                Some("57014") => Error::Unavailable("the job store timed out; retry later".into()),
                _ => Error::Internal(error.to_string()),
            },
            _ => Error::Internal(error.to_string()),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::Invalid(violations) => {
                let message = format!("invalid argument: {}", describe(&violations));
                let fields: Vec<FieldViolation> =
                    violations.into_iter().map(|v| FieldViolation::new(v.field, v.description)).collect();
                Status::with_error_details(Code::InvalidArgument, message, ErrorDetails::with_bad_request(fields))
            }
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::LeaseLost(lease) => Status::with_error_details(
                Code::Aborted,
                format!("lease {lease} is not the current lease of its job; stop working on it"),
                ErrorDetails::with_error_info(LEASE_LOST, ERROR_DOMAIN, HashMap::new()),
            ),
            Error::AlreadyExists(message) => Status::already_exists(message),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::ResourceExhausted { message, retry_after } => {
                Status::with_error_details(Code::ResourceExhausted, message, ErrorDetails::with_retry_info(retry_after))
            }
            Error::Unavailable(message) => Status::unavailable(message),
            Error::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Status::internal("internal error; see the broker log")
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
