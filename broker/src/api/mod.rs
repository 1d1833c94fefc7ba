//! The gRPC edge: service adapters and proto conversions. No policy and no SQL live here.

mod broker;
mod convert;

pub use broker::BrokerApi;
