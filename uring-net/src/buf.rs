//! Memory that a send may point at while the kernel reads it.

use std::fmt;
use std::sync::Arc;

use crate::error::NetError;

/// Memory whose address range stays valid while the owner is alive.
///
/// # Safety
///
/// Implementors guarantee that `memory()` always returns the same `(ptr, len)` and that this
/// range stays mapped and readable for as long as `self` is alive. The contents may change
/// concurrently (that is guest RAM), but the mapping may not go away or move.
pub unsafe trait StableMemory: Send + Sync + 'static {
    /// Start and length of the stable range.
    fn memory(&self) -> (*const u8, usize);
}

// SAFETY: a `Vec<u8>` owned by this value (and only reachable through `&self`, e.g. behind an
// `Arc`) cannot be reallocated without `&mut`, so its heap buffer stays put while it lives.
unsafe impl StableMemory for Vec<u8> {
    fn memory(&self) -> (*const u8, usize) {
        (self.as_ptr(), self.len())
    }
}

// SAFETY: a boxed slice never reallocates; its heap buffer lives as long as the box.
unsafe impl StableMemory for Box<[u8]> {
    fn memory(&self) -> (*const u8, usize) {
        (self.as_ptr(), self.len())
    }
}

// SAFETY: `'static` data lives for the whole program.
unsafe impl StableMemory for &'static [u8] {
    fn memory(&self) -> (*const u8, usize) {
        (self.as_ptr(), self.len())
    }
}

/// A byte range inside a [`StableMemory`] owner, kept alive by an `Arc`.
///
/// This is what a send may point at: cloning it is cheap (an `Arc` clone), and the sender keeps
/// a clone until the kernel is done with the memory.
#[derive(Clone)]
pub struct BufRef {
    owner: Arc<dyn StableMemory>,
    ptr: *const u8,
    offset: usize,
    len: usize,
}

// SAFETY: `ptr` points into memory owned by `owner`, which is `Send + Sync`; the pointer is only
// used for reads whose validity is guaranteed by the `StableMemory` contract while `owner` lives.
unsafe impl Send for BufRef {}
// SAFETY: see `Send`; `BufRef` offers no interior mutability.
unsafe impl Sync for BufRef {}

impl BufRef {
    /// A view of `owner[offset..offset + len]`. Fails if the range is outside the owner's memory.
    pub fn new(
        owner: Arc<dyn StableMemory>,
        offset: usize,
        len: usize,
    ) -> Result<BufRef, NetError> {
        let (base, total) = owner.memory();
        let end = offset
            .checked_add(len)
            .ok_or_else(|| NetError::InvalidArgument("BufRef range overflows".into()))?;
        if end > total {
            return Err(NetError::InvalidArgument(format!(
                "BufRef range {offset}..{end} outside owner of {total} bytes"
            )));
        }
        // `wrapping_add` keeps this free of `unsafe`; the range was checked above so the result
        // stays inside (or one past the end of) the owner's allocation.
        let ptr = base.wrapping_add(offset);
        Ok(BufRef {
            owner,
            ptr,
            offset,
            len,
        })
    }

    /// A view of the whole vector (which becomes the owner).
    pub fn from_vec(v: Vec<u8>) -> BufRef {
        let len = v.len();
        let owner: Arc<dyn StableMemory> = Arc::new(v);
        let ptr = owner.memory().0;
        BufRef {
            owner,
            ptr,
            offset: 0,
            len,
        }
    }

    /// A view of the whole owner.
    pub fn from_owner(owner: Arc<dyn StableMemory>) -> BufRef {
        let (ptr, len) = owner.memory();
        BufRef {
            owner,
            ptr,
            offset: 0,
            len,
        }
    }

    /// A view of `'static` bytes.
    pub fn from_static(bytes: &'static [u8]) -> BufRef {
        BufRef::from_owner(Arc::new(bytes))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the range.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Offset of the range inside the owner.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The owner that keeps the memory alive.
    pub fn owner(&self) -> &Arc<dyn StableMemory> {
        &self.owner
    }

    /// A sub-range `self[offset..offset + len]` sharing the same owner.
    pub fn slice(&self, offset: usize, len: usize) -> Result<BufRef, NetError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| NetError::InvalidArgument("BufRef slice overflows".into()))?;
        if end > self.len {
            return Err(NetError::InvalidArgument(format!(
                "slice {offset}..{end} outside BufRef of {} bytes",
                self.len
            )));
        }
        Ok(BufRef {
            owner: Arc::clone(&self.owner),
            ptr: self.ptr.wrapping_add(offset),
            offset: self.offset + offset,
            len,
        })
    }

    /// Split into `self[..at]` and `self[at..]` (both share the owner). `at` must be `<= len`.
    pub(crate) fn split_at(self, at: usize) -> (BufRef, BufRef) {
        debug_assert!(at <= self.len);
        let tail = BufRef {
            owner: Arc::clone(&self.owner),
            ptr: self.ptr.wrapping_add(at),
            offset: self.offset + at,
            len: self.len - at,
        };
        let head = BufRef { len: at, ..self };
        (head, tail)
    }

    /// Copy the current contents out (a snapshot; the memory may change concurrently).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: `ptr..ptr+len` lies inside the owner's stable, readable range (checked at
        // construction) and `owner` is alive for the duration of the copy; `v` is a distinct
        // allocation of exactly `len` bytes, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), self.len) };
        v
    }
}

impl fmt::Debug for BufRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufRef")
            .field("ptr", &self.ptr)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        let owner: Arc<dyn StableMemory> = Arc::new(vec![7u8; 100]);
        assert!(BufRef::new(owner.clone(), 0, 100).is_ok());
        assert!(BufRef::new(owner.clone(), 100, 0).is_ok());
        assert!(BufRef::new(owner.clone(), 1, 100).is_err());
        assert!(BufRef::new(owner.clone(), usize::MAX, 2).is_err());
        let b = BufRef::new(owner.clone(), 10, 20).unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!(b.as_ptr(), owner.memory().0.wrapping_add(10));
        let s = b.slice(5, 15).unwrap();
        assert_eq!(s.offset(), 15);
        assert!(b.slice(5, 16).is_err());
    }

    #[test]
    fn from_vec_and_split() {
        let b = BufRef::from_vec((0u8..10).collect());
        assert_eq!(b.len(), 10);
        assert!(!b.is_empty());
        let (h, t) = b.clone().split_at(4);
        assert_eq!(h.to_vec(), vec![0, 1, 2, 3]);
        assert_eq!(t.to_vec(), vec![4, 5, 6, 7, 8, 9]);
        // Three views (b, h, t) share one owner.
        assert_eq!(Arc::strong_count(b.owner()), 3);
        assert!(BufRef::from_vec(Vec::new()).is_empty());
        assert_eq!(BufRef::from_static(b"abc").to_vec(), b"abc");
    }
}
