//! The Meshblock storage data client (SDC): routes block I/O to the SDS that hold each chunk,
//! serves mapped volumes over NBD, and follows the cluster map from the MDM.
//!
//! Modules: [`nbd`] (the NBD protocol server), [`export`] (volumes as NBD exports), [`io_path`]
//! (routing, retries, flush tracking), [`volume`] (byte ranges to chunks, pure), [`daemon`]
//! (registration and map following), [`attach`] (volumes as local block devices: FUSE file +
//! loop device), [`admin`] (the local socket of `sdc attach|detach|list`), [`docker`] (the
//! Docker volume plugin), [`persist`] (state files), [`supervisor`] (PID 1 of the managed plugin), [`metrics`], [`config`].

pub mod admin;
pub mod attach;
pub mod config;
pub mod daemon;
pub mod docker;
pub mod export;
pub mod flush;
pub mod io_path;
pub mod metrics;
pub mod nbd;
pub mod persist;
pub mod supervisor;
pub mod volume;
