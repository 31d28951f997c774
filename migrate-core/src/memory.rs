//! Guest memory: regions of host memory the engine migrates.
//!
//! A [`GuestRegion`] is a cheap, clonable handle (`Send + Sync`) to one contiguous range of host
//! virtual memory, either mapped by us ([`Mapping`], unmapped on the last drop) or borrowed from
//! the VMM ([`GuestRegion::from_raw`]). The memory is shared with the guest (or the workload),
//! which writes it concurrently: every read here is a *racy* read by design; a read that races
//! with a write may return stale or torn bytes, and the dirty log reports the page again, so a
//! later pass sends the final contents.

use std::alloc::Layout;
use std::any::Any;
use std::io;
use std::sync::Arc;

use uring_net::{BufRef, StableMemory};

/// Base (small) page size of the host.
pub const PAGE_SIZE: usize = 4096;
/// Size of a transparent or hugetlb huge page (x86-64 PMD).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;
/// Longest allowed region name, in bytes (the name travels in a one-byte length field).
pub const MAX_REGION_NAME: usize = 255;

/// Errors of guest-memory operations.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "region '{name}': size {size} is not a non-zero multiple of the host page size {host_page}"
    )]
    BadSize {
        name: String,
        size: usize,
        host_page: usize,
    },
    #[error("range offset {offset} len {len} is outside the region of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: usize },
    #[error("range offset {offset} len {len} is not aligned to the host page size {host_page}")]
    Misaligned {
        offset: usize,
        len: usize,
        host_page: usize,
    },
    #[error("mmap of {len} bytes for region '{name}' failed: {source}")]
    Mmap {
        name: String,
        len: usize,
        source: io::Error,
    },
    #[error(
        "region '{name}' needs {needed} free 2 MiB hugetlb pages but only {free} are free; \
         reserve them with `echo {want} > /proc/sys/vm/nr_hugepages` (as root)"
    )]
    HugePagesUnavailable {
        name: String,
        needed: usize,
        free: usize,
        want: usize,
    },
    #[error("the default hugetlb page size is {found} bytes, not 2 MiB")]
    HugePageSizeMismatch { found: usize },
    #[error("{op} failed: {source}")]
    Syscall { op: &'static str, source: io::Error },
    #[error("region '{name}' is {backing:?}, not a shared memfd: it has no alias mapping")]
    NotShared { name: String, backing: Backing },
    #[error("Backing::Borrowed memory cannot be allocated; use GuestRegion::from_raw")]
    BorrowedNotAllocatable,
    #[error("invalid borrowed memory: {0}")]
    InvalidBorrow(String),
    #[error("invalid region set: {0}")]
    InvalidRegions(String),
    #[error("cannot make a send buffer: {0}")]
    BufRef(String),
}

/// What backs a region, and so its host page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory with 4 KiB host pages (THP disabled on the range).
    Anonymous,
    /// 2 MiB-aligned private anonymous memory with `MADV_HUGEPAGE`: 2 MiB host pages.
    TransparentHuge,
    /// `MAP_HUGETLB` memory (2 MiB pages from the hugetlb pool).
    HugeTlb,
    /// Memory owned by the VMM (see [`GuestRegion::from_raw`]).
    Borrowed,
    /// A shared memfd (shmem) with 4 KiB host pages, allocated up front and mapped twice: the
    /// guest's view, and an alias a destination writes postcopy pages through before mapping
    /// them into the guest's view with `UFFDIO_CONTINUE` (no second copy, no allocation on the
    /// request path). Like a VMM's memfd-backed guest RAM (vhost-user needs it shared).
    Shared,
    /// The same over a hugetlbfs memfd: 2 MiB pages from the hugetlb pool.
    SharedHugeTlb,
}

impl Backing {
    /// Host page size of this backing. For `Borrowed` the real size is whatever the VMM
    /// declared; this returns the base page size.
    pub fn host_page_size(self) -> usize {
        match self {
            Backing::Anonymous | Backing::Borrowed | Backing::Shared => PAGE_SIZE,
            Backing::TransparentHuge | Backing::HugeTlb | Backing::SharedHugeTlb => HUGE_PAGE_SIZE,
        }
    }

    /// A shared memfd with an alias mapping ([`GuestRegion::alias_ptr_at`]).
    pub fn is_shared(self) -> bool {
        matches!(self, Backing::Shared | Backing::SharedHugeTlb)
    }
}

/// What to allocate for one region.
#[derive(Clone, Debug)]
pub struct RegionSpec {
    pub name: String,
    pub size: usize,
    pub backing: Backing,
}

fn syscall_err(op: &'static str) -> MemoryError {
    MemoryError::Syscall {
        op,
        source: io::Error::last_os_error(),
    }
}

/// `madvise` on a range we own.
fn madvise(
    addr: usize,
    len: usize,
    advice: libc::c_int,
    op: &'static str,
) -> Result<(), MemoryError> {
    // SAFETY: callers pass a range inside a mapping they own; madvise does not touch Rust-visible
    // memory except as the advice says (DONTNEED zeroes pages, which callers want).
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } != 0 {
        return Err(syscall_err(op));
    }
    Ok(())
}

/// Free hugetlb pages of the default size, from /proc/meminfo.
pub fn free_huge_pages() -> Option<usize> {
    meminfo_value("HugePages_Free:")
}

fn meminfo_value(key: &str) -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[derive(Debug)]
enum MapKind {
    /// munmap on drop.
    Mmap,
    /// hugepage_rs::dealloc on drop with this layout.
    HugeTlb(Layout),
    /// A memfd mapped twice (`Mapping::base` and this alias), both munmapped on drop; the
    /// mappings keep the file alive (its descriptor is closed once they exist).
    Shared { alias: usize },
}

/// An mmap we own: `[base, base+len)`, mapped read/write until drop.
#[derive(Debug)]
pub struct Mapping {
    base: usize,
    len: usize,
    backing: Backing,
    kind: MapKind,
}

