//! Typed transport errors.

use std::io;

/// Every failure the transport reports. Kernel error codes that matter to the engine get their
/// own variant (see [`NetError::from_errno`]); everything else is carried as [`NetError::Io`].
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The peer closed the connection (EOF on receive, `EPIPE` on send). `mid_frame` is true when
    /// the stream stopped inside a frame (receiver) or while a send was partially done (sender).
    #[error("peer closed the connection{}", if *mid_frame { " in the middle of a frame" } else { "" })]
    PeerClosed {
        /// The stream ended inside a frame / a partially completed send.
        mid_frame: bool,
    },
    /// The connection was reset by the peer (`ECONNRESET`).
    #[error("connection reset by peer")]
    Reset,
    /// An operation was canceled (`ECANCELED`), e.g. because the ring is shutting down.
    #[error("io_uring operation canceled")]
    Canceled,
    /// The completion queue overflowed: completions were lost or are backlogged in the kernel,
    /// so the in-flight accounting can no longer be trusted.
    #[error("io_uring completion queue overflow")]
    CqOverflow,
    /// The kernel ran out of memory (`ENOMEM` / `ENOBUFS`), e.g. while pinning zero-copy pages.
    #[error("kernel out of memory (ENOMEM/ENOBUFS)")]
    NoMemory,
    /// A deadline passed before the operation finished.
    #[error("operation timed out")]
    Timeout,
    /// A required kernel feature (io_uring opcode, setup flag, socket type) is not available.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A caller-supplied argument was invalid (range out of bounds, frame too large, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An endpoint string could not be parsed.
    #[error("invalid endpoint {input:?}: {reason}")]
    BadEndpoint {
        /// The text that failed to parse.
        input: String,
        /// Why it failed.
        reason: &'static str,
    },
    /// The sender failed earlier; it stays failed. The original error is described here.
    #[error("sender is broken after an earlier error: {0}")]
    Broken(String),
    /// Any other I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl NetError {
    /// Map a positive errno value (as returned negated in a CQE) to a typed error.
    /// `mid_frame` is used for `EPIPE`.
    pub fn from_errno(errno: i32, mid_frame: bool) -> NetError {
        match errno {
            libc::EPIPE => NetError::PeerClosed { mid_frame },
            libc::ECONNRESET => NetError::Reset,
            libc::ECANCELED => NetError::Canceled,
            libc::ENOMEM | libc::ENOBUFS => NetError::NoMemory,
            libc::ETIMEDOUT | libc::ETIME => NetError::Timeout,
            libc::EAGAIN => NetError::Timeout,
            e => NetError::Io(io::Error::from_raw_os_error(e)),
        }
    }

    /// Map an `io::Error` from a blocking socket call to a typed error.
    pub fn from_io(err: io::Error, mid_frame: bool) -> NetError {
        match err.raw_os_error() {
            Some(e) => NetError::from_errno(e, mid_frame),
            None => match err.kind() {
                io::ErrorKind::UnexpectedEof => NetError::PeerClosed { mid_frame },
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => NetError::Timeout,
                _ => NetError::Io(err),
            },
        }
    }

    /// True for errors that mean the connection is gone (closed or reset).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, NetError::PeerClosed { .. } | NetError::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert!(matches!(
            NetError::from_errno(libc::EPIPE, true),
            NetError::PeerClosed { mid_frame: true }
        ));
        assert!(matches!(
            NetError::from_errno(libc::ECONNRESET, false),
            NetError::Reset
        ));
        assert!(matches!(
            NetError::from_errno(libc::ECANCELED, false),
            NetError::Canceled
        ));
        assert!(matches!(
            NetError::from_errno(libc::ENOMEM, false),
            NetError::NoMemory
        ));
        assert!(matches!(
            NetError::from_errno(libc::ENOBUFS, false),
            NetError::NoMemory
        ));
        assert!(matches!(
            NetError::from_errno(libc::EAGAIN, false),
            NetError::Timeout
        ));
        match NetError::from_errno(libc::EBADF, false) {
            NetError::Io(e) => assert_eq!(e.raw_os_error(), Some(libc::EBADF)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(NetError::Reset.is_disconnect());
        assert!(!NetError::Timeout.is_disconnect());
    }

    #[test]
    fn io_mapping_and_messages() {
        let e = NetError::from_io(io::Error::from(io::ErrorKind::UnexpectedEof), true);
        assert!(matches!(e, NetError::PeerClosed { mid_frame: true }));
        assert_eq!(
            e.to_string(),
            "peer closed the connection in the middle of a frame"
        );
        let e = NetError::from_io(io::Error::from_raw_os_error(libc::EWOULDBLOCK), false);
        assert!(matches!(e, NetError::Timeout));
        assert_eq!(
            NetError::PeerClosed { mid_frame: false }.to_string(),
            "peer closed the connection"
        );
    }
}
