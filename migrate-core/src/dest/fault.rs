//! The fault thread: reads userfaultfd events, maps each address to (region, host page), and
//! sends one request per missing host page on the return path itself (no hand-off).

use std::io::Write;
use std::sync::atomic::Ordering::*;
use std::sync::{Arc, Mutex};

use uring_net::Stream;

use super::state::DestShared;
use crate::error::MigrateError;
use crate::eventfd::EventFd;
use crate::protocol::ReturnMsg;
use crate::uffd::Event;

pub(crate) struct FaultThread {
    pub shared: Arc<DestShared>,
    /// The return path; `None` while the connection is broken (requests then stay pending and
    /// are re-sent on resume).
    pub ret: Arc<Mutex<Option<Stream>>>,
    pub stop: Arc<EventFd>,
}

impl FaultThread {
    pub fn run(self) {
        if let Err(e) = self.serve() {
            self.shared.fail(e);
        }
    }

    fn serve(&self) -> Result<(), MigrateError> {
        let shared = &self.shared;
        let uffd = shared
            .uffd
            .get()
            .ok_or_else(|| MigrateError::Internal("fault thread without userfaultfd".into()))?;
        let mut events = Vec::with_capacity(64);
        let mut staging = super::state::Staging::new();
        let mut out = Vec::with_capacity(64 * 16);
        loop {
            if !uffd.wait(Some(&self.stop), None)? {
                return Ok(());
            }
            events.clear();
            uffd.read_events(&mut events, 64)?;
            let now = shared.now_ns();
            out.clear();
            for ev in &events {
                let Event::PageFault { addr, .. } = *ev else {
                    tracing::debug!(event = ?ev, "ignoring userfaultfd event");
                    continue;
                };
                let Some((region, offset)) = shared.memory.find_addr(addr) else {
                    tracing::warn!(addr, "fault outside guest memory");
                    continue;
                };
                let r = region.id() as usize;
                let page = region.host_page_size();
                let hp = offset / page;
                let page_addr = region.base_addr() + hp * page;
                if shared.received[r].test(hp) {
                    // In place already, or received as zero during precopy and never
                    // populated: make it present here (EEXIST-safe) and wake the vCPU.
                    if shared.install_local(region, hp, &mut staging)? > 0 {
                        shared.counters.local_zero_faults.fetch_add(1, Relaxed);
                    } else {
                        // Already present: the placement's own wake may have missed us.
                        uffd.wake(page_addr, page)?;
                    }
                    continue;
                }
                if shared.pending[r][hp]
                    .compare_exchange(0, now, AcqRel, Acquire)
                    .is_err()
                {
                    shared.counters.duplicate_requests.fetch_add(1, Relaxed);
                    continue;
                }
                if shared.received[r].test(hp) {
                    // Placed between our two checks: the placer woke the vCPU already.
                    let _ = shared.pending[r][hp].compare_exchange(now, 0, AcqRel, Acquire);
                    uffd.wake(page_addr, page)?;
                    continue;
                }
                let req = ReturnMsg::Request {
                    region: r as u16,
                    offset: (hp * page) as u64,
                    len: page as u32,
                };
                out.extend_from_slice(&req.encode());
                shared.counters.requests.fetch_add(1, Relaxed);
            }
            if !out.is_empty() {
                let mut ret = self.ret.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(stream) = ret.as_ref() {
                    if let Err(e) = (&*stream).write_all(&out) {
                        // Pause, don't fail: the requests stay pending for the resume.
                        *ret = None;
                        shared
                            .link_failed(MigrateError::Net(uring_net::NetError::from_io(e, false)));
                    }
                }
            }
        }
    }
}
