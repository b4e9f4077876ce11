//! Validation of transmission requests: turns a decoded header into a typed [`Command`] the
//! backend may execute, or a [`Rejection`] with the NBD error the client gets; and clips the
//! extents a backend reports into a valid block status reply.
//!
//! Pure functions only. The rules follow `doc/proto.md`: out-of-range writes are `ENOSPC`,
//! other out-of-range requests `EINVAL`; payloads over [`MAX_PAYLOAD`] are `EINVAL`; writes to
//! a read-only export `EPERM`; unknown commands and flags `EINVAL`.

use super::wire;
use super::{BackendError, Extent, MAX_PAYLOAD};

/// Most descriptors in one block status reply (the specification asks for at most 2^20; the
/// client asks again for the rest).
pub(crate) const EXTENTS_PER_REPLY_MAX: usize = 8192;

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Why a request is answered with an error, with a message for humans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub error: BackendError,
    pub why: &'static str,
}

impl Rejection {
    const fn new(error: BackendError, why: &'static str) -> Self {
        Rejection { error, why }
    }
}

/// What validation needs to know about the export and the session.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub block_status: bool,
}

/// Validates a request header against the export.
pub(crate) fn classify(h: &wire::RequestHeader, limits: &Limits) -> Result<Command, Rejection> {
    use wire::{CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE};
    // FUA is accepted on every command, as the specification requires once SEND_FUA is set.
    let allowed = CMD_FLAG_FUA
        | match h.command {
            wire::CMD_READ if limits.structured => CMD_FLAG_DF,
            wire::CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            wire::CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.len);
    let command = match h.command {
        wire::CMD_DISC => return Ok(Command::Disconnect),
        wire::CMD_READ => Command::Read { offset, len },
        wire::CMD_WRITE => Command::Write { offset, len, fua },
        wire::CMD_FLUSH => Command::Flush,
        wire::CMD_TRIM => Command::Trim { offset, len, fua },
        wire::CMD_CACHE => Command::Cache { offset, len },
        wire::CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        wire::CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => return Err(Rejection::new(BackendError::Inval, "unknown command")),
    };
    if h.flags & !allowed != 0 {
        return Err(Rejection::new(
            BackendError::Inval,
            "command flag not valid for this command",
        ));
    }
    let writes = matches!(
        command,
        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
    );
    if writes && limits.read_only {
        return Err(Rejection::new(BackendError::Perm, "export is read-only"));
    }
    if matches!(command, Command::Read { .. } | Command::Write { .. }) && len > MAX_PAYLOAD {
        return Err(Rejection::new(
            BackendError::Inval,
            "payload larger than the maximum payload size",
        ));
    }
    if command != Command::Flush && !in_range(offset, len, limits.size) {
        let error = match command {
            Command::Write { .. } | Command::WriteZeroes { .. } => BackendError::NoSpc,
            _ => BackendError::Inval,
        };
        return Err(Rejection::new(
            error,
            "request extends beyond the end of the export",
        ));
    }
    if let Command::BlockStatus { len, .. } = command {
        if !limits.block_status {
            return Err(Rejection::new(
                BackendError::Inval,
                "no metadata context was selected",
            ));
        }
        if len == 0 {
            return Err(Rejection::new(
                BackendError::Inval,
                "block status of zero bytes",
            ));
        }
    }
    Ok(command)
}

fn in_range(offset: u64, len: u32, size: u64) -> bool {
    offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size)
}

