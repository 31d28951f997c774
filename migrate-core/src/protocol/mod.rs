//! The wire protocol, as sans-IO codecs and state machines.
//!
//! Nothing here touches a socket: the codecs turn bytes into typed, bounds-checked messages and
//! back, and [`phase::DestPhase`] decides what a record means in the destination's current
//! phase. Threads in [`crate::source`] and [`crate::dest`] drive them over `uring-net`.
//! The byte layouts are documented in `docs/PROTOCOL.md`; [`VERSION`] changes whenever they do.

pub mod auth;
mod error;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod handshake;
pub mod phase;
pub mod record;
pub mod ret;

pub use auth::AuthKey;
pub use error::ProtocolError;
pub use handshake::{Challenge, Channel, Hello, HelloReply, RegionInfo, RegionTable, ReplyStatus};
pub use phase::{DestPhase, PhaseAction};
pub use record::{DiscardEntry, Record, RecordKind, RECORD_HEADER_LEN};
pub use ret::{ReturnMsg, RETURN_HEADER_LEN};

/// Four magic bytes at the start of every handshake message.
pub const MAGIC: [u8; 4] = *b"UMIG";
/// Protocol version. Bumped on any change of a byte layout or of message meaning.
pub const VERSION: u16 = 1;
/// Largest page payload one record may carry.
pub const MAX_PAGES_PAYLOAD: u32 = 16 << 20;
/// Largest discard payload (entries × 16 bytes) one record may carry.
pub const MAX_DISCARD_PAYLOAD: u32 = 1 << 20;
/// Largest error message on the return path.
pub const MAX_ERROR_MESSAGE: u32 = 4096;
