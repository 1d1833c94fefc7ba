//! How jobctl reaches a broker: the address flag plus the client flags every jobbroker tool shares (token, TLS),
//! and the clients built on one channel.
//!
//! The only module that knows about connection settings; the commands ask [`Clients`] for a client and nothing
//! more.

use jobbroker::{
    client::{AuthChannel, Bearer, ClientArgs},
    v1::{admin_service_client::AdminServiceClient, broker_service_client::BrokerServiceClient},
};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::error::Error;

/// Largest response accepted: a page of jobs may carry many payloads of up to 1 MiB each.
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Where the broker is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Broker address; `https://` turns on TLS.
    #[arg(long, env = "JOBBROKER_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    pub addr: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The transport every client uses: one HTTP/2 channel that adds the token to each call.
pub type Transport = AuthChannel;

/// Clients for each service the commands call, sharing one connection.
#[derive(Clone)]
pub struct Clients {
    channel: Channel,
    token: Bearer,
}

impl ConnectArgs {
    /// Connects now, so an unreachable broker is reported as such rather than as the first call's failure.
    pub async fn connect(&self) -> Result<Clients, Error> {
        let options = self.client.options(&[&self.addr]).map_err(|e| Error::Input(e.to_string()))?;
        let connect = |source| Error::Connect { addr: self.addr.clone(), source };
        let channel = options.channel(self.addr.clone()).await.map_err(connect)?;
        Ok(Clients { channel, token: options.interceptor() })
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
