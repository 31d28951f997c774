//! Dirty log from asynchronous userfaultfd write protection + `PAGEMAP_SCAN`.
//!
//! `start` registers every region in WP mode on a userfaultfd opened with `WP_ASYNC` (the kernel
//! resolves write faults itself and marks the page written, no messages) and `WP_UNPOPULATED`
//! (never-touched pages are protected too), then write-protects everything. `collect` runs the
//! `PAGEMAP_SCAN` ioctl on /proc/self/pagemap, which reports pages with `PAGE_IS_WRITTEN` and,
//! with `PM_SCAN_WP_MATCHING`, write-protects them again in the same page-table walk, so no
//! write between report and re-arm is lost.
//!
//! The ABI below is from `include/uapi/linux/fs.h` (Linux 6.7+).

use std::fs::File;
use std::os::fd::AsRawFd;

use super::{check_bitmap, DirtyError, DirtyLog};
use crate::bitmap::AtomicBitmap;
use crate::memory::{GuestMemory, GuestRegion};
use crate::uffd::{feature, supported_features, RegisterMode, Userfaultfd};

/// `PAGE_IS_WRITTEN`: the page was written since it was write protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Write-protect the pages that matched.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (EPERM) on pages without asynchronous write protection instead of silently skipping.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Number of `page_region` entries per ioctl.
const VEC_LEN: usize = 512;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default, Debug)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong =
    ((3u32 << 30) | ((std::mem::size_of::<PmScanArg>() as u32) << 16) | ((b'f' as u32) << 8) | 16)
        as libc::c_ulong;

/// Dirty log backed by async userfaultfd write protection.
pub struct UffdWpDirtyLog {
    uffd: Option<Userfaultfd>,
    pagemap: File,
    /// (base, len) of every registered region, by region id.
    tracked: Vec<(usize, usize)>,
    started: bool,
    buf: Vec<PageRegion>,
}

impl std::fmt::Debug for UffdWpDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdWpDirtyLog")
            .field("started", &self.started)
            .field("regions", &self.tracked.len())
            .finish()
    }
}

fn open_uffd() -> Result<Userfaultfd, DirtyError> {
    let mut features = feature::WP_ASYNC | feature::WP_UNPOPULATED;
    features |= supported_features()? & feature::WP_HUGETLBFS_SHMEM;
    Ok(Userfaultfd::open(features)?)
}

