//! The point of no return. A link that breaks during switchover, after the source paused its
//! guest but before the `Postcopy` record could reach the destination: the destination can
//! never run the guest, so the source must resume it (and say so) instead of leaving it paused
//! or reconnecting into a destination that gave up; the destination fails as in any precopy
//! break, without running its guest. A link that breaks after it (twice): the source guest must
//! never run again; postcopy recovers and completes.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::workload::{Access, SourceWorkload};
use migrate_core::{Destination, MigrateError, Mode, Source, SourceControl};
use migrate_tests::{loopback_listener, memory, test_dest_config, Case};

/// Pauses the guest like a VMM, then (with `cut_on_pause`) cuts the link before anything of
/// the switchover is sent.
struct BreakAtPause<'a> {
    source: &'a Source,
    guest: SourceWorkload,
    cut_on_pause: bool,
    paused: bool,
    resumed: bool,
}

impl<'a> BreakAtPause<'a> {
    /// A running source guest (2 vCPUs dirtying random pages) controlled for `source`.
    fn new(source: &'a Source, memory: &Arc<migrate_core::GuestMemory>) -> Self {
        Self {
            source,
            guest: SourceWorkload::start(memory.clone(), 2, Access::Random, 20_000),
            cut_on_pause: true,
            paused: false,
            resumed: false,
        }
    }
}

impl SourceControl for BreakAtPause<'_> {
    fn pause(&mut self) -> Result<(), String> {
        self.guest.pause();
        self.paused = true;
        if self.cut_on_pause {
            self.source.interrupt_link();
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), String> {
        self.guest.resume();
        self.resumed = true;
        Ok(())
    }
}

#[test]
fn break_before_postcopy_resumes_the_source_guest() {
    let case = Case::small(Mode::PreemptFull, Access::Random);
    let src_mem = Arc::new(memory(&case));
    let dst_mem = Arc::new(memory(&case));
    let (listener, ep) = loopback_listener();
    let dest = Destination::new(dst_mem.clone(), test_dest_config());
    let ran_here = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dest = {
        let ran = ran_here.clone();
        std::thread::spawn(move || {
            let mut run = move || ran.store(true, SeqCst);
            dest.accept(&listener, &mut run)
        })
    };

    let mut cfg = case.source_config();
    cfg.reconnect.retries = 3;
    let source = Source::new(src_mem.clone(), cfg);
    let mut control = BreakAtPause::new(&source, &src_mem);
    let mut dirty = UffdWpDirtyLog::new().expect("uffd-wp dirty log");
    let err = source
        .migrate(&ep, &mut dirty, &mut control)
        .expect_err("a migration whose link broke at switchover succeeded");

    assert!(control.paused, "the switchover was never reached");
    assert!(control.resumed, "the source guest was left paused: {err}");
    assert!(
        matches!(&err, MigrateError::Cancelled(m) if m.contains("the guest runs here again")),
        "{err}"
    );
    // Running again: it keeps writing (and dirty tracking was released, so writes don't block).
    // (Polled, not slept on: a loaded machine may take a while to schedule the guest.)
    let w0 = control.guest.writes.load(SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while control.guest.writes.load(SeqCst) == w0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        control.guest.writes.load(SeqCst) > w0,
        "the resumed guest does not run"
    );
    control.guest.pause();

    let dest = dest.join().expect("destination thread");
    assert!(
        dest.is_err(),
        "the destination completed a broken migration"
    );
    assert!(
        !ran_here.load(SeqCst),
        "the destination ran the guest although it never got Postcopy"
    );
}

/// The other side of the point of no return: a break once the destination runs the guest
/// must never resume the source guest; postcopy pauses, reconnects and completes, byte for
/// byte. Broken twice: once the destination runs, and again once the source reconnected (a
/// second failure is judged on a new connection, whose offsets start at zero).
#[test]
fn break_after_postcopy_never_resumes_the_source_guest() {
    let outcome = break_during_switchover(BreakAt::DestRunning);
    assert!(
        !outcome.resumed,
        "the source guest was resumed after the point of no return: {:?}",
        outcome.source.as_ref().err()
    );
    let report = outcome
        .source
        .as_ref()
        .expect("postcopy did not recover from a break after switchover");
    assert!(report.recoveries >= 1, "the link breaks were not noticed");
    let dest = outcome
        .dest
        .as_ref()
        .expect("the destination failed after running the guest");
    outcome.assert_identical(report.clone(), dest.clone());
}

