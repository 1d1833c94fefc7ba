//! Opening a client to a broker, and shortcuts for the common calls.
//!
//! Deliberately thin: it returns the generated [`BrokerServiceClient`] so every RPC stays available as the
//! proto defines it. Retrying and worker loops are the caller's business.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::v1::{JobSpec, broker_service_client::BrokerServiceClient};

/// Connects to a broker at `addr` (`http://host:port`) with HTTP/2 keepalive on, so a dead broker is noticed.
pub async fn connect(addr: impl Into<String>) -> Result<BrokerServiceClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(addr.into())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await?;
    Ok(BrokerServiceClient::new(channel))
}

impl JobSpec {
    /// A spec with the given queue, kind and payload; every other field takes the broker's default.
    pub fn new(queue: impl Into<String>, kind: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self { queue: queue.into(), kind: kind.into(), payload: payload.into(), ..Self::default() }
    }
}