impl UffdWpDirtyLog {
    /// Open the userfaultfd (WP_ASYNC | WP_UNPOPULATED, plus WP_HUGETLBFS_SHMEM when the
    /// kernel has it) and /proc/self/pagemap. Tracking begins at [`DirtyLog::start`].
    pub fn new() -> Result<Self, DirtyError> {
        let uffd = open_uffd()?;
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::Pagemap)?;
        Ok(UffdWpDirtyLog {
            uffd: Some(uffd),
            pagemap,
            tracked: Vec::new(),
            started: false,
            buf: vec![PageRegion::default(); VEC_LEN],
        })
    }

    /// One PAGEMAP_SCAN call over `[start, end)`; returns (entries filled, walk_end).
    fn scan_once(&mut self, start: usize, end: usize) -> Result<(usize, usize), DirtyError> {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: start as u64,
            end: end as u64,
            vec: self.buf.as_mut_ptr() as u64,
            vec_len: self.buf.len() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN encodes size_of::<PmScanArg>() and PmScanArg is the uapi layout;
        // the kernel writes at most `vec_len` PageRegion entries to `vec`, which points at our
        // exclusively borrowed buffer of exactly that length. [start, end) only names addresses
        // to inspect in our own address space.
        let r = unsafe {
            libc::ioctl(
                self.pagemap.as_raw_fd(),
                PAGEMAP_SCAN,
                &mut arg as *mut PmScanArg,
            )
        };
        if r < 0 {
            return Err(DirtyError::Scan {
                start,
                end,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(((r as usize).min(self.buf.len()), arg.walk_end as usize))
    }
}

impl DirtyLog for UffdWpDirtyLog {
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError> {
        if self.started {
            self.stop(memory)?;
        }
        if self.uffd.is_none() {
            self.uffd = Some(open_uffd()?);
        }
        let uffd = self.uffd.as_ref().ok_or(DirtyError::NotStarted)?;
        self.tracked.clear();
        for r in memory.regions() {
            uffd.register(r.base_addr(), r.len(), RegisterMode::WP)?;
            self.tracked.push((r.base_addr(), r.len()));
            uffd.write_protect(r.base_addr(), r.len(), true)?;
        }
        self.started = true;
        tracing::debug!(regions = self.tracked.len(), "uffd-wp dirty log started");
        Ok(())
    }

    fn collect(&mut self, region: &GuestRegion, dirty: &AtomicBitmap) -> Result<u64, DirtyError> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        check_bitmap(region, dirty)?;
        let (base, len) = (region.base_addr(), region.len());
        if self.tracked.get(region.id() as usize) != Some(&(base, len)) {
            return Err(DirtyError::UnknownRegion {
                id: region.id(),
                name: region.name().to_string(),
            });
        }
        let hp = region.host_page_size();
        let end = base + len;
        let mut cur = base;
        let mut reported = 0u64;
        // Ranges come back in increasing address order; count each host page once.
        let mut next_unreported = 0usize;
        while cur < end {
            let (n, walk_end) = self.scan_once(cur, end)?;
            for pr in &self.buf[..n] {
                let s = (pr.start as usize).clamp(base, end);
                let e = (pr.end as usize).clamp(base, end);
                if s >= e {
                    continue;
                }
                let first = (s - base) / hp;
                let last = (e - base - 1) / hp;
                dirty.set_range(first, last - first + 1);
                let from = first.max(next_unreported);
                if last >= from {
                    reported += (last - from + 1) as u64;
                    next_unreported = last + 1;
                }
            }
            if walk_end <= cur {
                return Err(DirtyError::ScanStuck {
                    start: cur,
                    end,
                    walk_end,
                });
            }
            cur = walk_end;
        }
        Ok(reported)
    }

    fn stop(&mut self, _memory: &GuestMemory) -> Result<(), DirtyError> {
        let uffd = self.uffd.take();
        let tracked = std::mem::take(&mut self.tracked);
        self.started = false;
        if let Some(uffd) = uffd {
            for (base, len) in tracked {
                // Unregistering also removes the write protection.
                uffd.unregister(base, len)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, RegionSpec, HUGE_PAGE_SIZE, PAGE_SIZE};

    #[test]
    fn abi_constants() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    fn mem(backing: Backing, size: usize) -> GuestMemory {
        GuestMemory::allocate(&[RegionSpec {
            name: "ram".into(),
            size,
            backing,
        }])
        .unwrap()
    }

    fn collect(log: &mut UffdWpDirtyLog, r: &GuestRegion) -> (u64, Vec<usize>) {
        let d = AtomicBitmap::new(r.host_pages());
        let n = log.collect(r, &d).unwrap();
        (n, d.iter_ones().collect())
    }

    #[test]
    fn reports_exactly_the_written_pages() {
        let mem = mem(Backing::Anonymous, 64 * PAGE_SIZE);
        let r = mem.regions()[0].clone();
        // Populate some pages before start: those writes must not be reported.
        r.write_from(0, &[1u8; 8 * PAGE_SIZE]).unwrap();
        let mut log = UffdWpDirtyLog::new().unwrap();
        log.start(&mem).unwrap();
        assert_eq!(collect(&mut log, &r), (0, vec![]));
        // One populated page, two never-touched ones (WP_UNPOPULATED), one spanning write.
        r.write_from(2 * PAGE_SIZE + 10, b"x").unwrap();
        r.write_from(40 * PAGE_SIZE, b"y").unwrap();
        r.write_from(63 * PAGE_SIZE + 4095, b"z").unwrap();
        assert_eq!(collect(&mut log, &r), (3, vec![2, 40, 63]));
        assert_eq!(collect(&mut log, &r), (0, vec![]));
        // Reads do not dirty.
        let mut b = [0u8; 16];
        r.read_into(40 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(collect(&mut log, &r), (0, vec![]));
        // Write again: reported again.
        r.write_from(40 * PAGE_SIZE + 100, b"again").unwrap();
        r.write_from(5 * PAGE_SIZE - 2, b"span").unwrap(); // pages 4 and 5
        assert_eq!(collect(&mut log, &r), (3, vec![4, 5, 40]));
        log.stop(&mem).unwrap();
        // After stop writes go through untracked; a collect is an error.
        r.write_from(0, b"free").unwrap();
        assert!(matches!(
            log.collect(&r, &AtomicBitmap::new(64)),
            Err(DirtyError::NotStarted)
        ));
        // Restart works (reopens the userfaultfd).
        log.start(&mem).unwrap();
        r.write_from(7 * PAGE_SIZE, b"q").unwrap();
        assert_eq!(collect(&mut log, &r), (1, vec![7]));
        log.stop(&mem).unwrap();
    }

    #[test]
    fn many_ranges_need_several_scans() {
        // More separate dirty ranges than one page_region vector holds.
        let pages = 2 * VEC_LEN + 50;
        let mem = mem(Backing::Anonymous, 2 * pages * PAGE_SIZE);
        let r = mem.regions()[0].clone();
        let mut log = UffdWpDirtyLog::new().unwrap();
        log.start(&mem).unwrap();
        for i in 0..pages {
            r.write_from(2 * i * PAGE_SIZE, &[1]).unwrap();
        }
        let (n, ones) = collect(&mut log, &r);
        assert_eq!(n as usize, pages);
        assert_eq!(ones, (0..pages).map(|i| 2 * i).collect::<Vec<_>>());
        assert_eq!(collect(&mut log, &r).0, 0);
    }

    #[test]
    fn thp_region_reports_whole_host_pages() {
        let mem = mem(Backing::TransparentHuge, 4 * HUGE_PAGE_SIZE);
        let r = mem.regions()[0].clone();
        r.fill_zero(0, HUGE_PAGE_SIZE).unwrap();
        let mut log = UffdWpDirtyLog::new().unwrap();
        log.start(&mem).unwrap();
        assert_eq!(collect(&mut log, &r), (0, vec![]));
        // Two 4 KiB writes in host page 0, one in host page 2, one at the very end of page 3.
        r.write_from(5 * PAGE_SIZE, b"a").unwrap();
        r.write_from(300 * PAGE_SIZE, b"b").unwrap();
        r.write_from(2 * HUGE_PAGE_SIZE + 17, b"c").unwrap();
        r.write_from(4 * HUGE_PAGE_SIZE - 1, b"d").unwrap();
        assert_eq!(collect(&mut log, &r), (3, vec![0, 2, 3]));
        assert_eq!(collect(&mut log, &r), (0, vec![]));
        r.write_from(HUGE_PAGE_SIZE + 3, b"e").unwrap();
        assert_eq!(collect(&mut log, &r), (1, vec![1]));
        log.stop(&mem).unwrap();
    }

    #[test]
    fn hugetlb_region_is_tracked() {
        let pool = match crate::memory::tests::HugePool::reserve(2) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("skipped: hugetlb pages unavailable: {e}");
                return;
            }
        };
        let mem = mem(Backing::HugeTlb, 2 * HUGE_PAGE_SIZE);
        let r = mem.regions()[0].clone();
        r.fill_zero(0, HUGE_PAGE_SIZE).unwrap();
        let mut log = UffdWpDirtyLog::new().unwrap();
        log.start(&mem).unwrap();
        assert_eq!(collect(&mut log, &r), (0, vec![]));
        r.write_from(HUGE_PAGE_SIZE + 4 * PAGE_SIZE, b"h").unwrap();
        assert_eq!(collect(&mut log, &r), (1, vec![1]));
        r.write_from(12, b"h").unwrap();
        assert_eq!(collect(&mut log, &r), (1, vec![0]));
        assert_eq!(collect(&mut log, &r), (0, vec![]));
        log.stop(&mem).unwrap();
        drop(mem);
        drop(pool);
    }

    #[test]
    fn foreign_region_is_rejected() {
        let a = mem(Backing::Anonymous, 4 * PAGE_SIZE);
        let b = mem(Backing::Anonymous, 4 * PAGE_SIZE);
        let mut log = UffdWpDirtyLog::new().unwrap();
        log.start(&a).unwrap();
        let d = AtomicBitmap::new(4);
        assert!(matches!(
            log.collect(&b.regions()[0], &d),
            Err(DirtyError::UnknownRegion { .. })
        ));
        assert!(matches!(
            log.collect(&a.regions()[0], &AtomicBitmap::new(3)),
            Err(DirtyError::BitmapSize { .. })
        ));
        log.stop(&a).unwrap();
    }
}
