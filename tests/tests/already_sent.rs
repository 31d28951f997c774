//! A request for a page already sent: a fake destination (the protocol spoken by hand over
//! loopback) asks a real `Source` for a page it has just received in the bulk stream. The source
//! cannot tell whether the page has arrived (a destination only asks for pages it lacks, so the
//! page is normally still queued behind bulk data), so it sends the page once more on the
//! urgent channel (a rescue), with the same bytes; every other page is sent exactly once.

use std::collections::HashMap;
use std::io::Write;
use std::thread::JoinHandle;
use std::time::Duration;

use migrate_core::dirty::ManualDirtyLog;
use migrate_core::handshake::{dest_handshake, region_table};
use migrate_core::protocol::{Channel, Record, RegionTable, ReturnMsg, RECORD_HEADER_LEN};
use migrate_core::workload::fill_initial;
use migrate_core::Source;
use migrate_tests::{loopback_listener, zeroed_memory};
use uring_net::{FrameReader, Listener};

const REGION: usize = 4 << 20;
const PAGE: u64 = 4096;

/// A page record seen on one channel: `(region, host page)` → its bytes (empty for a zero
/// record).
type Seen = Vec<((u16, u64), Vec<u8>)>;

/// Reads one record (header and payload); `None` at a clean end of stream. Page records are
/// split into their host pages.
fn read_record(
    reader: &mut FrameReader,
    table: &RegionTable,
    seen: &mut Seen,
) -> Result<Option<Record>, String> {
    let Some(hdr) = reader
        .read_header::<RECORD_HEADER_LEN>()
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let rec = Record::decode(&hdr, table).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; rec.payload_len()];
    reader.read_exact(&mut payload).map_err(|e| e.to_string())?;
    match rec {
        Record::Pages { region, offset, .. } => {
            for (i, page) in payload.chunks(PAGE as usize).enumerate() {
                seen.push(((region, offset / PAGE + i as u64), page.to_vec()));
            }
        }
        Record::Zero {
            region,
            offset,
            len,
        } => {
            for i in 0..len as u64 / PAGE {
                seen.push(((region, offset / PAGE + i), Vec::new()));
            }
        }
        _ => {}
    }
    Ok(Some(rec))
}

/// What the fake destination observed.
struct Observed {
    /// The page it asked for after receiving it.
    requested: (u16, u64),
    main: Seen,
    urgent: Seen,
}

/// Accepts both connections, requests the first page it receives on the main channel again,
/// reads to the end, reports done.
fn fake_destination(
    listener: Listener,
    table: RegionTable,
) -> JoinHandle<Result<Observed, String>> {
    std::thread::spawn(move || {
        let mut main = None;
        let mut urgent = None;
        while main.is_none() || urgent.is_none() {
            let stream = listener.accept().map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let mut reader = FrameReader::new(stream, 256 << 10);
            let hello =
                dest_handshake(&mut reader, &table, None, |_| Ok(())).map_err(|e| e.to_string())?;
            match hello.channel {
                Channel::Main => main = Some(reader),
                Channel::Urgent => urgent = Some(reader),
            }
        }
        let (mut main, mut urgent) = (main.unwrap(), urgent.unwrap());
        // The return path is the urgent connection's reverse direction.
        let writer = urgent.stream().try_clone().map_err(|e| e.to_string())?;
        let urgent_thread = {
            let table = table.clone();
            std::thread::spawn(move || {
                // Until the source closes the channel at the end of the migration.
                let mut seen = Seen::new();
                while let Ok(Some(_)) = read_record(&mut urgent, &table, &mut seen) {}
                seen
            })
        };
        let send = |m: ReturnMsg| (&writer).write_all(&m.encode()).map_err(|e| e.to_string());
        let mut seen = Seen::new();
        let mut requested = None;
        loop {
            let before = seen.len();
            let rec = read_record(&mut main, &table, &mut seen)?
                .ok_or("the source closed the main channel before its end record")?;
            match rec {
                Record::End => break,
                Record::Ping => send(ReturnMsg::Pong)?,
                Record::Pages { .. } if requested.is_none() => {
                    let (x, _) = seen[before].clone();
                    send(ReturnMsg::Request {
                        region: x.0,
                        offset: x.1 * PAGE,
                        len: PAGE as u32,
                    })?;
                    requested = Some(x);
                }
                _ => {}
            }
        }
        send(ReturnMsg::Done { verified: None })?;
        let urgent = urgent_thread
            .join()
            .map_err(|_| "the urgent reader panicked")?;
        Ok(Observed {
            requested: requested.ok_or("no page record on the main channel")?,
            main: seen,
            urgent,
        })
    })
}

#[test]
fn request_for_a_page_already_sent_is_resent_once_on_the_urgent_channel() {
    let mem = zeroed_memory(REGION);
    fill_initial(&mem, 4);
    let (listener, ep) = loopback_listener();
    let dest = fake_destination(listener, region_table(&mem).unwrap());

    let mut cfg = migrate_tests::test_source_config();
    cfg.precopy.max_passes = 0;
    let (mut dirty, _handle) = ManualDirtyLog::new(&mem);
    let source = Source::new(mem.clone(), cfg);
    let report = source.migrate(&ep, &mut dirty, &mut || Ok(()));
    let seen = dest
        .join()
        .expect("fake destination thread")
        .expect("fake destination");
    let report = report.expect("source migration");

    assert_eq!(report.counters.requests, 1, "{:?}", report.counters);

    let x = seen.requested;
    let region = &mem.regions()[x.0 as usize];
    let mut want = vec![0u8; PAGE as usize];
    region.read_into((x.1 * PAGE) as usize, &mut want).unwrap();
    assert!(want.iter().any(|&b| b != 0), "page {x:?} has data");
    let copies = |seen: &Seen| -> Vec<Vec<u8>> {
        seen.iter()
            .filter(|(p, _)| *p == x)
            .map(|(_, b)| b.clone())
            .collect()
    };
    assert_eq!(copies(&seen.main), vec![want.clone()], "page {x:?} on main");
    assert_eq!(copies(&seen.urgent), vec![want], "page {x:?} on urgent");
    assert_eq!(seen.urgent.len(), 1, "only the requested page goes urgent");
    assert_eq!(report.counters.rescued_pages, 1, "{:?}", report.counters);

    // Every host page arrived exactly once on the main channel (none lost, none duplicated).
    let mut count: HashMap<(u16, u64), usize> = HashMap::new();
    for (p, _) in &seen.main {
        *count.entry(*p).or_default() += 1;
    }
    assert_eq!(count.len(), mem.total_host_pages(), "pages missing");
    assert!(count.values().all(|&n| n == 1), "a page was sent twice");
}
