//! Frames: a fixed 24-byte header, a small metadata part and a raw data part.
//!
//! ```text
//! magic u16 | version u8 | kind u8 | status u16 | flags u16 | request_id u64 | meta_len u32 | data_len u32
//! ```
//! All integers little-endian. Metadata is JSON for control messages and a fixed binary header
//! for data messages ([`crate::data`]); block data travels as raw bytes in the data part and never
//! goes through serde. Both lengths are bounded so a peer cannot make us allocate at will.

use bytes::Bytes;

pub const MAGIC: u16 = 0x4D42;
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
/// Largest metadata part accepted (the whole cluster map as JSON fits easily).
pub const META_LEN_MAX: u32 = 16 << 20;
/// Largest data part accepted: 32 MiB of block data plus slack.
pub const DATA_LEN_MAX: u32 = (32 << 20) + 4096;

/// Frame kinds. Responses carry the kind of their request.
pub mod kind {
    /// Application hello: the first request on every connection, answered with the peer's name.
    pub const HELLO: u8 = 1;
    /// A control request or response, JSON metadata ([`crate::msg`]).
    pub const CONTROL: u8 = 2;
    /// A Raft message between MDMs (protobuf bytes in the data part).
    pub const RAFT: u8 = 3;
    /// Data plane ([`crate::data`]).
    pub const DATA: u8 = 4;
}

/// Flag set on responses.
pub const FLAG_RESPONSE: u16 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("bad frame magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported frame version {0}")]
    BadVersion(u8),
    #[error("metadata of {0} bytes exceeds the limit")]
    MetaTooLong(u32),
    #[error("data of {0} bytes exceeds the limit")]
    DataTooLong(u32),
    #[error("truncated frame header")]
    Truncated,
}

/// A frame's header, decoded and validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub status: u16,
    pub flags: u16,
    pub request_id: u64,
    pub meta_len: u32,
    pub data_len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = VERSION;
        b[3] = self.kind;
        b[4..6].copy_from_slice(&self.status.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.meta_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, CodecError> {
        let b: &[u8; HEADER_LEN] = b
            .get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(CodecError::Truncated)?;
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        if b[2] != VERSION {
            return Err(CodecError::BadVersion(b[2]));
        }
        let meta_len = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        let data_len = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if meta_len > META_LEN_MAX {
            return Err(CodecError::MetaTooLong(meta_len));
        }
        if data_len > DATA_LEN_MAX {
            return Err(CodecError::DataTooLong(data_len));
        }
        Ok(Header {
            kind: b[3],
            status: u16::from_le_bytes([b[4], b[5]]),
            flags: u16::from_le_bytes([b[6], b[7]]),
            request_id: u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8])),
            meta_len,
            data_len,
        })
    }
}

/// A whole frame.
#[derive(Clone, Debug, Default)]
pub struct Frame {
    pub kind: u8,
    pub status: u16,
    pub flags: u16,
    pub request_id: u64,
    pub meta: Bytes,
    pub data: Bytes,
}

impl Frame {
    /// The frame `h` describes, with the parts read after it.
    pub fn from_parts(h: &Header, meta: Bytes, data: Bytes) -> Frame {
        Frame {
            kind: h.kind,
            status: h.status,
            flags: h.flags,
            request_id: h.request_id,
            meta,
            data,
        }
    }

    pub fn request(kind: u8, meta: impl Into<Bytes>, data: Bytes) -> Frame {
        Frame {
            kind,
            status: 0,
            flags: 0,
            request_id: 0,
            meta: meta.into(),
            data,
        }
    }

    /// A response to `req` with the given status, metadata and data.
    pub fn response_to(
        req_kind: u8,
        request_id: u64,
        status: u16,
        meta: Bytes,
        data: Bytes,
    ) -> Frame {
        Frame {
            kind: req_kind,
            status,
            flags: FLAG_RESPONSE,
            request_id,
            meta,
            data,
        }
    }

    pub fn header(&self) -> Header {
        Header {
            kind: self.kind,
            status: self.status,
            flags: self.flags,
            request_id: self.request_id,
            meta_len: self.meta.len() as u32,
            data_len: self.data.len() as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips_and_rejects_truncation(kind: u8, status: u16, flags: u16, id: u64,
            meta_len in 0..=META_LEN_MAX, data_len in 0..=DATA_LEN_MAX) {
            let h = Header { kind, status, flags, request_id: id, meta_len, data_len };
            let b = h.encode();
            prop_assert_eq!(Header::decode(&b), Ok(h));
            for n in 0..HEADER_LEN {
                prop_assert_eq!(Header::decode(&b[..n]), Err(CodecError::Truncated));
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Header::decode(&bytes);
        }
    }

    #[test]
    fn oversized_lengths_are_refused() {
        let mut h = Header {
            kind: 1,
            status: 0,
            flags: 0,
            request_id: 1,
            meta_len: 0,
            data_len: 0,
        };
        h.data_len = DATA_LEN_MAX + 1;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(CodecError::DataTooLong(DATA_LEN_MAX + 1))
        );
        h.data_len = 0;
        h.meta_len = META_LEN_MAX + 1;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(CodecError::MetaTooLong(META_LEN_MAX + 1))
        );
    }
}
