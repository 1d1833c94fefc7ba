//! The gRPC edge: service adapters and proto conversions. No policy and no SQL live here.

mod admin;
mod broker;
mod convert;

pub use admin::AdminApi;
pub use broker::BrokerApi;
