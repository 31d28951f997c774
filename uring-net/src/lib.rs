//! io_uring TCP/Unix transport for the migration engine.
//!
//! * [`FrameSender`]: one socket + one io_uring. Frames (a small header copied into memory the
//!   sender owns, plus payload [`BufRef`]s pointing at stable memory such as guest RAM) are
//!   coalesced into vectored `SENDMSG` / `SENDMSG_ZC` sends, at most one in flight per socket so
//!   bytes stay in order; short sends are resubmitted first. Payload memory is kept alive until
//!   the kernel is done with it (the send completion, and for zero-copy the notification).
//! * [`FrameReader`]: a blocking, buffered receiver. Blocking `read(2)` wins on latency here:
//!   the receiver thread is woken directly by the network stack and copies in the same syscall,
//!   whereas an io_uring `RECV` adds a hop (poll wakeup → task work → CQE → waiter wakes →
//!   reap) and a ring per reader buys nothing when every connection has its own thread.
//! * [`socket`]: endpoints (`127.0.0.1:4444`, `unix:/path`), streams, listeners and per-role
//!   socket options.
//!
//! See `README.md` for the design rationale and benchmark numbers.

pub mod buf;
pub mod error;
pub mod recv;
pub mod ring;
pub mod send;
pub mod socket;
pub mod stats;

pub use buf::{BufRef, StableMemory};
pub use error::NetError;
pub use recv::FrameReader;
pub use send::{FrameSender, SenderConfig, SubmitPolicy, Waker, ZeroCopy};
pub use socket::{connect, set_pacing_rate, Endpoint, Listener, Role, SocketOptions, Stream};
pub use stats::{SendStats, SendStatsSnapshot};
