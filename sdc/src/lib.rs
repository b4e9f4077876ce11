//! The Meshblock storage data client (SDC): routes block I/O to the SDS that hold each chunk,
//! serves mapped volumes over NBD, and follows the cluster map from the MDM.

pub mod config;
pub mod daemon;
pub mod io_path;
pub mod volume;
