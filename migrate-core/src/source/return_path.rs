//! The source's return-path thread: reads page requests and, in preempt-full mode, sends the
//! requested host pages on the urgent channel itself (no hand-off to another thread).

use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::Arc;
use std::time::Duration;

use uring_net::{FrameReader, FrameSender, Waker};

use super::shared::{Claims, Finish, Progress, RequestQueue};
use crate::error::MigrateError;
use crate::memory::GuestMemory;
use crate::protocol::{RegionTable, ReturnMsg, RETURN_HEADER_LEN};

pub(crate) struct ReturnPath {
    pub memory: Arc<GuestMemory>,
    pub table: RegionTable,
    pub reader: FrameReader,
    /// The urgent sender, in preempt-full mode only.
    pub urgent: Option<FrameSender>,
    pub claims: Arc<Claims>,
    pub requests: Arc<RequestQueue>,
    pub scanner_waker: Waker,
    /// The bulk sender's counters: how many bytes of its stream the kernel has accepted.
    pub bulk_stats: Arc<uring_net::SendStats>,
    pub progress: Arc<Progress>,
    pub finish: Arc<Finish>,
    pub hint: Arc<Vec<AtomicUsize>>,
    /// Sends the requested pages (preempt-full).
    pub server: super::serve::UrgentServer,
    pub pacer: Arc<super::pacing::Pacer>,
}

impl ReturnPath {
    /// Runs until the destination reports completion or an error; records the outcome in
    /// `finish` and wakes the scanner either way. Hands the urgent sender back (for its
    /// counters).
    pub fn run(mut self) -> Option<FrameSender> {
        let result = self.serve();
        if let Err(e) = result {
            tracing::warn!(error = %e, "return path ended with an error");
            *self.finish.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
        if let Some(u) = self.urgent.as_mut() {
            let _ = u.drain(Some(Duration::from_secs(1)));
        }
        self.scanner_waker.wake();
        self.urgent
    }

    fn serve(&mut self) -> Result<(), MigrateError> {
        // Bind and enable the urgent ring now (first use), not on the first request.
        if let Some(u) = self.urgent.as_mut() {
            u.poll()?;
        }
        loop {
            let Some(hdr) = self.reader.read_header::<RETURN_HEADER_LEN>()? else {
                return Err(MigrateError::Link(
                    "the destination closed the return path".into(),
                ));
            };
            match ReturnMsg::decode(&hdr, &self.table)? {
                ReturnMsg::Request {
                    region,
                    offset,
                    len,
                } => {
                    self.progress.counters.requests.fetch_add(1, Relaxed);
                    self.request(region, offset, len)?;
                    // Coalesce only requests that already arrived; never wait for more.
                    if self.reader.buffered() < RETURN_HEADER_LEN {
                        self.flush_urgent()?;
                        if self.urgent.is_some() {
                            // Pacing the bulk socket (a setsockopt that may wait for the bulk
                            // sender's socket lock) only once the pages are out.
                            self.pacer.on_request();
                        }
                    }
                }
                ReturnMsg::Done { verified } => {
                    self.flush_urgent()?;
                    let v = match verified {
                        None => 0,
                        Some(false) => 1,
                        Some(true) => 2,
                    };
                    self.finish.verified.store(v, Release);
                    self.finish.done.store(true, Release);
                    return Ok(());
                }
                ReturnMsg::Pong => {}
                ReturnMsg::Bitmap { .. } => {
                    return Err(crate::protocol::ProtocolError::UnexpectedRecord {
                        record: "received bitmap",
                        phase: "postcopy (bitmaps only follow a resume handshake)",
                    }
                    .into())
                }
                ReturnMsg::Error { len } => {
                    let mut msg = vec![0; len as usize];
                    self.reader.read_exact(&mut msg)?;
                    return Err(MigrateError::Remote(
                        String::from_utf8_lossy(&msg).into_owned(),
                    ));
                }
            }
        }
    }

    fn request(&mut self, region: u16, offset: u64, len: u32) -> Result<(), MigrateError> {
        let reg = &self.memory.regions()[region as usize];
        let page = reg.host_page_size();
        let first = offset as usize / page;
        let n = len as usize / page;
        self.hint[region as usize].store(first + n, Release);
        let Some(urgent) = self.urgent.as_mut() else {
            self.requests.push(region, first, n);
            self.scanner_waker.wake();
            return Ok(());
        };
        let accepted = self.bulk_stats.bytes.load(Relaxed);
        self.server.serve(
            urgent,
            &self.claims,
            reg,
            first..first + n,
            accepted,
            &self.progress.counters,
        )
    }

    /// Submits queued urgent pages and waits until the kernel has taken them (normally inline
    /// in the submit call), so nothing sits in the ring while this thread blocks on a read.
    fn flush_urgent(&mut self) -> Result<(), MigrateError> {
        if let Some(u) = self.urgent.as_mut() {
            u.flush()?;
            u.drain(Some(self.server.timeout))?;
        }
        Ok(())
    }
}
