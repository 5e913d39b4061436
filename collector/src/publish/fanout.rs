//! The fan-out: units spread over the publishers' queues, batched per publisher.
//!
//! A session's units always go to the same publisher (a hash of client address and port), so
//! they stay in order on one channel. The fan-out runs on the drain's task and never waits: a
//! batch that would pass the queues' share of `--max_mem_mb` (or an explicit `--queue_size`)
//! is dropped, its units counted, and its sessions are ended before the next batch that gets
//! through.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

// Flow keys come from the network: a seeded hasher, but far cheaper per segment than SipHash.
use foldhash::HashSet;

use bytes::BytesMut;
use tokio::{sync::mpsc, time::Instant};

use super::Throttled;
use crate::{encode, memory::MemoryBudget, status::PipelineCounters};

/// A publisher's queue, fan-out side: unbounded in count (the memory budget bounds it) unless
/// `--queue_size` caps it.
pub struct LaneSender {
    tx: mpsc::UnboundedSender<Batch>,
    queued: Arc<AtomicU64>,
    cap: Option<u64>,
}

/// A publisher's queue, publisher side.
pub struct LaneReceiver {
    rx: mpsc::UnboundedReceiver<Batch>,
    queued: Arc<AtomicU64>,
}

/// A publisher's queue, holding at most `cap` batches if given.
pub fn lane(cap: Option<u64>) -> (LaneSender, LaneReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicU64::new(0));
    (
        LaneSender {
            tx,
            queued: queued.clone(),
            cap,
        },
        LaneReceiver { rx, queued },
    )
}

impl LaneSender {
    fn len(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues the batch, or gives it back: the queue is at its cap, or its publisher is gone
    /// (true).
    fn send(&self, batch: Batch) -> Result<(), (Batch, bool)> {
        if self.cap.is_some_and(|cap| self.len() >= cap) {
            return Err((batch, false));
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(batch).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            (e.0, true)
        })
    }
}

impl LaneReceiver {
    pub async fn recv(&mut self) -> Option<Batch> {
        let batch = self.rx.recv().await;
        if batch.is_some() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        batch
    }

    pub fn try_recv(&mut self) -> Result<Batch, mpsc::error::TryRecvError> {
        let batch = self.rx.try_recv()?;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        Ok(batch)
    }
}

/// One message being filled: `LOCAL_IP` then units.
#[derive(Debug)]
pub struct Batch {
    pub(super) buf: BytesMut,
    pub(super) units: u64,
    /// When the oldest unit went in: the batch leaves at the latest `max_wait` later.
    pub(super) opened: Instant,
    /// Bytes taken from the memory budget for it, given back once it is done with.
    pub(super) budgeted: u64,
    /// Sessions whose units in batches of this publisher just before this one were dropped:
    /// they end (COM_QUIT) before this batch.
    pub(super) lost: Vec<(Ipv4Addr, u16)>,
    /// When its first captured unit was captured (CLOCK_MONOTONIC ns; 0: only synthetic).
    pub(super) captured: u64,
    /// Written to the recording already (a batch published again is not recorded again).
    pub(super) recorded: bool,
    /// Made by a publisher (COM_QUITs for sessions that lost units), not captured.
    pub(super) synthetic: bool,
}

impl Batch {
    pub(super) fn new(local_ip: Ipv4Addr, capacity: usize, now: Instant) -> Self {
        let mut buf = BytesMut::with_capacity(capacity + encode::UNIT_OVERHEAD * 2);
        encode::put_message_header(&mut buf, local_ip);
        Self {
            buf,
            units: 0,
            opened: now,
            budgeted: 0,
            lost: Vec::new(),
            captured: 0,
            recorded: false,
            synthetic: false,
        }
    }

    /// The sessions of its units.
    pub(super) fn sessions(&self) -> impl Iterator<Item = (Ipv4Addr, u16)> + use<> {
        sessions_of(&self.buf)
    }

