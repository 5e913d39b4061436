//! Draining: the records the kernel programs hand over, read from the ring buffer (or the
//! perf buffers) on epoll wake-ups and decoded into [`Record`]s for a [`RecordSink`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{
    MapData, RingBuf,
    perf::{PerfEvent, PerfEventArrayBuffer},
};
use bytes::{Bytes, BytesMut};
use collector_common::{FAMILY_V4, KIND_CLIENT, KIND_PREPARE_REPLY, KIND_TLS_PLAIN, RecordHeader};
use tokio::io::{Interest, unix::AsyncFd};

use super::CaptureError;

/// What a [`Record`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A piece of a client's TCP stream (ingress).
    Client,
    /// The first bytes of a server's reply to a COM_STMT_PREPARE (egress): `src`/`sport` are
    /// the server's. `awaiting`: PREPAREs of the connection unanswered when it left, this one
    /// included (1 = the latest).
    PrepareReply { awaiting: u8 },
    /// Plaintext of a TLS session's client, as the server's `SSL_read` returned it (the
    /// client's address the source); not a TCP segment: `seq` counts plaintext bytes.
    TlsPlain,
}

/// One captured piece of a client's TCP stream, or of a server's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    /// CLOCK_MONOTONIC nanoseconds when the kernel saw the segment.
    pub ts_ns: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP sequence number of `data[0]` (for [`RecordKind::TlsPlain`], its position in the
    /// connection's plaintext).
    pub seq: u32,
    pub tcp_flags: u8,
    /// Payload length of the whole segment this record came from.
    pub segment_len: u32,
    /// Where `data` starts within that segment's payload.
    pub offset: u32,
    pub ifindex: u32,
    pub data: Bytes,
}

impl Record {
    /// The client's address and port: the source of client data, the destination of a reply.
    pub fn client(&self) -> (IpAddr, u16) {
        match self.kind {
            RecordKind::Client | RecordKind::TlsPlain => (self.src, self.sport),
            RecordKind::PrepareReply { .. } => (self.dst, self.dport),
        }
    }

    pub fn is_client(&self) -> bool {
        self.kind == RecordKind::Client
    }
}

/// Where drained records go: the later pipeline stages implement this.
pub trait RecordSink {
    fn push(&mut self, record: Record);
    /// Called before each drain hands over its first record.
    fn begin(&mut self) {}
    /// Called after each drain (records or not): the drain's wake-ups are the sink's too.
    fn end(&mut self) {}
}

/// What the drain handed over. `malformed` (an item shorter than its header says) should
/// never move; `lost` is what the perf transport reports as dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainStats {
    pub records: u64,
    pub bytes: u64,
    pub malformed: u64,
    pub lost: u64,
}

/// [`DrainStats`] readable from other tasks (the status line); published after each drain.
#[derive(Debug, Default)]
pub struct SharedDrainStats {
    records: AtomicU64,
    bytes: AtomicU64,
    malformed: AtomicU64,
    lost: AtomicU64,
}

impl SharedDrainStats {
    fn publish(&self, s: &DrainStats) {
        self.records.store(s.records, Ordering::Relaxed);
        self.bytes.store(s.bytes, Ordering::Relaxed);
        self.malformed.store(s.malformed, Ordering::Relaxed);
        self.lost.store(s.lost, Ordering::Relaxed);
    }

