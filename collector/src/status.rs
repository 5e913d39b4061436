//! The status line: every `--status_interval` seconds one line of per-second rates, a header
//! every 20 lines, in the original collector's columns, then this collector's own.

use std::{fmt::Write as _, time::Duration};

use collector_common::{Counter, Counters};

/// Totals since start; the status line prints the difference of two of these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub kernel: Counters,
    /// Segments the collector lost after the kernel handed them over (queues full, ...).
    pub user_dropped: u64,
    /// The interface's rx_dropped counter.
    pub if_dropped: u64,
    /// Items waiting in the publisher queues (a gauge, not a rate).
    pub waiting: u64,
    pub mq_errors: u64,
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
    /// PacketDropped: every loss inside the collector, kernel buffer full included.
    pub fn dropped(&self) -> u64 {
        self.kernel.get(Counter::RingFull)
            + self.kernel.get(Counter::LoadFailed)
            + self.user_dropped
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
            "{:<19}{:>16}{:>16}{:>17}{:>19}{:>21}{:>16}{:>12}{:>11}{:>11}{:>11}",
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
            "{:<19}{:>16}{:>16}{:>17}{:>19}{:>21}{:>16}{:>12}{:>11}{:>11}{:>11}",
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
            rate(now.total_packets(), p.total_packets()),
            rate(now.valid_packets(), p.valid_packets()),
            rate(now.dropped(), p.dropped()),
            rate(now.if_dropped, p.if_dropped),
            now.waiting,
            rate(now.mq_errors, p.mq_errors),
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
        );
        self.lines += 1;
        self.prev = now.clone();
        out
    }

    /// One line of totals since start, for exit; every kernel counter that moved is listed.
    pub fn summary(now: &Totals) -> String {
        let mut out = format!(
            "Totals: TotalPacket={} ValidPacket={} PacketDropped={} PacketIfDropped={} \
             WaitingQueueCnt={} MQError={}",
            now.total_packets(),
            now.valid_packets(),
            now.dropped(),
            now.if_dropped,
            now.waiting,
            now.mq_errors,
        );
        for c in Counter::ALL {
            let v = now.kernel.get(c);
            if v != 0 {
                let _ = write!(out, " {}={v}", c.name());
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
            "           40005           34154                0                  0                    1               0           0          0          0          0"
        );
        // The header comes back every 20 lines.
        for _ in 0..19 {
            assert_eq!(s.next(&t, Duration::from_secs(10)).lines().count(), 1);
        }
        assert_eq!(s.next(&t, Duration::from_secs(10)).lines().count(), 2);
    }
}
