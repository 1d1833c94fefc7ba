//! Who may call what: bearer tokens, each granting one role, checked against the gRPC path of every request.
//!
//! Roles (SPEC, issue 4): `producer` may Enqueue, GetJob, WatchJob and CancelJob; `worker` may Lease, Heartbeat
//! and Complete; `admin` may call everything, AdminService included. Health is open (probes carry no token);
//! reflection needs any valid token. Any other path needs `admin`, so a method added later is closed until it is
//! given a role here.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time; neither a token nor its digest is ever
//! logged or printed (`Debug` shows counts). This module decides; the tower glue that asks it is `gate.rs`.

use std::{fmt, path::Path, str::FromStr};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::{Status, codegen::http::HeaderMap};

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Producer,
    Worker,
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "admin" => Ok(Role::Admin),
            "producer" => Ok(Role::Producer),
            "worker" => Ok(Role::Worker),
            other => Err(format!("unknown role {other:?} (expected admin, producer or worker)")),
        }
    }
}

/// What a gRPC path asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No token needed.
    Open,
    /// Any valid token.
    Authenticated,
    /// A token of this role, or an admin token.
    Role(Role),
}

const HEALTH: &str = "/grpc.health.v1.Health/";
const REFLECTION: [&str; 2] = ["/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];
const BROKER: &str = "/jobbroker.v1.BrokerService/";

/// Whether `path` (`/package.Service/Method`) is a health check: open, and exempt from load shedding.
pub fn is_health(path: &str) -> bool {
    path.starts_with(HEALTH)
}

fn access(path: &str) -> Access {
    if is_health(path) {
        return Access::Open;
    }
    if REFLECTION.iter().any(|prefix| path.starts_with(prefix)) {
        return Access::Authenticated;
    }
    match path.strip_prefix(BROKER) {
        Some("Enqueue" | "GetJob" | "WatchJob" | "CancelJob") => Access::Role(Role::Producer),
        Some("Lease" | "Heartbeat" | "Complete") => Access::Role(Role::Worker),
        // AdminService, unknown methods and unknown services.
        _ => Access::Role(Role::Admin),
    }
}

/// The configured tokens, as digests. Empty means authentication is off.
#[derive(Clone, Default)]
pub struct Tokens {
    known: Vec<([u8; 32], Role)>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |role| self.known.iter().filter(|(_, r)| *r == role).count();
        f.debug_struct("Tokens")
            .field("admin", &count(Role::Admin))
            .field("producer", &count(Role::Producer))
            .field("worker", &count(Role::Worker))
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Adds `token` with `role`; `source` names where it came from for the error (a flag, or a file and line).
    /// A token must be something a client can send in a header: visible ASCII, no spaces.
    pub fn add(&mut self, role: Role, token: &str, source: &str) -> Result<(), String> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{source}: a token must be non-empty visible ASCII without spaces"));
        }
        self.known.push((digest(token), role));
        Ok(())
    }

    /// Adds the tokens of a tokens file: lines `<role> <token>`, `#` comments and blank lines ignored. Errors
    /// name the file and the line. A file with no token is an error: it was meant to turn authentication on, and
    /// an empty one (a secret mounted before it was filled) must not leave the broker open.
    pub fn add_file(&mut self, text: &str, path: &Path) -> Result<(), String> {
        let before = self.known.len();
        for (index, line) in text.lines().enumerate() {
            let at = format!("--tokens-file {}, line {}", path.display(), index + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("{at}: expected `<role> <token>`"));
            };
            let role = role.parse::<Role>().map_err(|problem| format!("{at}: {problem}"))?;
            self.add(role, token, &at)?;
        }
        if self.known.len() == before {
            return Err(format!(
                "--tokens-file {} holds no token; leave the flag out to run without authentication",
                path.display()
            ));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The roles `token` grants (a token may be listed under several). Every configured digest is compared,
    /// each in constant time, so the time taken says nothing about which token matched or how closely.
    fn roles(&self, token: &str) -> Vec<Role> {
        let presented = digest(token);
        let mut roles = Vec::new();
        for (known, role) in &self.known {
            if bool::from(known.ct_eq(&presented)) {
                roles.push(*role);
            }
        }
        roles
    }

    /// Decides whether a request for `path` with these headers may proceed. With no tokens configured every
    /// request may. The error is UNAUTHENTICATED (no token, or not a known one) or PERMISSION_DENIED (a known
    /// token without the role); it names the method and the role, never the token.
    pub fn authorize(&self, path: &str, headers: &HeaderMap) -> Result<(), Status> {
        let access = access(path);
        if self.is_empty() || access == Access::Open {
            return Ok(());
        }
        let Some(token) = bearer(headers) else {
            return Err(Status::unauthenticated(format!(
                "{path} needs a token: send the metadata `authorization: Bearer <token>`"
            )));
        };
        let roles = self.roles(token);
        if roles.is_empty() {
            return Err(Status::unauthenticated("the bearer token is not one this broker knows"));
        }
        match access {
            Access::Open | Access::Authenticated => Ok(()),
            Access::Role(needed) if roles.iter().any(|role| *role == needed || *role == Role::Admin) => Ok(()),
            Access::Role(needed) => {
                let needed = match needed {
                    Role::Admin => "admin",
                    Role::Producer => "producer or admin",
                    Role::Worker => "worker or admin",
                };
                Err(Status::permission_denied(format!("{path} needs a token with the role {needed}")))
            }
        }
    }
}

