//! Pre-shared-key authentication of every connection: a real `Source` against a real
//! `Destination::accept` with matching, wrong, missing and unexpected keys, and a raw client that
//! completes the hello but cannot prove the key. Whenever authentication fails, both sides say
//! so, the destination guest never starts and its memory is never written.

use std::io::{Read, Write};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use migrate_core::dirty::ManualDirtyLog;
use migrate_core::protocol::auth::PROOF_LEN;
use migrate_core::protocol::handshake::{CHALLENGE_LEN, HELLO_AUTH};
use migrate_core::protocol::{AuthKey, Channel, Hello, Record, ReplyStatus};
use migrate_core::workload::fill_initial;
use migrate_core::{DestConfig, GuestMemory, Source, SourceConfig, SourceReport};
use migrate_tests::{
    first_nonzero, raw_connect, read_reply, test_dest_config, zeroed_memory, DestUnderTest,
};

/// Well within the destination's own 20 s timeouts: a refusal that only ends through a timeout
/// fails here.
const DEADLINE: Duration = Duration::from_secs(8);
const REGION: usize = 2 << 20;

fn key(text: &str) -> AuthKey {
    AuthKey::new(text.as_bytes()).expect("a valid test key")
}

fn dest_with(key: Option<AuthKey>) -> DestUnderTest {
    let config = DestConfig {
        key,
        ..test_dest_config()
    };
    DestUnderTest::start(zeroed_memory(REGION), config)
}

/// A source whose memory has the destination's layout, filled with data.
fn source_memory() -> Arc<GuestMemory> {
    let mem = zeroed_memory(REGION);
    fill_initial(&mem, 4);
    mem
}

/// Migrates `mem` to `dest` with `key`, pure postcopy; the error as text.
fn migrate(
    dest: &DestUnderTest,
    mem: &Arc<GuestMemory>,
    key: Option<AuthKey>,
) -> Result<SourceReport, String> {
    let mut cfg = SourceConfig {
        key,
        ..migrate_tests::test_source_config()
    };
    cfg.precopy.max_passes = 1;
    let (mut dirty, _handle) = ManualDirtyLog::new(mem);
    Source::new(mem.clone(), cfg)
        .migrate(&dest.endpoint, &mut dirty, &mut || Ok(()))
        .map_err(|e| e.to_string())
}

fn assert_names_auth(who: &str, err: &str) {
    assert!(
        err.to_lowercase().contains("authentication"),
        "the {who}'s error does not name authentication: {err:?}"
    );
}

/// Both sides failed naming authentication; the destination placed nothing and never ran.
fn assert_refused(dest: &DestUnderTest, source: Result<SourceReport, String>) {
    let src_err = match source {
        Ok(r) => panic!("the source migrated despite the key problem: {r:?}"),
        Err(e) => e,
    };
    assert_names_auth("source", &src_err);
    let dst_err = dest.expect_err(DEADLINE);
    assert_names_auth("destination", &dst_err);
    assert_eq!(
        first_nonzero(&dest.memory),
        None,
        "destination guest memory was written"
    );
    assert!(!dest.ran.load(SeqCst), "the destination guest was started");
    eprintln!("source: {src_err}\ndestination: {dst_err}");
}

#[test]
fn wrong_key_is_refused() {
    let dest = dest_with(Some(key("the destination's key, 32 bytes")));
    let r = migrate(
        &dest,
        &source_memory(),
        Some(key("the source's own key, 32 bytes!")),
    );
    assert_refused(&dest, r);
}

#[test]
fn missing_key_is_refused() {
    let dest = dest_with(Some(key("the destination's key, 32 bytes")));
    let r = migrate(&dest, &source_memory(), None);
    assert_refused(&dest, r);
}

#[test]
fn unexpected_key_is_refused() {
    let dest = dest_with(None);
    let r = migrate(
        &dest,
        &source_memory(),
        Some(key("a key the destination lacks....")),
    );
    assert_refused(&dest, r);
}

#[test]
fn matching_keys_migrate_and_verify() {
    let k = "a shared key of some length\n";
    let dest = dest_with(Some(key(k)));
    let mem = source_memory();
    let src = migrate(&dest, &mem, Some(key(k))).expect("source migration");
    let dst = dest
        .finish(Duration::from_secs(30))
        .expect("dest migration");
    assert_eq!(src.verified, Some(true), "{src:?}");
    let v = dst.verify.as_ref().expect("verification ran");
    assert!(v.ok(), "{v:?}");
    assert!(dest.ran.load(SeqCst));
    // Byte for byte (the destination's "guest" writes nothing).
    for (s, d) in mem.regions().iter().zip(dest.memory.regions()) {
        let page = s.host_page_size();
        let (mut a, mut b) = (vec![0u8; page], vec![0u8; page]);
        for hp in 0..s.host_pages() {
            s.read_into(hp * page, &mut a).unwrap();
            d.read_into(hp * page, &mut b).unwrap();
            assert!(a == b, "region {} host page {hp} differs", s.name());
        }
    }
}

/// A client that sends a well-formed hello claiming a key, answers the challenge with a garbage
/// proof and then streams a page record anyway: refused, nothing placed.
#[test]
fn raw_connection_without_proof_places_nothing() {
    let dest = dest_with(Some(key("the destination's key, 32 bytes")));
    let table = migrate_core::handshake::region_table(&dest.memory).unwrap();
    let mut s = raw_connect(dest.addr());
    let mut hello = Hello::new(Channel::Main, 0x5eed, table);
    hello.flags = HELLO_AUTH;
    hello.nonce = [0x42; 32];
    s.write_all(&hello.encode()).expect("send hello");
    let first = read_reply(&mut s).expect("a reply to the hello");
    assert_eq!(first.status, ReplyStatus::Ok, "{first:?}");
    let mut challenge = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut challenge).expect("the challenge");
    let garbage: Vec<u8> = (0..PROOF_LEN as u8)
        .map(|i| i.wrapping_mul(37) ^ 0xa5)
        .collect();
    s.write_all(&garbage).expect("send the proof");
    // Do not wait for the verdict: a page record right behind the proof.
    let rec = Record::Pages {
        region: 0,
        offset: 0,
        len: 4096,
    };
    let _ = s.write_all(&rec.encode());
    let _ = s.write_all(&[0xee; 4096]);
    let verdict = read_reply(&mut s).expect("a verdict on the proof");
    assert_eq!(verdict.status, ReplyStatus::AuthFailed, "{verdict:?}");
    assert_names_auth("destination's reply", &verdict.message);
    let err = dest.expect_err(DEADLINE);
    assert_names_auth("destination", &err);
    assert_eq!(
        first_nonzero(&dest.memory),
        None,
        "destination guest memory was written"
    );
    assert!(!dest.ran.load(SeqCst), "the destination guest was started");
}
