//! Safe userfaultfd wrapper.
//!
//! The kernel ABI (from `include/uapi/linux/userfaultfd.h`, Linux 6.8+) is defined here because
//! libc and older system headers lack the newer parts (`UFFDIO_MOVE`, `WP_ASYNC`, ...). Each
//! ioctl request number is computed from the size of the exact struct it is paired with (see
//! [`UffdIoctl`]), and the tests pin them to the kernel's values.
//!
//! All operations take `&self`: the kernel serializes userfaultfd ioctls internally, so one
//! [`Userfaultfd`] may be shared by the fault thread and any number of placing threads.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::eventfd::EventFd;

/// `UFFD_FEATURE_*` bits for [`Userfaultfd::open`].
pub mod feature {
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const EVENT_FORK: u64 = 1 << 1;
    pub const EVENT_REMAP: u64 = 1 << 2;
    pub const EVENT_REMOVE: u64 = 1 << 3;
    pub const MISSING_HUGETLBFS: u64 = 1 << 4;
    pub const MISSING_SHMEM: u64 = 1 << 5;
    pub const EVENT_UNMAP: u64 = 1 << 6;
    pub const SIGBUS: u64 = 1 << 7;
    pub const THREAD_ID: u64 = 1 << 8;
    pub const MINOR_HUGETLBFS: u64 = 1 << 9;
    pub const MINOR_SHMEM: u64 = 1 << 10;
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    pub const POISON: u64 = 1 << 14;
    pub const WP_ASYNC: u64 = 1 << 15;
    pub const MOVE: u64 = 1 << 16;
}

/// Bits of the ioctl mask returned by [`Userfaultfd::register`] (`1 << _UFFDIO_*`).
pub mod ioctl_bit {
    pub const REGISTER: u64 = 1 << 0x00;
    pub const UNREGISTER: u64 = 1 << 0x01;
    pub const WAKE: u64 = 1 << 0x02;
    pub const COPY: u64 = 1 << 0x03;
    pub const ZEROPAGE: u64 = 1 << 0x04;
    pub const MOVE: u64 = 1 << 0x05;
    pub const WRITEPROTECT: u64 = 1 << 0x06;
    pub const CONTINUE: u64 = 1 << 0x07;
    pub const POISON: u64 = 1 << 0x08;
    pub const API: u64 = 1 << 0x3F;
}

const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;
const MSG_SIZE: usize = 32;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const REGISTER_MODE_MINOR: u64 = 1 << 2;

const MODE_DONTWAKE: u64 = 1 << 0; // same bit for COPY, ZEROPAGE, MOVE, CONTINUE
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// Give up retrying an operation that keeps answering EAGAIN without progress.
const MAX_STALLED_RETRIES: u32 = 10_000;

/// Errors of userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: {0} (needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)")]
    Open(io::Error),
    #[error("UFFDIO_API failed: {0}")]
    Api(io::Error),
    #[error("userfaultfd features {missing:#x} not supported by this kernel (requested {requested:#x}, supported {supported:#x})")]
    FeatureUnsupported {
        missing: u64,
        requested: u64,
        supported: u64,
    },
    #[error("{op}: address {addr:#x} or length {len:#x} is not aligned to the host page size {host_page}")]
    Misaligned {
        op: &'static str,
        addr: usize,
        len: usize,
        host_page: usize,
    },
    #[error("{op} on {addr:#x}+{len:#x} failed: {source}")]
    Ioctl {
        op: &'static str,
        addr: usize,
        len: usize,
        source: io::Error,
    },
    #[error("{op} on {addr:#x}+{len:#x} made no progress after {retries} EAGAIN retries")]
    Stalled {
        op: &'static str,
        addr: usize,
        len: usize,
        retries: u32,
    },
    #[error("reading userfaultfd events failed: {0}")]
    Read(io::Error),
    #[error("poll on userfaultfd failed: {0}")]
    Poll(io::Error),
    #[error("userfaultfd reported POLLERR (not initialised or not non-blocking)")]
    PollErr,
}

// ---- kernel ABI ------------------------------------------------------------------------------

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// The ioctls that take a range and a mode and report how many bytes they handled.
trait RangeOp: UffdIoctl {
    fn new(range: UffdioRange, mode: u64) -> Self;
    fn done(&self) -> i64;
}

impl RangeOp for UffdioZeropage {
    fn new(range: UffdioRange, mode: u64) -> Self {
        UffdioZeropage {
            range,
            mode,
            zeropage: 0,
        }
    }
    fn done(&self) -> i64 {
        self.zeropage
    }
}

impl RangeOp for UffdioContinue {
    fn new(range: UffdioRange, mode: u64) -> Self {
        UffdioContinue {
            range,
            mode,
            mapped: 0,
        }
    }
    fn done(&self) -> i64 {
        self.mapped
    }
}

/// `UFFDIO_UNREGISTER` and `UFFDIO_WAKE` both take a `uffdio_range` but are different ioctls.
#[repr(transparent)]
struct Unregister(UffdioRange);
#[repr(transparent)]
struct Wake(UffdioRange);

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr) as libc::c_ulong
}

