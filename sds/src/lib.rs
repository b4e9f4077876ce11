//! The Meshblock storage data server (SDS): serves chunk reads and writes from local devices
//! through io_uring, mirrors each write to the PG's secondary, and fences stale epochs.
//!
//! Modules: [`device`] (the only one touching io_uring), [`chunk_store`] (on-disk chunk layout
//! and checksums), [`service`] (the data protocol, fencing, mirroring), [`config`], [`metrics`].

pub mod chunk_store;
pub mod config;
pub mod device;
pub mod metrics;
pub mod service;
