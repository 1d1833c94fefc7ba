//! Opening a client to a broker: plaintext or TLS (`https://`, optionally with a client certificate), with a bearer
//! token on every call; and, with the `cli` feature, the command-line flags for all of that ([`ClientArgs`]).
//!
//! Deliberately thin: it returns the generated clients so every RPC stays available as the proto defines it.
//! Retrying and worker loops are the caller's business. The token is never printed (`Debug` hides it).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioIo};
use tokio::net::TcpStream;
use tonic::{
    Request, Status,
    codegen::{Service, http::Uri},
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    coalesce::Coalesced,
    v1::{JobSpec, broker_service_client::BrokerServiceClient},
};

/// A channel that adds `authorization: Bearer <token>` to every call (nothing without a token).
pub type AuthChannel = InterceptedService<Channel, Bearer>;
/// The `BrokerService` client [`ConnectOptions::connect`] returns.
pub type BrokerClient = BrokerServiceClient<AuthChannel>;

/// Connects to a plaintext broker at `addr` (`http://host:port`) with no token. See [`ConnectOptions`] for TLS
/// and tokens.
pub async fn connect(addr: impl Into<String>) -> Result<BrokerServiceClient<Channel>, tonic::transport::Error> {
    ConnectOptions::default().channel(addr).await.map(BrokerServiceClient::new)
}

/// The environment variable [`ClientArgs`] reads the bearer token from (`--token`). Programs started on a job's
/// behalf should not inherit it.
pub const TOKEN_VARIABLE: &str = "JOBBROKER_TOKEN";

/// Sets the bearer token on every request; made by [`ConnectOptions::interceptor`].
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(..)" } else { "Bearer(none)" })
    }
}

/// A problem with the client's settings, naming the setting (a flag for [`ClientArgs`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{setting}: {problem}")]
    Invalid { setting: &'static str, problem: String },
    /// A file named by a setting is missing or is not what the setting needs (the message names both).
    #[error("{0}")]
    File(String),
}

/// How to reach brokers: the same for every address.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    bearer: Bearer,
    /// Trust only this CA (PEM) for `https://` brokers instead of the platform's roots.
    ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key (PEM), for brokers that require mutual TLS.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the broker's certificate must carry, when it differs from the address's host.
    domain: Option<String>,
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("bearer", &self.bearer)
            .field("custom_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl ConnectOptions {
    /// Sends `token` as `authorization: Bearer <token>` on every call. It must be visible ASCII, no spaces.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let invalid = || ClientError::Invalid {
            setting: "--token",
            problem: "a token must be non-empty visible ASCII without spaces".into(),
        };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| invalid())?;
        // HPACK never indexes it; Debug prints "Sensitive".
        value.set_sensitive(true);
        self.bearer = Bearer(Some(value));
        Ok(self)
    }

    /// Trusts the CA certificates in `pem` (instead of the platform's roots) for `https://` brokers.
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this certificate chain and private key (PEM) to `https://` brokers (mutual TLS).
    pub fn with_client_identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Checks the broker's certificate against `domain` rather than the host of the address.
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// The interceptor that adds the token; pair it with [`Self::channel`] for other services
    /// (`AdminServiceClient::with_interceptor(channel, options.interceptor())`).
    pub fn interceptor(&self) -> Bearer {
        self.bearer.clone()
    }

    /// An endpoint for `addr` with HTTP/2 keepalive on (a dead broker is noticed) and, for `https://`, TLS.
    pub fn endpoint(&self, addr: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(addr.into())?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if endpoint.uri().scheme_str() != Some("https") {
            return Ok(endpoint);
        }
        let tls = match &self.ca_pem {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        let tls = match &self.identity {
            Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
            None => tls,
        };
        let tls = match &self.domain {
            Some(domain) => tls.domain_name(domain),
            None => tls,
        };
        endpoint.tls_config(tls)
    }

    /// A connected channel to `addr` (no token: see [`Self::interceptor`] or [`Self::connect`]).
    pub async fn channel(&self, addr: impl Into<String>) -> Result<Channel, tonic::transport::Error> {
        self.endpoint(addr)?.connect_with_connector(Connector::new()).await
    }

    /// A `BrokerService` client for `addr` that sends the token on every call.
    pub async fn connect(&self, addr: impl Into<String>) -> Result<BrokerClient, tonic::transport::Error> {
        let channel = self.channel(addr).await?;
        Ok(BrokerServiceClient::with_interceptor(channel, self.interceptor()))
    }
}

