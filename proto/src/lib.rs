//! Meshblock's shared vocabulary: typed ids, the replicated cluster model, the messages every
//! service speaks, the length-limited frame codec, and the QUIC + mutual-TLS transport.
//!
//! This is the only crate the daemons share. It owns no state and no disk format; the MDM is the
//! only writer of the model, every other process caches it.

pub mod ca;
pub mod capacity;
pub mod client;
pub mod clock;
pub mod codec;
pub mod config_file;
pub mod daemon;
pub mod data;
pub mod docker;
pub mod error;
pub mod fence;
pub mod ids;
pub mod model;
pub mod msg;
pub mod resilience;
pub mod secret;
pub mod transport;
pub mod views;

pub use error::{ErrorCode, WireError};
pub use ids::*;

/// Size of a chunk, the unit of allocation and placement (ScaleIO's 1 MiB).
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Size of a checksummed block inside a chunk.
pub const BLOCK_SIZE: u64 = 4096;