impl Mapping {
    /// Makes the first `len` bytes fresh zero memory, allocated now: drops whatever is there
    /// (`MADV_DONTNEED`) and pre-faults it for writing (`MADV_POPULATE_WRITE`), so on a THP
    /// mapping the kernel hands out zeroed huge pages without a second pass of zeroing.
    pub fn fresh_zeroed(&self, len: usize) -> Result<(), MemoryError> {
        if len > self.len() || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::OutOfRange {
                offset: 0,
                len: len as u64,
                size: self.len(),
            });
        }
        madvise(
            self.addr(),
            len,
            libc::MADV_DONTNEED,
            "madvise(MADV_DONTNEED)",
        )?;
        madvise(
            self.addr(),
            len,
            libc::MADV_POPULATE_WRITE,
            "madvise(MADV_POPULATE_WRITE)",
        )
    }

    /// Map `len` bytes of memory with the given backing (private, or a shared memfd). `len`
    /// must be a non-zero multiple of `backing.host_page_size()`. The memory reads as zero;
    /// private memory is not populated yet, a shared file is allocated in full.
    pub fn new(name: &str, len: usize, backing: Backing) -> Result<Mapping, MemoryError> {
        let host_page = backing.host_page_size();
        if backing == Backing::Borrowed {
            return Err(MemoryError::BorrowedNotAllocatable);
        }
        if len == 0 || len & (host_page - 1) != 0 || len > isize::MAX as usize / 2 {
            return Err(MemoryError::BadSize {
                name: name.to_string(),
                size: len,
                host_page,
            });
        }
        let m = match backing {
            Backing::Anonymous => {
                let base = mmap_anon(name, len)?;
                let m = Mapping {
                    base,
                    len,
                    backing,
                    kind: MapKind::Mmap,
                };
                // Keep host pages 4 KiB even if THP is set to "always".
                madvise(base, len, libc::MADV_NOHUGEPAGE, "madvise(MADV_NOHUGEPAGE)")?;
                m
            }
            Backing::TransparentHuge => {
                // Over-map by one huge page, then trim so the range is 2 MiB aligned.
                let raw_len = len + HUGE_PAGE_SIZE;
                let raw = mmap_anon(name, raw_len)?;
                let base = raw.next_multiple_of(HUGE_PAGE_SIZE);
                let head = base - raw;
                let tail = raw_len - head - len;
                // SAFETY: [raw, base) and [base+len, raw+raw_len) are parts of the mapping we
                // just created that nothing else references.
                unsafe {
                    if head > 0 {
                        libc::munmap(raw as *mut libc::c_void, head);
                    }
                    if tail > 0 {
                        libc::munmap((base + len) as *mut libc::c_void, tail);
                    }
                }
                let m = Mapping {
                    base,
                    len,
                    backing,
                    kind: MapKind::Mmap,
                };
                madvise(base, len, libc::MADV_HUGEPAGE, "madvise(MADV_HUGEPAGE)")?;
                m
            }
            Backing::HugeTlb => {
                check_huge_page_size()?;
                let layout = Layout::from_size_align(len, HUGE_PAGE_SIZE).map_err(|_| {
                    MemoryError::BadSize {
                        name: name.to_string(),
                        size: len,
                        host_page,
                    }
                })?;
                // SAFETY: layout has non-zero size; the result is checked for null and freed
                // with the same layout in Drop.
                let p = unsafe { hugepage_rs::alloc(layout) };
                if p.is_null() {
                    return Err(huge_pages_unavailable(name, len));
                }
                Mapping {
                    base: p as usize,
                    len,
                    backing,
                    kind: MapKind::HugeTlb(layout),
                }
            }
            Backing::Shared | Backing::SharedHugeTlb => {
                let huge = backing == Backing::SharedHugeTlb;
                if huge {
                    check_huge_page_size()?;
                }
                let file = memfd(len, huge).map_err(|e| match e {
                    MemoryError::Syscall { source, .. }
                        if huge && source.raw_os_error() == Some(libc::ENOSPC) =>
                    {
                        huge_pages_unavailable(name, len)
                    }
                    e => e,
                })?;
                use std::os::fd::AsRawFd;
                let base = mmap_rw(name, len, libc::MAP_SHARED, file.as_raw_fd(), 0)?;
                let alias = map_alias(name, file.as_raw_fd(), 0, len, base);
                let alias = match alias {
                    Ok(a) => a,
                    Err(e) => {
                        // SAFETY: `base` is the mapping just created above, referenced nowhere.
                        unsafe { libc::munmap(base as *mut libc::c_void, len) };
                        return Err(e);
                    }
                };
                Mapping {
                    base,
                    len,
                    backing,
                    kind: MapKind::Shared { alias },
                }
            }
            Backing::Borrowed => unreachable!("rejected above"),
        };
        tracing::debug!(
            name,
            len,
            ?backing,
            base = format_args!("{:#x}", m.base),
            "mapped"
        );
        Ok(m)
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.base
    }

    /// Start as a pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (mappings are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Backing of this mapping.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The alias mapping's start, for a shared backing.
    fn shared(&self) -> Option<usize> {
        match self.kind {
            MapKind::Shared { alias } => Some(alias),
            _ => None,
        }
    }
}

/// The hugetlb pool's default page size must be 2 MiB.
fn check_huge_page_size() -> Result<(), MemoryError> {
    let found = meminfo_value("Hugepagesize:").map(|kb| kb * 1024);
    if found != Some(HUGE_PAGE_SIZE) {
        return Err(MemoryError::HugePageSizeMismatch {
            found: found.unwrap_or(0),
        });
    }
    Ok(())
}

/// The error for a hugetlb allocation of `len` bytes that the pool cannot serve.
fn huge_pages_unavailable(name: &str, len: usize) -> MemoryError {
    let needed = len / HUGE_PAGE_SIZE;
    let free = free_huge_pages().unwrap_or(0);
    let total = meminfo_value("HugePages_Total:").unwrap_or(0);
    MemoryError::HugePagesUnavailable {
        name: name.to_string(),
        needed,
        free,
        want: total + needed.saturating_sub(free),
    }
}

/// A memfd of `len` bytes (hugetlbfs if `huge`), every page allocated now (zeroed): a shared
/// region's pages always exist in the file, so the guest's first touch after userfaultfd is
/// armed is a *minor* fault, and a destination resolves it with `UFFDIO_CONTINUE`.
fn memfd(len: usize, huge: bool) -> Result<std::os::fd::OwnedFd, MemoryError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let flags = libc::MFD_CLOEXEC | if huge { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: the name is a NUL-terminated literal; memfd_create only reads it.
    let fd = unsafe { libc::memfd_create(c"migrate-guest".as_ptr(), flags) };
    if fd < 0 {
        return Err(syscall_err("memfd_create"));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls on the fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(syscall_err("ftruncate(memfd)"));
    }
    allocate_file_range(fd.as_raw_fd(), 0, len)?;
    Ok(fd)
}

/// `fallocate` `[offset, offset+len)` of a file we own (pages appear zeroed). Retried on
/// `EINTR` (older kernels abort a shmem or hugetlbfs `fallocate` on any pending signal).
fn allocate_file_range(
    fd: std::os::fd::RawFd,
    offset: usize,
    len: usize,
) -> Result<(), MemoryError> {
    loop {
        // SAFETY: a plain syscall on a file descriptor the caller owns; no memory is passed.
        if unsafe { libc::fallocate(fd, 0, offset as libc::off_t, len as libc::off_t) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(MemoryError::Syscall {
                op: "fallocate(memfd)",
                source: e,
            });
        }
    }
}

