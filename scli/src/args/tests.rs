//! Argument parsing and command building, without an MDM.

use super::values::parse_gb;
use super::*;
use proto::msg::Command;

fn parse(v: &[&str]) -> Args {
    Args::try_parse_from(std::iter::once("scli").chain(v.iter().copied())).expect("parse")
}

#[test]
fn commands_need_their_options() {
    let a = parse(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--volume_name",
        "v",
    ]);
    assert!(a
        .command("--add_volume")
        .expect_err("size missing")
        .to_string()
        .contains("--size_gb"));
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
    assert!(parse(&["--map_volume_to_sdc", "--volume_name", "v"])
        .command("--map_volume_to_sdc")
        .is_err());
    assert!(
        parse(&["--add_user", "--username", "u", "--user_role", "King"])
            .command("--add_user")
            .is_err()
    );
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
    assert!(parse_gb("abc", "--size_gb").is_err());
    assert!(parse_gb("-1", "--size_gb").is_err());
    assert!(parse_gb("0", "--size_gb").is_err());
    assert_eq!(parse_gb("8", "--size_gb").expect("8"), 8 << 30);
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
    let a = parse(&["--query_all", "--query_cluster"]);
    assert_eq!(a.commands().len(), 2);
    assert!(parse(&[]).commands().is_empty());
}
