//! A hostile or broken source: hand-made bytes against a real `Destination::accept` on loopback.
//!
//! Every test checks that `accept` returns an error that names the problem, within a deadline
//! (no hang), without a panic, that the destination guest memory was never written, and where
//! the destination answers a hello, that the refusal carries the right status.

use std::time::{Duration, Instant};

use migrate_core::protocol::{
    Channel, DiscardEntry, Hello, Record, RegionInfo, RegionTable, ReplyStatus, VERSION,
};
use migrate_tests::{
    first_nonzero, raw_connect, raw_handshake, test_dest_config, zeroed_memory, DestUnderTest,
    FakeSource,
};

/// `accept` must give up well within this (its own timeouts are 20 s: a test that only ends
/// through a timeout fails here).
const DEADLINE: Duration = Duration::from_secs(8);
/// Bytes per region: a multiple of 2 MiB so a source may claim 2 MiB host pages.
const REGION: usize = 2 << 20;

fn dest() -> DestUnderTest {
    DestUnderTest::start(zeroed_memory(REGION), test_dest_config())
}

fn assert_names(err: &str, words: &[&str]) {
    let lower = err.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(w)),
        "error {err:?} names none of {words:?}"
    );
}

fn assert_untouched(d: &DestUnderTest) {
    assert_eq!(
        first_nonzero(&d.memory),
        None,
        "destination guest memory was written"
    );
}

/// Accept failed naming the problem; memory untouched; the guest never started.
fn expect_rejected(d: &DestUnderTest, words: &[&str]) -> String {
    let t = Instant::now();
    let err = d.expect_err(DEADLINE);
    assert_names(&err, words);
    assert_untouched(d);
    assert!(
        !d.ran.load(std::sync::atomic::Ordering::SeqCst),
        "the destination guest was started"
    );
    eprintln!("rejected in {:?}: {err}", t.elapsed());
    err
}

fn table(d: &DestUnderTest) -> RegionTable {
    migrate_core::handshake::region_table(&d.memory).unwrap()
}

/// The destination's table with region `i` changed by `f`.
fn altered(d: &DestUnderTest, i: usize, f: impl FnOnce(&mut RegionInfo)) -> RegionTable {
    let mut r = table(d).regions().to_vec();
    f(&mut r[i]);
    RegionTable::new(r).expect("altered table is valid on its own")
}

/// Sends one hello on a fresh connection and returns the destination's verdict.
fn hello_reply(d: &DestUnderTest, hello: &[u8]) -> ReplyStatus {
    let mut s = raw_connect(d.addr());
    raw_handshake(&mut s, hello)
        .expect("the destination hung up without a reply")
        .status
}

// ---- handshake -------------------------------------------------------------------------------

#[test]
fn bad_magic() {
    let d = dest();
    let mut hello = Hello::new(Channel::Main, 1, table(&d)).encode();
    hello[..4].copy_from_slice(b"HTTP");
    assert_eq!(hello_reply(&d, &hello), ReplyStatus::BadHello);
    expect_rejected(&d, &["magic"]);
}

