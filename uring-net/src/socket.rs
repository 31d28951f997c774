//! Endpoints, streams, listeners and per-role socket options.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::NetError;

/// Where to listen or connect: `127.0.0.1:4444` or `unix:/path/to/socket`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| NetError::BadEndpoint {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty unix socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        addr.parse::<SocketAddr>()
            .map(Endpoint::Tcp)
            .map_err(|_| bad("expected IP:PORT, tcp:IP:PORT or unix:PATH"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected stream socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// Another handle to the same socket (`dup`).
    pub fn try_clone(&self) -> Result<Stream, NetError> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shut down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> Result<(), NetError> {
        let r = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
        match r {
            // Shutting down an already disconnected socket is not an error worth reporting.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
            r => Ok(r?),
        }
    }

    /// `SO_RCVTIMEO`; a blocked read then fails with [`NetError::Timeout`].
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), NetError> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout)?,
            Stream::Unix(s) => s.set_read_timeout(timeout)?,
        }
        Ok(())
    }

    /// `SO_SNDTIMEO` for blocking writes (does not affect io_uring sends).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), NetError> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout)?,
            Stream::Unix(s) => s.set_write_timeout(timeout)?,
        }
        Ok(())
    }

    /// `O_NONBLOCK`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), NetError> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nonblocking)?,
            Stream::Unix(s) => s.set_nonblocking(nonblocking)?,
        }
        Ok(())
    }

    /// True for TCP streams.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }

    /// The peer's endpoint (Unix peers without a bound path report an empty path).
    pub fn peer_endpoint(&self) -> Result<Endpoint, NetError> {
        Ok(match self {
            Stream::Tcp(s) => Endpoint::Tcp(s.peer_addr()?),
            Stream::Unix(s) => Endpoint::Unix(
                s.peer_addr()?
                    .as_pathname()
                    .map(PathBuf::from)
                    .unwrap_or_default(),
            ),
        })
    }

    /// A connected Unix socket pair (handy for tests and in-process links).
    pub fn unix_pair() -> Result<(Stream, Stream), NetError> {
        let (a, b) = UnixStream::pair()?;
        Ok((Stream::Unix(a), Stream::Unix(b)))
    }

    fn as_io_read(&self) -> &dyn ReadWriteRef {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
}

