//! The TCP stage: each connection's client byte stream, exactly once and in order.
//!
//! TC ingress sees a segment before TCP does: retransmissions arrive twice and segments can
//! arrive out of order. Each flow (one TCP connection, by its 4-tuple) remembers the next byte
//! it expects (by TCP sequence number, wrapping): bytes before it were published already (a
//! segment that overlaps is trimmed to its new bytes); a segment past it waits until the gap
//! before it fills. A gap that does not fill within [`GAP_TIMEOUT`], or whose waiting segments
//! pass the per-flow or total bound, is given up: the consumer gets a synthetic COM_QUIT (the
//! session ends there for it, never with a silent hole), and the stream resumes at the next
//! segment that starts a command.
//!
//! The kernel hands over payload-less SYN, FIN and RST segments as header-only records. A SYN
//! fixes where the stream starts (so that even its first segment may arrive late); a FIN ends
//! the flow once every byte before it has arrived, a RST at once. A flow that ends without the
//! client's own COM_QUIT gets a synthetic one. An ended flow is remembered for
//! [`CLOSED_LINGER`], so that late retransmissions of its bytes are not taken for a new
//! connection.
//!
//! In-order bytes go on to the connection's [`crate::session`] follower, the next stage.

use std::{collections::BTreeMap, time::Duration};

// Flow keys come from the network: a seeded hasher, but far cheaper per segment than SipHash.
use foldhash::{HashMap, HashSet};

use bytes::Bytes;
use collector_common::{TCP_FIN, TCP_RST, TCP_SYN};
use tokio::time::Instant;

use crate::{
    session::{Follower, Output, Policy, STATEMENTS_IDLE},
    status::PipelineCounters,
    types::{FlowKey, SessionKey},
};

/// A segment (or a record's part of one) as the flow table takes it.
#[derive(Clone, Debug)]
pub struct Segment {
    /// TCP sequence number of `data[0]` (of the byte after the SYN, for a SYN).
    pub seq: u32,
    /// Sequence number after the whole segment's payload: where its FIN sits.
    pub end: u32,
    pub flags: u8,
    pub data: Bytes,
}

impl Segment {
    /// From a record: `seq` of its first byte, `offset` of that byte in the segment's payload
    /// of `segment_len` bytes. A SYN takes one sequence number before the payload.
    pub fn new(seq: u32, offset: u32, segment_len: u32, flags: u8, data: Bytes) -> Self {
        let syn = u32::from(flags & TCP_SYN != 0);
        Self {
            seq: seq.wrapping_add(syn),
            end: seq
                .wrapping_sub(offset)
                .wrapping_add(syn)
                .wrapping_add(segment_len),
            flags,
            data,
        }
    }
}

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
/// How long an ended flow is remembered: the server may still be missing bytes the capture
/// has seen, and the client retransmits them (backing off) until it has them.
pub const CLOSED_LINGER: Duration = Duration::from_secs(60);
/// How long a TLS session's flow stays after its FIN or RST: the server reads (and the uprobes
/// hand over) what the client sent before its FIN after TC saw the FIN. The client's own
/// COM_QUIT ends it sooner.
pub const TLS_LINGER: Duration = Duration::from_secs(2);

struct Flow {
    next_seq: u32,
    /// Stream position of `next_seq` (bytes since the flow began).
    pos: u64,
    last_seen: Instant,
    /// Segments past a gap, by stream position.
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: usize,
    /// Stream position of the FIN, once seen.
    fin: Option<u64>,
    gap_since: Option<Instant>,
    /// The SYN's sequence number, if the flow began with one.
    isn: Option<u32>,
    /// Something of the stream was published.
    published: bool,
    follower: Follower,
    /// A TLS session's FIN or RST (its flags) came; it ends at this deadline, or at the
    /// client's COM_QUIT in the plaintext.
    tls_linger: Option<(Instant, u8)>,
    /// Plaintext position (the kernel's count of bytes the server read) of the next TLS
    /// record, once one came.
    plain_next: Option<u32>,
    recent: Recent,
}

/// Segments a flow remembers of those it delivered: a retransmission that covers one is
/// compared with it.
const RECENT: usize = 4;

/// The last [`RECENT`] delivered segments' (stream position, length, hash of the bytes): 64
/// bytes a flow, where keeping their bytes would pin the drain's arena chunks.
#[derive(Default)]
struct Recent {
    segments: [(u64, u32, u32); RECENT],
    next: usize,
}

impl Recent {
    fn hash(data: &[u8]) -> u32 {
        use std::hash::BuildHasher as _;
        foldhash::fast::FixedState::with_seed(0x6d72_7465).hash_one(data) as u32
    }

    fn remember(&mut self, at: u64, data: &[u8]) {
        self.segments[self.next] = (at, data.len() as u32, Self::hash(data));
        self.next = (self.next + 1) % RECENT;
    }

    /// Whether bytes at stream position `at`, delivered before, differ from a remembered
    /// segment they cover whole.
    fn differs(&self, at: u64, data: &[u8]) -> bool {
        let end = at + data.len() as u64;
        self.segments.iter().any(|&(p, len, hash)| {
            len > 0 && p >= at && p + u64::from(len) <= end && {
                let from = (p - at) as usize;
                Self::hash(&data[from..from + len as usize]) != hash
            }
        })
    }
}

impl Flow {
    fn new(seq: u32, now: Instant) -> Self {
        Self {
            next_seq: seq,
            pos: 0,
            last_seen: now,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            fin: None,
            gap_since: None,
            isn: None,
            published: false,
            follower: Follower::default(),
            tls_linger: None,
            plain_next: None,
            recent: Recent::default(),
        }
    }

    /// Stream position of `seq` if it is ahead of the expected byte (within the reorder bound).
    fn ahead(&self, seq: u32) -> Option<u64> {
        let ahead = seq.wrapping_sub(self.next_seq);
        (ahead != 0 && ahead <= MAX_REORDER_DISTANCE).then(|| self.pos + ahead as u64)
    }

    /// How far `seq` is behind the expected byte, if it is (within the retransmission bound).
    fn behind(&self, seq: u32) -> Option<u32> {
        let behind = self.next_seq.wrapping_sub(seq);
        (behind != 0 && behind <= MAX_RETRANSMIT_DISTANCE).then_some(behind)
    }

    /// Ends the flow for the consumer: a COM_QUIT if something was published and neither the
    /// client nor the flow ended the session already.
    fn end(&mut self, out: &mut Vec<Output>) -> bool {
        let ended = self.follower.ended();
        if self.published && !ended {
            out.push(Output::Quit);
            return true;
        }
        ended
    }
}

