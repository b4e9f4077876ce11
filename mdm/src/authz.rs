//! Who may send what to an MDM, by the role of the sender's certificate
//! ([`proto::ca::CertRole`]): the one table of which roles may send each control request, each
//! command and Raft messages ([`senders`]), checked by [`check`] before a request is decoded
//! further or does anything. It is a `match` without a wildcard arm, so a new request or command
//! does not compile until it has a row.
//!
//! This module knows certificates only: the role of a logged-in user (Monitor, Configure,
//! Administrator) is checked afterwards by `service`, from the session token. It also holds the
//! checks that a daemon speaks only for itself (an SDS certificate for that SDS, an SDC
//! certificate for that SDC).

use proto::ca::{forbidden, CertRole};
use proto::model::ClusterState;
use proto::msg::{Command, MdmRequest};
use proto::transport::Peer;
use proto::{ErrorCode, SdcId, WireError};

/// What a peer asks an MDM.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// A Raft message (`kind::RAFT` frame).
    Raft,
    /// A control request (`kind::CONTROL` frame).
    Control(&'a MdmRequest),
}

/// The certificate roles that may send `req`.
pub fn senders(req: Request<'_>) -> &'static [CertRole] {
    use CertRole::*;
    let Request::Control(r) = req else {
        return &[Mdm];
    };
    match r {
        MdmRequest::Identify | MdmRequest::Introduce { .. } => &[Mdm],
        // The Docker volume plugin of an SDC logs in as a user and runs volume commands.
        MdmRequest::Login { .. } => &[Admin, Sdc],
        MdmRequest::Query { .. } => &[Admin],
        MdmRequest::Command { command, .. } => command_senders(command),
        MdmRequest::SdsHello { .. } | MdmRequest::PgRebuilt { .. } => &[Sds],
        MdmRequest::SdcRegister { .. } => &[Sdc],
        MdmRequest::GetMap { .. } => &[Sds, Sdc],
    }
}

/// The certificate roles that may send `command` (besides, the user needs Configure or
/// Administrator).
fn command_senders(command: &Command) -> &'static [CertRole] {
    use CertRole::*;
    match command {
        // What the SDC's Docker volume plugin does.
        Command::AddVolume { .. }
        | Command::RemoveVolume { .. }
        | Command::MapVolumeToSdc { .. }
        | Command::UnmapVolumeFromSdc { .. }
        | Command::SetSdcVolumeLimits { .. }
        | Command::SnapshotVolumes { .. } => &[Admin, Sdc],
        Command::AddProtectionDomain { .. }
        | Command::AddFaultSet { .. }
        | Command::AddStoragePool { .. }
        | Command::AddSds { .. }
        | Command::RemoveSds { .. }
        | Command::SetRebuildPolicy { .. }
        | Command::AddSdsDevice { .. }
        | Command::RemoveSdsDevice { .. }
        | Command::ClearSdsDeviceError { .. }
        | Command::ModifyVolumeCapacity { .. }
        | Command::RenameVolume { .. }
        | Command::RemoveConsistencyGroupSnapshots { .. }
        | Command::AddSnapshotPolicy { .. }
        | Command::RemoveSnapshotPolicy { .. }
        | Command::AddSourceVolumeToSnapshotPolicy { .. }
        | Command::RemoveSourceVolumeFromSnapshotPolicy { .. }
        | Command::PauseSnapshotPolicy { .. }
        | Command::OverwriteVolumeContent { .. }
        | Command::AddUser { .. }
        | Command::AddStandbyMdm { .. }
        | Command::SwitchClusterMode { .. }
        | Command::RemoveProtectionDomain { .. }
        | Command::RemoveStoragePool { .. }
        | Command::RemoveFaultSet { .. }
        | Command::RemoveSdc { .. }
        | Command::RemoveUser { .. }
        | Command::RemoveStandbyMdm { .. }
        | Command::RenameSds { .. }
        | Command::RenameSdc { .. }
        | Command::AbortRemoveSds { .. } => &[Admin],
    }
}

