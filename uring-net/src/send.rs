//! Ordered, coalescing (zero-copy) frame sender on its own io_uring.
//!
//! # Model
//!
//! * [`FrameSender::push`] appends a frame (header copied, payload `BufRef`s cloned) to a queue
//!   of segments. The [`SubmitPolicy`] decides when the queued frames are *sealed*, i.e. may be
//!   sent; a full send's worth (`max_send_bytes` / `max_iovecs`) is sealed automatically.
//! * At most **one data send is in flight** per socket. Sealed segments are coalesced into one
//!   vectored `SENDMSG` (or `SENDMSG_ZC`) of up to `max_iovecs` iovecs / `max_send_bytes` bytes.
//!   A short send is resubmitted (iovecs advanced) before anything else, so byte order on the
//!   wire is exactly push order.
//! * Each send is a slot in a `slab::Slab` keyed by `user_data` (op kind in the top byte). The
//!   slot owns the header copies, the iovec array, the `msghdr` and the payload `BufRef` clones;
//!   it is freed only after the send completed **and** every zero-copy notification
//!   (`IORING_CQE_F_NOTIF`) for it arrived, so the key is never reused early and the memory
//!   stays alive while the kernel may still read it.
//! * Expected CQEs are counted (2 per zero-copy send, 1 per copy send, 1 for the waker's poll);
//!   a send is only submitted if its CQEs fit in the CQ, so the CQ cannot overflow. An overflow
//!   is still checked for and reported as [`NetError::CqOverflow`].

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use tracing::{debug, error, trace, warn};

use crate::buf::BufRef;
use crate::error::NetError;
use crate::ring::{
    build_ring, check_overflow, decode_user_data, encode_user_data, OpKind, OpSupport, RingFlags,
    IORING_NOTIF_USAGE_ZC_COPIED, IORING_SEND_ZC_REPORT_USAGE,
};
use crate::socket::Stream;
use crate::stats::SendStats;

/// When to use zero-copy sends (`SEND_ZC` / `SENDMSG_ZC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Zero-copy for sends of at least `min_bytes` (pinning pages costs more than copying small
    /// sends); plain `SENDMSG` otherwise, and silently plain if the kernel lacks the opcodes.
    /// Gives up on zero copy for the connection once the kernel has reported 8 sends in a row
    /// as copied anyway (loopback, veth, NICs without scatter-gather).
    Auto {
        /// Smallest send (bytes) that goes zero-copy.
        min_bytes: usize,
    },
    /// Every send zero-copy. [`FrameSender::new`] fails with [`NetError::Unsupported`] if the
    /// kernel has neither `SEND_ZC` nor `SENDMSG_ZC`. Sockets that refuse zero-copy (Unix
    /// sockets, `EOPNOTSUPP`) fall back to copying sends.
    Always,
    /// Never zero-copy.
    Never,
}

/// `ZeroCopy::Auto` gives up on zero copy after this many sends in a row that the kernel
/// reported as copied.
const AUTO_ZC_GIVE_UP: u32 = 8;

impl Default for ZeroCopy {
    fn default() -> Self {
        ZeroCopy::Auto {
            min_bytes: 64 << 10,
        }
    }
}

/// When pushed frames are sealed for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitPolicy {
    /// After this many frames.
    Count(usize),
    /// After this many bytes.
    Bytes(usize),
    /// Only on [`FrameSender::flush`] (or when a full send's worth is queued).
    Flush,
}

/// Sender configuration. Start from [`SenderConfig::bulk`] or [`SenderConfig::urgent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// SQ entries; the CQ gets twice as many (2 CQEs per zero-copy send).
    pub ring_entries: u32,
    /// Zero-copy policy.
    pub zero_copy: ZeroCopy,
    /// When pushed frames become sendable.
    pub submit: SubmitPolicy,
    /// Most bytes coalesced into one send (default 1 MiB).
    pub max_send_bytes: usize,
    /// Most iovecs in one send (default 512, capped at `IOV_MAX` = 1024).
    pub max_iovecs: usize,
    /// `IORING_SETUP_SINGLE_ISSUER` (the first thread that uses the sender becomes the issuer).
    pub single_issuer: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (+ `TASKRUN_FLAG`).
    pub coop_taskrun: bool,
}

impl SenderConfig {
    /// Background page stream: 64-entry ring, zero-copy for sends ≥ 64 KiB, sealed every 64
    /// frames, up to 1 MiB / 512 iovecs per send.
    pub fn bulk() -> Self {
        SenderConfig {
            ring_entries: 64,
            zero_copy: ZeroCopy::default(),
            submit: SubmitPolicy::Count(64),
            max_send_bytes: 1 << 20,
            max_iovecs: 512,
            single_issuer: true,
            coop_taskrun: true,
        }
    }

    /// Urgent replies: 8-entry ring, sent on [`FrameSender::flush`], never zero-copy (4 KiB pages
    /// are cheaper to copy than to pin and notify).
    pub fn urgent() -> Self {
        SenderConfig {
            ring_entries: 8,
            zero_copy: ZeroCopy::Never,
            submit: SubmitPolicy::Flush,
            max_send_bytes: 256 << 10,
            max_iovecs: 64,
            single_issuer: true,
            coop_taskrun: true,
        }
    }
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig::bulk()
    }
}

/// Wakes a [`FrameSender::wait`] from another thread (eventfd polled on the sender's ring).
#[derive(Clone)]
pub struct Waker {
    fd: Arc<OwnedFd>,
}

