//! The NBD server under raw protocol traffic: handshake and transmission garbage, error codes,
//! structured replies, block status, read-only exports, out-of-order replies and export
//! removal. Every test ends by checking that a fresh client is still served and data is intact.

mod nbd_support;

use nbd_support::mem::MemBackend;
use nbd_support::*;
use std::io::Read;
use std::time::Duration;

const SIZE: u64 = 16 << 20;

/// A fresh client reads back `expect` at offset 0.
fn must_still_serve(server: &Server, name: &str, expect: &[u8]) {
    let mut c = Raw::connect(server);
    c.go(name, false, false);
    c.request(0, CMD_READ, 77, 0, expect.len() as u32);
    let (error, cookie, data) = c.simple_reply(expect.len());
    assert_eq!((error, cookie), (0, 77));
    assert!(data == expect, "data changed");
    c.request(0, CMD_DISC, 78, 0, 0);
    assert!(c.closed_by_server());
    server.must_not_have_panicked();
}

#[test]
fn handshake_garbage_is_refused_and_the_server_keeps_serving() {
    let server = Server::start("handshake-garbage");
    let disk = server.add("disk", MemBackend::new(SIZE));
    let pattern = random_bytes(64 << 10, 1);
    disk.fill(0, &pattern);

    // Not NBD at all.
    let mut c = Raw::connect(&server);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxx");
    assert!(c.closed_by_server());
    // Truncated client flags.
    let mut c = Raw::connect(&server);
    c.send(&[0, 0]);
    drop(c);
    // Unknown client flags: the specification says to drop the connection.
    let mut c = Raw::connect(&server);
    c.hello(0x80 | 3);
    assert!(c.closed_by_server());
    // Bad option magic.
    let mut c = Raw::connect(&server);
    c.hello(3);
    c.send(&[0xde; 16]);
    assert!(c.closed_by_server());
    // Truncated option header, then hang up.
    let mut c = Raw::connect(&server);
    c.hello(3);
    c.send(&IHAVEOPT.to_be_bytes());
    drop(c);

    // Errors that keep the session in sync.
    let mut c = Raw::connect(&server);
    c.hello(3);
    for option in [0, 4, 5, 11, 99, 0xffff_ffff] {
        c.option(option, b"some data the server must skip");
        let (got, kind, _) = c.option_reply();
        assert_eq!((got, kind), (option, REP_ERR_UNSUP), "option {option}");
    }
    c.option(OPT_GO, &[0, 0, 0, 200, b'd']);
    assert_eq!(
        c.option_reply().1,
        REP_ERR_INVALID,
        "name longer than the option"
    );
    c.option(OPT_GO, &info_query("nope", &[]));
    assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
    c.option(OPT_INFO, &info_query("disk", &[1, 2, 3, 999]));
    let replies = c.option_replies();
    assert_eq!(replies.last().map(|r| r.1), Some(REP_ACK), "{replies:?}");
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_query("disk", &["base:allocation"]),
    );
    assert_eq!(
        c.option_reply().1,
        REP_ERR_INVALID,
        "needs structured replies"
    );
    // Oversized but skippable: refused, still in sync.
    c.option(OPT_GO, &vec![0u8; 200 << 10]);
    assert_eq!(c.option_reply().1, REP_ERR_TOO_BIG);
    c.option(OPT_LIST, &[]);
    let replies = c.option_replies();
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0].1, REP_SERVER);
    assert_eq!(replies[0].2, b"\0\0\0\x04disk");
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    assert!(c.closed_by_server());

    // Too large to skip: closed.
    let mut c = Raw::connect(&server);
    c.hello(3);
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend(OPT_INFO.to_be_bytes());
    o.extend(u32::MAX.to_be_bytes());
    c.send(&o);
    assert!(c.closed_by_server());
    // EXPORT_NAME of an unknown export cannot be answered: closed.
    let mut c = Raw::connect(&server);
    c.hello(3);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed_by_server());

    // EXPORT_NAME of a known export, honouring NO_ZEROES.
    let mut c = Raw::connect(&server);
    c.hello(3);
    c.option(OPT_EXPORT_NAME, b"disk");
    let mut reply = [0u8; 10];
    c.s.read_exact(&mut reply).expect("export reply");
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().expect("8")), SIZE);
    c.request(0, CMD_READ, 5, 0, 16);
    let (error, cookie, data) = c.simple_reply(16);
    assert_eq!(
        (error, cookie),
        (0, 5),
        "no padding was sent before the reply"
    );
    assert_eq!(data, pattern[..16]);

    must_still_serve(&server, "disk", &pattern);
}