/// The flow table.
pub struct Flows {
    table: HashMap<FlowKey, Flow>,
    /// Replicas' sessions the process list shows.
    replicas: HashSet<SessionKey>,
    /// Ended flows, by the sequence number after their last byte, and when they ended.
    closed: HashMap<FlowKey, (u32, Instant)>,
    pending_bytes: usize,
    /// Most bytes waiting behind gaps, in all flows ([`TOTAL_PENDING_MAX`] unless the memory
    /// plan gives less).
    pending_max: usize,
    policy: Policy,
    /// No gap times out before this (it may be early: a gap can close before its deadline).
    next_gap: Option<Instant>,
    /// Most flows in `table`, and most ended ones in `closed` (the memory plan's share).
    max_flows: usize,
    /// What flows given up at the cap let out (their COM_QUIT, their end), by flow.
    evicted: Vec<(FlowKey, Output)>,
    /// When `closed` may be pruned again at its cap (not on every insert of a flood).
    next_closed_prune: Option<Instant>,
}

/// Most flows without a memory plan (tests, `inspect`).
pub const MAX_FLOWS: usize = 1 << 20;

impl Default for Flows {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Flows {
    pub fn new(include_replication: bool) -> Self {
        Self {
            table: HashMap::default(),
            replicas: HashSet::default(),
            closed: HashMap::default(),
            pending_bytes: 0,
            pending_max: TOTAL_PENDING_MAX,
            policy: Policy {
                include_replication,
                ..Default::default()
            },
            next_gap: None,
            max_flows: MAX_FLOWS,
            evicted: Vec::new(),
            next_closed_prune: None,
        }
    }

    /// Caps the flows tracked, and the ended flows remembered (the memory plan's share).
    pub fn set_max_flows(&mut self, max: usize) {
        self.max_flows = max.max(1);
    }

    /// Whether flows were given up at the cap since [`Self::take_evicted`].
    pub fn has_evicted(&self) -> bool {
        !self.evicted.is_empty()
    }

    /// What the flows given up at the cap let out, by flow.
    pub fn take_evicted(&mut self) -> Vec<(FlowKey, Output)> {
        std::mem::take(&mut self.evicted)
    }

    /// Before a new flow is added: at the cap, a sixteenth of the table goes (one pass over it
    /// per sixteenth of the cap, not one per new flow): flows that published nothing first (a
    /// bare SYN, a flood's), then the longest idle. A session that published something ends
    /// for the consumer with its COM_QUIT; one that did not is only forgotten.
    fn make_room(&mut self, c: &PipelineCounters) {
        if self.table.len() < self.max_flows {
            return;
        }
        let mut order: Vec<(bool, Instant, FlowKey)> = self
            .table
            .iter()
            .map(|(k, f)| (f.published, f.last_seen, *k))
            .collect();
        let n = (self.max_flows / 16).clamp(1, order.len());
        order.select_nth_unstable_by_key(n - 1, |(published, seen, _)| (*published, *seen));
        let mut step = Vec::new();
        for (_, _, key) in order.into_iter().take(n) {
            let Some(mut flow) = self.table.remove(&key) else {
                continue;
            };
            PipelineCounters::add(&c.flow_evicted, 1);
            self.pending_bytes -= flow.pending_bytes;
            PipelineCounters::add(&c.gap_bytes, flow.pending_bytes as u64);
            if !flow.published {
                // Nothing of it reached the consumer: only its state is forgotten (its next
                // segment starts a flow mid-stream, as one that began before capture).
                continue;
            }
            let ended = flow.end(&mut step);
            step.push(Output::Closed { ended });
            self.evicted.extend(step.drain(..).map(|o| (key, o)));
        }
    }

    /// Remembers an ended flow (where its bytes end, and when), unless that table is at the
    /// cap even after its expired entries are pruned (at most once a second).
    fn remember_closed(&mut self, key: FlowKey, last_seq: u32, now: Instant, c: &PipelineCounters) {
        if self.closed.len() >= self.max_flows && !self.closed.contains_key(&key) {
            if self.next_closed_prune.is_none_or(|t| now >= t) {
                self.closed
                    .retain(|_, (_, t)| now.saturating_duration_since(*t) < CLOSED_LINGER);
                self.next_closed_prune = Some(now + Duration::from_secs(1));
            }
            if self.closed.len() >= self.max_flows {
                PipelineCounters::add(&c.closed_unremembered, 1);
                return;
            }
        }
        self.closed.insert(key, (last_seq, now));
    }

    /// Takes prepared-statement commands out of the streams and publishes executes as text.
    pub fn set_prepared(&mut self, on: bool) {
        self.policy.prepared = on;
    }

    /// Commands collected whole, and long data, take from `budget` (the publishers' queue
    /// budget): past it they are given up and counted (`command_mem_limit`).
    pub fn set_command_budget(&mut self, budget: std::sync::Arc<crate::memory::MemoryBudget>) {
        self.policy.commands = Some(budget);
    }

    /// Describes the query attributes taken off each COM_QUERY (`inspect`).
    pub fn describe_attributes(&mut self) {
        self.policy.describe_attributes = true;
    }

    /// The first bytes of a server's reply to a COM_STMT_PREPARE on `key`'s connection,
    /// sent when `awaiting` PREPAREs were unanswered: to the connection's session follower.
    pub fn reply(&mut self, key: FlowKey, awaiting: u8, head: &[u8], c: &PipelineCounters) {
        let flow = self.table.get_mut(&key).filter(|_| self.policy.prepared);
        let Some(flow) = flow else {
            PipelineCounters::add(&c.stmt_reply_unmatched, 1);
            return;
        };
        let gap = !flow.pending.is_empty();
        flow.follower.reply(key.client, awaiting, head, gap, c);
    }

    /// Lowers the cap of the bytes waiting behind gaps (the memory plan's share).
    pub fn set_pending_max(&mut self, max: usize) {
        self.pending_max = max.min(TOTAL_PENDING_MAX);
    }

