//! Tests of `admin`: removals refused while the object is in use (changing nothing), renames
//! that keep the certificate identity, and aborting an SDS's removal.

use super::tests::{cluster, cmd, sds_id, volume};
use super::*;

/// `c` is refused with `code`, and the state is exactly as before.
fn must_refuse(s: &mut ClusterState, c: Command, code: ErrorCode, says: &str) {
    let before = s.clone();
    let e = cmd(s, c.clone()).expect_err("refused");
    assert_eq!(e.code, code, "{c:?}: {e}");
    assert!(e.message.contains(says), "{c:?}: {e}");
    assert_eq!(*s, before, "{c:?} changed the state");
}

fn register(s: &mut ClusterState, guid: &str, name: &str) -> SdcId {
    let v = s.version + 1;
    let out = apply(
        s,
        &Op::SdcRegister {
            guid: guid.into(),
            name: name.into(),
            ip: "127.0.0.1".into(),
        },
        v,
    )
    .expect("register");
    SdcId(out.object_id.expect("id"))
}

#[test]
fn a_protection_domain_goes_only_once_empty() {
    let mut s = cluster();
    cmd(
        &mut s,
        Command::AddFaultSet {
            pd: "pd1".into(),
            name: "fs1".into(),
        },
    )
    .expect("fault set");
    let pd = |name: &str| Command::RemoveProtectionDomain { name: name.into() };
    must_refuse(
        &mut s,
        pd("pd1"),
        ErrorCode::Conflict,
        "storage pools (sp1)",
    );
    must_refuse(&mut s, pd("nope"), ErrorCode::NotFound, "nope");
    // Emptied step by step: SDS (hold no data), pool, fault set.
    for n in ["sds1", "sds2", "sds3"] {
        cmd(&mut s, Command::RemoveSds { name: n.into() }).expect("sds");
    }
    cmd(&mut s, Command::RemoveStoragePool { name: "sp1".into() }).expect("pool");
    must_refuse(&mut s, pd("pd1"), ErrorCode::Conflict, "fault sets (fs1)");
    cmd(
        &mut s,
        Command::RemoveFaultSet {
            pd: "pd1".into(),
            name: "fs1".into(),
        },
    )
    .expect("fault set");
    let id = s.pd_by_name("pd1").expect("pd").id;
    let out = cmd(&mut s, pd("pd1")).expect("removed");
    assert_eq!(out.object_id, Some(id.0));
    assert!(s.pds.is_empty());
}

#[test]
fn a_protection_domain_with_sds_but_no_pool_stays() {
    let mut s = cluster();
    for n in ["sds1", "sds2", "sds3"] {
        let id = sds_id(&s, n);
        if let Some(x) = s.sds.get_mut(&id) {
            x.devices.clear();
        }
    }
    cmd(&mut s, Command::RemoveStoragePool { name: "sp1".into() }).expect("pool");
    must_refuse(
        &mut s,
        Command::RemoveProtectionDomain { name: "pd1".into() },
        ErrorCode::Conflict,
        "SDS (sds1, sds2, sds3)",
    );
}

#[test]
fn a_pool_goes_only_without_volumes_and_devices() {
    let mut s = cluster();
    cmd(&mut s, volume("v1", 1 << 30, true)).expect("vol");
    let pool = || Command::RemoveStoragePool { name: "sp1".into() };
    must_refuse(&mut s, pool(), ErrorCode::Conflict, "1 volume(s) (v1)");
    cmd(
        &mut s,
        Command::RemoveVolume {
            name: "v1".into(),
            mode: Default::default(),
        },
    )
    .expect("remove volume");
    must_refuse(&mut s, pool(), ErrorCode::Conflict, "sds1:/d");
    for n in ["sds1", "sds2", "sds3"] {
        cmd(&mut s, Command::RemoveSds { name: n.into() }).expect("sds");
    }
    cmd(&mut s, pool()).expect("removed");
    assert!(s.pools.is_empty());
}