    pub fn units(&self) -> u64 {
        self.units
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The sessions of a message's units.
pub(super) fn sessions_of(message: &[u8]) -> impl Iterator<Item = (Ipv4Addr, u16)> + use<> {
    let units = encode::decode_message(message)
        .map(|m| m.units)
        .unwrap_or_default();
    units.into_iter().map(|u| (u.ip, u.port))
}

/// When a batch leaves: once it holds more than `segments` units or `bytes` bytes, or its
/// oldest unit has waited `max_wait`.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub segments: u64,
    pub bytes: usize,
    pub max_wait: Duration,
}

struct Lane {
    tx: LaneSender,
    open: Option<Batch>,
    /// Sessions of dropped batches, for the next batch that gets through.
    lost: HashSet<(Ipv4Addr, u16)>,
    /// Length of its last batch: the next one's buffer is sized from it, so that neither a
    /// full-size buffer is allocated for a few units nor a large batch regrown many times.
    last_len: usize,
}

/// Spreads units over the publishers' queues, batching per publisher.
pub struct Fanout {
    local_ip: Ipv4Addr,
    /// Capture time of the units being pushed (see [`Fanout::set_captured`]).
    captured: u64,
    lanes: Vec<Lane>,
    limits: BatchLimits,
    budget: Arc<MemoryBudget>,
    counters: Arc<PipelineCounters>,
    queue_full_log: Throttled,
    mem_log: Throttled,
}

/// The publisher that carries a session: the same for every unit of the session.
pub fn lane_of(ip: IpAddr, port: u16, lanes: usize) -> usize {
    use std::hash::BuildHasher as _;
    // A fixed seed: the choice must not change while the collector runs. foldhash, not
    // SipHash: this runs for every unit.
    let h = foldhash::fast::FixedState::with_seed(0x6d72_7465).hash_one((ip, port));
    (h % lanes as u64) as usize
}

impl Fanout {
    pub fn new(
        local_ip: Ipv4Addr,
        senders: Vec<LaneSender>,
        limits: BatchLimits,
        budget: Arc<MemoryBudget>,
        counters: Arc<PipelineCounters>,
    ) -> Self {
        Self {
            local_ip,
            captured: 0,
            lanes: senders
                .into_iter()
                .map(|tx| Lane {
                    tx,
                    open: None,
                    lost: HashSet::default(),
                    last_len: 0,
                })
                .collect(),
            limits,
            budget,
            counters,
            queue_full_log: Throttled::default(),
            mem_log: Throttled::default(),
        }
    }

    /// The capture time (CLOCK_MONOTONIC ns) of the segment whose units come next; 0 for
    /// synthetic units.
    pub fn set_captured(&mut self, ns: u64) {
        self.captured = ns;
    }

    /// Adds one unit to its session's batch; sends the batch if it is full.
    pub fn push(&mut self, ip: Ipv4Addr, port: u16, data: &[u8], now: Instant) {
        let lane = lane_of(IpAddr::V4(ip), port, self.lanes.len());
        let limits = self.limits;
        let local_ip = self.local_ip;
        let l = &mut self.lanes[lane];
        let capacity = (l.last_len + l.last_len / 4).clamp(4096, limits.bytes.clamp(4096, 1 << 20));
        let batch = l
            .open
            .get_or_insert_with(|| Batch::new(local_ip, capacity, now));
        encode::put_unit(&mut batch.buf, ip, port, data);
        batch.units += 1;
        if batch.captured == 0 {
            batch.captured = self.captured;
        }
        if batch.units > limits.segments || batch.buf.len() > limits.bytes {
            self.send(lane, now);
        }
    }

    /// When the oldest open batch must leave, if any is open.
    pub fn next_due(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|l| l.open.as_ref())
            .map(|b| b.opened + self.limits.max_wait)
            .min()
    }

    /// Sends every batch whose oldest unit will have waited `max_wait` at `at` (`now`, or
    /// the next drain's time).
    pub fn send_due(&mut self, at: Instant, now: Instant) {
        for lane in 0..self.lanes.len() {
            if self.lanes[lane]
                .open
                .as_ref()
                .is_some_and(|b| at >= b.opened + self.limits.max_wait)
            {
                self.send(lane, now);
            }
        }
    }