/// The request's name in refusals and logs.
pub fn request_name(req: Request<'_>) -> String {
    let Request::Control(r) = req else {
        return "Raft messages".into();
    };
    match r {
        MdmRequest::Login { .. } => "Login".into(),
        MdmRequest::Command { command, .. } => format!("command {}", command_name(command)),
        MdmRequest::Query { .. } => "Query".into(),
        MdmRequest::SdsHello { .. } => "SdsHello".into(),
        MdmRequest::SdcRegister { .. } => "SdcRegister".into(),
        MdmRequest::PgRebuilt { .. } => "PgRebuilt".into(),
        MdmRequest::GetMap { .. } => "GetMap".into(),
        MdmRequest::Identify => "Identify".into(),
        MdmRequest::Introduce { .. } => "Introduce".into(),
    }
}

/// scli's name of a command.
pub fn command_name(c: &Command) -> &'static str {
    match c {
        Command::AddProtectionDomain { .. } => "add_protection_domain",
        Command::AddFaultSet { .. } => "add_fault_set",
        Command::AddStoragePool { .. } => "add_storage_pool",
        Command::AddSds { .. } => "add_sds",
        Command::RemoveSds { .. } => "remove_sds",
        Command::SetRebuildPolicy { .. } => "set_rebuild_rebalance_policy",
        Command::AddSdsDevice { .. } => "add_sds_device",
        Command::RemoveSdsDevice { .. } => "remove_sds_device",
        Command::ClearSdsDeviceError { .. } => "clear_sds_device_error",
        Command::AddVolume { .. } => "add_volume",
        Command::RemoveVolume { .. } => "remove_volume",
        Command::ModifyVolumeCapacity { .. } => "modify_volume_capacity",
        Command::RenameVolume { .. } => "rename_volume",
        Command::MapVolumeToSdc { .. } => "map_volume_to_sdc",
        Command::UnmapVolumeFromSdc { .. } => "unmap_volume_from_sdc",
        Command::SetSdcVolumeLimits { .. } => "set_sdc_volume_limits",
        Command::SnapshotVolumes { .. } => "snapshot_volume",
        Command::RemoveConsistencyGroupSnapshots { .. } => "remove_consistency_group_snapshots",
        Command::OverwriteVolumeContent { .. } => "overwrite_volume_content",
        Command::AddSnapshotPolicy { .. } => "add_snapshot_policy",
        Command::RemoveSnapshotPolicy { .. } => "remove_snapshot_policy",
        Command::AddSourceVolumeToSnapshotPolicy { .. } => "add_source_volume_to_snapshot_policy",
        Command::RemoveSourceVolumeFromSnapshotPolicy { .. } => {
            "remove_source_volume_from_snapshot_policy"
        }
        Command::PauseSnapshotPolicy { paused: true, .. } => "pause_snapshot_policy",
        Command::PauseSnapshotPolicy { paused: false, .. } => "resume_snapshot_policy",
        Command::AddUser { .. } => "add_user",
        Command::AddStandbyMdm { .. } => "add_standby_mdm",
        Command::SwitchClusterMode { .. } => "switch_cluster_mode",
        Command::RemoveProtectionDomain { .. } => "remove_protection_domain",
        Command::RemoveStoragePool { .. } => "remove_storage_pool",
        Command::RemoveFaultSet { .. } => "remove_fault_set",
        Command::RemoveSdc { .. } => "remove_sdc",
        Command::RemoveUser { .. } => "remove_user",
        Command::RemoveStandbyMdm { .. } => "remove_standby_mdm",
        Command::RenameSds { .. } => "rename_sds",
        Command::RenameSdc { .. } => "rename_sdc",
        Command::AbortRemoveSds { .. } => "abort_remove_sds",
    }
}

/// Refuse `req` (with `PermissionDenied`, naming the certificate, its role and the request)
/// unless `peer`'s certificate role may send it.
pub fn check(peer: &Peer, req: Request<'_>) -> Result<(), WireError> {
    let allowed = senders(req);
    match CertRole::of(&peer.name) {
        Some((role, _)) if allowed.contains(&role) => Ok(()),
        _ => Err(forbidden(&peer.name, &request_name(req), allowed)),
    }
}