/// `Read`/`Write` through a shared reference (both std stream types support it).
trait ReadWriteRef {
    fn read_ref(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn read_vectored_ref(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize>;
    fn write_ref(&self, buf: &[u8]) -> io::Result<usize>;
    fn write_vectored_ref(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    fn flush_ref(&self) -> io::Result<()>;
}

macro_rules! rw_ref {
    ($t:ty) => {
        impl ReadWriteRef for $t {
            fn read_ref(&self, buf: &mut [u8]) -> io::Result<usize> {
                let mut s: &$t = self;
                s.read(buf)
            }
            fn read_vectored_ref(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
                let mut s: &$t = self;
                s.read_vectored(bufs)
            }
            fn write_ref(&self, buf: &[u8]) -> io::Result<usize> {
                let mut s: &$t = self;
                s.write(buf)
            }
            fn write_vectored_ref(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                let mut s: &$t = self;
                s.write_vectored(bufs)
            }
            fn flush_ref(&self) -> io::Result<()> {
                let mut s: &$t = self;
                s.flush()
            }
        }
    };
}
rw_ref!(TcpStream);
rw_ref!(UnixStream);

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.as_io_read().read_ref(buf)
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.as_io_read().read_vectored_ref(bufs)
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.as_io_read().write_ref(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.as_io_read().write_vectored_ref(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.as_io_read().flush_ref()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

/// A listening socket.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind and listen. For Unix endpoints a stale socket file at the path is removed first
    /// (only if it is a socket); the file is removed again when the listener is dropped.
    pub fn bind(ep: &Endpoint) -> Result<Self, NetError> {
        let inner = match ep {
            Endpoint::Tcp(addr) => ListenerInner::Tcp(TcpListener::bind(addr)?),
            Endpoint::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                ListenerInner::Unix(UnixListener::bind(path)?, path.clone())
            }
        };
        Ok(Listener { inner })
    }

    /// Accept one connection (blocking unless `set_nonblocking(true)`). The accepted stream is
    /// always in blocking mode.
    pub fn accept(&self) -> Result<Stream, NetError> {
        let s = match &self.inner {
            ListenerInner::Tcp(l) => Stream::Tcp(l.accept()?.0),
            ListenerInner::Unix(l, _) => Stream::Unix(l.accept()?.0),
        };
        s.set_nonblocking(false)?;
        Ok(s)
    }

    /// The bound endpoint (with the real port for `:0` binds).
    pub fn local_endpoint(&self) -> Result<Endpoint, NetError> {
        Ok(match &self.inner {
            ListenerInner::Tcp(l) => Endpoint::Tcp(l.local_addr()?),
            ListenerInner::Unix(_, p) => Endpoint::Unix(p.clone()),
        })
    }

    /// `O_NONBLOCK` on the listening socket.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), NetError> {
        match &self.inner {
            ListenerInner::Tcp(l) => l.set_nonblocking(nonblocking)?,
            ListenerInner::Unix(l, _) => l.set_nonblocking(nonblocking)?,
        }
        Ok(())
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match &self.inner {
            ListenerInner::Tcp(l) => l.as_raw_fd(),
            ListenerInner::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix(_, path) = &self.inner {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connect to `ep`. `timeout` bounds the TCP handshake (Unix connects complete or fail at once).
pub fn connect(ep: &Endpoint, timeout: Option<Duration>) -> Result<Stream, NetError> {
    Ok(match ep {
        Endpoint::Tcp(addr) => match timeout {
            Some(t) => Stream::Tcp(TcpStream::connect_timeout(addr, t).map_err(map_connect)?),
            None => Stream::Tcp(TcpStream::connect(addr).map_err(map_connect)?),
        },
        Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
    })
}

fn map_connect(e: io::Error) -> NetError {
    if e.kind() == io::ErrorKind::TimedOut {
        NetError::Timeout
    } else {
        NetError::Io(e)
    }
}

/// What a connection is used for; selects [`SocketOptions::for_role`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Background page stream: large buffers, throughput first.
    Bulk,
    /// Page-fault replies: latency first.
    Urgent,
    /// Destination → source requests: latency first, small messages.
    ReturnPath,
}

/// Socket options applied after connect/accept. `None` leaves the kernel default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// `TCP_NODELAY` (TCP only).
    pub nodelay: bool,
    /// `SO_PRIORITY` (0..=6 without `CAP_NET_ADMIN`).
    pub priority: Option<u32>,
    /// `IP_TOS` / `IPV6_TCLASS` (TCP only).
    pub tos: Option<u32>,
    /// `SO_SNDBUF` in bytes (the kernel doubles it for bookkeeping).
    pub send_buffer: Option<usize>,
    /// `SO_RCVBUF` in bytes.
    pub recv_buffer: Option<usize>,
    /// `TCP_NOTSENT_LOWAT` in bytes (TCP only).
    pub notsent_lowat: Option<u32>,
    /// `TCP_QUICKACK` (TCP only; the kernel may clear it again, so receivers re-arm it).
    pub quickack: bool,
}

/// `IPTOS_LOWDELAY`.
pub const TOS_LOWDELAY: u32 = 0x10;

impl SocketOptions {
    /// Defaults per role. Bulk: 4 MiB send buffer, 128 KiB `TCP_NOTSENT_LOWAT`. Urgent and
    /// return path: `TCP_NODELAY`, `SO_PRIORITY` 6, `IP_TOS` lowdelay, quickack.
    pub fn for_role(role: Role) -> Self {
        match role {
            Role::Bulk => SocketOptions {
                nodelay: false,
                priority: None,
                tos: None,
                send_buffer: Some(4 << 20),
                recv_buffer: None,
                notsent_lowat: Some(128 << 10),
                quickack: false,
            },
            Role::Urgent | Role::ReturnPath => SocketOptions {
                nodelay: true,
                priority: Some(6),
                tos: Some(TOS_LOWDELAY),
                send_buffer: None,
                recv_buffer: None,
                notsent_lowat: None,
                quickack: true,
            },
        }
    }

    /// Apply to `stream`. TCP-only options are skipped on Unix sockets.
    pub fn apply(&self, stream: &Stream) -> Result<(), NetError> {
        let fd = stream.as_raw_fd();
        if let Some(p) = self.priority {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PRIORITY, p as i32)?;
        }
        if let Some(b) = self.send_buffer {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, clamp_int(b))?;
        }
        if let Some(b) = self.recv_buffer {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, clamp_int(b))?;
        }
        if let Stream::Tcp(s) = stream {
            if self.nodelay {
                s.set_nodelay(true)?;
            }
            if let Some(tos) = self.tos {
                match s.local_addr()? {
                    SocketAddr::V4(_) => {
                        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_TOS, tos as i32)?
                    }
                    SocketAddr::V6(_) => {
                        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, tos as i32)?
                    }
                }
            }
            if let Some(l) = self.notsent_lowat {
                setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, l as i32)?;
            }
            if self.quickack {
                setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1)?;
            }
        }
        Ok(())
    }
}

