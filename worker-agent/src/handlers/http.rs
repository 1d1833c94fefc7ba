//! The `http` handler (POST the payload to a configured URL) and the `http_callback` handler (the payload names
//! the URL and the body: `{"url": "...", "data": ...}`), with one mapping from HTTP answers to outcomes:
//! 2xx success with the body; 408, 429, 5xx, connect errors and timeouts retryable (honouring `Retry-After`);
//! any other status non-retryable.
//!
//! URLs in logs and error messages are cut to their origin (scheme, host, port): paths and queries may carry
//! secrets, and a callback URL is part of the payload.

use std::{
    error::Error as _,
    time::{Duration, SystemTime},
};

use jobbroker::worker::{ActiveJob, Outcome};
use reqwest::{
    Client, Response, StatusCode, Url,
    header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER},
};

use super::{non_retryable, stopped, text};
use crate::config::{CallbackSpec, HttpSpec, http_url};

/// How much of an error response's body goes into the failure message.
const ERROR_BODY: usize = 512;

/// The HTTP client every HTTP handler shares (one connection pool). Redirects are not followed: a redirected
/// POST would lose its body or its method.
pub fn client() -> Result<Client, reqwest::Error> {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("jobbroker-worker-agent/", env!("CARGO_PKG_VERSION")))
        .build()
}

pub struct Http {
    url: Url,
    target: Target,
}

impl Http {
    pub fn new(client: Client, spec: HttpSpec, max_output: usize) -> Http {
        Http { url: spec.url, target: Target { client, headers: spec.headers, timeout: spec.timeout, max_output } }
    }

    pub async fn run(&self, job: &ActiveJob) -> Outcome {
        self.target.post(job, self.url.clone(), job.payload().to_vec(), "application/octet-stream").await
    }
}

pub struct Callback {
    target: Target,
}

impl Callback {
    pub fn new(client: Client, spec: CallbackSpec, max_output: usize) -> Callback {
        Callback { target: Target { client, headers: spec.headers, timeout: spec.timeout, max_output } }
    }

    pub async fn run(&self, job: &ActiveJob) -> Outcome {
        match parse_callback(job.payload()) {
            Ok(call) => self.target.post(job, call.url, call.body, call.content_type).await,
            Err(problem) => {
                tracing::warn!(%problem, "not a callback payload");
                non_retryable(problem)
            }
        }
    }
}

/// Where and how to POST, and how much of the answer to keep.
struct Target {
    client: Client,
    /// Configured headers; they win over the job headers and the content type.
    headers: HeaderMap,
    timeout: Duration,
    max_output: usize,
}

impl Target {
    async fn post(&self, job: &ActiveJob, url: Url, body: Vec<u8>, content_type: &'static str) -> Outcome {
        let timeout = job.execution_timeout().map_or(self.timeout, |limit| limit.min(self.timeout));
        let origin = url.origin().ascii_serialization();
        let mut headers = job_headers(job);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.extend(self.headers.clone());
        let call = async {
            let response = self.client.post(url).headers(headers).timeout(timeout).body(body).send().await;
            let response = response.map_err(|e| error_outcome(e, &origin, timeout))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| parse_retry_after(value, SystemTime::now()));
            let keep = if status.is_success() { self.max_output } else { ERROR_BODY };
            let body = read_bounded(response, keep).await.map_err(|e| error_outcome(e, &origin, timeout))?;
            Ok::<_, Outcome>(status_outcome(status, retry_after, body))
        };
        // Dropping the call on `stopped()` aborts the request.
        let outcome = tokio::select! {
            biased;
            () = job.stopped() => return stopped(job),
            outcome = call => outcome.unwrap_or_else(|failure| failure),
        };
        if let Outcome::Failure { message, non_retryable, .. } = &outcome {
            tracing::info!(%origin, %message, non_retryable, "HTTP call failed");
        }
        outcome
    }
}

