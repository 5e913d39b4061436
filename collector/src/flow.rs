//! Flow handling: each session's client byte stream, exactly once and in order.
//!
//! TC ingress sees a segment before TCP does: retransmissions arrive twice and segments can
//! arrive out of order. Each flow remembers the next byte it expects (by TCP sequence number,
//! wrapping): bytes before it were published already (a segment that overlaps is trimmed to its
//! new bytes); a segment past it waits until the gap before it fills. A gap that does not fill
//! within [`GAP_TIMEOUT`], or whose waiting segments pass the per-flow or total bound, is given
//! up: the consumer gets a synthetic COM_QUIT (the session ends there for it, never with a
//! silent hole), and the stream resumes at the next segment that starts a command.
//!
//! The flow also follows the MySQL packets in the stream, to keep replication out of the replay:
//! a session that sends COM_REGISTER_SLAVE, COM_BINLOG_DUMP or COM_BINLOG_DUMP_GTID is a
//! replica (a COM_QUIT ends what was published of it, nothing more is), and semi-sync ACK
//! packets (`0xef` after the header) are left out, unless `--include_replication`.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Instant;

use crate::{
    protocol::{HEADER, command},
    status::PipelineCounters,
};

/// A session as the MRTE format names it: client address and port.
pub type SessionKey = (IpAddr, u16);

/// A segment this far behind the expected byte is not a retransmission but a new connection
/// that reuses the address (its sequence numbers start elsewhere).
const MAX_RETRANSMIT_DISTANCE: u32 = 16 << 20;
/// A segment this far ahead is not reordered either: a new connection, too.
const MAX_REORDER_DISTANCE: u32 = 64 << 20;
/// Longest a gap may stay open. TC sees every retransmission, so a gap that lasts is a segment
/// the capture lost (or a sender backing off many times in a row).
pub const GAP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes waiting behind a gap, per flow and over all flows.
pub const FLOW_PENDING_MAX: usize = 8 << 20;
pub const TOTAL_PENDING_MAX: usize = 64 << 20;

/// The semi-sync ACK's magic byte, where a command byte would be.
const SEMI_SYNC_ACK: u8 = 0xef;

/// What leaves a flow, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Data(Bytes),
    /// The session ends here for the consumer: a synthetic COM_QUIT.
    Quit,
}

/// Where the flow is in the session's MySQL packets.
#[derive(Debug, Default)]
struct Packets {
    /// Bytes left of the current packet (header included); 0 at a packet start.
    left: usize,
    /// The start of a packet cut by a segment end: header bytes so far.
    head: Vec<u8>,
    /// Whether the current packet is left out.
    dropping: bool,
    /// A replica's session: everything is left out.
    replica: bool,
    /// After a gap given up: bytes are left out until a segment starts with a command.
    resync: bool,
}

struct Flow {
    next_seq: u32,
    /// Stream position of `next_seq` (bytes since the flow began).
    pos: u64,
    last_seen: Instant,
    /// Segments past a gap, by stream position.
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: usize,
    gap_since: Option<Instant>,
    packets: Packets,
}

impl Flow {
    fn new(seq: u32, now: Instant) -> Self {
        Self {
            next_seq: seq,
            pos: 0,
            last_seen: now,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            gap_since: None,
            packets: Packets::default(),
        }
    }
}

/// The flow table.
#[derive(Default)]
pub struct Flows {
    table: HashMap<SessionKey, Flow>,
    pending_bytes: usize,
    include_replication: bool,
    /// No gap times out before this (it may be early: a gap can close before its deadline).
    next_gap: Option<Instant>,
}

impl Flows {
    pub fn new(include_replication: bool) -> Self {
        Self {
            include_replication,
            ..Default::default()
        }
    }