    /// Takes a segment of `key`'s stream; appends what can be published now to `out`.
    pub fn accept(
        &mut self,
        key: FlowKey,
        seg: Segment,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        let Segment {
            seq,
            end,
            flags,
            data,
        } = seg;
        if flags & TCP_SYN != 0 {
            self.open(key, seq, now, c, out);
        }
        if !self.table.contains_key(&key) {
            if let Some(&(closed_at, _)) = self.closed.get(&key) {
                // After the flow ended: retransmissions of what it had (and of its FIN or
                // RST) are left out; anything else is a new connection whose SYN was missed.
                let behind = closed_at.wrapping_sub(end);
                if behind <= MAX_RETRANSMIT_DISTANCE {
                    if !data.is_empty() {
                        PipelineCounters::add(&c.retransmitted, 1);
                        PipelineCounters::add(&c.retransmitted_bytes, data.len() as u64);
                    }
                    return;
                }
                self.closed.remove(&key);
            }
            if data.is_empty() {
                if flags & (TCP_FIN | TCP_RST) != 0 {
                    // The end of a connection that sent nothing while captured.
                    Self::count_close(flags, c);
                    self.remember_closed(key, end, now, c);
                    out.push(Output::Closed { ended: false });
                }
                return;
            }
            self.make_room(c);
            let mut flow = Flow::new(seq, now);
            if !self.policy.include_replication && self.replicas.contains(&key.client) {
                flow.follower.mark_replica();
            }
            self.table.insert(key, flow);
        }
        let Some(flow) = self.table.get_mut(&key) else {
            return;
        };
        flow.last_seen = now;
        if flags & TCP_RST != 0 {
            // The server takes a RST only inside its window (RFC 5961: at the next byte, or
            // after a challenge ACK); one behind what the client already sent (a stale or
            // forged one), or far past it, it drops, and the connection goes on.
            if seq != flow.next_seq && flow.ahead(seq).is_none() {
                PipelineCounters::add(&c.rst_ignored, 1);
                return;
            }
            // The connection is gone; nothing waiting will ever be completed.
            self.close(key, flags, now, c, out);
            return;
        }
        if flags & TCP_FIN != 0 && flow.fin.is_none() {
            flow.fin = if end == flow.next_seq {
                Some(flow.pos)
            } else {
                flow.ahead(end)
            };
        }
        // Most segments neither carry nor follow a FIN: one lookup less for them.
        let fin = flow.fin.is_some();
        if !data.is_empty() {
            self.take_data(key, seq, data, now, c, out);
        }
        if fin {
            self.after_progress(key, now, c, out);
        }
    }

    /// The payload part of [`Self::accept`].
    fn take_data(
        &mut self,
        key: FlowKey,
        seq: u32,
        mut data: Bytes,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        let Some(flow) = self.table.get_mut(&key) else {
            return;
        };
        if let Some(at) = flow.ahead(seq) {
            // Past a gap: wait for it to fill.
            if let Some(old) = flow.pending.get(&at) {
                let n = old.len().min(data.len());
                if old[..n] != data[..n] {
                    Self::differs(flow, c, out);
                }
            }
            let longer = flow.pending.get(&at).is_none_or(|d| d.len() < data.len());
            if longer {
                let len = data.len();
                // A copy: the slice would keep its whole arena chunk (1 MiB) alive while it
                // waits, which the byte count would not show.
                let data = Bytes::copy_from_slice(&data);
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
            let over = flow.pending_bytes > FLOW_PENDING_MAX.min(self.pending_max)
                || self.pending_bytes > self.pending_max;
            self.gap_opened(key, now, c);
            if over {
                PipelineCounters::add(&c.gap_overflow, 1);
                self.give_up_gap(key, c, out);
            }
            return;
        }
        if seq != flow.next_seq {
            match flow.behind(seq) {
                Some(behind) if behind as usize >= data.len() => {
                    PipelineCounters::add(&c.retransmitted, 1);
                    PipelineCounters::add(&c.retransmitted_bytes, data.len() as u64);
                    if Self::old_differs(flow, behind, &data) {
                        Self::differs(flow, c, out);
                    }
                    return;
                }
                Some(behind) => {
                    PipelineCounters::add(&c.retransmitted_bytes, behind as u64);
                    if Self::old_differs(flow, behind, &data[..behind as usize]) {
                        Self::differs(flow, c, out);
                    }
                    data = data.slice(behind as usize..);
                }
                None => {
                    // Far off either way: a new connection on the same address, whose SYN was
                    // not seen. What waited on the old one is given up; the consumer ends the
                    // old session before the new one begins.
                    PipelineCounters::add(&c.flow_restarts, 1);
                    PipelineCounters::add(&c.gap_bytes, flow.pending_bytes as u64);
                    self.pending_bytes -= flow.pending_bytes;
                    flow.end(out);
                    *flow = Flow::new(seq, now);
                }
            }
        }
        Self::emit(flow, data, &self.policy, c, out);
        Self::drain_pending(flow, &mut self.pending_bytes, &self.policy, c, out);
    }

    /// A SYN: the connection starts at `seq`. A flow still open on the same 4-tuple with
    /// another start is an old connection whose end was not seen: it ends first.
    fn open(
        &mut self,
        key: FlowKey,
        seq: u32,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        let isn = seq.wrapping_sub(1);
        self.closed.remove(&key);
        if let Some(flow) = self.table.get_mut(&key) {
            if flow.isn == Some(isn) {
                // The SYN again (retransmitted).
                PipelineCounters::add(&c.syn_retransmitted, 1);
                return;
            }
            if flow.isn.is_none() && (seq == flow.next_seq || flow.behind(seq).is_some()) {
                // The SYN of the connection whose bytes came first (held apart from them).
                PipelineCounters::add(&c.syn_opened, 1);
                flow.isn = Some(isn);
                return;
            }
            PipelineCounters::add(&c.flow_restarts, 1);
            PipelineCounters::add(&c.gap_bytes, flow.pending_bytes as u64);
            self.pending_bytes -= flow.pending_bytes;
            let ended = flow.end(out);
            out.push(Output::Closed { ended });
        }
        PipelineCounters::add(&c.syn_opened, 1);
        if !self.table.contains_key(&key) {
            self.make_room(c);
        }
        let mut flow = Flow::new(seq, now);
        flow.isn = Some(isn);
        self.table.insert(key, flow);
    }

    fn count_close(flags: u8, c: &PipelineCounters) {
        if flags & TCP_RST != 0 {
            PipelineCounters::add(&c.rst_closed, 1);
        } else {
            PipelineCounters::add(&c.fin_closed, 1);
        }
    }

    /// Ends the flow: at once, or for a TLS session after [`TLS_LINGER`] (or its plaintext
    /// COM_QUIT), so that the plaintext the server has yet to read is not lost.
    fn close(
        &mut self,
        key: FlowKey,
        flags: u8,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        if let Some(flow) = self.table.get_mut(&key)
            && flow.follower.ciphertext()
            && !flow.follower.ended()
        {
            if flow.tls_linger.is_none() {
                let deadline = now + TLS_LINGER;
                flow.tls_linger = Some((deadline, flags));
                self.next_gap = Some(self.next_gap.map_or(deadline, |d| d.min(deadline)));
            }
            return;
        }
        self.close_now(key, flags, now, c, out);
    }

    /// Ends the flow now: what still waits is lost; the consumer's session ends.
    fn close_now(
        &mut self,
        key: FlowKey,
        flags: u8,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        let Some(mut flow) = self.table.remove(&key) else {
            return;
        };
        Self::count_close(flags, c);
        self.pending_bytes -= flow.pending_bytes;
        PipelineCounters::add(&c.gap_bytes, flow.pending_bytes as u64);
        let before = out.len();
        let ended = flow.end(out);
        if out.len() > before {
            PipelineCounters::add(&c.close_quits, 1);
        }
        out.push(Output::Closed { ended });
        // Where the flow's bytes end (its FIN, or the last byte waiting past a gap at a RST):
        // anything at or before that is a retransmission.
        let last = flow
            .pending
            .last_key_value()
            .map_or(flow.pos, |(at, d)| at + d.len() as u64)
            .max(flow.fin.unwrap_or(0))
            .max(flow.pos);
        let last_seq = flow.next_seq.wrapping_add((last - flow.pos) as u32);
        self.remember_closed(key, last_seq, now, c);
    }

    /// After the stream moved: the flow ends if it reached its FIN; a FIN past a gap waits
    /// (and times out) like bytes do.
    fn after_progress(
        &mut self,
        key: FlowKey,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        let Some(fin) = self
            .table
            .get(&key)
            .and_then(|f| f.fin.map(|at| (at, f.pos)))
        else {
            return;
        };
        match fin {
            (at, pos) if at <= pos => self.close(key, TCP_FIN, now, c, out),
            _ => self.gap_opened(key, now, c),
        }
    }

    /// A flow now has bytes (or its FIN) waiting past a gap.
    fn gap_opened(&mut self, key: FlowKey, now: Instant, c: &PipelineCounters) {
        let Some(flow) = self.table.get_mut(&key) else {
            return;
        };
        if flow.gap_since.is_none() {
            flow.gap_since = Some(now);
            PipelineCounters::add(&c.seq_gaps, 1);
            let deadline = now + GAP_TIMEOUT;
            self.next_gap = Some(self.next_gap.map_or(deadline, |d| d.min(deadline)));
        }
    }

    /// Publishes in-order bytes at `flow.next_seq`.
    fn emit(
        flow: &mut Flow,
        data: Bytes,
        policy: &Policy,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        flow.recent.remember(flow.pos, &data);
        flow.next_seq = flow.next_seq.wrapping_add(data.len() as u32);
        flow.pos += data.len() as u64;
        let before = out.len();
        flow.follower.feed(data, policy, c, out);
        flow.published |= out[before..].iter().any(|o| matches!(o, Output::Data(_)));
    }

    /// Whether `old`, delivered before and ending `behind` bytes before the expected one,
    /// differs from what was delivered (bytes from before the flow began are not known).
    fn old_differs(flow: &Flow, behind: u32, old: &[u8]) -> bool {
        flow.pos
            .checked_sub(u64::from(behind))
            .is_some_and(|at| flow.recent.differs(at, old))
    }

    /// A retransmission whose bytes differ from the first copy's: which one the server took
    /// is unknown, so the session ends there (unless its plaintext comes from TLS reads) and
    /// resumes at the next command.
    fn differs(flow: &mut Flow, c: &PipelineCounters, out: &mut Vec<Output>) {
        PipelineCounters::add(&c.retransmit_differs, 1);
        if !flow.follower.ciphertext() {
            if !flow.follower.ended() {
                out.push(Output::Quit);
            }
            flow.follower.resync();
        }
    }

    /// Publishes waiting segments that the stream has reached.
    fn drain_pending(
        flow: &mut Flow,
        total: &mut usize,
        policy: &Policy,
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
            if flow.recent.differs(at, &data[..old.min(data.len())]) {
                Self::differs(flow, c, out);
            }
            if old >= data.len() {
                PipelineCounters::add(&c.retransmitted_bytes, data.len() as u64);
                continue;
            }
            PipelineCounters::add(&c.retransmitted_bytes, old as u64);
            Self::emit(flow, data.slice(old..), policy, c, out);
        }
        if flow.pending.is_empty() && flow.fin.is_none_or(|at| at <= flow.pos) {
            flow.gap_since = None;
        }
    }

