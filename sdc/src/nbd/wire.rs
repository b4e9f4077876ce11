//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): protocol constants, a
//! bounds-checked cursor, request and option header decoding, and reply encoding.
//!
//! Everything here is pure: no I/O, no async, no state. Decoders take untrusted bytes and
//! return `Option`/`Result`; they never index, unwrap or cast unchecked on them.

use bytes::{BufMut, Bytes, BytesMut};

/// First server magic of every handshake (ASCII `NBDMAGIC`).
pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle magic (ASCII `IHAVEOPT`): second server magic, and the start of every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags share their bit positions.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub(crate) const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub(crate) const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

pub(crate) const TF_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TF_READ_ONLY: u16 = 1 << 1;
pub(crate) const TF_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TF_SEND_FUA: u16 = 1 << 3;
pub(crate) const TF_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TF_SEND_DF: u16 = 1 << 7;
pub(crate) const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const TF_SEND_CACHE: u16 = 1 << 10;
pub(crate) const TF_SEND_FAST_ZERO: u16 = 1 << 11;

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub(crate) const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub(crate) const STATE_HOLE: u32 = 1 << 0;
pub(crate) const STATE_ZERO: u32 = 1 << 1;

/// Longest string the protocol allows (export names, queries, error messages).
pub(crate) const STRING_LEN_MAX: usize = 4096;
/// Bytes in a request header.
pub(crate) const REQUEST_LEN: usize = 28;
/// Bytes in an option header (magic, option, length).
pub(crate) const OPTION_HEADER_LEN: usize = 16;
/// Bytes of zero padding after an `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
const EXPORT_NAME_PADDING_LEN: usize = 124;

/// A bounds-checked big-endian reader over untrusted bytes.
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Cursor { rest: bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string preceded by its 32-bit length; `None` if truncated or longer than the
    /// protocol allows, `Some(Err)` if not UTF-8.
    pub(crate) fn string(&mut self) -> Option<Result<String, std::string::FromUtf8Error>> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > STRING_LEN_MAX {
            return None;
        }
        Some(String::from_utf8(self.take(len)?.to_vec()))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }
}

/// A transmission request header, decoded but not yet validated against an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Decodes a request header; `Err(magic)` when the magic is wrong.
pub(crate) fn decode_request(bytes: &[u8; REQUEST_LEN]) -> Result<RequestHeader, u32> {
    let mut c = Cursor::new(bytes);
    let decoded = (|| {
        let magic = c.u32()?;
        let header = RequestHeader {
            flags: c.u16()?,
            command: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        };
        Some((magic, header))
    })();
    match decoded {
        Some((REQUEST_MAGIC, header)) => Ok(header),
        Some((magic, _)) => Err(magic),
        None => Err(0),
    }
}

/// Decodes an option header into `(option, data length)`; `Err(magic)` when the magic is wrong.
pub(crate) fn decode_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<(u32, u32), u64> {
    let mut c = Cursor::new(bytes);
    match (c.u64(), c.u32(), c.u32()) {
        (Some(IHAVEOPT), Some(option), Some(len)) => Ok((option, len)),
        (Some(magic), _, _) => Err(magic),
        _ => Err(0),
    }
}

/// The server's opening: magics and handshake flags.
pub(crate) fn encode_greeting() -> Bytes {
    let mut b = BytesMut::with_capacity(18);
    b.put_u64(NBD_MAGIC);
    b.put_u64(IHAVEOPT);
    b.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    b.freeze()
}

/// One option reply. Payloads are built by this server and are small.
pub(crate) fn encode_option_reply(option: u32, reply: u32, payload: &[u8]) -> Bytes {
    let len = u32::try_from(payload.len()).expect("option reply payloads are small");
    let mut b = BytesMut::with_capacity(20 + payload.len());
    b.put_u64(OPTION_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(reply);
    b.put_u32(len);
    b.put_slice(payload);
    b.freeze()
}

/// An option error reply carrying a message for humans (cut to the protocol's string limit).
pub(crate) fn encode_option_error(option: u32, reply: u32, message: &str) -> Bytes {
    encode_option_reply(option, reply, truncate(message).as_bytes())
}

/// The reply that ends `NBD_OPT_EXPORT_NAME`: size, flags and (unless refused) padding.
pub(crate) fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(10 + EXPORT_NAME_PADDING_LEN);
    b.put_u64(size);
    b.put_u16(flags);
    if !no_zeroes {
        b.put_bytes(0, EXPORT_NAME_PADDING_LEN);
    }
    b.freeze()
}

/// A simple reply header; for a successful simple READ the data follows it.
pub(crate) fn encode_simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    b.freeze()
}