/// The alias of a shared region: `[offset, offset+len)` of the file `fd`, mapped in full now
/// (a receiver writing through it takes no page fault per page; the guest's view at `view` is
/// mapped page by page, by `UFFDIO_CONTINUE`).
///
/// Two hugetlb mappings of one file at addresses equal modulo 1 GiB (with equal flags) may share
/// page tables, and the guest's view would then see every page the alias maps before it is
/// placed (on kernels that do not unshare on a minor-fault registration). So the alias is put
/// where its offset within 1 GiB differs from the view's, which rules sharing out whatever the
/// two mappings' flags are.
fn map_alias(
    name: &str,
    fd: std::os::fd::RawFd,
    offset: u64,
    len: usize,
    view: usize,
) -> Result<usize, MemoryError> {
    const PUD_SIZE: usize = 1 << 30;
    let slack = 2 * HUGE_PAGE_SIZE;
    let reserved = mmap_anon(name, len + slack)?;
    let mut at = reserved.next_multiple_of(HUGE_PAGE_SIZE);
    if at.wrapping_sub(view) % PUD_SIZE == 0 {
        at += HUGE_PAGE_SIZE;
    }
    // `at` is 2 MiB aligned and `at + len <= reserved + len + slack`.
    let file_offset = libc::off_t::try_from(offset).unwrap_or(libc::off_t::MAX);
    // SAFETY: MAP_FIXED over `[at, at+len)`, which lies inside the reservation just made and
    // referenced by nothing else; it replaces only that reservation's pages.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
            fd,
            file_offset,
        )
    };
    let mapped = p != libc::MAP_FAILED;
    let err = io::Error::last_os_error();
    let (keep_from, keep_to) = if mapped { (at, at + len) } else { (at, at) };
    // SAFETY: the pieces of the reservation around the alias (all of it if mapping failed):
    // ours, referenced by nothing.
    unsafe {
        libc::munmap(reserved as *mut libc::c_void, keep_from - reserved);
        libc::munmap(
            keep_to as *mut libc::c_void,
            reserved + len + slack - keep_to,
        );
    }
    if !mapped {
        return Err(MemoryError::Mmap {
            name: name.to_string(),
            len,
            source: err,
        });
    }
    Ok(at)
}

/// A private anonymous read/write mapping of `len` bytes (not reserved up front).
fn mmap_anon(name: &str, len: usize) -> Result<usize, MemoryError> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    mmap_rw(name, len, flags, -1, 0)
}

