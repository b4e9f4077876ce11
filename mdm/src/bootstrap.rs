//! A data directory's identity and the cluster's birth: this MDM's id ([`node_id`]) and
//! `mdm bootstrap` ([`bootstrap`]), which makes the first MDM's data directory the only voter
//! of a new Raft group, commits the cluster (its id, token secret, the admin user and this MDM
//! as its first manager) and stops, so the service manager can then run the MDM as usual.
//!
//! Bootstrapping is idempotent: a data directory that already belongs to a cluster is left
//! exactly as it is, and the caller is told so. This module does no network I/O: a group of one
//! needs nobody else to commit.

use crate::raft::node::{self, NodeConfig};
use crate::raft::storage::RaftStorage;
use crate::state_machine::Op;
use crate::store::{MetaStore, StoreError};
use proto::model::{MdmMember, MdmRole, Role, User};
use proto::{MdmId, WireError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tree and key of this MDM's id in its store.
const NODE_TREE: &str = "node";
const ID_KEY: &[u8] = b"id";
/// Written once the cluster's birth is committed in this data directory: its cluster id.
const BOOTSTRAPPED_KEY: &[u8] = b"bootstrapped";

/// Shortest admin password accepted.
pub const MIN_PASSWORD_LEN: usize = 6;

/// How long a group of one may take to elect its only member.
const ELECTION_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("read this MDM's id: the stored value is {0} bytes, not 8 (corrupt data directory)")]
    CorruptId(usize),
    #[error("read the Raft state")]
    Raft(#[from] raft::Error),
    #[error("start Raft: {0}")]
    Start(String),
    #[error("this MDM did not lead its group of one within {0:?}")]
    NoLeader(Duration),
    #[error("commit the new cluster: {0}")]
    Commit(WireError),
    #[error("the Raft thread stopped unexpectedly")]
    RaftThread,
}

/// This MDM's id, made (random, non-zero) and stored on first use of its data directory.
pub fn node_id(store: &dyn MetaStore) -> Result<MdmId, BootstrapError> {
    if let Some(v) = store.get(NODE_TREE, ID_KEY)? {
        let a: [u8; 8] = v
            .as_slice()
            .try_into()
            .map_err(|_| BootstrapError::CorruptId(v.len()))?;
        return Ok(MdmId(u64::from_be_bytes(a)));
    }
    let id = loop {
        let v: u64 = rand::random::<u64>() >> 1;
        if v != 0 {
            break v;
        }
    };
    store.put(NODE_TREE, ID_KEY, &id.to_be_bytes())?;
    store.flush()?;
    Ok(MdmId(id))
}

/// What bootstrapping found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new cluster with this id was created.
    Created { cluster_id: u64 },
    /// The directory already holds a cluster this MDM created; nothing changed.
    AlreadyBootstrapped { cluster_id: u64 },
    /// The directory belongs to a cluster this MDM joined (or one it created, grown since);
    /// nothing changed.
    AlreadyMember { voters: usize, learners: usize },
}

/// Who the cluster's first MDM is and what the cluster is called.
pub struct Birth {
    /// This MDM's name.
    pub name: String,
    /// The address other processes reach it at (recorded in the cluster map).
    pub addr: String,
    pub cluster_name: String,
    /// The `admin` user's password.
    pub admin_password: String,
}

/// What a data directory already belongs to, read without changing anything: `None` when it
/// is fresh, or its bootstrap was interrupted before the birth was recorded (a group of one
/// whose only member is this MDM, without the marker [`bootstrap`] writes last).
pub fn already(store: &Arc<dyn MetaStore>) -> Result<Option<Outcome>, BootstrapError> {
    if let Some(v) = store.get(NODE_TREE, BOOTSTRAPPED_KEY)? {
        let cluster_id = <[u8; 8]>::try_from(v.as_slice()).map_or(0, u64::from_be_bytes);
        return Ok(Some(Outcome::AlreadyBootstrapped { cluster_id }));
    }
    let cs = RaftStorage::open(store.clone())?.conf_state().clone();
    if cs.voters.is_empty() && cs.learners.is_empty() {
        return Ok(None);
    }
    let id = match store.get(NODE_TREE, ID_KEY)? {
        Some(v) => <[u8; 8]>::try_from(v.as_slice()).map_or(0, u64::from_be_bytes),
        None => 0,
    };
    if cs.voters == [id] && cs.learners.is_empty() {
        return Ok(None);
    }
    Ok(Some(Outcome::AlreadyMember {
        voters: cs.voters.len(),
        learners: cs.learners.len(),
    }))
}

