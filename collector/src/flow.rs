//! Flow handling: per-session state between capture and publishing.
//!
//! TC ingress sees a segment before TCP does, so a retransmission arrives twice. Each session
//! remembers the next byte it expects; data before it was published already and is not
//! published again (a segment that overlaps is trimmed to its new bytes). A segment that starts
//! past the expected byte is published as it is and counted as a gap.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    capture::{Record, RecordSink},
    publish::Fanout,
    status::PipelineCounters,
};

/// A client session as the server sees it: the client's address and port.
pub type SessionKey = (IpAddr, u16);

/// How far before the expected byte a segment may start and still count as a retransmission.
/// Retransmitted data lies within the receive window; a segment further back is taken as a new
/// connection reusing the port (Linux ISNs for one address pair grow with time).
const MAX_RETRANSMIT_DISTANCE: u32 = 16 << 20;

#[derive(Debug)]
struct Flow {
    next_seq: u32,
    last_seen: Instant,
}

/// What to publish of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Publish `data[skip..]`.
    From(usize),
    /// Every byte was published already.
    Duplicate,
}

/// Next expected byte per session.
#[derive(Debug, Default)]
pub struct Flows {
    table: HashMap<SessionKey, Flow>,
}

impl Flows {
    /// Decides what of a segment of `len` bytes at `seq` is new, and moves the session on.
    pub fn admit(
        &mut self,
        key: SessionKey,
        seq: u32,
        len: usize,
        now: Instant,
        counters: &PipelineCounters,
    ) -> Admit {
        let end = seq.wrapping_add(len as u32);
        let flow = self.table.entry(key).or_insert(Flow {
            next_seq: seq,
            last_seen: now,
        });
        flow.last_seen = now;
        let behind = flow.next_seq.wrapping_sub(seq);
        if behind == 0 || behind > MAX_RETRANSMIT_DISTANCE {
            // Ahead of the expected byte: something is missing (or comes later).
            if behind != 0 && (seq.wrapping_sub(flow.next_seq) as i32) > 0 {
                PipelineCounters::add(&counters.seq_gaps, 1);
            }
            flow.next_seq = end;
            return Admit::From(0);
        }
        if behind as usize >= len {
            PipelineCounters::add(&counters.retransmitted, 1);
            PipelineCounters::add(&counters.retransmitted_bytes, len as u64);
            return Admit::Duplicate;
        }
        PipelineCounters::add(&counters.retransmitted_bytes, behind as u64);
        flow.next_seq = end;
        Admit::From(behind as usize)
    }

    /// Forgets sessions idle for `idle`; returns how many.
    pub fn expire(&mut self, now: Instant, idle: Duration) -> usize {
        let before = self.table.len();
        self.table
            .retain(|_, f| now.saturating_duration_since(f.last_seen) < idle);
        before - self.table.len()
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// The record sink of the agent: flow handling, then the MRTE fan-out.
pub struct Pipeline {
    pub flows: Flows,
    pub fanout: Fanout,
    counters: Arc<PipelineCounters>,
    /// The time of the current drain: one clock read per drain, not per record.
    now: Instant,
}

impl Pipeline {
    pub fn new(fanout: Fanout, counters: Arc<PipelineCounters>) -> Self {
        Self {
            flows: Flows::default(),
            fanout,
            counters,
            now: Instant::now(),
        }
    }
}

impl RecordSink for Pipeline {
    fn push(&mut self, r: Record) {
        let IpAddr::V4(ip) = r.src else {
            PipelineCounters::add(&self.counters.unencodable, 1);
            return;
        };
        match self.flows.admit(
            (r.src, r.sport),
            r.seq,
            r.data.len(),
            self.now,
            &self.counters,
        ) {
            Admit::From(skip) => self.fanout.push(ip, r.sport, &r.data[skip..], self.now),
            Admit::Duplicate => {}
        }
    }

    fn begin(&mut self) {
        self.now = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SessionKey {
        ("198.18.0.2".parse().unwrap(), 40000)
    }

    #[test]
    fn retransmissions_are_dropped_or_trimmed() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let t = Instant::now();
        let isn = u32::MAX - 5; // wraps inside the stream
        assert_eq!(f.admit(key(), isn, 10, t, &c), Admit::From(0));
        // The same segment again.
        assert_eq!(f.admit(key(), isn, 10, t, &c), Admit::Duplicate);
        // Overlapping: 4 old bytes, 6 new.
        assert_eq!(
            f.admit(key(), isn.wrapping_add(6), 10, t, &c),
            Admit::From(4)
        );
        // In order.
        assert_eq!(
            f.admit(key(), isn.wrapping_add(16), 5, t, &c),
            Admit::From(0)
        );
        let l = c.load();
        assert_eq!(
            (l.retransmitted, l.retransmitted_bytes, l.seq_gaps),
            (1, 14, 0)
        );
    }

    #[test]
    fn gaps_and_port_reuse_are_published() {
        let c = PipelineCounters::default();
        let mut f = Flows::default();
        let t = Instant::now();
        assert_eq!(f.admit(key(), 1000, 10, t, &c), Admit::From(0));
        // A hole of 90 bytes.
        assert_eq!(f.admit(key(), 1100, 10, t, &c), Admit::From(0));
        assert_eq!(c.load().seq_gaps, 1);
        // A new connection on the same port, far behind: not a retransmission.
        assert_eq!(
            f.admit(key(), 1110u32.wrapping_sub(64 << 20), 10, t, &c),
            Admit::From(0)
        );
        assert_eq!(c.load().retransmitted, 0);
        assert_eq!(
            f.expire(t + Duration::from_secs(5), Duration::from_secs(5)),
            1
        );
        assert!(f.is_empty());
    }
}