fn clamp_int(v: usize) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// `setsockopt` for an `int` option.
pub fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live `i32` on the stack and we pass its exact size; `fd` is a socket
    // descriptor borrowed from a live `Stream` for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt` for an `int` option.
pub fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live stack variables; `len` holds the size of `value`.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut i32).cast(), &mut len) };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Caps the socket's sending rate (`SO_MAX_PACING_RATE`, bytes per second; TCP paces itself
/// even without the `fq` qdisc). `None` removes the cap.
pub fn set_pacing_rate(stream: &Stream, bytes_per_sec: Option<u64>) -> Result<(), NetError> {
    let value: u64 = bytes_per_sec.unwrap_or(u64::MAX);
    // SAFETY: `value` is a live u64 on the stack and we pass its exact size (the kernel accepts
    // a 64-bit rate); the fd belongs to `stream`, which outlives the call.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&value as *const u64).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(NetError::Io(io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parse_and_display() {
        let e: Endpoint = "127.0.0.1:4444".parse().unwrap();
        assert_eq!(e, Endpoint::Tcp("127.0.0.1:4444".parse().unwrap()));
        assert_eq!(e.to_string(), "127.0.0.1:4444");
        let e: Endpoint = "tcp:127.0.0.1:5".parse().unwrap();
        assert_eq!(e.to_string(), "127.0.0.1:5");
        let e: Endpoint = "unix:/tmp/x.sock".parse().unwrap();
        assert_eq!(e, Endpoint::Unix("/tmp/x.sock".into()));
        assert_eq!(e.to_string(), "unix:/tmp/x.sock");
        assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("localhost".parse::<Endpoint>().is_err());
        assert!("127.0.0.1".parse::<Endpoint>().is_err());
    }

    #[test]
    fn tcp_listen_connect_and_options() {
        let l = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
        let ep = l.local_endpoint().unwrap();
        let c = connect(&ep, Some(Duration::from_secs(2))).unwrap();
        let s = l.accept().unwrap();
        SocketOptions::for_role(Role::Urgent).apply(&c).unwrap();
        let fd = c.as_raw_fd();
        assert_eq!(
            getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PRIORITY).unwrap(),
            6
        );
        assert_eq!(
            getsockopt_int(fd, libc::IPPROTO_IP, libc::IP_TOS).unwrap(),
            0x10
        );
        assert_eq!(
            getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap(),
            1
        );
        SocketOptions::for_role(Role::Bulk).apply(&s).unwrap();
        let fd = s.as_raw_fd();
        // The kernel doubles SO_SNDBUF (and clamps it to wmem_max).
        assert!(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap() > 64 << 10);
        assert_eq!(
            getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT).unwrap(),
            128 << 10
        );
        (&c).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        (&s).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(c.is_tcp());
        assert!(matches!(s.peer_endpoint().unwrap(), Endpoint::Tcp(_)));
    }

    #[test]
    fn unix_listen_connect_skips_tcp_options() {
        let dir = std::env::temp_dir().join(format!("uring-net-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ep = Endpoint::Unix(dir.join("a.sock"));
        let l = Listener::bind(&ep).unwrap();
        // Re-binding over a stale socket file works once the first listener is gone.
        drop(l);
        let l = Listener::bind(&ep).unwrap();
        assert_eq!(l.local_endpoint().unwrap(), ep);
        let c = connect(&ep, None).unwrap();
        let s = l.accept().unwrap();
        SocketOptions::for_role(Role::Urgent).apply(&c).unwrap();
        SocketOptions::for_role(Role::Bulk).apply(&s).unwrap();
        let c2 = c.try_clone().unwrap();
        (&c2).write_all(b"x").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut b = [0u8; 2];
        assert_eq!((&s).read(&mut b).unwrap(), 1);
        // Nothing more to read: the read timeout fires.
        let e = (&s).read(&mut b).unwrap_err();
        assert!(matches!(NetError::from_io(e, false), NetError::Timeout));
        c.shutdown(Shutdown::Write).unwrap();
        drop(l);
        assert!(!dir.join("a.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pacing_rate_is_set_and_lifted() {
        let l = Listener::bind(&"127.0.0.1:0".parse().unwrap()).unwrap();
        let s = connect(&l.local_endpoint().unwrap(), None).unwrap();
        let read = |s: &Stream| {
            let mut v: u64 = 0;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: `v` and `len` are live locals of the sizes passed.
            let r = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MAX_PACING_RATE,
                    (&mut v as *mut u64).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        set_pacing_rate(&s, Some(123_456_789)).unwrap();
        assert_eq!(read(&s), 123_456_789);
        set_pacing_rate(&s, None).unwrap();
        assert_eq!(read(&s), u64::MAX);
    }
}