#[test]
fn a_fault_set_goes_only_without_sds() {
    let mut s = cluster();
    cmd(
        &mut s,
        Command::AddFaultSet {
            pd: "pd1".into(),
            name: "fs1".into(),
        },
    )
    .expect("fault set");
    cmd(
        &mut s,
        Command::AddSds {
            name: "sds4".into(),
            addr: "127.0.0.1:7004".into(),
            pd: "pd1".into(),
            fault_set: Some("fs1".into()),
            devices: vec![NewDevice {
                path: "/d".into(),
                pool: "sp1".into(),
                capacity_bytes: Some(100 << 30),
            }],
        },
    )
    .expect("sds4");
    let fs = || Command::RemoveFaultSet {
        pd: "pd1".into(),
        name: "fs1".into(),
    };
    must_refuse(&mut s, fs(), ErrorCode::Conflict, "SDS (sds4)");
    must_refuse(
        &mut s,
        Command::RemoveFaultSet {
            pd: "pd1".into(),
            name: "fs9".into(),
        },
        ErrorCode::NotFound,
        "fs9",
    );
    cmd(
        &mut s,
        Command::RemoveSds {
            name: "sds4".into(),
        },
    )
    .expect("sds4 gone");
    cmd(&mut s, fs()).expect("removed");
    assert!(s.fault_sets.is_empty());
}

#[test]
fn an_sdc_goes_only_once_unmapped_and_comes_back_when_it_registers() {
    let mut s = cluster();
    let a = register(&mut s, "g-a", "a");
    cmd(&mut s, volume("v", 1 << 30, true)).expect("vol");
    cmd(
        &mut s,
        Command::MapVolumeToSdc {
            volume: "v".into(),
            sdc: SdcSelector::Id(a),
            allow_multi_map: false,
            takeover: false,
        },
    )
    .expect("map by id");
    let remove = || Command::RemoveSdc {
        sdc: SdcSelector::Id(a),
    };
    must_refuse(&mut s, remove(), ErrorCode::Conflict, "mapped to it (v)");
    must_refuse(
        &mut s,
        Command::RemoveSdc {
            sdc: SdcSelector::Id(SdcId(12345)),
        },
        ErrorCode::NotFound,
        "SDC",
    );
    cmd(
        &mut s,
        Command::UnmapVolumeFromSdc {
            volume: "v".into(),
            sdc: Some(SdcSelector::Name("a".into())),
        },
    )
    .expect("unmap");
    cmd(&mut s, remove()).expect("removed");
    assert!(s.sdcs.is_empty());
    let again = register(&mut s, "g-a", "a");
    assert_ne!(again, a, "it comes back as a new SDC");
}

#[test]
fn the_last_administrator_stays() {
    let mut s = cluster();
    let user = |name: &str, role| Op::AddUser {
        user: User {
            name: name.into(),
            role,
            salt: "s".into(),
            password_sha256: "h".into(),
        },
    };
    let remove = |n: &str| Command::RemoveUser { name: n.into() };
    let v = s.version + 1;
    apply(&mut s, &user("mon", Role::Monitor), v).expect("mon");
    must_refuse(
        &mut s,
        remove("admin"),
        ErrorCode::Conflict,
        "last Administrator",
    );
    must_refuse(&mut s, remove("nobody"), ErrorCode::NotFound, "nobody");
    cmd(&mut s, remove("mon")).expect("a Monitor goes");
    let v = s.version + 1;
    apply(&mut s, &user("admin2", Role::Administrator), v).expect("admin2");
    cmd(&mut s, remove("admin")).expect("not the last one now");
    assert_eq!(s.users.keys().collect::<Vec<_>>(), ["admin2"]);
}

