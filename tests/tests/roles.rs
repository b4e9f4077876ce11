//! Every request an MDM serves checks who sent it, against real `mdm` processes: each control
//! request, each command and Raft messages, sent with the certificate of every role that may
//! not send it (and of a name that gives no role), is refused with `PermissionDenied` naming the
//! certificate and the request, and changes nothing (map version, Raft term, SDC sessions).
//! An SDC registers and renews only itself. The SDS side is tested in process
//! (`sds/tests/data_plane.rs`).

use meshblock_tests::*;
use proto::model::{ClusterMode, ClusterState, MdmMember, MdmRole, Role};
use proto::msg::{ClusterStatus, Command, MdmRequest, MdmResponse, NewDevice, Query, SdcSelector};
use proto::{ErrorCode, MdmId, SdcId};
use std::path::PathBuf;

const MDM: &str = "mdm";
const SDS: &str = "sds:sds1";
const SDC: &str = "sdc:host1";
const ADMIN: &str = "admin";

/// The certificates of every role, and one whose name gives none.
fn certs(c: &Cluster) -> Vec<(&'static str, PathBuf)> {
    vec![
        (MDM, c.dir.join("certs/mdm")),
        (SDS, cert_dir(c, SDS)),
        (SDC, sdc_cert(c, "host1")),
        (ADMIN, c.dir.join("certs/admin")),
        ("sdc", cert_dir(c, "sdc")),
    ]
}

fn request(
    c: &Cluster,
    cert: &std::path::Path,
    req: &MdmRequest,
) -> Result<MdmResponse, proto::WireError> {
    control_request(cert, &c.mdm_ips(), req)
}

/// The admin's session token and the cluster's status and map.
fn view(c: &Cluster, token: &str) -> (ClusterStatus, ClusterState) {
    let q = MdmRequest::Query {
        token: token.into(),
        query: Query::All,
    };
    match request(c, &c.dir.join("certs/admin"), &q) {
        Ok(MdmResponse::View { status, state }) => (*status, *state),
        other => panic!("query: {other:?}"),
    }
}

fn command(token: &str, command: Command) -> MdmRequest {
    MdmRequest::Command {
        token: token.into(),
        command,
        expect: Vec::new(),
    }
}

