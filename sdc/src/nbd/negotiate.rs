//! The handshake (fixed newstyle option haggling) of one connection.
//!
//! [`Negotiation`] is a pure state machine: it takes one option at a time and returns the
//! replies to send and what happens next, so every option rule is unit-tested without sockets.
//! [`negotiate`] drives it over a stream, enforcing the limits on option size and count.
//!
//! Supported: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (`INFO_EXPORT`, `INFO_NAME`,
//! `INFO_DESCRIPTION`, `INFO_BLOCK_SIZE`), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation`). Anything else gets `NBD_REP_ERR_UNSUP` and the
//! session stays in sync (that includes `STARTTLS`, as the NOTLS mode of the specification asks).

use super::registry::{ExportRegistry, OpenExport};
use super::wire::{self, Cursor};
use super::{Backend, NbdError, BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, MAX_PAYLOAD};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id in `NBD_REP_META_CONTEXT` replies to `SET_META_CONTEXT` and in block status chunks.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// Largest option payload read and parsed.
pub(crate) const OPTION_LEN_MAX: u32 = 64 << 10;
/// Largest option payload skipped (and refused with `ERR_TOO_BIG`) rather than disconnecting.
pub(crate) const OPTION_SKIP_LEN_MAX: u32 = 1 << 20;
/// Options one client may send before the server gives up on it.
pub(crate) const OPTIONS_PER_HANDSHAKE_MAX: u32 = 1024;
/// Queries one meta context option may carry.
const META_QUERIES_MAX: u32 = 128;

/// What a successful handshake hands to the transmission phase.
pub(crate) struct Session<B> {
    pub export: OpenExport<B>,
    pub structured: bool,
    /// `base:allocation` was selected for this export, so BLOCK_STATUS is allowed.
    pub block_status: bool,
}

/// What to do after one option.
pub(crate) enum Step<B> {
    /// Send these replies and read the next option.
    Continue(Vec<Bytes>),
    /// Send these replies, then close (the client aborted).
    Abort(Vec<Bytes>),
    /// Send these replies, then enter transmission.
    Transmit(Vec<Bytes>, Session<B>),
    /// Close without a reply (there is no way to answer).
    Refuse(NbdError),
}

/// Transmission flags for an export as this session will see it.
pub(crate) fn transmission_flags<B: Backend>(backend: &B, structured: bool) -> u16 {
    let mut flags = wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH | wire::TF_SEND_CACHE;
    if backend.read_only() {
        flags |= wire::TF_READ_ONLY;
    } else {
        flags |= wire::TF_SEND_FUA
            | wire::TF_SEND_TRIM
            | wire::TF_SEND_WRITE_ZEROES
            | wire::TF_SEND_FAST_ZERO;
    }
    if structured {
        // Reads are never fragmented, so DF is always honoured.
        flags |= wire::TF_SEND_DF;
    }
    if backend.can_multi_conn() {
        flags |= wire::TF_CAN_MULTI_CONN;
    }
    flags
}

/// Option haggling state for one connection.
pub(crate) struct Negotiation<'r, B> {
    registry: &'r ExportRegistry<B>,
    no_zeroes: bool,
    structured: bool,
    /// The export name `base:allocation` was last selected for, if it was.
    meta_export: Option<String>,
}

struct InfoRequest {
    name: String,
    requests: Vec<u16>,
}

struct MetaRequest {
    export: String,
    queries: Vec<String>,
}