impl Waker {
    /// Make a concurrent (or the next) `wait()` return.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live stack `u64` to an eventfd we own (kept alive by the
        // `Arc`). EAGAIN (counter saturated) means a wakeup is already pending, so it is ignored.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl fmt::Debug for Waker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waker")
            .field("eventfd", &self.fd.as_raw_fd())
            .finish()
    }
}

/// A queued, not yet sent piece of the byte stream.
enum Seg {
    /// `len` bytes at the front of `hdr_queue[hdr_head..]`.
    Header(usize),
    Payload(BufRef),
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Header(n) => *n,
            Seg::Payload(b) => b.len(),
        }
    }
}

/// One data send (possibly resubmitted after short sends) and everything it points at.
struct SendOp {
    /// Copies of the headers in this send; `iov` points into it (capacity reserved up front, so
    /// it never reallocates while referenced).
    hdrs: Vec<u8>,
    /// Payload owners, kept alive until the send and all notifications completed.
    bufs: Vec<BufRef>,
    iov: Vec<libc::iovec>,
    /// First iovec not completely sent.
    iov_pos: usize,
    /// Heap-allocated so its address is stable while the slab grows.
    msg: Box<libc::msghdr>,
    total: usize,
    sent: usize,
    /// The current (or last) submission is zero-copy.
    zc: bool,
    /// Submitted and its send CQE not reaped yet.
    in_kernel: bool,
    /// Zero-copy notifications still to come.
    notifs_pending: u32,
    /// No more submissions for this op (complete or failed).
    done: bool,
}

// SAFETY: the raw pointers inside (`iov` entries, `msg.msg_iov`) point only into memory owned by
// this op (`hdrs`, `iov`) or kept alive by its `BufRef`s (which are `Send + Sync`). Moving the op
// to another thread does not move any of that heap memory.
unsafe impl Send for SendOp {}

impl SendOp {
    fn new() -> Self {
        // SAFETY: `msghdr` is a plain C struct for which all-zero bytes are a valid value (null
        // pointers, zero lengths).
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        SendOp {
            hdrs: Vec::new(),
            bufs: Vec::new(),
            iov: Vec::new(),
            iov_pos: 0,
            msg: Box::new(msg),
            total: 0,
            sent: 0,
            zc: false,
            in_kernel: false,
            notifs_pending: 0,
            done: false,
        }
    }

    fn reset(&mut self) {
        self.hdrs.clear();
        self.bufs.clear();
        self.iov.clear();
        self.iov_pos = 0;
        self.msg.msg_iov = std::ptr::null_mut();
        self.msg.msg_iovlen = 0;
        self.total = 0;
        self.sent = 0;
        self.zc = false;
        self.in_kernel = false;
        self.notifs_pending = 0;
        self.done = false;
    }

