//! Postcopy placement cost per 4 KiB page, without the network: what a destination receiver
//! does once a record's payload is in hand.
//!
//! - `copy`: the payload lands in a private staging buffer (one `memcpy`, standing in for the
//!   receive copy), then `UFFDIO_COPY` allocates the guest page and copies it again
//!   (`Backing::Anonymous`, missing-mode registration).
//! - `continue`: the payload lands in the shared file through the alias mapping (the only copy;
//!   the file was allocated up front), then `UFFDIO_CONTINUE` maps the pages into the guest's
//!   view (`Backing::Shared`, minor-mode registration).
//!
//! Each round places a fresh region of `BENCH_MIB` MiB (default 256) in 64 KiB records with
//! both methods, alternating, so both see the same machine state. Prints the median per-page
//! time of each. Run: `cargo bench -p migrate-benches --bench placement` (`BENCH_ROUNDS`,
//! default 5).

use std::time::Instant;

use migrate_benches::{env, median};
use migrate_core::memory::{GuestMemory, RegionSpec, PAGE_SIZE};
use migrate_core::uffd::{feature, RegisterMode, Userfaultfd};
use migrate_core::Backing;

const RECORD: usize = 64 << 10;

fn region(backing: Backing, size: usize) -> GuestMemory {
    GuestMemory::allocate(&[RegionSpec {
        name: "bench".into(),
        size,
        backing,
    }])
    .expect("allocate the region")
}

/// Nanoseconds per page of `memcpy` to a staging buffer + `UFFDIO_COPY`.
fn place_by_copy(size: usize, payload: &[u8]) -> f64 {
    let mem = region(Backing::Anonymous, size);
    let r = &mem.regions()[0];
    let uffd = Userfaultfd::open(0).expect("userfaultfd");
    uffd.register(r.base_addr(), r.len(), RegisterMode::MISSING)
        .expect("register missing");
    let mut staging = vec![0u8; RECORD];
    staging.fill(1); // fault the staging buffer in before timing
    let t = Instant::now();
    for off in (0..size).step_by(RECORD) {
        staging.copy_from_slice(payload);
        let placed = uffd
            .copy(r.base_addr() + off, &staging, PAGE_SIZE, true)
            .expect("UFFDIO_COPY");
        assert_eq!(placed, RECORD);
    }
    t.elapsed().as_nanos() as f64 / (size / PAGE_SIZE) as f64
}

/// Nanoseconds per page of `memcpy` through the alias + `UFFDIO_CONTINUE`, and of allocating
/// the shared region up front (not on the request path, but paid once per page all the same).
fn place_by_continue(size: usize, payload: &[u8]) -> (f64, f64) {
    let pages = (size / PAGE_SIZE) as f64;
    let t = Instant::now();
    let mem = region(Backing::Shared, size);
    let setup = t.elapsed().as_nanos() as f64 / pages;
    let r = &mem.regions()[0];
    let uffd = Userfaultfd::open(feature::MINOR_SHMEM).expect("userfaultfd");
    let minor = RegisterMode {
        minor: true,
        ..RegisterMode::default()
    };
    uffd.register(r.base_addr(), r.len(), minor)
        .expect("register minor");
    let t = Instant::now();
    for off in (0..size).step_by(RECORD) {
        let dst = r.alias_ptr_at(off, RECORD).expect("in range");
        // SAFETY: `alias_ptr_at` checked the range lies in the region's alias mapping, which
        // `mem` keeps mapped; nothing else in this process touches it.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), dst, RECORD) };
        let mapped = uffd
            .continue_range(r.base_addr() + off, RECORD, PAGE_SIZE, true)
            .expect("UFFDIO_CONTINUE");
        assert_eq!(mapped, RECORD);
    }
    (t.elapsed().as_nanos() as f64 / pages, setup)
}

fn main() {
    let rounds = env("BENCH_ROUNDS", 5usize).max(1);
    let size = env("BENCH_MIB", 256usize).max(1) << 20;
    let payload = vec![0x5au8; RECORD];
    let (mut copy, mut cont, mut setup) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        copy.push(place_by_copy(size, &payload));
        let (c, s) = place_by_continue(size, &payload);
        cont.push(c);
        setup.push(s);
    }
    println!(
        "placing {} MiB in {} KiB records, {rounds} rounds (median ns per 4 KiB page)",
        size >> 20,
        RECORD >> 10
    );
    println!(
        "{:<44} {:>8.0}",
        "memcpy + UFFDIO_COPY (private)",
        median(&mut copy)
    );
    println!(
        "{:<44} {:>8.0}",
        "memcpy via alias + UFFDIO_CONTINUE (shared)",
        median(&mut cont)
    );
    println!(
        "{:<44} {:>8.0}",
        "  (shared: allocating the file up front)",
        median(&mut setup)
    );
}