/// A struct paired with its ioctl request; the request encodes `size_of::<Self>()`, so the
/// kernel never reads or writes past the struct.
trait UffdIoctl: Sized {
    const REQ: libc::c_ulong;
    const NAME: &'static str;
}

macro_rules! uffd_ioctl {
    ($t:ty, $dir:expr, $nr:expr, $name:literal) => {
        impl UffdIoctl for $t {
            const REQ: libc::c_ulong = ioc($dir, UFFDIO, $nr, std::mem::size_of::<$t>());
            const NAME: &'static str = $name;
        }
    };
}

uffd_ioctl!(UffdioApi, IOC_READ | IOC_WRITE, 0x3F, "UFFDIO_API");
uffd_ioctl!(
    UffdioRegister,
    IOC_READ | IOC_WRITE,
    0x00,
    "UFFDIO_REGISTER"
);
uffd_ioctl!(Unregister, IOC_READ, 0x01, "UFFDIO_UNREGISTER");
uffd_ioctl!(Wake, IOC_READ, 0x02, "UFFDIO_WAKE");
uffd_ioctl!(UffdioCopy, IOC_READ | IOC_WRITE, 0x03, "UFFDIO_COPY");
uffd_ioctl!(
    UffdioZeropage,
    IOC_READ | IOC_WRITE,
    0x04,
    "UFFDIO_ZEROPAGE"
);
uffd_ioctl!(UffdioMove, IOC_READ | IOC_WRITE, 0x05, "UFFDIO_MOVE");
uffd_ioctl!(
    UffdioContinue,
    IOC_READ | IOC_WRITE,
    0x07,
    "UFFDIO_CONTINUE"
);
uffd_ioctl!(
    UffdioWriteprotect,
    IOC_READ | IOC_WRITE,
    0x06,
    "UFFDIO_WRITEPROTECT"
);

fn raw_ioctl<T: UffdIoctl>(fd: RawFd, arg: &mut T) -> io::Result<()> {
    // SAFETY: T::REQ encodes size_of::<T>() and T is the #[repr(C)] layout the kernel expects
    // for that request (UffdIoctl impls above), so the kernel accesses only `*arg`, which is a
    // live exclusive borrow. Addresses inside the struct are checked by the kernel against the
    // registered ranges; wrong ones yield an error, not memory unsafety in this process beyond
    // what the caller's range contract states.
    let r = unsafe { libc::ioctl(fd, T::REQ, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// ---- public types ----------------------------------------------------------------------------

/// Which faults a registered range reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegisterMode {
    pub missing: bool,
    pub wp: bool,
    pub minor: bool,
}

impl RegisterMode {
    /// Faults on missing pages only.
    pub const MISSING: RegisterMode = RegisterMode {
        missing: true,
        wp: false,
        minor: false,
    };
    /// Write-protect faults only.
    pub const WP: RegisterMode = RegisterMode {
        missing: false,
        wp: true,
        minor: false,
    };

    fn bits(self) -> u64 {
        (if self.missing {
            REGISTER_MODE_MISSING
        } else {
            0
        }) | (if self.wp { REGISTER_MODE_WP } else { 0 })
            | (if self.minor { REGISTER_MODE_MINOR } else { 0 })
    }
}

/// One message read from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page-aligned unless EXACT_ADDRESS was requested) and waits.
    /// `thread_id` is the faulting thread's TID if THREAD_ID was requested, else 0.
    PageFault {
        addr: usize,
        write: bool,
        wp: bool,
        minor: bool,
        thread_id: u32,
    },
    Remove {
        start: usize,
        end: usize,
    },
    Unmap {
        start: usize,
        end: usize,
    },
    Remap {
        from: usize,
        to: usize,
        len: usize,
    },
    /// The process forked (the child's userfaultfd is closed, we do not serve children).
    Fork,
    /// An event type this wrapper does not know.
    Other(u8),
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}

/// Decode one packed 32-byte `struct uffd_msg` (event at byte 0, union at byte 8).
fn parse_msg(m: &[u8]) -> Event {
    debug_assert_eq!(m.len(), MSG_SIZE);
    match m[0] {
        EVENT_PAGEFAULT => {
            let flags = u64_at(m, 8);
            Event::PageFault {
                addr: u64_at(m, 16) as usize,
                write: flags & PAGEFAULT_FLAG_WRITE != 0,
                wp: flags & PAGEFAULT_FLAG_WP != 0,
                minor: flags & PAGEFAULT_FLAG_MINOR != 0,
                thread_id: u32_at(m, 24),
            }
        }
        EVENT_FORK => {
            let ufd = u32_at(m, 8) as RawFd;
            if ufd >= 0 {
                // SAFETY: the kernel installed this fd in our table for us; nobody else knows
                // it, so taking ownership and closing it cannot affect another owner.
                drop(unsafe { OwnedFd::from_raw_fd(ufd) });
            }
            tracing::warn!("userfaultfd fork event: the child's userfaultfd was closed");
            Event::Fork
        }
        EVENT_REMAP => Event::Remap {
            from: u64_at(m, 8) as usize,
            to: u64_at(m, 16) as usize,
            len: u64_at(m, 24) as usize,
        },
        EVENT_REMOVE => Event::Remove {
            start: u64_at(m, 8) as usize,
            end: u64_at(m, 16) as usize,
        },
        EVENT_UNMAP => Event::Unmap {
            start: u64_at(m, 8) as usize,
            end: u64_at(m, 16) as usize,
        },
        other => Event::Other(other),
    }
}

/// An owned userfaultfd (non-blocking, close-on-exec). `Send + Sync`.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

fn new_raw_fd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: plain syscall with an integer argument.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
    if fd >= 0 {
        // SAFETY: fresh fd owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(UffdError::Open(err));
    }
    // The syscall is restricted (vm.unprivileged_userfaultfd=0); try /dev/userfaultfd.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| UffdError::Open(err))?;
    const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, UFFDIO, 0x00, 0);
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value; no memory is passed.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(UffdError::Open(io::Error::last_os_error()));
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Fails (naming what is missing) unless the kernel supports every one of `features`.
pub fn require_features(features: u64) -> Result<(), UffdError> {
    let supported = supported_features()?;
    let missing = features & !supported;
    if missing != 0 {
        return Err(UffdError::FeatureUnsupported {
            missing,
            requested: features,
            supported,
        });
    }
    Ok(())
}

