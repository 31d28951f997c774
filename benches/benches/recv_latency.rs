//! Receive path latency: a blocking `read` against an io_uring `RECV` (`submit_and_wait`) for
//! the reply to a page request, on loopback TCP.
//!
//! A server thread answers each 16-byte request with 16 + 4096 bytes. The client writes a
//! request and receives the reply either with blocking reads (what `uring_net::FrameReader`
//! does) or with one io_uring `RECV` (`MSG_WAITALL`) and `submit_and_wait(1)`. Prints p50/p99
//! of the round trip for each, interleaved in rounds so both see the same machine state.
//!
//! Run: `cargo bench -p migrate-benches --bench recv_latency` (`BENCH_ROUNDS`, default 10 ×
//! 2000 round trips per variant).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use migrate_benches::{env, quantile};

const REPLY: usize = 16 + 4096;

fn server(listener: TcpListener) {
    let (mut s, _) = listener.accept().expect("accept");
    s.set_nodelay(true).unwrap();
    let reply = vec![7u8; REPLY];
    let mut req = [0u8; 16];
    while s.read_exact(&mut req).is_ok() {
        if s.write_all(&reply).is_err() {
            break;
        }
    }
}

fn main() {
    let rounds = env("BENCH_ROUNDS", 10usize).max(1);
    let per_round = 2000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || server(listener));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut ring = IoUring::new(8).expect("io_uring");
    let mut buf = vec![0u8; REPLY];
    let (mut blocking, mut uring) = (Vec::new(), Vec::new());
    for round in 0..rounds * 2 {
        let use_uring = round % 2 == 1;
        for _ in 0..per_round {
            let t = Instant::now();
            s.write_all(&[1u8; 16]).unwrap();
            if use_uring {
                let recv =
                    opcode::Recv::new(types::Fd(s.as_raw_fd()), buf.as_mut_ptr(), REPLY as u32)
                        .flags(libc::MSG_WAITALL)
                        .build();
                // SAFETY: `buf` outlives the operation: we wait for its completion right here.
                unsafe { ring.submission().push(&recv).expect("SQ has room") };
                ring.submit_and_wait(1).expect("submit");
                let cqe = ring.completion().next().expect("a completion");
                assert_eq!(cqe.result(), REPLY as i32, "short or failed recv");
                uring.push(t.elapsed().as_secs_f64() * 1e6);
            } else {
                s.read_exact(&mut buf).unwrap();
                blocking.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    println!(
        "request (16 B) -> reply (16 B + 4 KiB) round trip on loopback, {} samples each",
        blocking.len()
    );
    println!("{:<28} {:>9} {:>9}", "receive", "p50 us", "p99 us");
    for (name, v) in [
        ("blocking read", &mut blocking),
        ("io_uring RECV + wait", &mut uring),
    ] {
        println!(
            "{:<28} {:>9.1} {:>9.1}",
            name,
            quantile(v, 0.5),
            quantile(v, 0.99)
        );
    }
}