/// `X-Job-Id`, `X-Job-Kind`, `X-Job-Queue`, `X-Job-Attempt`, `X-Job-Lease-Id`, the W3C `traceparent` and
/// `tracestate` when the job has them, and `X-Job-Meta-<key>` per metadata entry (characters not allowed in a header
/// name become `-`; values that cannot be headers are left out).
fn job_headers(job: &ActiveJob) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let fixed = [
        ("x-job-id", job.id().to_owned()),
        ("x-job-kind", job.kind().to_owned()),
        ("x-job-queue", job.queue().to_owned()),
        ("x-job-attempt", job.attempt().to_string()),
        ("x-job-lease-id", job.lease_id().to_owned()),
        ("traceparent", job.traceparent().unwrap_or_default().to_owned()),
        ("tracestate", job.tracestate().unwrap_or_default().to_owned()),
    ];
    for (name, value) in fixed.into_iter().filter(|(_, value)| !value.is_empty()) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    for (key, value) in job.metadata() {
        let name = HeaderName::from_bytes(meta_header_name(key).as_bytes());
        match (name, HeaderValue::from_bytes(value.as_bytes())) {
            (Ok(name), Ok(value)) => {
                headers.insert(name, value);
            }
            _ => tracing::debug!(key, "metadata entry not sendable as a header"),
        }
    }
    headers
}

/// `X-Job-Meta-<key>`, with characters a header name may not hold turned to `-`.
pub fn meta_header_name(key: &str) -> String {
    let key: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).collect();
    format!("X-Job-Meta-{key}")
}

/// Maps a status (and the body, bounded) to an outcome.
pub fn status_outcome(status: StatusCode, retry_after: Option<Duration>, body: Vec<u8>) -> Outcome {
    if status.is_success() {
        return Outcome::Success(body);
    }
    let start = text(&body);
    let message = if start.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {start}") };
    let retryable =
        matches!(status, StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS) || status.is_server_error();
    if retryable { Outcome::Failure { message, non_retryable: false, retry_after } } else { non_retryable(message) }
}

/// `Retry-After` as delay-seconds or an HTTP date (a date in the past means now).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A request that got no HTTP answer: retryable (connect error, timeout, reset), unless it could not be built.
fn error_outcome(error: reqwest::Error, origin: &str, timeout: Duration) -> Outcome {
    let error = error.without_url();
    if error.is_timeout() {
        return Outcome::retry(format!("no answer from {origin} within {}", humantime::format_duration(timeout)));
    }
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    if error.is_builder() {
        non_retryable(format!("cannot build a request to {origin}: {message}"))
    } else if error.is_connect() {
        Outcome::retry(format!("cannot connect to {origin}: {message}"))
    } else {
        Outcome::retry(format!("request to {origin} failed: {message}"))
    }
}

async fn read_bounded(mut response: Response, max: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = max - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() >= room {
            if chunk.len() > room || response.content_length().is_some_and(|n| n > max as u64) {
                tracing::warn!(max_output_bytes = max, "response body truncated");
            }
            break;
        }
    }
    Ok(body)
}

/// An `http_callback` payload: where to POST, and what.
#[derive(Debug, PartialEq)]
pub struct CallbackCall {
    pub url: Url,
    pub body: Vec<u8>,
    pub content_type: &'static str,
}