/// Make the MDM whose store is `store` the first member of a new cluster, unless its data
/// directory already belongs to one (then change nothing and say so). Blocks until the birth is
/// committed and durable and the Raft thread has stopped.
pub fn bootstrap(
    store: Arc<dyn MetaStore>,
    birth: Birth,
    raft_cfg: NodeConfig,
) -> Result<Outcome, BootstrapError> {
    if let Some(done) = already(&store)? {
        return Ok(done);
    }
    let id = node_id(&*store)?;
    // A fresh directory, or one whose bootstrap was interrupted (or made by an older version
    // without the marker): run the group of one until the birth is committed here.
    let (out_tx, _out_rx) = tokio::sync::mpsc::channel(node::INBOX_LEN);
    let (raft, thread) = node::start(store.clone(), id, raft_cfg, true, out_tx)
        .map_err(|e| BootstrapError::Start(format!("{e:#}")))?;
    let deadline = Instant::now() + ELECTION_WAIT;
    loop {
        let st = raft.shared.status();
        if st.is_leader && st.leader_ready {
            break;
        }
        if Instant::now() > deadline {
            return Err(BootstrapError::NoLeader(ELECTION_WAIT));
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let existing = raft.shared.read_state().cluster_id;
    let outcome = if existing != 0 {
        Outcome::AlreadyBootstrapped {
            cluster_id: existing,
        }
    } else {
        let (cluster_id, op) = birth_op(id, birth);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| BootstrapError::Start(e.to_string()))?;
        rt.block_on(raft.propose(op))
            .map_err(BootstrapError::Commit)?;
        Outcome::Created { cluster_id }
    };
    // Every sender gone, the Raft thread returns after its last (durable) ready.
    drop(raft);
    thread.join().map_err(|_| BootstrapError::RaftThread)?;
    let cluster_id = match outcome {
        Outcome::Created { cluster_id } | Outcome::AlreadyBootstrapped { cluster_id } => cluster_id,
        Outcome::AlreadyMember { .. } => 0,
    };
    store.put(NODE_TREE, BOOTSTRAPPED_KEY, &cluster_id.to_be_bytes())?;
    store.flush()?;
    Ok(outcome)
}

/// The log entry of the cluster's birth: its id, token secret, the admin user and this MDM as
/// its first manager (everything random is made here, never in `apply`), and the cluster id.
fn birth_op(id: MdmId, b: Birth) -> (u64, Op) {
    let salt = crate::auth::random_hex(16);
    let admin = User {
        name: "admin".into(),
        role: Role::Administrator,
        password_sha256: crate::auth::hash_password(&salt, &b.admin_password),
        salt,
    };
    let cluster_id = rand::random::<u64>() | 1 << 63;
    let op = Op::Bootstrap {
        cluster_id,
        cluster_name: b.cluster_name,
        secret: crate::auth::random_hex(32),
        admin,
        mdm: MdmMember {
            id,
            name: b.name,
            addr: b.addr,
            role: MdmRole::Manager,
        },
    };
    (cluster_id, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn birth() -> Birth {
        Birth {
            name: "mdm1".into(),
            addr: "127.0.0.1:7611".into(),
            cluster_name: "t".into(),
            admin_password: "Secret1".into(),
        }
    }

    fn raft_cfg() -> NodeConfig {
        NodeConfig {
            tick: Duration::from_millis(10),
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_interval_entries: 1000,
        }
    }

    #[test]
    fn bootstrap_creates_a_cluster_once_and_then_changes_nothing() {
        let dir = std::env::temp_dir().join(format!(
            "mb-bootstrap-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let store: Arc<dyn MetaStore> = Arc::new(SledStore::open(&dir).expect("open"));
        let Outcome::Created { cluster_id } =
            bootstrap(store.clone(), birth(), raft_cfg()).expect("create")
        else {
            panic!("not created")
        };
        assert_ne!(cluster_id, 0);
        assert_eq!(
            bootstrap(store.clone(), birth(), raft_cfg()).expect("again"),
            Outcome::AlreadyBootstrapped { cluster_id }
        );
        // The store holds the cluster: a restarted node replays it.
        let (tx, _rx) = tokio::sync::mpsc::channel(node::INBOX_LEN);
        let id = node_id(&*store).expect("id");
        let (raft, thread) = node::start(store.clone(), id, raft_cfg(), false, tx).expect("start");
        let deadline = Instant::now() + ELECTION_WAIT;
        while raft.shared.read_state().cluster_id == 0 {
            assert!(Instant::now() < deadline, "the cluster was not replayed");
            std::thread::park_timeout(Duration::from_millis(20));
        }
        let state = raft.shared.read_state();
        assert_eq!(state.cluster_id, cluster_id);
        assert!(state.users.contains_key("admin"));
        assert_eq!(state.mdms.len(), 1);
        drop(raft);
        thread.join().expect("raft thread");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