    /// Ends the session for the consumer at the gap, skips the missing bytes, and resumes at
    /// the next command (or reaches the FIN).
    fn give_up_gap(&mut self, key: FlowKey, c: &PipelineCounters, out: &mut Vec<Output>) {
        let Some(flow) = self.table.get_mut(&key) else {
            return;
        };
        let next = flow.pending.first_key_value().map(|(&at, _)| at);
        let Some(at) = next.into_iter().chain(flow.fin).min() else {
            return;
        };
        let missing = at.saturating_sub(flow.pos);
        PipelineCounters::add(&c.gap_bytes, missing);
        // A TLS session's ciphertext is not published: a gap in it loses nothing of the
        // plaintext, which comes from the server's reads.
        if !flow.follower.ended() && !flow.follower.ciphertext() {
            out.push(Output::Quit);
        }
        flow.follower.resync();
        flow.next_seq = flow.next_seq.wrapping_add(missing as u32);
        flow.pos = at.max(flow.pos);
        flow.gap_since = None;
        Self::drain_pending(flow, &mut self.pending_bytes, &self.policy, c, out);
        if !flow.pending.is_empty() || flow.fin.is_some_and(|f| f > flow.pos) {
            flow.gap_since = Some(flow.last_seen);
        }
    }

    /// Plaintext of `key`'s TLS session, as the server read it from position `at` on: to the
    /// session follower in the order the server read it (the ciphertext's TCP order and gaps
    /// do not apply). Reads arrive in order, so a position other than the one expected is
    /// plaintext the capture lost.
    pub fn plaintext(
        &mut self,
        key: FlowKey,
        at: u32,
        data: Bytes,
        now: Instant,
        c: &PipelineCounters,
        out: &mut Vec<Output>,
    ) {
        // The flow exists: its TLS request or its first encrypted segment came first (unless
        // the cap gave it up since).
        if !self.table.contains_key(&key) {
            self.make_room(c);
        }
        let flow = self.table.entry(key).or_insert_with(|| Flow::new(0, now));
        flow.last_seen = now;
        let before = out.len();
        let next = flow.plain_next.replace(at.wrapping_add(data.len() as u32));
        // The first record's position is 0 unless reads before it were lost (or were made
        // before the agent started, which the follower knows by itself).
        if next.unwrap_or(0) != at {
            let missing = at.wrapping_sub(next.unwrap_or(0));
            // A position behind the expected one cannot be placed at all.
            let missing = if (missing as i32) < 0 { 0 } else { missing };
            flow.follower
                .plaintext_lost(u64::from(missing), flow.published, c, out);
        }
        flow.follower.plaintext(data, &self.policy, c, out);
        flow.published |= out[before..].iter().any(|o| matches!(o, Output::Data(_)));
        if let Some((_, flags)) = flow.tls_linger
            && flow.follower.ended()
        {
            // Its FIN came, and now the client's COM_QUIT.
            self.close_now(key, flags, now, c, out);
        }
    }