enum MetaParse {
    Ok(MetaRequest),
    Invalid(&'static str),
    TooBig,
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut c = Cursor::new(data);
    let name = match c.string() {
        Some(Ok(name)) => name,
        Some(Err(_)) => return Err("export name is not UTF-8"),
        None => return Err("export name is truncated or too long"),
    };
    let count = c.u16().ok_or("information request count is missing")?;
    if c.remaining() != usize::from(count) * 2 {
        return Err("information request count does not match the option length");
    }
    let requests = (0..count).filter_map(|_| c.u16()).collect();
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(data: &[u8]) -> MetaParse {
    let mut c = Cursor::new(data);
    let export = match c.string() {
        Some(Ok(name)) => name,
        Some(Err(_)) => return MetaParse::Invalid("export name is not UTF-8"),
        None => return MetaParse::Invalid("export name is truncated or too long"),
    };
    let Some(count) = c.u32() else {
        return MetaParse::Invalid("query count is missing");
    };
    if count > META_QUERIES_MAX {
        return MetaParse::TooBig;
    }
    let mut queries = Vec::new();
    for _ in 0..count {
        match c.string() {
            Some(Ok(q)) => queries.push(q),
            Some(Err(_)) => return MetaParse::Invalid("query is not UTF-8"),
            None => return MetaParse::Invalid("query is truncated or too long"),
        }
    }
    if !c.is_empty() {
        return MetaParse::Invalid("trailing bytes after the queries");
    }
    MetaParse::Ok(MetaRequest { export, queries })
}

fn info_reply(option: u32, info: u16, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(2 + body.len());
    b.put_u16(info);
    b.put_slice(body);
    wire::encode_option_reply(option, wire::REP_INFO, &b)
}

fn meta_context_reply(option: u32, id: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + BASE_ALLOCATION.len());
    b.put_u32(id);
    b.put_slice(BASE_ALLOCATION.as_bytes());
    wire::encode_option_reply(option, wire::REP_META_CONTEXT, &b)
}

/// The refusal of an option whose payload was too large to read.
fn too_big(option: u32) -> Bytes {
    wire::encode_option_error(option, wire::REP_ERR_TOO_BIG, "option payload too large")
}

fn ack(option: u32) -> Bytes {
    wire::encode_option_reply(option, wire::REP_ACK, &[])
}

impl<'r, B: Backend> Negotiation<'r, B> {
    /// Starts haggling once the client flags arrived; unknown client flags end the session.
    pub(crate) fn new(
        registry: &'r ExportRegistry<B>,
        client_flags: u32,
    ) -> Result<Self, NbdError> {
        let known = wire::CLIENT_FLAG_FIXED_NEWSTYLE | wire::CLIENT_FLAG_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(NbdError::ClientFlags(client_flags));
        }
        // A client without FIXED_NEWSTYLE may only send EXPORT_NAME, which needs no reply
        // format, so it is served the same way (the specification allows this).
        Ok(Negotiation {
            registry,
            no_zeroes: client_flags & wire::CLIENT_FLAG_NO_ZEROES != 0,
            structured: false,
            meta_export: None,
        })
    }