    /// Takes a segment of `key`'s stream starting at `seq`; appends what can be published now
    /// to `out`.
    pub fn accept(
        &mut self,
        key: SessionKey,
        seq: u32,
        mut data: Bytes,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        let flow = self.table.entry(key).or_insert_with(|| Flow::new(seq, now));
        flow.last_seen = now;
        let ahead = seq.wrapping_sub(flow.next_seq);
        let behind = flow.next_seq.wrapping_sub(seq);
        if ahead != 0 && ahead <= MAX_REORDER_DISTANCE && (ahead as i32) > 0 {
            // Past a gap: wait for it to fill.
            let at = flow.pos + ahead as u64;
            let longer = flow.pending.get(&at).is_none_or(|d| d.len() < data.len());
            if longer {
                let len = data.len();
                if let Some(old) = flow.pending.insert(at, data) {
                    flow.pending_bytes -= old.len();
                    self.pending_bytes -= old.len();
                }
                flow.pending_bytes += len;
                self.pending_bytes += len;
            } else {
                PipelineCounters::add(&c.retransmitted, 1);
                PipelineCounters::add(&c.retransmitted_bytes, data.len() as u64);
            }
            if flow.gap_since.is_none() {
                flow.gap_since = Some(now);
                PipelineCounters::add(&c.seq_gaps, 1);
                let deadline = now + GAP_TIMEOUT;
                self.next_gap = Some(self.next_gap.map_or(deadline, |d| d.min(deadline)));
            }
            if flow.pending_bytes > FLOW_PENDING_MAX || self.pending_bytes > TOTAL_PENDING_MAX {
                PipelineCounters::add(&c.gap_overflow, 1);
                Self::give_up_gap(
                    flow,
                    &mut self.pending_bytes,
                    self.include_replication,
                    c,
                    out,
                );
            }
            return;
        }
        if ahead != 0 && behind != 0 && behind <= MAX_RETRANSMIT_DISTANCE && (behind as i32) > 0 {
            if behind as usize >= data.len() {
                PipelineCounters::add(&c.retransmitted, 1);
                PipelineCounters::add(&c.retransmitted_bytes, data.len() as u64);
                return;
            }
            PipelineCounters::add(&c.retransmitted_bytes, behind as u64);
            data = data.slice(behind as usize..);
        } else if ahead != 0 {
            // Far off either way: a new connection on the same address, whose start was not
            // seen. What waited on the old one is given up; the consumer ends the old session
            // before the new one begins.
            PipelineCounters::add(&c.flow_restarts, 1);
            PipelineCounters::add(&c.gap_bytes, flow.pending_bytes as u64);
            self.pending_bytes -= flow.pending_bytes;
            *flow = Flow::new(seq, now);
            out.push(Output::Quit);
        }
        Self::emit(flow, data, self.include_replication, c, out);
        Self::drain_pending(
            flow,
            &mut self.pending_bytes,
            self.include_replication,
            c,
            out,
        );
    }

    /// Publishes in-order bytes at `flow.next_seq`.
    fn emit(
        flow: &mut Flow,
        data: Bytes,
        include_replication: bool,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        flow.next_seq = flow.next_seq.wrapping_add(data.len() as u32);
        flow.pos += data.len() as u64;
        flow.packets.feed(data, include_replication, c, out);
    }

    /// Publishes waiting segments that the stream has reached.
    fn drain_pending(
        flow: &mut Flow,
        total: &mut usize,
        include_replication: bool,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        while let Some(entry) = flow.pending.first_entry() {
            let at = *entry.key();
            if at > flow.pos {
                break;
            }
            let data = entry.remove();
            flow.pending_bytes -= data.len();
            *total -= data.len();
            let old = (flow.pos - at) as usize;
            if old >= data.len() {
                PipelineCounters::add(&c.retransmitted_bytes, data.len() as u64);
                continue;
            }
            PipelineCounters::add(&c.retransmitted_bytes, old as u64);
            Self::emit(flow, data.slice(old..), include_replication, c, out);
        }
        if flow.pending.is_empty() {
            flow.gap_since = None;
        }
    }

    /// Ends the session for the consumer at the gap, skips the missing bytes, and resumes at
    /// the next command.
    fn give_up_gap(
        flow: &mut Flow,
        total: &mut usize,
        include_replication: bool,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        let Some((&at, _)) = flow.pending.first_key_value() else {
            return;
        };
        let missing = at - flow.pos;
        PipelineCounters::add(&c.gap_bytes, missing);
        if !flow.packets.resync && !flow.packets.replica {
            out.push(Output::Quit);
        }
        flow.packets.resync = true;
        flow.next_seq = flow.next_seq.wrapping_add(missing as u32);
        flow.pos = at;
        flow.gap_since = None;
        Self::drain_pending(flow, total, include_replication, c, out);
        if !flow.pending.is_empty() {
            flow.gap_since = Some(flow.last_seen);
        }
    }

