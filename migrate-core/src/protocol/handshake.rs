//! Connection handshake, on every connection:
//!
//! ```text
//! source                                  destination
//!   Hello (channel, session, flags, nonce, region table) ──►
//!                         ◄── Challenge (nonce, destination proof)
//!   Proof (source proof) ──►
//!                         ◄── HelloReply (status, message)
//! ```
//! Proofs are all zero when no key is configured (see [`super::auth`]).

use super::auth::{NONCE_LEN, PROOF_LEN};
use super::{ProtocolError, MAGIC, VERSION};

/// Fixed part of a [`Hello`]; the region table (`body_len` bytes) follows.
pub const HELLO_HEADER_LEN: usize = 24 + NONCE_LEN;
/// A [`Challenge`].
pub const CHALLENGE_LEN: usize = NONCE_LEN + PROOF_LEN;
/// Fixed part of a [`HelloReply`]; `msg_len` bytes of UTF-8 follow.
pub const REPLY_HEADER_LEN: usize = 12;
/// At most this many regions.
pub const MAX_REGIONS: usize = 256;
/// Largest region table body.
pub const MAX_HELLO_BODY: usize = 64 << 10;
/// Largest reply message.
pub const MAX_REPLY_MESSAGE: usize = 4096;
const REGION_ENTRY_FIXED: usize = 16;

/// Which connection of a migration this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Bulk page stream and commands.
    Main = 0,
    /// Urgent (requested) pages; its reverse direction carries the return path.
    Urgent = 1,
}

impl Channel {
    pub fn name(self) -> &'static str {
        match self {
            Channel::Main => "main",
            Channel::Urgent => "urgent",
        }
    }

    fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        match v {
            0 => Ok(Channel::Main),
            1 => Ok(Channel::Urgent),
            kind => Err(ProtocolError::UnknownKind {
                what: "channel",
                kind,
            }),
        }
    }
}

/// One guest memory region as both sides must agree on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub id: u16,
    pub name: String,
    pub host_page_size: u32,
    pub len: u64,
}

/// The region table of a migration, used to bounds-check every record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionTable {
    regions: Vec<RegionInfo>,
}