    /// Handles one complete option.
    pub(crate) fn on_option(&mut self, option: u32, data: &[u8]) -> Step<B> {
        match option {
            wire::OPT_EXPORT_NAME => self.export_name(data),
            wire::OPT_ABORT => Step::Abort(vec![ack(option)]),
            wire::OPT_LIST => Step::Continue(self.list(data)),
            wire::OPT_INFO | wire::OPT_GO => self.info_or_go(option, data),
            wire::OPT_STRUCTURED_REPLY => Step::Continue(self.structured_reply(data)),
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                Step::Continue(self.meta_context(option, data))
            }
            _ => Step::Continue(vec![wire::encode_option_error(
                option,
                wire::REP_ERR_UNSUP,
                "option not supported by this server",
            )]),
        }
    }

    fn export_name(&mut self, data: &[u8]) -> Step<B> {
        let Ok(name) = std::str::from_utf8(data) else {
            return Step::Refuse(NbdError::UnknownExport(
                String::from_utf8_lossy(data).into_owned(),
            ));
        };
        let Some(export) = self.registry.open(name) else {
            return Step::Refuse(NbdError::UnknownExport(name.to_string()));
        };
        let flags = transmission_flags(&*export.backend, self.structured);
        let reply = wire::encode_export_name_reply(export.backend.size(), flags, self.no_zeroes);
        let block_status = self.meta_export.as_deref() == Some(name);
        Step::Transmit(
            vec![reply],
            Session {
                export,
                structured: self.structured,
                block_status,
            },
        )
    }

    fn list(&self, data: &[u8]) -> Vec<Bytes> {
        if !data.is_empty() {
            return vec![wire::encode_option_error(
                wire::OPT_LIST,
                wire::REP_ERR_INVALID,
                "NBD_OPT_LIST takes no data",
            )];
        }
        let mut replies: Vec<Bytes> = self
            .registry
            .names()
            .iter()
            .filter(|n| n.len() <= wire::STRING_LEN_MAX)
            .map(|n| {
                let mut b = BytesMut::with_capacity(4 + n.len());
                b.put_u32(u32::try_from(n.len()).expect("names are at most 4096 bytes"));
                b.put_slice(n.as_bytes());
                wire::encode_option_reply(wire::OPT_LIST, wire::REP_SERVER, &b)
            })
            .collect();
        replies.push(ack(wire::OPT_LIST));
        replies
    }

    fn structured_reply(&mut self, data: &[u8]) -> Vec<Bytes> {
        if !data.is_empty() {
            return vec![wire::encode_option_error(
                wire::OPT_STRUCTURED_REPLY,
                wire::REP_ERR_INVALID,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            )];
        }
        self.structured = true;
        vec![ack(wire::OPT_STRUCTURED_REPLY)]
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Step<B> {
        let request = match parse_info_request(data) {
            Ok(r) => r,
            Err(why) => {
                return Step::Continue(vec![wire::encode_option_error(
                    option,
                    wire::REP_ERR_INVALID,
                    why,
                )])
            }
        };
        let Some(export) = self.registry.open(&request.name) else {
            let message = format!("no export named {:?}", request.name);
            return Step::Continue(vec![wire::encode_option_error(
                option,
                wire::REP_ERR_UNKNOWN,
                &message,
            )]);
        };
        let backend = &*export.backend;
        let mut replies = Vec::new();
        let mut body = BytesMut::with_capacity(10);
        body.put_u64(backend.size());
        body.put_u16(transmission_flags(backend, self.structured));
        replies.push(info_reply(option, wire::INFO_EXPORT, &body));
        // Sent whether asked or not: the values are the protocol's defaults, so a client that
        // did not ask is not bound by anything it does not know.
        let mut body = BytesMut::with_capacity(12);
        body.put_u32(BLOCK_SIZE_MIN);
        body.put_u32(BLOCK_SIZE_PREFERRED);
        body.put_u32(MAX_PAYLOAD);
        replies.push(info_reply(option, wire::INFO_BLOCK_SIZE, &body));
        if request.requests.contains(&wire::INFO_NAME) && export.name.len() <= wire::STRING_LEN_MAX
        {
            replies.push(info_reply(option, wire::INFO_NAME, export.name.as_bytes()));
        }
        let description = backend.description();
        if request.requests.contains(&wire::INFO_DESCRIPTION)
            && !description.is_empty()
            && description.len() <= wire::STRING_LEN_MAX
        {
            replies.push(info_reply(
                option,
                wire::INFO_DESCRIPTION,
                description.as_bytes(),
            ));
        }
        replies.push(ack(option));
        if option != wire::OPT_GO {
            return Step::Continue(replies);
        }
        // Metadata contexts count only if selected for the very name used to GO.
        let block_status = self.meta_export.as_deref() == Some(request.name.as_str());
        Step::Transmit(
            replies,
            Session {
                export,
                structured: self.structured,
                block_status,
            },
        )
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Vec<Bytes> {
        let set = option == wire::OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        let request = match parse_meta_request(data) {
            MetaParse::Ok(r) => r,
            MetaParse::Invalid(why) => {
                return vec![wire::encode_option_error(
                    option,
                    wire::REP_ERR_INVALID,
                    why,
                )]
            }
            MetaParse::TooBig => {
                return vec![wire::encode_option_error(
                    option,
                    wire::REP_ERR_TOO_BIG,
                    "too many queries",
                )]
            }
        };
        if set && !self.structured {
            return vec![wire::encode_option_error(
                option,
                wire::REP_ERR_INVALID,
                "negotiate structured replies first",
            )];
        }
        if self.registry.open(&request.export).is_none() {
            let message = format!("no export named {:?}", request.export);
            return vec![wire::encode_option_error(
                option,
                wire::REP_ERR_UNKNOWN,
                &message,
            )];
        }
        let selected = if set {
            request.queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            // LIST: no query lists everything; `base:` is the namespace wildcard.
            request.queries.is_empty()
                || request
                    .queries
                    .iter()
                    .any(|q| q == BASE_ALLOCATION || q == "base:")
        };
        let mut replies = Vec::new();
        if selected {
            // Ids in LIST replies are reserved and should be zero.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            replies.push(meta_context_reply(option, id));
            if set {
                self.meta_export = Some(request.export);
            }
        }
        replies.push(ack(option));
        replies
    }
}

/// Runs the handshake over a stream: `Ok(None)` when the client aborted cleanly.
pub(crate) async fn negotiate<R, W, B>(
    rd: &mut R,
    wr: &mut W,
    registry: &ExportRegistry<B>,
) -> Result<Option<Session<B>>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    wr.write_all(&wire::encode_greeting()).await?;
    wr.flush().await?;
    let client_flags = rd.read_u32().await?;
    let mut negotiation = Negotiation::new(registry, client_flags)?;
    for _ in 0..OPTIONS_PER_HANDSHAKE_MAX {
        let mut header = [0u8; wire::OPTION_HEADER_LEN];
        rd.read_exact(&mut header).await?;
        let (option, len) = wire::decode_option_header(&header).map_err(NbdError::OptionMagic)?;
        let step = if len > OPTION_LEN_MAX {
            // EXPORT_NAME has no error reply, so an oversized one can only end the session.
            if option == wire::OPT_EXPORT_NAME || len > OPTION_SKIP_LEN_MAX {
                return Err(NbdError::OptionTooLarge { option, len });
            }
            skip(rd, u64::from(len)).await?;
            Step::Continue(vec![too_big(option)])
        } else {
            let mut data = vec![0u8; usize::try_from(len).expect("at most OPTION_LEN_MAX")];
            rd.read_exact(&mut data).await?;
            negotiation.on_option(option, &data)
        };
        match step {
            Step::Continue(replies) => send(wr, &replies).await?,
            Step::Abort(replies) => {
                // The client may already have hung up; that is fine after an abort.
                let _ = send(wr, &replies).await;
                return Ok(None);
            }
            Step::Transmit(replies, session) => {
                send(wr, &replies).await?;
                return Ok(Some(session));
            }
            Step::Refuse(e) => return Err(e),
        }
    }
    Err(NbdError::TooManyOptions(OPTIONS_PER_HANDSHAKE_MAX))
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, replies: &[Bytes]) -> std::io::Result<()> {
    for r in replies {
        wr.write_all(r).await?;
    }
    wr.flush().await
}

