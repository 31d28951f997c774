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

/// Restricts the calling thread to `cpus` (e.g. keep the bulk stream's threads off the cores
/// that serve page requests). Returns false if the kernel refused (bad CPU list).
pub fn pin_current_thread(cpus: &[usize]) -> bool {
    if cpus.is_empty() {
        return false;
    }
    // SAFETY: cpu_set_t is a plain bitmask for which all-zero is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: `c` is below CPU_SETSIZE, so CPU_SET stays inside `set`.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: sched_setaffinity(0, ..) affects only the calling thread; `set` is initialised
    // and its size is passed.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// The CPUs the calling thread may run on (empty if the kernel would not say).
pub fn current_affinity() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it; pid 0 is the calling thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Where the threads of one side of a migration run.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// CPUs for the bulk threads (source scanner, destination bulk receiver); empty: anywhere.
    pub bulk_cpus: Vec<usize>,
    /// CPUs for the urgent-path threads (return path, fault thread, urgent receiver).
    pub urgent_cpus: Vec<usize>,
    /// `SCHED_FIFO` priority of the urgent-path threads (nice -10 where not permitted).
    pub urgent_priority: Option<i32>,
    /// Where a thread whose list above is empty runs: the CPUs of the thread that started the
    /// migration. (A new thread inherits its creator's pinning, and urgent-path threads are
    /// started by bulk threads: without this they would share the bulk CPUs.) Empty: wherever
    /// the thread starts.
    pub home_cpus: Vec<usize>,
}

impl Placement {
    /// This placement, with threads that have no CPU list of their own kept on the calling
    /// thread's CPUs.
    pub fn from_here(mut self) -> Self {
        self.home_cpus = current_affinity();
        self
    }

    /// Restricts the calling thread to `cpus`, or to the home CPUs if that list is empty.
    fn pin(&self, cpus: &[usize], what: &str) {
        let cpus = if cpus.is_empty() {
            &self.home_cpus
        } else {
            cpus
        };
        if !cpus.is_empty() && !pin_current_thread(cpus) {
            tracing::warn!(?cpus, what, "could not pin thread");
        }
    }

    /// Applies the urgent-path placement to the calling thread.
    pub fn enter_urgent(&self, what: &str) {
        self.pin(&self.urgent_cpus, what);
        if let Some(p) = self.urgent_priority {
            // Boost first, log second: tracing does not evaluate a disabled event's fields.
            let boost = boost_current_thread(p);
            tracing::debug!(?boost, what, "urgent-path thread");
        }
    }

    /// Applies the bulk placement to the calling thread.
    pub fn enter_bulk(&self, what: &str) {
        self.pin(&self.bulk_cpus, what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process may make a thread `SCHED_FIFO` (root without `CAP_SYS_NICE`, or a
    /// user with `RLIMIT_RTPRIO`, differ from what the uid suggests): asked of the kernel
    /// directly, on a throwaway thread.
    fn realtime_permitted() -> bool {
        std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: changes only this throwaway thread's policy; `param` outlives the call.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
        })
        .join()
        .unwrap()
    }

    #[test]
    fn boost_applies_real_time_when_permitted() {
        let (boost, policy) = std::thread::spawn(|| {
            let b = boost_current_thread(10);
            // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
            (b, unsafe { libc::sched_getscheduler(0) })
        })
        .join()
        .unwrap();
        if realtime_permitted() {
            assert_eq!(boost, Boost::Realtime(10));
            assert_eq!(policy, libc::SCHED_FIFO);
        } else {
            assert_ne!(boost, Boost::Realtime(10));
            assert_ne!(policy, libc::SCHED_FIFO);
        }
    }

    #[test]
    fn enter_urgent_boosts_even_with_logging_off() {
        // No tracing subscriber is installed in unit tests, so debug events are disabled: the
        // boost must not live inside one (it once did, and never ran outside debug logging).
        let placement = Placement {
            urgent_priority: Some(10),
            ..Placement::default()
        };
        let policy = std::thread::spawn(move || {
            placement.enter_urgent("test");
            // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        if realtime_permitted() {
            assert_eq!(policy, libc::SCHED_FIFO);
        } else {
            eprintln!("skipping the SCHED_FIFO check: this process may not use real-time");
            assert_ne!(policy, libc::SCHED_FIFO);
        }
    }

    #[test]
    fn pinning_keeps_a_thread_on_its_cpu() {
        let first = current_affinity()[0];
        let cpus = std::thread::spawn(move || {
            assert!(pin_current_thread(&[first]));
            // SAFETY: sched_getcpu has no preconditions.
            (0..100)
                .map(|_| unsafe { libc::sched_getcpu() } as usize)
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        assert!(cpus.iter().all(|&c| c == first), "{cpus:?}");
        assert!(!pin_current_thread(&[]), "an empty set is refused");
    }

    /// An urgent-path thread started by a bulk-pinned thread does not stay on the bulk CPUs
    /// when it has no CPU list of its own: it goes back to the migration's home CPUs.
    #[test]
    fn urgent_threads_do_not_inherit_the_bulk_pinning() {
        let home = current_affinity();
        if home.len() < 2 {
            eprintln!("skipped: needs 2 allowed CPUs, this process has {home:?}");
            return;
        }
        let placement = Placement {
            bulk_cpus: vec![home[0]],
            ..Placement::default()
        }
        .from_here();
        let urgent = std::thread::spawn(move || {
            placement.enter_bulk("bulk");
            std::thread::spawn(move || {
                placement.enter_urgent("urgent");
                current_affinity()
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(urgent, home);
    }
}
