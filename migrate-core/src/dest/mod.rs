//! The receiving side of a migration.
//!
//! [`Destination::accept`] takes the main and urgent connections, then the main receiver writes
//! precopy pages straight into guest memory, drops discarded pages, arms userfaultfd at
//! switchover and lets the guest run; the fault thread requests missing pages; both receivers
//! place postcopy pages atomically. The migration completes when every host page is in place.

mod alias;
mod fault;
mod receive;
mod state;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uring_net::{FrameReader, Listener, Stream};

use crate::config::DestConfig;
use crate::error::MigrateError;
use crate::eventfd::EventFd;
use crate::handshake::{dest_handshake, region_table};
use crate::memory::{Backing, GuestMemory};
use crate::protocol::{
    Channel, DestPhase, DiscardEntry, Hello, PhaseAction, ProtocolError, Record, RegionTable,
    ReturnMsg, RECORD_HEADER_LEN,
};
use crate::stats::{CountersSnapshot, Lane, LatencySummary};
use crate::uffd::{feature, RegisterMode, Userfaultfd};
use crate::verify::{verify, DigestTable, PreWriteDigests, VerifyReport};
use receive::{place_record, urgent_loop};
use state::{DestShared, Event, Staging};

/// What the VMM does when the source lets the guest run.
pub trait DestControl: Send {
    /// Start the vCPUs: guest memory is registered for postcopy; missing pages fault and are
    /// fetched on demand.
    fn run(&mut self);
}

impl<F: FnMut() + Send> DestControl for F {
    fn run(&mut self) {
        self()
    }
}

/// What a completed migration measured on the destination.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DestReport {
    pub counters: CountersSnapshot,
    /// Page-request latency: fault read → page placed.
    pub latency: LatencySummary,
    pub verify: Option<VerifyReport>,
    /// From the first record to completion.
    pub total_ms: f64,
    /// From the guest starting here to completion.
    pub postcopy_ms: f64,
    /// `AnonHugePages` of guest memory when the guest started and at completion.
    pub anon_huge_bytes: (Option<u64>, Option<u64>),
    /// Times postcopy resumed after a broken connection.
    pub recoveries: u32,
}

/// The receiving side of one migration.
pub struct Destination {
    memory: Arc<GuestMemory>,
    config: DestConfig,
    guest_digests: Option<Arc<dyn PreWriteDigests>>,
    shared: Arc<DestShared>,
    /// Where the migration's threads run (home: the CPUs of the thread that made this).
    placement: crate::sched::Placement,
}

/// A snapshot of a destination's progress.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DestProgress {
    pub phase: &'static str,
    /// Postcopy lost its connection and waits for the source to reconnect.
    pub paused: bool,
    pub pages_received: u64,
    pub total_pages: u64,
    pub counters: CountersSnapshot,
}

/// A handle to watch a destination from another thread.
#[derive(Clone)]
pub struct DestWatch(Arc<DestShared>);

impl DestWatch {
    pub fn snapshot(&self) -> DestProgress {
        DestProgress {
            phase: self.0.phase().name(),
            paused: self.0.paused.load(std::sync::atomic::Ordering::Acquire),
            pages_received: self
                .0
                .received_count
                .load(std::sync::atomic::Ordering::Relaxed) as u64,
            total_pages: self.0.total as u64,
            counters: self.0.counters.snapshot(),
        }
    }
}

impl Destination {
    /// One destination runs one migration.
    pub fn new(memory: Arc<GuestMemory>, config: DestConfig) -> Self {
        let shared = Arc::new(DestShared::new(memory.clone()));
        Self {
            memory,
            placement: config.placement().from_here(),
            config,
            guest_digests: None,
            shared,
        }
    }

    /// Progress, readable from any thread while [`Destination::accept`] runs.
    pub fn watch(&self) -> DestWatch {
        DestWatch(self.shared.clone())
    }

    /// Lets verification account for pages the guest writes after it starts here.
    pub fn with_guest_digests(mut self, d: Arc<dyn PreWriteDigests>) -> Self {
        self.guest_digests = Some(d);
        self
    }