fn chunk_header(b: &mut BytesMut, cookie: u64, flags: u16, kind: u16, payload_len: u32) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(payload_len);
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub(crate) fn encode_none_chunk(cookie: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(20);
    chunk_header(&mut b, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    b.freeze()
}

/// The header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes follow it.
pub(crate) fn encode_offset_data_header(cookie: u64, offset: u64, data_len: u32) -> Bytes {
    let payload_len = data_len
        .checked_add(8)
        .expect("read payloads are far below 4 GiB");
    let mut b = BytesMut::with_capacity(28);
    chunk_header(
        &mut b,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        payload_len,
    );
    b.put_u64(offset);
    b.freeze()
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message for humans.
pub(crate) fn encode_error_chunk(cookie: u64, error: u32, message: &str) -> Bytes {
    let message = truncate(message).as_bytes();
    let message_len = u16::try_from(message.len()).expect("messages are cut to 4096 bytes");
    let mut b = BytesMut::with_capacity(26 + message.len());
    chunk_header(
        &mut b,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + u32::from(message_len),
    );
    b.put_u32(error);
    b.put_u16(message_len);
    b.put_slice(message);
    b.freeze()
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: `(length, flags)` descriptors for one context.
pub(crate) fn encode_block_status_chunk(
    cookie: u64,
    context: u32,
    extents: &[(u32, u32)],
) -> Bytes {
    let payload_len = extents
        .len()
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .and_then(|n| u32::try_from(n).ok())
        .expect("the extent count is bounded by EXTENTS_PER_REPLY_MAX");
    let mut b = BytesMut::with_capacity(20 + extents.len() * 8 + 4);
    chunk_header(
        &mut b,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        payload_len,
    );
    b.put_u32(context);
    for &(len, flags) in extents {
        b.put_u32(len);
        b.put_u32(flags);
    }
    b.freeze()
}

/// Cuts a message to the protocol's string limit, on a character boundary.
fn truncate(message: &str) -> &str {
    if message.len() <= STRING_LEN_MAX {
        return message;
    }
    let mut end = STRING_LEN_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request_bytes(
        magic: u32,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> [u8; REQUEST_LEN] {
        let mut b = Vec::new();
        b.extend(magic.to_be_bytes());
        b.extend(flags.to_be_bytes());
        b.extend(command.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.try_into().expect("28 bytes")
    }

    #[test]
    fn request_round_trips_through_the_decoder() {
        let b = request_bytes(REQUEST_MAGIC, 1, CMD_WRITE, 0xdead_beef, 1 << 40, 4096);
        assert_eq!(
            decode_request(&b),
            Ok(RequestHeader {
                flags: 1,
                command: CMD_WRITE,
                cookie: 0xdead_beef,
                offset: 1 << 40,
                len: 4096
            })
        );
    }

    #[test]
    fn request_with_bad_magic_is_refused() {
        let b = request_bytes(0xdead_beef, 0, CMD_READ, 1, 0, 512);
        assert_eq!(decode_request(&b), Err(0xdead_beef));
    }

    #[test]
    fn option_header_decodes_and_checks_magic() {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..].copy_from_slice(&77u32.to_be_bytes());
        assert_eq!(decode_option_header(&b), Ok((OPT_GO, 77)));
        b[0] = 0;
        assert!(decode_option_header(&b).is_err());
    }

    #[test]
    fn cursor_refuses_truncated_and_oversized_strings() {
        assert!(Cursor::new(&[0, 0, 0, 9, b'a']).string().is_none());
        assert!(Cursor::new(&[]).u16().is_none());
        let mut long = 4097u32.to_be_bytes().to_vec();
        long.extend(vec![b'a'; 4097]);
        assert!(Cursor::new(&long).string().is_none());
        let mut bad = 2u32.to_be_bytes().to_vec();
        bad.extend([0xff, 0xfe]);
        assert!(matches!(Cursor::new(&bad).string(), Some(Err(_))));
        let mut ok = 3u32.to_be_bytes().to_vec();
        ok.extend(b"abc");
        let mut c = Cursor::new(&ok);
        assert_eq!(c.string().and_then(Result::ok).as_deref(), Some("abc"));
        assert!(c.is_empty());
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
    }

    #[test]
    fn error_chunk_cuts_long_messages_on_char_boundaries() {
        let message = "é".repeat(3000);
        let chunk = encode_error_chunk(7, 5, &message);
        let mut c = Cursor::new(&chunk);
        assert_eq!(c.u32(), Some(STRUCTURED_REPLY_MAGIC));
        assert_eq!(c.u16(), Some(REPLY_FLAG_DONE));
        assert_eq!(c.u16(), Some(REPLY_TYPE_ERROR));
        assert_eq!(c.u64(), Some(7));
        let len = c.u32().expect("length");
        assert_eq!(c.u32(), Some(5));
        let message_len = c.u16().expect("message length");
        assert_eq!(len, 6 + u32::from(message_len));
        assert!(usize::from(message_len) <= STRING_LEN_MAX);
        let text = c.take(usize::from(message_len)).expect("message");
        assert!(std::str::from_utf8(text).is_ok());
        assert!(c.is_empty());
    }

    #[test]
    fn block_status_chunk_layout() {
        let chunk = encode_block_status_chunk(9, 1, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(chunk.len(), 20 + 4 + 16);
        let mut c = Cursor::new(&chunk);
        c.take(16);
        assert_eq!(c.u32(), Some(20));
        assert_eq!(c.u32(), Some(1));
        assert_eq!(c.u32(), Some(4096));
        assert_eq!(c.u32(), Some(0));
        assert_eq!(c.u32(), Some(8192));
        assert_eq!(c.u32(), Some(3));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut c = Cursor::new(&bytes);
            while c.remaining() > 0 {
                if c.string().is_none() && c.u16().is_none() {
                    break;
                }
            }
            let mut req = [0u8; REQUEST_LEN];
            for (d, s) in req.iter_mut().zip(&bytes) {
                *d = *s;
            }
            let _ = decode_request(&req);
        }

        #[test]
        fn request_decoding_round_trips(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
            let b = request_bytes(REQUEST_MAGIC, flags, command, cookie, offset, len);
            let h = decode_request(&b).expect("valid magic");
            prop_assert_eq!(h, RequestHeader { flags, command, cookie, offset, len });
        }
    }
}