impl RegionTable {
    /// Builds a table; ids must be `0..n` in order, names unique and 1..=255 bytes, host page
    /// sizes powers of two ≥ 4 KiB, lengths non-zero multiples of the host page size.
    pub fn new(regions: Vec<RegionInfo>) -> Result<Self, ProtocolError> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(ProtocolError::Handshake(format!(
                "region count {} not in 1..={MAX_REGIONS}",
                regions.len()
            )));
        }
        for (i, r) in regions.iter().enumerate() {
            if r.id as usize != i {
                return Err(ProtocolError::Handshake(format!(
                    "region ids must be 0..n in order; entry {i} has id {}",
                    r.id
                )));
            }
            if r.name.is_empty() || r.name.len() > 255 {
                return Err(ProtocolError::Handshake(format!(
                    "region {i} name length {} not in 1..=255",
                    r.name.len()
                )));
            }
            if regions[..i].iter().any(|o| o.name == r.name) {
                return Err(ProtocolError::Handshake(format!(
                    "duplicate region name {:?}",
                    r.name
                )));
            }
            let p = r.host_page_size as u64;
            if !p.is_power_of_two() || !(4096..=(1 << 30)).contains(&p) {
                return Err(ProtocolError::Handshake(format!(
                    "region {:?}: bad host page size {p}",
                    r.name
                )));
            }
            if r.len == 0 || r.len % p != 0 {
                return Err(ProtocolError::Handshake(format!(
                    "region {:?}: length {} is not a non-zero multiple of its host page size {p}",
                    r.name, r.len
                )));
            }
        }
        Ok(Self { regions })
    }

    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    pub fn get(&self, id: u16) -> Result<&RegionInfo, ProtocolError> {
        self.regions
            .get(id as usize)
            .ok_or(ProtocolError::UnknownRegion(id))
    }

    /// Checks that `[offset, offset+len)` lies inside region `id` and is host-page aligned.
    pub fn check_range(
        &self,
        id: u16,
        offset: u64,
        len: u64,
    ) -> Result<&RegionInfo, ProtocolError> {
        let r = self.get(id)?;
        let page = r.host_page_size as u64;
        if len == 0 {
            return Err(ProtocolError::Empty { what: "page range" });
        }
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(ProtocolError::Misaligned {
                region: id,
                offset,
                len,
                page,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= r.len => Ok(r),
            _ => Err(ProtocolError::OutOfRange {
                region: id,
                offset,
                len,
                size: r.len,
            }),
        }
    }

    /// Compares the source's table with ours and names the first difference.
    pub fn check_matches(&self, theirs: &RegionTable) -> Result<(), ProtocolError> {
        if self.regions.len() != theirs.regions.len() {
            return Err(ProtocolError::RegionMismatch(format!(
                "source has {} regions, destination {}",
                theirs.regions.len(),
                self.regions.len()
            )));
        }
        for (a, b) in self.regions.iter().zip(&theirs.regions) {
            if a.name != b.name {
                return Err(ProtocolError::RegionMismatch(format!(
                    "region {}: source calls it {:?}, destination {:?}",
                    a.id, b.name, a.name
                )));
            }
            if a.len != b.len {
                return Err(ProtocolError::RegionMismatch(format!(
                    "region {:?}: source size {} bytes, destination {}",
                    a.name, b.len, a.len
                )));
            }
            if a.host_page_size != b.host_page_size {
                return Err(ProtocolError::RegionMismatch(format!(
                    "region {:?}: source host page {} bytes, destination {}",
                    a.name, b.host_page_size, a.host_page_size
                )));
            }
        }
        Ok(())
    }
}

/// Hello flag: the source has a key and expects the destination to prove it.
pub const HELLO_AUTH: u8 = 1;
/// Hello flag: this connection resumes a paused postcopy of the same session.
pub const HELLO_RESUME: u8 = 2;

/// First message on every connection, source → destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub channel: Channel,
    /// [`HELLO_AUTH`] | [`HELLO_RESUME`].
    pub flags: u8,
    pub session: u64,
    pub nonce: [u8; NONCE_LEN],
    pub regions: RegionTable,
}

impl Hello {
    pub fn new(channel: Channel, session: u64, regions: RegionTable) -> Self {
        Self {
            version: VERSION,
            channel,
            flags: 0,
            session,
            nonce: [0; NONCE_LEN],
            regions,
        }
    }

    pub fn resume(&self) -> bool {
        self.flags & HELLO_RESUME != 0
    }

