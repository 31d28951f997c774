//! Records on the main and urgent channels (source → destination).
//!
//! Every record starts with a 16-byte header:
//! `kind u8 | flags u8 | region u16 | len u32 | offset u64` (little endian), followed by
//! [`Record::payload_len`] payload bytes.

use super::{handshake::RegionTable, ProtocolError, MAX_DISCARD_PAYLOAD, MAX_PAGES_PAYLOAD};

pub const RECORD_HEADER_LEN: usize = 16;
/// Size of one [`DiscardEntry`] in a discard payload.
pub const DISCARD_ENTRY_LEN: usize = 16;

/// Record type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Pages = 1,
    Zero = 2,
    Discard = 3,
    Postcopy = 4,
    Run = 5,
    Digests = 6,
    End = 7,
    Ping = 8,
}

impl RecordKind {
    fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            1 => Self::Pages,
            2 => Self::Zero,
            3 => Self::Discard,
            4 => Self::Postcopy,
            5 => Self::Run,
            6 => Self::Digests,
            7 => Self::End,
            8 => Self::Ping,
            kind => {
                return Err(ProtocolError::UnknownKind {
                    what: "record",
                    kind,
                })
            }
        })
    }
}

/// A decoded and validated record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// `len` bytes of page data for `[offset, offset+len)` of `region` follow; whole host pages.
    Pages { region: u16, offset: u64, len: u32 },
    /// `[offset, offset+len)` of `region` is all zeroes; no payload.
    Zero { region: u16, offset: u64, len: u32 },
    /// `count` [`DiscardEntry`]s follow: pages sent earlier but dirtied since.
    Discard { count: u32 },
    /// Precopy is over: the destination arms userfaultfd before anything else is placed.
    Postcopy,
    /// The guest may run on the destination now.
    Run,
    /// `count` little-endian u64 xxh3 digests follow, one per host page starting at `offset`.
    Digests {
        region: u16,
        offset: u64,
        count: u32,
    },
    /// Every page has been sent on this channel (and digests, if verifying).
    End,
    /// Keeps the channel alive; no payload.
    Ping,
}

