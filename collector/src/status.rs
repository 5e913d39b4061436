//! The status line: every `--status_interval` seconds one line of per-second rates, a header
//! every 20 lines, in the original collector's columns, then this collector's own.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use collector_common::{Counter, Counters};

use crate::capture::DrainStats;

/// Declares the user-side counters once: the shared atomics the pipeline bumps, and the plain
/// snapshot the status line subtracts.
macro_rules! pipeline_counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of the user-side pipeline (flow handling, fan-out, publishers), shared
        /// between the tasks that bump them and the status line.
        #[derive(Debug, Default)]
        pub struct PipelineCounters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A snapshot of [`PipelineCounters`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct PipelineTotals {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl PipelineCounters {
            pub fn load(&self) -> PipelineTotals {
                PipelineTotals { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl PipelineTotals {
            /// Every counter with its name, for the exit summary.
            pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name)),*].into_iter()
            }
        }
    };
}

pipeline_counters! {
    /// Segments whose every byte had been published already (retransmissions).
    retransmitted,
    /// Bytes not published again: whole retransmissions and the overlapping heads of others.
    retransmitted_bytes,
    /// Gaps opened: a segment arrived past the next expected byte and waited for the bytes
    /// before it (reordering, or loss).
    seq_gaps,
    /// Gaps given up after `GAP_TIMEOUT` (30 s), and because the bytes waiting behind gaps
    /// passed 8 MiB in a flow or 64 MiB in all: the session got a COM_QUIT there.
    gap_timeouts,
    gap_overflow,
    /// Bytes never published because of given-up gaps: the missing ones, those skipped until
    /// the next command, and those still waiting behind a gap when the flow was freed.
    gap_bytes,
    /// Flows restarted because a segment was far from the expected byte: a new connection on
    /// the same client address.
    flow_restarts,
    /// Connections opened by a SYN the capture saw (their stream is exact from the first byte),
    /// and flows ended by the client's FIN (once every byte before it arrived) or RST.
    syn_opened,
    fin_closed,
    rst_closed,
    /// Synthetic COM_QUIT units for connections that ended (FIN/RST) without the client's own.
    close_quits,
    /// Replica sessions recognised by their COM_REGISTER_SLAVE / COM_BINLOG_DUMP(_GTID), and
    /// semi-sync ACK packets; the bytes of both left out of the replay stream.
    replication_sessions,
    semi_sync_acks,
    replication_bytes,
    /// `KILL` statements naming a replica's binlog dump thread (a semi-sync replica stopping
    /// kills its dump thread on the source), left out of the replay stream.
    replica_kills,
    /// Segments from IPv6 clients, which the MRTE format cannot carry.
    unencodable,
    /// Segments dropped because their publisher's queue was full.
    queue_full,
    /// Segments dropped because the queued bytes would pass `--max_mem_mb`.
    mem_limit,
    /// Messages handed to the broker, and the units and bytes in them.
    published_msgs,
    published_units,
    published_bytes,
    /// Failed publishes, nacks and failed reconnection attempts (MQError), and the units of
    /// messages lost (nacked, or unconfirmed when the channel broke).
    mq_errors,
    mq_error_units,
    /// Connections to the broker opened again after it went away.
    mq_reconnects,
    /// Sessions that lost units on the way to the broker (a dropped batch, a lost message):
    /// each got a synthetic COM_QUIT there; their units skipped until the next command.
    mq_lost_sessions,
    mq_lost_skipped,
    /// Synthetic COM_INIT_DB units sent for sessions open before capture (bootstrap).
    bootstrap_units,
    /// Sessions not bootstrapped because they changed database while the process list was
    /// being read (which database their earlier segments ran in is unknown).
    bootstrap_db_changed,
    /// Replicas' connections (binlog dump threads) seen in the process list and left out of
    /// the bootstrap and GC, each counted once.
    replication_skipped,
    /// Process-list rows whose host could not be mapped to an address.
    unresolved_hosts,
    /// Synthetic COM_QUIT units for sessions gone from the process list whose end the capture
    /// did not see.
    gc_quits,
    /// Sessions gone whose address a new session already uses: no COM_QUIT, which would end
    /// the new one.
    gc_port_reused,
    /// Segments of the collector's own MySQL connection, not published.
    own_traffic,
    /// Segments published before their session's bootstrap decision because holding them
    /// passed the time or memory limit.
    hold_overflow,
    /// Failed MySQL connects and process-list reads.
    mysql_errors,
}