#[test]
fn a_renamed_sds_keeps_its_certificate_identity() {
    let mut s = cluster();
    let id = sds_id(&s, "sds1");
    let rename = |from: &str, to: &str| Command::RenameSds {
        name: from.into(),
        new_name: to.into(),
    };
    cmd(&mut s, rename("sds1", "rack1-a")).expect("renamed");
    let x = &s.sds[&id];
    assert_eq!((x.name.as_str(), x.cert_name()), ("rack1-a", "sds1"));
    assert_eq!(s.sds_by_cert_name("sds1").map(|x| x.id), Some(id));
    assert!(s.sds_by_name("sds1").is_none());
    // Neither another SDS's name nor another's certificate name may be taken.
    must_refuse(
        &mut s,
        rename("sds2", "rack1-a"),
        ErrorCode::AlreadyExists,
        "rack1-a",
    );
    must_refuse(
        &mut s,
        rename("sds2", "sds1"),
        ErrorCode::AlreadyExists,
        "sds1",
    );
    must_refuse(
        &mut s,
        rename("sds2", "bad name"),
        ErrorCode::BadRequest,
        "Invalid",
    );
    must_refuse(&mut s, rename("nope", "x"), ErrorCode::NotFound, "nope");
    // Nor may a new SDS be added under the certificate name a renamed one keeps.
    let before = s.clone();
    let e = cmd(
        &mut s,
        Command::AddSds {
            name: "sds1".into(),
            addr: "127.0.0.1:7009".into(),
            pd: "pd1".into(),
            fault_set: None,
            devices: vec![],
        },
    )
    .expect_err("taken by a certificate");
    assert_eq!(e.code, ErrorCode::AlreadyExists, "{e}");
    assert_eq!(s, before);
    // Renamed twice, and back: the certificate name stays, then the two agree again.
    cmd(&mut s, rename("rack1-a", "rack1-b")).expect("again");
    assert_eq!(s.sds[&id].cert_name(), "sds1");
    cmd(&mut s, rename("rack1-b", "sds1")).expect("back");
    assert_eq!(s.sds[&id].cert_name, None);
    // A map written before renames existed reads back with no certificate name.
    let mut j = serde_json::to_value(&s.sds[&id]).expect("json");
    assert!(j.get("cert_name").is_none());
    j["name"] = "old".into();
    let old: Sds = serde_json::from_value(j).expect("old map");
    assert_eq!(old.cert_name(), "old");
}

#[test]
fn a_renamed_sdc_keeps_its_name_when_it_registers_again() {
    let mut s = cluster();
    let a = register(&mut s, "g-a", "host-a");
    register(&mut s, "g-b", "host-b");
    let rename = |sel: SdcSelector, to: &str| Command::RenameSdc {
        sdc: sel,
        new_name: to.into(),
    };
    cmd(&mut s, rename(SdcSelector::Id(a), "db1")).expect("renamed");
    assert_eq!(
        (s.sdcs[&a].name.as_str(), s.sdcs[&a].cert_name()),
        ("db1", "host-a")
    );
    must_refuse(
        &mut s,
        rename(SdcSelector::Name("host-b".into()), "host-a"),
        ErrorCode::AlreadyExists,
        "host-a",
    );
    // The same host registering again (same certificate) keeps the operator's name.
    assert_eq!(register(&mut s, "g-a", "host-a"), a);
    assert_eq!(s.sdcs[&a].name, "db1");
    // A host registering under a new certificate name takes that name.
    register(&mut s, "g-a", "host-a2");
    assert_eq!(
        (s.sdcs[&a].name.as_str(), s.sdcs[&a].cert_name()),
        ("host-a2", "host-a2")
    );
}

#[test]
fn an_aborted_removal_keeps_the_sds() {
    let mut s = cluster();
    cmd(&mut s, volume("a", 1 << 30, true)).expect("vol");
    let abort = || Command::AbortRemoveSds {
        name: "sds1".into(),
    };
    must_refuse(&mut s, abort(), ErrorCode::Conflict, "not being removed");
    cmd(
        &mut s,
        Command::RemoveSds {
            name: "sds1".into(),
        },
    )
    .expect("marked");
    assert!(s.sds_by_name("sds1").expect("sds1").removing);
    let pgs = s.pool_by_name("sp1").expect("pool").pgs.clone();
    cmd(&mut s, abort()).expect("aborted");
    assert!(!s.sds_by_name("sds1").expect("sds1").removing);
    // Its copies stayed where they were.
    assert_eq!(s.pool_by_name("sp1").expect("pool").pgs, pgs);
    must_refuse(&mut s, abort(), ErrorCode::Conflict, "not being removed");
}