/// Opens TCP connections (no Nagle: a call is sent at once) whose writes are [`Coalesced`]; the endpoint adds TLS
/// on top for `https://` and the connect timeout around it.
#[derive(Clone)]
struct Connector(HttpConnector);

impl Connector {
    fn new() -> Connector {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        Connector(http)
    }
}

impl Service<Uri> for Connector {
    type Response = TokioIo<Coalesced<TcpStream>>;
    type Error = <HttpConnector as Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { Ok(TokioIo::new(Coalesced::new(connecting.await?.into_inner()))) })
    }
}

#[cfg(feature = "cli")]
pub use args::ClientArgs;

#[cfg(feature = "cli")]
mod args {
    use std::path::PathBuf;

    use super::{ClientError, ConnectOptions};
    use crate::tls;

    /// The connection flags every jobbroker command-line client shares. The broker address flag is the
    /// binary's own (`--broker` for the agent, `--addr` for jobctl); pass the addresses to [`Self::options`].
    #[derive(Clone, Default, clap::Args)]
    pub struct ClientArgs {
        /// Bearer token sent with every call (`authorization: Bearer <token>`).
        #[arg(long, env = super::TOKEN_VARIABLE, hide_env_values = true)]
        pub token: Option<String>,
        /// CA certificates (PEM) to trust for https:// brokers, instead of the system's roots.
        #[arg(long, env = "JOBBROKER_TLS_CA", value_name = "PATH")]
        pub tls_ca: Option<PathBuf>,
        /// Client certificate (PEM) for brokers that require mutual TLS; needs --tls-client-key.
        #[arg(long, env = "JOBBROKER_TLS_CLIENT_CERT", value_name = "PATH", requires = "tls_client_key")]
        pub tls_client_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-client-cert.
        #[arg(long, env = "JOBBROKER_TLS_CLIENT_KEY", value_name = "PATH", requires = "tls_client_cert")]
        pub tls_client_key: Option<PathBuf>,
        /// Name the broker's certificate must carry, when it differs from the address's host.
        #[arg(long, env = "JOBBROKER_TLS_DOMAIN", value_name = "NAME")]
        pub tls_domain: Option<String>,
    }

    impl std::fmt::Debug for ClientArgs {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ClientArgs")
                .field("token", &self.token.as_ref().map(|_| ".."))
                .field("tls_ca", &self.tls_ca)
                .field("tls_client_cert", &self.tls_client_cert)
                .field("tls_client_key", &self.tls_client_key)
                .field("tls_domain", &self.tls_domain)
                .finish()
        }
    }

    impl ClientArgs {
        /// Reads the files the flags name and checks the flags against `addresses`: TLS flags need https://
        /// addresses (so nobody believes a plaintext connection is protected).
        pub fn options<A: AsRef<str>>(&self, addresses: &[A]) -> Result<ConnectOptions, ClientError> {
            let mut options = ConnectOptions::default();
            if let Some(token) = &self.token {
                options = options.with_token(token.trim())?;
            }
            if let Some(path) = &self.tls_ca {
                options = options.with_ca_pem(checked(tls::read_certificates("--tls-ca", path))?);
            }
            if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
                let cert = checked(tls::read_certificates("--tls-client-cert", cert))?;
                let key = checked(tls::read_private_key("--tls-client-key", key))?;
                options = options.with_client_identity(cert, key);
            }
            if let Some(domain) = &self.tls_domain {
                options = options.with_domain(domain);
            }
            let tls_flags = [
                ("--tls-ca", self.tls_ca.is_some()),
                ("--tls-client-cert", self.tls_client_cert.is_some()),
                ("--tls-domain", self.tls_domain.is_some()),
            ];
            let tls_flag = tls_flags.into_iter().find_map(|(flag, given)| given.then_some(flag));
            let plaintext = addresses.iter().map(AsRef::as_ref).find(|a| !a.starts_with("https://"));
            if let (Some(setting), Some(plaintext)) = (tls_flag, plaintext) {
                return Err(ClientError::Invalid {
                    setting,
                    problem: format!("applies to https:// brokers only, and {plaintext} is plaintext"),
                });
            }
            Ok(options)
        }
    }

    fn checked(read: Result<Vec<u8>, String>) -> Result<Vec<u8>, ClientError> {
        read.map_err(ClientError::File)
    }
}

impl JobSpec {
    /// A spec with the given queue, kind and payload; every other field takes the broker's default.
    pub fn new(queue: impl Into<String>, kind: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self { queue: queue.into(), kind: kind.into(), payload: payload.into(), ..Self::default() }
    }
}