/// Features the kernel supports (UFFDIO_API probe with features = 0 on a throwaway fd).
pub fn supported_features() -> Result<u64, UffdError> {
    let fd = new_raw_fd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    raw_ioctl(fd.as_raw_fd(), &mut api).map_err(UffdError::Api)?;
    Ok(api.features)
}

fn check_host_page(
    op: &'static str,
    addr: usize,
    len: usize,
    host_page: usize,
) -> Result<(), UffdError> {
    if !host_page.is_power_of_two()
        || host_page < crate::memory::PAGE_SIZE
        || (addr | len) & (host_page - 1) != 0
        || addr.checked_add(len).is_none()
    {
        return Err(UffdError::Misaligned {
            op,
            addr,
            len,
            host_page,
        });
    }
    Ok(())
}

/// A zeroed huge page used to place zero pages where UFFDIO_ZEROPAGE is not supported.
/// Allocated on first use (a zeroed allocation maps the shared zero page; it is only read).
fn zeros() -> &'static [u8] {
    static ZEROS: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; crate::memory::HUGE_PAGE_SIZE].into_boxed_slice())
}

/// What one fill ioctl reported: bytes done, or the errno.
enum Step {
    Done(usize),
    Err(io::Error),
}

impl Userfaultfd {
    /// Create a userfaultfd and enable exactly `features` (UFFDIO_API).
    pub fn open(features: u64) -> Result<Self, UffdError> {
        require_features(features)?;
        let fd = new_raw_fd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        raw_ioctl(fd.as_raw_fd(), &mut api).map_err(UffdError::Api)?;
        let missing = features & !api.features;
        if missing != 0 {
            return Err(UffdError::FeatureUnsupported {
                missing,
                requested: features,
                supported: api.features,
            });
        }
        tracing::debug!(
            features = format_args!("{features:#x}"),
            fd = fd.as_raw_fd(),
            "userfaultfd open"
        );
        Ok(Userfaultfd { fd, features })
    }

    /// The features requested at open (all granted).
    pub fn features(&self) -> u64 {
        self.features
    }

    fn ioctl<T: UffdIoctl>(&self, arg: &mut T, addr: usize, len: usize) -> Result<(), UffdError> {
        raw_ioctl(self.fd.as_raw_fd(), arg).map_err(|source| UffdError::Ioctl {
            op: T::NAME,
            addr,
            len,
            source,
        })
    }

    /// Register `[addr, addr+len)` (page aligned, whole VMAs' worth of compatible memory).
    /// Returns the mask of ioctls available on the range (see [`ioctl_bit`]).
    pub fn register(&self, addr: usize, len: usize, mode: RegisterMode) -> Result<u64, UffdError> {
        check_host_page("UFFDIO_REGISTER", addr, len, crate::memory::PAGE_SIZE)?;
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.ioctl(&mut r, addr, len)?;
        tracing::debug!(
            addr = format_args!("{addr:#x}"),
            len,
            ?mode,
            ioctls = format_args!("{:#x}", r.ioctls),
            "uffd registered"
        );
        Ok(r.ioctls)
    }

    /// Unregister `[addr, addr+len)`; blocked faulting threads are woken.
    pub fn unregister(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        check_host_page("UFFDIO_UNREGISTER", addr, len, crate::memory::PAGE_SIZE)?;
        let mut r = Unregister(UffdioRange {
            start: addr as u64,
            len: len as u64,
        });
        self.ioctl(&mut r, addr, len)
    }