impl PipelineCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Totals since start; the status line prints the difference of two of these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub kernel: Counters,
    /// What the drain lost or could not read between the kernel and the pipeline.
    pub drain: DrainStats,
    pub pipeline: PipelineTotals,
    /// The interface's rx_dropped counter.
    pub if_dropped: u64,
    /// Batches waiting in the publisher queues (a gauge, not a rate).
    pub waiting: u64,
    /// Sessions in the flow table, and bytes waiting behind gaps in it (gauges).
    pub flows: u64,
    pub reorder_bytes: u64,
    /// Bytes of the batches queued for the broker, against the memory plan's share (a gauge).
    pub queued_bytes: u64,
    /// The process's resident set now and at its peak (VmRSS, VmHWM).
    pub rss: (u64, u64),
}

impl Totals {
    /// TotalPacket: TCP segments to the captured port(s).
    pub fn total_packets(&self) -> u64 {
        self.kernel.get(Counter::TcpToPort)
    }
    /// ValidPacket: of those, segments with payload.
    pub fn valid_packets(&self) -> u64 {
        self.kernel.get(Counter::WithPayload)
    }
    /// PacketDropped: every loss inside the collector, from the kernel buffer to the
    /// publisher queues. Publish failures are MQError.
    pub fn dropped(&self) -> u64 {
        self.kernel.get(Counter::RingFull)
            + self.kernel.get(Counter::LoadFailed)
            + self.drain.lost
            + self.drain.malformed
            + self.pipeline.queue_full
            + self.pipeline.mem_limit
    }
    pub fn mq_errors(&self) -> u64 {
        self.pipeline.mq_errors
    }
    /// Gaps given up: the sessions got a COM_QUIT there.
    pub fn gaps_lost(&self) -> u64 {
        self.pipeline.gap_timeouts + self.pipeline.gap_overflow
    }

    /// Flows ended by FIN or RST.
    pub fn closed(&self) -> u64 {
        self.pipeline.fin_closed + self.pipeline.rst_closed
    }

    pub fn parse_errors(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_parse_error())
            .map(|&c| self.kernel.get(c))
            .sum()
    }
}

const HEADER_EVERY: u64 = 20;

/// Formats status lines; remembers the previous totals and how many lines it printed.
pub struct StatusLine {
    prev: Totals,
    lines: u64,
}

impl Default for StatusLine {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusLine {
    pub fn new() -> Self {
        Self {
            prev: Totals::default(),
            lines: 0,
        }
    }

    pub fn header() -> String {
        format!(
            "{:<19}{:>16}{:>16}{:>17}{:>19}{:>21}{:>16}{:>12}{:>11}{:>11}{:>11}{:>11}{:>12}{:>10}{:>12}{:>8}{:>10}{:>8}{:>8}{:>10}{:>7}",
            "DateTime",
            "TotalPacket",
            "ValidPacket",
            "PacketDropped",
            "PacketIfDropped",
            "WaitingQueueCnt",
            "MQError",
            "CaptureKB",
            "NoPayload",
            "Truncated",
            "ParseError",
            "Retransmit",
            "Unencodable",
            "Messages",
            "MySQLError",
            "Flows",
            "ReorderKB",
            "GapLost",
            "Closed",
            "QueuedKB",
            "RssMB",
        )
    }

