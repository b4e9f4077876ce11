//! Tests of the state machine: commands, SDS lifecycle, placement and epochs.

use super::*;

/// The leader's clock in test proposals.
const TEST_NOW_UNIX: u64 = 1_800_000_000;

pub(super) fn cmd(s: &mut ClusterState, c: Command) -> Result<Outcome, WireError> {
    let v = s.version + 1;
    let op = Op::Command {
        command: c,
        proposed_unix: TEST_NOW_UNIX,
        expect: Vec::new(),
    };
    apply(s, &op, v)
}

/// Add volume `name` to pool sp1 (no labels, not preemptible).
pub(super) fn volume(name: &str, size_bytes: u64, thin: bool) -> Command {
    Command::AddVolume {
        pool: "sp1".into(),
        name: name.into(),
        size_bytes,
        thin,
        labels: Default::default(),
        preempt: false,
    }
}

pub(super) fn cluster() -> ClusterState {
    let mut s = ClusterState::default();
    let admin = User {
        name: "admin".into(),
        role: Role::Administrator,
        salt: "s".into(),
        password_sha256: "h".into(),
    };
    let mdm = MdmMember {
        id: MdmId(1),
        name: "mdm1".into(),
        addr: "127.0.0.1:1".into(),
        role: MdmRole::Manager,
    };
    apply(
        &mut s,
        &Op::Bootstrap {
            cluster_id: 0xabcd_0000_0000_0000,
            cluster_name: "c".into(),
            secret: "x".into(),
            admin,
            mdm,
        },
        1,
    )
    .expect("bootstrap");
    cmd(&mut s, Command::AddProtectionDomain { name: "pd1".into() }).expect("pd");
    cmd(
        &mut s,
        Command::AddStoragePool {
            pd: "pd1".into(),
            name: "sp1".into(),
            media_type: "".into(),
            pg_count: Some(64),
        },
    )
    .expect("pool");
    for i in 1..=3 {
        cmd(
            &mut s,
            Command::AddSds {
                name: format!("sds{i}"),
                addr: format!("127.0.0.1:{}", 7000 + i),
                pd: "pd1".into(),
                fault_set: None,
                devices: vec![NewDevice {
                    path: "/d".into(),
                    pool: "sp1".into(),
                    capacity_bytes: Some(100 << 30),
                }],
            },
        )
        .expect("sds");
    }
    s
}

#[test]
fn placement_follows_sds_and_bumps_epoch() {
    let s = cluster();
    let p = s.pool_by_name("sp1").expect("pool");
    assert!(p
        .pgs
        .iter()
        .all(|m| m.primary.is_some() && m.secondary.is_some()));
    assert!(p.epoch.0 > 1);
}

#[test]
fn refused_commands_change_nothing() {
    let mut s = cluster();
    let before = s.clone();
    for c in [
        Command::AddProtectionDomain { name: "pd1".into() },
        Command::AddProtectionDomain {
            name: "bad name!".into(),
        },
        Command::AddStoragePool {
            pd: "nope".into(),
            name: "sp2".into(),
            media_type: "".into(),
            pg_count: None,
        },
        volume("big", 200 << 30, false),
        Command::RemoveVolume {
            name: "nope".into(),
            mode: Default::default(),
        },
        Command::RemoveSds {
            name: "nope".into(),
        },
    ] {
        assert!(cmd(&mut s, c).is_err());
        assert_eq!(s, before);
    }
}

#[test]
fn thick_volumes_reserve_capacity() {
    let mut s = cluster();
    // 300 GiB raw, 150 GiB usable.
    cmd(&mut s, volume("a", 100 << 30, false)).expect("fits");
    let e = cmd(&mut s, volume("b", 60 << 30, false));
    assert_eq!(e.expect_err("must not fit").code, ErrorCode::NoSpace);
    cmd(&mut s, volume("c", 60 << 30, true)).expect("thin fits");
}