    /// Skip `n` sent bytes in the iovec array.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.iov_pos < self.iov.len() {
            let v = &mut self.iov[self.iov_pos];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.iov_pos += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

/// Why the sender stopped.
#[derive(Debug, Clone)]
enum Failure {
    Errno { errno: i32, mid_frame: bool },
    CqOverflow,
    Other(String),
}

impl Failure {
    fn to_error(&self) -> NetError {
        match self {
            Failure::Errno { errno, mid_frame } => NetError::from_errno(*errno, *mid_frame),
            Failure::CqOverflow => NetError::CqOverflow,
            Failure::Other(s) => NetError::Broken(s.clone()),
        }
    }
}

const OP_POOL: usize = 8;
const IOV_MAX: usize = 1024;
const WAKER_KEY: usize = 0;
/// How long `Drop` waits for the kernel to release in-flight buffers before leaking them.
/// Zero-copy notifications only arrive once the socket frees its skbs, which a stuck peer can
/// delay indefinitely.
const DROP_WAIT: Duration = Duration::from_secs(1);

/// One socket + one io_uring: ordered, coalesced, optionally zero-copy frame sends.
///
/// Not `Sync`; `Send` so it can be built on one thread and moved to its owner thread. With
/// `single_issuer`, the ring is created disabled and enabled by the first thread that calls
/// `push`/`flush`/`poll`/`wait`/`drain`; only that thread may use it afterwards.
///
/// Dropping a sender with sends still in flight shuts the socket down and waits (bounded) for
/// the kernel to release the buffers; call [`drain`](Self::drain) first to deliver everything.
pub struct FrameSender {
    ring: IoUring,
    stream: Stream,
    fd: i32,
    ops: OpSupport,
    flags: RingFlags,
    enabled: bool,
    cfg: SenderConfig,
    max_iovecs: usize,
    max_send_bytes: usize,
    cq_cap: usize,
    expected_cqes: usize,
    inflight: Slab<SendOp>,
    pool: Vec<SendOp>,
    active: Option<usize>,
    queue: VecDeque<Seg>,
    sealed: usize,
    queued_bytes: usize,
    /// Bytes of frames pushed since the sender was made (see `pushed_bytes`).
    pushed_bytes: u64,
    unsealed_frames: usize,
    unsealed_bytes: usize,
    unsealed_segs: usize,
    hdr_queue: Vec<u8>,
    hdr_head: usize,
    socket_zc_ok: bool,
    /// Zero-copy notifications in a row that reported a copy (see `want_zc`).
    zc_copied_run: u32,
    wait_all: bool,
    eventfd: Arc<OwnedFd>,
    waker_armed: bool,
    woken: bool,
    stats: Arc<SendStats>,
    failed: Option<Failure>,
    cqe_scratch: Vec<(u64, i32, u32)>,
    _not_sync: PhantomData<Cell<()>>,
}

impl fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameSender")
            .field("fd", &self.fd)
            .field("ops", &self.ops)
            .field("flags", &self.flags)
            .field("inflight", &self.inflight.len())
            .field("queued_bytes", &self.queued_bytes)
            .field("expected_cqes", &self.expected_cqes)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl FrameSender {
    /// Create the sender: builds the ring (falling back on unsupported setup flags), probes the
    /// send opcodes and creates the waker eventfd.
    pub fn new(stream: Stream, cfg: SenderConfig) -> Result<Self, NetError> {
        Self::build(stream, cfg, None)
    }

    /// Like [`new`](Self::new) but pretends the kernel supports only `ops` (intersected with
    /// what it really supports). For testing the fallback paths.
    #[doc(hidden)]
    pub fn new_with_ops(
        stream: Stream,
        cfg: SenderConfig,
        ops: OpSupport,
    ) -> Result<Self, NetError> {
        Self::build(stream, cfg, Some(ops))
    }

    fn build(
        stream: Stream,
        cfg: SenderConfig,
        limit: Option<OpSupport>,
    ) -> Result<Self, NetError> {
        let entries = cfg.ring_entries.clamp(4, 4096).next_power_of_two();
        let want = RingFlags {
            single_issuer: cfg.single_issuer,
            coop_taskrun: cfg.coop_taskrun,
            disabled: false,
        };
        let (ring, flags) = build_ring(entries, entries * 2, want)?;
        let mut ops = OpSupport::probe(&ring);
        if let Some(l) = limit {
            ops = OpSupport {
                sendmsg: ops.sendmsg && l.sendmsg,
                send: ops.send && l.send,
                sendmsg_zc: ops.sendmsg_zc && l.sendmsg_zc,
                send_zc: ops.send_zc && l.send_zc,
                read: ops.read && l.read,
            };
        }
        if !ops.any_copy() {
            return Err(NetError::Unsupported("io_uring SEND/SENDMSG"));
        }
        if cfg.zero_copy == ZeroCopy::Always && !ops.any_zc() {
            return Err(NetError::Unsupported(
                "io_uring SEND_ZC/SENDMSG_ZC (ZeroCopy::Always)",
            ));
        }
        // AF_UNIX has no MSG_ZEROCOPY support: use copying sends from the start.
        let socket_zc_ok = stream.is_tcp();
        if cfg.zero_copy == ZeroCopy::Always && !socket_zc_ok {
            debug!("zero-copy requested on a Unix socket; using copying sends");
        }
        // SAFETY: plain syscall; the returned descriptor (if valid) is owned by the OwnedFd.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(NetError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a freshly created descriptor that nothing else owns.
        let eventfd = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let cq_cap = ring.params().cq_entries() as usize;
        let max_iovecs = cfg.max_iovecs.clamp(1, IOV_MAX);
        let max_send_bytes = cfg.max_send_bytes.clamp(1, 1 << 30);
        debug!(entries, cq_cap, ?flags, ?ops, "FrameSender ring ready");
        Ok(FrameSender {
            fd: stream.as_raw_fd(),
            ring,
            stream,
            ops,
            flags,
            enabled: !flags.disabled,
            cfg,
            max_iovecs,
            max_send_bytes,
            cq_cap,
            expected_cqes: 0,
            inflight: Slab::with_capacity(16),
            pool: Vec::new(),
            active: None,
            queue: VecDeque::new(),
            sealed: 0,
            queued_bytes: 0,
            pushed_bytes: 0,
            unsealed_frames: 0,
            unsealed_bytes: 0,
            unsealed_segs: 0,
            hdr_queue: Vec::new(),
            hdr_head: 0,
            socket_zc_ok,
            zc_copied_run: 0,
            wait_all: true,
            eventfd,
            waker_armed: false,
            woken: false,
            stats: Arc::new(SendStats::default()),
            failed: None,
            cqe_scratch: Vec::with_capacity(64),
            _not_sync: PhantomData,
        })
    }

    /// Queue one frame. The header is copied; the payload buffers are kept alive (cloned) until
    /// the kernel has finished with them. Submits according to the [`SubmitPolicy`]; never
    /// blocks.
    pub fn push(&mut self, header: &[u8], payload: &[BufRef]) -> Result<(), NetError> {
        if let Some(f) = &self.failed {
            return Err(f.to_error());
        }
        let bytes = self.enqueue(header, payload);
        self.pushed_bytes += bytes as u64;
        SendStats::add(&self.stats.frames, 1);
        let policy = match self.cfg.submit {
            SubmitPolicy::Count(n) => self.unsealed_frames >= n.max(1),
            SubmitPolicy::Bytes(n) => self.unsealed_bytes >= n.max(1),
            SubmitPolicy::Flush => false,
        };
        let full =
            self.unsealed_bytes >= self.max_send_bytes || self.unsealed_segs >= self.max_iovecs;
        trace!(bytes, policy, full, "frame queued");
        if policy || full {
            self.seal();
            self.kick()?;
        }
        Ok(())
    }

    /// Append a frame to the queue (no policy, no submission). Returns its size in bytes.
    fn enqueue(&mut self, header: &[u8], payload: &[BufRef]) -> usize {
        let mut bytes = 0;
        if !header.is_empty() {
            self.hdr_queue.extend_from_slice(header);
            self.queue.push_back(Seg::Header(header.len()));
            bytes += header.len();
            self.unsealed_segs += 1;
        }
        for b in payload.iter().filter(|b| !b.is_empty()) {
            self.queue.push_back(Seg::Payload(b.clone()));
            bytes += b.len();
            self.unsealed_segs += 1;
        }
        self.queued_bytes += bytes;
        self.unsealed_bytes += bytes;
        self.unsealed_frames += 1;
        bytes
    }

    /// Make everything queued sendable and submit it now (if a send is in flight, the queued
    /// data goes out right after it completes, on a later `poll`/`wait`).
    pub fn flush(&mut self) -> Result<(), NetError> {
        if let Some(f) = &self.failed {
            return Err(f.to_error());
        }
        self.seal();
        self.kick()
    }

    /// Reap completions without blocking: resubmit short-send remainders, start the next batch,
    /// release buffers whose notifications arrived.
    pub fn poll(&mut self) -> Result<(), NetError> {
        self.poll_inner().map(|_| ())
    }

    /// Block until at least one completion arrives, the [`Waker`] is woken, or `timeout`
    /// passes (not an error); then `poll()`.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<(), NetError> {
        if self.poll_inner()? > 0 {
            return Ok(());
        }
        self.block(timeout)?;
        self.poll()
    }

