//! The Meshblock metadata manager (MDM): a Raft group that owns the cluster's object model
//! (protection domains, fault sets, pools, SDS, volumes, SDCs, mappings, users) and the placement
//! of data. It never sees user data.
//!
//! Modules: [`bootstrap`] (this MDM's id; a new cluster's birth, `mdm bootstrap`), [`raft`]
//! (ready loop and Raft storage), [`store`] (the `MetaStore` seam over sled),
//! [`state_machine`] (applies committed ops), [`placement`] (pure PG assignment), [`capacity`]
//! (pure thick-volume admission), [`service`] (requests over QUIC), [`authz`] (which
//! certificate roles may send which request), [`raft_net`] (the Raft transport between MDMs),
//! [`lease`] (SDS leases only from a leader a quorum follows), [`auth`], [`config`],
//! [`metrics`], [`history`] (the leader's last hour of I/O rates), [`rest`] (the HTTPS REST API
//! and web dashboard).

pub mod auth;
pub mod authz;
pub mod bootstrap;
pub mod capacity;
pub mod config;
pub mod history;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod raft;
pub mod raft_net;
pub mod rest;
pub mod service;
pub mod state_machine;
pub mod store;