    /// When a gap may time out (without a scan of the table: this is asked on every drain).
    /// It may be early, when gaps closed since.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_gap
    }

    /// Gives up gaps open longer than [`GAP_TIMEOUT`] (every gap, with `all`: at exit).
    pub fn on_timeout(
        &mut self,
        now: Instant,
        all: bool,
        c: &PipelineCounters,
        out: &mut Vec<(FlowKey, Output)>,
    ) {
        if !all && self.next_gap.is_none_or(|d| now < d) {
            return;
        }
        let lingered: Vec<(FlowKey, u8)> = self
            .table
            .iter()
            .filter_map(|(k, f)| f.tls_linger.map(|(t, flags)| (k, t, flags)))
            .filter(|(_, t, _)| all || now >= *t)
            .map(|(k, _, flags)| (*k, flags))
            .collect();
        let mut closed = Vec::new();
        for (key, flags) in lingered {
            self.close_now(key, flags, now, c, &mut closed);
            out.extend(closed.drain(..).map(|o| (key, o)));
        }
        let due: Vec<FlowKey> = self
            .table
            .iter()
            .filter(|(_, f)| f.gap_since.is_some_and(|t| all || now >= t + GAP_TIMEOUT))
            .map(|(k, _)| *k)
            .collect();
        let mut step = Vec::new();
        for key in due {
            while self
                .table
                .get(&key)
                .is_some_and(|f| f.gap_since.is_some_and(|t| all || now >= t + GAP_TIMEOUT))
            {
                PipelineCounters::add(&c.gap_timeouts, 1);
                self.give_up_gap(key, c, &mut step);
                self.after_progress(key, now, c, &mut step);
                out.extend(step.drain(..).map(|o| (key, o)));
            }
        }
        self.next_gap = self
            .table
            .values()
            .filter_map(|f| {
                let gap = f.gap_since.map(|t| t + GAP_TIMEOUT);
                let linger = f.tls_linger.map(|(t, _)| t);
                gap.into_iter().chain(linger).min()
            })
            .min();
    }

