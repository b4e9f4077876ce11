//! The MDM's Raft group: the ready-loop thread ([`node`]) and its storage ([`storage`]).

pub mod node;
pub mod storage;

pub use node::{RaftHandle, RaftMsg, RaftStatus, Shared};