fn mmap_rw(
    name: &str,
    len: usize,
    flags: libc::c_int,
    fd: std::os::fd::RawFd,
    offset: u64,
) -> Result<usize, MemoryError> {
    let offset = libc::off_t::try_from(offset).map_err(|_| MemoryError::Mmap {
        name: name.to_string(),
        len,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: a new mapping at a kernel-chosen address (no MAP_FIXED): no existing memory is
    // affected; `fd` is -1 for anonymous memory or a file the caller holds open.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::Mmap {
            name: name.to_string(),
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(p as usize)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        match self.kind {
            // SAFETY: we own [base, base+len), created by mmap; nothing can use it after drop
            // because every user holds an Arc to this Mapping.
            MapKind::Mmap => unsafe {
                libc::munmap(self.base as *mut libc::c_void, self.len);
            },
            // SAFETY: allocated by hugepage_rs::alloc with exactly this layout.
            MapKind::HugeTlb(layout) => unsafe {
                hugepage_rs::dealloc(self.base as *mut u8, layout)
            },
            // SAFETY: we own both mappings of the file, and nothing uses them after drop
            // (every user holds an Arc to this Mapping).
            MapKind::Shared { alias } => unsafe {
                libc::munmap(self.base as *mut libc::c_void, self.len);
                libc::munmap(alias as *mut libc::c_void, self.len);
            },
        }
    }
}

// SAFETY: [base, base+len) stays mapped read/write until Drop, which runs only when the last
// owner (e.g. an in-flight send's BufRef) is gone.
unsafe impl StableMemory for Mapping {
    fn memory(&self) -> (*const u8, usize) {
        (self.base as *const u8, self.len)
    }
}

/// Memory the VMM owns, kept alive through `owner`.
struct Borrowed {
    base: usize,
    len: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: GuestRegion::from_raw's contract: [base, base+len) stays mapped read/write while
// `_owner` lives, and we hold `_owner`.
unsafe impl StableMemory for Borrowed {
    fn memory(&self) -> (*const u8, usize) {
        (self.base as *const u8, self.len)
    }
}

/// A VMM's shared guest RAM, and the alias of it we mapped (unmapped on drop).
struct BorrowedShared {
    base: usize,
    len: usize,
    alias: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: GuestRegion::from_memfd's contract: [base, base+len) stays mapped read/write while
// `_owner` lives, and we hold `_owner`.
unsafe impl StableMemory for BorrowedShared {
    fn memory(&self) -> (*const u8, usize) {
        (self.base as *const u8, self.len)
    }
}

impl Drop for BorrowedShared {
    fn drop(&mut self) {
        // SAFETY: we mapped the alias in `from_memfd` and own it; every user holds an Arc to
        // this value, so nothing uses it after drop.
        unsafe { libc::munmap(self.alias as *mut libc::c_void, self.len) };
    }
}

/// Validates a borrowed range: non-null, non-empty, aligned to a power-of-two host page size.
fn check_borrow(base: usize, len: usize, host_page_size: usize) -> Result<(), MemoryError> {
    if base == 0 || len == 0 {
        return Err(MemoryError::InvalidBorrow(format!(
            "null address or empty range ({base:#x}, {len})"
        )));
    }
    if !host_page_size.is_power_of_two() || host_page_size < PAGE_SIZE {
        return Err(MemoryError::InvalidBorrow(format!(
            "host page size {host_page_size} is not a power of two >= {PAGE_SIZE}"
        )));
    }
    if base & (host_page_size - 1) != 0
        || len & (host_page_size - 1) != 0
        || base.checked_add(len).is_none()
    {
        return Err(MemoryError::InvalidBorrow(format!(
            "range {base:#x}+{len:#x} is not aligned to the host page size {host_page_size}"
        )));
    }
    Ok(())
}

/// The shared backing of a file: shmem (4 KiB pages) or hugetlbfs with 2 MiB pages.
fn shared_file_backing(fd: std::os::fd::RawFd) -> Result<Backing, MemoryError> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes one `statfs` into the buffer we pass; we read it only on success.
    let st = unsafe {
        if libc::fstatfs(fd, st.as_mut_ptr()) != 0 {
            return Err(syscall_err("fstatfs"));
        }
        st.assume_init()
    };
    match st.f_type as u32 as i64 {
        TMPFS_MAGIC => Ok(Backing::Shared),
        HUGETLBFS_MAGIC if st.f_bsize as usize == HUGE_PAGE_SIZE => Ok(Backing::SharedHugeTlb),
        HUGETLBFS_MAGIC => Err(MemoryError::InvalidBorrow(format!(
            "hugetlbfs file with {} byte pages (2 MiB pages are supported)",
            st.f_bsize
        ))),
        t => Err(MemoryError::InvalidBorrow(format!(
            "file system {t:#x} is neither shmem (a memfd, tmpfs) nor hugetlbfs: userfaultfd \
             minor faults need one of them"
        ))),
    }
}

/// A handle to one guest memory region. Cheap to clone; keeps the memory mapped.
#[derive(Clone)]
pub struct GuestRegion {
    id: u16,
    name: Arc<str>,
    owner: Arc<dyn StableMemory>,
    base: usize,
    len: usize,
    host_page_size: usize,
    backing: Backing,
    /// For a shared backing: the alias mapping's start (lives as long as `owner`).
    shared: Option<usize>,
}

impl std::fmt::Debug for GuestRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRegion")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("base", &format_args!("{:#x}", self.base))
            .field("len", &self.len)
            .field("host_page_size", &self.host_page_size)
            .field("backing", &self.backing)
            .finish()
    }
}

impl GuestRegion {
    /// Map a new region per `spec` (memory reads as zero, nothing populated).
    pub fn allocate(id: u16, spec: &RegionSpec) -> Result<Self, MemoryError> {
        let m = Mapping::new(&spec.name, spec.size, spec.backing)?;
        Ok(Self::from_mapping(id, &spec.name, Arc::new(m)))
    }

    /// A region covering all of `mapping`.
    pub fn from_mapping(id: u16, name: &str, mapping: Arc<Mapping>) -> Self {
        GuestRegion {
            id,
            name: Arc::from(name),
            base: mapping.base,
            len: mapping.len,
            host_page_size: mapping.backing.host_page_size(),
            backing: mapping.backing,
            shared: mapping.shared(),
            owner: mapping,
        }
    }

    /// Borrow memory the VMM owns.
    ///
    /// # Safety
    /// `[addr, addr+len)` is mapped read/write and stays so while `owner` lives;
    /// `host_page_size` is the real host page size of that mapping.
    pub unsafe fn from_raw(
        id: u16,
        name: &str,
        addr: *mut u8,
        len: usize,
        host_page_size: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self, MemoryError> {
        let base = addr as usize;
        check_borrow(base, len, host_page_size)?;
        Ok(GuestRegion {
            id,
            name: Arc::from(name),
            owner: Arc::new(Borrowed {
                base,
                len,
                _owner: owner,
            }),
            base,
            len,
            host_page_size,
            backing: Backing::Borrowed,
            shared: None,
        })
    }

    /// Borrow a VMM's *shared* guest RAM: `[addr, addr+len)` is the VMM's `MAP_SHARED` mapping
    /// of `fd` at `offset`, where `fd` is a shmem file (a memfd: 4 KiB host pages) or a
    /// hugetlbfs file with 2 MiB pages. The region then works like [`Backing::Shared`] /
    /// [`Backing::SharedHugeTlb`]: the engine maps its own alias of that file range and, so that
    /// every later fault on the guest's view is a minor fault, allocates now any page of the
    /// range the file does not have yet (`fallocate`; pages already there keep their
    /// contents). The host page size comes from the file's file system.
    ///
    /// As a destination's memory, the range must read as zero where the source sends nothing
    /// but "zero" (as fresh RAM does): the destination does not write zero pages it never had.
    ///
    /// # Safety
    /// `[addr, addr+len)` is mapped read/write and shared from `fd` at `offset`, and stays so
    /// while `owner` lives.
    pub unsafe fn from_memfd(
        id: u16,
        name: &str,
        addr: *mut u8,
        len: usize,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        let (fd, base) = (fd.as_raw_fd(), addr as usize);
        let backing = shared_file_backing(fd)?;
        let host_page_size = backing.host_page_size();
        check_borrow(base, len, host_page_size)?;
        if !offset.is_multiple_of(host_page_size as u64) {
            return Err(MemoryError::InvalidBorrow(format!(
                "file offset {offset:#x} is not aligned to the host page size {host_page_size}"
            )));
        }
        let at = usize::try_from(offset)
            .map_err(|_| MemoryError::InvalidBorrow(format!("file offset {offset:#x}")))?;
        allocate_file_range(fd, at, len)?;
        let alias = map_alias(name, fd, offset, len, base)?;
        Ok(GuestRegion {
            id,
            name: Arc::from(name),
            owner: Arc::new(BorrowedShared {
                base,
                len,
                alias,
                _owner: owner,
            }),
            base,
            len,
            host_page_size,
            backing,
            shared: Some(alias),
        })
    }

    pub fn id(&self) -> u16 {
        self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn host_page_size(&self) -> usize {
        self.host_page_size
    }
    /// Number of host pages (`len / host_page_size`).
    pub fn host_pages(&self) -> usize {
        self.len / self.host_page_size
    }
    pub fn backing(&self) -> Backing {
        self.backing
    }
    /// Host virtual address of offset 0.
    pub fn base_addr(&self) -> usize {
        self.base
    }

    /// True if `[offset, offset+len)` lies inside the region (no overflow possible).
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        if self.contains(offset as u64, len as u64) {
            Ok(())
        } else {
            Err(MemoryError::OutOfRange {
                offset: offset as u64,
                len: len as u64,
                size: self.len,
            })
        }
    }

    fn check_aligned(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        self.check(offset, len)?;
        if (offset | len) & (self.host_page_size - 1) != 0 {
            return Err(MemoryError::Misaligned {
                offset,
                len,
                host_page: self.host_page_size,
            });
        }
        Ok(())
    }

    /// A send buffer pointing at `[offset, offset+len)` that keeps the memory mapped.
    pub fn buf_ref(&self, offset: usize, len: usize) -> Result<BufRef, MemoryError> {
        self.check(offset, len)?;
        BufRef::new(self.owner.clone(), offset, len).map_err(|e| MemoryError::BufRef(e.to_string()))
    }

    /// Racy view of `[offset, offset+len)`; callers bounds-check first.
    fn racy_slice(&self, offset: usize, len: usize) -> &[u8] {
        debug_assert!(self.contains(offset as u64, len as u64));
        // SAFETY: the range is inside the mapping, which stays mapped while `self.owner` (held by
        // `self`, outliving the borrow) lives. Other threads or the guest may write these bytes
        // concurrently: we only ever read plain bytes (every bit pattern is valid), so a race
        // yields stale or torn data, never an invalid value; the dirty log reports any page
        // written after tracking started, so such a stale read is resent later.
        unsafe { std::slice::from_raw_parts((self.base + offset) as *const u8, len) }
    }

    /// True if every byte of `[offset, offset+len)` is zero (racy; false if out of range).
    pub fn is_zero(&self, offset: usize, len: usize) -> bool {
        if self.check(offset, len).is_err() {
            return false;
        }
        let s = self.racy_slice(offset, len);
        // SAFETY: u128 has no invalid bit patterns; align_to yields an aligned middle part.
        let (head, mid, tail) = unsafe { s.align_to::<u128>() };
        head.iter().all(|&b| b == 0)
            && tail.iter().all(|&b| b == 0)
            && mid
                .chunks(16)
                .all(|c| c.iter().fold(0u128, |acc, &w| acc | w) == 0)
    }

    /// Copy `[offset, offset+out.len())` into `out` (racy read, bounds-checked).
    pub fn read_into(&self, offset: usize, out: &mut [u8]) -> Result<(), MemoryError> {
        self.check(offset, out.len())?;
        out.copy_from_slice(self.racy_slice(offset, out.len()));
        Ok(())
    }

    /// Copy `data` to `[offset, offset+data.len())` (bounds-checked).
    pub fn write_from(&self, offset: usize, data: &[u8]) -> Result<(), MemoryError> {
        let dst = self.ptr_at(offset, data.len())?;
        // SAFETY: dst..dst+len is inside the live mapping (checked by ptr_at); `data` is a
        // Rust slice and cannot overlap guest memory we never hand out as a Rust reference
        // for writing. Concurrent writers race by design (last writer wins).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Zero `[offset, offset+len)` by writing (populates the pages).
    pub fn fill_zero(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        let dst = self.ptr_at(offset, len)?;
        // SAFETY: dst..dst+len is inside the live mapping (checked by ptr_at).
        unsafe { std::ptr::write_bytes(dst, 0, len) };
        Ok(())
    }

    /// Bounds-checked raw pointer to `offset`, valid for `len` bytes while `self` (or a clone)
    /// lives.
    pub fn ptr_at(&self, offset: usize, len: usize) -> Result<*mut u8, MemoryError> {
        self.check(offset, len)?;
        Ok((self.base + offset) as *mut u8)
    }

    /// Bounds-checked raw pointer to `offset` in the alias mapping of a shared region (the
    /// same memory as [`ptr_at`](Self::ptr_at), but writing through it faults nothing into
    /// the guest's view), valid for `len` bytes while `self` (or a clone) lives. Writes through
    /// the alias are invisible to dirty tracking of the guest's view: on a source, only the
    /// guest writes guest memory.
    pub fn alias_ptr_at(&self, offset: usize, len: usize) -> Result<*mut u8, MemoryError> {
        self.check(offset, len)?;
        match self.shared {
            Some(alias) => Ok((alias + offset) as *mut u8),
            None => Err(MemoryError::NotShared {
                name: self.name.to_string(),
                backing: self.backing,
            }),
        }
    }

    /// Drop the pages of `[offset, offset+len)` (host-page aligned): they read as zero and
    /// fault again (so a userfaultfd registration sees them again). A shared region keeps its
    /// file pages (giving them back to a hugetlb pool could lose them to another process, and
    /// its faults must stay minor faults): they are zeroed through the alias, then unmapped
    /// from the guest's view.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        if self.shared.is_some() {
            let alias = self.alias_ptr_at(offset, len)?;
            self.check_aligned(offset, len)?;
            // SAFETY: `alias_ptr_at` checked the range lies in the alias mapping, alive while
            // `self` is. Other writers race by design (as with `write_from`), and the pages
            // are dropped from the guest's view right after.
            unsafe { std::ptr::write_bytes(alias, 0, len) };
        }
        self.unmap_view(offset, len)
    }

    /// Unmaps `[offset, offset+len)` (host-page aligned) from the guest's view, so the next
    /// touch faults, without zeroing anything on purpose: private memory loses its pages (they
    /// read as zero, as after [`discard`](Self::discard)); a shared region's file keeps them
    /// as they are. A destination does this to pages that must arrive again, whose content is
    /// replaced before they are mapped.
    pub fn unmap_view(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        self.advise(offset, len, libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)")
    }

    /// Allocate the pages of `[offset, offset+len)` for writing in one syscall
    /// (`MADV_POPULATE_WRITE`; host-page aligned), instead of one page fault per page when they
    /// are first written. Existing contents are kept.
    pub fn populate_write(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        self.advise(
            offset,
            len,
            libc::MADV_POPULATE_WRITE,
            "madvise(MADV_POPULATE_WRITE)",
        )
    }

    /// `madvise` on a host-page-aligned range of this region (nothing for an empty one).
    fn advise(
        &self,
        offset: usize,
        len: usize,
        advice: libc::c_int,
        op: &'static str,
    ) -> Result<(), MemoryError> {
        self.check_aligned(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        madvise(self.base + offset, len, advice, op)
    }

    /// Whether the host page containing `offset` is present in memory (`mincore`).
    pub fn is_populated(&self, offset: usize) -> Result<bool, MemoryError> {
        self.check(offset, 1)?;
        let page = (self.base + offset) & !(PAGE_SIZE - 1);
        let mut v: u8 = 0;
        // SAFETY: `page` is a page-aligned address inside our mapping; mincore writes one byte
        // for one page into `v`.
        let r = unsafe { libc::mincore(page as *mut libc::c_void, PAGE_SIZE, &mut v) };
        if r != 0 {
            return Err(syscall_err("mincore"));
        }
        Ok(v & 1 != 0)
    }

    /// xxh3-64 of `[offset, offset+len)` (racy read). Out of range hashes the empty input
    /// clamped to the region: callers check bounds.
    pub fn digest(&self, offset: usize, len: usize) -> u64 {
        let start = offset.min(self.len);
        let len = len.min(self.len - start);
        xxhash_rust::xxh3::xxh3_64(self.racy_slice(start, len))
    }
}

/// All guest regions, ids `0..n` in order. Shared as `Arc<GuestMemory>`.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<GuestRegion>,
}

impl GuestMemory {
    /// Validate and take `regions`: ids `0..n` in order, names unique, non-empty and at most
    /// 255 bytes, address ranges disjoint.
    pub fn new(regions: Vec<GuestRegion>) -> Result<Self, MemoryError> {
        if regions.len() > u16::MAX as usize + 1 {
            return Err(MemoryError::InvalidRegions(format!(
                "{} regions (at most 65536)",
                regions.len()
            )));
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in regions.iter().enumerate() {
            if r.id as usize != i {
                return Err(MemoryError::InvalidRegions(format!(
                    "region '{}' at index {i} has id {}",
                    r.name, r.id
                )));
            }
            if r.name.is_empty() || r.name.len() > MAX_REGION_NAME {
                return Err(MemoryError::InvalidRegions(format!(
                    "region {i} name must be 1..={MAX_REGION_NAME} bytes, got {}",
                    r.name.len()
                )));
            }
            if !names.insert(r.name.clone()) {
                return Err(MemoryError::InvalidRegions(format!(
                    "duplicate region name '{}'",
                    r.name
                )));
            }
        }
        let mut by_addr: Vec<&GuestRegion> = regions.iter().collect();
        by_addr.sort_by_key(|r| r.base);
        for w in by_addr.windows(2) {
            if w[0].base + w[0].len > w[1].base {
                return Err(MemoryError::InvalidRegions(format!(
                    "regions '{}' and '{}' overlap",
                    w[0].name, w[1].name
                )));
            }
        }
        Ok(GuestMemory { regions })
    }

    /// Allocate one region per spec, ids `0..n`.
    pub fn allocate(specs: &[RegionSpec]) -> Result<Self, MemoryError> {
        let regions = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let id = u16::try_from(i).map_err(|_| {
                    MemoryError::InvalidRegions(format!("{} regions (at most 65536)", specs.len()))
                })?;
                GuestRegion::allocate(id, s)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(regions)
    }

    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    pub fn region(&self, id: u16) -> Option<&GuestRegion> {
        self.regions.get(id as usize)
    }

    /// The region containing host address `addr`, and the offset of `addr` in it.
    pub fn find_addr(&self, addr: usize) -> Option<(&GuestRegion, usize)> {
        self.regions
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (r, addr - r.base))
    }

    /// Sum of region lengths.
    pub fn total_bytes(&self) -> usize {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Sum of host pages over all regions.
    pub fn total_host_pages(&self) -> usize {
        self.regions.iter().map(|r| r.host_pages()).sum()
    }

    /// Bytes of our regions currently backed by transparent huge pages (sum of `AnonHugePages`
    /// in /proc/self/smaps over the mappings that overlap a region). `None` if smaps is unreadable.
    pub fn anon_huge_bytes(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        Some(sum_anon_huge(&smaps, &self.regions))
    }
}

fn sum_anon_huge(smaps: &str, regions: &[GuestRegion]) -> u64 {
    let mut total = 0u64;
    let mut in_ours = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    in_ours = regions.iter().any(|r| a < r.base + r.len && r.base < b);
                    continue;
                }
            }
        }
        if in_ours {
            if let Some(rest) = line.strip_prefix("AnonHugePages:") {
                if let Some(kb) = rest
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    total += kb * 1024;
                }
            }
        }
    }
    total
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Serializes tests that change /proc/sys/vm/nr_hugepages.
    pub(crate) static HUGETLB_LOCK: Mutex<()> = Mutex::new(());

    /// Reserves hugetlb pages for a test and restores the previous pool size on drop.
    pub(crate) struct HugePool {
        prev: String,
        _guard: std::sync::MutexGuard<'static, ()>,
    }

    impl HugePool {
        /// Make at least `pages` 2 MiB pages free, or explain why not.
        pub(crate) fn reserve(pages: usize) -> Result<HugePool, String> {
            let guard = HUGETLB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            const P: &str = "/proc/sys/vm/nr_hugepages";
            let prev = std::fs::read_to_string(P).map_err(|e| format!("cannot read {P}: {e}"))?;
            let cur: usize = prev.trim().parse().map_err(|e| format!("bad {P}: {e}"))?;
            let pool = HugePool {
                prev,
                _guard: guard,
            };
            if free_huge_pages().unwrap_or(0) >= pages {
                return Ok(pool);
            }
            std::fs::write(P, format!("{}\n", cur + pages))
                .map_err(|e| format!("cannot write {P}: {e}"))?;
            let free = free_huge_pages().unwrap_or(0);
            if free < pages {
                return Err(format!("asked for {pages} hugetlb pages, only {free} free"));
            }
            Ok(pool)
        }
    }

    impl Drop for HugePool {
        fn drop(&mut self) {
            if let Err(e) = std::fs::write("/proc/sys/vm/nr_hugepages", &self.prev) {
                eprintln!(
                    "could not restore nr_hugepages to {}: {e}",
                    self.prev.trim()
                );
            }
        }
    }

    fn region(backing: Backing, size: usize) -> GuestRegion {
        GuestRegion::allocate(
            0,
            &RegionSpec {
                name: "r".into(),
                size,
                backing,
            },
        )
        .unwrap()
    }

    #[test]
    fn anon_round_trip_and_bounds() {
        let r = region(Backing::Anonymous, 16 * PAGE_SIZE);
        assert_eq!(r.host_pages(), 16);
        assert_eq!(r.host_page_size(), PAGE_SIZE);
        assert!(r.is_zero(0, r.len()));
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        r.write_from(PAGE_SIZE - 7, &data).unwrap();
        let mut out = vec![0u8; data.len()];
        r.read_into(PAGE_SIZE - 7, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(!r.is_zero(0, 2 * PAGE_SIZE));
        assert!(r.is_zero(3 * PAGE_SIZE, 13 * PAGE_SIZE));
        assert!(!r.is_zero(PAGE_SIZE - 7, 1));
        assert!(r.is_zero(PAGE_SIZE - 8, 1));

        // Bounds: out of range, exactly at end, overflowing.
        let len = r.len();
        assert!(r.contains(0, len as u64));
        assert!(r.contains(len as u64, 0));
        assert!(!r.contains(len as u64, 1));
        assert!(!r.contains(1, u64::MAX));
        assert!(!r.contains(u64::MAX, 2));
        assert!(matches!(
            r.write_from(len - 1, &[1, 2]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(r.read_into(usize::MAX, &mut [0u8; 2]).is_err());
        assert!(r.ptr_at(usize::MAX - 1, 4).is_err());
        assert!(r.ptr_at(len, 0).is_ok());
        assert!(r.fill_zero(len - 10, 11).is_err());
        assert!(r.buf_ref(len - 10, 11).is_err());
        assert!(r.buf_ref(8, 16).is_ok());
        assert!(!r.is_zero(usize::MAX, 2));
        assert!(r.discard(1, PAGE_SIZE).is_err());
        assert!(r.discard(usize::MAX - 4095, PAGE_SIZE).is_err());

        r.fill_zero(0, 3 * PAGE_SIZE).unwrap();
        assert!(r.is_zero(0, len));
    }

    #[test]
    fn discard_unpopulates_and_zeroes() {
        let r = region(Backing::Anonymous, 8 * PAGE_SIZE);
        assert!(!r.is_populated(2 * PAGE_SIZE).unwrap());
        r.write_from(2 * PAGE_SIZE + 5, &[7]).unwrap();
        assert!(r.is_populated(2 * PAGE_SIZE).unwrap());
        assert!(!r.is_populated(3 * PAGE_SIZE).unwrap());
        r.discard(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(!r.is_populated(2 * PAGE_SIZE).unwrap());
        assert!(r.is_zero(0, r.len()));
        assert!(r.is_populated(r.len()).is_err());
    }

    /// A VMM's memfd-backed guest RAM, borrowed: the engine's alias sees the VMM's view, pages
    /// the file lacked are allocated (the VMM's data is kept), and files that cannot take
    /// minor faults or misaligned ranges are refused.
    #[test]
    fn vmm_memfd_is_borrowed_with_an_alias() {
        use std::os::fd::{AsFd, AsRawFd};
        let len = 8 * PAGE_SIZE;
        // What a VMM does: a memfd, sized, mapped shared, partly written.
        let file = std::fs::File::from(
            // SAFETY: `memfd_create` returns a fresh descriptor (checked) that `OwnedFd` owns.
            unsafe {
                let fd = libc::memfd_create(c"vmm-ram".as_ptr(), libc::MFD_CLOEXEC);
                assert!(fd >= 0);
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
            },
        );
        file.set_len(2 * len as u64).unwrap();
        let vmm = mmap_rw("vmm", 2 * len, libc::MAP_SHARED, file.as_raw_fd(), 0).unwrap();
        // SAFETY: the VMM's mapping above is 2 * len bytes long, read/write.
        unsafe { std::ptr::write_bytes((vmm + len + PAGE_SIZE) as *mut u8, 0xAB, 16) };
        struct Unmap(usize, usize);
        impl Drop for Unmap {
            fn drop(&mut self) {
                // SAFETY: the test's own mapping; the region holding this owner is gone.
                unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
            }
        }
        let owner = Arc::new(Unmap(vmm, 2 * len));

        // The second half of the file, at its own offset.
        // SAFETY: [vmm+len, vmm+2*len) is the VMM's shared mapping of the file at offset len,
        // alive while `owner` is.
        let r = unsafe {
            GuestRegion::from_memfd(
                0,
                "ram",
                (vmm + len) as *mut u8,
                len,
                file.as_fd(),
                len as u64,
                owner.clone(),
            )
        }
        .unwrap();
        assert_eq!(r.backing(), Backing::Shared);
        assert_eq!(r.host_page_size(), PAGE_SIZE);
        let alias = r.alias_ptr_at(PAGE_SIZE, 16).unwrap();
        // SAFETY: 16 bytes inside the alias mapping, alive while `r` is.
        assert_eq!(unsafe { std::slice::from_raw_parts(alias, 16) }, [0xAB; 16]);
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(alias.add(PAGE_SIZE), 0xCD, 8) };
        let mut b = [0u8; 8];
        r.read_into(2 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0xCD; 8], "the VMM's view sees writes through the alias");
        assert!((0..8).all(|p| r.is_populated(p * PAGE_SIZE).unwrap()));

        // SAFETY: the same live mapping as above; a misaligned offset is refused before use.
        let misaligned = unsafe {
            GuestRegion::from_memfd(
                0,
                "x",
                vmm as *mut u8,
                len,
                file.as_fd(),
                100,
                owner.clone(),
            )
        };
        assert!(matches!(misaligned, Err(MemoryError::InvalidBorrow(_))));
        // A file on a file system without minor faults (procfs) is refused.
        let plain = std::fs::File::open("/proc/self/stat").unwrap();
        // SAFETY: as above; the file's file system is refused before anything is mapped.
        let not_shmem = unsafe {
            GuestRegion::from_memfd(0, "x", vmm as *mut u8, len, plain.as_fd(), 0, owner.clone())
        };
        assert!(
            matches!(&not_shmem, Err(MemoryError::InvalidBorrow(m)) if m.contains("neither shmem")),
            "{not_shmem:?}"
        );
        // SAFETY: a null address is refused before use.
        let null = unsafe {
            GuestRegion::from_memfd(0, "x", std::ptr::null_mut(), len, file.as_fd(), 0, owner)
        };
        assert!(null.is_err());
    }

    /// Whether the page at `addr` is mapped in this process's page tables (pagemap "present").
    fn page_mapped(addr: usize) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start((addr / PAGE_SIZE * 8) as u64))
            .unwrap();
        let mut e = [0u8; 8];
        f.read_exact(&mut e).unwrap();
        u64::from_le_bytes(e) & (1 << 63) != 0
    }

    /// The alias never lines up with the guest's view modulo 1 GiB (where hugetlb mappings of
    /// one file may share page tables).
    #[test]
    fn the_alias_is_never_aligned_with_the_view() {
        for _ in 0..4 {
            let r = region(Backing::Shared, 8 * PAGE_SIZE);
            let alias = r.alias_ptr_at(0, PAGE_SIZE).unwrap() as usize;
            assert_ne!(alias.wrapping_sub(r.base_addr()) % (1 << 30), 0);
            assert_eq!(alias % HUGE_PAGE_SIZE, 0);
        }
    }

    /// A shared region: the alias is the same memory, every page of the file exists from the
    /// start, and a discard zeroes a range but keeps its pages in the file.
    #[test]
    fn shared_region_alias_and_discard() {
        let r = region(Backing::Shared, 8 * PAGE_SIZE);
        assert_eq!(r.host_page_size(), PAGE_SIZE);
        // SAFETY: alias_ptr_at bounds-checked one page of the live alias mapping.
        unsafe { std::ptr::write_bytes(r.alias_ptr_at(3 * PAGE_SIZE, PAGE_SIZE).unwrap(), 9, 10) };
        let mut b = [0u8; 10];
        r.read_into(3 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [9; 10], "the guest's view sees writes through the alias");
        assert!(r.alias_ptr_at(8 * PAGE_SIZE, 1).is_err());

        r.read_into(2 * PAGE_SIZE, &mut b).unwrap();
        assert!(
            page_mapped(r.base_addr() + 2 * PAGE_SIZE),
            "read through the view"
        );
        r.discard(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert!(
            !page_mapped(r.base_addr() + 2 * PAGE_SIZE),
            "a discard unmaps the guest's view"
        );
        assert!(r.is_zero(0, r.len()));
        // mincore on a shared mapping reports the file's page cache: still all there.
        assert!((0..8).all(|p| r.is_populated(p * PAGE_SIZE).unwrap()));
        assert!(r.discard(PAGE_SIZE, 100).is_err(), "unaligned discard");

        let private = region(Backing::Anonymous, 4 * PAGE_SIZE);
        assert!(matches!(
            private.alias_ptr_at(0, PAGE_SIZE),
            Err(MemoryError::NotShared { .. })
        ));
    }

    #[test]
    fn populate_write_allocates_exactly_the_range_and_keeps_data() {
        let r = region(Backing::Anonymous, 8 * PAGE_SIZE);
        r.write_from(PAGE_SIZE, &[7u8; 16]).unwrap();
        r.populate_write(PAGE_SIZE, 3 * PAGE_SIZE).unwrap();
        assert!(!r.is_populated(0).unwrap());
        for p in 1..4 {
            assert!(r.is_populated(p * PAGE_SIZE).unwrap(), "page {p}");
        }
        assert!(!r.is_populated(4 * PAGE_SIZE).unwrap());
        let mut got = [0u8; 16];
        r.read_into(PAGE_SIZE, &mut got).unwrap();
        assert_eq!(got, [7u8; 16]);
        assert!(r.populate_write(PAGE_SIZE + 1, PAGE_SIZE).is_err());
        assert!(r.populate_write(7 * PAGE_SIZE, 2 * PAGE_SIZE).is_err());
    }

    #[test]
    fn digest_tracks_content() {
        let r = region(Backing::Anonymous, 4 * PAGE_SIZE);
        let d0 = r.digest(0, r.len());
        assert_eq!(d0, xxhash_rust::xxh3::xxh3_64(&vec![0u8; 4 * PAGE_SIZE]));
        r.write_from(3 * PAGE_SIZE + 100, &[1]).unwrap();
        let d1 = r.digest(0, r.len());
        assert_ne!(d0, d1);
        assert_eq!(
            r.digest(0, 3 * PAGE_SIZE),
            xxhash_rust::xxh3::xxh3_64(&vec![0u8; 3 * PAGE_SIZE])
        );
        r.write_from(3 * PAGE_SIZE + 100, &[0]).unwrap();
        assert_eq!(r.digest(0, r.len()), d0);
    }

    #[test]
    fn thp_region_is_aligned_and_huge() {
        let r = region(Backing::TransparentHuge, 4 * HUGE_PAGE_SIZE);
        assert_eq!(r.base_addr() % HUGE_PAGE_SIZE, 0);
        assert_eq!(r.host_page_size(), HUGE_PAGE_SIZE);
        assert_eq!(r.host_pages(), 4);
        r.fill_zero(0, r.len()).unwrap();
        r.write_from(HUGE_PAGE_SIZE + 3, b"abc").unwrap();
        let mut out = [0u8; 3];
        r.read_into(HUGE_PAGE_SIZE + 3, &mut out).unwrap();
        assert_eq!(&out, b"abc");
        let mem = GuestMemory::new(vec![r.clone()]).unwrap();
        let huge = mem.anon_huge_bytes().unwrap();
        // THP availability depends on the host's free memory fragmentation; report, and only
        // require that our accounting never exceeds the region.
        eprintln!("AnonHugePages for a 8 MiB THP region: {huge} bytes");
        assert!(huge <= r.len() as u64);
        // discard must be host-page (2 MiB) aligned.
        assert!(matches!(
            r.discard(0, PAGE_SIZE),
            Err(MemoryError::Misaligned { .. })
        ));
        r.discard(HUGE_PAGE_SIZE, HUGE_PAGE_SIZE).unwrap();
        assert!(!r.is_populated(HUGE_PAGE_SIZE + 3 * PAGE_SIZE).unwrap());
        assert!(r.is_zero(0, r.len()));
    }

    #[test]
    fn bad_sizes_rejected() {
        let spec = |size, backing| RegionSpec {
            name: "x".into(),
            size,
            backing,
        };
        assert!(matches!(
            GuestRegion::allocate(0, &spec(0, Backing::Anonymous)),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(GuestRegion::allocate(0, &spec(PAGE_SIZE + 1, Backing::Anonymous)).is_err());
        assert!(GuestRegion::allocate(0, &spec(PAGE_SIZE, Backing::TransparentHuge)).is_err());
        assert!(GuestRegion::allocate(0, &spec(PAGE_SIZE, Backing::HugeTlb)).is_err());
        assert!(matches!(
            GuestRegion::allocate(0, &spec(PAGE_SIZE, Backing::Borrowed)),
            Err(MemoryError::BorrowedNotAllocatable)
        ));
    }

    #[test]
    fn guest_memory_validation_and_lookup() {
        let specs = [
            RegionSpec {
                name: "low".into(),
                size: 4 * PAGE_SIZE,
                backing: Backing::Anonymous,
            },
            RegionSpec {
                name: "high".into(),
                size: HUGE_PAGE_SIZE,
                backing: Backing::TransparentHuge,
            },
        ];
        let mem = GuestMemory::allocate(&specs).unwrap();
        assert_eq!(mem.total_bytes(), 4 * PAGE_SIZE + HUGE_PAGE_SIZE);
        assert_eq!(mem.total_host_pages(), 5);
        let hi = mem.region(1).unwrap();
        assert_eq!(hi.name(), "high");
        let (r, off) = mem.find_addr(hi.base_addr() + 12345).unwrap();
        assert_eq!((r.id(), off), (1, 12345));
        assert!(!matches!(mem.find_addr(hi.base_addr() + hi.len()), Some((r, _)) if r.id() == 1));
        assert!(!matches!(mem.find_addr(hi.base_addr() - 1), Some((r, _)) if r.id() == 1));
        assert!(mem.region(2).is_none());

        let a = mem.regions()[0].clone();
        let b = mem.regions()[1].clone();
        // Wrong order of ids.
        assert!(GuestMemory::new(vec![b.clone(), a.clone()]).is_err());
        // Duplicate name / overlap via a borrowed alias of the same memory.
        // SAFETY: `a` is kept alive by the owner Arc below.
        let alias = unsafe {
            GuestRegion::from_raw(
                1,
                "low",
                a.ptr_at(0, 0).unwrap(),
                a.len(),
                PAGE_SIZE,
                Arc::new(a.clone()),
            )
            .unwrap()
        };
        assert!(matches!(
            GuestMemory::new(vec![a.clone(), alias]),
            Err(MemoryError::InvalidRegions(_))
        ));
        // SAFETY: as above.
        let alias2 = unsafe {
            GuestRegion::from_raw(
                1,
                "alias",
                a.ptr_at(0, 0).unwrap(),
                a.len(),
                PAGE_SIZE,
                Arc::new(a.clone()),
            )
            .unwrap()
        };
        assert!(GuestMemory::new(vec![a.clone(), alias2]).is_err());
        let empty_name = GuestRegion::from_mapping(
            1,
            "",
            Arc::new(Mapping::new("t", PAGE_SIZE, Backing::Anonymous).unwrap()),
        );
        assert!(GuestMemory::new(vec![a.clone(), empty_name]).is_err());
        let long = GuestRegion::from_mapping(
            1,
            &"n".repeat(256),
            Arc::new(Mapping::new("t", PAGE_SIZE, Backing::Anonymous).unwrap()),
        );
        assert!(GuestMemory::new(vec![a, long]).is_err());
    }

    #[test]
    fn borrowed_region_reads_vmm_memory() {
        let m = Arc::new(Mapping::new("vmm", 4 * PAGE_SIZE, Backing::Anonymous).unwrap());
        // SAFETY: the mapping is kept alive by the owner Arc and has 4 KiB pages.
        let r =
            unsafe { GuestRegion::from_raw(0, "vmm", m.as_ptr(), m.len(), PAGE_SIZE, m.clone()) }
                .unwrap();
        drop(m);
        assert_eq!(r.backing(), Backing::Borrowed);
        r.write_from(10, b"xyz").unwrap();
        let mut o = [0u8; 3];
        r.read_into(10, &mut o).unwrap();
        assert_eq!(&o, b"xyz");
        assert!(r.buf_ref(0, 4 * PAGE_SIZE).is_ok());
        // SAFETY: invalid arguments are rejected before anything is dereferenced.
        unsafe {
            let own: Arc<dyn Any + Send + Sync> = Arc::new(());
            assert!(GuestRegion::from_raw(
                0,
                "x",
                std::ptr::null_mut(),
                PAGE_SIZE,
                PAGE_SIZE,
                own.clone()
            )
            .is_err());
            assert!(
                GuestRegion::from_raw(0, "x", 4096 as *mut u8, PAGE_SIZE, 3000, own.clone())
                    .is_err()
            );
            assert!(
                GuestRegion::from_raw(0, "x", 4097 as *mut u8, PAGE_SIZE, PAGE_SIZE, own).is_err()
            );
        }
    }

    #[test]
    fn smaps_parsing() {
        let m = Arc::new(Mapping::new("t", HUGE_PAGE_SIZE, Backing::TransparentHuge).unwrap());
        let r = GuestRegion::from_mapping(0, "t", m);
        let b = r.base_addr();
        let smaps = format!(
            "{:x}-{:x} rw-p 00000000 00:00 0\nRss: 4 kB\nAnonHugePages:      2048 kB\n\
             1000-2000 r--p 00000000 00:00 0\nAnonHugePages:      4096 kB\n",
            b,
            b + HUGE_PAGE_SIZE
        );
        assert_eq!(sum_anon_huge(&smaps, &[r]), 2048 * 1024);
    }

    #[test]
    fn hugetlb_region() {
        let pool = match HugePool::reserve(4) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped: hugetlb pages unavailable: {e}");
                return;
            }
        };
        let r = region(Backing::HugeTlb, 2 * HUGE_PAGE_SIZE);
        assert_eq!(r.host_page_size(), HUGE_PAGE_SIZE);
        assert_eq!(r.base_addr() % HUGE_PAGE_SIZE, 0);
        r.write_from(HUGE_PAGE_SIZE + 1, b"hi").unwrap();
        assert!(r.is_populated(HUGE_PAGE_SIZE).unwrap());
        r.discard(HUGE_PAGE_SIZE, HUGE_PAGE_SIZE).unwrap();
        assert!(r.is_zero(0, r.len()));
        // Asking for more than the pool holds fails with a message naming the sysctl.
        let err = GuestRegion::allocate(
            1,
            &RegionSpec {
                name: "big".into(),
                size: 64 * HUGE_PAGE_SIZE,
                backing: Backing::HugeTlb,
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, MemoryError::HugePagesUnavailable { needed: 64, .. }),
            "{msg}"
        );
        assert!(msg.contains("/proc/sys/vm/nr_hugepages"), "{msg}");
        drop(r);
        drop(pool);
    }
}