#[test]
fn takeover_fences_the_old_mapping() {
    let mut s = cluster();
    for (guid, name) in [("g-a", "a"), ("g-b", "b")] {
        let v = s.version + 1;
        apply(
            &mut s,
            &Op::SdcRegister {
                guid: guid.into(),
                name: name.into(),
                ip: "127.0.0.1".into(),
            },
            v,
        )
        .expect("register");
    }
    let sdc = |s: &ClusterState, n: &str| {
        s.sdcs
            .values()
            .find(|c| c.name == n)
            .map(|c| c.id)
            .expect("sdc")
    };
    let (a, b) = (sdc(&s, "a"), sdc(&s, "b"));
    cmd(
        &mut s,
        Command::AddVolume {
            pool: "sp1".into(),
            name: "v".into(),
            size_bytes: 1 << 30,
            thin: true,
            labels: [("fstype".to_string(), "ext4".to_string())].into(),
            preempt: false,
        },
    )
    .expect("vol");
    cmd(
        &mut s,
        Command::MapVolumeToSdc {
            volume: "v".into(),
            sdc: SdcSelector::Name("a".into()),
            allow_multi_map: false,
            takeover: false,
        },
    )
    .expect("map");
    let vol = s.volume_by_name("v").cloned().expect("v");
    assert_eq!(vol.labels.get("fstype").map(String::as_str), Some("ext4"));
    assert_eq!(
        vol.created_unix, TEST_NOW_UNIX,
        "the proposing leader's time"
    );
    let old = s.mappings_of(vol.id).next().expect("m").generation;
    assert_ne!(old, 0);
    assert_eq!(
        s.check_fence(ChunkId::new(vol.vtree, ChunkIndex(0)), old, "a"),
        FenceCheck::Allowed
    );
    // Only the SDC the volume is mapped to may use its generation.
    assert_eq!(
        s.check_fence(ChunkId::new(vol.vtree, ChunkIndex(0)), old, "b"),
        FenceCheck::OtherHost
    );
    assert_eq!(
        s.check_fence(ChunkId::new(vol.vtree, ChunkIndex(0)), 0, "a"),
        FenceCheck::Fenced
    );
    assert_eq!(
        s.check_fence(ChunkId::new(vol.vtree, ChunkIndex(0)), s.next_id + 1, "a"),
        FenceCheck::NewerThanMap
    );
    // The leader may evict nobody: a live mapping refuses the takeover, changing nothing.
    let before = s.clone();
    let v = s.version + 1;
    let op = |evict: Vec<SdcId>| Op::TakeOverVolume {
        volume: vol.id,
        sdc: b,
        evict,
    };
    let e = apply(&mut s, &op(vec![]), v).expect_err("busy");
    assert_eq!(e.code, ErrorCode::Busy);
    assert_eq!(s, before);
    apply(&mut s, &op(vec![a]), v).expect("takeover");
    let maps: Vec<_> = s.mappings_of(vol.id).cloned().collect();
    assert_eq!(maps.len(), 1);
    assert_eq!(maps[0].sdc, b);
    assert!(maps[0].generation > old);
    assert_eq!(
        s.check_fence(ChunkId::new(vol.vtree, ChunkIndex(0)), old, "a"),
        FenceCheck::Fenced
    );
    assert_eq!(
        s.check_fence(
            ChunkId::new(vol.vtree, ChunkIndex(0)),
            maps[0].generation,
            "b"
        ),
        FenceCheck::Allowed
    );
    assert_eq!(
        s.check_fence(
            ChunkId::new(vol.vtree, ChunkIndex(0)),
            maps[0].generation,
            "a"
        ),
        FenceCheck::OtherHost
    );
    // An unknown tree with fence 0 (hand-made maps) passes; with a fence it does not.
    assert_eq!(
        s.check_fence(ChunkId::new(VtreeId(12345), ChunkIndex(0)), 0, "a"),
        FenceCheck::Allowed
    );
    assert_eq!(
        s.check_fence(ChunkId::new(VtreeId(12345), ChunkIndex(0)), old, "a"),
        FenceCheck::Fenced
    );
}

#[test]
fn sds_holding_data_is_marked_removing_not_removed() {
    let mut s = cluster();
    cmd(&mut s, volume("a", 1 << 30, true)).expect("vol");
    let pgs_before = s.pool_by_name("sp1").expect("pool").pgs.clone();
    cmd(
        &mut s,
        Command::RemoveSds {
            name: "sds1".into(),
        },
    )
    .expect("marked");
    assert!(s.sds_by_name("sds1").expect("still there").removing);
    assert_eq!(s.pool_by_name("sp1").expect("pool").pgs, pgs_before);
    // With only two SDS left, removing another cannot keep two copies: refused.
    let before = s.clone();
    let e = cmd(
        &mut s,
        Command::RemoveSds {
            name: "sds2".into(),
        },
    )
    .expect_err("refused");
    assert_eq!(e.code, ErrorCode::NoSpace);
    assert_eq!(s, before);
}

