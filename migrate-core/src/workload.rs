//! A synthetic guest for tests, the demo and benchmarks: vCPU threads that write
//! self-describing pages on the source during precopy and touch (read and write) pages on the
//! destination after switchover, which is what drives page requests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::bitmap::AtomicBitmap;
use crate::memory::{GuestMemory, GuestRegion, PAGE_SIZE};
use crate::verify::PreWriteDigests;

/// How vCPUs pick pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Random,
    Sequential,
}

impl std::str::FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Access::Random),
            "sequential" | "seq" => Ok(Access::Sequential),
            o => Err(format!(
                "unknown access pattern {o:?} (expected random or sequential)"
            )),
        }
    }
}

/// Writes the 4 KiB chunk `chunk` of host page `hp` with content derived from (page, generation).
fn write_chunk(region: &GuestRegion, hp: usize, chunk: usize, generation: u64) {
    let page = region.host_page_size();
    let mut buf = [0u64; PAGE_SIZE / 8];
    let mut x = (hp as u64) << 20
        ^ (chunk as u64) << 8
        ^ generation.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ region.id() as u64;
    for w in buf.iter_mut() {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        *w = z ^ (z >> 31);
    }
    buf[0] = hp as u64;
    buf[1] = generation;
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_le_bytes()).collect();
    let offset = hp * page + (chunk * PAGE_SIZE) % page;
    // In range by construction: hp < host_pages, chunk offset < host page size.
    let _ = region.write_from(offset, &bytes);
}

/// Fills guest memory with initial content: every `zero_every`-th host page stays zero (to
/// exercise zero records), the others get generation-0 content in each 4 KiB chunk.
pub fn fill_initial(memory: &GuestMemory, zero_every: usize) {
    for region in memory.regions() {
        let chunks = region.host_page_size() / PAGE_SIZE;
        for hp in 0..region.host_pages() {
            if zero_every != 0 && hp % zero_every == zero_every - 1 {
                continue;
            }
            for c in 0..chunks {
                write_chunk(region, hp, c, 0);
            }
        }
    }
}

fn pick(rng: &mut SmallRng, access: Access, cursor: &mut usize, lo: usize, hi: usize) -> usize {
    match access {
        Access::Random => rng.gen_range(0..hi.max(1)),
        Access::Sequential => {
            let p = *cursor;
            *cursor = if p + 1 >= hi { lo } else { p + 1 };
            p
        }
    }
}

/// Flattened (region, host page) index space over all regions.
#[derive(Clone)]
struct PageSpace {
    starts: Vec<usize>,
    total: usize,
}

impl PageSpace {
    fn new(memory: &GuestMemory) -> Self {
        let mut starts = Vec::new();
        let mut total = 0;
        for r in memory.regions() {
            starts.push(total);
            total += r.host_pages();
        }
        Self { starts, total }
    }

    fn locate(&self, i: usize) -> (usize, usize) {
        let r = self.starts.partition_point(|&s| s <= i) - 1;
        (r, i - self.starts[r])
    }
}

/// Source-side guest: vCPU threads dirtying pages at a set rate until stopped.
pub struct SourceWorkload {
    memory: Arc<GuestMemory>,
    vcpus: usize,
    access: Access,
    rate: u64,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub writes: Arc<AtomicU64>,
}

impl SourceWorkload {
    /// `rate` is host-page writes per second over all vCPUs (0: no writes).
    pub fn start(memory: Arc<GuestMemory>, vcpus: usize, access: Access, rate: u64) -> Self {
        let mut w = Self {
            memory,
            vcpus: vcpus.max(1),
            access,
            rate,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            writes: Arc::new(AtomicU64::new(0)),
        };
        w.spawn_vcpus();
        w
    }

    /// Runs the vCPUs again after [`pause`](Self::pause) (a migration that gave up before
    /// the destination could run the guest).
    pub fn resume(&mut self) {
        if self.threads.is_empty() {
            self.stop.store(false, SeqCst);
            self.spawn_vcpus();
        }
    }

    fn spawn_vcpus(&mut self) {
        if self.rate == 0 {
            return;
        }
        let space = PageSpace::new(&self.memory);
        let (vcpus, access) = (self.vcpus, self.access);
        self.threads = (0..vcpus)
            .map(|v| {
                let (memory, stop, writes, space) = (
                    self.memory.clone(),
                    self.stop.clone(),
                    self.writes.clone(),
                    space.clone(),
                );
                let per_vcpu = (self.rate as f64 / vcpus as f64).max(1.0);
                std::thread::Builder::new()
                    .name(format!("src-vcpu{v}"))
                    .spawn(move || {
                        let mut rng = SmallRng::seed_from_u64(v as u64 + 1);
                        let (lo, hi) = (space.total * v / vcpus, space.total * (v + 1) / vcpus);
                        let mut cursor = lo;
                        let start = Instant::now();
                        let mut done = 0u64;
                        while !stop.load(Relaxed) {
                            let i = pick(
                                &mut rng,
                                access,
                                &mut cursor,
                                lo,
                                hi.max(lo + 1).min(space.total),
                            );
                            let (r, hp) = space.locate(i.min(space.total - 1));
                            let region = &memory.regions()[r];
                            let generation = 1 + writes.fetch_add(1, Relaxed);
                            write_chunk(
                                region,
                                hp,
                                rng.gen_range(0..region.host_page_size() / PAGE_SIZE),
                                generation,
                            );
                            done += 1;
                            let due = Duration::from_secs_f64(done as f64 / per_vcpu);
                            let elapsed = start.elapsed();
                            if due > elapsed {
                                std::thread::sleep((due - elapsed).min(Duration::from_millis(20)));
                            }
                        }
                    })
                    .expect("spawn source vCPU thread")
            })
            .collect();
    }

