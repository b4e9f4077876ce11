//! Argument parsing and command building, without an MDM.

use super::values::parse_gb_arg;
use super::*;
use proto::msg::Command;

fn parse(v: &[&str]) -> Args {
    try_parse_from(std::iter::once("scli").chain(v.iter().copied())).expect("parse")
}

/// clap's refusal of a command line: its kind, and the text of its message.
fn must_not_parse(v: &[&str]) -> (clap::error::ErrorKind, String) {
    let e = try_parse_from(std::iter::once("scli").chain(v.iter().copied()))
        .expect_err("refused by clap");
    assert_eq!(e.exit_code(), 2, "{e}");
    (e.kind(), e.to_string())
}

#[test]
fn commands_need_their_options() {
    let (_, e) = must_not_parse(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--volume_name",
        "v",
    ]);
    assert!(e.contains("--size_gb"), "{e}");
    let a = parse(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--volume_name",
        "v",
        "--size_gb",
        "0.5",
    ]);
    match a.command("--add_volume").expect("ok") {
        Some(Command::AddVolume {
            size_bytes, thin, ..
        }) => assert_eq!((size_bytes, thin), (512 << 20, true)),
        other => panic!("{other:?}"),
    }
    let (_, e) = must_not_parse(&["--map_volume_to_sdc", "--volume_name", "v"]);
    assert!(e.contains("--sdc_name"), "{e}");
    let (_, e) = must_not_parse(&["--add_user", "--username", "u", "--user_role", "King"]);
    assert!(e.contains("King"), "{e}");
    let (_, e) = must_not_parse(&["--rename_sds", "--sds_name", "a"]);
    assert!(e.contains("--new_name"), "{e}");
}

#[test]
fn clap_checks_values_and_combinations() {
    use clap::error::ErrorKind;
    for (args, kind) in [
        (
            &["--query_all", "--query_cluster"][..],
            ErrorKind::ArgumentConflict,
        ),
        (&[][..], ErrorKind::MissingRequiredArgument),
        (
            &["--query_volume", "--volume_name", "v", "--volume_id", "1"][..],
            ErrorKind::ArgumentConflict,
        ),
        (
            &["--query_volume", "--volume_id", "xyz"][..],
            ErrorKind::ValueValidation,
        ),
        (
            &[
                "--modify_volume_capacity",
                "--volume_name",
                "v",
                "--size_gb",
                "0",
            ][..],
            ErrorKind::ValueValidation,
        ),
        (
            &[
                "--set_sdc_volume_limits",
                "--volume_name",
                "v",
                "--sdc_name",
                "h",
                "--limit_iops",
                "lots",
            ][..],
            ErrorKind::ValueValidation,
        ),
        (
            &["--switch_cluster_mode", "--cluster_mode", "2_node"][..],
            ErrorKind::ValueValidation,
        ),
        (
            &["--add_standby_mdm", "--new_mdm_ip", "mdm2"][..],
            ErrorKind::ValueValidation,
        ),
        (
            &[
                "--add_volume",
                "--storage_pool_name",
                "p",
                "--volume_name",
                "v",
                "--size_gb",
                "1",
                "--thin_provisioned",
                "--thick_provisioned",
            ][..],
            ErrorKind::ArgumentConflict,
        ),
        (&["--query_all", "--wait"][..], ErrorKind::ArgumentConflict),
        (
            &["--query_all", "--since", "1h"][..],
            ErrorKind::ArgumentConflict,
        ),
        (&["--query_all", "--watch"][..], ErrorKind::ArgumentConflict),
        (
            &[
                "--add_volume",
                "--storage_pool_name",
                "p",
                "--volume_name",
                "v",
                "--size_gb",
                "1",
                "--takeover",
            ][..],
            ErrorKind::ArgumentConflict,
        ),
        (
            &["--remove_fault_set", "--fault_set_name", "fs1"][..],
            ErrorKind::MissingRequiredArgument,
        ),
        (
            &[
                "--add_storage_pool",
                "--protection_domain_name",
                "pd",
                "--storage_pool_name",
                "p",
                "--media_type",
                "tape",
            ][..],
            ErrorKind::InvalidValue,
        ),
    ] {
        let (k, e) = must_not_parse(args);
        assert_eq!(k, kind, "{args:?}: {e}");
    }
}

#[test]
fn an_option_for_another_command_is_named_in_the_refusal() {
    let (_, e) = must_not_parse(&["--query_all_sds", "--since", "1h"]);
    assert!(
        e.contains("cannot be used with")
            && e.contains("'--since <WHEN>'")
            && e.contains("'--query_all_sds'"),
        "{e}"
    );
    parse(&["--query_events", "--since", "1h"]);
    parse(&[
        "--remove_sds_device",
        "--sds_name",
        "a",
        "--device_path",
        "/d",
        "--wait",
    ]);
}