impl Record {
    pub fn name(&self) -> &'static str {
        match self {
            Record::Pages { .. } => "pages",
            Record::Zero { .. } => "zero",
            Record::Discard { .. } => "discard",
            Record::Postcopy => "postcopy",
            Record::Run => "run",
            Record::Digests { .. } => "digests",
            Record::End => "end",
            Record::Ping => "ping",
        }
    }

    /// Payload bytes following the header.
    pub fn payload_len(&self) -> usize {
        match *self {
            Record::Pages { len, .. } => len as usize,
            Record::Discard { count } => count as usize * DISCARD_ENTRY_LEN,
            Record::Digests { count, .. } => count as usize * 8,
            _ => 0,
        }
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let (kind, region, len, offset) = match *self {
            Record::Pages {
                region,
                offset,
                len,
            } => (RecordKind::Pages, region, len, offset),
            Record::Zero {
                region,
                offset,
                len,
            } => (RecordKind::Zero, region, len, offset),
            Record::Discard { count } => (RecordKind::Discard, 0, count, 0),
            Record::Postcopy => (RecordKind::Postcopy, 0, 0, 0),
            Record::Run => (RecordKind::Run, 0, 0, 0),
            Record::Digests {
                region,
                offset,
                count,
            } => (RecordKind::Digests, region, count, offset),
            Record::End => (RecordKind::End, 0, 0, 0),
            Record::Ping => (RecordKind::Ping, 0, 0, 0),
        };
        encode_header(kind as u8, region, len, offset)
    }

    /// Decodes a header and checks it against the region table: known kind, reserved bits zero,
    /// ranges inside their region and host-page aligned, lengths within limits.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN], table: &RegionTable) -> Result<Self, ProtocolError> {
        let (kind, flags, region, len, offset) = decode_header(b);
        let kind = RecordKind::from_u8(kind)?;
        if flags != 0 {
            return Err(ProtocolError::Reserved {
                what: "record flags",
                value: flags as u64,
            });
        }
        let no_args = |r: Record| {
            if region != 0 || len != 0 || offset != 0 {
                Err(ProtocolError::Reserved {
                    what: "record fields",
                    value: offset | len as u64 | region as u64,
                })
            } else {
                Ok(r)
            }
        };
        match kind {
            RecordKind::Pages => {
                if len > MAX_PAGES_PAYLOAD {
                    return Err(ProtocolError::TooLong {
                        what: "page payload",
                        len: len as u64,
                        max: MAX_PAGES_PAYLOAD as u64,
                    });
                }
                table.check_range(region, offset, len as u64)?;
                Ok(Record::Pages {
                    region,
                    offset,
                    len,
                })
            }
            RecordKind::Zero => {
                table.check_range(region, offset, len as u64)?;
                Ok(Record::Zero {
                    region,
                    offset,
                    len,
                })
            }
            RecordKind::Discard => {
                if region != 0 || offset != 0 {
                    return Err(ProtocolError::Reserved {
                        what: "discard fields",
                        value: offset,
                    });
                }
                let bytes = len as u64 * DISCARD_ENTRY_LEN as u64;
                if bytes > MAX_DISCARD_PAYLOAD as u64 {
                    return Err(ProtocolError::TooLong {
                        what: "discard payload",
                        len: bytes,
                        max: MAX_DISCARD_PAYLOAD as u64,
                    });
                }
                if len == 0 {
                    return Err(ProtocolError::Empty {
                        what: "discard list",
                    });
                }
                Ok(Record::Discard { count: len })
            }
            RecordKind::Digests => {
                let info = table.get(region)?;
                let bytes = len as u64 * info.host_page_size as u64;
                table.check_range(region, offset, bytes)?;
                if len as u64 * 8 > MAX_PAGES_PAYLOAD as u64 {
                    return Err(ProtocolError::TooLong {
                        what: "digest payload",
                        len: len as u64 * 8,
                        max: MAX_PAGES_PAYLOAD as u64,
                    });
                }
                Ok(Record::Digests {
                    region,
                    offset,
                    count: len,
                })
            }
            RecordKind::Postcopy => no_args(Record::Postcopy),
            RecordKind::Run => no_args(Record::Run),
            RecordKind::End => no_args(Record::End),
            RecordKind::Ping => no_args(Record::Ping),
        }
    }
}

