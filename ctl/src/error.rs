//! jobctl's one error type, how it is shown on stderr, and the exit code each kind gives.
//!
//! Exit codes: 0 success, 1 any failure (RPC error, unreachable broker, bad local input, failed smoke test),
//! 2 bad command line (clap), 3 a watched job ended FAILED or CANCELLED.

use std::{fmt, process::ExitCode};

use tonic_types::StatusExt as _;

#[derive(Debug)]
pub enum Error {
    /// The broker answered with an error status.
    Rpc(tonic::Status),
    /// The broker could not be reached.
    Connect { addr: String, source: tonic::transport::Error },
    /// Local input is wrong: a payload file that cannot be read, a token that cannot be sent.
    Input(String),
    /// The command ran but what it checks did not hold (smoke test, an interrupted watch).
    Failed(String),
    /// `watch` saw the job end in a state other than SUCCEEDED.
    JobEnded { id: String, state: String, last_error: String },
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::JobEnded { .. } => ExitCode::from(3),
            _ => ExitCode::FAILURE,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Error {
        Error::Rpc(status)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Rpc(status) => {
                write!(f, "{}", code_name(status.code()))?;
                if !status.message().is_empty() {
                    write!(f, ": {}", status.message())?;
                }
                for violation in status.get_details_bad_request().into_iter().flat_map(|bad| bad.field_violations) {
                    write!(f, "\n  {}: {}", violation.field, violation.description)?;
                }
                Ok(())
            }
            Error::Connect { addr, source } => {
                write!(f, "cannot connect to {addr}: {source}")?;
                let mut cause = std::error::Error::source(source);
                while let Some(inner) = cause {
                    write!(f, ": {inner}")?;
                    cause = inner.source();
                }
                Ok(())
            }
            Error::Input(message) | Error::Failed(message) => f.write_str(message),
            Error::JobEnded { id, state, last_error } if last_error.is_empty() => write!(f, "job {id} ended {state}"),
            Error::JobEnded { id, state, last_error } => write!(f, "job {id} ended {state}: {last_error}"),
        }
    }
}

/// The canonical name of a gRPC code (`INVALID_ARGUMENT`), as grpcurl and the gRPC docs spell it.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_grpc_spells_them() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }
}