/// Clips backend extents into block status descriptors for a request of `len` bytes: skips
/// empty extents, merges neighbours with equal flags, never covers more than `len`, returns
/// one descriptor with `req_one`, and at least one always (status 0 is always safe).
pub(crate) fn descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let limit = if req_one { 1 } else { EXTENTS_PER_REPLY_MAX };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut covered: u32 = 0;
    for e in extents {
        let remaining = len - covered;
        if remaining == 0 {
            break;
        }
        let take = u32::try_from(e.len).unwrap_or(u32::MAX).min(remaining);
        if take == 0 {
            continue;
        }
        let flags =
            if e.hole { wire::STATE_HOLE } else { 0 } | if e.zero { wire::STATE_ZERO } else { 0 };
        let full = out.len() == limit;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += take,
            _ if full => break,
            _ => out.push((take, flags)),
        }
        covered += take;
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::RequestHeader;

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        structured: false,
        block_status: false,
    };

    fn header(command: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            len,
        }
    }

    fn check(h: RequestHeader, limits: &Limits) -> Result<Command, BackendError> {
        classify(&h, limits).map_err(|r| r.error)
    }

    #[test]
    fn range_errors_follow_the_specification() {
        let end = 1 << 20;
        assert_eq!(
            check(header(wire::CMD_READ, 0, end, 1), &LIMITS),
            Err(BackendError::Inval)
        );
        assert_eq!(
            check(header(wire::CMD_WRITE, 0, end - 1, 2), &LIMITS),
            Err(BackendError::NoSpc)
        );
        assert_eq!(
            check(header(wire::CMD_WRITE_ZEROES, 0, u64::MAX, 1), &LIMITS),
            Err(BackendError::NoSpc)
        );
        assert_eq!(
            check(header(wire::CMD_TRIM, 0, end, 1), &LIMITS),
            Err(BackendError::Inval)
        );
        assert_eq!(
            check(header(wire::CMD_CACHE, 0, u64::MAX, 4096), &LIMITS),
            Err(BackendError::Inval)
        );
        assert_eq!(
            check(header(wire::CMD_READ, 0, end - 4096, 4096), &LIMITS),
            Ok(Command::Read {
                offset: end - 4096,
                len: 4096
            })
        );
        assert_eq!(
            check(header(wire::CMD_READ, 0, end, 0), &LIMITS),
            Ok(Command::Read {
                offset: end,
                len: 0
            })
        );
        assert_eq!(
            check(header(wire::CMD_FLUSH, 0, u64::MAX, u32::MAX), &LIMITS),
            Ok(Command::Flush)
        );
    }

    #[test]
    fn oversized_payloads_are_invalid() {
        let big = Limits {
            size: u64::MAX,
            ..LIMITS
        };
        assert_eq!(
            check(header(wire::CMD_READ, 0, 0, MAX_PAYLOAD + 1), &big),
            Err(BackendError::Inval)
        );
        assert_eq!(
            check(header(wire::CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &big),
            Err(BackendError::Inval)
        );
        assert!(check(header(wire::CMD_READ, 0, 0, MAX_PAYLOAD), &big).is_ok());
        // Commands without payload may cover more.
        assert!(check(header(wire::CMD_TRIM, 0, 0, u32::MAX), &big).is_ok());
    }

    #[test]
    fn read_only_exports_refuse_every_write() {
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        for command in [wire::CMD_WRITE, wire::CMD_TRIM, wire::CMD_WRITE_ZEROES] {
            assert_eq!(
                check(header(command, 0, 0, 512), &ro),
                Err(BackendError::Perm)
            );
        }
        assert!(check(header(wire::CMD_READ, 0, 0, 512), &ro).is_ok());
        assert!(check(header(wire::CMD_FLUSH, 0, 0, 0), &ro).is_ok());
    }

    #[test]
    fn unknown_commands_and_flags_are_invalid() {
        assert_eq!(check(header(8, 0, 0, 0), &LIMITS), Err(BackendError::Inval));
        assert_eq!(
            check(header(u16::MAX, 0, 0, 0), &LIMITS),
            Err(BackendError::Inval)
        );
        assert_eq!(
            check(header(wire::CMD_WRITE, 1 << 7, 0, 1), &LIMITS),
            Err(BackendError::Inval)
        );
        assert_eq!(
            check(header(wire::CMD_READ, wire::CMD_FLAG_DF, 0, 1), &LIMITS),
            Err(BackendError::Inval),
            "DF without structured replies"
        );
        let structured = Limits {
            structured: true,
            ..LIMITS
        };
        assert!(check(header(wire::CMD_READ, wire::CMD_FLAG_DF, 0, 1), &structured).is_ok());
        assert_eq!(
            check(
                header(wire::CMD_WRITE, wire::CMD_FLAG_NO_HOLE, 0, 1),
                &LIMITS
            ),
            Err(BackendError::Inval)
        );
        // FUA is accepted everywhere; DISC ignores everything.
        assert_eq!(
            check(header(wire::CMD_FLUSH, wire::CMD_FLAG_FUA, 0, 0), &LIMITS),
            Ok(Command::Flush)
        );
        assert_eq!(
            check(header(wire::CMD_DISC, 0xffff, 9, 9), &LIMITS),
            Ok(Command::Disconnect)
        );
    }

    #[test]
    fn write_zeroes_flags() {
        let flags = wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FAST_ZERO | wire::CMD_FLAG_FUA;
        assert_eq!(
            check(header(wire::CMD_WRITE_ZEROES, flags, 0, 4096), &LIMITS),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 4096,
                fua: true,
                may_trim: false,
                fast: true
            })
        );
    }

    #[test]
    fn block_status_needs_a_context_and_a_length() {
        assert_eq!(
            check(header(wire::CMD_BLOCK_STATUS, 0, 0, 512), &LIMITS),
            Err(BackendError::Inval)
        );
        let ok = Limits {
            structured: true,
            block_status: true,
            ..LIMITS
        };
        assert_eq!(
            check(
                header(wire::CMD_BLOCK_STATUS, wire::CMD_FLAG_REQ_ONE, 0, 512),
                &ok
            ),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true
            })
        );
        assert_eq!(
            check(header(wire::CMD_BLOCK_STATUS, 0, 0, 0), &ok),
            Err(BackendError::Inval)
        );
        assert_eq!(
            check(header(wire::CMD_BLOCK_STATUS, 0, 1 << 20, 1), &ok),
            Err(BackendError::Inval)
        );
    }

    #[test]
    fn descriptors_are_clipped_merged_and_never_empty() {
        let hole = wire::STATE_HOLE | wire::STATE_ZERO;
        let extents = [
            Extent::data(4096),
            Extent::data(0),
            Extent::data(4096),
            Extent::hole(8192),
            Extent::zero(1 << 40),
        ];
        assert_eq!(
            descriptors(&extents, 20000, false),
            [(8192, 0), (8192, hole), (3616, wire::STATE_ZERO)]
        );
        assert_eq!(descriptors(&extents, 20000, true), [(8192, 0)]);
        assert_eq!(descriptors(&extents, 100, true), [(100, 0)]);
        assert_eq!(descriptors(&[], 512, false), [(512, 0)]);
        assert_eq!(descriptors(&[Extent::hole(0)], 512, true), [(512, 0)]);
        let many: Vec<Extent> = (0..20_000)
            .map(|i| {
                if i % 2 == 0 {
                    Extent::data(1)
                } else {
                    Extent::hole(1)
                }
            })
            .collect();
        assert_eq!(
            descriptors(&many, u32::MAX, false).len(),
            EXTENTS_PER_REPLY_MAX
        );
    }
}