#[test]
fn wrong_version() {
    let d = dest();
    let mut hello = Hello::new(Channel::Main, 1, table(&d)).encode();
    hello[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert_eq!(hello_reply(&d, &hello), ReplyStatus::VersionMismatch);
    expect_rejected(&d, &["version"]);
}

#[test]
fn region_name_mismatch() {
    let d = dest();
    let theirs = altered(&d, 1, |r| r.name = "ram-elsewhere".into());
    let hello = Hello::new(Channel::Main, 1, theirs).encode();
    assert_eq!(hello_reply(&d, &hello), ReplyStatus::RegionMismatch);
    let err = expect_rejected(&d, &["region"]);
    assert_names(&err, &["ram-elsewhere"]);
}

#[test]
fn region_size_mismatch() {
    let d = dest();
    let theirs = altered(&d, 0, |r| r.len *= 2);
    let hello = Hello::new(Channel::Main, 1, theirs).encode();
    assert_eq!(hello_reply(&d, &hello), ReplyStatus::RegionMismatch);
    let err = expect_rejected(&d, &["region"]);
    assert_names(&err, &["size"]);
}

#[test]
fn region_page_size_mismatch() {
    let d = dest();
    let theirs = altered(&d, 1, |r| r.host_page_size = 2 << 20);
    let hello = Hello::new(Channel::Main, 1, theirs).encode();
    assert_eq!(hello_reply(&d, &hello), ReplyStatus::RegionMismatch);
    let err = expect_rejected(&d, &["region"]);
    assert_names(&err, &["host page"]);
}

#[test]
fn second_main_connection_is_refused() {
    let d = dest();
    let t = table(&d);
    let mut first = raw_connect(d.addr());
    let ok = raw_handshake(
        &mut first,
        &Hello::new(Channel::Main, 9, t.clone()).encode(),
    );
    assert_eq!(ok.map(|r| r.status), Some(ReplyStatus::Ok));
    let mut second = raw_connect(d.addr());
    let r = raw_handshake(&mut second, &Hello::new(Channel::Main, 9, t).encode())
        .expect("the duplicate got no reply");
    assert_eq!(r.status, ReplyStatus::DuplicateChannel, "{r:?}");
    expect_rejected(&d, &["already connected"]);
}

#[test]
fn main_and_urgent_of_different_sessions() {
    let d = dest();
    let t = table(&d);
    let mut main = raw_connect(d.addr());
    let ok = raw_handshake(&mut main, &Hello::new(Channel::Main, 1, t.clone()).encode());
    assert_eq!(ok.map(|r| r.status), Some(ReplyStatus::Ok));
    let mut urgent = raw_connect(d.addr());
    let r = raw_handshake(&mut urgent, &Hello::new(Channel::Urgent, 2, t).encode());
    // The urgent channel must not be told it is part of the migration.
    assert_ne!(r.map(|r| r.status), Some(ReplyStatus::Ok));
    expect_rejected(&d, &["session", "different migrations"]);
}

// ---- records on the main channel --------------------------------------------------------------

/// Handshakes both channels, sends `header` (and `payload`) on main, expects rejection naming
/// one of `words`. Returns the fake source (to read the return path).
fn bad_main_record(header: &[u8], payload: &[u8], words: &[&str]) -> FakeSource {
    let d = dest();
    let mut src = FakeSource::connect(&d, 0x5eed);
    src.send_main(header, payload);
    expect_rejected(&d, words);
    src
}

#[test]
fn page_record_past_the_region() {
    let hdr = Record::Pages {
        region: 0,
        offset: REGION as u64,
        len: 4096,
    }
    .encode();
    bad_main_record(&hdr, &[], &["outside"]);
}

#[test]
fn page_record_straddling_the_region_end() {
    let hdr = Record::Pages {
        region: 1,
        offset: REGION as u64 - 4096,
        len: 8192,
    }
    .encode();
    bad_main_record(&hdr, &[], &["outside"]);
}

#[test]
fn page_length_not_a_multiple_of_the_host_page() {
    let hdr = Record::Pages {
        region: 0,
        offset: 0,
        len: 100,
    }
    .encode();
    bad_main_record(&hdr, &[], &["multiple", "aligned"]);
}

#[test]
fn page_record_for_an_unknown_region() {
    let hdr = Record::Pages {
        region: 7,
        offset: 0,
        len: 4096,
    }
    .encode();
    bad_main_record(&hdr, &[], &["unknown region"]);
}

#[test]
fn oversized_page_length() {
    let hdr = Record::Pages {
        region: 0,
        offset: 0,
        len: (16 << 20) + 4096,
    }
    .encode();
    bad_main_record(&hdr, &[], &["exceeds"]);
}

#[test]
fn unknown_record_kind() {
    let mut hdr = Record::Ping.encode();
    hdr[0] = 0x42;
    bad_main_record(&hdr, &[], &["unknown record"]);
}

#[test]
fn discard_entry_out_of_range() {
    let entries = [DiscardEntry {
        region: 1,
        pages: 2,
        offset: REGION as u64 - 4096,
    }];
    let hdr = Record::Discard { count: 1 }.encode();
    bad_main_record(&hdr, &DiscardEntry::encode_all(&entries), &["outside"]);
}

#[test]
fn run_before_postcopy() {
    bad_main_record(&Record::Run.encode(), &[], &["not allowed"]);
}

/// Postcopy has armed userfaultfd and the guest runs: a bad page record still ends the
/// migration and nothing is placed.
#[test]
fn postcopy_page_record_past_the_region() {
    let d = dest();
    let mut src = FakeSource::connect(&d, 0x5eed);
    src.send_main(&Record::Postcopy.encode(), &[]);
    src.send_main(&Record::Run.encode(), &[]);
    let hdr = Record::Pages {
        region: 1,
        offset: REGION as u64,
        len: 4096,
    };
    src.send_main(&hdr.encode(), &[]);
    let err = d.expect_err(DEADLINE);
    assert_names(&err, &["outside"]);
    assert!(d.ran.load(std::sync::atomic::Ordering::SeqCst));
    assert_untouched(&d);
}

/// The source must learn why the destination gave up: the error goes back on the return path.
#[test]
fn source_is_told_why_its_record_was_rejected() {
    let hdr = Record::Pages {
        region: 0,
        offset: REGION as u64,
        len: 4096,
    }
    .encode();
    let mut src = bad_main_record(&hdr, &[], &["outside"]);
    let told = src
        .read_return_error()
        .unwrap_or_else(|e| panic!("the source was not told why: {e}"));
    assert_names(&told, &["outside"]);
}

/// A page record cut short: 4 KiB announced, 100 bytes sent, then the source vanishes.
fn truncated_page_frame() -> DestUnderTest {
    let d = dest();
    let mut src = FakeSource::connect(&d, 0x5eed);
    let hdr = Record::Pages {
        region: 0,
        offset: 0,
        len: 4096,
    }
    .encode();
    src.send_main(&hdr, &[0xab; 100]);
    drop(src);
    let err = d.expect_err(DEADLINE);
    assert_names(&err, &["closed", "truncated"]);
    d
}

#[test]
fn truncated_frame_is_an_error() {
    truncated_page_frame();
}

#[test]
fn truncated_frame_leaves_memory_untouched() {
    let d = truncated_page_frame();
    assert_untouched(&d);
}

// ---- the urgent channel ------------------------------------------------------------------------

fn urgent_page() -> Record {
    Record::Pages {
        region: 0,
        offset: 4096,
        len: 4096,
    }
}

/// An urgent page record before postcopy must be refused, not written. The fake source keeps
/// the main channel alive with pings, as a real source would.
#[test]
fn urgent_page_before_postcopy() {
    let d = dest();
    let mut src = FakeSource::connect(&d, 0x5eed);
    src.send_urgent(&urgent_page().encode(), &[0xcd; 4096]);
    let started = Instant::now();
    let err = loop {
        src.send_main(&Record::Ping.encode(), &[]);
        match d.try_finish(Duration::from_millis(50)) {
            Some(r) => break r.expect_err("accept succeeded on bad input"),
            None if started.elapsed() > DEADLINE => panic!("accept hung"),
            None => {}
        }
    };
    assert_names(&err, &["not allowed"]);
    assert_untouched(&d);
}

/// The same, but the main channel stays silent (a source stalled or hostile): the urgent
/// receiver's failure must still end the migration promptly and be the error reported.
#[test]
fn urgent_page_before_postcopy_with_idle_main() {
    let d = dest();
    let mut src = FakeSource::connect(&d, 0x5eed);
    src.send_urgent(&urgent_page().encode(), &[0xcd; 4096]);
    let err = d.expect_err(DEADLINE);
    assert_names(&err, &["not allowed"]);
    assert_untouched(&d);
}
