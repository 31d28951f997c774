//! Blocking, buffered frame receiver.
//!
//! The receiver deliberately uses plain blocking `read(2)`/`readv(2)` instead of io_uring: a
//! thread blocked in `read` is woken directly by the softirq that queues the data, and the bytes are copied in
//! the same syscall. An io_uring `RECV` would add a hop (poll wakeup → task work → CQE → waiting
//! thread wakes up → reap), which costs latency on the urgent path and buys nothing when each
//! connection already has a dedicated receiver thread.

use std::os::fd::AsRawFd;

use crate::error::NetError;
use crate::socket::Stream;

/// Reads frames from one stream through an internal buffer; large payloads bypass the buffer.
#[derive(Debug)]
pub struct FrameReader {
    stream: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Most bytes one buffered read takes from the socket.
    fill_limit: usize,
}

/// Smallest internal buffer we accept (headers must fit).
const MIN_BUF: usize = 4096;

/// Payload remainders at least this large are read straight into the caller's memory rather
/// than copied out of the buffer (one copy instead of two; the syscall costs less than copying
/// 16 KiB twice).
const DIRECT_MIN: usize = 16 << 10;

/// How much of what follows a direct read may land in the buffer in the same syscall: enough
/// for the next headers, little enough that the next large payload mostly goes direct too.
const LOOKAHEAD: usize = 4 << 10;

impl FrameReader {
    /// A reader with an internal buffer of `buf_size` bytes (at least 4 KiB; 256 KiB is a good
    /// default for bulk streams).
    pub fn new(stream: Stream, buf_size: usize) -> Self {
        let buf = vec![0u8; buf_size.max(MIN_BUF)].into_boxed_slice();
        FrameReader {
            stream,
            fill_limit: buf.len(),
            buf,
            start: 0,
            end: 0,
        }
    }

    /// Caps how much one buffered read takes (at least 4 KiB). On a latency channel a small
    /// cap lets the first frame be handled before the bytes queued behind it are copied.
    pub fn set_fill_limit(&mut self, bytes: usize) {
        self.fill_limit = bytes.clamp(MIN_BUF, self.buf.len());
    }