#[test]
fn a_device_is_drained_before_its_record_goes() {
    let mut s = cluster();
    cmd(&mut s, volume("a", 1 << 30, true)).expect("vol");
    let remove = |s: &mut ClusterState, path: &str| {
        cmd(
            s,
            Command::RemoveSdsDevice {
                sds: "sds1".into(),
                path: path.into(),
            },
        )
    };
    // The last device of an SDS holding copies: refused, nothing changed.
    let before = s.clone();
    let e = remove(&mut s, "/d").expect_err("last device");
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("--remove_sds"), "{}", e.message);
    assert_eq!(s, before);
    let e = remove(&mut s, "/nope").expect_err("unknown");
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(s, before);

    cmd(
        &mut s,
        Command::AddSdsDevice {
            sds: "sds1".into(),
            device: NewDevice {
                path: "/e".into(),
                pool: "sp1".into(),
                capacity_bytes: Some(100 << 30),
            },
        },
    )
    .expect("second device");
    let pool = s.pool_by_name("sp1").expect("pool").id;
    let cap = |s: &ClusterState| s.sds_by_name("sds1").expect("sds1").capacity_in(pool);
    assert_eq!(cap(&s), 200 << 30);
    remove(&mut s, "/d").expect("marked");
    let state = |s: &ClusterState, path: &str| {
        s.sds_by_name("sds1")
            .expect("sds1")
            .devices
            .iter()
            .find(|d| d.path == path)
            .map(|d| d.state)
    };
    assert_eq!(state(&s, "/d"), Some(DeviceState::Removing));
    assert_eq!(cap(&s), 100 << 30, "a removing device is no capacity");
    let report = |s: &mut ClusterState, chunks: u64, draining: bool| {
        let v = s.version + 1;
        let id = sds_id(s, "sds1");
        apply(
            s,
            &Op::SdsReport {
                sds: id,
                devices: vec![DeviceReport {
                    path: "/d".into(),
                    capacity_bytes: 100 << 30,
                    failed: false,
                    chunks,
                    draining,
                    error: String::new(),
                    io: Default::default(),
                }],
                backward: false,
                boot: String::new(),
            },
            v,
        )
        .expect("report")
    };
    // Still holding chunks, or not yet draining (an old report): the record stays.
    report(&mut s, 12, true);
    assert_eq!(state(&s, "/d"), Some(DeviceState::Removing));
    report(&mut s, 0, false);
    assert_eq!(state(&s, "/d"), Some(DeviceState::Removing));
    let out = report(&mut s, 0, true);
    assert!(out.message.contains("/d"), "{}", out.message);
    assert_eq!(state(&s, "/d"), None, "drained and empty: removed");
    assert_eq!(cap(&s), 100 << 30);
}

pub(super) fn sds_id(s: &ClusterState, n: &str) -> SdsId {
    s.sds_by_name(n).expect("sds").id
}

/// sds1..sds3 report in (Initializing becomes Normal), at the leader's clock `unix`.
pub(super) fn report_all(s: &mut ClusterState, unix: u64) {
    for n in ["sds1", "sds2", "sds3"] {
        let report = Op::SdsReport {
            sds: sds_id(s, n),
            devices: vec![],
            backward: false,
            boot: String::new(),
        };
        let v = s.version + 1;
        apply_at(s, &report, v, unix).expect("report");
    }
}

