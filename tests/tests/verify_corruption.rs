//! Verification must catch a single wrong page: the destination's `run` callback flips one byte
//! of a page that is already in place (behind the engine's back, not recorded as a guest
//! write), and both reports must say so.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migrate_core::verify::PreWriteDigests;
use migrate_core::workload::{fill_initial, Access, PreWriteLog};
use migrate_core::{
    DestConfig, DestReport, Destination, GuestMemory, Mode, Source, SourceConfig, SourceReport,
};
use migrate_tests::{loopback_listener, memory, migrate_source, Case};

/// Region and byte offset of the corrupted page, as the verifier names it.
type Corrupted = Arc<Mutex<Option<(String, usize)>>>;

/// Flips one byte in the middle of the first resident, non-zero host page of "ram-high" at or
/// after host page 100. Resident pages are in place (a missing page would fault under
/// userfaultfd), and nothing else writes them: this test runs no destination guest.
fn corrupt_one_page(mem: &GuestMemory) -> (String, usize) {
    let r = &mem.regions()[1];
    let page = r.host_page_size();
    let mut buf = vec![0u8; page];
    for hp in 100..r.host_pages() {
        if !r.is_populated(hp * page).unwrap() {
            continue;
        }
        r.read_into(hp * page, &mut buf).unwrap();
        if buf.iter().all(|&b| b == 0) {
            continue;
        }
        let at = hp * page + page / 2;
        let mut b = [0u8];
        r.read_into(at, &mut b).unwrap();
        r.write_from(at, &[b[0] ^ 0x5a]).unwrap();
        return (r.name().to_owned(), hp * page);
    }
    panic!(
        "no page of {} was in place when the guest started",
        r.name()
    );
}

fn migrate(corrupt: bool) -> (SourceReport, DestReport, Option<(String, usize)>) {
    let mut case = Case::small(Mode::PreemptFull, Access::Random);
    // Long enough for whole precopy passes: (nearly) every page is in place at switchover.
    case.precopy_limit = Duration::from_secs(10);
    case.dirty_rate = 2_000;
    let src_mem = Arc::new(memory(&case));
    fill_initial(&src_mem, 4);
    let dst_mem = Arc::new(memory(&case));
    let log = Arc::new(PreWriteLog::new(&dst_mem));
    let (listener, ep) = loopback_listener();
    let corrupted: Corrupted = Arc::default();

    let dest = {
        let (dst_mem, log, corrupted) = (dst_mem.clone(), log.clone(), corrupted.clone());
        std::thread::spawn(move || {
            let d = Destination::new(
                dst_mem.clone(),
                DestConfig {
                    urgent_priority: None,
                    ..DestConfig::default()
                },
            )
            .with_guest_digests(log as Arc<dyn PreWriteDigests>);
            let mut run = move || {
                if corrupt {
                    *corrupted.lock().unwrap() = Some(corrupt_one_page(&dst_mem));
                }
            };
            d.accept(&listener, &mut run)
        })
    };

    let cfg = SourceConfig {
        urgent_priority: None,
        ..case.source_config()
    };
    let source = migrate_source(&Source::new(src_mem.clone(), cfg), &case, src_mem, &ep);
    let dest = dest.join().expect("destination thread");
    let source = source.expect("source migration");
    let dest = dest.expect("destination migration");
    let c = corrupted.lock().unwrap().clone();
    (source, dest, c)
}

#[test]
fn one_corrupted_page_fails_verification() {
    let (source, dest, corrupted) = migrate(true);
    let (region, offset) = corrupted.expect("the run callback corrupted a page");
    let v = dest.verify.expect("verification ran");
    assert!(!v.ok(), "{v:?}");
    assert_eq!(v.mismatches, 1, "{v:?}");
    assert_eq!(v.missing_digests, 0, "{v:?}");
    assert_eq!(v.pages_written_by_guest, 0, "{v:?}");
    assert_eq!(v.first_mismatches, vec![format!("{region}:{offset:#x}")]);
    assert_eq!(source.verified, Some(false));
    eprintln!("caught {region}:{offset:#x}: {v:?}");
}

#[test]
fn uncorrupted_migration_verifies() {
    let (source, dest, corrupted) = migrate(false);
    assert!(corrupted.is_none());
    let v = dest.verify.expect("verification ran");
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.mismatches, 0);
    assert!(v.pages_checked > 0);
    assert_eq!(source.verified, Some(true));
}
