//! The NBD server driven by real clients: nbdinfo, qemu-img, qemu-io, nbdcopy and fio's nbd
//! engine, over a unix socket (and TCP once). A test whose client is not installed is skipped
//! with a message.

mod nbd_support;

use nbd_support::mem::MemBackend;
use nbd_support::*;

const SIZE: u64 = 64 << 20;
const IMAGE_LEN: usize = 16 << 20;

#[test]
fn nbdinfo_reports_size_flags_and_allocation() {
    if !have("nbdinfo", &["nbdinfo"]) {
        return;
    }
    let server = Server::start("nbdinfo");
    let disk = server.add("disk", MemBackend::new(SIZE));
    server.add("ro", MemBackend::new(1 << 20).read_only());
    disk.fill(1 << 20, &[0x5a; 1 << 20]);

    let json = must("nbdinfo", &["--json", &server.uri("disk")]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --json");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["export-size"], SIZE);
    assert_eq!(e["description"], "in-memory sparse test disk");
    for flag in [
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_fua",
        "can_flush",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} in {json}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    assert_eq!(e["block_size_minimum"], 1, "{json}");
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);

    let map = must("nbdinfo", &["--map", &server.uri("disk")]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{map}");
    assert_eq!(rows[0][..3], ["0", "1048576", "3"], "{map}");
    assert_eq!(rows[1][..3], ["1048576", "1048576", "0"], "{map}");
    assert_eq!(
        rows[2][..3],
        ["2097152", &(SIZE - (2 << 20)).to_string(), "3"],
        "{map}"
    );

    let list = must("nbdinfo", &["--list", "--json", &server.uri("")]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --list --json");
    let names: Vec<&str> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["disk", "ro"]);

    let json = must("nbdinfo", &["--json", &server.uri("ro")]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --json");
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);

    let missing = run(
        "nbdinfo",
        &[&server.uri("nope")],
        std::time::Duration::from_secs(30),
    );
    assert!(!missing.ok, "an unknown export is refused");
    server.must_not_have_panicked();
}

#[test]
fn qemu_img_converts_in_and_out() {
    if !have("qemu-img", &["qemu-img"]) {
        return;
    }
    let server = Server::start("qemu-img");
    let disk = server.add("disk", MemBackend::new(IMAGE_LEN as u64));
    let image = random_bytes(IMAGE_LEN, 10);
    let src = write_file(&server.path("src.img"), &image);
    let out = server.path("out.img").display().to_string();
    let uri = server.uri("disk");

    must(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &src, &uri],
    );
    assert!(disk.contents() == image, "export differs from the source");
    must(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &out],
    );
    must(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &src, &out],
    );
    must(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &src, &uri],
    );
    server.must_not_have_panicked();
}

#[test]
fn nbdcopy_both_ways() {
    if !have("nbdcopy", &["nbdcopy"]) {
        return;
    }
    let server = Server::start("nbdcopy");
    let disk = server.add("disk", MemBackend::new(IMAGE_LEN as u64));
    let mut image = random_bytes(IMAGE_LEN, 11);
    // A zero region, so nbdcopy has a hole to skip or zero.
    image[4 << 20..8 << 20].fill(0);
    let src = write_file(&server.path("src.img"), &image);
    let out = server.path("out.img");
    let uri = server.uri("disk");

    must("nbdcopy", &["--flush", &src, &uri]);
    assert!(disk.contents() == image, "export differs from the source");
    must("nbdcopy", &[&uri, &out.display().to_string()]);
    assert!(
        std::fs::read(&out).expect("read copy") == image,
        "copy differs"
    );
    server.must_not_have_panicked();
}

#[test]
fn qemu_io_writes_zeroes_discards_flushes_and_reads() {
    if !have("qemu-io", &["qemu-io"]) {
        return;
    }
    let server = Server::start("qemu-io");
    let disk = server.add("disk", MemBackend::new(SIZE));
    let uri = server.uri("disk");
    let mut args = vec!["-f", "raw", &uri, "-c", "write -P 0xab 0 64k"];
    // Pipelined writes, answered as they complete.
    let aio: Vec<String> = (0..16)
        .map(|i| format!("aio_write -P 0xcd {} 64k", (1 << 20) + i * (64 << 10)))
        .collect();
    for a in &aio {
        args.extend(["-c", a]);
    }
    args.extend([
        "-c",
        "aio_flush",
        "-c",
        "write -P 0xee 4M 256k",
        "-c",
        "write -z 4M 64k",
        "-c",
        "write -z -u 4259840 64k",
        "-c",
        "discard 4325376 128k",
        "-c",
        "write -P 0x11 1000 3000",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 0 1000",
        "-c",
        "read -P 0x11 1000 3000",
        "-c",
        "read -P 0xab 4000 61536",
        "-c",
        "read -P 0xcd 1M 1M",
        "-c",
        "read -P 0 4M 128k",
        "-c",
        "read -P 0 64k 960k",
    ]);
    let out = must("qemu-io", &args);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error") && !out.contains("Parsing"), "{out}");
    let contents = disk.contents();
    assert!(contents[1 << 20..2 << 20].iter().all(|&b| b == 0xcd));
    assert!(contents[4 << 20..(4 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0));
    assert!(disk.flushes() >= 2);
    server.must_not_have_panicked();
}

#[test]
fn fio_random_writes_verify() {
    if !have("fio", &["fio"]) {
        return;
    }
    let server = Server::start("fio");
    server.add("disk", MemBackend::new(SIZE));
    let uri = format!("--uri={}", server.uri("disk"));
    let out = must(
        "fio",
        &[
            "--name=nbd-randwrite",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16m",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=json",
        ],
    );
    let json = out.get(out.find('{').unwrap_or(0)..).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert_eq!(job["write"]["io_bytes"], 16 << 20, "{out}");
    assert_eq!(
        job["read"]["io_bytes"],
        16 << 20,
        "verify read everything back: {out}"
    );
    server.must_not_have_panicked();
}

#[test]
fn tcp_serves_the_same_exports() {
    if !have("tcp", &["nbdinfo", "qemu-io"]) {
        return;
    }
    let server = Server::start("tcp");
    let disk = server.add("disk", MemBackend::new(SIZE));
    let addr = server.listen_tcp();
    let uri = format!("nbd://{addr}/disk");
    let size = must("nbdinfo", &["--size", &uri]);
    assert_eq!(size.trim(), SIZE.to_string());
    let out = must(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x77 0 1M",
            "-c",
            "read -P 0x77 0 1M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(disk.contents()[..1 << 20].iter().all(|&b| b == 0x77));
    server.must_not_have_panicked();
}