#[test]
fn a_move_keeps_two_in_sync_copies_through_failures() {
    let mut s = cluster();
    cmd(&mut s, volume("a", 1 << 30, true)).expect("vol");
    let pool = s.pool_by_name("sp1").expect("pool").id;
    let m0 = s.pools[&pool].pgs[0];
    let (p, sec) = (m0.primary.expect("p"), m0.secondary.expect("s"));
    let ids = [sds_id(&s, "sds1"), sds_id(&s, "sds2"), sds_id(&s, "sds3")];
    let other = *ids.iter().find(|x| **x != p && **x != sec).expect("third");
    report_all(&mut s, 0);
    // Move the primary's copy: the secondary leads, the old primary keeps getting writes.
    let v = s.version + 1;
    apply(
        &mut s,
        &Op::MovePg {
            pool,
            pg: PgId(0),
            from: p,
            to: other,
        },
        v,
    )
    .expect("move");
    let m = s.pools[&pool].pgs[0];
    assert_eq!(
        (m.primary, m.secondary, m.leaving),
        (Some(sec), Some(other), Some(p))
    );
    assert_eq!(m.state(&s), PgState::Rebalancing);
    // The target dies: back to the two in-sync copies.
    let snapshot = s.clone();
    let v = s.version + 1;
    apply(&mut s, &Op::SdsDown { sds: other }, v).expect("down");
    let m = s.pools[&pool].pgs[0];
    assert_eq!(
        (m.primary, m.secondary, m.leaving, m.rebuild),
        (Some(sec), Some(p), None, None)
    );
    // Or the new primary dies: the leaving copy (in sync) leads.
    let mut s = snapshot.clone();
    let v = s.version + 1;
    apply(&mut s, &Op::SdsDown { sds: sec }, v).expect("down");
    let m = s.pools[&pool].pgs[0];
    assert_eq!(m.primary, Some(p));
    assert!(m.leaving.is_none());
    // Or the copy finishes: the leaving copy is dropped with an epoch bump.
    let mut s = snapshot;
    let m = s.pools[&pool].pgs[0];
    let e = s.pools[&pool].epoch;
    let v = s.version + 1;
    apply(
        &mut s,
        &Op::PgRebuilt {
            pool,
            pg: PgId(0),
            target: other,
            rebuild: m.rebuild.expect("r"),
        },
        v,
    )
    .expect("done");
    let m = s.pools[&pool].pgs[0];
    assert_eq!(
        (m.primary, m.secondary, m.leaving, m.rebuild),
        (Some(sec), Some(other), None, None)
    );
    assert!(s.pools[&pool].epoch > e);
}

#[test]
fn entries_of_older_versions_still_apply() {
    // A command entry without the proposer's time (older MDMs): volumes get time 0.
    let old = r#"{"Command":{"command":{"RemoveVolume":{"name":"v"}}}}"#;
    let op: Op = serde_json::from_str(old).expect("an old entry parses");
    assert!(matches!(
        op,
        Op::Command {
            proposed_unix: 0,
            ..
        }
    ));
    // And a new entry without a time serializes as the old ones did.
    let again = serde_json::to_string(&op).expect("json");
    assert_eq!(again, old);
}

#[test]
fn snapshots_freeze_layers_and_removal_prunes_the_ones_nobody_reads() {
    let mut s = cluster();
    cmd(&mut s, volume("v", 1 << 30, true)).expect("v");
    let snap = |s: &mut ClusterState, of: &str, name: &str| {
        cmd(
            s,
            Command::SnapshotVolumes {
                volumes: vec![of.into()],
                names: vec![name.into()],
                labels: Default::default(),
            },
        )
    };
    let epoch = s.pool_by_name("sp1").expect("pool").epoch;
    snap(&mut s, "v", "s1").expect("s1");
    assert!(
        s.pool_by_name("sp1").expect("pool").epoch > epoch,
        "a snapshot bumps the epoch"
    );
    snap(&mut s, "s1", "s2").expect("snapshot of a snapshot");
    let layer = |s: &ClusterState, n: &str| s.volume_by_name(n).expect(n).layer;
    let vt = s.volume_by_name("v").expect("v").vtree;
    // v: 1 -> 0; s1: 3 -> 2 -> 0; s2: 4 -> 2 -> 0.
    assert_eq!(s.chain(vt, layer(&s, "v")), vec![LayerId(1), LayerId(0)]);
    assert_eq!(
        s.chain(vt, layer(&s, "s2")),
        vec![LayerId(4), LayerId(2), LayerId(0)]
    );
    // A restore: v reads what s2 reads now; v's own old layer goes.
    cmd(
        &mut s,
        Command::OverwriteVolumeContent {
            volume: "v".into(),
            source: "s2".into(),
            force: false,
        },
    )
    .expect("restore");
    assert_eq!(
        s.chain(vt, layer(&s, "v"))[1..],
        [LayerId(4), LayerId(2), LayerId(0)]
    );
    assert!(!s.has_layer(vt, LayerId(1)), "v's old layer is pruned");
    // Removing s1 with its descendants leaves v (which reads s2's old layer) intact.
    let remove = |s: &mut ClusterState, n: &str, mode| {
        cmd(
            s,
            Command::RemoveVolume {
                name: n.into(),
                mode,
            },
        )
    };
    remove(&mut s, "s1", proto::msg::RemoveMode::IncludingDescendants).expect("s1 and s2");
    assert!(s.volume_by_name("s2").is_none() && s.volume_by_name("v").is_some());
    assert_eq!(s.chain(vt, layer(&s, "v")).len(), 4);
    assert!(
        !s.has_layer(vt, LayerId(3)) && !s.has_layer(vt, LayerId(5)),
        "s1's and s2's own layers are pruned"
    );
    remove(&mut s, "v", proto::msg::RemoveMode::WholeVtree).expect("the whole tree");
    assert!(s.vtrees.is_empty() && s.volumes.is_empty());
    // Bad input changes nothing.
    cmd(&mut s, volume("t", 1 << 30, false)).expect("thick");
    cmd(&mut s, Command::AddProtectionDomain { name: "pd2".into() }).expect("pd2");
    cmd(
        &mut s,
        Command::AddStoragePool {
            pd: "pd2".into(),
            name: "sp2".into(),
            media_type: "".into(),
            pg_count: Some(8),
        },
    )
    .expect("sp2");
    cmd(&mut s, volume("a", 1 << 30, true)).expect("a");
    cmd(
        &mut s,
        Command::AddVolume {
            pool: "sp2".into(),
            name: "b".into(),
            size_bytes: 1 << 30,
            thin: true,
            labels: Default::default(),
            preempt: false,
        },
    )
    .expect("b in pd2");
    let before = s.clone();
    assert!(snap(&mut s, "t", "ts").is_err(), "a thick volume");
    assert!(snap(&mut s, "nope", "x").is_err());
    let across = cmd(
        &mut s,
        Command::SnapshotVolumes {
            volumes: vec!["a".into(), "b".into()],
            names: Vec::new(),
            labels: Default::default(),
        },
    );
    assert!(
        across.is_err_and(|e| e.message.contains("one protection domain")),
        "a group across protection domains"
    );
    assert!(remove(&mut s, "t", proto::msg::RemoveMode::DescendantsOnly).is_err());
    assert_eq!(s, before);
}

