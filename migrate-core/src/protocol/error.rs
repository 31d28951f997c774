use thiserror::Error;

/// A violation of the wire protocol by the peer (or a mismatch between the two sides).
///
/// Every field read from the network is checked before use; any failure ends the migration with
/// one of these, never with a panic or a write outside guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("bad magic {0:02x?}: the peer is not a migration endpoint")]
    BadMagic([u8; 4]),
    #[error("protocol version mismatch: ours {ours}, peer's {theirs}")]
    Version { ours: u16, theirs: u16 },
    #[error("unknown {what} type {kind}")]
    UnknownKind { what: &'static str, kind: u8 },
    #[error("reserved bits set in {what}: {value:#x}")]
    Reserved { what: &'static str, value: u64 },
    #[error("unknown region {0}")]
    UnknownRegion(u16),
    #[error("region {region}: range offset {offset:#x} + len {len:#x} is outside the region ({size:#x} bytes)")]
    OutOfRange {
        region: u16,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("region {region}: offset {offset:#x} / len {len:#x} not a multiple of the host page size {page}")]
    Misaligned {
        region: u16,
        offset: u64,
        len: u64,
        page: u64,
    },
    #[error("{what} length {len} exceeds the limit {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("bad handshake: {0}")]
    Handshake(String),
    #[error("region table mismatch: {0}")]
    RegionMismatch(String),
    #[error("record {record} not allowed in phase {phase}")]
    UnexpectedRecord {
        record: &'static str,
        phase: &'static str,
    },
    #[error("channel {0} is already connected")]
    DuplicateChannel(&'static str),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("session mismatch: {0}")]
    Session(String),
    #[error("cannot resume: {0}")]
    NotPaused(String),
    #[error("peer reported an error: {0}")]
    Remote(String),
}