    pub fn auth(&self) -> bool {
        self.flags & HELLO_AUTH != 0
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for r in self.regions.regions() {
            body.extend_from_slice(&r.id.to_le_bytes());
            body.push(r.name.len() as u8);
            body.push(0);
            body.extend_from_slice(&r.host_page_size.to_le_bytes());
            body.extend_from_slice(&r.len.to_le_bytes());
            body.extend_from_slice(r.name.as_bytes());
        }
        let mut out = Vec::with_capacity(HELLO_HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(self.channel as u8);
        out.push(self.flags);
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&(self.regions.regions().len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&body);
        out
    }

    /// Validates the fixed header and returns how many body bytes follow. Checks the magic and
    /// the version first, so an old or foreign peer gets a precise error.
    pub fn body_len(header: &[u8; HELLO_HEADER_LEN]) -> Result<usize, ProtocolError> {
        check_magic_version(&header[0..6])?;
        let len = u32::from_le_bytes(header[20..24].try_into().unwrap()) as usize;
        if len > MAX_HELLO_BODY {
            return Err(ProtocolError::TooLong {
                what: "hello region table",
                len: len as u64,
                max: MAX_HELLO_BODY as u64,
            });
        }
        Ok(len)
    }

    pub fn decode(header: &[u8; HELLO_HEADER_LEN], body: &[u8]) -> Result<Self, ProtocolError> {
        let body_len = Self::body_len(header)?;
        if body.len() != body_len {
            return Err(ProtocolError::Truncated {
                what: "hello",
                need: body_len,
                have: body.len(),
            });
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        let channel = Channel::from_u8(header[6])?;
        let flags = header[7];
        if flags & !(HELLO_AUTH | HELLO_RESUME) != 0 || header[18] != 0 || header[19] != 0 {
            return Err(ProtocolError::Reserved {
                what: "hello",
                value: flags as u64,
            });
        }
        let nonce: [u8; NONCE_LEN] = header[24..24 + NONCE_LEN].try_into().unwrap();
        let session = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let count = u16::from_le_bytes([header[16], header[17]]) as usize;
        if count == 0 || count > MAX_REGIONS {
            return Err(ProtocolError::Handshake(format!(
                "region count {count} not in 1..={MAX_REGIONS}"
            )));
        }
        let mut regions = Vec::with_capacity(count);
        let mut rest = body;
        for _ in 0..count {
            if rest.len() < REGION_ENTRY_FIXED {
                return Err(ProtocolError::Truncated {
                    what: "hello region entry",
                    need: REGION_ENTRY_FIXED,
                    have: rest.len(),
                });
            }
            let id = u16::from_le_bytes([rest[0], rest[1]]);
            let name_len = rest[2] as usize;
            if rest[3] != 0 {
                return Err(ProtocolError::Reserved {
                    what: "hello region entry",
                    value: rest[3] as u64,
                });
            }
            let host_page_size = u32::from_le_bytes(rest[4..8].try_into().unwrap());
            let len = u64::from_le_bytes(rest[8..16].try_into().unwrap());
            let rest2 = &rest[REGION_ENTRY_FIXED..];
            if rest2.len() < name_len {
                return Err(ProtocolError::Truncated {
                    what: "region name",
                    need: name_len,
                    have: rest2.len(),
                });
            }
            let name = std::str::from_utf8(&rest2[..name_len])
                .map_err(|_| ProtocolError::Handshake(format!("region {id} name is not UTF-8")))?
                .to_owned();
            regions.push(RegionInfo {
                id,
                name,
                host_page_size,
                len,
            });
            rest = &rest2[name_len..];
        }
        if !rest.is_empty() {
            return Err(ProtocolError::Handshake(format!(
                "{} trailing bytes after the region table",
                rest.len()
            )));
        }
        Ok(Self {
            version,
            channel,
            flags,
            session,
            nonce,
            regions: RegionTable::new(regions)?,
        })
    }
}

/// Destination → source after a [`Hello`]: the destination's nonce and its proof of the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: [u8; NONCE_LEN],
    pub proof: [u8; PROOF_LEN],
}

impl Challenge {
    pub fn encode(&self) -> [u8; CHALLENGE_LEN] {
        let mut b = [0u8; CHALLENGE_LEN];
        b[..NONCE_LEN].copy_from_slice(&self.nonce);
        b[NONCE_LEN..].copy_from_slice(&self.proof);
        b
    }

    pub fn decode(b: &[u8; CHALLENGE_LEN]) -> Self {
        Self {
            nonce: b[..NONCE_LEN].try_into().unwrap(),
            proof: b[NONCE_LEN..].try_into().unwrap(),
        }
    }
}

fn check_magic_version(b: &[u8]) -> Result<(), ProtocolError> {
    let magic: [u8; 4] = b[0..4].try_into().unwrap();
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let theirs = u16::from_le_bytes([b[4], b[5]]);
    if theirs != VERSION {
        return Err(ProtocolError::Version {
            ours: VERSION,
            theirs,
        });
    }
    Ok(())
}

/// Outcome of a handshake, as sent by the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyStatus {
    Ok = 0,
    VersionMismatch = 1,
    RegionMismatch = 2,
    DuplicateChannel = 3,
    BadHello = 4,
    AuthFailed = 5,
    WrongSession = 6,
    /// A resume for a migration that is not paused (or of another session).
    NotPaused = 7,
}

