//! Bulk data for rebuild and rebalance tests: fill a range of a volume through the SDC's NBD
//! socket with a pattern computed from the byte offset and a seed (so the "recorded image" of
//! gigabytes needs no memory), many 1 MiB writes in flight, then flush; and read it back.

use crate::nbd::Nbd;
use std::collections::HashMap;
use std::io;
use std::path::Path;

/// Bytes per request.
const STEP: u64 = 1 << 20;
/// Requests in flight.
const DEPTH: usize = 16;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

/// The pattern of `[off, off + len)`: every 8-byte word holds its own offset mixed with `seed`.
pub fn pattern(off: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut o = off;
    while out.len() < len {
        let w = (o ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
        out.extend_from_slice(&w.to_le_bytes());
        o += 8;
    }
    out.truncate(len);
    out
}

/// Run requests over `[start, start + bytes)` in 1 MiB steps, `DEPTH` in flight; `check` gets
/// each successful reply's offset and data (reads). Fails on the first error reply.
fn pipeline(
    socket: &Path,
    export: &str,
    start: u64,
    bytes: u64,
    cmd: u16,
    seed: u64,
    mut check: impl FnMut(u64, &[u8]),
) -> io::Result<()> {
    let mut tx = Nbd::connect(socket, export)?;
    let mut rx = tx.try_clone()?;
    let end = start + bytes;
    let mut next = start;
    let mut pending: HashMap<u64, u64> = HashMap::new();
    while next < end || !pending.is_empty() {
        while next < end && pending.len() < DEPTH {
            let len = (end - next).min(STEP);
            let data = if cmd == CMD_WRITE {
                pattern(next, len as usize, seed)
            } else {
                Vec::new()
            };
            tx.send(cmd, next, next, len as u32, &data)?;
            pending.insert(next, len);
            next += len;
        }
        let r = rx.recv(|h| {
            if cmd == CMD_READ {
                pending.get(&h).copied().unwrap_or(0) as usize
            } else {
                0
            }
        })?;
        if r.error != 0 {
            return Err(io::Error::other(format!(
                "request at {} failed with NBD error {}",
                r.handle, r.error
            )));
        }
        pending.remove(&r.handle);
        check(r.handle, &r.data);
    }
    if cmd == CMD_WRITE {
        tx.send(CMD_FLUSH, u64::MAX, 0, 0, &[])?;
        let r = rx.recv(|_| 0)?;
        if r.error != 0 {
            return Err(io::Error::other(format!("flush failed: {}", r.error)));
        }
    }
    tx.disconnect();
    Ok(())
}

/// Write the pattern over `[start, start + bytes)`, then flush.
pub fn fill_pattern(
    socket: &Path,
    export: &str,
    start: u64,
    bytes: u64,
    seed: u64,
) -> io::Result<()> {
    pipeline(socket, export, start, bytes, CMD_WRITE, seed, |_, _| {})
}

/// Read `[start, start + bytes)` back; returns the offsets of the 1 MiB steps that differ
/// from the pattern.
pub fn check_pattern(
    socket: &Path,
    export: &str,
    start: u64,
    bytes: u64,
    seed: u64,
) -> io::Result<Vec<u64>> {
    let mut wrong = Vec::new();
    pipeline(socket, export, start, bytes, CMD_READ, seed, |off, data| {
        if data != pattern(off, data.len(), seed).as_slice() {
            wrong.push(off);
        }
    })?;
    wrong.sort_unstable();
    Ok(wrong)
}
