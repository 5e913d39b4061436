//! Memory: how `--max_mem_mb` is split, the budget the agent's buffers take from, and the
//! process's resident size for the status line.
//!
//! `--max_mem_mb` bounds the agent's RSS. Two parts of it are fixed: the ring buffer's mapping
//! (the kernel maps its data pages twice, so that a record wrapping around the end reads as one
//! piece: `2 × --ring_buffer_mb` of RSS) and the agent itself (code, runtime, client libraries,
//! the drain's arena: [`FIXED_MB`], measured under load with a margin). What is left is split
//! between what grows with traffic, each with its own cap so that none can starve the others:
//! segments held for the session bootstrap, segments waiting behind TCP gaps, the flow table,
//! and batches queued for the broker (the rest). Past a cap the buffer gives up its oldest or
//! newest data and counts it (`hold_overflow`, `gap_overflow`, `flow_evicted`, `mem_limit`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::capture::Transport;

/// The agent's RSS apart from the ring buffer and its buffers: ~22 MiB measured idle (half
/// code and libraries, half runtime and client libraries) and ~28 MiB under load (tokio and
/// lapin buffers, the drain's 1 MiB arena chunks in flight); the rest is margin.
pub const FIXED_MB: u64 = 36;
/// Least left over for the buffers that grow with traffic.
pub const MIN_BUFFERS_MB: u64 = 8;
/// Caps of the hold and the reorder buffers whatever the budget (what they need at most).
const HOLD_MAX: u64 = 32 << 20;
const REORDER_MAX: u64 = 64 << 20;
const FLOWS_MAX: u64 = 64 << 20;
/// What a flow costs: its table entry (392 bytes of key and state, with the hashes of its
/// last segments) with the hash table's control byte and spare capacity (up to half of it
/// empty after a growth), a session's small buffers. Measured by the `flood` test without the
/// cap: 120 MiB for 205,000 flows when an entry was 312 bytes; 80 bytes more since.
pub const FLOW_BYTES: u64 = 720;

impl MemoryPlan {
    /// Most flows the table may hold (and most ended flows remembered).
    pub fn max_flows(&self) -> usize {
        (self.flows / FLOW_BYTES).max(1024) as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "--max_mem_mb {max_mem_mb} is too small: the ring buffer (--ring_buffer_mb \
         {ring_mb}) takes {ring_rss_mb} MiB of RSS, the agent itself about {FIXED_MB} MiB, \
         and at least {MIN_BUFFERS_MB} MiB must be left for queued messages. Raise \
         --max_mem_mb to {least_mb} or more, or lower --ring_buffer_mb"
    )]
    TooSmall {
        max_mem_mb: u64,
        ring_mb: u64,
        ring_rss_mb: u64,
        least_mb: u64,
    },
}

/// How `--max_mem_mb` is split, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub total: u64,
    /// RSS of the kernel buffer's mapping.
    pub ring_rss: u64,
    pub fixed: u64,
    /// Segments held while the bootstrap decides on their sessions.
    pub hold: u64,
    /// Segments waiting behind TCP gaps.
    pub reorder: u64,
    /// The flow table and the ended flows remembered (at [`FLOW_BYTES`] a flow).
    pub flows: u64,
    /// Batches queued for the broker.
    pub queues: u64,
}

impl MemoryPlan {
    pub fn new(max_mem_mb: u64, ring_mb: u64, transport: Transport) -> Result<Self, MemoryError> {
        // Perf buffers are mapped once; a BPF ring buffer's data pages twice.
        let ring_rss_mb = match transport {
            Transport::PerfSkb => ring_mb,
            Transport::RingClasses | Transport::RingFixed => 2 * ring_mb,
        };
        let least_mb = ring_rss_mb + FIXED_MB + MIN_BUFFERS_MB;
        if max_mem_mb < least_mb {
            return Err(MemoryError::TooSmall {
                max_mem_mb,
                ring_mb,
                ring_rss_mb,
                least_mb,
            });
        }
        let buffers = (max_mem_mb - ring_rss_mb - FIXED_MB) << 20;
        let hold = (buffers / 4).min(HOLD_MAX);
        let reorder = (buffers / 8).min(REORDER_MAX);
        let flows = (buffers / 8).min(FLOWS_MAX);
        Ok(Self {
            total: max_mem_mb << 20,
            ring_rss: ring_rss_mb << 20,
            fixed: FIXED_MB << 20,
            hold,
            reorder,
            flows,
            queues: buffers - hold - reorder - flows,
        })
    }
}

/// Bytes taken by batches queued for the broker, against [`MemoryPlan::queues`].
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicU64,
    pub limit: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            limit,
        }
    }

    pub fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }

    pub fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// The process's resident set now and at its peak (VmRSS, VmHWM), in bytes; 0 if unreadable.
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let bytes = |name| proc_status_bytes(&status, name).unwrap_or(0);
    (bytes("VmRSS"), bytes("VmHWM"))
}

/// A `Name:   123 kB` field of a `/proc/PID/status` text, in bytes.
pub fn proc_status_bytes(status: &str, name: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_splits_what_the_fixed_parts_leave() {
        let p = MemoryPlan::new(64, 8, Transport::RingClasses).unwrap();
        assert_eq!(p.ring_rss, 16 << 20);
        let buffers = (64 - 16 - FIXED_MB) << 20;
        assert_eq!(p.hold + p.reorder + p.flows + p.queues, buffers);
        assert_eq!(p.hold, buffers / 4);
        assert_eq!(p.flows, buffers / 8);
        assert_eq!(p.max_flows(), (buffers / 8 / FLOW_BYTES) as usize);
        assert_eq!(
            p.ring_rss + p.fixed + p.hold + p.reorder + p.flows + p.queues,
            p.total
        );
        // Perf buffers are mapped once.
        let perf = MemoryPlan::new(64, 8, Transport::PerfSkb).unwrap();
        assert_eq!(perf.ring_rss, 8 << 20);
        // Large budgets: hold and reorder stop at what they can use, queues get the rest.
        let big = MemoryPlan::new(4096, 64, Transport::RingClasses).unwrap();
        assert_eq!(
            (big.hold, big.reorder, big.flows),
            (HOLD_MAX, REORDER_MAX, FLOWS_MAX)
        );
    }

    #[test]
    fn too_small_a_budget_says_what_would_do() {
        let e = MemoryPlan::new(64, 64, Transport::RingClasses).unwrap_err();
        let least = 128 + FIXED_MB + MIN_BUFFERS_MB;
        assert!(
            e.to_string().contains(&format!("to {least} or more")),
            "{e}"
        );
        assert!(MemoryPlan::new(least, 64, Transport::RingClasses).is_ok());
        assert!(MemoryPlan::new(least - 1, 64, Transport::RingClasses).is_err());
    }

    #[test]
    fn rss_reads_this_process() {
        let (now, peak) = rss();
        assert!(now > 1 << 20 && peak >= now, "{now} {peak}");
    }
}