    /// When a gap may time out (without a scan of the table: this is asked on every drain).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.pending_bytes == 0 {
            return None;
        }
        self.next_gap
    }

    /// Gives up gaps open longer than [`GAP_TIMEOUT`] (every gap, with `all`: at exit).
    pub fn on_timeout(
        &mut self,
        now: Instant,
        all: bool,
        c: &PipelineCounters,
        out: &mut Vec<(SessionKey, Output)>,
    ) {
        if self.pending_bytes == 0 || (!all && self.next_gap.is_some_and(|d| now < d)) {
            return;
        }
        let mut step = Vec::new();
        for (key, flow) in &mut self.table {
            while flow
                .gap_since
                .is_some_and(|t| all || now >= t + GAP_TIMEOUT)
            {
                PipelineCounters::add(&c.gap_timeouts, 1);
                Self::give_up_gap(
                    flow,
                    &mut self.pending_bytes,
                    self.include_replication,
                    c,
                    &mut step,
                );
                out.extend(step.drain(..).map(|o| (*key, o)));
            }
        }
        self.next_gap = self
            .table
            .values()
            .filter_map(|f| f.gap_since)
            .min()
            .map(|t| t + GAP_TIMEOUT);
    }

    /// Forgets sessions idle for `idle`; returns how many. Bytes still waiting behind a gap
    /// are counted as lost (`gap_bytes`).
    pub fn expire(&mut self, now: Instant, idle: Duration, c: &PipelineCounters) -> usize {
        let before = self.table.len();
        let mut freed = 0;
        self.table.retain(|_, f| {
            let keep = now.saturating_duration_since(f.last_seen) < idle;
            if !keep {
                freed += f.pending_bytes;
            }
            keep
        });
        self.pending_bytes -= freed;
        PipelineCounters::add(&c.gap_bytes, freed as u64);
        before - self.table.len()
    }

    /// Sessions with flow state.
    pub fn keys(&self) -> impl Iterator<Item = &SessionKey> {
        self.table.keys()
    }

    /// Frees a session's flow; bytes still waiting behind a gap are counted as lost.
    pub fn forget(&mut self, key: &SessionKey, c: &PipelineCounters) {
        if let Some(f) = self.table.remove(key) {
            self.pending_bytes -= f.pending_bytes;
            PipelineCounters::add(&c.gap_bytes, f.pending_bytes as u64);
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Bytes waiting behind gaps.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
}

impl Packets {
    /// Follows `data` through the packets; appends the bytes to publish.
    fn feed(
        &mut self,
        data: Bytes,
        include_replication: bool,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        if self.resync {
            if !starts_command(&data) {
                PipelineCounters::add(&c.gap_bytes, data.len() as u64);
                return;
            }
            *self = Self {
                replica: self.replica,
                ..Default::default()
            };
        }
        let mut i = 0;
        let mut keep_from = 0;
        let mut keeping = !self.dropping;
        let flush = |from: usize, to: usize, keep: bool, out: &mut Vec<Output>| {
            if to > from {
                if keep {
                    out.push(Output::Data(data.slice(from..to)));
                } else {
                    PipelineCounters::add(&c.replication_bytes, (to - from) as u64);
                }
            }
        };
        while i < data.len() {
            if self.left > 0 {
                let n = self.left.min(data.len() - i);
                self.left -= n;
                i += n;
                continue;
            }
            // A packet starts (or its header continues) at `i`. A header cut by the segment
            // end is kept whatever it is: what was published cannot be taken back.
            while self.head.len() < HEADER && i < data.len() {
                self.head.push(data[i]);
                i += 1;
            }
            if self.head.len() < HEADER {
                break;
            }
            let len = u32::from_le_bytes([self.head[0], self.head[1], self.head[2], 0]) as usize;
            if len == 0 {
                self.head.clear();
                continue;
            }
            if self.head.len() == HEADER {
                if i == data.len() {
                    break;
                }
                self.head.push(data[i]);
                i += 1;
            }
            let (seq, cmd) = (self.head[3], self.head[4]);
            let start = i.saturating_sub(HEADER + 1);
            self.head.clear();
            let becomes_replica = !include_replication
                && !self.replica
                && seq == 0
                && matches!(
                    cmd,
                    command::REGISTER_SLAVE | command::BINLOG_DUMP | command::BINLOG_DUMP_GTID
                );
            let ack = seq == 0 && cmd == SEMI_SYNC_ACK;
            let drop = !include_replication && (self.replica || becomes_replica || ack);
            if drop == keeping {
                flush(keep_from, start, keeping, out);
                keep_from = start;
                keeping = !drop;
            }
            if becomes_replica {
                // What was published of the session ends for the consumer.
                self.replica = true;
                PipelineCounters::add(&c.replication_sessions, 1);
                out.push(Output::Quit);
            }
            if ack {
                PipelineCounters::add(&c.semi_sync_acks, 1);
            }
            self.dropping = drop;
            // The packet's bytes after the header and command byte.
            self.left = len - 1;
        }
        flush(keep_from, data.len(), keeping, out);
    }
}

/// Whether a segment starts with a command packet: sequence 0 and a command byte.
fn starts_command(data: &[u8]) -> bool {
    data.len() > HEADER && data[3] == 0 && data[4] <= 0x1f && {
        let len = u32::from_le_bytes([data[0], data[1], data[2], 0]);
        len >= 1
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key() -> SessionKey {
        ("198.18.0.2".parse().unwrap(), 40000)
    }

    /// A command packet: header, command byte, argument.
    fn packet(cmd: u8, arg: &[u8]) -> Vec<u8> {
        let mut p = ((arg.len() + 1) as u32).to_le_bytes()[..3].to_vec();
        p.push(0);
        p.push(cmd);
        p.extend_from_slice(arg);
        p
    }

    /// Feeds segments (seq, bytes); returns the published stream with `Q` for each COM_QUIT.
    fn feed(f: &mut Flows, c: &PipelineCounters, segs: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, data) in segs {
            f.accept(
                key(),
                *seq,
                Bytes::copy_from_slice(data),
                Instant::now(),
                c,
                &mut out,
            );
        }
        flatten(out)
    }

    fn flatten(out: Vec<Output>) -> Vec<u8> {
        out.into_iter()
            .flat_map(|o| match o {
                Output::Data(d) => d.to_vec(),
                Output::Quit => b"Q".to_vec(),
            })
            .collect()
    }

    #[test]
    fn retransmissions_are_dropped_or_trimmed_across_the_wrap() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let isn = u32::MAX - 5;
        let got = feed(
            &mut f,
            &c,
            &[
                (isn, b"0123456789"),
                (isn, b"0123456789"),
                (isn.wrapping_add(6), b"6789abcdef"),
                (isn.wrapping_add(16), b"ghijk"),
            ],
        );
        assert_eq!(got, b"0123456789abcdefghijk");
        let l = c.load();
        assert_eq!(
            (l.retransmitted, l.retransmitted_bytes, l.seq_gaps),
            (1, 14, 0)
        );
    }

    #[test]
    fn out_of_order_segments_wait_for_the_gap() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let got = feed(
            &mut f,
            &c,
            &[(100, b"ab"), (106, b"gh"), (104, b"ef"), (102, b"cd")],
        );
        assert_eq!(got, b"abcdefgh");
        assert_eq!(f.pending_bytes(), 0);
        assert_eq!(c.load().seq_gaps, 1);
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn a_gap_that_times_out_ends_the_session_and_resumes_at_a_command() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let q1 = packet(command::QUERY, b"SELECT 1");
        let q2 = packet(command::QUERY, b"SELECT 2");
        let q3 = packet(command::QUERY, b"SELECT 3");
        let n = q1.len() as u32;
        // q2 never comes; a packet's tail comes after it, then q3.
        let tail = &q2[5..];
        let got = feed(
            &mut f,
            &c,
            &[(0, &q1), (2 * n, tail), (2 * n + tail.len() as u32, &q3)],
        );
        assert_eq!(got, q1);
        let deadline = f.next_deadline().unwrap();
        let mut out = Vec::new();
        f.on_timeout(deadline - Duration::from_millis(1), false, &c, &mut out);
        assert!(out.is_empty());
        f.on_timeout(deadline, false, &c, &mut out);
        let got = flatten(out.into_iter().map(|(_, o)| o).collect());
        // The quit, the tail skipped, q3 whole.
        assert_eq!(got, [&b"Q"[..], &q3].concat());
        let l = c.load();
        assert_eq!(
            (l.gap_timeouts, l.gap_bytes),
            (1, (n as usize + tail.len()) as u64)
        );
        assert_eq!(f.pending_bytes(), 0);
    }

    #[test]
    fn waiting_bytes_are_bounded_per_flow() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let big = vec![7u8; 1 << 20];
        let mut segs: Vec<(u32, &[u8])> = vec![(0, &b"x"[..])];
        // Byte 1 is missing; 9 MiB wait behind it.
        for i in 0..9u32 {
            segs.push((2 + i * (1 << 20), &big));
        }
        let got = feed(&mut f, &c, &segs);
        assert_eq!(&got[..2], b"xQ", "the session ends at the gap");
        assert_eq!(c.load().gap_overflow, 1);
        assert!(f.pending_bytes() <= FLOW_PENDING_MAX);
    }

    #[test]
    fn a_new_connection_on_the_same_address_restarts_the_flow() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let got = feed(
            &mut f,
            &c,
            &[(1000, b"old"), (1000u32.wrapping_sub(64 << 20), b"new")],
        );
        assert_eq!(got, b"oldQnew");
        let l = c.load();
        assert_eq!((l.flow_restarts, l.retransmitted), (1, 0));
        assert_eq!(
            f.expire(
                Instant::now() + Duration::from_secs(5),
                Duration::from_secs(5),
                &c
            ),
            1
        );
        assert!(f.is_empty());
    }

    #[test]
    fn replication_is_left_out_unless_included() {
        let q = packet(command::QUERY, b"SET @master_heartbeat_period=1");
        let mut ack = packet(SEMI_SYNC_ACK, &[0x38, 0x40, 1, 0, 0, 0, 0, 0]);
        ack.extend_from_slice(b"mysql-bin.001516");
        ack[0] += 16;
        let dump = packet(command::BINLOG_DUMP, &[4, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
        let register = packet(command::REGISTER_SLAVE, &[1, 0, 0, 0]);
        // An ACK between two queries, in one segment: the queries stay.
        let stream = [q.clone(), ack.clone(), q.clone()].concat();
        for include in [false, true] {
            let c = PipelineCounters::default();
            let mut f = Flows::new(include);
            let got = feed(&mut f, &c, &[(0, &stream)]);
            if include {
                assert_eq!(got, stream);
            } else {
                assert_eq!(got, [q.clone(), q.clone()].concat());
                let l = c.load();
                assert_eq!(
                    (l.semi_sync_acks, l.replication_bytes),
                    (1, ack.len() as u64)
                );
            }
        }
        // A replica: what came before stays, a quit ends it, nothing after is published.
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let replica = [q.clone(), register, dump].concat();
        let got = feed(&mut f, &c, &[(0, &replica), (replica.len() as u32, &q)]);
        assert_eq!(got, [&q[..], b"Q"].concat());
        assert_eq!(c.load().replication_sessions, 1);
    }

    proptest! {
        /// Any order and duplication of a stream's segments (within the reorder bound) gives
        /// back the stream.
        #[test]
        fn any_permutation_and_duplication_gives_the_stream(
            isn in any::<u32>(),
            cuts in proptest::collection::vec(1usize..3000, 1..40),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..80),
        ) {
            let stream = (0..cuts.iter().sum::<usize>()).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>();
            let mut segs = Vec::new();
            let mut at = 0;
            for len in &cuts {
                segs.push((isn.wrapping_add(at as u32), stream[at..at + len].to_vec()));
                at += len;
            }
            // Reorder and duplicate: picks of any segment first, then every segment once
            // more in reverse so that all arrive.
            let mut arrivals: Vec<(u32, Vec<u8>)> = order.iter().map(|i| segs[i.index(segs.len())].clone()).collect();
            arrivals.extend(segs.iter().rev().cloned());
            let c = PipelineCounters::default();
            let mut f = Flows::default();
            let mut out = Vec::new();
            // The first segment opens the flow.
            f.accept(key(), segs[0].0, Bytes::from(segs[0].1.clone()), Instant::now(), &c, &mut out);
            for (seq, data) in arrivals {
                f.accept(key(), seq, Bytes::from(data), Instant::now(), &c, &mut out);
            }
            prop_assert_eq!(flatten(out), stream);
            prop_assert_eq!(f.pending_bytes(), 0);
        }
    }
}