/// A user may not remove their own account (whoever else may, an Administrator).
pub fn refuse_self_removal(command: &Command, user: &str) -> Result<(), WireError> {
    match command {
        Command::RemoveUser { name } if name == user => Err(WireError::new(
            ErrorCode::Conflict,
            format!(
                "Cannot remove user {name}: it is the user sending the command; log in as \
                 another Administrator to remove it. Nothing was changed"
            ),
        )),
        _ => Ok(()),
    }
}

/// An SDS speaks for itself only: its certificate must be `sds:NAME`.
pub fn require_own_sds(peer: &Peer, name: &str) -> Result<(), WireError> {
    match CertRole::of(&peer.name) {
        Some((CertRole::Sds, n)) if n == name => Ok(()),
        _ => Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "certificate '{}' may not speak for SDS {name}; make its certificate with `meshblock-ca csr --name sds:{name}`",
                peer.name
            ),
        )),
    }
}

/// An SDC registers only itself: its certificate must be `sdc:NAME`.
pub fn require_own_sdc(peer: &Peer, name: &str) -> Result<(), WireError> {
    match CertRole::of(&peer.name) {
        Some((CertRole::Sdc, n)) if n == name => Ok(()),
        _ => Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "certificate '{}' may not register the SDC {name}; make its certificate with `meshblock-ca csr --name sdc:{name}`",
                peer.name
            ),
        )),
    }
}