impl ReplyStatus {
    fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            0 => Self::Ok,
            1 => Self::VersionMismatch,
            2 => Self::RegionMismatch,
            3 => Self::DuplicateChannel,
            4 => Self::BadHello,
            5 => Self::AuthFailed,
            6 => Self::WrongSession,
            7 => Self::NotPaused,
            kind => {
                return Err(ProtocolError::UnknownKind {
                    what: "reply status",
                    kind,
                })
            }
        })
    }

    /// The status that tells the source why its hello was refused.
    pub fn for_error(e: &ProtocolError) -> Self {
        match e {
            ProtocolError::Version { .. } => Self::VersionMismatch,
            ProtocolError::RegionMismatch(_) => Self::RegionMismatch,
            ProtocolError::DuplicateChannel(_) => Self::DuplicateChannel,
            ProtocolError::Auth(_) => Self::AuthFailed,
            ProtocolError::Session(_) => Self::WrongSession,
            ProtocolError::NotPaused(_) => Self::NotPaused,
            _ => Self::BadHello,
        }
    }
}

/// Destination → source answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub status: ReplyStatus,
    pub message: String,
}

impl HelloReply {
    pub fn ok() -> Self {
        Self {
            status: ReplyStatus::Ok,
            message: String::new(),
        }
    }