    pub fn load(&self) -> DrainStats {
        DrainStats {
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// The record buffer as the loader hands it over.
pub(super) enum RawSource {
    Ring(RingBuf<MapData>),
    Perf(Vec<PerfEventArrayBuffer<MapData>>),
}

/// The record buffer registered with tokio: wakes on epoll, never sleep-polls.
enum Source {
    Ring(AsyncFd<RingBuf<MapData>>),
    Perf(Vec<AsyncFd<PerfEventArrayBuffer<MapData>>>),
}

/// Drains the record buffer into a [`RecordSink`].
pub struct Drain {
    source: Source,
    /// The kernel wakes the reader only once much of the ring is unread; below that, records
    /// wait for this timer (none with a zero cadence: the kernel then wakes on each record).
    cadence: Duration,
    /// Made on the first wait, inside the runtime.
    ticker: Option<tokio::time::Interval>,
    /// Arena the records' payloads are copied into; split off per record so that one
    /// allocation serves many records.
    arena: BytesMut,
    pub stats: DrainStats,
    shared: Arc<SharedDrainStats>,
    /// The last drain stopped at [`DRAIN_BATCH`] with records left: the next one does not
    /// wait (the kernel wakes the reader only when the unread bytes cross a threshold).
    more: bool,
}

/// Records one drain hands over at most before it yields to the runtime's other tasks (the
/// status line, signals, the publishers on a single-threaded runtime): a ring fed as fast as
/// it is read never empties.
const DRAIN_BATCH: usize = 4096;

const ARENA_CHUNK: usize = 1 << 20;

fn register<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>, CaptureError> {
    // SAFETY: the map (or perf buffer) owns its fd for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| CaptureError::Ring(e.into()))
}

impl Drain {
    pub(super) fn new(source: RawSource, cadence: Duration) -> Result<Self, CaptureError> {
        let source = match source {
            RawSource::Ring(ring) => Source::Ring(register(ring)?),
            RawSource::Perf(bufs) => {
                Source::Perf(bufs.into_iter().map(register).collect::<Result<_, _>>()?)
            }
        };
        Ok(Self {
            source,
            cadence,
            ticker: None,
            arena: BytesMut::with_capacity(ARENA_CHUNK),
            stats: DrainStats::default(),
            shared: Arc::default(),
            more: false,
        })
    }

    /// The drain's counters, for another task to read.
    pub fn shared_stats(&self) -> Arc<SharedDrainStats> {
        self.shared.clone()
    }

    /// Waits until the kernel wakes the reader or the timer ticks (not at all if the last
    /// drain left records), then hands what is in the buffer, [`DRAIN_BATCH`] records at
    /// most, to `sink`.
    pub async fn drain_once(&mut self, sink: &mut impl RecordSink) -> Result<usize, CaptureError> {
        if self.ticker.is_none() && !self.cadence.is_zero() {
            let mut t = tokio::time::interval(self.cadence);
            // A late drain takes everything: no burst of ticks to catch up.
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            self.ticker = Some(t);
        }
        let ticker = self.ticker.as_mut();
        if self.more {
            tokio::task::yield_now().await;
            return Ok(self.drain_batch(sink, DRAIN_BATCH));
        }
        match &self.source {
            Source::Ring(ring) => {
                tokio::select! {
                    guard = ring.readable() => {
                        // Cleared before draining: data arriving meanwhile wakes us again.
                        guard.map_err(CaptureError::Ring)?.clear_ready();
                    }
                    _ = tick(ticker) => {}
                }
            }
            Source::Perf(bufs) => {
                let ready = bufs.iter().map(|b| Box::pin(b.readable()));
                tokio::select! {
                    (guard, _, _) = futures_util::future::select_all(ready) => {
                        guard.map_err(CaptureError::Ring)?.clear_ready();
                    }
                    // The sink's batches leave on the drain's wake-ups.
                    _ = tick(ticker) => {}
                }
            }
        }
        Ok(self.drain_batch(sink, DRAIN_BATCH))
    }

    /// Hands over whatever is in the buffer now, without waiting, however much it is.
    pub fn drain_now(&mut self, sink: &mut impl RecordSink) -> usize {
        self.drain_batch(sink, usize::MAX)
    }

    /// Hands over what is in the buffer now, up to `limit` ring records (a perf buffer is
    /// read whole: each is bounded by its size).
    fn drain_batch(&mut self, sink: &mut impl RecordSink, limit: usize) -> usize {
        sink.begin();
        let n = match &mut self.source {
            Source::Ring(ring) => {
                let (n, more) = drain_ring(
                    ring.get_mut(),
                    &mut self.arena,
                    &mut self.stats,
                    sink,
                    limit,
                );
                self.more = more;
                n
            }
            Source::Perf(bufs) => bufs
                .iter_mut()
                .map(|b| drain_perf(b.get_mut(), &mut self.arena, &mut self.stats, sink))
                .sum(),
        };
        self.shared.publish(&self.stats);
        sink.end();
        n
    }

    /// Drains until `shutdown` completes, then once more for what arrived meanwhile.
    pub async fn run(
        &mut self,
        sink: &mut impl RecordSink,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), CaptureError> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                r = self.drain_once(sink) => { r?; }
                _ = &mut shutdown => break,
            }
        }
        self.drain_now(sink);
        Ok(())
    }
}

