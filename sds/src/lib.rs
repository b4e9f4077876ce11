//! The Meshblock storage data server (SDS): serves chunk reads and writes from local devices
//! through io_uring, mirrors each write to the PG's secondary, and fences stale epochs.
//!
//! Public modules first: [`device`] (the only one touching io_uring), [`chunk_store`] (on-disk
//! chunk layout and checksums of one device), [`storage`] (all devices as one chunk space),
//! [`routing`] (the cached cluster map, the epoch/PG fence and the MDM lease), [`replication`]
//! (forwarding to the secondary), [`service`] (the data protocol handler), [`authz`] (which
//! certificate roles may send which data op), [`rebuild`] (copying
//! a PG to a new secondary as its primary), [`devices`] (the device set following the map:
//! devices added and removed while running), [`gc`] (freeing chunks of PGs held no more),
//! [`scrub`] (verifying stored data and repairing it
//! from the other copy), [`thick`] (pre-allocating thick volumes), [`mdm_client`] (registration, heartbeat, map
//! polling), [`config`], [`metrics`]. Then helpers: [`range_lock`], [`failpoints`].
//!
//! How `main` assembles a daemon: open each device ([`device::AnyDevice`]) and its
//! [`chunk_store::ChunkStore`], wrap them in a [`storage::Storage`], create a
//! [`routing::MapCache`], build the [`service::Service`] on a QUIC `Endpoint` and serve it with
//! `endpoint.serve(service)`, and run an [`mdm_client::MdmLink`] that keeps the map cache and
//! this SDS's id current.

pub mod authz;
pub mod chunk_store;
pub mod config;
pub mod device;
pub mod devices;
pub mod gc;
pub mod mdm_client;
pub mod metrics;
pub mod rebuild;
pub mod replication;
pub mod routing;
pub mod scrub;
pub mod service;
pub mod storage;
pub mod thick;

pub mod failpoints;
pub mod range_lock;

#[cfg(test)]
mod test_util;