/// An SDC renews only its own session: `sdc` must be the SDC registered under the name of the
/// caller's certificate.
pub fn require_own_sdc_id(peer: &Peer, state: &ClusterState, sdc: SdcId) -> Result<(), WireError> {
    let registered = state.sdcs.get(&sdc).map(|c| c.cert_name());
    match (CertRole::of(&peer.name), registered) {
        (Some((CertRole::Sdc, n)), Some(r)) if n == r => Ok(()),
        // Removed (while its session had lapsed): the SDC registers again on this answer. Its
        // certificate stays the check: a new registration is of its own name only.
        (Some((CertRole::Sdc, _)), None) => Err(WireError::new(
            ErrorCode::NotFound,
            format!("SDC {sdc} is not registered (it was removed from the cluster); register again"),
        )),
        (_, registered) => Err(WireError::new(
            ErrorCode::PermissionDenied,
            format!(
                "certificate '{}' may not renew the session of SDC {sdc} ({}); an SDC renews only its own",
                peer.name,
                registered.map_or("not registered".to_string(), |r| format!("registered as {r}"))
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::ca::CertRole::*;
    use proto::msg::{Query, SdcSelector, SdsStats};

    fn peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
            conn: 1,
        }
    }

    fn command(command: Command) -> MdmRequest {
        MdmRequest::Command {
            token: String::new(),
            command,
            expect: Vec::new(),
        }
    }

    /// One request of every kind with the roles that may send it: ARCHITECTURE.md's table.
    fn table() -> Vec<(MdmRequest, &'static [CertRole])> {
        let s = String::new;
        let docker: &[CertRole] = &[Admin, Sdc];
        let admin: &[CertRole] = &[Admin];
        vec![
            (MdmRequest::Identify, &[Mdm]),
            (MdmRequest::Introduce { members: vec![] }, &[Mdm]),
            (
                MdmRequest::Login {
                    username: s(),
                    password: s(),
                },
                docker,
            ),
            (
                MdmRequest::Query {
                    token: s(),
                    query: Query::All,
                },
                admin,
            ),
            (
                MdmRequest::SdsHello {
                    name: s(),
                    devices: vec![],
                    stats: SdsStats::default(),
                    boot: String::new(),
                },
                &[Sds],
            ),
            (
                MdmRequest::PgRebuilt {
                    name: s(),
                    pool: proto::PoolId(1),
                    pg: proto::PgId(0),
                    target: proto::SdsId(1),
                    rebuild: proto::Epoch(1),
                },
                &[Sds],
            ),
            (
                MdmRequest::SdcRegister {
                    guid: s(),
                    name: s(),
                    ip: s(),
                },
                &[Sdc],
            ),
            (
                MdmRequest::GetMap {
                    known_version: 0,
                    sdc: None,
                    throttled_ms: Vec::new(),
                    io: Vec::new(),
                },
                &[Sds, Sdc],
            ),
            (
                command(Command::AddVolume {
                    pool: s(),
                    name: s(),
                    size_bytes: 0,
                    thin: true,
                    labels: Default::default(),
                    preempt: false,
                }),
                docker,
            ),
            (
                command(Command::RemoveVolume {
                    name: s(),
                    mode: Default::default(),
                }),
                docker,
            ),
            (
                command(Command::MapVolumeToSdc {
                    volume: s(),
                    sdc: SdcSelector::Name(s()),
                    allow_multi_map: false,
                    takeover: false,
                }),
                docker,
            ),
            (
                command(Command::UnmapVolumeFromSdc {
                    volume: s(),
                    sdc: None,
                }),
                docker,
            ),
            (command(Command::AddProtectionDomain { name: s() }), admin),
            (command(Command::RemoveSds { name: s() }), admin),
            (
                command(Command::RemoveProtectionDomain { name: s() }),
                admin,
            ),
            (
                command(Command::RemoveSdc {
                    sdc: SdcSelector::Id(SdcId(1)),
                }),
                admin,
            ),
            (command(Command::RemoveUser { name: s() }), admin),
            (command(Command::RemoveStandbyMdm { name: s() }), admin),
            (
                command(Command::RenameSds {
                    name: s(),
                    new_name: s(),
                }),
                admin,
            ),
            (command(Command::AbortRemoveSds { name: s() }), admin),
            (
                command(Command::AddStandbyMdm {
                    addr: s(),
                    name: None,
                }),
                admin,
            ),
        ]
    }

    #[test]
    fn each_request_is_allowed_to_its_roles_only() {
        let certs = [
            (Mdm, "mdm"),
            (Sds, "sds:sds1"),
            (Sdc, "sdc:host1"),
            (Admin, "admin"),
        ];
        for (req, allowed) in table() {
            let req = Request::Control(&req);
            assert_eq!(senders(req), allowed, "{}", request_name(req));
            for (role, cn) in certs {
                let r = check(&peer(cn), req);
                if allowed.contains(&role) {
                    assert!(r.is_ok(), "{} from {cn}: {r:?}", request_name(req));
                } else {
                    let e = r.expect_err("refused");
                    assert_eq!(e.code, ErrorCode::PermissionDenied);
                    assert!(
                        e.message.contains(cn) && e.message.contains(&request_name(req)),
                        "{}",
                        e.message
                    );
                }
            }
            // A certificate that gives no role may send nothing.
            for cn in ["sdc", "server", ""] {
                assert!(check(&peer(cn), req).is_err(), "{cn}");
            }
        }
        for (role, cn) in certs {
            assert_eq!(
                check(&peer(cn), Request::Raft).is_ok(),
                role == Mdm,
                "Raft messages from {cn}"
            );
        }
    }

    #[test]
    fn an_sdc_renews_only_its_own_session() {
        let mut state = ClusterState::default();
        for (id, name) in [(1, "host1"), (2, "host2")] {
            state.sdcs.insert(
                SdcId(id),
                proto::model::Sdc {
                    id: SdcId(id),
                    guid: format!("g{id}"),
                    name: name.into(),
                    ip: "127.0.0.1".into(),
                    cert_name: None,
                },
            );
        }
        assert!(require_own_sdc_id(&peer("sdc:host1"), &state, SdcId(1)).is_ok());
        for (cn, id) in [
            ("sdc:host1", 2),
            ("sds:host1", 1),
            ("sds:host1", 9),
            ("admin", 1),
        ] {
            let e = require_own_sdc_id(&peer(cn), &state, SdcId(id)).expect_err("refused");
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{cn} {id}");
        }
        // An id nobody holds (the SDC was removed) tells an SDC to register again.
        let e = require_own_sdc_id(&peer("sdc:host1"), &state, SdcId(9)).expect_err("removed");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("register again"), "{}", e.message);
        assert!(require_own_sdc(&peer("sdc:host1"), "host1").is_ok());
        assert!(require_own_sdc(&peer("sdc:host1"), "host2").is_err());
        assert!(require_own_sds(&peer("sds:a"), "a").is_ok());
        assert!(require_own_sds(&peer("sdc:a"), "a").is_err());
    }
}