/// The timer's next tick; never, without one.
async fn tick(ticker: Option<&mut tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn deliver(
    item: &[u8],
    arena: &mut BytesMut,
    stats: &mut DrainStats,
    sink: &mut impl RecordSink,
) -> usize {
    match decode(item, arena) {
        Some(rec) => {
            stats.records += 1;
            stats.bytes += rec.data.len() as u64;
            sink.push(rec);
            1
        }
        None => {
            stats.malformed += 1;
            0
        }
    }
}

fn drain_ring(
    ring: &mut RingBuf<MapData>,
    arena: &mut BytesMut,
    stats: &mut DrainStats,
    sink: &mut impl RecordSink,
    limit: usize,
) -> (usize, bool) {
    let mut n = 0;
    for _ in 0..limit {
        let Some(item) = ring.next() else {
            return (n, false);
        };
        n += deliver(&item, arena, stats, sink);
    }
    (n, true)
}

fn drain_perf(
    buf: &mut PerfEventArrayBuffer<MapData>,
    arena: &mut BytesMut,
    stats: &mut DrainStats,
    sink: &mut impl RecordSink,
) -> usize {
    let mut n = 0;
    let mut joined = Vec::new();
    buf.for_each(|ev| match ev {
        PerfEvent::Sample { head, tail: [] } => {
            n += deliver(head, arena, stats, sink);
        }
        PerfEvent::Sample { head, tail } => {
            // A sample that wraps around the end of the buffer.
            joined.clear();
            joined.extend_from_slice(head);
            joined.extend_from_slice(tail);
            n += deliver(&joined, arena, stats, sink);
        }
        PerfEvent::Lost { count } => stats.lost += count,
    });
    n
}

/// Decodes one ring buffer item (header + payload) into a [`Record`].
pub fn decode(item: &[u8], arena: &mut BytesMut) -> Option<Record> {
    const H: usize = std::mem::size_of::<RecordHeader>();
    if item.len() < H {
        return None;
    }
    // SAFETY: RecordHeader is Pod, and `item` has at least H bytes.
    let hdr: RecordHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    let start = H + hdr.data_skip as usize;
    let payload = item.get(start..start + hdr.cap_len as usize)?;
    if arena.capacity() - arena.len() < payload.len() {
        *arena = BytesMut::with_capacity(ARENA_CHUNK.max(payload.len()));
    }
    arena.extend_from_slice(payload);
    let data = arena.split().freeze();
    let (src, dst) = if hdr.family == FAMILY_V4 {
        (v4(&hdr.saddr), v4(&hdr.daddr))
    } else {
        (
            IpAddr::V6(Ipv6Addr::from(hdr.saddr)),
            IpAddr::V6(Ipv6Addr::from(hdr.daddr)),
        )
    };
    let kind = match hdr.kind {
        KIND_CLIENT => RecordKind::Client,
        KIND_PREPARE_REPLY => RecordKind::PrepareReply {
            awaiting: hdr.awaiting,
        },
        KIND_TLS_PLAIN => RecordKind::TlsPlain,
        _ => return None,
    };
    Some(Record {
        kind,
        ts_ns: hdr.ts_ns,
        src,
        dst,
        sport: hdr.sport,
        dport: hdr.dport,
        seq: hdr.seq,
        tcp_flags: hdr.tcp_flags,
        segment_len: hdr.payload_len,
        offset: hdr.offset,
        ifindex: hdr.ifindex,
        data,
    })
}

fn v4(a: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
}