#[test]
fn transmission_errors_follow_the_specification() {
    let server = Server::start("transmission-errors");
    let disk = server.add("disk", MemBackend::new(SIZE));
    let pattern = random_bytes(64 << 10, 2);
    disk.fill(0, &pattern);

    let mut c = Raw::connect(&server);
    let (size, _) = c.go("disk", false, false);
    assert_eq!(size, SIZE);
    c.request(0, CMD_READ, 1, SIZE, 1);
    assert_eq!(c.simple_error(1), EINVAL, "read past the end");
    c.request(0, CMD_READ, 2, u64::MAX - 10, 4096);
    assert_eq!(c.simple_error(2), EINVAL, "offset overflow");
    c.request(0, CMD_READ, 3, 0, 64 << 20);
    assert_eq!(c.simple_error(3), EINVAL, "read over the maximum payload");
    c.request(0, 42, 4, 0, 0);
    assert_eq!(c.simple_error(4), EINVAL, "unknown command");
    c.request(1 << 9, CMD_READ, 5, 0, 512);
    assert_eq!(c.simple_error(5), EINVAL, "unknown flag");
    c.request(FLAG_DF, CMD_READ, 6, 0, 512);
    assert_eq!(c.simple_error(6), EINVAL, "DF without structured replies");
    c.request(0, CMD_BLOCK_STATUS, 7, 0, 512);
    assert_eq!(c.simple_error(7), EINVAL, "block status without a context");
    c.request(0, CMD_TRIM, 8, SIZE - 512, 1024);
    assert_eq!(c.simple_error(8), EINVAL, "trim past the end");
    c.request(0, CMD_WRITE_ZEROES, 9, SIZE, 512);
    assert_eq!(c.simple_error(9), ENOSPC, "zeroes past the end");
    // A write past the end: ENOSPC, and its payload is consumed.
    c.write(10, SIZE - 512, &[0xff; 4096]);
    assert_eq!(c.simple_error(10), ENOSPC);
    // A write over the maximum payload: EINVAL, and its payload is skipped.
    let mut big = request(0, CMD_WRITE, 11, 0, (32 << 20) + 1);
    big.resize(big.len() + (32 << 20) + 1, 0xee);
    c.send(&big);
    assert_eq!(c.simple_error(11), EINVAL);
    // A write with a bad flag: EINVAL, payload consumed.
    let mut bad = request(FLAG_NO_HOLE, CMD_WRITE, 12, 0, 512);
    bad.extend([0xdd; 512]);
    c.send(&bad);
    assert_eq!(c.simple_error(12), EINVAL);
    // Zero-length requests succeed without effect.
    c.request(0, CMD_READ, 13, 0, 0);
    assert_eq!(c.simple_reply(0), (0, 13, vec![]));
    c.request(0, CMD_WRITE, 14, 0, 0);
    assert_eq!(c.simple_error(14), 0);
    c.request(0, CMD_TRIM, 15, 0, 0);
    assert_eq!(c.simple_error(15), 0);
    // Cache and flush (FUA tolerated on both).
    c.request(FLAG_FUA, CMD_CACHE, 16, 0, 4096);
    assert_eq!(c.simple_error(16), 0);
    c.request(FLAG_FUA, CMD_FLUSH, 17, 0, 0);
    assert_eq!(c.simple_error(17), 0);
    assert!(disk.flushes() >= 1);
    // Still in sync: the data is what it was.
    c.request(0, CMD_READ, 18, 0, pattern.len() as u32);
    let (error, cookie, data) = c.simple_reply(pattern.len());
    assert_eq!((error, cookie), (0, 18));
    assert!(data == pattern, "rejected writes changed data");
    // Bad magic: the connection is closed.
    c.send(b"\xde\xad\xbe\xefgarbage-garbage-garbage-garbage");
    assert!(c.closed_by_server());
    // A write whose payload would be too large to skip: closed.
    let mut c = Raw::connect(&server);
    c.go("disk", false, false);
    c.request(0, CMD_WRITE, 19, 0, u32::MAX);
    assert!(c.closed_by_server());
    // Truncated request header, then hang up.
    let mut c = Raw::connect(&server);
    c.go("disk", false, false);
    c.send(&request(0, CMD_READ, 20, 0, 512)[..13]);
    drop(c);

    must_still_serve(&server, "disk", &pattern);
}

