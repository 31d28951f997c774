//! Return-path messages (destination → source, on the urgent connection's reverse direction).
//!
//! Same 16-byte header shape as records: `kind u8 | flags u8 | region u16 | len u32 | offset u64`.

use super::record::{decode_header, encode_header};
use super::{handshake::RegionTable, ProtocolError, MAX_ERROR_MESSAGE};

pub const RETURN_HEADER_LEN: usize = 16;

const KIND_REQUEST: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_ERROR: u8 = 3;
const KIND_BITMAP: u8 = 4;
const KIND_PONG: u8 = 5;

/// Largest received-bitmap payload (one bit per host page of one region).
pub const MAX_BITMAP_PAYLOAD: u32 = 16 << 20;

/// Bytes of the received bitmap of a region with `host_pages` pages (whole u64 words).
pub fn bitmap_bytes(host_pages: u64) -> u64 {
    host_pages.div_ceil(64) * 8
}

const DONE_VERIFIED_RAN: u8 = 1;
const DONE_VERIFIED_OK: u8 = 2;

/// A decoded, validated return-path header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnMsg {
    /// Send host pages `[offset, offset+len)` of `region` now: a vCPU is waiting.
    Request { region: u16, offset: u64, len: u32 },
    /// Every page is in place; `verified` is the result of verification if it ran.
    Done { verified: Option<bool> },
    /// The destination failed; `len` bytes of UTF-8 explanation follow.
    Error { len: u32 },
    /// On resume: `len` bytes of `region`'s received bitmap follow (little-endian u64 words,
    /// bit i = host page i is in place).
    Bitmap { region: u16, len: u32 },
    /// Answer to a [`super::Record::Ping`].
    Pong,
}

impl ReturnMsg {
    pub fn payload_len(&self) -> usize {
        match *self {
            ReturnMsg::Error { len } | ReturnMsg::Bitmap { len, .. } => len as usize,
            _ => 0,
        }
    }

    pub fn encode(&self) -> [u8; RETURN_HEADER_LEN] {
        match *self {
            ReturnMsg::Request {
                region,
                offset,
                len,
            } => encode_header(KIND_REQUEST, region, len, offset),
            ReturnMsg::Done { verified } => {
                let mut b = encode_header(KIND_DONE, 0, 0, 0);
                b[1] = match verified {
                    None => 0,
                    Some(false) => DONE_VERIFIED_RAN,
                    Some(true) => DONE_VERIFIED_RAN | DONE_VERIFIED_OK,
                };
                b
            }
            ReturnMsg::Error { len } => encode_header(KIND_ERROR, 0, len, 0),
            ReturnMsg::Bitmap { region, len } => encode_header(KIND_BITMAP, region, len, 0),
            ReturnMsg::Pong => encode_header(KIND_PONG, 0, 0, 0),
        }
    }

