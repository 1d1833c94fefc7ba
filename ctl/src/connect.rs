//! How jobctl reaches a broker: the address and bearer token flags, and the clients built on one channel.
//!
//! The only module that knows about connection settings; the commands ask [`Clients`] for a client and nothing
//! more. Deliberately minimal (plaintext HTTP/2 and a token): the shared client flags with the TLS options are to
//! replace [`ConnectArgs`] here without touching the commands.

use std::time::Duration;

use jobbroker::v1::{admin_service_client::AdminServiceClient, broker_service_client::BrokerServiceClient};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::health_client::HealthClient;

use crate::error::Error;

/// Largest response accepted: a page of jobs may carry many payloads of up to 1 MiB each.
const MAX_MESSAGE_BYTES: usize = 256 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the broker is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Broker address.
    #[arg(long, env = "JOBBROKER_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    pub addr: String,
    /// Bearer token sent as `authorization: Bearer <token>` (needed when the broker has tokens configured).
    #[arg(long, env = "JOBBROKER_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

/// The transport every client uses: one HTTP/2 channel that adds the token to each call.
pub type Transport = InterceptedService<Channel, BearerToken>;

/// Clients for each service the commands call, sharing one connection.
#[derive(Clone)]
pub struct Clients {
    channel: Channel,
    token: BearerToken,
}

impl ConnectArgs {
    /// Connects now, so an unreachable broker is reported as such rather than as the first call's failure.
    pub async fn connect(&self) -> Result<Clients, Error> {
        let token = match &self.token {
            None => BearerToken(None),
            Some(token) => BearerToken(Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| Error::Input("--token: must be printable ASCII".into()))?,
            )),
        };
        let connect = |source| Error::Connect { addr: self.addr.clone(), source };
        let endpoint = Endpoint::from_shared(self.addr.clone()).map_err(connect)?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(connect)?;
        Ok(Clients { channel, token })
    }
}

impl Clients {
    pub fn broker(&self) -> BrokerServiceClient<Transport> {
        BrokerServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn admin(&self) -> AdminServiceClient<Transport> {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn health(&self) -> HealthClient<Transport> {
        HealthClient::with_interceptor(self.channel.clone(), self.token.clone())
    }
}

/// Adds `authorization: Bearer <token>` to every request when a token was given.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}