    pub fn refuse(e: &ProtocolError) -> Self {
        Self {
            status: ReplyStatus::for_error(e),
            message: e.to_string(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let msg = truncate_utf8(&self.message, MAX_REPLY_MESSAGE);
        let mut out = Vec::with_capacity(REPLY_HEADER_LEN + msg.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.status as u8);
        out.push(0);
        out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        out.extend_from_slice(msg.as_bytes());
        out
    }

    /// Validates the fixed part and returns the message length that follows. A version mismatch
    /// is not an error here: the status says it, and the message explains it.
    pub fn message_len(header: &[u8; REPLY_HEADER_LEN]) -> Result<usize, ProtocolError> {
        let magic: [u8; 4] = header[0..4].try_into().unwrap();
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        if len > MAX_REPLY_MESSAGE {
            return Err(ProtocolError::TooLong {
                what: "hello reply message",
                len: len as u64,
                max: MAX_REPLY_MESSAGE as u64,
            });
        }
        Ok(len)
    }

    pub fn decode(header: &[u8; REPLY_HEADER_LEN], msg: &[u8]) -> Result<Self, ProtocolError> {
        let len = Self::message_len(header)?;
        if msg.len() != len {
            return Err(ProtocolError::Truncated {
                what: "hello reply",
                need: len,
                have: msg.len(),
            });
        }
        let status = ReplyStatus::from_u8(header[6])?;
        Ok(Self {
            status,
            message: String::from_utf8_lossy(msg).into_owned(),
        })
    }

    /// Turns a refusal into the error the source reports.
    pub fn into_result(self) -> Result<(), ProtocolError> {
        match self.status {
            ReplyStatus::Ok => Ok(()),
            _ => Err(ProtocolError::Remote(format!(
                "destination refused the connection: {}",
                self.message
            ))),
        }
    }
}

pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::fixtures::sample_table as table;

    fn split(bytes: &[u8]) -> ([u8; HELLO_HEADER_LEN], &[u8]) {
        (
            bytes[..HELLO_HEADER_LEN].try_into().unwrap(),
            &bytes[HELLO_HEADER_LEN..],
        )
    }

    #[test]
    fn hello_round_trip() {
        let mut h = Hello::new(Channel::Urgent, 0xdead_beef, table());
        h.flags = HELLO_AUTH | HELLO_RESUME;
        h.nonce = [7; NONCE_LEN];
        let bytes = h.encode();
        let (hdr, body) = split(&bytes);
        assert_eq!(Hello::body_len(&hdr).unwrap(), body.len());
        assert_eq!(Hello::decode(&hdr, body).unwrap(), h);
    }

    #[test]
    fn bad_magic_and_version() {
        let mut bytes = Hello::new(Channel::Main, 1, table()).encode();
        bytes[0] = b'X';
        let (hdr, _) = split(&bytes);
        assert!(matches!(
            Hello::body_len(&hdr),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut bytes = Hello::new(Channel::Main, 1, table()).encode();
        bytes[4] = 99;
        let (hdr, _) = split(&bytes);
        assert_eq!(
            Hello::body_len(&hdr),
            Err(ProtocolError::Version {
                ours: VERSION,
                theirs: 99
            })
        );
    }

    #[test]
    fn truncated_and_trailing() {
        let bytes = Hello::new(Channel::Main, 1, table()).encode();
        let (hdr, body) = split(&bytes);
        assert!(Hello::decode(&hdr, &body[..body.len() - 1]).is_err());
        let mut long = body.to_vec();
        long.push(0);
        assert!(Hello::decode(&hdr, &long).is_err());
    }

    #[test]
    fn region_mismatch_is_named() {
        let ours = table();
        let mut r = ours.regions().to_vec();
        r[1].len = 4 << 20;
        let theirs = RegionTable::new(r).unwrap();
        let e = ours.check_matches(&theirs).unwrap_err();
        assert!(e.to_string().contains("huge"), "{e}");
        let mut r = ours.regions().to_vec();
        r[0].name = "other".into();
        let e = ours
            .check_matches(&RegionTable::new(r).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("other"), "{e}");
    }

    #[test]
    fn range_checks() {
        let t = table();
        assert!(t.check_range(0, 0, 4096).is_ok());
        assert!(matches!(
            t.check_range(0, 1 << 20, 4096),
            Err(ProtocolError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.check_range(0, u64::MAX - 4095, 4096),
            Err(ProtocolError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.check_range(1, 4096, 2 << 20),
            Err(ProtocolError::Misaligned { .. })
        ));
        assert!(matches!(
            t.check_range(2, 0, 4096),
            Err(ProtocolError::UnknownRegion(2))
        ));
        assert!(matches!(
            t.check_range(0, 0, 0),
            Err(ProtocolError::Empty { .. })
        ));
    }

    #[test]
    fn table_rejects_bad_entries() {
        let bad = |r: RegionInfo| RegionTable::new(vec![r]).is_err();
        assert!(bad(RegionInfo {
            id: 1,
            name: "a".into(),
            host_page_size: 4096,
            len: 4096
        }));
        assert!(bad(RegionInfo {
            id: 0,
            name: "".into(),
            host_page_size: 4096,
            len: 4096
        }));
        assert!(bad(RegionInfo {
            id: 0,
            name: "a".into(),
            host_page_size: 3000,
            len: 6000
        }));
        assert!(bad(RegionInfo {
            id: 0,
            name: "a".into(),
            host_page_size: 4096,
            len: 0
        }));
        assert!(bad(RegionInfo {
            id: 0,
            name: "a".into(),
            host_page_size: 4096,
            len: 4097
        }));
    }

    #[test]
    fn reply_round_trip() {
        let r = HelloReply::refuse(&ProtocolError::Version { ours: 1, theirs: 2 });
        let bytes = r.encode();
        let hdr: [u8; REPLY_HEADER_LEN] = bytes[..REPLY_HEADER_LEN].try_into().unwrap();
        let back = HelloReply::decode(&hdr, &bytes[REPLY_HEADER_LEN..]).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.status, ReplyStatus::VersionMismatch);
        assert!(back.into_result().is_err());
        assert!(HelloReply::ok().into_result().is_ok());
    }
}
