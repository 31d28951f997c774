//! Harness for whole-migration tests: a source and a destination in one process, each with its
//! own guest memory and synthetic guest, over loopback TCP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migrate_core::dirty::UffdWpDirtyLog;
use migrate_core::verify::PreWriteDigests;
use migrate_core::workload::{fill_initial, Access, DestWorkload, PreWriteLog, SourceWorkload};
use migrate_core::{
    Backing, DestConfig, DestReport, Destination, GuestMemory, Mode, RegionSpec, Source,
    SourceConfig, SourceReport,
};
use uring_net::{Endpoint, Listener};

/// One migration to run.
#[derive(Clone, Debug)]
pub struct Case {
    pub mode: Mode,
    pub backing: Backing,
    /// Bytes per region; two regions are migrated.
    pub region_size: usize,
    pub access: Access,
    pub vcpus: usize,
    /// Source guest writes per second during precopy.
    pub dirty_rate: u64,
    pub passes: u32,
    /// Precopy time limit: a short one switches over in the middle of a pass, so postcopy has
    /// both never-sent and dirtied (discarded) pages to fetch.
    pub precopy_limit: Duration,
    /// Destination guest touches per vCPU.
    pub touches: u64,
}

impl Case {
    pub fn small(mode: Mode, access: Access) -> Self {
        Self {
            mode,
            backing: Backing::Anonymous,
            region_size: 8 << 20,
            access,
            vcpus: 2,
            dirty_rate: 20_000,
            passes: 2,
            precopy_limit: Duration::from_millis(3),
            touches: 300,
        }
    }
}

impl Case {
    /// The source settings of this case (mode and precopy limits; defaults otherwise).
    pub fn source_config(&self) -> SourceConfig {
        let mut cfg = SourceConfig {
            mode: self.mode,
            ..SourceConfig::default()
        };
        cfg.precopy.max_passes = self.passes;
        cfg.precopy.max_time = self.precopy_limit;
        cfg
    }
}

/// Runs `source` to `ep` with the real dirty log, while the case's source guest dirties
/// `src_mem` until the switchover pauses it.
pub fn migrate_source(
    source: &Source,
    case: &Case,
    src_mem: Arc<GuestMemory>,
    ep: &Endpoint,
) -> Result<SourceReport, migrate_core::MigrateError> {
    let mut dirty = UffdWpDirtyLog::new().expect("uffd-wp dirty log");
    let mut workload = SourceWorkload::start(src_mem, case.vcpus, case.access, case.dirty_rate);
    source.migrate(ep, &mut dirty, &mut workload)
}

pub struct Outcome {
    pub source: SourceReport,
    pub dest: DestReport,
    pub src_mem: Arc<GuestMemory>,
    pub dst_mem: Arc<GuestMemory>,
    pub log: Arc<PreWriteLog>,
}

pub fn memory(case: &Case) -> GuestMemory {
    GuestMemory::allocate(&[
        RegionSpec {
            name: "ram-low".into(),
            size: case.region_size,
            backing: case.backing,
        },
        RegionSpec {
            name: "ram-high".into(),
            size: case.region_size,
            backing: case.backing,
        },
    ])
    .expect("allocate guest memory")
}