#[test]
fn failures_and_rebuilds_are_recorded_as_events_with_their_time() {
    let mut s = cluster();
    let pool = s.pool_by_name("sp1").expect("pool").id;
    report_all(&mut s, 900);
    let joined: Vec<&str> = s.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(joined, ["sds_up"; 3], "{:?}", s.events);
    s.events.clear();
    let down = sds_id(&s, "sds3");
    let v = s.version + 1;
    apply_at(&mut s, &Op::SdsDown { sds: down }, v, 1000).expect("down");
    let kinds: Vec<&str> = s.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["sds_down", "rebuild_started"]);
    let e = &s.events[0];
    assert!(e.message.contains("sds3"), "{e:?}");
    assert_eq!((e.seq, e.unix, e.severity), (v, 1000, Severity::Warning));

    // Every rebuilding PG copied: the pool is whole again, and the event says how long it took.
    let copies: Vec<(PgId, SdsId, Epoch)> = s.pools[&pool]
        .pgs
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((PgId(i as u32), m.secondary?, m.rebuild?)))
        .collect();
    assert!(!copies.is_empty());
    for (pg, target, rebuild) in &copies {
        let v = s.version + 1;
        let op = Op::PgRebuilt {
            pool,
            pg: *pg,
            target: *target,
            rebuild: *rebuild,
        };
        apply_at(&mut s, &op, v, 1075).expect("rebuilt");
    }
    let last = s.events.back().expect("an event");
    assert_eq!(last.kind, "rebuild_finished");
    assert!(last.message.contains("in 75 s"), "{last:?}");
    assert_eq!(
        s.events
            .iter()
            .filter(|e| e.kind == "rebuild_finished")
            .count(),
        1
    );

    // An event of its own keeps the map's version (no SDS or SDC fetches a map for it); a
    // refused command records nothing.
    let (version, n) = (s.version, s.events.len());
    let note = Op::RecordEvent {
        severity: Severity::Info,
        kind: "login".into(),
        actor: "admin".into(),
        message: "User admin logged in".into(),
    };
    apply_at(&mut s, &note, version + 1, 2000).expect("recorded");
    assert_eq!((s.version, s.events.len()), (version, n + 1));
    cmd(&mut s, Command::AddProtectionDomain { name: "pd1".into() }).expect_err("exists");
    assert_eq!(s.events.len(), n + 1);
    // The newest EVENTS_KEPT stay; maps carry none.
    for i in 0..EVENTS_KEPT as u64 + 10 {
        apply_at(&mut s, &note, version + 2 + i, 3000).expect("recorded");
    }
    assert_eq!(s.events.len(), EVENTS_KEPT);
    assert_eq!(
        s.events.back().map(|e| e.seq),
        Some(version + 1 + EVENTS_KEPT as u64 + 10)
    );
    assert!(s.redacted().events.is_empty());
}