pub(crate) fn encode_header(kind: u8, region: u16, len: u32, offset: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = kind;
    b[2..4].copy_from_slice(&region.to_le_bytes());
    b[4..8].copy_from_slice(&len.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b
}

pub(crate) fn decode_header(b: &[u8; 16]) -> (u8, u8, u16, u32, u64) {
    (
        b[0],
        b[1],
        u16::from_le_bytes([b[2], b[3]]),
        u32::from_le_bytes(b[4..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
    )
}

/// One range in a discard payload: `region u16 | reserved u16 | pages u32 | offset u64`,
/// `pages` host pages starting at byte `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardEntry {
    pub region: u16,
    pub pages: u32,
    pub offset: u64,
}

impl DiscardEntry {
    pub fn encode(&self) -> [u8; DISCARD_ENTRY_LEN] {
        let mut b = [0u8; DISCARD_ENTRY_LEN];
        b[0..2].copy_from_slice(&self.region.to_le_bytes());
        b[4..8].copy_from_slice(&self.pages.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Decodes one entry and checks its range; returns it with its byte length.
    pub fn decode(b: &[u8], table: &RegionTable) -> Result<(Self, u64), ProtocolError> {
        if b.len() != DISCARD_ENTRY_LEN {
            return Err(ProtocolError::Truncated {
                what: "discard entry",
                need: DISCARD_ENTRY_LEN,
                have: b.len(),
            });
        }
        let region = u16::from_le_bytes([b[0], b[1]]);
        let reserved = u16::from_le_bytes([b[2], b[3]]);
        if reserved != 0 {
            return Err(ProtocolError::Reserved {
                what: "discard entry",
                value: reserved as u64,
            });
        }
        let pages = u32::from_le_bytes(b[4..8].try_into().unwrap());
        let offset = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let info = table.get(region)?;
        let len = pages as u64 * info.host_page_size as u64;
        table.check_range(region, offset, len)?;
        Ok((
            Self {
                region,
                pages,
                offset,
            },
            len,
        ))
    }

    /// Encodes a whole discard payload.
    pub fn encode_all(entries: &[DiscardEntry]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.encode()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::super::fixtures::{sample_records, sample_table as table};

    #[test]
    fn round_trips() {
        let t = table();
        for r in sample_records() {
            assert_eq!(Record::decode(&r.encode(), &t).unwrap(), r);
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let t = table();
        let bad = |b: [u8; 16]| Record::decode(&b, &t).unwrap_err();
        assert!(matches!(
            bad(encode_header(0, 0, 0, 0)),
            ProtocolError::UnknownKind { .. }
        ));
        assert!(matches!(
            bad(encode_header(99, 0, 0, 0)),
            ProtocolError::UnknownKind { .. }
        ));
        assert!(matches!(
            bad(encode_header(1, 0, 4096, 1 << 20)),
            ProtocolError::OutOfRange { .. }
        ));
        assert!(matches!(
            bad(encode_header(1, 0, 4095, 0)),
            ProtocolError::Misaligned { .. }
        ));
        assert!(matches!(
            bad(encode_header(1, 1, 4096, 0)),
            ProtocolError::Misaligned { .. }
        ));
        assert!(matches!(
            bad(encode_header(1, 7, 4096, 0)),
            ProtocolError::UnknownRegion(7)
        ));
        assert!(matches!(
            bad(encode_header(1, 0, u32::MAX, 0)),
            ProtocolError::TooLong { .. }
        ));
        assert!(matches!(
            bad(encode_header(1, 0, 0, 0)),
            ProtocolError::Empty { .. }
        ));
        assert!(matches!(
            bad(encode_header(3, 0, u32::MAX, 0)),
            ProtocolError::TooLong { .. }
        ));
        assert!(matches!(
            bad(encode_header(5, 0, 1, 0)),
            ProtocolError::Reserved { .. }
        ));
        assert!(matches!(
            bad(encode_header(6, 1, 5, 0)),
            ProtocolError::OutOfRange { .. }
        ));
        let mut flags = Record::Run.encode();
        flags[1] = 1;
        assert!(matches!(bad(flags), ProtocolError::Reserved { .. }));
    }

    #[test]
    fn discard_entries() {
        let t = table();
        let e = DiscardEntry {
            region: 1,
            pages: 2,
            offset: 4 << 20,
        };
        assert_eq!(DiscardEntry::decode(&e.encode(), &t).unwrap(), (e, 4 << 20));
        let past = DiscardEntry {
            region: 1,
            pages: 3,
            offset: 4 << 20,
        };
        assert!(DiscardEntry::decode(&past.encode(), &t).is_err());
        let huge = DiscardEntry {
            region: 0,
            pages: u32::MAX,
            offset: 0,
        };
        assert!(DiscardEntry::decode(&huge.encode(), &t).is_err());
        assert!(DiscardEntry::decode(&e.encode()[..15], &t).is_err());
    }

    proptest! {
        /// Any 16 bytes decode to a record or an error, never a panic; a decoded page record
        /// always lies inside its region.
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform16(any::<u8>())) {
            let t = table();
            if let Ok(r) = Record::decode(&bytes, &t) {
                match r {
                    Record::Pages { region, offset, len } | Record::Zero { region, offset, len } => {
                        let info = t.get(region).unwrap();
                        prop_assert!(offset + len as u64 <= info.len);
                        prop_assert!(len > 0 && len % info.host_page_size == 0);
                    }
                    _ => {}
                }
                prop_assert_eq!(Record::decode(&r.encode(), &t).unwrap(), r);
            }
        }

        #[test]
        fn discard_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let t = table();
            if let Ok((e, len)) = DiscardEntry::decode(&bytes, &t) {
                prop_assert!(e.offset + len <= t.get(e.region).unwrap().len);
            }
        }
    }
}