    /// Forgets flows idle for `idle`, and ended flows older than [`CLOSED_LINGER`]; returns
    /// how many flows. Bytes still waiting behind a gap are counted as lost (`gap_bytes`).
    pub fn expire(&mut self, now: Instant, idle: Duration, c: &PipelineCounters) -> usize {
        let before = self.table.len();
        let mut freed = 0;
        self.table.retain(|_, f| {
            // A pooled connection with statements open may sit idle for long: its statements
            // are kept until the server itself would have closed it.
            let idle = if f.follower.has_statements() {
                idle.max(STATEMENTS_IDLE)
            } else {
                idle
            };
            let keep = now.saturating_duration_since(f.last_seen) < idle;
            if !keep {
                freed += f.pending_bytes;
            }
            keep
        });
        self.pending_bytes -= freed;
        PipelineCounters::add(&c.gap_bytes, freed as u64);
        self.closed
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < CLOSED_LINGER);
        before - self.table.len()
    }

    /// The replicas' sessions in the process list (their binlog dump may have begun before
    /// capture, unseen) and their dump threads' ids: everything of theirs is left out, unless
    /// `include_replication`. Returns how many sessions were not replicas before.
    pub fn set_replicas(&mut self, replicas: HashSet<SessionKey>, ids: HashSet<u64>) -> usize {
        let new = replicas.difference(&self.replicas).count();
        if !self.policy.include_replication {
            for (key, flow) in &mut self.table {
                if replicas.contains(&key.client) {
                    flow.follower.mark_replica();
                }
            }
        }
        self.replicas = replicas;
        self.policy.replica_ids = ids;
        new
    }

    /// Sessions with flow state.
    pub fn sessions(&self) -> impl Iterator<Item = SessionKey> + '_ {
        self.table.keys().map(|k| k.client)
    }

    /// Those of `sessions` whose stream already ended for the consumer (their COM_QUIT, the
    /// client's or one for a loss, is published) while their flow is still open: a TLS
    /// session's FIN waiting behind a gap in its ciphertext, say.
    pub fn ended_sessions(&self, sessions: &[SessionKey]) -> Vec<SessionKey> {
        self.table
            .iter()
            .filter(|(k, f)| f.follower.ended() && sessions.contains(&k.client))
            .map(|(k, _)| k.client)
            .collect()
    }

    /// Frees a session's flows; bytes still waiting behind a gap are counted as lost.
    pub fn forget(&mut self, session: &SessionKey, c: &PipelineCounters) {
        let mut freed = 0;
        self.table.retain(|k, f| {
            let keep = k.client != *session;
            if !keep {
                freed += f.pending_bytes;
            }
            keep
        });
        self.pending_bytes -= freed;
        PipelineCounters::add(&c.gap_bytes, freed as u64);
    }

    /// Open flows.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Ended flows still remembered.
    pub fn closed_len(&self) -> usize {
        self.closed.len()
    }

    /// Bytes waiting behind gaps.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        protocol::command,
        session::{SEMI_SYNC_ACK, test_support::*},
    };

    fn key() -> FlowKey {
        server(3306)
    }

    fn server(port: u16) -> FlowKey {
        FlowKey {
            client: ("198.18.0.2".parse().unwrap(), 40000),
            server: ("198.18.0.1".parse().unwrap(), port),
        }
    }

    fn seg(seq: u32, flags: u8, data: &[u8]) -> Segment {
        Segment::new(
            seq,
            0,
            data.len() as u32,
            flags,
            Bytes::copy_from_slice(data),
        )
    }

    /// Feeds segments (seq, bytes); returns the published stream with `Q` for each COM_QUIT.
    fn feed(f: &mut Flows, c: &PipelineCounters, segs: &[(u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, data) in segs {
            f.accept(key(), seg(*seq, 0, data), Instant::now(), c, &mut out);
        }
        flatten(out)
    }

    /// A retransmission whose bytes differ from what was delivered (whole, or its old head),
    /// or from a copy waiting behind a gap, ends the session there; it resumes at the next
    /// command. Identical copies are only retransmissions.
    #[test]
    fn differing_retransmitted_bytes_end_the_session() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let q = |n: u8| packet(command::QUERY, &[b'S', b'E', b'L', b' ', b'0' + n]);
        let (q1, q2, q3, q4, q5) = (q(1), q(2), q(3), q(4), q(5));
        let len = q1.len() as u32;
        let at = |n: u32| 1000 + n * len;
        let changed = |p: &[u8]| {
            let mut p = p.to_vec();
            *p.last_mut().unwrap() ^= 1;
            p
        };
        let q2_and_q3: Vec<u8> = [changed(&q2), q3.clone()].concat();
        let got = feed(
            &mut f,
            &c,
            &[
                (at(0), &q1),
                (at(0), &q1),
                (at(0), &changed(&q1)),
                (at(1), &q2),
                (at(1), &q2_and_q3),
                // q4 is late: q5 waits, and a differing copy of it comes.
                (at(4), &q5),
                (at(4), &changed(&q5)),
                (at(3), &q4),
            ],
        );
        let want: Vec<u8> = [&q1[..], b"Q", &q2, b"Q", &q3, b"Q", &q4, &q5].concat();
        assert_eq!(got, want);
        let l = c.load();
        assert_eq!((l.retransmit_differs, l.retransmitted), (3, 3));
    }

    /// A TLS session's plaintext with reads lost (the kernel's position jumps): what was
    /// published ends with a COM_QUIT, the session goes on from the next read that starts a
    /// command (a header read alone, as MariaDB reads), and a hole before the first record
    /// publishes nothing until a command.
    #[test]
    fn tls_plaintext_lost_ends_the_session_and_resumes_at_a_command() {
        use mysql_common::constants::CapabilityFlags as F;

        use crate::protocol::{self, test_support::handshake};
        let base = (F::CLIENT_PROTOCOL_41 | F::CLIENT_SECURE_CONNECTION).bits();
        let mut request = (base | F::CLIENT_SSL.bits()).to_le_bytes().to_vec();
        request.resize(32, 0);
        let hs = protocol::packet(2, &handshake(base | F::CLIENT_SSL.bits(), &[3; 20], None));
        let q = |n: u8| packet(command::QUERY, &[b'S', b'E', b'L', b' ', b'0' + n]);
        // Reads as MariaDB makes them: a header, then its payload.
        let reads = |p: &[u8]| vec![p[..4].to_vec(), p[4..].to_vec()];
        let start = |f: &mut Flows, c: &PipelineCounters| {
            let mut out = Vec::new();
            let now = Instant::now();
            f.accept(key(), seg(99, TCP_SYN, &[]), now, c, &mut out);
            f.accept(
                key(),
                seg(100, 0, &protocol::packet(1, &request)),
                now,
                c,
                &mut out,
            );
            f.accept(
                key(),
                seg(136, 0, &[0x16, 3, 1, 0, 2, 1, 0]),
                now,
                c,
                &mut out,
            );
            out
        };
        let plain = |f: &mut Flows, c: &PipelineCounters, reads: &[(u32, Vec<u8>)]| {
            let mut out = Vec::new();
            for (at, r) in reads {
                f.plaintext(
                    key(),
                    *at,
                    Bytes::from(r.clone()),
                    Instant::now(),
                    c,
                    &mut out,
                );
            }
            flatten(out)
        };
        let published_hs = protocol::packet(1, &handshake(base, &[3; 20], None));

        // Whole reads lost between commands, then a payload read lost after its header.
        for lose_body in [false, true] {
            let (c, mut f) = (PipelineCounters::default(), Flows::default());
            start(&mut f, &c);
            let mut at = 0u32;
            let mut all = Vec::new();
            for r in [vec![hs.clone()], reads(&q(1)), reads(&q(2)), reads(&q(3))].concat() {
                all.push((at, r.clone()));
                at += r.len() as u32;
            }
            // q(2)'s reads (or its payload read only) never came.
            let lost = if lose_body { 4..5 } else { 3..5 };
            let missing: u64 = all[lost.clone()].iter().map(|(_, r)| r.len() as u64).sum();
            let kept: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| !lost.contains(i))
                .map(|(_, r)| r.clone())
                .collect();
            let got = plain(&mut f, &c, &kept);
            let want = [published_hs.clone(), q(1), b"Q".to_vec(), q(3)].concat();
            assert_eq!(got, want, "lose_body {lose_body}");
            let l = c.load();
            assert_eq!(l.tls_gaps, 1);
            // The header read of a lost payload is left out as well.
            let left_out = if lose_body { 4 } else { 0 };
            assert_eq!(l.gap_bytes, missing + left_out, "lose_body {lose_body}");
        }

        // The handshake response lost: nothing (no COM_QUIT either) until a command.
        let (c, mut f) = (PipelineCounters::default(), Flows::default());
        start(&mut f, &c);
        let at = hs.len() as u32;
        let r = reads(&q(1));
        let got = plain(&mut f, &c, &[(at, r[0].clone()), (at + 4, r[1].clone())]);
        assert_eq!(got, q(1));
        assert_eq!(c.load().tls_gaps, 1);

        // In order: no loss counted.
        let (c, mut f) = (PipelineCounters::default(), Flows::default());
        start(&mut f, &c);
        let mut at = 0;
        let mut all = Vec::new();
        for r in [vec![hs.clone()], reads(&q(1))].concat() {
            all.push((at, r.clone()));
            at += r.len() as u32;
        }
        assert_eq!(plain(&mut f, &c, &all), [published_hs, q(1)].concat());
        assert_eq!(c.load().tls_gaps, 0);
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
        // The deadline kept for the closed gap is early: reaching it gives up nothing and
        // clears it.
        let mut out = Vec::new();
        f.on_timeout(f.next_deadline().unwrap(), false, &c, &mut out);
        assert!(out.is_empty());
        assert_eq!((f.next_deadline(), c.load().gap_timeouts), (None, 0));
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
        let q = packet(command::QUERY, b"SELECT 1");
        let n = q.len() as u32;
        let mut segs: Vec<(u32, &[u8])> = vec![(0, &q)];
        // Byte n is missing; 9 MiB wait behind it.
        for i in 0..9u32 {
            segs.push((n + 1 + i * (1 << 20), &big));
        }
        let got = feed(&mut f, &c, &segs);
        assert_eq!(
            got[..q.len() + 1],
            [&q[..], b"Q"].concat(),
            "the session ends at the gap"
        );
        assert_eq!(c.load().gap_overflow, 1);
        assert!(f.pending_bytes() <= FLOW_PENDING_MAX);
    }

    #[test]
    fn a_new_connection_on_the_same_address_restarts_the_flow() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let (old, new) = (
            packet(command::QUERY, b"old"),
            packet(command::QUERY, b"new"),
        );
        let got = feed(
            &mut f,
            &c,
            &[(1000, &old), (1000u32.wrapping_sub(64 << 20), &new)],
        );
        assert_eq!(got, [&old[..], b"Q", &new].concat());
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

    /// Feeds (flags, seq, bytes) at `now`; returns the outputs flattened.
    fn run(f: &mut Flows, c: &PipelineCounters, k: FlowKey, segs: &[(u8, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (flags, seq, data) in segs {
            f.accept(k, seg(*seq, *flags, data), Instant::now(), c, &mut out);
        }
        flatten(out)
    }

    fn client(port: u16) -> FlowKey {
        FlowKey {
            client: ("198.18.0.2".parse().unwrap(), port),
            ..key()
        }
    }

    #[test]
    fn at_the_cap_flows_that_published_nothing_go_first_then_the_longest_idle_with_a_quit() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        f.set_max_flows(32);
        let q = packet(command::QUERY, b"SELECT 1");
        // A session that published, then a SYN flood of 200 connections that send nothing.
        assert_eq!(
            run(&mut f, &c, client(1), &[(TCP_SYN, 99, b""), (0, 100, &q)]),
            q
        );
        for port in 1000..1200 {
            run(&mut f, &c, client(port), &[(TCP_SYN, 7, b"")]);
            assert!(f.len() <= 32, "{}", f.len());
        }
        assert!(
            f.table.contains_key(&client(1)),
            "the published session was evicted"
        );
        let evicted = f.take_evicted();
        let l = c.load();
        assert!(l.flow_evicted >= 200 - 31, "{}", l.flow_evicted);
        assert!(
            evicted.is_empty(),
            "nothing was published for the flood: nothing to end ({evicted:?})"
        );
        // Only published sessions: the longest idle goes, with its COM_QUIT.
        for port in 2000..2031 {
            run(
                &mut f,
                &c,
                client(port),
                &[(TCP_SYN, 99, b""), (0, 100, &q)],
            );
        }
        let _ = f.take_evicted();
        run(
            &mut f,
            &c,
            client(3000),
            &[(TCP_SYN, 99, b""), (0, 100, &q)],
        );
        let evicted = f.take_evicted();
        assert!(evicted.contains(&(client(1), Output::Quit)), "{evicted:?}");
        assert!(!f.table.contains_key(&client(1)));
        assert!(f.table.contains_key(&client(3000)));
        // Ended flows are remembered within the same cap, the rest counted.
        let before = c.load().closed_unremembered;
        for port in 4000..4100 {
            run(&mut f, &c, client(port), &[(TCP_RST, 5, b"")]);
        }
        assert!(f.closed_len() <= 32);
        assert_eq!(c.load().closed_unremembered - before, 100 - 32);
    }

    /// Found by the permutation property: a flow joined mid-stream whose first packet is an
    /// empty COM_QUERY, followed in the same segment by the next packet, whose header bytes
    /// (`00 01 ...`) once passed for an attribute block, ending the session.
    #[test]
    fn an_empty_query_joined_mid_stream_is_not_taken_for_query_attributes() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let stream = [
            packet(command::QUERY, b""),
            packet(command::QUERY, &[b'a'; 255]),
        ]
        .concat();
        let segs: Vec<(u32, &[u8])> = stream
            .chunks(7)
            .enumerate()
            .map(|(n, s)| ((n * 7) as u32, s))
            .collect();
        assert_eq!(feed(&mut f, &c, &segs), stream);
        assert_eq!(c.load().unreplayable_attributes, 0);
    }

    #[test]
    fn a_syn_fixes_the_start_so_a_late_first_segment_is_not_lost() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let isn = u32::MAX;
        let q = packet(command::QUERY, b"SELECT 1");
        let got = run(
            &mut f,
            &c,
            key(),
            &[
                (TCP_SYN, isn, b""),
                (TCP_SYN, isn, b""),
                (0, 5, &q[5..]),
                (0, 0, &q[..5]),
            ],
        );
        assert_eq!(got, q);
        let l = c.load();
        // The SYN seen twice counts once as opened, once as a retransmission.
        assert_eq!((l.syn_opened, l.seq_gaps, l.retransmitted), (1, 1, 0));
        assert_eq!(l.syn_retransmitted, 1);
        // A SYN handed over after the first bytes of its connection is not a new connection.
        let got = run(
            &mut f,
            &c,
            server(3307),
            &[(0, 100, &q[..2]), (TCP_SYN, 99, b""), (0, 102, &q[2..])],
        );
        assert_eq!(got, q);
        assert_eq!(c.load().flow_restarts, 0);
    }

    #[test]
    fn a_fin_ends_the_flow_once_the_bytes_before_it_arrived() {
        let quit = packet(command::QUIT, b"");
        let q = packet(command::QUERY, b"SELECT 1");
        let n = q.len() as u32;
        // The client's COM_QUIT before the FIN: nothing synthetic.
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let got = run(
            &mut f,
            &c,
            key(),
            &[
                (TCP_SYN, 99, b""),
                (0, 100 + n, &quit),
                (TCP_FIN, 100 + n + quit.len() as u32, b""),
            ],
        );
        assert!(got.is_empty(), "the FIN waits for the gap");
        assert_eq!(f.len(), 1);
        let got = run(
            &mut f,
            &c,
            key(),
            &[
                (0, 100, &q),
                (0, 100, &q),
                (TCP_FIN, 100 + n + quit.len() as u32, b""),
            ],
        );
        assert_eq!(got, [&q[..], &quit, b"C"].concat());
        assert_eq!(
            (f.len(), f.closed_len(), f.next_deadline().is_some()),
            (0, 1, true)
        );
        // Late retransmissions (data, FIN) after the end are not a new connection.
        assert!(
            run(
                &mut f,
                &c,
                key(),
                &[(0, 100, &q), (TCP_FIN, 100 + n + quit.len() as u32, b"")]
            )
            .is_empty()
        );
        let l = c.load();
        assert_eq!((l.fin_closed, l.close_quits, l.retransmitted), (1, 0, 2));
        // No COM_QUIT from the client, and a FIN that carries the last bytes: synthetic one.
        let got = run(
            &mut f,
            &c,
            server(3307),
            &[(0, 7, &q), (TCP_FIN, 7 + n, &q)],
        );
        assert_eq!(got, [&q[..], &q, b"QC"].concat());
        assert_eq!(c.load().close_quits, 1);
        // The end of a connection that sent nothing while captured: the bootstrap decides.
        assert_eq!(run(&mut f, &c, server(3308), &[(TCP_FIN, 7, b"")]), b"c");
        // A new connection on the address opens with its SYN, the old one long forgotten.
        let got = run(&mut f, &c, key(), &[(TCP_SYN, 5000, b""), (0, 5001, &q)]);
        assert_eq!(got, q);
        let later = Instant::now() + CLOSED_LINGER;
        f.expire(later, CLOSED_LINGER * 10, &c);
        assert_eq!((f.len(), f.closed_len()), (1, 0));
    }

    #[test]
    fn a_rst_ends_the_flow_at_once_and_counts_what_waited() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let q = packet(command::QUERY, b"SELECT 1");
        let got = run(
            &mut f,
            &c,
            key(),
            &[
                (0, 0, &q),
                (0, 100, b"waiting"),
                (TCP_RST, 50, b""),
                (0, 100, b"waiting"),
            ],
        );
        assert_eq!(got, [&q[..], b"QC"].concat());
        let l = c.load();
        assert_eq!(
            (l.rst_closed, l.close_quits, l.gap_bytes, l.retransmitted),
            (1, 1, 7, 1)
        );
        assert_eq!((f.len(), f.pending_bytes()), (0, 0));
    }

    #[test]
    fn a_rst_outside_the_window_is_ignored_like_the_server_does() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let q = packet(command::QUERY, b"SELECT 1");
        let r = packet(command::QUERY, b"SELECT 2");
        let end = q.len() as u32;
        let got = run(
            &mut f,
            &c,
            key(),
            &[
                (0, 0, &q),
                // Behind the next byte (a stale RST), and far past it.
                (TCP_RST, 3, b""),
                (TCP_RST, end + (MAX_REORDER_DISTANCE + 1), b""),
                (0, end, &r),
                // At the next byte: the connection ends.
                (TCP_RST, end + r.len() as u32, b""),
            ],
        );
        assert_eq!(got, [&q[..], &r[..], b"QC"].concat());
        let l = c.load();
        assert_eq!((l.rst_ignored, l.rst_closed, l.close_quits), (2, 1, 1));
        assert_eq!(f.len(), 0);
    }

    #[test]
    fn a_fin_past_a_gap_that_never_fills_times_out() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let q = packet(command::QUERY, b"SELECT 1");
        let got = run(&mut f, &c, key(), &[(0, 0, &q), (TCP_FIN, 1000, b"")]);
        assert_eq!(got, q);
        let mut out = Vec::new();
        f.on_timeout(f.next_deadline().unwrap(), false, &c, &mut out);
        assert_eq!(flatten(out.into_iter().map(|(_, o)| o).collect()), b"QC");
        assert_eq!(
            (f.len(), c.load().gap_timeouts, c.load().gap_bytes),
            (0, 1, 1000 - q.len() as u64)
        );
    }

    #[test]
    fn one_client_address_to_two_servers_is_two_flows() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let (q, r) = (
            packet(command::QUERY, b"SELECT 1"),
            packet(command::QUERY, b"SELECT 2"),
        );
        let got = run(&mut f, &c, key(), &[(0, 0, &q[..6])]);
        let other = run(
            &mut f,
            &c,
            server(3307),
            &[(0, 1 << 30, &r[..6]), (0, (1 << 30) + 6, &r[6..])],
        );
        let more = run(&mut f, &c, key(), &[(0, 6, &q[6..])]);
        assert_eq!(
            (got, other, more),
            (q[..6].to_vec(), r.clone(), q[6..].to_vec())
        );
        assert_eq!((f.len(), c.load().flow_restarts), (2, 0));
        assert_eq!(
            f.sessions().collect::<std::collections::HashSet<_>>().len(),
            1
        );
        f.forget(&key().client, &c);
        assert!(f.is_empty());
    }

    #[test]
    fn a_replica_the_process_list_shows_is_left_out() {
        let mut ack = packet(SEMI_SYNC_ACK, &[0x38, 0x40, 1, 0, 0, 0, 0, 0]);
        ack.extend_from_slice(b"mysql-bin.001516");
        ack[0] += 16;
        let q = packet(command::QUERY, b"SET @master_heartbeat_period=1");
        // A replica the process list shows, whose binlog dump began before capture: its
        // flow leaves everything out.
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        f.set_replicas([key().client].into_iter().collect(), HashSet::default());
        let got = feed(&mut f, &c, &[(0, &[ack.clone(), q.clone()].concat())]);
        assert!(got.is_empty());
        assert_eq!(c.load().semi_sync_acks, 1);
    }

    /// The reply of a connection whose stream has a gap is not paired.
    #[test]
    fn a_reply_while_a_gap_is_open_is_not_paired() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        f.set_prepared(true);
        let q = packet(command::QUERY, b"SELECT 1");
        let at = q.len() as u32;
        feed(&mut f, &c, &[(0, &q)]);
        let p = packet(0x16, b"SELECT ?");
        feed(&mut f, &c, &[(at + 10, &p)]);
        let before = c.load().stmt_reply_unmatched;
        f.reply(key(), 1, &prepare_ok(10, 1), &c);
        assert_eq!(c.load().stmt_reply_unmatched, before + 1);
    }

    proptest! {
        /// Any order and duplication of a stream's segments (within the reorder bound) gives
        /// back the stream: queries of any length, cut anywhere.
        #[test]
        fn any_permutation_and_duplication_gives_the_stream(
            isn in any::<u32>(),
            queries in proptest::collection::vec(0usize..5000, 1..20),
            cuts in proptest::collection::vec(1usize..3000, 1..40),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..80),
        ) {
            let stream: Vec<u8> = queries
                .iter()
                .flat_map(|&n| packet(command::QUERY, &(0..n).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>()))
                .collect();
            let mut segs = Vec::new();
            let mut at = 0;
            for len in cuts.iter().cycle() {
                if at == stream.len() {
                    break;
                }
                let len = (*len).min(stream.len() - at);
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
            f.accept(key(), seg(segs[0].0, 0, &segs[0].1), Instant::now(), &c, &mut out);
            for (seq, data) in arrivals {
                f.accept(key(), seg(seq, 0, &data), Instant::now(), &c, &mut out);
            }
            prop_assert_eq!(flatten(out), stream);
            prop_assert_eq!(f.pending_bytes(), 0);
        }
    }
}