#[test]
fn resilience_names_the_losses_a_rebuilding_pool_cannot_survive() {
    let mut s = cluster();
    let pool = s.pool_by_name("sp1").expect("pool").id;
    report_all(&mut s, 0);
    let healthy = proto::resilience::analyze(&s, &Default::default());
    assert_eq!(
        (healthy.pgs_single_copy_now, healthy.pgs_unavailable_now),
        (0, 0)
    );
    assert!(healthy.cannot_survive.is_empty(), "{healthy:?}");
    // Losing one of three SDS leaves its PGs on one copy, none without.
    let held = |s: &ClusterState, id: SdsId| {
        s.pools[&pool]
            .pgs
            .iter()
            .filter(|m| m.primary == Some(id) || m.secondary == Some(id))
            .count() as u64
    };
    for l in healthy.losses.iter().filter(|l| l.kind == "sds") {
        assert_eq!(l.pgs_unavailable, 0, "{l:?}");
        assert_eq!(l.pgs_single_copy, held(&s, sds_id(&s, &l.name)), "{l:?}");
    }
    assert_eq!(healthy.copy_rate_source, "policy");

    // sds3 dies: its PGs rebuild from their surviving copy, which is now the only one.
    let (v, sds3) = (s.version + 1, sds_id(&s, "sds3"));
    apply(&mut s, &Op::SdsDown { sds: sds3 }, v).expect("down");
    let r = proto::resilience::analyze(&s, &Default::default());
    let rebuilding = |id: SdsId| {
        s.pools[&pool]
            .pgs
            .iter()
            .filter(|m| m.rebuild.is_some() && m.primary == Some(id))
            .count() as u64
    };
    let total: u64 = ["sds1", "sds2"]
        .iter()
        .map(|n| rebuilding(sds_id(&s, n)))
        .sum();
    assert!(total > 0);
    assert_eq!(r.pgs_single_copy_now, total);
    for n in ["sds1", "sds2"] {
        let l = r
            .losses
            .iter()
            .find(|l| l.kind == "sds" && l.name == n)
            .expect("a loss per SDS up");
        assert_eq!(l.pgs_unavailable, rebuilding(sds_id(&s, n)), "{l:?}");
        assert_eq!(
            r.cannot_survive.contains(&format!("sds {n}")),
            l.pgs_unavailable > 0
        );
    }
    assert!(
        r.losses.iter().all(|l| l.name != "sds3"),
        "a down SDS cannot be lost again"
    );
}

#[test]
fn a_command_whose_ids_no_longer_hold_changes_nothing() {
    let mut s = cluster();
    cmd(&mut s, volume("v1", 8 << 30, true)).expect("v1");
    let id = s.volume_by_name("v1").expect("v1").id;
    let resize = |name: &str| Command::ModifyVolumeCapacity {
        name: name.into(),
        size_bytes: 16 << 30,
    };
    // scli looked up the id as v1; the volume was renamed, and another took its old name.
    cmd(
        &mut s,
        Command::RenameVolume {
            name: "v1".into(),
            new_name: "v2".into(),
        },
    )
    .expect("rename");
    cmd(&mut s, volume("v1", 8 << 30, true)).expect("a new v1");
    // The resize of `name`, sent with the lookup of `id` as `name`.
    let bound = |name: &str| Op::Command {
        command: resize(name),
        proposed_unix: TEST_NOW_UNIX,
        expect: vec![Binding::Volume {
            id,
            name: name.into(),
        }],
    };
    let before = s.clone();
    let v = s.version + 1;
    let e = apply(&mut s, &bound("v1"), v).expect_err("stale binding");
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("is now v2"), "{}", e.message);
    assert_eq!(s, before, "nothing changed");
    // With the binding true, the same entry applies.
    let v = s.version + 1;
    apply(&mut s, &bound("v2"), v).expect("binding holds");
    assert_eq!(s.volumes[&id].size_bytes, 16 << 30);
}