#[test]
fn structured_replies_and_block_status() {
    let server = Server::start("structured");
    let disk = server.add("disk", MemBackend::new(SIZE));
    disk.fill(8192, &[0x11; 8192]);

    let mut c = Raw::connect(&server);
    let (_, flags) = c.go("disk", true, true);
    assert_ne!(flags & (1 << 7), 0, "SEND_DF with structured replies");
    // A read: one OFFSET_DATA chunk, marked done.
    c.request(FLAG_DF, CMD_READ, 1, 8192, 4096);
    let chunk = c.chunk();
    assert_eq!(
        (chunk.cookie, chunk.kind, chunk.flags),
        (1, REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(chunk.payload[..8], 8192u64.to_be_bytes());
    assert_eq!(chunk.payload[8..], [0x11; 4096]);
    // A zero-length read: a NONE chunk, never a simple reply.
    c.request(0, CMD_READ, 2, 0, 0);
    let chunk = c.chunk();
    assert_eq!(
        (chunk.cookie, chunk.kind, chunk.flags),
        (2, REPLY_TYPE_NONE, 1)
    );
    // Errors are ERROR chunks with a message.
    c.request(0, CMD_READ, 3, SIZE, 512);
    let chunk = c.chunk();
    assert_eq!((chunk.cookie, chunk.error()), (3, EINVAL));
    assert!(chunk.payload.len() > 6, "an error message for humans");
    // Block status: hole, data, hole.
    c.request(0, CMD_BLOCK_STATUS, 4, 0, 32768);
    let chunk = c.chunk();
    assert_eq!((chunk.cookie, chunk.flags), (4, 1));
    assert_eq!(
        chunk.payload[..4],
        1u32.to_be_bytes(),
        "context id from SET"
    );
    assert_eq!(descriptors(&chunk), [(8192, 3), (8192, 0), (16384, 3)]);
    // REQ_ONE: exactly one descriptor, no longer than asked.
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 4096, 100);
    assert_eq!(descriptors(&c.chunk()), [(100, 3)]);
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 6, 8192, 1 << 20);
    assert_eq!(descriptors(&c.chunk()), [(8192, 0)]);
    c.request(0, CMD_BLOCK_STATUS, 7, SIZE - 512, 1024);
    assert_eq!(c.chunk().error(), EINVAL, "block status past the end");
    // Write zeroes: punch a hole, or allocate with NO_HOLE; FAST_ZERO is fast here.
    c.request(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 8, 8192, 4096);
    assert_eq!(c.any_reply().kind, REPLY_TYPE_NONE);
    c.request(FLAG_NO_HOLE | FLAG_FUA, CMD_WRITE_ZEROES, 9, 0, 4096);
    assert_eq!(c.any_reply().kind, REPLY_TYPE_NONE);
    c.request(0, CMD_BLOCK_STATUS, 10, 0, 16384);
    // Block 0 allocated by NO_HOLE, blocks 1-2 holes, block 3 data.
    assert_eq!(descriptors(&c.chunk()), [(4096, 0), (8192, 3), (4096, 0)]);
    c.request(0, CMD_READ, 11, 8192, 8192);
    let chunk = c.chunk();
    assert_eq!(chunk.payload[8..4104], [0; 4096]);
    assert_eq!(chunk.payload[4104..], [0x11; 4096]);
    // Trim drops whole blocks.
    c.request(0, CMD_TRIM, 12, 12288, 4096);
    assert_eq!(c.any_reply().kind, REPLY_TYPE_NONE);
    assert_eq!(disk.allocated_blocks(), 1);
    c.request(0, CMD_DISC, 13, 0, 0);
    assert!(c.closed_by_server());

    must_still_serve(&server, "disk", &[0; 4096]);
}