    /// Sends every open batch (at shutdown), and the news of sessions dropped since the
    /// last batch that got through.
    pub fn send_all(&mut self, now: Instant) {
        for lane in 0..self.lanes.len() {
            if self.lanes[lane].open.is_none() && !self.lanes[lane].lost.is_empty() {
                self.lanes[lane].open = Some(Batch::new(self.local_ip, 0, now));
            }
            self.send(lane, now);
        }
    }

    /// Batches waiting in the publishers' queues.
    pub fn waiting(&self) -> u64 {
        self.lanes.iter().map(|l| l.tx.len()).sum()
    }

    fn send(&mut self, lane: usize, now: Instant) {
        let Some(mut batch) = self.lanes[lane].open.take() else {
            return;
        };
        let units = batch.units;
        self.lanes[lane].last_len = batch.buf.len();
        PipelineCounters::add(&self.counters.batched_units, units);
        // A batch sent early (by time) holds a buffer sized for a full one: queued like
        // that, a stalled broker would pin ~32 KiB per few units. It is copied to its size.
        if batch.buf.capacity() > 2 * batch.buf.len() {
            batch.buf = BytesMut::from(&batch.buf[..]);
        }
        // What the allocator holds for it, not just its length.
        let size = batch.buf.capacity() as u64;
        batch.budgeted = size;
        if !self.budget.try_take(size) {
            self.lanes[lane].lost.extend(batch.sessions());
            PipelineCounters::add(&self.counters.mem_limit, units);
            let (used, limit) = (self.budget.used(), self.budget.limit);
            self.mem_log.hit(now, |more| {
                tracing::warn!(
                    publisher = lane,
                    units,
                    queued_bytes = used,
                    limit_bytes = limit,
                    similar_since_last_warning = more,
                    "dropped a batch: the queued bytes would pass --max_mem_mb (the broker is \
                     slower than the traffic)"
                )
            });
            return;
        }
        batch.lost = self.lanes[lane].lost.drain().collect();
        match self.lanes[lane].tx.send(batch) {
            Ok(()) => {}
            Err((batch, closed)) => {
                self.budget.give_back(size);
                PipelineCounters::add(&self.counters.queue_full, units);
                let sessions = batch.sessions();
                let lost = &mut self.lanes[lane].lost;
                lost.extend(batch.lost.iter().copied());
                lost.extend(sessions);
                self.queue_full_log.hit(now, |more| {
                    tracing::warn!(
                        publisher = lane,
                        units,
                        publisher_gone = closed,
                        similar_since_last_warning = more,
                        "dropped a batch: the publisher's queue holds --queue_size batches (raise \
                         or drop --queue_size, or check the broker)"
                    )
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fanout(
        lanes: usize,
        queue: usize,
        limits: BatchLimits,
        budget: u64,
    ) -> (Fanout, Vec<LaneReceiver>, Arc<PipelineCounters>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..lanes).map(|_| lane(Some(queue as u64))).unzip();
        let counters = Arc::new(PipelineCounters::default());
        let f = Fanout::new(
            Ipv4Addr::new(10, 0, 0, 1),
            txs,
            limits,
            Arc::new(MemoryBudget::new(budget)),
            counters.clone(),
        );
        (f, rxs, counters)
    }

    const LIMITS: BatchLimits = BatchLimits {
        segments: 20,
        bytes: 32 << 10,
        max_wait: Duration::from_millis(100),
    };

    #[tokio::test]
    async fn a_session_stays_on_one_publisher_in_order() {
        let (mut f, mut rxs, _) = fanout(4, 100, LIMITS, u64::MAX);
        let t = Instant::now();
        let sessions: Vec<(Ipv4Addr, u16)> = (0..50)
            .map(|i| (Ipv4Addr::new(198, 18, 0, i as u8), 40000 + i))
            .collect();
        for round in 0..30u32 {
            for &(ip, port) in &sessions {
                f.push(ip, port, &round.to_le_bytes(), t);
            }
        }
        f.send_all(t);
        let mut seen: std::collections::HashMap<(Ipv4Addr, u16), (usize, Vec<u32>)> =
            Default::default();
        for (lane, rx) in rxs.iter_mut().enumerate() {
            while let Ok(b) = rx.try_recv() {
                let m = encode::decode_message(b.bytes()).unwrap();
                assert_eq!(m.local_ip, Ipv4Addr::new(10, 0, 0, 1));
                assert!(m.units.len() <= 21);
                for u in m.units {
                    let e = seen.entry((u.ip, u.port)).or_insert((lane, vec![]));
                    assert_eq!(e.0, lane, "session moved to another publisher");
                    e.1.push(u32::from_le_bytes(u.data.try_into().unwrap()));
                }
            }
        }
        assert_eq!(seen.len(), 50);
        for (_, (_, rounds)) in seen {
            assert_eq!(rounds, (0..30).collect::<Vec<_>>());
        }
        let used: std::collections::HashSet<_> = sessions
            .iter()
            .map(|&(ip, p)| lane_of(IpAddr::V4(ip), p, 4))
            .collect();
        assert_eq!(
            used.len(),
            4,
            "50 sessions should spread over all publishers"
        );
    }

    #[tokio::test]
    async fn batches_leave_when_full_or_due() {
        let (mut f, mut rxs, _) = fanout(1, 100, LIMITS, u64::MAX);
        let t = Instant::now();
        let ip = Ipv4Addr::LOCALHOST;
        for _ in 0..20 {
            f.push(ip, 1, b"x", t);
        }
        assert!(
            rxs[0].try_recv().is_err(),
            "20 segments are not more than 20"
        );
        f.push(ip, 1, b"x", t);
        assert_eq!(rxs[0].try_recv().unwrap().units(), 21);
        // Bytes: a 40 KiB unit passes 32 KiB at once.
        f.push(ip, 1, &[7; 40 << 10], t);
        assert_eq!(rxs[0].try_recv().unwrap().units(), 1);
        // Time: a lone unit leaves once it waited max_wait, not before.
        f.push(ip, 1, b"y", t);
        assert_eq!(f.next_due(), Some(t + LIMITS.max_wait));
        f.send_due(t + Duration::from_millis(99), t);
        assert!(rxs[0].try_recv().is_err());
        f.send_due(t + LIMITS.max_wait, t);
        assert_eq!(rxs[0].try_recv().unwrap().units(), 1);
        assert_eq!(f.next_due(), None);
    }

    #[tokio::test]
    async fn full_queue_and_memory_budget_drop_and_count() {
        let tiny = BatchLimits {
            segments: 0,
            ..LIMITS
        };
        let (mut f, mut rxs, c) = fanout(1, 2, tiny, u64::MAX);
        let t = Instant::now();
        for _ in 0..5 {
            f.push(Ipv4Addr::LOCALHOST, 1, b"abc", t);
        }
        assert_eq!(c.load().queue_full, 3);
        assert_eq!(f.waiting(), 2);
        // The next batch that gets through says which sessions lost units before it.
        assert!(rxs[0].try_recv().unwrap().lost.is_empty());
        assert!(rxs[0].try_recv().unwrap().lost.is_empty());
        f.push(Ipv4Addr::LOCALHOST, 2, b"abc", t);
        assert_eq!(rxs[0].try_recv().unwrap().lost, [(Ipv4Addr::LOCALHOST, 1)]);
        // Also when nothing follows: at exit.
        f.push(Ipv4Addr::LOCALHOST, 3, b"abc", t);
        f.push(Ipv4Addr::LOCALHOST, 3, b"abc", t);
        f.push(Ipv4Addr::LOCALHOST, 3, b"abc", t);
        rxs[0].try_recv().unwrap();
        rxs[0].try_recv().unwrap();
        f.send_all(t);
        let last = rxs[0].try_recv().unwrap();
        assert_eq!(
            (last.units, last.lost.as_slice()),
            (0, &[(Ipv4Addr::LOCALHOST, 3)][..])
        );

        // Two 4+17 byte messages fit in 50 bytes, the third does not.
        let (mut f, _rxs, c) = fanout(1, 100, tiny, 50);
        for _ in 0..3 {
            f.push(Ipv4Addr::LOCALHOST, 1, b"abc", t);
        }
        assert_eq!(c.load().mem_limit, 1);
        assert_eq!(f.waiting(), 2);
    }
}