    /// Seal and send everything, then wait until every send completed and every zero-copy
    /// notification arrived. [`NetError::Timeout`] if that takes longer than `timeout`; the
    /// sender's error if a send failed.
    pub fn drain(&mut self, timeout: Option<Duration>) -> Result<(), NetError> {
        // A timeout too long to represent waits without one.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        self.flush()?;
        loop {
            self.poll()?;
            if self.is_idle() {
                return Ok(());
            }
            let remaining = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(NetError::Timeout);
                    }
                    Some(d - now)
                }
                None => None,
            };
            self.block(remaining)?;
        }
    }

    /// Bytes queued or in flight whose send has not completed yet (zero-copy sends waiting only
    /// for their notification are not counted: the socket has the bytes).
    pub fn backlog_bytes(&self) -> usize {
        let active = self
            .active
            .and_then(|k| self.inflight.get(k))
            .map_or(0, |op| op.total - op.sent);
        self.queued_bytes + active
    }

    /// Nothing queued, nothing in flight, no notification pending.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty()
    }

    /// Waits up to `timeout` until the kernel holds no submitted send whose completion is still
    /// to come, without submitting anything new (also after a failure). Returns whether that
    /// was reached: then [`accepted_bytes`](Self::accepted_bytes) is exactly what the kernel
    /// took, nothing more can follow from the sends made so far.
    pub fn settle(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Reap only: queued frames must not go out now. A failed send's completion is
            // reaped like any other (the error itself was reported to the caller already).
            let _ = self.reap();
            if !self.inflight.iter().any(|(_, op)| op.in_kernel) {
                return true;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) || self.block(deadline.map(|d| d - now)).is_err()
            {
                return !self.inflight.iter().any(|(_, op)| op.in_kernel);
            }
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<SendStats> {
        Arc::clone(&self.stats)
    }

    /// Bytes of this connection's stream the kernel has accepted so far (a cheap read of
    /// [`SendStats::bytes`] without cloning the `Arc`).
    pub fn accepted_bytes(&self) -> u64 {
        SendStats::load(&self.stats.bytes)
    }

    /// Bytes of this connection's stream pushed so far (headers and payloads, sent or still
    /// queued): where the next frame will start. Compare with
    /// [`accepted_bytes`](Self::accepted_bytes) to tell whether a frame has reached the kernel.
    pub fn pushed_bytes(&self) -> u64 {
        self.pushed_bytes
    }

    /// A handle that makes `wait()` return from another thread.
    pub fn waker(&self) -> Waker {
        Waker {
            fd: Arc::clone(&self.eventfd),
        }
    }

    /// Returns (and clears) whether the waker fired since the last call.
    pub fn take_woken(&mut self) -> bool {
        std::mem::take(&mut self.woken)
    }

    /// The socket.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Send with `MSG_WAITALL` (default `true`): the kernel retries a partially sent stream
    /// send internally (poll-driven) and posts one CQE for the whole send, so short sends are
    /// rare (errors, signals). With `false`, every partial send comes back as a short CQE and
    /// the sender resubmits the remainder itself (more CQEs and `io_uring_enter` calls).
    pub fn set_wait_all(&mut self, wait_all: bool) {
        self.wait_all = wait_all;
    }

    /// The ring setup flags the kernel accepted.
    pub fn ring_flags(&self) -> RingFlags {
        self.flags
    }

    /// The send opcodes in use.
    pub fn op_support(&self) -> OpSupport {
        self.ops
    }

    /// The configuration.
    pub fn config(&self) -> &SenderConfig {
        &self.cfg
    }

    /// The first error that broke the sender, if any.
    pub fn failure(&self) -> Option<NetError> {
        self.failed.as_ref().map(Failure::to_error)
    }

    // ---------------------------------------------------------------------------------------

    fn seal(&mut self) {
        self.sealed = self.queue.len();
        self.unsealed_frames = 0;
        self.unsealed_bytes = 0;
        self.unsealed_segs = 0;
    }

    /// Enable the ring on first use (this thread becomes the single issuer) and arm the waker.
    fn ensure_ready(&mut self) -> Result<(), NetError> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
            trace!(fd = self.fd, "ring enabled");
        }
        if !self.waker_armed && self.expected_cqes < self.cq_cap {
            let e = opcode::PollAdd::new(types::Fd(self.eventfd.as_raw_fd()), libc::POLLIN as u32)
                .build()
                .user_data(encode_user_data(OpKind::Waker, WAKER_KEY));
            self.push_sqe(&e)?;
            self.expected_cqes += 1;
            self.waker_armed = true;
        }
        Ok(())
    }

    /// Start work after a seal: reap what is there (no syscall), start a send, submit if needed.
    fn kick(&mut self) -> Result<(), NetError> {
        self.ensure_ready()?;
        self.reap()?;
        self.pump()?;
        if self.need_enter() {
            self.enter(0, None)?;
            self.reap()?;
            self.pump()?;
            if !self.ring.submission().is_empty() {
                self.enter(0, None)?;
            }
        }
        match &self.failed {
            Some(f) => Err(f.to_error()),
            None => Ok(()),
        }
    }

    /// Returns the number of CQEs reaped.
    fn poll_inner(&mut self) -> Result<usize, NetError> {
        self.ensure_ready()?;
        let mut reaped = self.reap()?;
        self.pump()?;
        // Each round submits (running task work) and reaps inline completions; bounded so a
        // fast socket cannot keep us here forever.
        for _ in 0..64 {
            if !self.need_enter() {
                break;
            }
            self.enter(0, None)?;
            let n = self.reap()?;
            reaped += n;
            self.pump()?;
            if n == 0 && self.ring.submission().is_empty() {
                break;
            }
        }
        match &self.failed {
            Some(f) => Err(f.to_error()),
            None => Ok(reaped),
        }
    }

    fn need_enter(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.taskrun()
    }

    /// Wait for one CQE (or timeout), submitting anything queued.
    fn block(&mut self, timeout: Option<Duration>) -> Result<(), NetError> {
        self.ensure_ready()?;
        self.ring.completion().sync();
        if !self.ring.completion().is_empty() {
            return Ok(());
        }
        self.enter(1, timeout)
    }

    /// One `io_uring_enter`. `want` = CQEs to wait for. Timeouts and signals are not errors.
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<(), NetError> {
        SendStats::add(&self.stats.submits, 1);
        let r = match timeout {
            Some(t) if want > 0 => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            _ => self.ring.submitter().submit_and_wait(want),
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) => Ok(()),
                // The kernel could not allocate for submission right now; the SQEs stay
                // queued and are retried on the next enter.
                Some(libc::EAGAIN) | Some(libc::EBUSY) => Ok(()),
                Some(libc::EEXIST) => Err(NetError::Unsupported(
                    "ring used from a second thread (IORING_SETUP_SINGLE_ISSUER)",
                )),
                _ => Err(NetError::Io(e)),
            },
        }
    }

    fn push_sqe(&mut self, e: &squeue::Entry) -> Result<(), NetError> {
        loop {
            // SAFETY: every SQE we build points only at memory owned by an in-flight slab entry
            // (headers, iovecs, msghdr, `BufRef` clones) or the sender's eventfd, all of which
            // stay alive until the matching CQE(s) are reaped (see `SendOp`).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            // SQ full (cannot happen with our at-most-two-SQEs-per-enter use, but be safe).
            self.enter(0, None)?;
        }
    }

    /// Reap all available CQEs. Returns how many.
    fn reap(&mut self) -> Result<usize, NetError> {
        if let Err(e) = check_overflow(&mut self.ring) {
            self.fail(Failure::CqOverflow);
            // Still process what is there so buffers get released.
            let _ = e;
        }
        let mut scratch = std::mem::take(&mut self.cqe_scratch);
        scratch.clear();
        scratch.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let n = scratch.len();
        for &(ud, res, flags) in &scratch {
            self.handle_cqe(ud, res, flags);
        }
        self.cqe_scratch = scratch;
        Ok(n)
    }

    fn handle_cqe(&mut self, ud: u64, res: i32, flags: u32) {
        self.expected_cqes = self.expected_cqes.saturating_sub(1);
        match decode_user_data(ud) {
            Some((OpKind::Waker, _)) => {
                self.waker_armed = false;
                self.woken = true;
                let mut v: u64 = 0;
                // SAFETY: reads 8 bytes into a live stack `u64` from our non-blocking eventfd
                // (resets its counter; EAGAIN if already reset is fine).
                let _ =
                    unsafe { libc::read(self.eventfd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
                if res < 0 && res != -libc::ECANCELED {
                    warn!(errno = -res, "waker poll failed");
                }
            }
            Some((OpKind::Send, key)) => self.handle_send_cqe(key, res, flags),
            None => error!(user_data = ud, "CQE with unknown user_data"),
        }
    }

    fn handle_send_cqe(&mut self, key: usize, res: i32, flags: u32) {
        self.handle_send_cqe_inner(key, res, flags);
        if self.failed.is_some() {
            // A failed sender never resubmits: a short send that completed after the failure
            // ends its op here.
            self.abandon_idle_ops();
        }
    }

    /// Mark every op that the kernel does not hold right now as finished and release it (once
    /// its notifications are in).
    fn abandon_idle_ops(&mut self) {
        let idle: Vec<usize> = self
            .inflight
            .iter()
            .filter(|(_, op)| !op.in_kernel && !op.done)
            .map(|(k, _)| k)
            .collect();
        for k in idle {
            self.inflight[k].done = true;
            if self.active == Some(k) {
                self.active = None;
            }
            self.maybe_release(k);
        }
    }

    fn handle_send_cqe_inner(&mut self, key: usize, res: i32, flags: u32) {
        let Some(op) = self.inflight.get_mut(key) else {
            error!(key, "CQE for a free in-flight slot");
            return;
        };
        if cqueue::notif(flags) {
            op.notifs_pending = op.notifs_pending.saturating_sub(1);
            SendStats::add(&self.stats.notifications, 1);
            if (res as u32) & IORING_NOTIF_USAGE_ZC_COPIED != 0 {
                SendStats::add(&self.stats.zc_copied, 1);
                self.zc_copied_run += 1;
            } else {
                self.zc_copied_run = 0;
            }
            self.maybe_release(key);
            return;
        }
        op.in_kernel = false;
        SendStats::add(&self.stats.completions, 1);
        if op.zc {
            if cqueue::more(flags) {
                op.notifs_pending += 1;
            } else {
                // We reserved a CQE for a notification that will not come.
                self.expected_cqes = self.expected_cqes.saturating_sub(1);
            }
        }
        if res < 0 {
            let errno = -res;
            if op.zc && errno == libc::EOPNOTSUPP {
                warn!(
                    fd = self.fd,
                    "socket refuses zero-copy sends; falling back to copying"
                );
                self.socket_zc_ok = false;
                op.zc = false;
                return; // still active; pump() resubmits it as a copying send
            }
            if errno == libc::EAGAIN || errno == libc::EINTR {
                return; // retry
            }
            let mid_frame = op.sent > 0;
            op.done = true;
            self.active = None;
            debug!(fd = self.fd, errno, "send failed");
            self.fail(Failure::Errno { errno, mid_frame });
            self.maybe_release(key);
            return;
        }
        let n = res as usize;
        SendStats::add(&self.stats.bytes, n as u64);
        op.sent += n;
        if op.sent < op.total {
            if n == 0 {
                op.done = true;
                self.active = None;
                self.fail(Failure::Other("send made no progress (returned 0)".into()));
                self.maybe_release(key);
                return;
            }
            SendStats::add(&self.stats.short_sends, 1);
            op.advance(n);
            trace!(
                key,
                sent = op.sent,
                total = op.total,
                "short send; resubmitting remainder"
            );
            return; // still active; pump() resubmits the remainder first
        }
        op.done = true;
        self.active = None;
        self.maybe_release(key);
    }

    fn maybe_release(&mut self, key: usize) {
        let free = self
            .inflight
            .get(key)
            .is_some_and(|op| op.done && op.notifs_pending == 0);
        if free {
            let mut op = self.inflight.remove(key);
            op.reset(); // drops the BufRef clones and header copies
            if self.pool.len() < OP_POOL {
                self.pool.push(op);
            }
        }
    }

    /// Record the first failure. Queued frames will never be sent: release them now (they were
    /// never handed to the kernel). In-flight ops are released as their CQEs arrive.
    fn fail(&mut self, f: Failure) {
        if self.failed.is_none() {
            debug!(fd = self.fd, failure = ?f, dropped_bytes = self.queued_bytes, "sender failed");
            self.failed = Some(f);
        }
        self.queue.clear();
        self.sealed = 0;
        self.queued_bytes = 0;
        self.unsealed_frames = 0;
        self.unsealed_bytes = 0;
        self.unsealed_segs = 0;
        self.hdr_queue.clear();
        self.hdr_head = 0;
        self.abandon_idle_ops();
    }

    /// Submit the active op's remainder, or start the next batch. Respects the CQ budget.
    fn pump(&mut self) -> Result<(), NetError> {
        if self.failed.is_some() {
            return Ok(());
        }
        if let Some(key) = self.active {
            if !self.inflight[key].in_kernel {
                self.issue(key)?;
            }
            return Ok(());
        }
        if self.sealed == 0 || self.expected_cqes + 2 > self.cq_cap {
            return Ok(());
        }
        let key = self.build_batch();
        self.active = Some(key);
        self.issue(key)
    }

    fn iov_limit(&self) -> usize {
        let zc_only_single =
            self.cfg.zero_copy == ZeroCopy::Always && self.socket_zc_ok && !self.ops.sendmsg_zc;
        if zc_only_single || !self.ops.sendmsg {
            1
        } else {
            self.max_iovecs
        }
    }

    /// Move sealed segments from the queue into a new in-flight op.
    fn build_batch(&mut self) -> usize {
        let limit = self.iov_limit();
        // Pass 1: how many segments, how many header bytes, whether the last one is split.
        let (mut nsegs, mut bytes, mut hdr_bytes, mut split) = (0usize, 0usize, 0usize, None);
        for seg in self.queue.iter().take(self.sealed) {
            if nsegs == limit || bytes >= self.max_send_bytes {
                break;
            }
            let room = self.max_send_bytes - bytes;
            let len = seg.len();
            match seg {
                Seg::Header(_) if len > room && nsegs > 0 => break,
                Seg::Header(_) => hdr_bytes += len,
                Seg::Payload(_) if len > room => {
                    split = Some(room);
                    nsegs += 1;
                    bytes += room;
                    break;
                }
                Seg::Payload(_) => {}
            }
            nsegs += 1;
            bytes += len;
        }
        let mut op = self.pool.pop().unwrap_or_else(SendOp::new);
        // Common case: this send takes every queued header. Then the header queue itself
        // becomes the op's header arena (no second copy); the op's old, empty vector becomes
        // the new header queue.
        let take_all_hdrs =
            hdr_bytes > 0 && self.hdr_head == 0 && hdr_bytes == self.hdr_queue.len();
        if take_all_hdrs {
            std::mem::swap(&mut op.hdrs, &mut self.hdr_queue);
        } else {
            op.hdrs.reserve_exact(hdr_bytes);
        }
        let mut hdr_off = 0;
        op.iov.reserve(nsegs);
        op.bufs.reserve(nsegs);
        for i in 0..nsegs {
            let seg = self.queue.pop_front().expect("counted in pass 1");
            match seg {
                Seg::Header(len) if take_all_hdrs => {
                    op.iov.push(libc::iovec {
                        iov_base: op.hdrs[hdr_off..].as_ptr() as *mut libc::c_void,
                        iov_len: len,
                    });
                    hdr_off += len;
                }
                Seg::Header(len) => {
                    let off = op.hdrs.len();
                    op.hdrs
                        .extend_from_slice(&self.hdr_queue[self.hdr_head..self.hdr_head + len]);
                    self.hdr_head += len;
                    // `hdrs` had `hdr_bytes` reserved, so it has not reallocated: earlier
                    // iovecs into it stay valid.
                    op.iov.push(libc::iovec {
                        iov_base: op.hdrs[off..].as_ptr() as *mut libc::c_void,
                        iov_len: len,
                    });
                }
                Seg::Payload(b) => {
                    let b = match split {
                        Some(at) if i == nsegs - 1 => {
                            let (head, tail) = b.split_at(at);
                            self.queue.push_front(Seg::Payload(tail));
                            head
                        }
                        _ => b,
                    };
                    op.iov.push(libc::iovec {
                        iov_base: b.as_ptr() as *mut libc::c_void,
                        iov_len: b.len(),
                    });
                    op.bufs.push(b);
                }
            }
        }
        self.sealed -= if split.is_some() { nsegs - 1 } else { nsegs };
        self.queued_bytes -= bytes;
        if self.hdr_head == self.hdr_queue.len() {
            self.hdr_queue.clear();
            self.hdr_head = 0;
        } else if self.hdr_head >= 1 << 20 {
            self.hdr_queue.drain(..self.hdr_head);
            self.hdr_head = 0;
        }
        op.total = bytes;
        op.zc = self.want_zc(bytes, op.iov.len());
        self.inflight.insert(op)
    }

    fn want_zc(&self, bytes: usize, iovs: usize) -> bool {
        let usable = self.socket_zc_ok && (self.ops.sendmsg_zc || (self.ops.send_zc && iovs == 1));
        match self.cfg.zero_copy {
            ZeroCopy::Never => false,
            ZeroCopy::Always => usable,
            // The kernel reports when it copied a "zero-copy" send anyway (loopback, veth,
            // devices without scatter-gather): then zero copy is pure overhead (two CQEs and
            // page pinning), so Auto stops using it for this connection.
            ZeroCopy::Auto { min_bytes } => {
                usable && bytes >= min_bytes && self.zc_copied_run < AUTO_ZC_GIVE_UP
            }
        }
    }

    /// Submit (or resubmit) op `key` for its unsent remainder.
    fn issue(&mut self, key: usize) -> Result<(), NetError> {
        let op = &mut self.inflight[key];
        if op.zc && !self.socket_zc_ok {
            op.zc = false;
        }
        let cost = if op.zc { 2 } else { 1 };
        if self.expected_cqes + cost > self.cq_cap {
            trace!(
                key,
                "CQ budget exhausted; deferring send until CQEs are reaped"
            );
            return Ok(());
        }
        let remaining = op.iov.len() - op.iov_pos;
        debug_assert!(remaining > 0);
        let first = op.iov[op.iov_pos];
        let fd = types::Fd(self.fd);
        let nosig = libc::MSG_NOSIGNAL | if self.wait_all { libc::MSG_WAITALL } else { 0 };
        let single_zc = self.ops.send_zc;
        let entry = if op.zc {
            if remaining == 1 && single_zc {
                opcode::SendZc::new(fd, first.iov_base as *const u8, first.iov_len as u32)
                    .flags(nosig)
                    .zc_flags(IORING_SEND_ZC_REPORT_USAGE)
                    .build()
            } else {
                op.msg.msg_iov = op.iov[op.iov_pos..].as_mut_ptr();
                op.msg.msg_iovlen = remaining as _;
                opcode::SendMsgZc::new(fd, &*op.msg as *const libc::msghdr)
                    .flags(nosig as u32)
                    .ioprio(IORING_SEND_ZC_REPORT_USAGE)
                    .build()
            }
        } else if remaining == 1 && self.ops.send {
            opcode::Send::new(fd, first.iov_base as *const u8, first.iov_len as u32)
                .flags(nosig)
                .build()
        } else if self.ops.sendmsg {
            op.msg.msg_iov = op.iov[op.iov_pos..].as_mut_ptr();
            op.msg.msg_iovlen = remaining as _;
            opcode::SendMsg::new(fd, &*op.msg as *const libc::msghdr)
                .flags(nosig as u32)
                .build()
        } else {
            // Batches are built with one iovec when SENDMSG is missing, except after a
            // zero-copy → copy fallback; resubmit the first iovec alone.
            opcode::Send::new(fd, first.iov_base as *const u8, first.iov_len as u32)
                .flags(nosig)
                .build()
        };
        let zc = op.zc;
        op.in_kernel = true;
        let entry = entry.user_data(encode_user_data(OpKind::Send, key));
        self.push_sqe(&entry)?;
        self.expected_cqes += cost;
        SendStats::add(&self.stats.sends, 1);
        if zc {
            SendStats::add(&self.stats.zc_sends, 1);
        }
        Ok(())
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        if self.inflight.is_empty() || !self.enabled {
            return;
        }
        // Make pending sends fail fast, then give the kernel a bounded time to hand every
        // buffer back. Whatever is still referenced afterwards is leaked, never freed early.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.fail(Failure::Other("sender dropped".into()));
        let deadline = Instant::now() + DROP_WAIT;
        while !self.inflight.is_empty() && Instant::now() < deadline {
            let _ = self.reap();
            if self.inflight.is_empty() {
                break;
            }
            if self.enter(1, Some(Duration::from_millis(10))).is_err() {
                // E.g. dropped on a thread that is not the single issuer: just poll the CQ.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if !self.inflight.is_empty() {
            error!(
                ops = self.inflight.len(),
                "kernel still owns send buffers at drop; leaking them"
            );
            for op in std::mem::take(&mut self.inflight).drain() {
                std::mem::forget(op);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_iovecs() {
        let a = [1u8; 10];
        let b = [2u8; 20];
        let mut op = SendOp::new();
        op.iov.push(libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: 10,
        });
        op.iov.push(libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: 20,
        });
        op.advance(4);
        assert_eq!(op.iov_pos, 0);
        assert_eq!(op.iov[0].iov_len, 6);
        assert_eq!(op.iov[0].iov_base as *const u8, a.as_ptr().wrapping_add(4));
        op.advance(6);
        assert_eq!(op.iov_pos, 1);
        op.advance(19);
        assert_eq!(op.iov[1].iov_len, 1);
        assert_eq!(op.iov[1].iov_base as *const u8, b.as_ptr().wrapping_add(19));
        op.advance(1);
        assert_eq!(op.iov_pos, 2);
    }

    #[test]
    fn configs() {
        let b = SenderConfig::bulk();
        assert_eq!(
            b.zero_copy,
            ZeroCopy::Auto {
                min_bytes: 64 << 10
            }
        );
        assert_eq!(b.max_send_bytes, 1 << 20);
        assert_eq!(b.max_iovecs, 512);
        let u = SenderConfig::urgent();
        assert_eq!(u.submit, SubmitPolicy::Flush);
        assert_eq!(u.zero_copy, ZeroCopy::Never);
        assert!(u.ring_entries < b.ring_entries);
        assert_eq!(SenderConfig::default(), b);
    }

    fn pair() -> (Stream, Stream) {
        Stream::unix_pair().unwrap()
    }

    #[test]
    fn batching_respects_limits_and_splits_payloads() {
        let (a, _b) = pair();
        let cfg = SenderConfig {
            submit: SubmitPolicy::Flush,
            max_send_bytes: 100,
            max_iovecs: 3,
            ..SenderConfig::bulk()
        };
        let mut s = FrameSender::new(a, cfg).unwrap();
        // Build batches directly (no ring use) to check the segmentation.
        s.enqueue(b"hh", &[BufRef::from_vec(vec![1; 250])]);
        s.enqueue(b"h2", &[BufRef::from_vec(vec![2; 10])]);
        assert_eq!(s.backlog_bytes(), 264);
        s.seal();
        let mut sizes = Vec::new();
        while s.sealed > 0 {
            let k = s.build_batch();
            let op = &s.inflight[k];
            assert!(op.iov.len() <= 3);
            assert_eq!(op.iov.iter().map(|v| v.iov_len).sum::<usize>(), op.total);
            sizes.push(op.total);
        }
        assert_eq!(sizes, vec![100, 100, 64]);
        assert_eq!(s.queued_bytes, 0);
        assert!(s.hdr_queue.is_empty());
        // Pretend they completed so drop does not wait for them.
        for (_, op) in s.inflight.iter_mut() {
            op.done = true;
        }
        s.inflight.clear();
    }

    #[test]
    fn full_batch_is_sealed_automatically_under_flush_policy() {
        let (a, _b) = pair();
        let cfg = SenderConfig {
            max_iovecs: 4,
            ..SenderConfig::urgent()
        };
        let mut s = FrameSender::new(a, cfg).unwrap();
        s.push(b"x", &[BufRef::from_vec(vec![0; 8])]).unwrap();
        assert_eq!(s.sealed, 0, "Flush policy: nothing sealed yet");
        s.push(b"y", &[BufRef::from_vec(vec![0; 8])]).unwrap();
        // 4 segments = a full send's worth: sealed and handed to the kernel.
        assert_eq!(s.stats.sends.load(std::sync::atomic::Ordering::Relaxed), 1);
        s.drain(Some(Duration::from_secs(5))).unwrap();
        assert!(s.is_idle());
    }
}