#[test]
fn read_only_exports_refuse_writes() {
    let server = Server::start("read-only");
    let ro = MemBackend::new(SIZE).read_only();
    ro.fill(0, &[0x42; 4096]);
    server.add("ro", ro);

    let mut c = Raw::connect(&server);
    let (_, flags) = c.go("ro", false, false);
    assert_ne!(flags & TF_READ_ONLY, 0);
    c.write(1, 0, &[0; 4096]);
    assert_eq!(c.simple_error(1), EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(c.simple_error(2), EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(c.simple_error(3), EPERM);
    c.request(0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(c.simple_error(4), 0);
    must_still_serve(&server, "ro", &[0x42; 4096]);
}

#[test]
fn backend_errors_and_slow_zeroes_reach_the_client() {
    let server = Server::start("backend-errors");
    let disk = server.add("disk", MemBackend::new(SIZE).slow_zero());
    disk.fill(0, &[0x33; 8192]);
    disk.fail_reads_at(4096);

    let mut c = Raw::connect(&server);
    c.go("disk", false, false);
    c.request(0, CMD_READ, 1, 4096, 4096);
    assert_eq!(
        c.simple_error(1),
        EIO,
        "no data follows a failed simple read"
    );
    c.request(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 2, 0, 4096);
    assert_eq!(c.simple_error(2), ENOTSUP, "zeroing is not fast here");
    c.request(0, CMD_WRITE_ZEROES, 3, 8192, 4096);
    assert_eq!(c.simple_error(3), 0, "without FAST_ZERO it is done anyway");
    let mut c = Raw::connect(&server);
    c.go("disk", true, false);
    c.request(0, CMD_READ, 4, 4096, 4096);
    let chunk = c.chunk();
    assert_eq!((chunk.cookie, chunk.error()), (4, EIO));
    must_still_serve(&server, "disk", &[0x33; 4096]);
}

#[test]
fn replies_come_out_of_order() {
    let server = Server::start("out-of-order");
    let disk = server.add("disk", MemBackend::new(SIZE));
    disk.fill(0, &[1; 4096]);
    disk.fill(1 << 20, &[2; 4096]);
    let gate = disk.gate_reads_at(0);

    let mut c = Raw::connect(&server);
    c.go("disk", false, false);
    c.request(0, CMD_READ, 100, 0, 4096);
    c.request(0, CMD_READ, 200, 1 << 20, 4096);
    c.write(300, 2 << 20, &[3; 4096]);
    // The first read is held by the backend; the others are answered first.
    let mut answered = Vec::new();
    for _ in 0..2 {
        let mut h = [0u8; 16];
        c.s.read_exact(&mut h).expect("reply");
        let cookie = u64::from_be_bytes(h[8..].try_into().expect("8"));
        if cookie == 200 {
            let mut data = vec![0u8; 4096];
            c.s.read_exact(&mut data).expect("data");
            assert_eq!(data, [2; 4096]);
        }
        answered.push(cookie);
    }
    answered.sort_unstable();
    assert_eq!(answered, [200, 300]);
    gate.add_permits(1);
    let (error, cookie, data) = c.simple_reply(4096);
    assert_eq!((error, cookie), (0, 100));
    assert_eq!(data, [1; 4096]);
    server.must_not_have_panicked();
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let server = Server::start("pipelined");
    let disk = server.add("disk", MemBackend::new(SIZE));
    let mut c = Raw::connect(&server);
    c.go("disk", true, false);
    // Far more than the per-connection bound, written before reading any reply.
    let count = 1000u64;
    let mut batch = Vec::new();
    for i in 0..count {
        batch.extend(request(0, CMD_WRITE, i, i * 4096, 4096));
        batch.extend(vec![(i % 251) as u8; 4096]);
    }
    let mut s = c.s.try_clone().expect("clone socket");
    let sender = std::thread::spawn(move || std::io::Write::write_all(&mut s, &batch));
    let mut seen = vec![false; count as usize];
    for _ in 0..count {
        let reply = c.any_reply();
        assert_eq!(reply.kind, REPLY_TYPE_NONE, "{reply:?}");
        assert!(!std::mem::replace(&mut seen[reply.cookie as usize], true));
    }
    sender.join().expect("sender").expect("send batch");
    let contents = disk.contents();
    for i in 0..count as usize {
        assert!(contents[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == (i % 251) as u8));
    }
    server.must_not_have_panicked();
}

#[test]
fn removing_an_export_closes_its_connections_after_in_flight_requests() {
    let server = Server::start("remove");
    let disk = server.add("disk", MemBackend::new(SIZE));
    server.add("other", MemBackend::new(SIZE));
    disk.fill(0, &[9; 4096]);
    let gate = disk.gate_reads_at(0);

    let mut idle = Raw::connect(&server);
    idle.go("disk", false, false);
    let mut busy = Raw::connect(&server);
    busy.go("disk", true, false);
    let mut bystander = Raw::connect(&server);
    bystander.go("other", false, false);
    wait_for(
        "both connections to be in transmission",
        Duration::from_secs(10),
        || server.registry.connections("disk") == 2,
    );
    busy.request(0, CMD_READ, 1, 0, 4096);
    wait_for(
        "the read to reach the backend",
        Duration::from_secs(10),
        || disk.reads_started() == 1,
    );
    assert!(server.registry.remove("disk"));
    assert!(!server.registry.contains("disk"));
    assert!(idle.closed_by_server(), "idle connection closed");
    gate.add_permits(1);
    let chunk = busy.chunk();
    assert_eq!(
        (chunk.cookie, chunk.kind),
        (1, REPLY_TYPE_OFFSET_DATA),
        "in-flight read answered"
    );
    assert_eq!(chunk.payload[8..], [9; 4096]);
    assert!(busy.closed_by_server(), "then closed");
    // New clients no longer find it; other exports are untouched.
    let mut c = Raw::connect(&server);
    c.hello(3);
    c.option(OPT_GO, &info_query("disk", &[]));
    assert_eq!(c.option_reply().1, REP_ERR_UNKNOWN);
    bystander.request(0, CMD_READ, 2, 0, 512);
    assert_eq!(bystander.simple_reply(512).0, 0);
    server.must_not_have_panicked();
}

#[test]
fn random_garbage_never_breaks_the_server() {
    use rand::{Rng, SeedableRng};
    let server = Server::start("fuzz");
    let disk = server.add("disk", MemBackend::new(1 << 20));
    let pattern = random_bytes(4096, 3);
    disk.fill(0, &pattern);
    let ro = server.add("ro", MemBackend::new(1 << 20).read_only());
    let seed = 0x5eed_u64;
    println!("seed {seed:#x}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..300 {
        let mut c = Raw::connect(&server);
        let mut junk = vec![0u8; rng.gen_range(0..200)];
        rng.fill(&mut junk[..]);
        if round % 3 == 0 {
            // Garbage during the handshake.
            c.hello(3);
            c.try_send(&junk);
        } else {
            // Valid-looking requests with random fields on the read-only export (so the data
            // of "disk" is safe), then garbage.
            c.go("ro", round % 3 == 2, false);
            for _ in 0..4 {
                let flags: u16 = rng.gen::<u16>() & 0x3f;
                let command: u16 = rng.gen_range(0..10);
                let len: u32 = rng.gen_range(0..1 << 21);
                let offset: u64 = if rng.gen() {
                    rng.gen_range(0..2 << 20)
                } else {
                    rng.gen()
                };
                let mut r = request(flags, command, 9, offset, len);
                if command == CMD_WRITE {
                    r.resize(r.len() + len as usize, 0);
                }
                c.try_send(&r);
            }
            c.try_send(&junk);
        }
        drop(c);
    }
    assert!(ro.contents().iter().all(|&b| b == 0));
    must_still_serve(&server, "disk", &pattern);
}