    /// Stops every vCPU (the guest is paused); returns how many writes were made.
    pub fn pause(&mut self) -> u64 {
        self.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.writes.load(SeqCst)
    }
}

/// The synthetic guest as the source's VMM: pausing stops its vCPUs, resuming restarts them.
impl crate::source::SourceControl for SourceWorkload {
    fn pause(&mut self) -> Result<(), String> {
        SourceWorkload::pause(self);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), String> {
        SourceWorkload::resume(self);
        Ok(())
    }
}

impl Drop for SourceWorkload {
    fn drop(&mut self) {
        self.pause();
    }
}

/// Per host page digests taken by the destination guest right before its first write.
pub struct PreWriteLog {
    digests: Vec<Vec<AtomicU64>>,
    recorded: Vec<AtomicBitmap>,
}

impl PreWriteLog {
    pub fn new(memory: &GuestMemory) -> Self {
        Self {
            digests: memory
                .regions()
                .iter()
                .map(|r| (0..r.host_pages()).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            recorded: memory
                .regions()
                .iter()
                .map(|r| AtomicBitmap::new(r.host_pages()))
                .collect(),
        }
    }
}

impl PreWriteDigests for PreWriteLog {
    fn pre_write_digest(&self, region: u16, hp: usize) -> Option<u64> {
        let r = region as usize;
        (self.recorded.get(r)?.test(hp)).then(|| self.digests[r][hp].load(SeqCst))
    }
}

/// Destination-side guest: vCPU threads that read pages and write the pages they own, after
/// the migration lets the guest run.
pub struct DestWorkload {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub touches: Arc<AtomicU64>,
    pub writes: Arc<AtomicU64>,
    log: Arc<PreWriteLog>,
}

impl DestWorkload {
    /// Starts `vcpus` threads (pre-write digests go to `log`, which verification reads); each touches up to `max_touches` pages (0: until stopped), pausing
    /// `think` between touches. vCPU `v` writes only host pages with `index % vcpus == v`, and
    /// records the page's digest just before its first write to it.
    pub fn start(
        memory: Arc<GuestMemory>,
        log: Arc<PreWriteLog>,
        vcpus: usize,
        access: Access,
        think: Duration,
        max_touches: u64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let touches = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let space = PageSpace::new(&memory);
        let vcpus = vcpus.max(1);
        let threads = (0..vcpus)
            .map(|v| {
                let (memory, stop, touches, writes, log, space) = (
                    memory.clone(),
                    stop.clone(),
                    touches.clone(),
                    writes.clone(),
                    log.clone(),
                    space.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("dst-vcpu{v}"))
                    .spawn(move || {
                        let mut rng = SmallRng::seed_from_u64(0x5eed + v as u64);
                        let (lo, hi) = (
                            space.total * v / vcpus,
                            (space.total * (v + 1) / vcpus).max(1),
                        );
                        let mut cursor = lo;
                        let mut n = 0u64;
                        while !stop.load(Relaxed) && (max_touches == 0 || n < max_touches) {
                            let i = match access {
                                Access::Random => rng.gen_range(0..space.total),
                                Access::Sequential => pick(&mut rng, access, &mut cursor, lo, hi),
                            };
                            let (r, hp) = space.locate(i);
                            let region = &memory.regions()[r];
                            let page = region.host_page_size();
                            let mut word = [0u8; 8];
                            // Reading faults the page in if it is still on the source.
                            let _ = region
                                .read_into(hp * page + rng.gen_range(0..page / 8) * 8, &mut word);
                            touches.fetch_add(1, Relaxed);
                            if i % vcpus == v && rng.gen_range(0..4) == 0 {
                                if !log.recorded[r].test(hp) {
                                    log.digests[r][hp]
                                        .store(region.digest(hp * page, page), SeqCst);
                                    log.recorded[r].set(hp);
                                }
                                let _ = region
                                    .write_from(hp * page + page - 8, &(n | 1 << 63).to_le_bytes());
                                writes.fetch_add(1, Relaxed);
                            }
                            n += 1;
                            if !think.is_zero() {
                                std::thread::sleep(think);
                            }
                        }
                    })
                    .expect("spawn destination vCPU thread")
            })
            .collect();
        Self {
            stop,
            threads,
            touches,
            writes,
            log,
        }
    }

    /// The log of pre-write digests, for [`crate::verify::verify`].
    pub fn pre_write_log(&self) -> Arc<PreWriteLog> {
        self.log.clone()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Waits until every vCPU has made its `max_touches`.
    pub fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DestWorkload {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_space_locates() {
        let s = PageSpace {
            starts: vec![0, 10, 12],
            total: 20,
        };
        assert_eq!(s.locate(0), (0, 0));
        assert_eq!(s.locate(9), (0, 9));
        assert_eq!(s.locate(10), (1, 0));
        assert_eq!(s.locate(19), (2, 7));
    }
}