#[test]
fn ids_parse_as_scli_prints_them() {
    let a = parse(&["--query_sds", "--sds_id", "0x00000000000000ab"]);
    assert_eq!(a.sds_id, Some(0xab));
    let a = parse(&["--query_sds", "--sds_id", "abcd000000000007"]);
    assert_eq!(a.sds_id, Some(0xabcd_0000_0000_0007));
    assert!(a.has_ids());
    let a = parse(&["--remove_sdc", "--sdc_id", "12", "--i_am_sure"]);
    assert!(!a.has_ids(), "the MDM resolves SDC ids");
    match a.command("--remove_sdc").expect("ok") {
        Some(Command::RemoveSdc { sdc }) => {
            assert_eq!(sdc, proto::msg::SdcSelector::Id(proto::SdcId(0x12)))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ids_resolve_to_names_or_are_refused() {
    let mut s = proto::model::ClusterState::default();
    let pd = proto::PdId(0x11);
    s.pds.insert(
        pd,
        proto::model::ProtectionDomain {
            id: pd,
            name: "pd1".into(),
        },
    );
    let fs = proto::FaultSetId(0x22);
    s.fault_sets.insert(
        fs,
        proto::model::FaultSet {
            id: fs,
            name: "fs1".into(),
            pd,
        },
    );
    let mut a = parse(&["--remove_fault_set", "--fault_set_id", "22", "--i_am_sure"]);
    a.resolve_ids(&s).expect("known");
    match a.command("--remove_fault_set").expect("ok") {
        Some(Command::RemoveFaultSet { pd, name }) => {
            assert_eq!((pd.as_str(), name.as_str()), ("pd1", "fs1"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        a.bindings,
        vec![proto::msg::Binding::FaultSet {
            id: fs,
            pd: "pd1".into(),
            name: "fs1".into(),
        }],
        "the lookup travels with the command"
    );
    a.check_bindings(&s).expect("still true");
    s.fault_sets.get_mut(&fs).expect("fs").name = "fs2".into();
    let e = a.check_bindings(&s).expect_err("renamed");
    assert!(e.to_string().contains("was fs1 but is now fs2"), "{e}");
    let mut a = parse(&["--remove_protection_domain", "--protection_domain_id", "99"]);
    let e = a.resolve_ids(&s).expect_err("unknown");
    assert!(
        e.to_string()
            .contains("no protection domain has id 0000000000000099"),
        "{e}"
    );
}

#[test]
fn destructive_commands_need_i_am_sure() {
    let a = parse(&["--remove_volume", "--volume_name", "v"]);
    let e = run::refuse_unconfirmed(&a, "--remove_volume").expect_err("refused");
    assert!(e.to_string().contains("add --i_am_sure"), "{e}");
    let a = parse(&["--remove_volume", "--volume_name", "v", "--i_am_sure"]);
    assert!(run::refuse_unconfirmed(&a, "--remove_volume").is_ok());
    let a = parse(&["--rename_volume", "--volume_name", "v", "--new_name", "w"]);
    assert!(run::refuse_unconfirmed(&a, "--rename_volume").is_ok());
}

#[test]
fn the_docker_label_is_reserved() {
    let add = |label: &str| {
        parse(&[
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--volume_name",
            "v",
            "--size_gb",
            "1",
            "--label",
            label,
        ])
        .command("--add_volume")
    };
    for reserved in ["created-by=docker", "docker-name=x", "docker-name.2=y"] {
        let e = add(reserved).expect_err("reserved");
        assert!(
            e.to_string().contains("reserved for the Docker driver"),
            "{e}"
        );
    }
    assert!(add("owner=ops").is_ok());
}

#[test]
fn sizes_are_validated() {
    assert!(parse_gb_arg("abc").is_err());
    assert!(parse_gb_arg("-1").is_err());
    assert!(parse_gb_arg("0").is_err());
    assert_eq!(parse_gb_arg("8").expect("8"), 8 << 30);
}

#[test]
fn add_user_never_takes_the_password_from_the_environment() {
    std::env::set_var("MESHBLOCK_PASSWORD", "AdminSecret1");
    let a = parse(&["--add_user", "--username", "u", "--user_role", "Monitor"]);
    let e = a.command("--add_user").expect_err("password missing");
    assert!(e.to_string().contains("--password_file"), "{e}");
    std::env::remove_var("MESHBLOCK_PASSWORD");
}

#[test]
fn passwords_come_from_files_never_from_the_command_line() {
    let f = std::env::temp_dir().join(format!("scli-pw-{}", std::process::id()));
    std::fs::write(&f, "NewUser1\n").expect("write");
    let file = f.display().to_string();
    let a = parse(&[
        "--add_user",
        "--username",
        "u",
        "--user_role",
        "Monitor",
        "--password_file",
        &file,
    ]);
    match a.command("--add_user").expect("ok") {
        Some(Command::AddUser { password, .. }) => assert_eq!(password, "NewUser1"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(&f).expect("remove");
    let a = parse(&["--login", "--username", "admin", "--password", "x"]);
    let e = a.refuse_secrets().expect_err("refused");
    assert!(e.to_string().contains("--password_file"), "{e}");
    assert!(
        !e.to_string().contains(" x"),
        "the refusal does not echo the password"
    );
}

#[test]
fn exactly_one_command() {
    assert_eq!(parse(&["--query_all"]).commands(), ["--query_all"]);
}
