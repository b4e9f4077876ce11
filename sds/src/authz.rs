//! Who may send which data op to an SDS, by the role of the sender's certificate
//! ([`proto::ca::CertRole`]): the one table ([`senders`]), a `match` without a wildcard arm so a
//! new op does not compile until it has a row, checked by [`check`] before anything else is done
//! with a request. Then, per op, who *among* that role: an SDS peer must hold the chunk's PG in
//! the copy the op comes from ([`require_pg_peer`]); an SDC must present the generation of a
//! current mapping of the volume to itself (the mapping fence, in `service`).
//!
//! It must not do I/O or wait: it is a pure function of the header, the certificate name and the
//! cached map.
//!
//! PERFORMANCE-CRITICAL: runs per request.

use proto::ca::{forbidden, CertRole};
use proto::data::{DataHeader, DataOp};
use proto::model::ClusterState;
use proto::transport::Peer;
use proto::{ErrorCode, WireError};

/// The certificate roles that may send `op`.
pub fn senders(op: DataOp) -> &'static [CertRole] {
    use CertRole::*;
    match op {
        // Volume I/O: the SDC the volume is mapped to, under its mapping's generation.
        DataOp::Read | DataOp::Write | DataOp::Trim | DataOp::WriteZeroes => &[Sdc],
        // Flushes: the SDC's, and a rebuild source's making its copy durable on the target
        // before reporting the rebuild done (flushing changes no data).
        DataOp::Flush => &[Sdc, Sds],
        // NBD block status (the SDC, fenced like reads) and rebuild (the PG's primary).
        DataOp::AllocStatus => &[Sds, Sdc],
        // Forwards and rebuild copies from the PG's primary; repairs from its secondary; reads
        // of this SDS's own copy (repair, comparison of copies) from another holder of the PG.
        DataOp::ReplicaWrite | DataOp::ReplicaTrim | DataOp::Repair | DataOp::ReadLocal => &[Sds],
    }
}

/// The sender's role and name (the part after the colon) if its certificate role may send
/// `op`; else `PermissionDenied`, naming the certificate, its role and the op.
pub fn check(peer: &Peer, op: DataOp) -> Result<(CertRole, &str), WireError> {
    let allowed = senders(op);
    match CertRole::of(&peer.name) {
        Some((role, name)) if allowed.contains(&role) => Ok((role, name)),
        _ => Err(forbidden(&peer.name, &format!("{op:?}"), allowed)),
    }
}

/// Which copy of the chunk's PG the sending SDS must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgCopy {
    /// Forwards and rebuild copies come from the primary.
    Primary,
    /// Repair requests come from the secondary.
    Secondary,
    /// Reads of another copy come from any holder (primary, secondary, copy being moved off).
    Any,
}

/// The sending SDS (named `sds` by its certificate) must hold `copy` of `h`'s PG in `map`;
/// else `WrongPg` (the sender or this SDS routes with another map: both refresh).
pub fn require_pg_peer(
    map: &ClusterState,
    sds: &str,
    h: &DataHeader,
    copy: PgCopy,
) -> Result<(), WireError> {
    let sender = map.sds_by_cert_name(sds).map(|x| x.id);
    let pg = map.pools.get(&h.pool).and_then(|p| p.pg(h.pg));
    let holds = match (sender, pg) {
        (Some(s), Some(m)) => match copy {
            PgCopy::Primary => m.primary == Some(s),
            PgCopy::Secondary => m.secondary == Some(s),
            PgCopy::Any => [m.primary, m.secondary, m.leaving].contains(&Some(s)),
        },
        _ => false,
    };
    if holds {
        return Ok(());
    }
    let role = match copy {
        PgCopy::Primary => "primary",
        PgCopy::Secondary => "secondary",
        PgCopy::Any => "holder of a copy",
    };
    Err(WireError::new(
        ErrorCode::WrongPg,
        format!(
            "SDS {sds} is not the {role} of PG {} of pool {} in this SDS's map (version {}); {:?} refused",
            h.pg, h.pool, map.version, h.op
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: [DataOp; 10] = [
        DataOp::Read,
        DataOp::Write,
        DataOp::ReplicaWrite,
        DataOp::Flush,
        DataOp::Trim,
        DataOp::WriteZeroes,
        DataOp::AllocStatus,
        DataOp::ReplicaTrim,
        DataOp::ReadLocal,
        DataOp::Repair,
    ];

    fn peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
            conn: 1,
        }
    }

    #[test]
    fn every_op_has_senders_and_refuses_the_other_roles_by_name() {
        // Every wire op is in OPS (and so in ARCHITECTURE.md's table).
        for v in 0..=u8::MAX {
            if let Some(op) = DataOp::from_u8(v) {
                assert!(OPS.contains(&op), "{op:?} missing from the table test");
            }
        }
        let certs = [
            (CertRole::Mdm, "mdm"),
            (CertRole::Sds, "sds:s1"),
            (CertRole::Sdc, "sdc:h1"),
            (CertRole::Admin, "admin"),
        ];
        for op in OPS {
            assert!(!senders(op).is_empty(), "{op:?}");
            for (role, cn) in certs {
                match check(&peer(cn), op) {
                    Ok((r, _)) => assert!(senders(op).contains(&r) && r == role),
                    Err(e) => {
                        assert!(!senders(op).contains(&role), "{op:?} from {cn}");
                        assert_eq!(e.code, ErrorCode::PermissionDenied);
                        assert!(
                            e.message.contains(cn) && e.message.contains(&format!("{op:?}")),
                            "{}",
                            e.message
                        );
                    }
                }
            }
            assert!(
                check(&peer("sdc"), op).is_err(),
                "a bare 'sdc' names no host"
            );
        }
    }
}