    /// The underlying stream (e.g. to shut it down or set a read timeout).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Bytes currently buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Read exactly `N` header bytes. `Ok(None)` on a clean EOF at a frame boundary (nothing
    /// buffered); `PeerClosed { mid_frame: true }` if the stream ends inside the header.
    pub fn read_header<const N: usize>(&mut self) -> Result<Option<[u8; N]>, NetError> {
        if N > self.buf.len() {
            return Err(NetError::InvalidArgument(format!(
                "header of {N} bytes exceeds the {}-byte receive buffer",
                self.buf.len()
            )));
        }
        while self.buffered() < N {
            let at_boundary = self.buffered() == 0;
            if self.fill()? == 0 {
                return if at_boundary {
                    Ok(None)
                } else {
                    Err(NetError::PeerClosed { mid_frame: true })
                };
            }
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.start..self.start + N]);
        self.consume(N);
        Ok(Some(out))
    }

    /// Fill `out` exactly: buffered bytes first, then large remainders are read straight into
    /// `out` (no double copy). EOF → `PeerClosed { mid_frame: true }`.
    pub fn read_exact(&mut self, out: &mut [u8]) -> Result<(), NetError> {
        // SAFETY: `out` is a live exclusive slice, valid for writes of `out.len()` bytes for the
        // whole call.
        unsafe { self.read_exact_raw(out.as_mut_ptr(), out.len()) }
    }

    /// Like [`read_exact`](Self::read_exact), into raw memory (e.g. guest RAM that other threads
    /// may access concurrently; no Rust reference is formed over it).
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be valid for writes for the duration of the call.
    pub unsafe fn read_exact_raw(&mut self, ptr: *mut u8, len: usize) -> Result<(), NetError> {
        let from_buf = self.buffered().min(len);
        if from_buf > 0 {
            // SAFETY: the source is inside our buffer (`start..start+from_buf` is initialised
            // and buffered); the caller guarantees the destination is writable for `len >=
            // from_buf` bytes; our private buffer cannot overlap caller memory.
            unsafe {
                std::ptr::copy_nonoverlapping(self.buf.as_ptr().add(self.start), ptr, from_buf)
            };
            self.consume(from_buf);
        }
        let mut done = from_buf;
        while done < len {
            let rest = len - done;
            if rest >= DIRECT_MIN {
                // Large remainder: read straight into the destination, and let the same
                // syscall put up to `LOOKAHEAD` bytes of what follows (the next header) into our
                // buffer, so a stream of large records costs about one syscall and one copy each.
                // SAFETY: `ptr + done .. ptr + len` is within the caller's writable range.
                let n = unsafe { self.read_direct(ptr.add(done), rest) }?;
                if n == 0 {
                    return Err(NetError::PeerClosed { mid_frame: true });
                }
                done += n;
            } else {
                if self.fill()? == 0 {
                    return Err(NetError::PeerClosed { mid_frame: true });
                }
                let n = self.buffered().min(rest);
                // SAFETY: as above: source is buffered data, destination is inside the caller's
                // writable range (`done + n <= len`).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.buf.as_ptr().add(self.start),
                        ptr.add(done),
                        n,
                    )
                };
                self.consume(n);
                done += n;
            }
        }
        Ok(())
    }

    /// One `readv` of up to `len` bytes into `ptr`, and of at most `LOOKAHEAD` bytes beyond that
    /// into the (empty) buffer. Returns how many bytes went to `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be valid for writes.
    unsafe fn read_direct(&mut self, ptr: *mut u8, len: usize) -> Result<usize, NetError> {
        debug_assert_eq!(
            self.buffered(),
            0,
            "direct reads start with an empty buffer"
        );
        self.start = 0;
        self.end = 0;
        let tail = LOOKAHEAD.min(self.buf.len());
        let iov = [
            libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            libc::iovec {
                iov_base: self.buf.as_mut_ptr().cast(),
                iov_len: tail,
            },
        ];
        // SAFETY: the first iovec is the caller's writable range, the second lies inside our
        // buffer (held exclusively via `&mut self`, `tail <= buf.len()`).
        let n = unsafe { readv_fd(&self.stream, &iov) }?;
        if n > len {
            self.end = n - len;
        }
        Ok(n.min(len))
    }

    /// Discard exactly `n` bytes. EOF → `PeerClosed { mid_frame: true }`.
    pub fn skip(&mut self, n: usize) -> Result<(), NetError> {
        let mut left = n;
        loop {
            let k = self.buffered().min(left);
            self.consume(k);
            left -= k;
            if left == 0 {
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(NetError::PeerClosed { mid_frame: true });
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// One `read` into the free tail of the buffer (compacting first if needed). Returns the
    /// number of bytes read; 0 means EOF.
    fn fill(&mut self) -> Result<usize, NetError> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let free = (self.buf.len() - self.end).min(self.fill_limit);
        // SAFETY: `end + free <= buf.len()`, so the destination range is inside our buffer,
        // which we hold exclusively via `&mut self`.
        let n = unsafe { read_fd(&self.stream, self.buf.as_mut_ptr().add(self.end), free) }?;
        self.end += n;
        Ok(n)
    }
}

/// One `readv(2)`, retrying on `EINTR`. Errors are mapped to typed [`NetError`]s
/// (`SO_RCVTIMEO` expiry → `Timeout`, `ECONNRESET` → `Reset`).
///
/// # Safety
///
/// Every iovec must describe memory valid for writes.
unsafe fn readv_fd(stream: &Stream, iov: &[libc::iovec]) -> Result<usize, NetError> {
    loop {
        // SAFETY: the caller guarantees each iovec is writable; the fd is owned by `stream`,
        // which outlives the call; callers pass one or two iovecs, far below IOV_MAX.
        let r = unsafe { libc::readv(stream.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return Err(NetError::from_io(err, true));
    }
}

/// One read of up to `len` bytes into `ptr` (see [`readv_fd`]).
///
/// # Safety
///
/// `ptr..ptr + len` must be valid for writes.
unsafe fn read_fd(stream: &Stream, ptr: *mut u8, len: usize) -> Result<usize, NetError> {
    let iov = [libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }];
    // SAFETY: the caller guarantees `ptr..ptr+len` is writable.
    unsafe { readv_fd(stream, &iov) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn pair() -> (Stream, Stream) {
        Stream::unix_pair().unwrap()
    }

    #[test]
    fn headers_payloads_and_clean_eof() {
        let (a, b) = pair();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            for i in 0u32..50 {
                let len = (i as usize * 977) % 20_000;
                a.write_all(&i.to_le_bytes()).unwrap();
                a.write_all(&(len as u32).to_le_bytes()).unwrap();
                let body: Vec<u8> = (0..len).map(|k| (k as u32 ^ i) as u8).collect();
                a.write_all(&body).unwrap();
            }
        });
        let mut r = FrameReader::new(b, 4096);
        for i in 0u32..50 {
            let h: [u8; 8] = r.read_header().unwrap().unwrap();
            assert_eq!(u32::from_le_bytes(h[..4].try_into().unwrap()), i);
            let len = u32::from_le_bytes(h[4..].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            if i % 3 == 0 {
                r.skip(len).unwrap();
                continue;
            }
            r.read_exact(&mut body).unwrap();
            for (k, &v) in body.iter().enumerate() {
                assert_eq!(v, (k as u32 ^ i) as u8, "frame {i} byte {k}");
            }
        }
        writer.join().unwrap();
        assert!(r.read_header::<8>().unwrap().is_none());
    }

    #[test]
    fn eof_inside_header_or_payload_is_mid_frame() {
        let (mut a, b) = pair();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        let mut r = FrameReader::new(b, 4096);
        assert!(matches!(
            r.read_header::<8>(),
            Err(NetError::PeerClosed { mid_frame: true })
        ));

        let (mut a, b) = pair();
        a.write_all(&[9u8; 100]).unwrap();
        drop(a);
        let mut r = FrameReader::new(b, 4096);
        let mut out = vec![0u8; 200];
        assert!(matches!(
            r.read_exact(&mut out),
            Err(NetError::PeerClosed { mid_frame: true })
        ));

        let (mut a, b) = pair();
        a.write_all(&[9u8; 10]).unwrap();
        drop(a);
        let mut r = FrameReader::new(b, 4096);
        assert!(matches!(
            r.skip(11),
            Err(NetError::PeerClosed { mid_frame: true })
        ));
    }

    #[test]
    fn large_read_bypasses_buffer_and_raw_read_works() {
        let (a, b) = pair();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let w = std::thread::spawn(move || {
            let mut a = a;
            a.write_all(&data).unwrap();
        });
        let mut r = FrameReader::new(b, 8192);
        let mut first = [0u8; 10];
        r.read_exact(&mut first).unwrap();
        let mut rest = vec![0u8; expect.len() - 10];
        // SAFETY: `rest` is a live Vec, writable for its whole length during the call.
        unsafe { r.read_exact_raw(rest.as_mut_ptr(), rest.len()) }.unwrap();
        w.join().unwrap();
        assert_eq!(&first[..], &expect[..10]);
        assert!(rest == expect[10..]);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn large_records_read_direct_with_lookahead() {
        // Records of 16 KiB..80 KiB behind 16-byte headers, through a big buffer: payloads go
        // direct (with the next header picked up by the same readv) and must come out intact.
        let (a, b) = pair();
        let lens: Vec<usize> = (0..40).map(|i| (16 << 10) + i * 1601).collect();
        let lens2 = lens.clone();
        let w = std::thread::spawn(move || {
            let mut a = a;
            for (i, len) in lens2.iter().enumerate() {
                let mut frame = vec![0u8; 16];
                frame[..8].copy_from_slice(&(i as u64).to_le_bytes());
                frame[8..].copy_from_slice(&(*len as u64).to_le_bytes());
                frame.extend((0..*len).map(|k| (k * 7 + i) as u8));
                a.write_all(&frame).unwrap();
            }
        });
        let mut r = FrameReader::new(b, 256 << 10);
        // Headers are read 4 KiB at a time, so a payload ending with exactly `LOOKAHEAD` bytes
        // buffered can only come from a direct read that took the next bytes along.
        r.set_fill_limit(LOOKAHEAD);
        let mut looked_ahead = 0;
        for (i, len) in lens.iter().enumerate() {
            let h: [u8; 16] = r.read_header().unwrap().unwrap();
            assert_eq!(u64::from_le_bytes(h[..8].try_into().unwrap()), i as u64);
            assert_eq!(u64::from_le_bytes(h[8..].try_into().unwrap()), *len as u64);
            let mut body = vec![0u8; *len];
            r.read_exact(&mut body).unwrap();
            assert!(
                body.iter()
                    .enumerate()
                    .all(|(k, &v)| v == (k * 7 + i) as u8),
                "record {i} corrupted"
            );
            assert!(r.buffered() <= LOOKAHEAD, "{}", r.buffered());
            looked_ahead += usize::from(r.buffered() == LOOKAHEAD);
        }
        assert!(
            looked_ahead > 0,
            "no direct read ever took the next header along"
        );
        w.join().unwrap();
        assert!(r.read_header::<16>().unwrap().is_none());
    }

    #[test]
    fn fill_limit_caps_each_read() {
        let (mut a, b) = pair();
        a.write_all(&[7u8; 20_000]).unwrap();
        let mut r = FrameReader::new(b, 64 << 10);
        r.set_fill_limit(1); // clamped to 4 KiB
        let _: [u8; 8] = r.read_header().unwrap().unwrap();
        assert_eq!(r.buffered(), 4096 - 8, "one read of at most 4 KiB");
        let mut rest = vec![0u8; 20_000 - 8];
        r.read_exact(&mut rest).unwrap();
        assert!(rest.iter().all(|&v| v == 7));
    }

    #[test]
    fn read_timeout_is_typed() {
        let (_a, b) = pair();
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut r = FrameReader::new(b, 4096);
        assert!(matches!(r.read_header::<4>(), Err(NetError::Timeout)));
    }
}