/// One request of every kind (with a valid Administrator token: only the certificate may stop
/// them) and the certificates that may send it.
fn table(token: &str) -> Vec<(MdmRequest, &'static [&'static str])> {
    let t = token;
    let s = |v: &str| v.to_string();
    let docker: &[&str] = &[ADMIN, SDC];
    let admin: &[&str] = &[ADMIN];
    let host = || SdcSelector::Name(s("host1"));
    vec![
        (MdmRequest::Identify, &[MDM]),
        (
            MdmRequest::Introduce {
                members: vec![MdmMember {
                    id: MdmId(4242),
                    name: s("rogue"),
                    addr: s("127.0.0.1:9"),
                    role: MdmRole::Manager,
                }],
            },
            &[MDM],
        ),
        (
            MdmRequest::Login {
                username: s("admin"),
                password: s(ADMIN_PASSWORD),
            },
            docker,
        ),
        (
            MdmRequest::Query {
                token: s(t),
                query: Query::All,
            },
            admin,
        ),
        (
            MdmRequest::SdsHello {
                name: s("sds1"),
                devices: vec![],
                stats: Default::default(),
                boot: String::new(),
            },
            &[SDS],
        ),
        (
            MdmRequest::PgRebuilt {
                name: s("sds1"),
                pool: proto::PoolId(1),
                pg: proto::PgId(0),
                target: proto::SdsId(2),
                rebuild: proto::Epoch(1),
            },
            &[SDS],
        ),
        (
            MdmRequest::SdcRegister {
                guid: s("guid-host1"),
                name: s("host1"),
                ip: s("127.0.0.1"),
            },
            &[SDC],
        ),
        (
            MdmRequest::GetMap {
                known_version: 0,
                sdc: None,
                throttled_ms: Vec::new(),
                io: Vec::new(),
            },
            &[SDS, SDC],
        ),
        (
            command(t, Command::AddProtectionDomain { name: s("pdx") }),
            admin,
        ),
        (
            command(
                t,
                Command::AddFaultSet {
                    pd: s("pd1"),
                    name: s("fsx"),
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::AddStoragePool {
                    pd: s("pd1"),
                    name: s("spx"),
                    media_type: s("SSD"),
                    pg_count: None,
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::AddSds {
                    name: s("sdsx"),
                    addr: s("127.0.0.1:9"),
                    pd: s("pd1"),
                    fault_set: None,
                    devices: vec![NewDevice {
                        path: s("/dev/x"),
                        pool: s("sp1"),
                        capacity_bytes: Some(1 << 34),
                    }],
                },
            ),
            admin,
        ),
        (command(t, Command::RemoveSds { name: s("sds1") }), admin),
        (
            command(t, Command::AbortRemoveSds { name: s("sds1") }),
            admin,
        ),
        (
            command(
                t,
                Command::RenameSds {
                    name: s("sds1"),
                    new_name: s("sdsz"),
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::RenameSdc {
                    sdc: host(),
                    new_name: s("hostz"),
                },
            ),
            admin,
        ),
        (command(t, Command::RemoveSdc { sdc: host() }), admin),
        (
            command(t, Command::RemoveProtectionDomain { name: s("pd1") }),
            admin,
        ),
        (
            command(t, Command::RemoveStoragePool { name: s("sp1") }),
            admin,
        ),
        (
            command(
                t,
                Command::RemoveFaultSet {
                    pd: s("pd1"),
                    name: s("fs1"),
                },
            ),
            admin,
        ),
        (command(t, Command::RemoveUser { name: s("admin") }), admin),
        (
            command(t, Command::RemoveStandbyMdm { name: s("mdm1") }),
            admin,
        ),
        (
            command(
                t,
                Command::SetRebuildPolicy {
                    pool: s("sp1"),
                    concurrency: Some(1),
                    bandwidth_mib_s: None,
                    adaptive: None,
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::AddSdsDevice {
                    sds: s("sds1"),
                    device: NewDevice {
                        path: s("/dev/y"),
                        pool: s("sp1"),
                        capacity_bytes: Some(1 << 34),
                    },
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::RemoveSdsDevice {
                    sds: s("sds1"),
                    path: s("/dev/fake1"),
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::ClearSdsDeviceError {
                    sds: s("sds1"),
                    path: s("/dev/fake1"),
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::AddVolume {
                    pool: s("sp1"),
                    name: s("volx"),
                    size_bytes: 8 << 30,
                    thin: true,
                    labels: Default::default(),
                    preempt: false,
                },
            ),
            docker,
        ),
        (
            command(
                t,
                Command::RemoveVolume {
                    name: s("vol1"),
                    mode: Default::default(),
                },
            ),
            docker,
        ),
        (
            command(
                t,
                Command::ModifyVolumeCapacity {
                    name: s("vol1"),
                    size_bytes: 16 << 30,
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::RenameVolume {
                    name: s("vol1"),
                    new_name: s("volz"),
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::MapVolumeToSdc {
                    volume: s("vol1"),
                    sdc: host(),
                    allow_multi_map: true,
                    takeover: false,
                },
            ),
            docker,
        ),
        (
            command(
                t,
                Command::UnmapVolumeFromSdc {
                    volume: s("vol1"),
                    sdc: None,
                },
            ),
            docker,
        ),
        (
            command(
                t,
                Command::SetSdcVolumeLimits {
                    volume: s("vol1"),
                    sdc: host(),
                    iops_limit: Some(100),
                    bandwidth_limit_kbps: None,
                },
            ),
            docker,
        ),
        (
            command(
                t,
                Command::AddUser {
                    name: s("mallory"),
                    role: Role::Administrator,
                    password: s("Password9"),
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::AddStandbyMdm {
                    addr: s("127.0.0.1:9"),
                    name: None,
                },
            ),
            admin,
        ),
        (
            command(
                t,
                Command::SwitchClusterMode {
                    mode: ClusterMode::ThreeNode,
                },
            ),
            admin,
        ),
    ]
}

fn login(c: &Cluster) -> String {
    let r = request(
        c,
        &c.dir.join("certs/admin"),
        &MdmRequest::Login {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        },
    );
    match r {
        Ok(MdmResponse::Session { token, .. }) => token,
        other => panic!("login: {other:?}"),
    }
}

fn must_register(c: &Cluster, host: &str) -> SdcId {
    let r = request(
        c,
        &sdc_cert(c, host),
        &MdmRequest::SdcRegister {
            guid: format!("guid-{host}"),
            name: host.into(),
            ip: "127.0.0.1".into(),
        },
    );
    match r {
        Ok(MdmResponse::SdcRegistered { id }) => id,
        other => panic!("register {host}: {other:?}"),
    }
}

/// A Raft heartbeat from a made-up peer at a far higher term than the leader's, in the frame an
/// MDM sends: were it stepped, the leader would step down.
fn raft_frame(to: MdmId, term: u64) -> proto::codec::Frame {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let from = 77u64;
    // eraftpb::Message: msg_type = 1 (MsgHeartbeat = 8), to = 2, from = 3, term = 4.
    let mut msg = vec![0x08, 8, 0x10];
    varint(to.0, &mut msg);
    msg.push(0x18);
    varint(from, &mut msg);
    msg.push(0x20);
    varint(term, &mut msg);
    let meta = serde_json::json!({ "from": from, "from_addr": "127.0.0.1:9" });
    proto::codec::Frame::request(
        proto::codec::kind::RAFT,
        serde_json::to_vec(&meta).expect("json"),
        bytes::Bytes::from(msg),
    )
}

/// Send `frame` to `addr` with the certificate in `cert`: the answer's status and message.
fn send_frame(
    cert: &std::path::Path,
    addr: std::net::SocketAddr,
    frame: proto::codec::Frame,
) -> Result<(), proto::WireError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let id = proto::transport::Identity::load(cert).expect("identity");
        let ep = proto::transport::Endpoint::client(&id, "test").expect("endpoint");
        let conn = ep.connect(addr).await.expect("connect");
        let f = conn
            .call_timeout(frame, std::time::Duration::from_secs(10))
            .await
            .expect("call");
        proto::transport::check_status(f).map(|_| ())
    })
}

#[test]
fn each_mdm_request_from_a_wrong_role_is_refused_and_changes_nothing() {
    let c = Cluster::start("roles", 1, &[]);
    c.must_scli(&["--add_protection_domain", "--protection_domain_name", "pd1"]);
    let token = login(&c);
    let host1 = must_register(&c, "host1");
    let (status, before) = view(&c, &token);
    let mut refused = 0;
    for (req, allowed) in table(&token) {
        for (cn, cert) in certs(&c) {
            if allowed.contains(&cn) {
                continue;
            }
            let e = request(&c, &cert, &req).expect_err("a wrong role is refused");
            assert_eq!(
                e.code,
                ErrorCode::PermissionDenied,
                "{req:?} from {cn}: {e}"
            );
            assert!(
                e.message.contains(&format!("certificate '{cn}'"))
                    && e.message.contains("may not send"),
                "the refusal names the certificate and the request: {}",
                e.message
            );
            refused += 1;
        }
    }
    assert!(refused > 60, "only {refused} refusals");

    // Raft messages only from MDM certificates: the leader's term does not move.
    let mdm_id = match request(&c, &c.dir.join("certs/mdm"), &MdmRequest::Identify) {
        Ok(MdmResponse::Identity { id, .. }) => id,
        other => panic!("identify: {other:?}"),
    };
    for (cn, cert) in certs(&c).into_iter().filter(|(cn, _)| *cn != MDM) {
        let e = send_frame(&cert, c.mdms[0].addr, raft_frame(mdm_id, status.term + 100))
            .expect_err("Raft from a non-MDM certificate");
        assert_eq!(e.code, ErrorCode::PermissionDenied, "Raft from {cn}: {e}");
        assert!(e.message.contains("Raft messages"), "{}", e.message);
    }

    // An SDC speaks only for itself: it registers no other name and renews no other session.
    let host2 = must_register(&c, "host2");
    let e = request(
        &c,
        &sdc_cert(&c, "host1"),
        &MdmRequest::SdcRegister {
            guid: "guid-host3".into(),
            name: "host3".into(),
            ip: String::new(),
        },
    )
    .expect_err("registering another host");
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
    let e = request(
        &c,
        &sdc_cert(&c, "host1"),
        &MdmRequest::GetMap {
            known_version: 0,
            sdc: Some(host2),
            throttled_ms: Vec::new(),
            io: Vec::new(),
        },
    )
    .expect_err("renewing another host's session");
    assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
    assert!(e.message.contains("host2"), "{}", e.message);
    let own = request(
        &c,
        &sdc_cert(&c, "host1"),
        &MdmRequest::GetMap {
            known_version: 0,
            sdc: Some(host1),
            throttled_ms: Vec::new(),
            io: Vec::new(),
        },
    );
    assert!(matches!(own, Ok(MdmResponse::Map { .. })), "{own:?}");

    // Nothing changed: the map (but for host2's registration), the term, host2's session.
    let (status_after, after) = view(&c, &token);
    assert_eq!(
        status_after.term, status.term,
        "a refused Raft message moved the term"
    );
    let mut expected = before.clone();
    expected.sdcs.insert(host2, after.sdcs[&host2].clone());
    expected.next_id = after.next_id;
    expected.version = after.version;
    assert_eq!(after, expected, "only host2's registration changed the map");
    assert!(
        !status_after.sdc_last_seen_ms.contains_key(&host2),
        "host1 renewed host2's session: {:?}",
        status_after.sdc_last_seen_ms
    );
    assert!(status_after.sdc_last_seen_ms.contains_key(&host1));
}
