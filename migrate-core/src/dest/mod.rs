//! The receiving side of a migration.
//!
//! [`Destination::accept`] takes the main and urgent connections, then the main receiver writes
//! precopy pages straight into guest memory, drops discarded pages, arms userfaultfd at
//! switchover and lets the guest run; the fault thread requests missing pages; both receivers
//! place postcopy pages atomically. The migration completes when every host page is in place.

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
use crate::handshake::{dest_handshake, refuse, region_table};
use crate::memory::GuestMemory;
use crate::protocol::{
    Channel, DestPhase, DiscardEntry, PhaseAction, ProtocolError, Record, RegionTable, ReturnMsg,
    RECORD_HEADER_LEN,
};
use crate::stats::{CountersSnapshot, Lane, LatencySummary};
use crate::uffd::{feature, RegisterMode, Userfaultfd};
use crate::verify::{verify, DigestTable, PreWriteDigests, VerifyReport};
use receive::{place_record, urgent_loop};
use state::{DestShared, Staging};

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
}

/// The receiving side of one migration.
pub struct Destination {
    memory: Arc<GuestMemory>,
    config: DestConfig,
    guest_digests: Option<Arc<dyn PreWriteDigests>>,
    shared: Arc<DestShared>,
}

/// A snapshot of a destination's progress.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DestProgress {
    pub phase: &'static str,
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

    /// Accepts the main and urgent connections of one migration on `listener` and runs it.
    pub fn accept(
        &self,
        listener: &Listener,
        control: &mut dyn DestControl,
    ) -> Result<DestReport, MigrateError> {
        let table = region_table(&self.memory);
        let mut main: Option<(FrameReader, u64)> = None;
        let mut urgent: Option<(FrameReader, u64)> = None;
        while main.is_none() || urgent.is_none() {
            let stream = listener.accept()?;
            stream.set_read_timeout(Some(self.config.timeout))?;
            let mut reader = FrameReader::new(stream, 256 << 10);
            let (channel, session) = dest_handshake(&mut reader, &table)?;
            let slot = match channel {
                Channel::Main => &mut main,
                Channel::Urgent => &mut urgent,
            };
            if slot.is_some() {
                let e = ProtocolError::DuplicateChannel(channel.name());
                refuse(reader.stream(), &e);
                return Err(e.into());
            }
            *slot = Some((reader, session));
        }
        let ((main, s1), (urgent, s2)) = (main.expect("loop ran"), urgent.expect("loop ran"));
        if s1 != s2 {
            return Err(ProtocolError::Handshake(
                "main and urgent connections belong to different migrations".into(),
            )
            .into());
        }
        self.config.main_socket.apply(main.stream())?;
        self.config.urgent_socket.apply(urgent.stream())?;
        self.run(main, urgent, table, control)
    }

    fn run(
        &self,
        mut main: FrameReader,
        urgent: FrameReader,
        table: RegionTable,
        control: &mut dyn DestControl,
    ) -> Result<DestReport, MigrateError> {
        let start = Instant::now();
        urgent.stream().set_read_timeout(None)?;
        let shared = self.shared.clone();
        let ret = Arc::new(Mutex::new(main.stream().try_clone()?));
        let urgent_close = urgent.stream().try_clone()?;
        let priority = self.config.urgent_priority;
        let urgent_thread = {
            let (shared, table) = (shared.clone(), table.clone());
            std::thread::Builder::new()
                .name("dst-urgent".into())
                .spawn(move || {
                    if let Some(p) = priority {
                        tracing::debug!(boost = ?crate::sched::boost_current_thread(p), "urgent receiver");
                    }
                    urgent_loop(shared, urgent, table)
                })
                .map_err(|e| MigrateError::Internal(format!("spawn urgent receiver: {e}")))?
        };
        let stop =
            Arc::new(EventFd::new().map_err(|e| MigrateError::Internal(format!("eventfd: {e}")))?);
        let mut fault_thread = None;
        let mut run_at = None;
        let mut huge_at_run = None;
        let mut digests = DigestTable::new(&table);
        let mut got_digests = false;

        let result = (|| -> Result<Option<VerifyReport>, MigrateError> {
            let mut phase = DestPhase::Precopy;
            let mut staging = Staging::new();
            let mut payload = Vec::new();
            loop {
                if shared.failed() {
                    break;
                }
                let Some(hdr) = main.read_header::<RECORD_HEADER_LEN>()? else {
                    return Err(MigrateError::Remote(format!(
                        "the source closed the main channel during {}",
                        phase.name()
                    )));
                };
                let rec = Record::decode(&hdr, &table)?;
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
                        // SAFETY: `ptr_at` checked [offset, offset+len) lies inside the region,
                        // which stays mapped while `self.memory` lives; before postcopy no other
                        // thread writes guest memory.
                        unsafe { main.read_exact_raw(ptr, len as usize)? };
                        let page = reg.host_page_size();
                        shared.counters.add_pages(
                            Lane::Bulk,
                            (len as usize / page) as u64,
                            len as u64,
                        );
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
                            let (e, bytes) = DiscardEntry::decode(chunk, &table)?;
                            let reg = &self.memory.regions()[e.region as usize];
                            reg.discard(e.offset as usize, bytes as usize)?;
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
                        fault_thread = Some(self.arm(&shared, ret.clone(), stop.clone())?);
                    }
                    (PhaseAction::Run, _) => {
                        shared.set_phase(DestPhase::Running);
                        huge_at_run = self.memory.anon_huge_bytes();
                        run_at = Some(Instant::now());
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
                            &shared,
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
                        shared.place_zero(&reg, offset as usize, len as usize)?;
                    }
                    (PhaseAction::StoreDigests, Record::Digests { region, offset, .. }) => {
                        payload.resize(rec.payload_len(), 0);
                        main.read_exact(&mut payload)?;
                        let page = self.memory.regions()[region as usize].host_page_size();
                        let values: Vec<u64> = payload
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
                            .collect();
                        digests.store(region, offset as usize / page, &values);
                        got_digests = true;
                    }
                    (PhaseAction::End, _) => {
                        shared.set_phase(DestPhase::Ended);
                        break;
                    }
                    _ => {}
                }
            }
            shared.wait_complete(self.config.timeout * 4)?;
            Ok(got_digests.then(|| verify(&self.memory, &digests, self.guest_digests.as_deref())))
        })();

        stop.notify();
        if let Some(t) = fault_thread {
            let _ = t.join();
        }
        // Release userfaultfd once every page is in place. After a failure it stays armed: a
        // vCPU touching a missing page must wait, never see a zero page.
        if let (Ok(_), Some(uffd)) = (&result, shared.uffd.get()) {
            for r in self.memory.regions() {
                let _ = uffd.unregister(r.base_addr(), r.len());
            }
        }
        let msg = match &result {
            Ok(v) => ReturnMsg::Done {
                verified: v.as_ref().map(|r| r.ok()),
            }
            .encode()
            .to_vec(),
            Err(e) => ReturnMsg::encode_error(&e.to_string()),
        };
        {
            let stream = ret.lock().unwrap_or_else(|p| p.into_inner());
            let _ = (&*stream).write_all(&msg);
        }
        // The source closes both channels after Done; make sure the urgent receiver ends anyway.
        let _ = urgent_close.set_read_timeout(Some(Duration::from_secs(5)));
        if result.is_err() {
            let _ = urgent_close.shutdown(std::net::Shutdown::Both);
        }
        let _ = urgent_thread.join();
        let verify = result?;
        Ok(DestReport {
            counters: shared.counters.snapshot(),
            latency: shared.latency.summary(),
            verify,
            total_ms: start.elapsed().as_secs_f64() * 1e3,
            postcopy_ms: run_at.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
            anon_huge_bytes: (huge_at_run, self.memory.anon_huge_bytes()),
        })
    }

    /// Registers guest memory for missing-page faults and starts the fault thread.
    fn arm(
        &self,
        shared: &Arc<DestShared>,
        ret: Arc<Mutex<Stream>>,
        stop: Arc<EventFd>,
    ) -> Result<std::thread::JoinHandle<()>, MigrateError> {
        let hugetlb = self
            .memory
            .regions()
            .iter()
            .any(|r| r.backing() == crate::memory::Backing::HugeTlb);
        let thp = self
            .memory
            .regions()
            .iter()
            .any(|r| r.backing() == crate::memory::Backing::TransparentHuge);
        let mut features = feature::THREAD_ID;
        if hugetlb {
            features |= feature::MISSING_HUGETLBFS;
        }
        if thp {
            features |= feature::MOVE;
        }
        let uffd = Userfaultfd::open(features)?;
        for r in self.memory.regions() {
            uffd.register(
                r.base_addr(),
                r.len(),
                RegisterMode {
                    missing: true,
                    wp: false,
                    minor: false,
                },
            )?;
        }
        if shared.uffd.set(uffd).is_err() {
            return Err(MigrateError::Internal("userfaultfd armed twice".into()));
        }
        shared.set_phase(DestPhase::Armed);
        let priority = self.config.urgent_priority;
        let ft = fault::FaultThread {
            shared: shared.clone(),
            ret,
            stop,
        };
        std::thread::Builder::new()
            .name("dst-fault".into())
            .spawn(move || {
                if let Some(p) = priority {
                    tracing::debug!(boost = ?crate::sched::boost_current_thread(p), "fault thread");
                }
                ft.run()
            })
            .map_err(|e| MigrateError::Internal(format!("spawn fault thread: {e}")))
    }
}

/// Binds a listener for [`Destination::accept`].
pub fn listen(endpoint: &uring_net::Endpoint) -> Result<Listener, MigrateError> {
    Ok(Listener::bind(endpoint)?)
}
