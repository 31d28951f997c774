//! Scheduling of the urgent-path threads.
//!
//! On a busy host the bulk scanner and bulk receiver keep every core saturated; a page request
//! then waits for a time slice at each hop (fault thread, return-path thread, urgent receiver).
//! Those threads sleep almost all the time and run for microseconds, so giving them a real-time
//! priority costs the bulk stream nothing and takes the scheduler's delay off the urgent path.

/// How an urgent-path thread ended up scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boost {
    /// `SCHED_FIFO` at the given priority.
    Realtime(i32),
    /// Not permitted to use real time: raised niceness instead.
    Nice(i32),
    /// Neither was permitted; default scheduling.
    None,
}

/// Raises the calling thread's scheduling priority: `SCHED_FIFO` at `priority` (1..=99) if
/// permitted, otherwise nice -10, otherwise nothing. Never fails.
pub fn boost_current_thread(priority: i32) -> Boost {
    let param = libc::sched_param {
        sched_priority: priority.clamp(1, 99),
    };
    // SAFETY: sched_setscheduler(0, ..) changes only the calling thread; `param` is a valid,
    // initialised struct that outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return Boost::Realtime(param.sched_priority);
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on our own thread id; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10) } == 0 {
        return Boost::Nice(-10);
    }
    Boost::None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boost_never_fails() {
        let b = std::thread::spawn(|| boost_current_thread(10))
            .join()
            .unwrap();
        // As root this is real time; elsewhere a fallback, but always an answer.
        assert!(matches!(
            b,
            Boost::Realtime(10) | Boost::Nice(-10) | Boost::None
        ));
    }
}