/// Guest memory the way a VMM with shared RAM holds it: one memfd (`case.region_size` × 2),
/// mapped shared by the "VMM", split into two regions borrowed with
/// [`GuestRegion::from_memfd`](migrate_core::GuestRegion::from_memfd) (the second at a file
/// offset). 4 KiB shmem pages, pre-faulted by the VMM (`MAP_POPULATE`, like a VMM that
/// preallocates guest RAM).
pub fn vmm_memfd_memory(case: &Case) -> GuestMemory {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    let len = case.region_size;
    // SAFETY: memfd_create returns a fresh descriptor (checked), owned by `OwnedFd` from here.
    let file = std::fs::File::from(unsafe {
        let fd = libc::memfd_create(c"vmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    });
    file.set_len(2 * len as u64).expect("size the memfd");
    // SAFETY: a new shared mapping of the whole file at a kernel-chosen address.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "map the memfd");
    /// The VMM's mapping, unmapped when the last region borrowing it is gone.
    struct VmmRam(usize, usize);
    impl Drop for VmmRam {
        fn drop(&mut self) {
            // SAFETY: our mapping; every region borrowing it holds this owner.
            unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
        }
    }
    let owner = Arc::new(VmmRam(base as usize, 2 * len));
    let regions = ["ram-low", "ram-high"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            // SAFETY: [base + i*len, +len) is the shared mapping of the file at offset i*len,
            // read/write, alive while `owner` is.
            unsafe {
                migrate_core::GuestRegion::from_memfd(
                    i as u16,
                    name,
                    (base as usize + i * len) as *mut u8,
                    len,
                    file.as_fd(),
                    (i * len) as u64,
                    owner.clone(),
                )
            }
            .expect("borrow the VMM's memfd")
        })
        .collect();
    GuestMemory::new(regions).expect("guest memory")
}

/// A listener on an ephemeral loopback port.
pub fn loopback_listener() -> (Listener, Endpoint) {
    let l = Listener::bind(&"127.0.0.1:0".parse().unwrap()).expect("bind loopback");
    let ep = l.local_endpoint().expect("local endpoint");
    (l, ep)
}

/// Runs `dest.accept` in a thread; when the source lets the guest run, the destination guest
/// of `case` starts touching pages; the thread waits for it to finish its touches.
pub fn spawn_dest(
    dest: Destination,
    listener: Listener,
    dst_mem: Arc<GuestMemory>,
    log: Arc<PreWriteLog>,
    case: &Case,
) -> std::thread::JoinHandle<Result<DestReport, migrate_core::MigrateError>> {
    let case = case.clone();
    std::thread::spawn(move || {
        let guest: Arc<Mutex<Option<DestWorkload>>> = Arc::default();
        let g = guest.clone();
        let mut run = move || {
            *g.lock().unwrap() = Some(DestWorkload::start(
                dst_mem.clone(),
                log.clone(),
                case.vcpus,
                case.access,
                Duration::from_micros(20),
                case.touches,
            ));
        };
        let report = dest.accept(&listener, &mut run);
        if let Some(mut w) = guest.lock().unwrap().take() {
            w.join();
        }
        report
    })
}

/// Runs `case` end to end and returns both reports.
pub fn run(case: &Case) -> Outcome {
    let src_mem = memory(case);
    fill_initial(&src_mem, 4);
    run_with(case, src_mem, memory(case))
}

/// Runs `case` end to end between the given memories (the source's as the caller filled it).
pub fn run_with(case: &Case, src_mem: GuestMemory, dst_mem: GuestMemory) -> Outcome {
    let src_mem = Arc::new(src_mem);
    let dst_mem = Arc::new(dst_mem);
    let log = Arc::new(PreWriteLog::new(&dst_mem));
    let (listener, ep) = loopback_listener();

    let dest = Destination::new(dst_mem.clone(), DestConfig::default())
        .with_guest_digests(log.clone() as Arc<dyn PreWriteDigests>);
    let dest = spawn_dest(dest, listener, dst_mem.clone(), log.clone(), case);

    let source = Source::new(src_mem.clone(), case.source_config());
    let source = migrate_source(&source, case, src_mem.clone(), &ep);
    let dest = dest.join().expect("destination thread");
    let source = source.expect("source migration");
    let dest = dest.expect("destination migration");
    Outcome {
        source,
        dest,
        src_mem,
        dst_mem,
        log,
    }
}

/// Compares the two memories byte for byte, except host pages the destination guest wrote
/// (those are checked through their pre-write digest against the source's digest).
pub fn assert_identical(o: &Outcome) {
    for (s, d) in o.src_mem.regions().iter().zip(o.dst_mem.regions()) {
        let page = s.host_page_size();
        let mut a = vec![0u8; page];
        let mut b = vec![0u8; page];
        for hp in 0..s.host_pages() {
            s.read_into(hp * page, &mut a).unwrap();
            match o.log.pre_write_digest(s.id(), hp) {
                Some(pre) => assert_eq!(
                    pre,
                    s.digest(hp * page, page),
                    "region {} page {hp}: stale before the guest wrote it",
                    s.name()
                ),
                None => {
                    d.read_into(hp * page, &mut b).unwrap();
                    assert!(a == b, "region {} host page {hp} differs", s.name());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for the adversarial tests (hostile.rs, disconnect.rs): a real destination accepting in
// its own thread, raw "fake sources" speaking hand-made bytes, and memory checks.

/// Two zeroed anonymous regions ("ram-low", "ram-high") of `region_size` bytes each.
pub fn zeroed_memory(region_size: usize) -> Arc<GuestMemory> {
    Arc::new(
        GuestMemory::allocate(&[
            RegionSpec {
                name: "ram-low".into(),
                size: region_size,
                backing: Backing::Anonymous,
            },
            RegionSpec {
                name: "ram-high".into(),
                size: region_size,
                backing: Backing::Anonymous,
            },
        ])
        .expect("allocate guest memory"),
    )
}

/// The first non-zero byte of guest memory as `(region name, offset)`, or `None` if all of it
/// is zero. Only resident host pages are read (a page never written is not resident and reads
/// as zero), so this never faults on a page still registered with userfaultfd.
pub fn first_nonzero(memory: &GuestMemory) -> Option<(String, usize)> {
    for r in memory.regions() {
        let page = r.host_page_size();
        let mut buf = vec![0u8; page];
        for hp in 0..r.host_pages() {
            if !r.is_populated(hp * page).unwrap_or(true) {
                continue;
            }
            r.read_into(hp * page, &mut buf).expect("read guest page");
            if let Some(i) = buf.iter().position(|&b| b != 0) {
                return Some((r.name().to_owned(), hp * page + i));
            }
        }
    }
    None
}

/// A destination for adversarial tests: short timeouts, no real-time priority.
/// A source for tests against a fake or hostile peer: preempt-full, short timeouts, default
/// scheduling, and no reconnect (a broken link fails at once).
pub fn test_source_config() -> SourceConfig {
    SourceConfig {
        mode: Mode::PreemptFull,
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        urgent_priority: None,
        reconnect: migrate_core::ReconnectPolicy {
            retries: 0,
            ..Default::default()
        },
        ..SourceConfig::default()
    }
}

pub fn test_dest_config() -> DestConfig {
    DestConfig {
        timeout: Duration::from_secs(20),
        urgent_priority: None,
        ..DestConfig::default()
    }
}

/// A real [`Destination::accept`] running in its own thread on a loopback listener.
pub struct DestUnderTest {
    pub endpoint: Endpoint,
    pub memory: Arc<GuestMemory>,
    /// Set once the destination's `run` callback (the guest start) was called.
    pub ran: Arc<std::sync::atomic::AtomicBool>,
    rx: std::sync::mpsc::Receiver<Result<DestReport, String>>,
}

impl DestUnderTest {
    pub fn start(memory: Arc<GuestMemory>, config: DestConfig) -> Self {
        let (listener, endpoint) = loopback_listener();
        let (tx, rx) = std::sync::mpsc::channel();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mem, flag) = (memory.clone(), ran.clone());
        std::thread::Builder::new()
            .name("dest-under-test".into())
            .spawn(move || {
                let d = Destination::new(mem, config);
                let mut run = move || flag.store(true, std::sync::atomic::Ordering::SeqCst);
                let r = d.accept(&listener, &mut run).map_err(|e| e.to_string());
                // Dropping the destination closes its userfaultfd, so memory can be inspected.
                drop(d);
                let _ = tx.send(r);
            })
            .expect("spawn destination thread");
        Self {
            endpoint,
            memory,
            ran,
            rx,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        match &self.endpoint {
            Endpoint::Tcp(a) => *a,
            e => panic!("not a TCP endpoint: {e}"),
        }
    }

    /// Waits for `accept` to return. Panics if it has not returned within `deadline` (a hang)
    /// or if the destination thread panicked.
    pub fn finish(&self, deadline: Duration) -> Result<DestReport, String> {
        use std::sync::mpsc::RecvTimeoutError;
        match self.rx.recv_timeout(deadline) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                panic!("Destination::accept did not return within {deadline:?} (hang)")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("the destination thread panicked"),
        }
    }

    /// Like [`finish`](Self::finish), but expects an error and returns its text.
    pub fn expect_err(&self, deadline: Duration) -> String {
        match self.finish(deadline) {
            Ok(r) => panic!("Destination::accept succeeded on bad input: {r:?}"),
            Err(e) => e,
        }
    }
}

/// Connects a raw TCP client (a fake source or a fake second peer) with a 10 s read timeout.
pub fn raw_connect(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).expect("connect to the destination");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads one hello reply; `None` if the peer closed (or reset) before a whole reply arrived.
pub fn read_reply(stream: &mut std::net::TcpStream) -> Option<migrate_core::protocol::HelloReply> {
    use migrate_core::protocol::handshake::REPLY_HEADER_LEN;
    use migrate_core::protocol::HelloReply;
    use std::io::Read;
    let mut hdr = [0u8; REPLY_HEADER_LEN];
    stream.read_exact(&mut hdr).ok()?;
    let len = HelloReply::message_len(&hdr).expect("destination sent a malformed reply");
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg).ok()?;
    Some(HelloReply::decode(&hdr, &msg).expect("destination sent a malformed reply"))
}

/// The source side of the handshake over raw bytes: sends `hello` and, if the destination takes
/// it, reads its challenge and answers with an all-zero proof (no key). Returns the first
/// refusal, or the final verdict; `None` if the destination hung up without one.
pub fn raw_handshake(
    stream: &mut std::net::TcpStream,
    hello: &[u8],
) -> Option<migrate_core::protocol::HelloReply> {
    use migrate_core::protocol::auth::PROOF_LEN;
    use migrate_core::protocol::handshake::CHALLENGE_LEN;
    use migrate_core::protocol::ReplyStatus;
    use std::io::{Read, Write};
    stream.write_all(hello).expect("send hello");
    let first = read_reply(stream)?;
    if first.status != ReplyStatus::Ok {
        return Some(first);
    }
    let mut challenge = [0u8; CHALLENGE_LEN];
    stream.read_exact(&mut challenge).ok()?;
    stream.write_all(&[0u8; PROOF_LEN]).ok()?;
    read_reply(stream)
}

/// A raw source that has completed both handshakes with `session`.
pub struct FakeSource {
    pub main: std::net::TcpStream,
    pub urgent: std::net::TcpStream,
    pub table: migrate_core::protocol::RegionTable,
}

impl FakeSource {
    /// Connects main then urgent and handshakes both with the destination's own region table.
    pub fn connect(dest: &DestUnderTest, session: u64) -> Self {
        use migrate_core::protocol::{Channel, Hello, ReplyStatus};
        let table = migrate_core::handshake::region_table(&dest.memory).unwrap();
        let mut main = raw_connect(dest.addr());
        let r = raw_handshake(
            &mut main,
            &Hello::new(Channel::Main, session, table.clone()).encode(),
        );
        assert_eq!(r.map(|r| r.status), Some(ReplyStatus::Ok), "main handshake");
        let mut urgent = raw_connect(dest.addr());
        let r = raw_handshake(
            &mut urgent,
            &Hello::new(Channel::Urgent, session, table.clone()).encode(),
        );
        assert_eq!(
            r.map(|r| r.status),
            Some(ReplyStatus::Ok),
            "urgent handshake"
        );
        Self {
            main,
            urgent,
            table,
        }
    }

    /// Writes a record header and its payload on the main channel (errors ignored: the
    /// destination may already have hung up).
    pub fn send_main(&mut self, header: &[u8], payload: &[u8]) {
        use std::io::Write;
        let _ = self.main.write_all(header);
        let _ = self.main.write_all(payload);
    }

    pub fn send_urgent(&mut self, header: &[u8], payload: &[u8]) {
        use std::io::Write;
        let _ = self.urgent.write_all(header);
        let _ = self.urgent.write_all(payload);
    }

    /// Reads the destination's final return-path message (the urgent connection's reverse
    /// direction): `Ok(message)` for an error report, `Err(description)` for anything else.
    pub fn read_return_error(&mut self) -> Result<String, String> {
        use migrate_core::protocol::{ReturnMsg, RETURN_HEADER_LEN};
        use std::io::Read;
        let mut hdr = [0u8; RETURN_HEADER_LEN];
        self.urgent
            .read_exact(&mut hdr)
            .map_err(|e| format!("no return-path message: {e}"))?;
        match ReturnMsg::decode(&hdr, &self.table) {
            Ok(ReturnMsg::Error { len }) => {
                let mut msg = vec![0u8; len as usize];
                self.urgent
                    .read_exact(&mut msg)
                    .map_err(|e| format!("truncated error message: {e}"))?;
                Ok(String::from_utf8_lossy(&msg).into_owned())
            }
            other => Err(format!("expected an error message, got {other:?}")),
        }
    }
}

impl DestUnderTest {
    /// `Some(result)` if `accept` returned within `wait`, `None` if it is still running.
    /// Panics if the destination thread panicked.
    pub fn try_finish(&self, wait: Duration) -> Option<Result<DestReport, String>> {
        use std::sync::mpsc::RecvTimeoutError;
        match self.rx.recv_timeout(wait) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the destination thread panicked"),
        }
    }
}
