//! Dirty log fed by the writer itself (a synthetic workload, or a VMM that knows its writes).

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use super::{check_bitmap, DirtyError, DirtyLog};
use crate::bitmap::AtomicBitmap;
use crate::memory::{GuestMemory, GuestRegion};

struct RegionMarks {
    base: usize,
    len: usize,
    host_page: usize,
    marks: AtomicBitmap,
}

struct Shared {
    enabled: AtomicBool,
    regions: Vec<RegionMarks>,
}

/// The collecting side; see [`ManualDirtyHandle`] for the marking side.
pub struct ManualDirtyLog {
    shared: Arc<Shared>,
}

/// Cheap clonable handle writers use to report writes. Marks made while the log is not
/// started are ignored.
#[derive(Clone)]
pub struct ManualDirtyHandle {
    shared: Arc<Shared>,
}

impl ManualDirtyLog {
    /// A log over the regions of `memory` (not started).
    pub fn new(memory: &GuestMemory) -> (ManualDirtyLog, ManualDirtyHandle) {
        let regions = memory
            .regions()
            .iter()
            .map(|r| RegionMarks {
                base: r.base_addr(),
                len: r.len(),
                host_page: r.host_page_size(),
                marks: AtomicBitmap::new(r.host_pages()),
            })
            .collect();
        let shared = Arc::new(Shared {
            enabled: AtomicBool::new(false),
            regions,
        });
        (
            ManualDirtyLog {
                shared: shared.clone(),
            },
            ManualDirtyHandle { shared },
        )
    }

    fn marks_for(&self, region: &GuestRegion) -> Result<&RegionMarks, DirtyError> {
        self.shared
            .regions
            .get(region.id() as usize)
            .filter(|m| m.base == region.base_addr() && m.len == region.len())
            .ok_or_else(|| DirtyError::UnknownRegion {
                id: region.id(),
                name: region.name().to_string(),
            })
    }
}

impl ManualDirtyHandle {
    /// Record a write at `offset` of region `region_id`. Returns false (and records nothing)
    /// if the log is not started or the location is out of range.
    pub fn mark(&self, region_id: u16, offset: usize) -> bool {
        self.mark_range(region_id, offset, 1)
    }

    /// Record a write to `[offset, offset+len)` of region `region_id` (every host page it
    /// touches). Returns false (and records nothing) if not started or out of range.
    pub fn mark_range(&self, region_id: u16, offset: usize, len: usize) -> bool {
        if !self.shared.enabled.load(SeqCst) || len == 0 {
            return false;
        }
        let Some(r) = self.shared.regions.get(region_id as usize) else {
            return false;
        };
        match offset.checked_add(len) {
            Some(end) if end <= r.len => {
                let first = offset / r.host_page;
                let last = (end - 1) / r.host_page;
                r.marks.set_range(first, last - first + 1);
                true
            }
            _ => false,
        }
    }

    /// True while the log is started.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(SeqCst)
    }
}

impl DirtyLog for ManualDirtyLog {
    fn start(&mut self, _memory: &GuestMemory) -> Result<(), DirtyError> {
        for r in &self.shared.regions {
            r.marks.clear_all();
        }
        self.shared.enabled.store(true, SeqCst);
        Ok(())
    }

    fn collect(&mut self, region: &GuestRegion, dirty: &AtomicBitmap) -> Result<u64, DirtyError> {
        if !self.shared.enabled.load(SeqCst) {
            return Err(DirtyError::NotStarted);
        }
        check_bitmap(region, dirty)?;
        let m = self.marks_for(region)?;
        Ok(m.marks.drain_into(dirty) as u64)
    }

    fn stop(&mut self, _memory: &GuestMemory) -> Result<(), DirtyError> {
        self.shared.enabled.store(false, SeqCst);
        for r in &self.shared.regions {
            r.marks.clear_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, RegionSpec, HUGE_PAGE_SIZE, PAGE_SIZE};

    #[test]
    fn manual_log_basic() {
        let mem = GuestMemory::allocate(&[
            RegionSpec {
                name: "a".into(),
                size: 16 * PAGE_SIZE,
                backing: Backing::Anonymous,
            },
            RegionSpec {
                name: "b".into(),
                size: 2 * HUGE_PAGE_SIZE,
                backing: Backing::TransparentHuge,
            },
        ])
        .unwrap();
        let (mut log, h) = ManualDirtyLog::new(&mem);
        let (a, b) = (&mem.regions()[0], &mem.regions()[1]);
        let da = AtomicBitmap::new(a.host_pages());
        assert!(matches!(log.collect(a, &da), Err(DirtyError::NotStarted)));
        assert!(!h.mark(0, 0), "marks before start are ignored");
        log.start(&mem).unwrap();
        assert!(h.mark(0, 3 * PAGE_SIZE + 5));
        assert!(h.clone().mark_range(0, 5 * PAGE_SIZE - 1, 2)); // pages 4 and 5
        assert!(!h.mark(0, 16 * PAGE_SIZE));
        assert!(!h.mark(7, 0));
        assert!(!h.mark_range(0, usize::MAX, 2));
        assert!(h.mark(1, HUGE_PAGE_SIZE + 1));
        assert_eq!(log.collect(a, &da).unwrap(), 3);
        assert_eq!(da.iter_ones().collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(log.collect(a, &da).unwrap(), 0);
        let db = AtomicBitmap::new(b.host_pages());
        assert_eq!(log.collect(b, &db).unwrap(), 1);
        assert!(db.test(1) && !db.test(0));
        assert!(matches!(
            log.collect(b, &da),
            Err(DirtyError::BitmapSize { .. })
        ));
        log.stop(&mem).unwrap();
        assert!(!h.mark(0, 0));
    }
}