/// The token of an `authorization: Bearer <token>` header (the scheme is case-insensitive, RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert("authorization", value.parse().expect("ASCII"));
        }
        headers
    }

    fn tokens() -> Tokens {
        let mut tokens = Tokens::default();
        let file = "# roles\nadmin a-token\n\nproducer p-token\n  worker w-token  \nworker shared\nproducer shared\n";
        tokens.add_file(file, Path::new("tokens")).expect("valid");
        tokens
    }

    fn code(tokens: &Tokens, path: &str, authorization: Option<&str>) -> Option<tonic::Code> {
        tokens.authorize(path, &headers(authorization)).err().map(|status| status.code())
    }

    #[test]
    fn a_tokens_file_without_tokens_is_refused() {
        for file in ["", "\n\n", "# admin a-token\n   \n"] {
            let problem = Tokens::default().add_file(file, Path::new("tokens")).expect_err("no token");
            assert!(problem.contains("--tokens-file tokens holds no token"), "{problem}");
        }
    }

    #[test]
    fn roles_follow_the_method() {
        use tonic::Code::{PermissionDenied, Unauthenticated};
        let tokens = tokens();
        let enqueue = "/jobbroker.v1.BrokerService/Enqueue";
        let lease = "/jobbroker.v1.BrokerService/Lease";
        let admin = "/jobbroker.v1.AdminService/ListQueues";
        assert_eq!(code(&tokens, enqueue, None), Some(Unauthenticated));
        assert_eq!(code(&tokens, enqueue, Some("Bearer nope")), Some(Unauthenticated));
        assert_eq!(code(&tokens, enqueue, Some("Basic p-token")), Some(Unauthenticated));
        assert_eq!(code(&tokens, enqueue, Some("Bearer p-token")), None);
        assert_eq!(code(&tokens, enqueue, Some("bearer p-token")), None);
        assert_eq!(code(&tokens, enqueue, Some("Bearer w-token")), Some(PermissionDenied));
        assert_eq!(code(&tokens, lease, Some("Bearer w-token")), None);
        assert_eq!(code(&tokens, lease, Some("Bearer p-token")), Some(PermissionDenied));
        assert_eq!(code(&tokens, lease, Some("Bearer shared")), None);
        assert_eq!(code(&tokens, enqueue, Some("Bearer shared")), None);
        assert_eq!(code(&tokens, admin, Some("Bearer shared")), Some(PermissionDenied));
        assert_eq!(code(&tokens, admin, Some("Bearer a-token")), None);
        assert_eq!(code(&tokens, "/jobbroker.v1.BrokerService/Future", Some("Bearer p-token")), Some(PermissionDenied));
        assert_eq!(code(&tokens, "/grpc.health.v1.Health/Check", None), None);
        assert_eq!(
            code(&tokens, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None),
            Some(Unauthenticated)
        );
        assert_eq!(
            code(&tokens, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Some("Bearer w-token")),
            None
        );
        assert_eq!(code(&Tokens::default(), admin, None), None, "no tokens: auth is off");
    }

    #[test]
    fn file_errors_name_the_line_and_never_the_token() {
        let mut tokens = Tokens::default();
        let error = tokens.add_file("admin ok\nroot s3cret\n", Path::new("/etc/t")).unwrap_err();
        assert_eq!(error, "--tokens-file /etc/t, line 2: unknown role \"root\" (expected admin, producer or worker)");
        assert!(!error.contains("s3cret"));
        let error = tokens.add_file("\n\nworker\n", Path::new("t")).unwrap_err();
        assert_eq!(error, "--tokens-file t, line 3: expected `<role> <token>`");
        let error = tokens.add_file("worker two words\n", Path::new("t")).unwrap_err();
        assert!(error.starts_with("--tokens-file t, line 1: expected"), "{error}");
        assert!(tokens.add(Role::Admin, "tab\there", "--admin-tokens").is_err());
        assert_eq!(format!("{:?}", self::tokens()), "Tokens { admin: 1, producer: 2, worker: 2 }");
    }
}
