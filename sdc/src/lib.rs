//! The Meshblock storage data client (SDC): routes block I/O to the SDS that hold each chunk,
//! serves mapped volumes over NBD, and follows the cluster map from the MDM.
//!
//! Modules: [`nbd`] (the NBD protocol server), [`export`] (volumes as NBD exports), [`io_path`]
//! (routing, retries, flush tracking), [`volume`] (byte ranges to chunks, pure), [`daemon`]
//! (registration and map following), [`config`].

pub mod config;
pub mod daemon;
pub mod export;
pub mod io_path;
pub mod nbd;
pub mod volume;
