//! Whole migrations: each mode × access pattern, verified byte for byte.

use std::sync::Mutex;

use migrate_core::memory::free_huge_pages;
use migrate_core::workload::Access;
use migrate_core::{Backing, Mode};
use migrate_tests::{assert_identical, memory, run, run_with, vmm_memfd_memory, Case};

/// hugetlb cases share the reserved pool: one at a time.
static HUGETLB: Mutex<()> = Mutex::new(());

fn check(case: Case) {
    let o = run(&case);
    check_outcome(&case, o);
}

/// A completed migration verified, identical, and every page accounted for.
fn check_outcome(case: &Case, o: migrate_tests::Outcome) {
    let v = o.dest.verify.as_ref().expect("verification ran");
    assert!(v.ok(), "verification failed: {v:?}");
    assert_eq!(o.source.verified, Some(true));
    assert_identical(&o);
    let total = o.src_mem.total_host_pages() as u64;
    let c = o.dest.counters;
    assert!(
        c.pages_bulk + c.pages_urgent + c.zero_pages >= total,
        "{c:?}"
    );
    eprintln!(
        "{:?} {:?}: requests {} urgent pages {} latency avg {:.0} us p99 {:.0} us",
        case.mode, case.access, c.requests, c.pages_urgent, o.dest.latency.avg, o.dest.latency.p99
    );
}

#[test]
fn vanilla_random() {
    check(Case::small(Mode::Vanilla, Access::Random));
}

#[test]
fn vanilla_sequential() {
    check(Case::small(Mode::Vanilla, Access::Sequential));
}

#[test]
fn preempt_random() {
    check(Case::small(Mode::Preempt, Access::Random));
}

#[test]
fn preempt_sequential() {
    check(Case::small(Mode::Preempt, Access::Sequential));
}

#[test]
fn preempt_full_random() {
    check(Case::small(Mode::PreemptFull, Access::Random));
}

/// Pure postcopy (no precopy pass): every page is either streamed or requested.
fn pure_postcopy(mode: Mode) {
    let mut case = Case::small(mode, Access::Random);
    case.passes = 0;
    let o = run(&case);
    assert!(o.dest.verify.as_ref().unwrap().ok());
    assert_identical(&o);
    let (d, s) = (o.dest.counters, o.source.counters);
    assert!(d.requests > 0, "{d:?}");
    assert!(s.requests > 0, "{s:?}");
    assert_eq!(
        o.dest.latency.count, d.requests,
        "one latency sample per request"
    );
    if mode == Mode::Vanilla {
        assert_eq!(s.pages_urgent, 0, "vanilla never uses the urgent channel");
    } else {
        assert!(s.pages_urgent > 0, "{s:?}");
    }
}

#[test]
fn vanilla_pure_postcopy() {
    pure_postcopy(Mode::Vanilla);
}

#[test]
fn preempt_pure_postcopy() {
    pure_postcopy(Mode::Preempt);
}

#[test]
fn preempt_full_pure_postcopy() {
    pure_postcopy(Mode::PreemptFull);
}

#[test]
fn preempt_full_sequential() {
    check(Case::small(Mode::PreemptFull, Access::Sequential));
}

/// 2 MiB hugetlb host pages: whole huge pages travel and are placed with one UFFDIO_COPY.
fn hugetlb(mode: Mode, access: Access) {
    hugetlb_backed(Backing::HugeTlb, mode, access)
}

/// A migration of 2 MiB pages from the hugetlb pool (private, or a shared hugetlbfs file).
fn hugetlb_backed(backing: Backing, mode: Mode, access: Access) {
    let _one_at_a_time = HUGETLB.lock().unwrap_or_else(|p| p.into_inner());
    let mut case = Case::small(mode, access);
    case.backing = backing;
    case.region_size = 16 << 20;
    case.passes = if access == Access::Random { 0 } else { 1 };
    case.dirty_rate = 2000;
    let need = 4 * case.region_size / (2 << 20);
    match free_huge_pages() {
        Some(free) if free >= need => {}
        free => {
            eprintln!(
                "skipped: {mode:?}/{access:?} on {backing:?} needs {need} free 2 MiB pages, {free:?} available \
                 (echo {need} > /proc/sys/vm/nr_hugepages; .ci/run reserves them)"
            );
            return;
        }
    }
    check(case);
}

#[test]
fn hugetlb_vanilla_random() {
    hugetlb(Mode::Vanilla, Access::Random);
}

#[test]
fn hugetlb_preempt_random() {
    hugetlb(Mode::Preempt, Access::Random);
}

#[test]
fn hugetlb_preempt_full_random() {
    hugetlb(Mode::PreemptFull, Access::Random);
}

#[test]
fn hugetlb_preempt_full_sequential() {
    hugetlb(Mode::PreemptFull, Access::Sequential);
}

#[test]
fn hugetlb_vanilla_sequential() {
    hugetlb(Mode::Vanilla, Access::Sequential);
}

