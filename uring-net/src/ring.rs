//! io_uring setup with flag fallback, opcode probing, `user_data` encoding, overflow checks.

use io_uring::{opcode, IoUring, Probe};
use tracing::debug;

use crate::error::NetError;

/// `IORING_SEND_ZC_REPORT_USAGE` (in the SQE's `ioprio` for `SEND_ZC` / `SENDMSG_ZC`): the
/// notification CQE reports whether the kernel had to copy.
pub const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's `res` when the data was copied.
pub const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// Which send opcodes the running kernel supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSupport {
    /// `IORING_OP_SENDMSG` (vectored copy send).
    pub sendmsg: bool,
    /// `IORING_OP_SEND` (single buffer copy send).
    pub send: bool,
    /// `IORING_OP_SENDMSG_ZC` (vectored zero-copy send, 6.1+).
    pub sendmsg_zc: bool,
    /// `IORING_OP_SEND_ZC` (single buffer zero-copy send, 6.0+).
    pub send_zc: bool,
    /// `IORING_OP_READ` (used by the waker).
    pub read: bool,
}

impl OpSupport {
    /// Ask the kernel (`IORING_REGISTER_PROBE`). If probing itself is unsupported, assume only the
    /// 5.6-era opcodes.
    pub fn probe(ring: &IoUring) -> OpSupport {
        let mut probe = Probe::new();
        match ring.submitter().register_probe(&mut probe) {
            Ok(()) => OpSupport {
                sendmsg: probe.is_supported(opcode::SendMsg::CODE),
                send: probe.is_supported(opcode::Send::CODE),
                sendmsg_zc: probe.is_supported(opcode::SendMsgZc::CODE),
                send_zc: probe.is_supported(opcode::SendZc::CODE),
                read: probe.is_supported(opcode::Read::CODE),
            },
            Err(e) => {
                debug!(error = %e, "io_uring probe failed; assuming no zero-copy opcodes");
                OpSupport {
                    sendmsg: true,
                    send: true,
                    sendmsg_zc: false,
                    send_zc: false,
                    read: true,
                }
            }
        }
    }

    /// Any zero-copy send opcode available.
    pub fn any_zc(&self) -> bool {
        self.sendmsg_zc || self.send_zc
    }

    /// Any copy send opcode available.
    pub fn any_copy(&self) -> bool {
        self.sendmsg || self.send
    }
}

/// Setup flags requested for a ring, and which ones the kernel accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingFlags {
    /// `IORING_SETUP_SINGLE_ISSUER` (6.0+).
    pub single_issuer: bool,
    /// `IORING_SETUP_COOP_TASKRUN` + `IORING_SETUP_TASKRUN_FLAG` (5.19+).
    pub coop_taskrun: bool,
    /// `IORING_SETUP_R_DISABLED`: the ring must be enabled (by its submitter thread, which then
    /// becomes the single issuer) before use.
    pub disabled: bool,
}

/// Build a ring with `entries` SQEs and `cq_entries` CQEs, trying the requested flags and
/// dropping them one at a time if the kernel refuses (`EINVAL`). With `single_issuer`, the ring
/// is created disabled so that the first thread that uses it (after `register_enable_rings`) is
/// the issuer, not the creating thread.
pub fn build_ring(
    entries: u32,
    cq_entries: u32,
    want: RingFlags,
) -> Result<(IoUring, RingFlags), NetError> {
    let mut attempts = vec![want];
    if want.single_issuer {
        attempts.push(RingFlags {
            single_issuer: false,
            disabled: false,
            ..want
        });
    }
    if want.coop_taskrun {
        attempts.push(RingFlags {
            coop_taskrun: false,
            ..want
        });
        attempts.push(RingFlags::default());
    }
    let mut last_err = None;
    for flags in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq_entries);
        if flags.single_issuer {
            b.setup_single_issuer();
        }
        if flags.single_issuer || flags.disabled {
            b.setup_r_disabled();
        }
        if flags.coop_taskrun {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        match b.build(entries) {
            Ok(ring) => {
                let got = RingFlags {
                    disabled: flags.single_issuer || flags.disabled,
                    ..flags
                };
                if got != want {
                    debug!(
                        ?want,
                        ?got,
                        "io_uring setup flags not all supported; fell back"
                    );
                }
                return Ok((ring, got));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_err = Some(e),
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => return Err(NetError::NoMemory),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                return Err(NetError::Unsupported("io_uring is not available (ENOSYS)"))
            }
            Err(e) => return Err(NetError::Io(e)),
        }
    }
    Err(NetError::Io(last_err.unwrap_or_else(|| {
        std::io::Error::from_raw_os_error(libc::EINVAL)
    })))
}