/// Reads and discards `len` bytes.
pub(crate) async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> std::io::Result<()> {
    let skipped = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink()).await?;
    if skipped < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::BackendError;
    use std::sync::Arc;

    struct Fixed {
        size: u64,
        read_only: bool,
    }

    impl Backend for Fixed {
        fn size(&self) -> u64 {
            self.size
        }
        async fn read(&self, _offset: u64, len: u32) -> Result<Bytes, BackendError> {
            Ok(Bytes::from(vec![0; len as usize]))
        }
        async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), BackendError> {
            Ok(())
        }
        async fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u64) -> Result<(), BackendError> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BackendError> {
            Ok(())
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn can_multi_conn(&self) -> bool {
            true
        }
        fn description(&self) -> String {
            "a fixed test disk".into()
        }
    }

    fn registry() -> ExportRegistry<Fixed> {
        let r = ExportRegistry::new();
        r.add(
            "disk",
            Arc::new(Fixed {
                size: 1 << 20,
                read_only: false,
            }),
        );
        r.add(
            "ro",
            Arc::new(Fixed {
                size: 4096,
                read_only: true,
            }),
        );
        r
    }

    /// `(option, reply type, payload)` of each encoded option reply.
    fn decode(replies: &[Bytes]) -> Vec<(u32, u32, Vec<u8>)> {
        replies
            .iter()
            .map(|r| {
                let mut c = Cursor::new(r);
                assert_eq!(c.u64(), Some(wire::OPTION_REPLY_MAGIC));
                let option = c.u32().expect("option");
                let kind = c.u32().expect("type");
                let len = c.u32().expect("len") as usize;
                let payload = c.take(len).expect("payload").to_vec();
                assert!(c.is_empty());
                (option, kind, payload)
            })
            .collect()
    }

    fn continued<B>(step: Step<B>) -> Vec<(u32, u32, Vec<u8>)> {
        match step {
            Step::Continue(r) => decode(&r),
            _ => panic!("expected the negotiation to continue"),
        }
    }

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend((requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend(r.to_be_bytes());
        }
        d
    }

    fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend(export.as_bytes());
        d.extend((queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend((q.len() as u32).to_be_bytes());
            d.extend(q.as_bytes());
        }
        d
    }

    fn flags_of(info_export: &[u8]) -> u16 {
        u16::from_be_bytes([info_export[10], info_export[11]])
    }

    #[test]
    fn unknown_client_flags_end_the_session() {
        let r = registry();
        assert!(Negotiation::new(&r, 1 << 5).is_err());
        assert!(Negotiation::new(&r, 3).is_ok());
        assert!(Negotiation::new(&r, 0).is_ok());
    }

    #[test]
    fn unknown_options_are_unsupported() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        for option in [0, 4, 5, 11, 99, u32::MAX] {
            let replies = continued(n.on_option(option, b"whatever"));
            assert_eq!(replies.len(), 1);
            assert_eq!(replies[0].0, option);
            assert_eq!(replies[0].1, wire::REP_ERR_UNSUP);
        }
    }

    #[test]
    fn list_names_every_export_then_acks() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        let replies = continued(n.on_option(wire::OPT_LIST, &[]));
        let kinds: Vec<u32> = replies.iter().map(|r| r.1).collect();
        assert_eq!(kinds, [wire::REP_SERVER, wire::REP_SERVER, wire::REP_ACK]);
        assert_eq!(replies[0].2, b"\0\0\0\x04disk");
        let replies = continued(n.on_option(wire::OPT_LIST, b"x"));
        assert_eq!(replies[0].1, wire::REP_ERR_INVALID);
    }

    #[test]
    fn info_reports_size_flags_block_sizes_name_and_description() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        let data = info_data("disk", &[wire::INFO_NAME, wire::INFO_DESCRIPTION, 999]);
        let replies = continued(n.on_option(wire::OPT_INFO, &data));
        let infos: Vec<u16> = replies
            .iter()
            .filter(|r| r.1 == wire::REP_INFO)
            .map(|r| u16::from_be_bytes([r.2[0], r.2[1]]))
            .collect();
        assert_eq!(
            infos,
            [
                wire::INFO_EXPORT,
                wire::INFO_BLOCK_SIZE,
                wire::INFO_NAME,
                wire::INFO_DESCRIPTION
            ]
        );
        let export = &replies[0].2;
        assert_eq!(export.len(), 12);
        assert_eq!(export[2..10], (1u64 << 20).to_be_bytes());
        let flags = flags_of(export);
        assert_eq!(flags & wire::TF_READ_ONLY, 0);
        assert_ne!(flags & wire::TF_CAN_MULTI_CONN, 0);
        assert_eq!(flags & wire::TF_SEND_DF, 0, "DF needs structured replies");
        let sizes = &replies[1].2;
        assert_eq!(sizes[2..], [0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
        assert_eq!(replies.last().map(|r| r.1), Some(wire::REP_ACK));
    }

    #[test]
    fn read_only_exports_advertise_no_writes() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        let replies = continued(n.on_option(wire::OPT_INFO, &info_data("ro", &[])));
        let flags = flags_of(&replies[0].2);
        assert_ne!(flags & wire::TF_READ_ONLY, 0);
        assert_eq!(flags & (wire::TF_SEND_TRIM | wire::TF_SEND_WRITE_ZEROES), 0);
    }

    #[test]
    fn malformed_info_requests_are_invalid_not_fatal() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        let mut too_long_name = 100u32.to_be_bytes().to_vec();
        too_long_name.extend(b"disk\0\0");
        let mut trailing = info_data("disk", &[1]);
        trailing.push(0);
        for data in [vec![], vec![0, 0], too_long_name, trailing] {
            let replies = continued(n.on_option(wire::OPT_GO, &data));
            assert_eq!(replies.len(), 1);
            assert_eq!(replies[0].1, wire::REP_ERR_INVALID);
        }
        let replies = continued(n.on_option(wire::OPT_GO, &info_data("nope", &[])));
        assert_eq!(replies[0].1, wire::REP_ERR_UNKNOWN);
    }

    #[test]
    fn go_enters_transmission_and_empty_name_needs_a_single_export() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        let replies = continued(n.on_option(wire::OPT_GO, &info_data("", &[])));
        assert_eq!(
            replies[0].1,
            wire::REP_ERR_UNKNOWN,
            "two exports: no default"
        );
        match n.on_option(wire::OPT_GO, &info_data("disk", &[])) {
            Step::Transmit(replies, session) => {
                assert_eq!(decode(&replies).last().map(|r| r.1), Some(wire::REP_ACK));
                assert_eq!(session.export.name, "disk");
                assert!(!session.structured);
                assert!(!session.block_status);
            }
            _ => panic!("GO did not enter transmission"),
        }
        r.remove("ro");
        let mut n = Negotiation::new(&r, 3).expect("flags");
        assert!(matches!(
            n.on_option(wire::OPT_GO, &info_data("", &[])),
            Step::Transmit(_, s) if s.export.name == "disk"
        ));
    }

    #[test]
    fn export_name_replies_without_padding_when_asked() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        match n.on_option(wire::OPT_EXPORT_NAME, b"disk") {
            Step::Transmit(replies, _) => assert_eq!(replies[0].len(), 10),
            _ => panic!("EXPORT_NAME did not enter transmission"),
        }
        let mut n = Negotiation::new(&r, 1).expect("flags");
        match n.on_option(wire::OPT_EXPORT_NAME, b"disk") {
            Step::Transmit(replies, _) => assert_eq!(replies[0].len(), 134),
            _ => panic!("EXPORT_NAME did not enter transmission"),
        }
        assert!(matches!(
            n.on_option(wire::OPT_EXPORT_NAME, b"nope"),
            Step::Refuse(NbdError::UnknownExport(_))
        ));
        assert!(matches!(
            n.on_option(wire::OPT_EXPORT_NAME, &[0xff]),
            Step::Refuse(NbdError::UnknownExport(_))
        ));
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_the_same_export() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        let set = meta_data("disk", &[BASE_ALLOCATION]);
        let replies = continued(n.on_option(wire::OPT_SET_META_CONTEXT, &set));
        assert_eq!(replies[0].1, wire::REP_ERR_INVALID);
        // LIST works without structured replies; no query lists everything.
        let replies = continued(n.on_option(wire::OPT_LIST_META_CONTEXT, &meta_data("disk", &[])));
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].1, wire::REP_META_CONTEXT);
        assert_eq!(replies[0].2, b"\0\0\0\0base:allocation");
        let wildcard = meta_data("disk", &["base:", "x-other:thing"]);
        let replies = continued(n.on_option(wire::OPT_LIST_META_CONTEXT, &wildcard));
        assert_eq!(replies[0].1, wire::REP_META_CONTEXT);
        let none = meta_data("disk", &["qemu:dirty-bitmap:x"]);
        let replies = continued(n.on_option(wire::OPT_LIST_META_CONTEXT, &none));
        assert_eq!(
            replies.iter().map(|r| r.1).collect::<Vec<_>>(),
            [wire::REP_ACK]
        );

        continued(n.on_option(wire::OPT_STRUCTURED_REPLY, &[]));
        let replies = continued(n.on_option(wire::OPT_SET_META_CONTEXT, &set));
        assert_eq!(replies[0].1, wire::REP_META_CONTEXT);
        assert_eq!(replies[0].2[..4], BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(replies[1].1, wire::REP_ACK);
        // GO to another export: the selection does not carry over.
        match n.on_option(wire::OPT_GO, &info_data("ro", &[])) {
            Step::Transmit(_, s) => assert!(s.structured && !s.block_status),
            _ => panic!("GO did not enter transmission"),
        }
        let mut n = Negotiation::new(&r, 3).expect("flags");
        continued(n.on_option(wire::OPT_STRUCTURED_REPLY, &[]));
        continued(n.on_option(wire::OPT_SET_META_CONTEXT, &set));
        match n.on_option(wire::OPT_GO, &info_data("disk", &[])) {
            Step::Transmit(replies, s) => {
                assert!(s.structured && s.block_status);
                assert_ne!(flags_of(&decode(&replies)[0].2) & wire::TF_SEND_DF, 0);
            }
            _ => panic!("GO did not enter transmission"),
        }
    }

    #[test]
    fn a_failed_set_clears_the_selection() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        continued(n.on_option(wire::OPT_STRUCTURED_REPLY, &[]));
        continued(n.on_option(
            wire::OPT_SET_META_CONTEXT,
            &meta_data("disk", &[BASE_ALLOCATION]),
        ));
        let replies = continued(n.on_option(wire::OPT_SET_META_CONTEXT, &[0, 0, 0, 9]));
        assert_eq!(replies[0].1, wire::REP_ERR_INVALID);
        match n.on_option(wire::OPT_GO, &info_data("disk", &[])) {
            Step::Transmit(_, s) => assert!(!s.block_status),
            _ => panic!("GO did not enter transmission"),
        }
    }

    #[test]
    fn meta_context_limits() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        let mut many = meta_data("disk", &[]);
        many[8..12].copy_from_slice(&(META_QUERIES_MAX + 1).to_be_bytes());
        let replies = continued(n.on_option(wire::OPT_LIST_META_CONTEXT, &many));
        assert_eq!(replies[0].1, wire::REP_ERR_TOO_BIG);
        let mut truncated = meta_data("disk", &[BASE_ALLOCATION]);
        truncated.pop();
        let replies = continued(n.on_option(wire::OPT_LIST_META_CONTEXT, &truncated));
        assert_eq!(replies[0].1, wire::REP_ERR_INVALID);
        let replies = continued(n.on_option(wire::OPT_LIST_META_CONTEXT, &meta_data("x", &[])));
        assert_eq!(replies[0].1, wire::REP_ERR_UNKNOWN);
    }

    #[test]
    fn abort_acks() {
        let r = registry();
        let mut n = Negotiation::new(&r, 3).expect("flags");
        match n.on_option(wire::OPT_ABORT, b"ignored") {
            Step::Abort(replies) => assert_eq!(decode(&replies)[0].1, wire::REP_ACK),
            _ => panic!("ABORT did not abort"),
        }
    }

    proptest::proptest! {
        #[test]
        fn options_never_panic(option in 0u32..16, data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let r = registry();
            let mut n = Negotiation::new(&r, 3).expect("flags");
            let _ = n.on_option(wire::OPT_STRUCTURED_REPLY, &[]);
            let _ = n.on_option(option, &data);
        }
    }
}