#[test]
fn hugetlb_preempt_sequential() {
    hugetlb(Mode::Preempt, Access::Sequential);
}

/// Shared memfd guest RAM (4 KiB shmem pages): postcopy pages are read straight into the
/// file through the alias mapping and mapped with UFFDIO_CONTINUE; precopy-dirtied pages are
/// discarded by punching the file; source and destination both shared.
fn shared(mode: Mode, access: Access) {
    let mut case = Case::small(mode, access);
    case.backing = Backing::Shared;
    check(case);
}

#[test]
fn shared_vanilla_random() {
    shared(Mode::Vanilla, Access::Random);
}

#[test]
fn shared_preempt_random() {
    shared(Mode::Preempt, Access::Random);
}

#[test]
fn shared_preempt_full_random() {
    shared(Mode::PreemptFull, Access::Random);
}

#[test]
fn shared_preempt_full_sequential() {
    shared(Mode::PreemptFull, Access::Sequential);
}

/// Pure postcopy into shared memory: every page is claimed, written through the alias and
/// mapped, by whichever receiver gets it first.
#[test]
fn shared_pure_postcopy() {
    let mut case = Case::small(Mode::PreemptFull, Access::Random);
    case.backing = Backing::Shared;
    case.passes = 0;
    check(case);
}

/// Guest RAM the VMM owns, in a memfd it mapped itself, borrowed on both sides.
#[test]
fn vmm_memfd_preempt_full_random() {
    let mut case = Case::small(Mode::PreemptFull, Access::Random);
    case.passes = 1;
    let (src, dst) = (vmm_memfd_memory(&case), vmm_memfd_memory(&case));
    migrate_core::workload::fill_initial(&src, 4);
    assert_eq!(dst.regions()[1].backing(), Backing::Shared);
    check_outcome(&case, run_with(&case, src, dst));
}

#[test]
fn shared_hugetlb_preempt_full_random() {
    hugetlb_backed(Backing::SharedHugeTlb, Mode::PreemptFull, Access::Random);
}

#[test]
fn shared_hugetlb_preempt_full_sequential() {
    hugetlb_backed(
        Backing::SharedHugeTlb,
        Mode::PreemptFull,
        Access::Sequential,
    );
}

/// Transparent huge pages: 2 MiB host pages placed with UFFDIO_MOVE stay huge.
#[test]
fn thp_preempt_full_random() {
    let mut case = Case::small(Mode::PreemptFull, Access::Random);
    case.backing = Backing::TransparentHuge;
    case.region_size = 16 << 20;
    case.passes = 0;
    check(case);
}

/// THP after a precopy pass: pages received as zero in precopy are never populated, and a
/// guest touch of one is served locally; it must arrive as a whole huge page (a zero-page
/// fill would map 512 small pages), so the destination ends with every page huge.
#[test]
fn thp_after_precopy_stays_huge() {
    let mut case = Case::small(Mode::PreemptFull, Access::Random);
    case.backing = Backing::TransparentHuge;
    case.region_size = 16 << 20;
    case.passes = 1;
    // The whole pass, however slow the machine, and a source guest that leaves the zero huge
    // pages zero: they must arrive (as zero) in precopy.
    case.precopy_limit = std::time::Duration::from_secs(60);
    case.dirty_rate = 0;
    // Every other huge page all zero (the filler zeroes only some 4 KiB pages).
    let src = memory(&case);
    migrate_core::workload::fill_initial(&src, 4);
    for r in src.regions() {
        for hp in (0..r.host_pages()).step_by(2) {
            r.fill_zero(hp * r.host_page_size(), r.host_page_size())
                .unwrap();
        }
    }
    let o = run_with(&case, src, memory(&case));
    let c = o.dest.counters;
    let (_, after) = o.dest.anon_huge_bytes;
    check_outcome(&case, o);
    assert!(
        c.local_zero_faults > 0,
        "no zero page was served locally: {c:?}"
    );
    assert_eq!(
        after,
        Some(2 * case.region_size as u64),
        "not every page is huge"
    );
}

/// One receiver for every mode: the destination has no notion of the source's mode (there is
/// no such field on the wire), so the same `Destination` code and configuration completes and
/// verifies a migration from each of them, and only the source's counters tell them apart.
#[test]
fn every_mode_against_the_same_receiver() {
    let mut urgent = Vec::new();
    for mode in Mode::ALL {
        let mut case = Case::small(mode, Access::Random);
        case.passes = 0;
        let o = run(&case);
        assert!(o.dest.verify.as_ref().unwrap().ok(), "{mode:?}");
        assert_identical(&o);
        urgent.push(o.dest.counters.pages_urgent);
    }
    assert_eq!(
        urgent[0], 0,
        "vanilla sends requested pages on the main channel"
    );
    assert!(
        urgent[1] > 0 && urgent[2] > 0,
        "preempt modes use the urgent channel: {urgent:?}"
    );
}
