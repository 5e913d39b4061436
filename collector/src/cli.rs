//! Command-line flags. Names follow the original collector (`--name=value`, snake_case) so that
//! existing start scripts keep working; `--name value` works too.

use clap::Parser;

use crate::capture::{AttachMode, Transport};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mrte-collector",
    version,
    about = "Captures MySQL client requests with an eBPF TC ingress program.",
    long_about = None,
    rename_all = "snake_case",
)]
pub struct Cli {
    /// Network interface to capture on (e.g. eth0, lo).
    #[arg(long)]
    pub interface: String,

    /// MySQL server port(s) to capture: one port or a comma list, at most 16.
    #[arg(long, value_delimiter = ',', default_value = "3306", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,

    /// Most payload bytes handed over per TCP segment; 0 carries whole segments (up to 64 KiB).
    /// Every cut segment is counted (kernel counter `truncated`).
    #[arg(long, default_value_t = 0, value_parser = snapshot_len)]
    pub snapshot_len: u32,

    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 64, value_parser = ring_mb)]
    pub ring_buffer_mb: u32,

    /// How to attach: tcx (kernel 6.6+, detached by the kernel if the agent dies), netlink
    /// (clsact qdisc + filter), or auto (tcx where the kernel has it).
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach_mode: AttachMode,

    /// How records reach user space: ring (BPF ring buffer, record sized to the payload),
    /// ring_fixed (ring buffer, every record 16 KiB) or perf (per-CPU perf buffers, the skb
    /// appended by the helper). `ring` measured best (README, "Record transport").
    #[arg(long, value_enum, default_value_t = TransportArg::Ring)]
    pub transport: TransportArg,

    /// Least microseconds between two wake-ups of the agent by the kernel program. Waking on
    /// every record costs the server a self-IPI per request; a record whose wake-up was skipped
    /// waits at most about twice this long. 0 wakes on (nearly) every record.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub wakeup_interval_us: u64,

    /// Turn on the kernel's BPF run-time statistics while running, and print the capture
    /// program's average ns per packet in the exit summary (costs two clock reads per packet).
    #[arg(long)]
    pub bpf_stats: bool,

    /// Seconds between status lines.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub status_interval: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum TransportArg {
    Ring,
    RingFixed,
    Perf,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Ring => Transport::RingClasses,
            TransportArg::RingFixed => Transport::RingFixed,
            TransportArg::Perf => Transport::PerfSkb,
        }
    }
}

fn snapshot_len(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v == 0 || (64..=65535).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is outside 64..=65535 (or 0 for whole segments)"
        ))
    }
}

fn ring_mb(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if (1..=1024).contains(&v) && v.is_power_of_two() {
        Ok(v)
    } else {
        Err(format!("{v} is not a power of two in 1..=1024"))
    }
}