    /// Encodes an error message with its header, truncated to the protocol limit.
    pub fn encode_error(message: &str) -> Vec<u8> {
        let msg = super::handshake::truncate_utf8(message, MAX_ERROR_MESSAGE as usize);
        let mut out = ReturnMsg::Error {
            len: msg.len() as u32,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(msg.as_bytes());
        out
    }

    pub fn decode(b: &[u8; RETURN_HEADER_LEN], table: &RegionTable) -> Result<Self, ProtocolError> {
        let (kind, flags, region, len, offset) = decode_header(b);
        match kind {
            KIND_REQUEST => {
                if flags != 0 {
                    return Err(ProtocolError::Reserved {
                        what: "request flags",
                        value: flags as u64,
                    });
                }
                table.check_range(region, offset, len as u64)?;
                Ok(ReturnMsg::Request {
                    region,
                    offset,
                    len,
                })
            }
            KIND_DONE => {
                if region != 0
                    || len != 0
                    || offset != 0
                    || flags & !(DONE_VERIFIED_RAN | DONE_VERIFIED_OK) != 0
                {
                    return Err(ProtocolError::Reserved {
                        what: "done fields",
                        value: flags as u64,
                    });
                }
                let verified = match flags {
                    0 => None,
                    DONE_VERIFIED_RAN => Some(false),
                    f if f == DONE_VERIFIED_RAN | DONE_VERIFIED_OK => Some(true),
                    f => {
                        return Err(ProtocolError::Reserved {
                            what: "done flags",
                            value: f as u64,
                        })
                    }
                };
                Ok(ReturnMsg::Done { verified })
            }
            KIND_ERROR => {
                if flags != 0 || region != 0 || offset != 0 {
                    return Err(ProtocolError::Reserved {
                        what: "error fields",
                        value: offset,
                    });
                }
                if len > MAX_ERROR_MESSAGE {
                    return Err(ProtocolError::TooLong {
                        what: "error message",
                        len: len as u64,
                        max: MAX_ERROR_MESSAGE as u64,
                    });
                }
                Ok(ReturnMsg::Error { len })
            }
            KIND_BITMAP => {
                let info = table.get(region)?;
                let want = bitmap_bytes(info.len / info.host_page_size as u64);
                if flags != 0 || offset != 0 {
                    return Err(ProtocolError::Reserved {
                        what: "bitmap fields",
                        value: offset,
                    });
                }
                if len as u64 != want || len > MAX_BITMAP_PAYLOAD {
                    return Err(ProtocolError::TooLong {
                        what: "received bitmap (must match the region)",
                        len: len as u64,
                        max: want.min(MAX_BITMAP_PAYLOAD as u64),
                    });
                }
                Ok(ReturnMsg::Bitmap { region, len })
            }
            KIND_PONG => {
                if flags != 0 || region != 0 || len != 0 || offset != 0 {
                    return Err(ProtocolError::Reserved {
                        what: "pong fields",
                        value: offset,
                    });
                }
                Ok(ReturnMsg::Pong)
            }
            kind => Err(ProtocolError::UnknownKind {
                what: "return-path message",
                kind,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::handshake::RegionInfo;
    use super::*;
    use proptest::prelude::*;

    fn table() -> RegionTable {
        RegionTable::new(vec![RegionInfo {
            id: 0,
            name: "ram".into(),
            host_page_size: 4096,
            len: 1 << 20,
        }])
        .unwrap()
    }

    #[test]
    fn round_trips() {
        let t = table();
        for m in [
            ReturnMsg::Request {
                region: 0,
                offset: 8192,
                len: 4096,
            },
            ReturnMsg::Done { verified: None },
            ReturnMsg::Done {
                verified: Some(true),
            },
            ReturnMsg::Done {
                verified: Some(false),
            },
            ReturnMsg::Error { len: 12 },
            ReturnMsg::Bitmap { region: 0, len: 32 },
            ReturnMsg::Pong,
        ] {
            assert_eq!(ReturnMsg::decode(&m.encode(), &t).unwrap(), m);
        }
        let e = ReturnMsg::encode_error("boom");
        let hdr: [u8; 16] = e[..16].try_into().unwrap();
        assert_eq!(
            ReturnMsg::decode(&hdr, &t).unwrap(),
            ReturnMsg::Error { len: 4 }
        );
        assert_eq!(&e[16..], b"boom");
    }

    #[test]
    fn rejects_bad_requests() {
        let t = table();
        let bad = |b: [u8; 16]| ReturnMsg::decode(&b, &t).is_err();
        assert!(bad(encode_header(KIND_REQUEST, 0, 4096, 1 << 20)));
        assert!(bad(encode_header(KIND_REQUEST, 0, 100, 0)));
        assert!(bad(encode_header(KIND_REQUEST, 1, 4096, 0)));
        assert!(bad(encode_header(KIND_ERROR, 0, MAX_ERROR_MESSAGE + 1, 0)));
        assert!(bad(encode_header(0, 0, 0, 0)));
        assert!(bad(encode_header(9, 0, 0, 0)));
        assert!(bad(encode_header(KIND_BITMAP, 0, 31, 0)));
        assert!(bad(encode_header(KIND_BITMAP, 1, 32, 0)));
        assert!(bad(encode_header(KIND_PONG, 0, 1, 0)));
        let mut d = ReturnMsg::Done { verified: None }.encode();
        d[1] = 2;
        assert!(bad(d));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform16(any::<u8>())) {
            let t = table();
            if let Ok(ReturnMsg::Request { offset, len, .. }) = ReturnMsg::decode(&bytes, &t) {
                prop_assert!(offset + len as u64 <= 1 << 20);
            }
        }
    }
}