/// `{"url": "http(s)://…", "data": …}`: `data` is sent as raw text when it is a JSON string, as JSON otherwise.
/// Other keys are ignored. The error names the problem (never the payload).
pub fn parse_callback(payload: &[u8]) -> Result<CallbackCall, String> {
    const SHAPE: &str = r#"{"url": "http(s)://…", "data": …}"#;
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("the payload is not JSON ({e}); expected {SHAPE}"))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(format!("the payload is not a JSON object; expected {SHAPE}"));
    };
    let url = match object.get("url") {
        Some(serde_json::Value::String(url)) => http_url("payload.url", url).map_err(|e| e.to_string())?,
        Some(_) => return Err("payload.url: must be a string".into()),
        None => return Err(format!("payload.url: missing; expected {SHAPE}")),
    };
    match object.remove("data") {
        Some(serde_json::Value::String(text)) => {
            Ok(CallbackCall { url, body: text.into_bytes(), content_type: "text/plain; charset=utf-8" })
        }
        Some(data) => Ok(CallbackCall { url, body: data.to_string().into_bytes(), content_type: "application/json" }),
        None => Err(format!("payload.data: missing (use null to send no data); expected {SHAPE}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(outcome: Outcome) -> (String, bool, Option<Duration>) {
        match outcome {
            Outcome::Failure { message, non_retryable, retry_after } => (message, non_retryable, retry_after),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let wait = Some(Duration::from_secs(7));
        assert_eq!(status_outcome(StatusCode::OK, wait, b"done".to_vec()), Outcome::Success(b"done".to_vec()));
        assert_eq!(status_outcome(StatusCode::NO_CONTENT, None, Vec::new()), Outcome::Success(Vec::new()));
        for code in [408, 429, 500, 502, 503, 599] {
            let (message, non_retryable, retry_after) =
                failure(status_outcome(StatusCode::from_u16(code).unwrap(), wait, b" busy \n".to_vec()));
            assert!(!non_retryable, "{code} is retryable");
            assert_eq!(retry_after, wait, "{code} keeps Retry-After");
            assert!(message.starts_with(&format!("HTTP {code}")) && message.ends_with(": busy"), "{message}");
        }
        for code in [400, 401, 404, 409, 422, 301, 304] {
            let (message, non_retryable, retry_after) =
                failure(status_outcome(StatusCode::from_u16(code).unwrap(), wait, Vec::new()));
            assert!(non_retryable, "{code} is not retryable");
            assert_eq!(retry_after, wait.filter(|_| false), "no Retry-After on a non-retryable failure");
            assert!(message.starts_with(&format!("HTTP {code}")), "{message}");
        }
        let (message, ..) = failure(status_outcome(StatusCode::NOT_FOUND, None, Vec::new()));
        assert_eq!(message, "HTTP 404 Not Found");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO), "past: now");
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn callback_payloads_parse() {
        let call = parse_callback(br#"{"url": "http://hooks.example/a?b=1", "data": "raw text"}"#).unwrap();
        assert_eq!(call.url.as_str(), "http://hooks.example/a?b=1");
        assert_eq!(call.body, b"raw text");
        assert_eq!(call.content_type, "text/plain; charset=utf-8");
        let call = parse_callback(br#"{"url": "https://h/x", "data": {"n": [1, 2]}, "extra": true}"#).unwrap();
        assert_eq!(call.body, br#"{"n":[1,2]}"#);
        assert_eq!(call.content_type, "application/json");
        let call = parse_callback(br#"{"url": "https://h/x", "data": null}"#).unwrap();
        assert_eq!(call.body, b"null");
    }

    #[test]
    fn bad_callback_payloads_name_the_problem() {
        let cases: [(&[u8], &str); 7] = [
            (b"not json", "the payload is not JSON"),
            (b"[1, 2]", "the payload is not a JSON object"),
            (br#"{"data": 1}"#, "payload.url: missing"),
            (br#"{"url": 5, "data": 1}"#, "payload.url: must be a string"),
            (br#"{"url": "ftp://h/x", "data": 1}"#, "payload.url: the URL has scheme ftp; expected http"),
            (br#"{"url": "nope", "data": 1}"#, "payload.url: not a valid URL (relative URL without a base)"),
            (br#"{"url": "http://h/x"}"#, "payload.data: missing"),
        ];
        for (payload, expected) in cases {
            let problem = parse_callback(payload).expect_err("a bad payload");
            assert!(problem.starts_with(expected), "expected {expected:?}, got {problem:?}");
        }
    }

    #[test]
    fn metadata_keys_become_header_names() {
        assert_eq!(meta_header_name("trace-id"), "X-Job-Meta-trace-id");
        assert_eq!(meta_header_name("a b/c"), "X-Job-Meta-a-b-c");
        assert!(HeaderName::from_bytes(meta_header_name("größe: x").as_bytes()).is_ok());
    }
}
