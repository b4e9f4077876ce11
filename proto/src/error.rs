//! Wire error codes: the one place where internal errors become codes a peer can branch on.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What went wrong, as a peer needs to know it to decide what to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request was understood and done.
    Ok = 0,
    /// The request is malformed (bad frame, bad field); retrying will not help.
    BadRequest = 1,
    /// The named object does not exist.
    NotFound = 2,
    /// An object with that name exists already.
    AlreadyExists = 3,
    /// The caller's role does not allow this.
    PermissionDenied = 4,
    /// The login is missing, wrong or expired.
    Unauthenticated = 5,
    /// This MDM is not the leader; the message names the leader when known.
    NotLeader = 6,
    /// The request carries an older epoch than the server has seen: refresh the map, retry.
    StaleEpoch = 7,
    /// The server does not hold this placement group (or not in the role asked).
    WrongPg = 8,
    /// Not enough capacity.
    NoSpace = 9,
    /// A device or disk failed the request.
    Io = 10,
    /// The request conflicts with the object's state (in use, mapped, not empty...).
    Conflict = 11,
    /// The cluster cannot decide now (no quorum, shutting down); retry later.
    Unavailable = 12,
    /// Stored data failed its checksum and could not be repaired.
    Checksum = 13,
    /// The mapping was fenced (taken over by another host).
    Fenced = 14,
    /// A bug: the server hit a state it does not expect.
    Internal = 15,
    /// The object is held by another live client (a volume mapped to a host whose session is
    /// alive): retry later, or take it over once that host is gone.
    Busy = 16,
}

impl ErrorCode {
    /// Decode a wire value; unknown values are `None`.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match v {
            0 => Ok,
            1 => BadRequest,
            2 => NotFound,
            3 => AlreadyExists,
            4 => PermissionDenied,
            5 => Unauthenticated,
            6 => NotLeader,
            7 => StaleEpoch,
            8 => WrongPg,
            9 => NoSpace,
            10 => Io,
            11 => Conflict,
            12 => Unavailable,
            13 => Checksum,
            14 => Fenced,
            15 => Internal,
            16 => Busy,
            _ => return None,
        })
    }
}

/// An error as it travels: a code to branch on and a message for a human.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