    /// The next line (preceded by the header every 20 lines), rates over `elapsed`.
    pub fn next(&mut self, now: &Totals, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(0.001);
        let rate = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 / secs).round() as u64;
        let p = &self.prev;
        let mut out = String::new();
        if self.lines.is_multiple_of(HEADER_EVERY) {
            out.push_str(&Self::header());
            out.push('\n');
        }
        let _ = write!(
            out,
            "{:<19}{:>16}{:>16}{:>17}{:>19}{:>21}{:>16}{:>12}{:>11}{:>11}{:>11}{:>11}{:>12}{:>10}{:>12}{:>8}{:>10}{:>8}{:>8}{:>10}{:>7}",
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
            rate(now.total_packets(), p.total_packets()),
            rate(now.valid_packets(), p.valid_packets()),
            rate(now.dropped(), p.dropped()),
            rate(now.if_dropped, p.if_dropped),
            now.waiting,
            rate(now.mq_errors(), p.mq_errors()),
            rate(now.kernel.get(Counter::Bytes), p.kernel.get(Counter::Bytes)) / 1024,
            rate(
                now.kernel.get(Counter::NoPayload),
                p.kernel.get(Counter::NoPayload)
            ),
            rate(
                now.kernel.get(Counter::Truncated),
                p.kernel.get(Counter::Truncated)
            ),
            rate(now.parse_errors(), p.parse_errors()),
            rate(now.pipeline.retransmitted, p.pipeline.retransmitted),
            rate(now.pipeline.unencodable, p.pipeline.unencodable),
            rate(now.pipeline.published_msgs, p.pipeline.published_msgs),
            rate(now.pipeline.mysql_errors, p.pipeline.mysql_errors),
            now.flows,
            now.reorder_bytes / 1024,
            rate(now.gaps_lost(), p.gaps_lost()),
            rate(now.closed(), p.closed()),
            now.queued_bytes / 1024,
            now.rss.0 >> 20,
        );
        self.lines += 1;
        self.prev = now.clone();
        out
    }

    /// One line of totals since start, for exit; every counter that moved is listed.
    pub fn summary(now: &Totals) -> String {
        let mut out = format!(
            "Totals: TotalPacket={} ValidPacket={} PacketDropped={} PacketIfDropped={} \
             WaitingQueueCnt={} MQError={}",
            now.total_packets(),
            now.valid_packets(),
            now.dropped(),
            now.if_dropped,
            now.waiting,
            now.mq_errors(),
        );
        if now.rss.1 != 0 {
            let _ = write!(out, " rss_peak_mb={}", now.rss.1 >> 20);
        }
        let kernel = Counter::ALL.iter().map(|&c| (c.name(), now.kernel.get(c)));
        let drain = [("lost", now.drain.lost), ("malformed", now.drain.malformed)];
        for (name, v) in kernel.chain(drain).chain(now.pipeline.named()) {
            if v != 0 {
                let _ = write!(out, " {name}={v}");
            }
        }
        out
    }
}

/// The interface's rx_dropped (PacketIfDropped), 0 if unreadable.
pub fn if_rx_dropped(interface: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/statistics/rx_dropped"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_with_the_original() {
        let h = StatusLine::header();
        assert!(h.starts_with(
            "DateTime                TotalPacket     ValidPacket    PacketDropped    \
             PacketIfDropped      WaitingQueueCnt         MQError"
        ));
        let mut s = StatusLine::new();
        let mut t = Totals::default();
        t.kernel.0[Counter::TcpToPort as usize] = 400_050;
        t.kernel.0[Counter::WithPayload as usize] = 341_540;
        t.waiting = 1;
        let out = s.next(&t, Duration::from_secs(10));
        let row = out.lines().nth(1).unwrap();
        // Same widths as the original's sample row.
        assert_eq!(
            &row[19..],
            "           40005           34154                0                  0                    1               0           0          0          0          0          0           0         0           0       0         0       0       0         0      0"
        );
        // The header comes back every 20 lines.
        for _ in 0..19 {
            assert_eq!(s.next(&t, Duration::from_secs(10)).lines().count(), 1);
        }
        assert_eq!(s.next(&t, Duration::from_secs(10)).lines().count(), 2);
    }
}