    /// Accepts the main and urgent connections of one migration on `listener` and runs it to
    /// completion. A connection that breaks during postcopy pauses the migration (vCPUs that
    /// touch missing pages wait) until the source reconnects on the same listener.
    pub fn accept(
        &self,
        listener: &Listener,
        control: &mut dyn DestControl,
    ) -> Result<DestReport, MigrateError> {
        let start = Instant::now();
        let table = region_table(&self.memory)?;
        // Found out now, not at switchover: by then the source can no longer take its guest
        // back.
        crate::uffd::require_features(self.uffd_features())?;
        // A shared region's guest view must not map pages that were never placed (a VMM may
        // have pre-faulted its RAM): minor faults fire only for unmapped pages.
        for r in self
            .memory
            .regions()
            .iter()
            .filter(|r| r.backing().is_shared())
        {
            r.unmap_view(0, r.len())?;
        }
        let mut link = self.accept_link(listener, &table, None)?;
        let session = link.session;
        let shared = self.shared.clone();
        // The return path runs on the urgent connection's reverse direction (a request written
        // on the main socket would wait for its lock behind the bulk receiver's reads).
        let ret: Arc<Mutex<Option<Stream>>> =
            Arc::new(Mutex::new(Some(link.urgent.stream().try_clone()?)));
        let stop =
            Arc::new(EventFd::new().map_err(|e| MigrateError::Internal(format!("eventfd: {e}")))?);
        let main_state = Mutex::new(MainState {
            digests: DigestTable::new(&table),
            got_digests: false,
            fault_thread: None,
            run_at: None,
            huge_at_run: None,
        });

        let mut recoveries = 0u32;
        let result = loop {
            shared.new_link();
            let closers = [
                link.main.stream().try_clone()?,
                link.urgent.stream().try_clone()?,
            ];
            let Link { main, urgent, .. } = link;
            let event = std::thread::scope(|s| {
                let (placement, shared_u, table_u) = (&self.placement, &*shared, &table);
                let spawned = std::thread::Builder::new()
                    .name("dst-urgent".into())
                    .spawn_scoped(s, move || {
                        placement.enter_urgent("urgent receiver");
                        urgent_loop(shared_u, urgent, table_u)
                    });
                if let Err(e) = spawned {
                    shared.fail(MigrateError::Internal(format!(
                        "spawn urgent receiver: {e}"
                    )));
                }
                let (ms, ret_m, stop_m, table_m) = (&main_state, &ret, &stop, &table);
                let control = &mut *control;
                let main_thread = std::thread::Builder::new()
                    .name("dst-main".into())
                    .spawn_scoped(s, move || {
                        self.placement.enter_bulk("main receiver");
                        if let Err(e) = self.main_loop(main, table_m, ms, ret_m, stop_m, control) {
                            self.shared.report(e);
                        }
                    });
                if let Err(e) = &main_thread {
                    shared.fail(MigrateError::Internal(format!("spawn main receiver: {e}")));
                }
                let event = match shared.wait_event() {
                    Event::Complete => Event::Done(self.finish(&main_state, &ret)),
                    Event::Fatal(e) => {
                        // Tell the source why before the connections close.
                        send_on(&ret, &ReturnMsg::encode_error(&e.to_string()));
                        Event::Fatal(e)
                    }
                    e => e,
                };
                if matches!(event, Event::LinkFailed(_)) && shared.phase() == DestPhase::Precopy {
                    // A break in precopy or at switchover: what the source's kernel accepted
                    // before the break is still arriving on the main channel, and it may hold
                    // `Postcopy`, after which the source will not run the guest again. Read it
                    // to its end before deciding: until the source's FIN, or no byte came for
                    // the link timeout (the main socket's read timeout ends the receiver), within
                    // a hard cap.
                    let _ = closers[1].shutdown(std::net::Shutdown::Both);
                    if let Ok(main) = &main_thread {
                        let t = self.config.link_timeout.saturating_mul(4);
                        let cap = Instant::now().checked_add(t);
                        while !main.is_finished() && cap.is_none_or(|c| Instant::now() < c) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                // Unblock both receivers so the scope can end (after Done the source closes
                // its side too; data already written is still delivered).
                for c in &closers {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
                event
            });
            // A receiver that failed for good while the link was going down (e.g. placing what
            // it drained) ends the migration: no point waiting for a reconnect.
            let event = match event {
                Event::LinkFailed(e) => shared
                    .take_fatal()
                    .map_or(Event::LinkFailed(e), Event::Fatal),
                e => e,
            };
            match event {
                Event::Done(verify) => break Ok(verify),
                Event::Complete => unreachable!("turned into Done above"),
                Event::Fatal(e) => break Err(e),
                Event::LinkFailed(e)
                    if shared.phase().is_postcopy() || shared.phase() == DestPhase::Ended =>
                {
                    tracing::warn!(error = %e, "postcopy paused: waiting for the source to reconnect");
                    *ret.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    shared
                        .paused
                        .store(true, std::sync::atomic::Ordering::Release);
                    match self.resume(listener, &table, session, &ret) {
                        Ok(l) => {
                            recoveries += 1;
                            shared
                                .paused
                                .store(false, std::sync::atomic::Ordering::Release);
                            link = l;
                            if shared.phase() == DestPhase::Armed {
                                // The source sent Run right behind Postcopy before the break.
                                shared.set_phase(DestPhase::Running);
                                let mut st = main_state.lock().unwrap_or_else(|p| p.into_inner());
                                st.run_at = Some(Instant::now());
                                st.huge_at_run = self.thp_bytes();
                                drop(st);
                                control.run();
                            }
                        }
                        Err(e2) => break Err(e2),
                    }
                }
                Event::LinkFailed(e) => {
                    break Err(MigrateError::Cancelled(format!(
                        "the connection broke during precopy: {e}"
                    )));
                }
            }
        };

        stop.notify();
        let mut st = main_state.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = st.fault_thread.take() {
            let _ = t.join();
        }
        let verify = result?;
        Ok(DestReport {
            counters: shared.counters.snapshot(),
            latency: shared.latency.summary(),
            verify,
            total_ms: start.elapsed().as_secs_f64() * 1e3,
            postcopy_ms: st.run_at.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
            anon_huge_bytes: (st.huge_at_run, self.thp_bytes()),
            recoveries,
        })
    }

    /// Accepts a main and an urgent connection that pass the handshake. `resume_of` is the
    /// session of a paused migration: only resuming connections of that session are admitted,
    /// and connections that fail their handshake are turned away without ending the wait.
    fn accept_link(
        &self,
        listener: &Listener,
        table: &RegionTable,
        resume_of: Option<u64>,
    ) -> Result<Link, MigrateError> {
        let mut main: Option<FrameReader> = None;
        let mut urgent: Option<FrameReader> = None;
        let mut session = resume_of;
        // (A resume timeout too long to represent waits without one.)
        let deadline =
            resume_of.and_then(|_| Instant::now().checked_add(self.config.resume_timeout));
        while main.is_none() || urgent.is_none() {
            let stream = match deadline {
                None => listener.accept()?,
                Some(d) => accept_until(listener, d)?,
            };
            stream.set_read_timeout(Some(self.config.timeout))?;
            let mut reader = FrameReader::new(stream, 256 << 10);
            let admit = |h: &Hello| {
                match resume_of {
                    Some(s) if !h.resume() || h.session != s => {
                        return Err(ProtocolError::NotPaused(format!(
                            "a migration (session {s:#x}) is paused here; only its source can resume it"
                        )))
                    }
                    None if h.resume() => {
                        return Err(ProtocolError::NotPaused("no migration is paused here".into()))
                    }
                    _ => {}
                }
                if let Some(s) = session {
                    if h.session != s {
                        return Err(ProtocolError::Session(
                            "main and urgent connections belong to different migrations".into(),
                        ));
                    }
                }
                let taken = match h.channel {
                    Channel::Main => main.is_some(),
                    Channel::Urgent => urgent.is_some(),
                };
                if taken {
                    return Err(ProtocolError::DuplicateChannel(h.channel.name()));
                }
                Ok(())
            };
            let hello = match dest_handshake(&mut reader, table, self.config.key.as_ref(), admit) {
                Ok(h) => h,
                Err(e) if resume_of.is_some() => {
                    tracing::warn!(error = %e, "turned away a connection while paused");
                    continue;
                }
                Err(e) => return Err(e),
            };
            session = Some(hello.session);
            let apply = match hello.channel {
                Channel::Main => &self.config.main_socket,
                Channel::Urgent => &self.config.urgent_socket,
            };
            apply.apply(reader.stream())?;
            match hello.channel {
                Channel::Main => {
                    reader
                        .stream()
                        .set_read_timeout(Some(self.config.link_timeout))?;
                    main = Some(reader)
                }
                Channel::Urgent => {
                    // Place the first requested page before copying what follows it.
                    reader.set_fill_limit(16 << 10);
                    reader.stream().set_read_timeout(None)?;
                    reader
                        .stream()
                        .set_write_timeout(Some(self.config.link_timeout))?;
                    urgent = Some(reader)
                }
            }
        }
        Ok(Link {
            main: main.expect("loop ran"),
            urgent: urgent.expect("loop ran"),
            session: session.expect("a hello set it"),
        })
    }

    /// Waits for the source to reconnect, then tells it what is in place and re-sends every
    /// request still pending.
    fn resume(
        &self,
        listener: &Listener,
        table: &RegionTable,
        session: u64,
        ret: &Mutex<Option<Stream>>,
    ) -> Result<Link, MigrateError> {
        let link = self.accept_link(listener, table, Some(session))?;
        let shared = &self.shared;
        let mut out = Vec::new();
        for (r, bits) in shared.received.iter().enumerate() {
            let bytes = bits.to_bytes();
            out.extend_from_slice(
                &ReturnMsg::Bitmap {
                    region: r as u16,
                    len: bytes.len() as u32,
                }
                .encode(),
            );
            out.extend_from_slice(&bytes);
        }
        let mut guard = ret.lock().unwrap_or_else(|p| p.into_inner());
        let stream = link.urgent.stream().try_clone()?;
        // Requests pending now go out behind the bitmaps; later faults send their own.
        for (r, region) in self.memory.regions().iter().enumerate() {
            let page = region.host_page_size();
            for (hp, t) in shared.pending[r].iter().enumerate() {
                if t.load(std::sync::atomic::Ordering::Acquire) != 0 {
                    let req = ReturnMsg::Request {
                        region: r as u16,
                        offset: (hp * page) as u64,
                        len: page as u32,
                    };
                    out.extend_from_slice(&req.encode());
                }
            }
        }
        (&stream)
            .write_all(&out)
            .map_err(|e| MigrateError::Net(uring_net::NetError::from_io(e, false)))?;
        *guard = Some(stream);
        tracing::info!("postcopy resumed");
        Ok(link)
    }

    /// The main channel: precopy writes, commands, bulk postcopy pages, heartbeats.
    fn main_loop(
        &self,
        mut main: FrameReader,
        table: &RegionTable,
        st: &Mutex<MainState>,
        ret: &Arc<Mutex<Option<Stream>>>,
        stop: &Arc<EventFd>,
        control: &mut dyn DestControl,
    ) -> Result<(), MigrateError> {
        let shared = &self.shared;
        let mut staging = Staging::new();
        let mut payload = Vec::new();
        loop {
            let mut phase = shared.phase();
            let Some(hdr) = main.read_header::<RECORD_HEADER_LEN>()? else {
                return Err(MigrateError::Link(format!(
                    "the source closed the main channel during {}",
                    phase.name()
                )));
            };
            let rec = Record::decode(&hdr, table)?;
            let action = phase.on_main(&rec)?;
            match (action, rec) {
                (
                    PhaseAction::WriteDirect,
                    Record::Pages {
                        region,
                        offset,
                        len,
                    },
                ) => {
                    let reg = &self.memory.regions()[region as usize];
                    let ptr = reg.ptr_at(offset as usize, len as usize)?;
                    let page = reg.host_page_size();
                    // Allocating the whole record's pages in one call costs about half of
                    // taking a page fault for each while the payload is copied in.
                    if let Err(e) = reg.populate_write(offset as usize, len as usize) {
                        tracing::debug!(error = %e, "pre-faulting a precopy record failed");
                    }
                    // SAFETY: `ptr_at` checked [offset, offset+len) lies inside the region,
                    // which stays mapped while `self.memory` lives; before postcopy no other
                    // thread writes guest memory.
                    if let Err(e) = unsafe { main.read_exact_raw(ptr, len as usize) } {
                        // A record cut short leaves no partial page behind: the range goes back
                        // to never-received (zero pages) and must be sent again.
                        reg.discard(offset as usize, len as usize)?;
                        shared.mark_discarded(
                            region as usize,
                            offset as usize / page,
                            len as usize / page,
                        );
                        return Err(e.into());
                    }
                    shared
                        .counters
                        .add_pages(Lane::Bulk, (len as usize / page) as u64, len as u64);
                    shared.mark_received(
                        region as usize,
                        offset as usize / page,
                        len as usize / page,
                    );
                }
                (
                    PhaseAction::ZeroDirect,
                    Record::Zero {
                        region,
                        offset,
                        len,
                    },
                ) => {
                    let reg = &self.memory.regions()[region as usize];
                    let page = reg.host_page_size();
                    let first = offset as usize / page;
                    for hp in first..first + len as usize / page {
                        // Never-written pages of a fresh mapping read as zero already.
                        if shared.received[region as usize].test(hp) {
                            reg.fill_zero(hp * page, page)?;
                        }
                    }
                    shared.counters.zero_pages.fetch_add(
                        (len as usize / page) as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    shared.mark_received(region as usize, first, len as usize / page);
                }
                (PhaseAction::Discard, Record::Discard { count }) => {
                    payload.resize(rec.payload_len(), 0);
                    main.read_exact(&mut payload)?;
                    for chunk in payload
                        .chunks(crate::protocol::record::DISCARD_ENTRY_LEN)
                        .take(count as usize)
                    {
                        let (e, bytes) = DiscardEntry::decode(chunk, table)?;
                        let reg = &self.memory.regions()[e.region as usize];
                        // Placement rewrites them before the guest can map them again.
                        reg.unmap_view(e.offset as usize, bytes as usize)?;
                        let page = reg.host_page_size();
                        shared.mark_discarded(
                            e.region as usize,
                            e.offset as usize / page,
                            e.pages as usize,
                        );
                        shared
                            .counters
                            .discarded_pages
                            .fetch_add(e.pages as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                (PhaseAction::Arm, _) => {
                    let t = self.arm(shared, ret.clone(), stop.clone())?;
                    lock(st).fault_thread = Some(t);
                }
                (PhaseAction::Run, _) => {
                    shared.set_phase(DestPhase::Running);
                    {
                        let mut st = lock(st);
                        st.huge_at_run = self.thp_bytes();
                        st.run_at = Some(Instant::now());
                    }
                    control.run();
                }
                (
                    PhaseAction::Place,
                    Record::Pages {
                        region,
                        offset,
                        len,
                    },
                ) => {
                    place_record(
                        shared,
                        &mut main,
                        &mut staging,
                        region,
                        offset,
                        len,
                        Lane::Bulk,
                    )?;
                }
                (
                    PhaseAction::PlaceZero,
                    Record::Zero {
                        region,
                        offset,
                        len,
                    },
                ) => {
                    let reg = self.memory.regions()[region as usize].clone();
                    shared.place_zero(&reg, offset as usize, len as usize, &mut staging)?;
                }
                (PhaseAction::StoreDigests, Record::Digests { region, offset, .. }) => {
                    payload.resize(rec.payload_len(), 0);
                    main.read_exact(&mut payload)?;
                    let page = self.memory.regions()[region as usize].host_page_size();
                    let values: Vec<u64> = payload
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
                        .collect();
                    let mut st = lock(st);
                    st.digests.store(region, offset as usize / page, &values);
                    st.got_digests = true;
                }
                (PhaseAction::End, _) => {
                    phase = DestPhase::Ended;
                }
                (PhaseAction::Nothing, Record::Ping) => send_on(ret, &ReturnMsg::Pong.encode()),
                _ => {}
            }
            if phase != shared.phase() {
                shared.set_phase(phase);
            }
        }
    }
    /// `AnonHugePages` of guest memory, for regions backed by transparent huge pages only
    /// (reading `/proc/self/smaps` walks every mapping: not on the way to running the guest
    /// unless it matters).
    fn thp_bytes(&self) -> Option<u64> {
        self.memory
            .regions()
            .iter()
            .any(|r| r.backing() == Backing::TransparentHuge)
            .then(|| self.memory.anon_huge_bytes())
            .flatten()
    }

    /// Every page is in place and the stream ended: verify, release userfaultfd, tell the
    /// source.
    fn finish(&self, st: &Mutex<MainState>, ret: &Mutex<Option<Stream>>) -> Option<VerifyReport> {
        let st = lock(st);
        let verify = st
            .got_digests
            .then(|| verify(&self.memory, &st.digests, self.guest_digests.as_deref()));
        if let Some(uffd) = self.shared.uffd.get() {
            for r in self.memory.regions() {
                let _ = uffd.unregister(r.base_addr(), r.len());
            }
        }
        let done = ReturnMsg::Done {
            verified: verify.as_ref().map(|r| r.ok()),
        };
        send_on(ret, &done.encode());
        verify
    }

    /// The userfaultfd features postcopy needs for this guest memory's backings.
    fn uffd_features(&self) -> u64 {
        let has = |b: Backing| self.memory.regions().iter().any(|r| r.backing() == b);
        let mut features = feature::THREAD_ID;
        if has(Backing::HugeTlb) {
            features |= feature::MISSING_HUGETLBFS;
        }
        if has(Backing::TransparentHuge) {
            features |= feature::MOVE;
        }
        if has(Backing::Shared) {
            features |= feature::MINOR_SHMEM;
        }
        if has(Backing::SharedHugeTlb) {
            features |= feature::MINOR_HUGETLBFS;
        }
        features
    }

    /// Registers guest memory for missing-page faults (minor faults for shared regions) and
    /// starts the fault thread.
    fn arm(
        &self,
        shared: &Arc<DestShared>,
        ret: Arc<Mutex<Option<Stream>>>,
        stop: Arc<EventFd>,
    ) -> Result<std::thread::JoinHandle<()>, MigrateError> {
        let uffd = Userfaultfd::open(self.uffd_features())?;
        for r in self.memory.regions() {
            // A shared region's file has every page (see `Backing::Shared`): the guest can
            // only fault on pages its view has not mapped yet, minor faults.
            let shared = r.backing().is_shared();
            uffd.register(
                r.base_addr(),
                r.len(),
                RegisterMode {
                    missing: !shared,
                    wp: false,
                    minor: shared,
                },
            )?;
        }
        if shared.uffd.set(uffd).is_err() {
            return Err(MigrateError::Internal("userfaultfd armed twice".into()));
        }
        shared.set_phase(DestPhase::Armed);
        let placement = self.placement.clone();
        let ft = fault::FaultThread {
            shared: shared.clone(),
            ret,
            stop,
        };
        std::thread::Builder::new()
            .name("dst-fault".into())
            .spawn(move || {
                placement.enter_urgent("fault thread");
                ft.run()
            })
            .map_err(|e| MigrateError::Internal(format!("spawn fault thread: {e}")))
    }
}

/// The two connections of one migration (or of one resume).
struct Link {
    main: FrameReader,
    urgent: FrameReader,
    session: u64,
}

/// What the main receiver keeps across connections.
struct MainState {
    digests: DigestTable,
    got_digests: bool,
    fault_thread: Option<std::thread::JoinHandle<()>>,
    run_at: Option<Instant>,
    huge_at_run: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes a return-path message if the connection is up (best effort: a broken connection is
/// noticed by the receivers).
fn send_on(ret: &Mutex<Option<Stream>>, bytes: &[u8]) {
    let mut guard = lock(ret);
    if let Some(s) = guard.as_ref() {
        if (&*s).write_all(bytes).is_err() {
            *guard = None;
        }
    }
}

/// Accepts one connection, giving up at `deadline`.
fn accept_until(listener: &Listener, deadline: Instant) -> Result<Stream, MigrateError> {
    listener.set_nonblocking(true)?;
    let result = loop {
        match listener.accept() {
            Ok(s) => break Ok(s),
            Err(uring_net::NetError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Err(MigrateError::Timeout(
                        "the source did not reconnect in time".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => break Err(e.into()),
        }
    };
    listener.set_nonblocking(false)?;
    let s = result?;
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Binds a listener for [`Destination::accept`].
pub fn listen(endpoint: &uring_net::Endpoint) -> Result<Listener, MigrateError> {
    Ok(Listener::bind(endpoint)?)
}