/// Kind of operation encoded in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// A data send (`SENDMSG`, `SEND`, or their zero-copy forms); low bits are the slab key.
    Send = 1,
    /// The waker's eventfd read.
    Waker = 2,
}

const KIND_SHIFT: u32 = 56;
const KEY_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Pack an op kind and a slab key into `user_data`.
pub fn encode_user_data(kind: OpKind, key: usize) -> u64 {
    debug_assert!((key as u64) <= KEY_MASK);
    ((kind as u64) << KIND_SHIFT) | (key as u64 & KEY_MASK)
}

/// Unpack `user_data`; `None` for an unknown kind.
pub fn decode_user_data(user_data: u64) -> Option<(OpKind, usize)> {
    let key = (user_data & KEY_MASK) as usize;
    match (user_data >> KIND_SHIFT) as u8 {
        1 => Some((OpKind::Send, key)),
        2 => Some((OpKind::Waker, key)),
        _ => None,
    }
}

/// Fail with [`NetError::CqOverflow`] if the kernel dropped CQEs (overflow counter) or has CQEs
/// backlogged because the CQ ring was full (`IORING_SQ_CQ_OVERFLOW`). Either means more
/// completions were outstanding than the CQ holds, which our accounting forbids.
pub fn check_overflow(ring: &mut IoUring) -> Result<(), NetError> {
    let dropped = ring.completion().overflow();
    let backlogged = ring.submission().cq_overflow();
    if dropped > 0 || backlogged {
        tracing::error!(dropped, backlogged, "io_uring CQ overflow");
        return Err(NetError::CqOverflow);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_roundtrip() {
        for key in [0usize, 1, 77, (1 << 40) + 5] {
            for kind in [OpKind::Send, OpKind::Waker] {
                assert_eq!(
                    decode_user_data(encode_user_data(kind, key)),
                    Some((kind, key))
                );
            }
        }
        assert_eq!(decode_user_data(0), None);
        assert_eq!(decode_user_data(9 << 56), None);
    }

    #[test]
    fn build_with_flags_and_probe() {
        let want = RingFlags {
            single_issuer: true,
            coop_taskrun: true,
            disabled: false,
        };
        let (ring, got) = build_ring(8, 16, want).unwrap();
        assert_eq!(ring.params().cq_entries(), 16);
        // Linux 6.x accepts both; the ring then starts disabled.
        assert!(got.single_issuer && got.coop_taskrun && got.disabled);
        let ops = OpSupport::probe(&ring);
        assert!(ops.sendmsg && ops.send && ops.read);
        ring.submitter().register_enable_rings().unwrap();
    }

    #[test]
    fn overflow_is_detected() {
        // 4 CQEs of room, 8 NOPs (two rounds of 4): the kernel backlogs (FEAT_NODROP) or
        // drops the rest.
        let (mut ring, _) = build_ring(4, 4, RingFlags::default()).unwrap();
        check_overflow(&mut ring).unwrap();
        for round in 0..2 {
            for i in 0..4 {
                let e = opcode::Nop::new().build().user_data(round * 4 + i);
                // SAFETY: a NOP references no memory.
                unsafe { ring.submission().push(&e).unwrap() };
            }
            ring.submit().unwrap();
        }
        assert!(matches!(
            check_overflow(&mut ring),
            Err(NetError::CqOverflow)
        ));
    }
}
