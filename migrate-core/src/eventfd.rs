//! A non-blocking, close-on-exec eventfd used to wake threads blocked in `poll()`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Owned eventfd (counter semantics). `notify` makes it readable until `drain`.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// Create a non-blocking, close-on-exec eventfd with a zero counter.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with no pointer arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd() and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Add one to the counter, making the fd readable. Never blocks; if the counter is
    /// saturated (EAGAIN) the fd is already readable, which is all a waker needs.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local u64 to an fd we own.
        let r = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!(error = %e, "eventfd notify failed");
            }
        }
    }

    /// Reset the counter to zero (non-blocking; a no-op if nothing was notified).
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live local u64 from an fd we own.
        let r = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!(error = %e, "eventfd drain failed");
            }
        }
    }

    /// True if the counter is non-zero (checked with a zero-timeout poll).
    pub fn is_notified(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & libc::POLLIN != 0
    }

    /// The raw fd, for poll sets. Stays owned by `self`.
    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_then_drain() {
        let e = EventFd::new().unwrap();
        assert!(!e.is_notified());
        e.drain(); // harmless when empty
        e.notify();
        e.notify();
        assert!(e.is_notified());
        e.drain();
        assert!(!e.is_notified());
    }

    #[test]
    fn wakes_another_thread() {
        let e = std::sync::Arc::new(EventFd::new().unwrap());
        let e2 = e.clone();
        let h = std::thread::spawn(move || {
            let mut p = libc::pollfd {
                fd: e2.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack.
            unsafe { libc::poll(&mut p, 1, 5000) }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        e.notify();
        assert_eq!(h.join().unwrap(), 1);
    }
}
