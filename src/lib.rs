//! The jobbroker API as Rust types (generated from `proto/` at build time) and a small client.
//!
//! Producers and workers in Rust depend on this crate alone: [`v1`] holds every message and the generated
//! `BrokerService` client and server, [`client`] opens a channel with sensible defaults. It holds no policy:
//! what a job does and how the broker decides is in the `broker` crate.

pub mod client;
pub mod coalesce;
pub mod tls;
pub mod worker;

/// Generated code for package `jobbroker.v1`.
#[allow(clippy::large_enum_variant)] // generated oneofs: an Assignment carries a whole Job
pub mod v1 {
    tonic::include_proto!("jobbroker.v1");
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let end = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(end);
    }
}

/// Encoded `FileDescriptorSet` of every jobbroker proto, served by the broker's reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/jobbroker_descriptor.bin"));