/// Breaks anywhere in the switchover window, from right after the pause to well after the
/// `Postcopy` record left: whichever side of the point of no return the break lands on, both
/// ends must agree. Either the source guest runs again and the destination never ran it, or
/// the source guest stays paused and postcopy recovers and completes identical; never both
/// guests running, never neither.
#[test]
fn a_break_anywhere_in_the_switchover_ends_consistently() {
    let delays = [0u64, 20, 50, 100, 200, 300, 600, 1_000, 3_000];
    let mut resumed = 0;
    for &us in &delays {
        let outcome = break_during_switchover(BreakAt::AfterPause(Duration::from_micros(us)));
        if outcome.resumed {
            resumed += 1;
            let err = outcome
                .source
                .expect_err("resumed the guest yet reported success");
            assert!(
                matches!(&err, MigrateError::Cancelled(m) if m.contains("the guest runs here again")),
                "break {us} µs after the pause: {err}"
            );
            assert!(
                outcome.dest.is_err(),
                "break {us} µs after the pause: both guests ran (source resumed, destination completed)"
            );
            assert_eq!(
                outcome.dest_phase, "precopy",
                "break {us} µs after the pause: the source resumed its guest, but the destination got the switchover"
            );
        } else {
            let report = outcome.source.as_ref().unwrap_or_else(|e| {
                panic!("break {us} µs after the pause: the source kept its guest paused, but postcopy did not complete: {e}")
            });
            let dest = outcome.dest.as_ref().unwrap_or_else(|e| {
                panic!("break {us} µs after the pause: the destination failed: {e}")
            });
            outcome.assert_identical(report.clone(), dest.clone());
        }
    }
    println!(
        "{resumed} of {} breaks landed before the point of no return",
        delays.len()
    );
}

/// When the watcher cuts the link.
#[derive(Clone, Copy)]
enum BreakAt {
    /// Once the destination runs the guest (and again after the source reconnected).
    DestRunning,
    /// This long after the source paused its guest.
    AfterPause(Duration),
}

/// What one migration with a break at switchover ended with.
struct BreakOutcome {
    source: Result<migrate_core::SourceReport, MigrateError>,
    dest: Result<migrate_core::DestReport, MigrateError>,
    /// The destination's phase at the end ("precopy": it never had the guest).
    dest_phase: &'static str,
    resumed: bool,
    src_mem: Arc<migrate_core::GuestMemory>,
    dst_mem: Arc<migrate_core::GuestMemory>,
    log: Arc<migrate_core::workload::PreWriteLog>,
}

impl BreakOutcome {
    /// Both memories agree, byte for byte (guest-written pages through their pre-write digests).
    fn assert_identical(&self, source: migrate_core::SourceReport, dest: migrate_core::DestReport) {
        migrate_tests::assert_identical(&migrate_tests::Outcome {
            source,
            dest,
            src_mem: self.src_mem.clone(),
            dst_mem: self.dst_mem.clone(),
            log: self.log.clone(),
        });
    }
}

fn break_during_switchover(at: BreakAt) -> BreakOutcome {
    use migrate_core::source::SourcePhase;
    let case = Case::small(Mode::PreemptFull, Access::Random);
    let src_mem = Arc::new(memory(&case));
    migrate_core::workload::fill_initial(&src_mem, 4);
    let dst_mem = Arc::new(memory(&case));
    let log = Arc::new(migrate_core::workload::PreWriteLog::new(&dst_mem));
    let (listener, ep) = loopback_listener();
    let dest = Destination::new(dst_mem.clone(), test_dest_config())
        .with_guest_digests(log.clone() as Arc<dyn migrate_core::verify::PreWriteDigests>);
    let watch = dest.watch();
    let dest = migrate_tests::spawn_dest(dest, listener, dst_mem.clone(), log.clone(), &case);

    let mut cfg = case.source_config();
    cfg.reconnect.retries = 10;
    let source = Source::new(src_mem.clone(), cfg);
    let progress = source.progress();
    let mut control = BreakAtPause::new(&source, &src_mem);
    // The break comes from the watcher thread.
    control.cut_on_pause = false;
    let mut dirty = UffdWpDirtyLog::new().expect("uffd-wp dirty log");
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            let wait_for = |want: &dyn Fn() -> bool| {
                while !want() {
                    if std::time::Instant::now() > deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
                true
            };
            match at {
                BreakAt::AfterPause(d) => {
                    if wait_for(&|| progress.phase() == SourcePhase::Switchover) {
                        std::thread::sleep(d);
                        source.interrupt_link();
                    }
                }
                BreakAt::DestRunning => {
                    let running = || watch.snapshot().phase == "postcopy-running";
                    let in_postcopy = || progress.phase() == SourcePhase::Postcopy;
                    if !wait_for(&|| running() && in_postcopy()) {
                        return;
                    }
                    source.interrupt_link();
                    if wait_for(&|| !in_postcopy()) && wait_for(&in_postcopy) {
                        source.interrupt_link();
                    }
                }
            }
        });
        source.migrate(&ep, &mut dirty, &mut control)
    });
    assert!(control.paused, "the switchover was never reached");
    control.guest.pause();
    let dest = dest.join().expect("destination thread");
    BreakOutcome {
        source: report,
        dest,
        dest_phase: watch.snapshot().phase,
        resumed: control.resumed,
        src_mem,
        dst_mem,
        log,
    }
}
