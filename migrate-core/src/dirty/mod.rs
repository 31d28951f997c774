//! Dirty-page logging: which host pages the guest wrote since the last pass.
//!
//! Two implementations: [`UffdWpDirtyLog`] (kernel tracking with asynchronous userfaultfd
//! write protection, read and re-armed atomically with the `PAGEMAP_SCAN` ioctl) and
//! [`ManualDirtyLog`] (the workload reports its own writes through a [`ManualDirtyHandle`]).

use crate::bitmap::AtomicBitmap;
use crate::memory::{GuestMemory, GuestRegion};

mod manual;
mod uffd_wp;

pub use manual::{ManualDirtyHandle, ManualDirtyLog};
pub use uffd_wp::UffdWpDirtyLog;

/// Errors of dirty logging.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("userfaultfd write protection: {0}")]
    Uffd(#[from] crate::uffd::UffdError),
    #[error("cannot open /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error("PAGEMAP_SCAN on {start:#x}..{end:#x} failed: {source}")]
    Scan {
        start: usize,
        end: usize,
        source: std::io::Error,
    },
    #[error("PAGEMAP_SCAN on {start:#x}..{end:#x} made no progress (walk_end {walk_end:#x})")]
    ScanStuck {
        start: usize,
        end: usize,
        walk_end: usize,
    },
    #[error("dirty log not started")]
    NotStarted,
    #[error("region {id} ('{name}') is not tracked by this dirty log")]
    UnknownRegion { id: u16, name: String },
    #[error("dirty bitmap has {bits} bits but region '{name}' has {pages} host pages")]
    BitmapSize {
        bits: usize,
        pages: usize,
        name: String,
    },
}

/// A source of dirty host pages.
pub trait DirtyLog: Send {
    /// Begin tracking writes to `memory` (all regions). Writes before start are not reported.
    fn start(&mut self, memory: &GuestMemory) -> Result<(), DirtyError>;
    /// Set bit i of `dirty` for every host page i of `region` written since the last collect
    /// (or start), and re-arm tracking for those pages. Returns how many host pages were
    /// reported.
    fn collect(&mut self, region: &GuestRegion, dirty: &AtomicBitmap) -> Result<u64, DirtyError>;
    /// Stop tracking (and release kernel resources).
    fn stop(&mut self, memory: &GuestMemory) -> Result<(), DirtyError>;
}

fn check_bitmap(region: &GuestRegion, dirty: &AtomicBitmap) -> Result<(), DirtyError> {
    if dirty.len() != region.host_pages() {
        return Err(DirtyError::BitmapSize {
            bits: dirty.len(),
            pages: region.host_pages(),
            name: region.name().to_string(),
        });
    }
    Ok(())
}