    /// Wake threads blocked on faults in `[addr, addr+len)`.
    pub fn wake(&self, addr: usize, len: usize) -> Result<(), UffdError> {
        check_host_page("UFFDIO_WAKE", addr, len, crate::memory::PAGE_SIZE)?;
        let mut r = Wake(UffdioRange {
            start: addr as u64,
            len: len as u64,
        });
        self.ioctl(&mut r, addr, len)
    }

    /// Add (`protect`) or remove write protection on `[addr, addr+len)`. Removing it wakes
    /// threads blocked on write-protect faults there.
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool) -> Result<(), UffdError> {
        check_host_page("UFFDIO_WRITEPROTECT", addr, len, crate::memory::PAGE_SIZE)?;
        let mut r = UffdioWriteprotect {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        self.ioctl(&mut r, addr, len)
    }

    /// Shared driver of COPY / ZEROPAGE / MOVE / CONTINUE: run `step(offset, remaining)` until the whole
    /// range is handled, skipping host pages that already exist (EEXIST), resuming after
    /// partial progress and retrying EAGAIN. Returns the bytes newly placed.
    fn fill(
        &self,
        op: &'static str,
        dst: usize,
        len: usize,
        host_page: usize,
        mut step: impl FnMut(usize, usize) -> Step,
    ) -> Result<usize, UffdError> {
        let mut off = 0usize;
        let mut placed = 0usize;
        let mut stalled = 0u32;
        while off < len {
            match step(off, len - off) {
                Step::Done(n) => {
                    // A short, error-free answer: keep going from where it stopped.
                    let n = n.min(len - off);
                    placed += n;
                    off += n;
                    if n == 0 {
                        stalled += 1;
                    }
                }
                Step::Err(e) => match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        // The host page at `off` is already present: leave it alone and go on
                        // at the next host page boundary (dst is host-page aligned).
                        off = (off / host_page + 1) * host_page;
                        stalled = 0;
                        continue;
                    }
                    Some(libc::EAGAIN) => {
                        stalled += 1;
                        std::thread::yield_now();
                    }
                    _ => {
                        return Err(UffdError::Ioctl {
                            op,
                            addr: dst + off,
                            len: len - off,
                            source: e,
                        })
                    }
                },
            }
            if stalled > MAX_STALLED_RETRIES {
                return Err(UffdError::Stalled {
                    op,
                    addr: dst + off,
                    len: len - off,
                    retries: stalled,
                });
            }
        }
        Ok(placed)
    }

    /// Interpret a fill ioctl's result: progress (`count > 0`, possibly with EAGAIN for a
    /// partial fill) or the error.
    fn step_result(r: Result<(), UffdError>, count: i64) -> Step {
        match r {
            Ok(()) => Step::Done(count.max(0) as usize),
            Err(UffdError::Ioctl { source, .. }) => {
                if count > 0 {
                    Step::Done(count as usize)
                } else {
                    Step::Err(source)
                }
            }
            Err(other) => Step::Err(io::Error::other(other.to_string())),
        }
    }

    /// Place every still-missing host page of `[dst, dst+src.len())` from `src`; host pages
    /// already present are skipped (EEXIST), not overwritten. Retries EAGAIN and partial
    /// copies. Returns bytes newly placed. `dst` and `src.len()` must be `host_page` aligned.
    pub fn copy(
        &self,
        dst: usize,
        src: &[u8],
        host_page: usize,
        wake: bool,
    ) -> Result<usize, UffdError> {
        check_host_page("UFFDIO_COPY", dst, src.len(), host_page)?;
        let mode = if wake { 0 } else { MODE_DONTWAKE };
        self.fill("UFFDIO_COPY", dst, src.len(), host_page, |off, rem| {
            let mut c = UffdioCopy {
                dst: (dst + off) as u64,
                src: src[off..].as_ptr() as u64,
                len: rem as u64,
                mode,
                copy: 0,
            };
            let r = self.ioctl(&mut c, dst + off, rem);
            Self::step_result(r, c.copy)
        })
    }

    /// Map zero pages over every still-missing host page of `[dst, dst+len)` (same semantics as
    /// [`copy`](Self::copy)). UFFDIO_ZEROPAGE does not exist for hugetlb, and would split a
    /// 2 MiB host page into 4 KiB zero pages, so for `host_page > 4096` zeros are copied.
    pub fn zeropage(
        &self,
        dst: usize,
        len: usize,
        host_page: usize,
        wake: bool,
    ) -> Result<usize, UffdError> {
        check_host_page("UFFDIO_ZEROPAGE", dst, len, host_page)?;
        if host_page > crate::memory::PAGE_SIZE {
            let zeros = zeros();
            if host_page > zeros.len() {
                return Err(UffdError::Misaligned {
                    op: "UFFDIO_ZEROPAGE",
                    addr: dst,
                    len,
                    host_page,
                });
            }
            let chunk = zeros.len() - zeros.len() % host_page;
            let mut placed = 0;
            let mut off = 0;
            while off < len {
                let n = chunk.min(len - off);
                placed += self.copy(dst + off, &zeros[..n], host_page, wake)?;
                off += n;
            }
            return Ok(placed);
        }
        self.fill_range::<UffdioZeropage>(dst, len, host_page, wake)
    }

    /// Runs a range ioctl (ZEROPAGE, CONTINUE) over `[dst, dst+len)` through [`fill`](Self::fill).
    fn fill_range<T: RangeOp>(
        &self,
        dst: usize,
        len: usize,
        host_page: usize,
        wake: bool,
    ) -> Result<usize, UffdError> {
        let mode = if wake { 0 } else { MODE_DONTWAKE };
        self.fill(T::NAME, dst, len, host_page, |off, rem| {
            let range = UffdioRange {
                start: (dst + off) as u64,
                len: rem as u64,
            };
            let mut arg = T::new(range, mode);
            let r = self.ioctl(&mut arg, dst + off, rem);
            Self::step_result(r, arg.done())
        })
    }

    /// UFFDIO_MOVE: move the pages of `[src, src+len)` (private anonymous memory of this process
    /// with every page present, e.g. a THP-aligned staging buffer) to `dst` (registered with
    /// this userfaultfd). Host pages already present at `dst` are skipped (EEXIST) and their
    /// source pages stay where they are. Returns bytes moved. A 2 MiB-aligned THP source moves
    /// as a whole PMD.
    pub fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        host_page: usize,
        wake: bool,
    ) -> Result<usize, UffdError> {
        check_host_page("UFFDIO_MOVE", dst, len, host_page)?;
        check_host_page("UFFDIO_MOVE", src, len, crate::memory::PAGE_SIZE)?;
        let mode = if wake { 0 } else { MODE_DONTWAKE };
        self.fill("UFFDIO_MOVE", dst, len, host_page, |off, rem| {
            let mut m = UffdioMove {
                dst: (dst + off) as u64,
                src: (src + off) as u64,
                len: rem as u64,
                mode,
                moved: 0,
            };
            let r = self.ioctl(&mut m, dst + off, rem);
            Self::step_result(r, m.moved)
        })
    }

    /// UFFDIO_CONTINUE: map the page-cache pages that already back `[dst, dst+len)` (a shared
    /// shmem or hugetlbfs mapping registered for minor faults) into it, waking threads that
    /// fault on them. Host pages already mapped are skipped (EEXIST). Whatever the page cache
    /// holds is what the guest sees: write it (through another mapping) first. Returns bytes
    /// newly mapped.
    pub fn continue_range(
        &self,
        dst: usize,
        len: usize,
        host_page: usize,
        wake: bool,
    ) -> Result<usize, UffdError> {
        check_host_page("UFFDIO_CONTINUE", dst, len, host_page)?;
        self.fill_range::<UffdioContinue>(dst, len, host_page, wake)
    }

    /// Read up to `max` pending messages without blocking, appending them to `out`.
    /// Returns how many were read (0 if none are pending).
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize, UffdError> {
        let max = max.clamp(1, 256);
        let mut buf = [0u8; 256 * MSG_SIZE];
        let want = max * MSG_SIZE;
        // SAFETY: reads at most `want <= buf.len()` bytes into a live local buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(UffdError::Read(e)),
            };
        }
        let n = n as usize;
        let count = n / MSG_SIZE;
        out.extend(
            buf[..count * MSG_SIZE]
                .chunks_exact(MSG_SIZE)
                .map(parse_msg),
        );
        Ok(count)
    }

    /// `poll()` the userfaultfd and optionally `stop`. `Ok(true)` if the userfaultfd is readable,
    /// `Ok(false)` if `stop` is signalled (it is not drained) or the timeout passed.
    pub fn wait(
        &self,
        stop: Option<&EventFd>,
        timeout: Option<Duration>,
    ) -> Result<bool, UffdError> {
        // A timeout too long to represent waits without one.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.map_or(-1, |s| s.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ms: libc::c_int = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a short timeout does not become a busy loop.
                    left.as_micros()
                        .div_ceil(1000)
                        .min(libc::c_int::MAX as u128) as libc::c_int
                }
            };
            // SAFETY: `fds` is a live local array of two pollfd; a negative fd is ignored.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(UffdError::Poll(e));
            }
            if fds[1].revents & libc::POLLIN != 0 {
                return Ok(false);
            }
            if fds[0].revents & libc::POLLERR != 0 {
                return Err(UffdError::PollErr);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
            if r == 0 {
                return Ok(false);
            }
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, Mapping, HUGE_PAGE_SIZE, PAGE_SIZE};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn ioctl_numbers_match_kernel() {
        assert_eq!(UffdioApi::REQ, 0xc018_aa3f);
        assert_eq!(UffdioRegister::REQ, 0xc020_aa00);
        assert_eq!(Unregister::REQ, 0x8010_aa01);
        assert_eq!(Wake::REQ, 0x8010_aa02);
        assert_eq!(UffdioCopy::REQ, 0xc028_aa03);
        assert_eq!(UffdioZeropage::REQ, 0xc020_aa04);
        assert_eq!(UffdioMove::REQ, 0xc028_aa05);
        assert_eq!(UffdioWriteprotect::REQ, 0xc018_aa06);
        assert_eq!(UffdioContinue::REQ, 0xc020_aa07);
    }

    #[test]
    fn parse_messages() {
        let mut m = [0u8; 32];
        m[0] = EVENT_PAGEFAULT;
        m[8..16].copy_from_slice(&(PAGEFAULT_FLAG_WRITE | PAGEFAULT_FLAG_WP).to_ne_bytes());
        m[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_ne_bytes());
        m[24..28].copy_from_slice(&4321u32.to_ne_bytes());
        assert_eq!(
            parse_msg(&m),
            Event::PageFault {
                addr: 0x7f00_1234_5000,
                write: true,
                wp: true,
                minor: false,
                thread_id: 4321
            }
        );
        m[0] = EVENT_REMOVE;
        m[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(
            parse_msg(&m),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        m[0] = EVENT_UNMAP;
        assert_eq!(
            parse_msg(&m),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        m[0] = EVENT_REMAP;
        m[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert_eq!(
            parse_msg(&m),
            Event::Remap {
                from: 0x1000,
                to: 0x3000,
                len: 0x2000
            }
        );
        m[0] = 0x42;
        assert_eq!(parse_msg(&m), Event::Other(0x42));
    }

    fn gettid() -> u32 {
        // SAFETY: gettid has no arguments and cannot fail.
        unsafe { libc::gettid() as u32 }
    }

    fn uffd() -> Userfaultfd {
        Userfaultfd::open(feature::THREAD_ID | feature::MOVE).expect("userfaultfd")
    }

    /// Wait until the uffd reports exactly one page fault and return it.
    fn next_fault(u: &Userfaultfd) -> Event {
        assert!(
            u.wait(None, Some(Duration::from_secs(5))).unwrap(),
            "no fault within 5 s"
        );
        let mut ev = Vec::new();
        assert_eq!(u.read_events(&mut ev, 16).unwrap(), 1);
        ev[0]
    }

    #[test]
    fn supported_features_include_what_we_need() {
        let f = supported_features().unwrap();
        for need in [
            feature::THREAD_ID,
            feature::WP_ASYNC,
            feature::WP_UNPOPULATED,
            feature::MOVE,
        ] {
            assert_ne!(f & need, 0, "feature {need:#x} missing from {f:#x}");
        }
        let u = uffd();
        assert_eq!(u.features(), feature::THREAD_ID | feature::MOVE);
        assert!(matches!(
            Userfaultfd::open(1 << 62),
            Err(UffdError::FeatureUnsupported { missing, .. }) if missing == 1 << 62
        ));
    }

    #[test]
    fn missing_fault_is_served_by_copy() {
        let m = Arc::new(Mapping::new("t", 8 * PAGE_SIZE, Backing::Anonymous).unwrap());
        let u = uffd();
        let ioctls = u
            .register(m.addr(), m.len(), RegisterMode::MISSING)
            .unwrap();
        assert_ne!(ioctls & ioctl_bit::COPY, 0);
        assert_ne!(ioctls & ioctl_bit::ZEROPAGE, 0);

        // Nothing pending yet.
        let mut ev = Vec::new();
        assert_eq!(u.read_events(&mut ev, 8).unwrap(), 0);
        assert!(!u.wait(None, Some(Duration::from_millis(10))).unwrap());

        let target = m.addr() + 3 * PAGE_SIZE;
        let done = Arc::new(AtomicBool::new(false));
        let (m2, done2) = (m.clone(), done.clone());
        let toucher = std::thread::spawn(move || {
            let tid = gettid();
            // SAFETY: the address is inside the live mapping `m2`; the read blocks in the kernel
            // until the page is placed.
            let v =
                unsafe { std::ptr::read_volatile((m2.addr() + 3 * PAGE_SIZE + 17) as *const u8) };
            done2.store(true, Ordering::SeqCst);
            (tid, v)
        });
        let ev = next_fault(&u);
        let Event::PageFault {
            addr,
            write,
            wp,
            thread_id,
            ..
        } = ev
        else {
            panic!("unexpected event {ev:?}");
        };
        assert_eq!(addr, target);
        assert!(!write && !wp);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !done.load(Ordering::SeqCst),
            "toucher ran before the page was placed"
        );

        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 199) as u8 + 1).collect();
        assert_eq!(u.copy(target, &page, PAGE_SIZE, true).unwrap(), PAGE_SIZE);
        let (tid, v) = toucher.join().unwrap();
        assert_eq!(thread_id, tid);
        assert_eq!(v, page[17]);

        // Copy onto an existing page: nothing placed, nothing overwritten.
        let other = vec![0xEEu8; PAGE_SIZE];
        assert_eq!(u.copy(target, &other, PAGE_SIZE, true).unwrap(), 0);
        // SAFETY: inside the live, now populated mapping.
        assert_eq!(unsafe { *((target + 17) as *const u8) }, page[17]);

        // A range with one present page in the middle: the others are placed, it is skipped.
        let three = vec![0x55u8; 3 * PAGE_SIZE];
        assert_eq!(
            u.copy(m.addr() + 2 * PAGE_SIZE, &three, PAGE_SIZE, false)
                .unwrap(),
            2 * PAGE_SIZE
        );
        // SAFETY: all inside the live mapping, all populated now.
        unsafe {
            assert_eq!(*((m.addr() + 2 * PAGE_SIZE) as *const u8), 0x55);
            assert_eq!(*((target + 17) as *const u8), page[17]);
            assert_eq!(*((m.addr() + 4 * PAGE_SIZE + 9) as *const u8), 0x55);
        }

        // zeropage: pages 0,1 placed as zero, 2..5 skipped.
        assert_eq!(
            u.zeropage(m.addr(), 5 * PAGE_SIZE, PAGE_SIZE, true)
                .unwrap(),
            2 * PAGE_SIZE
        );
        // SAFETY: inside the live mapping, page 0 populated (zero page).
        assert_eq!(unsafe { *((m.addr() + 100) as *const u8) }, 0);
        u.unregister(m.addr(), m.len()).unwrap();
    }

    #[test]
    fn misaligned_arguments_are_errors() {
        let m = Mapping::new("t", 4 * PAGE_SIZE, Backing::Anonymous).unwrap();
        let u = uffd();
        u.register(m.addr(), m.len(), RegisterMode::MISSING)
            .unwrap();
        let buf = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            u.copy(m.addr() + 1, &buf, PAGE_SIZE, true),
            Err(UffdError::Misaligned { .. })
        ));
        assert!(matches!(
            u.copy(m.addr(), &buf[..100], PAGE_SIZE, true),
            Err(UffdError::Misaligned { .. })
        ));
        assert!(matches!(
            u.copy(m.addr(), &buf, 3000, true),
            Err(UffdError::Misaligned { .. })
        ));
        assert!(matches!(
            u.zeropage(m.addr(), PAGE_SIZE, HUGE_PAGE_SIZE, true),
            Err(UffdError::Misaligned { .. })
        ));
        assert!(matches!(
            u.move_pages(m.addr(), 12, PAGE_SIZE, PAGE_SIZE, true),
            Err(UffdError::Misaligned { .. })
        ));
        assert!(matches!(
            u.register(usize::MAX - 4095, PAGE_SIZE * 2, RegisterMode::MISSING),
            Err(UffdError::Misaligned { .. })
        ));
        assert!(matches!(
            u.wake(m.addr() + 5, PAGE_SIZE),
            Err(UffdError::Misaligned { .. })
        ));
        // Aligned but not registered: a kernel error, reported.
        let other = Mapping::new("u", PAGE_SIZE, Backing::Anonymous).unwrap();
        assert!(matches!(
            u.copy(other.addr(), &buf, PAGE_SIZE, true),
            Err(UffdError::Ioctl { .. })
        ));
        assert_eq!(u.copy(m.addr(), &[], PAGE_SIZE, true).unwrap(), 0);
    }

    #[test]
    fn move_pages_from_thp_staging_buffer() {
        let dst = Mapping::new("dst", 2 * HUGE_PAGE_SIZE, Backing::TransparentHuge).unwrap();
        let staging = Mapping::new("staging", HUGE_PAGE_SIZE, Backing::TransparentHuge).unwrap();
        let u = uffd();
        let ioctls = u
            .register(dst.addr(), dst.len(), RegisterMode::MISSING)
            .unwrap();
        assert_ne!(ioctls & ioctl_bit::MOVE, 0);
        // SAFETY: the staging mapping is live and HUGE_PAGE_SIZE long; we write it fully.
        let st = unsafe { std::slice::from_raw_parts_mut(staging.as_ptr(), HUGE_PAGE_SIZE) };
        for (i, b) in st.iter_mut().enumerate() {
            *b = (i / PAGE_SIZE) as u8 ^ 0xA5;
        }
        let moved = u
            .move_pages(
                dst.addr() + HUGE_PAGE_SIZE,
                staging.addr(),
                HUGE_PAGE_SIZE,
                HUGE_PAGE_SIZE,
                true,
            )
            .unwrap();
        assert_eq!(moved, HUGE_PAGE_SIZE);
        // SAFETY: dst is live; the moved huge page is present.
        let d = unsafe {
            std::slice::from_raw_parts((dst.addr() + HUGE_PAGE_SIZE) as *const u8, HUGE_PAGE_SIZE)
        };
        for i in (0..HUGE_PAGE_SIZE).step_by(PAGE_SIZE / 2) {
            assert_eq!(d[i], (i / PAGE_SIZE) as u8 ^ 0xA5);
        }
        // Source is now a hole; refill it and move onto the same (present) dst: skipped.
        st.fill(0x11);
        assert_eq!(
            u.move_pages(
                dst.addr() + HUGE_PAGE_SIZE,
                staging.addr(),
                HUGE_PAGE_SIZE,
                HUGE_PAGE_SIZE,
                true
            )
            .unwrap(),
            0
        );
        assert_eq!(d[0], 0xA5);
        // The first huge page is still missing: zeropage via the copy fallback fills it.
        assert_eq!(
            u.zeropage(dst.addr(), dst.len(), HUGE_PAGE_SIZE, true)
                .unwrap(),
            HUGE_PAGE_SIZE
        );
        // SAFETY: dst is live and populated.
        assert_eq!(unsafe { *((dst.addr() + 12345) as *const u8) }, 0);
    }

    #[test]
    fn hugetlb_missing_copy_and_zero() {
        let pool = match crate::memory::tests::HugePool::reserve(3) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped: hugetlb pages unavailable: {e}");
                return;
            }
        };
        let m = Arc::new(Mapping::new("h", 3 * HUGE_PAGE_SIZE, Backing::HugeTlb).unwrap());
        let u = Userfaultfd::open(feature::THREAD_ID | feature::MISSING_HUGETLBFS).unwrap();
        let ioctls = u
            .register(m.addr(), m.len(), RegisterMode::MISSING)
            .unwrap();
        assert_ne!(ioctls & ioctl_bit::COPY, 0);
        let m2 = m.clone();
        let toucher = std::thread::spawn(move || {
            // SAFETY: inside the live mapping; blocks until the huge page is placed.
            unsafe {
                std::ptr::read_volatile(
                    (m2.addr() + HUGE_PAGE_SIZE + 5 * PAGE_SIZE + 1) as *const u8,
                )
            }
        });
        let ev = next_fault(&u);
        let Event::PageFault { addr, .. } = ev else {
            panic!("unexpected event {ev:?}");
        };
        assert_eq!(addr & !(HUGE_PAGE_SIZE - 1), m.addr() + HUGE_PAGE_SIZE);
        let page = vec![0x3Cu8; HUGE_PAGE_SIZE];
        // 4 KiB granularity is refused for a 2 MiB host page.
        assert!(matches!(
            u.copy(
                m.addr() + HUGE_PAGE_SIZE,
                &page[..PAGE_SIZE],
                HUGE_PAGE_SIZE,
                true
            ),
            Err(UffdError::Misaligned { .. })
        ));
        assert_eq!(
            u.copy(m.addr() + HUGE_PAGE_SIZE, &page, HUGE_PAGE_SIZE, true)
                .unwrap(),
            HUGE_PAGE_SIZE
        );
        assert_eq!(toucher.join().unwrap(), 0x3C);
        // Zero the rest: the present middle page is skipped, the two others are placed.
        assert_eq!(
            u.zeropage(m.addr(), m.len(), HUGE_PAGE_SIZE, true).unwrap(),
            2 * HUGE_PAGE_SIZE
        );
        // SAFETY: inside the live, populated mapping.
        unsafe {
            assert_eq!(*((m.addr() + 7) as *const u8), 0);
            assert_eq!(*((m.addr() + HUGE_PAGE_SIZE + 7) as *const u8), 0x3C);
        }
        u.unregister(m.addr(), m.len()).unwrap();
        drop(m);
        drop(pool);
    }

    #[test]
    fn wait_returns_false_on_stop() {
        let u = uffd();
        let stop = EventFd::new().unwrap();
        stop.notify();
        let t = Instant::now();
        assert!(!u.wait(Some(&stop), Some(Duration::from_secs(5))).unwrap());
        assert!(t.elapsed() < Duration::from_secs(1));
        stop.drain();
        assert!(!u.wait(Some(&stop), Some(Duration::from_millis(5))).unwrap());
    }

    #[test]
    fn write_protect_fault_reports_wp() {
        let m = Arc::new(Mapping::new("t", 2 * PAGE_SIZE, Backing::Anonymous).unwrap());
        // SAFETY: live mapping; populate page 0 so it can be write protected.
        unsafe { std::ptr::write_volatile(m.as_ptr(), 1u8) };
        let u = Userfaultfd::open(feature::THREAD_ID | feature::PAGEFAULT_FLAG_WP).unwrap();
        u.register(m.addr(), m.len(), RegisterMode::WP).unwrap();
        u.write_protect(m.addr(), PAGE_SIZE, true).unwrap();
        let m2 = m.clone();
        let writer = std::thread::spawn(move || {
            // SAFETY: live mapping; the write blocks until write protection is removed.
            unsafe { std::ptr::write_volatile(m2.as_ptr().add(8), 2u8) };
        });
        let ev = next_fault(&u);
        assert!(
            matches!(ev, Event::PageFault { addr, write: true, wp: true, .. } if addr == m.addr()),
            "{ev:?}"
        );
        u.write_protect(m.addr(), PAGE_SIZE, false).unwrap();
        writer.join().unwrap();
        // SAFETY: live populated mapping.
        assert_eq!(unsafe { *m.as_ptr().add(8) }, 2);
    }
}
