//! Command-line flags. Names follow the original collector (`--name=value`, snake_case) so that
//! existing start scripts keep working; `--name value` works too.

use std::net::Ipv4Addr;

use clap::Parser;

use crate::capture::{AttachMode, Transport};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mrte-collector",
    version,
    about = "Captures MySQL client requests with an eBPF TC ingress program and publishes them \
             to RabbitMQ in the MRTE format, for MRTE-Player and compatible replayers.",
    long_about = None,
    rename_all = "snake_case",
)]
pub struct Cli {
    /// Network interface to capture on (e.g. eth0, lo).
    #[arg(long, help_heading = "Capture")]
    pub interface: String,

    /// MySQL server port(s) to capture: one port or a comma list, at most 16.
    #[arg(long, value_delimiter = ',', default_value = "3306", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Capture")]
    pub port: Vec<u16>,

    /// Most payload bytes kept per TCP segment: 0 (whole segments, up to 64 KiB) or
    /// 4096..=65535. The original's 8192 cut large queries; every cut segment is counted
    /// (Truncated) and leaves that session's stream unusable for replay.
    #[arg(long, default_value_t = 0, value_parser = snapshot_len, help_heading = "Capture")]
    pub snapshot_len: u32,

    /// Longest time in milliseconds a captured segment waits in a batch before it is published.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000), help_heading = "Publishing")]
    pub read_timeout: u64,

    /// Publisher tasks, each with its own AMQP channel and queue.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=10), help_heading = "Publishing")]
    pub thread_count: u16,

    /// Batches each publisher's queue holds; when full, new batches are dropped and counted
    /// (PacketDropped).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(100..=5000), help_heading = "Publishing")]
    pub queue_size: u32,

    /// A batch is published once it holds more than this many segments.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=100_000), help_heading = "Publishing")]
    pub batch_segments: u64,

    /// A batch is published once it holds more than this many bytes.
    #[arg(long, default_value_t = 32768, value_parser = clap::value_parser!(u64).range(0..=(64 << 20)), help_heading = "Publishing")]
    pub batch_bytes: u64,

    /// Most MiB of messages queued for the broker; batches past it are dropped and counted
    /// (PacketDropped) instead of growing memory.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536), help_heading = "Publishing")]
    pub max_mem_mb: u64,

    /// LOCAL_IP written at the start of every message. Default: the interface's first IPv4
    /// address (127.0.0.1 on lo).
    #[arg(long, help_heading = "Publishing")]
    pub local_ip: Option<Ipv4Addr>,

    /// RabbitMQ host name or address.
    #[arg(long, default_value = "127.0.0.1", help_heading = "RabbitMQ")]
    pub rabbitmq_host: String,

    #[arg(long, default_value_t = 5672, help_heading = "RabbitMQ")]
    pub rabbitmq_port: u16,

    #[arg(long, default_value = "guest", help_heading = "RabbitMQ")]
    pub rabbitmq_user: String,

    /// Also read from MRTE_RABBITMQ_PASSWORD, which keeps it out of `ps`.
    #[arg(
        long,
        env = "MRTE_RABBITMQ_PASSWORD",
        hide_env_values = true,
        default_value = "guest",
        help_heading = "RabbitMQ"
    )]
    pub rabbitmq_password: String,

    #[arg(long, default_value = "/", help_heading = "RabbitMQ")]
    pub rabbitmq_vhost: String,

    /// Exchange the messages go to. It must exist (checked at start) unless --rabbitmq_declare.
    #[arg(long, default_value = "mrte", help_heading = "RabbitMQ")]
    pub rabbitmq_exchange_name: String,

    #[arg(long, default_value = "", help_heading = "RabbitMQ")]
    pub rabbitmq_routing_key: String,

    /// Create the exchange (fanout, durable) if it does not exist.
    #[arg(long, help_heading = "RabbitMQ")]
    pub rabbitmq_declare: bool,

    /// With --rabbitmq_declare: also create this queue (durable) and bind it to the exchange.
    #[arg(long, requires = "rabbitmq_declare", help_heading = "RabbitMQ")]
    pub rabbitmq_queue: Option<String>,

    /// Publisher confirms: a message the broker nacks counts as MQError.
    #[arg(long, help_heading = "RabbitMQ")]
    pub rabbitmq_confirm: bool,

    /// Seconds to wait for the broker at start.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300), help_heading = "RabbitMQ")]
    pub rabbitmq_connect_timeout: u64,

    /// MySQL server whose process list tells the default database of the sessions open
    /// before capture (session bootstrap) and which sessions ended (garbage collection). The
    /// user needs the PROCESS privilege.
    #[arg(long, default_value = "127.0.0.1", help_heading = "MySQL")]
    pub mysql_host: String,

    /// Default: the first --port.
    #[arg(long, help_heading = "MySQL")]
    pub mysql_port: Option<u16>,

    #[arg(long, default_value = "root", help_heading = "MySQL")]
    pub mysql_user: String,

    /// Also read from MRTE_MYSQL_PASSWORD, which keeps it out of `ps`.
    #[arg(
        long,
        env = "MRTE_MYSQL_PASSWORD",
        hide_env_values = true,
        default_value = "",
        help_heading = "MySQL"
    )]
    pub mysql_password: String,

    /// Run without the session bootstrap if MySQL cannot be reached (or read) at start; it is
    /// retried in the background. Without this, that is an error before capture starts.
    #[arg(long, help_heading = "MySQL")]
    pub mysql_optional: bool,

    /// Seconds to wait for MySQL at start.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300), help_heading = "MySQL")]
    pub mysql_connect_timeout: u64,

    /// Milliseconds between the first bootstrap pass (right after attaching) and the second,
    /// which catches sessions that were still authenticating.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..=600_000), help_heading = "MySQL")]
    pub bootstrap_second_pass_ms: u64,

    /// Seconds between two process-list reads for session garbage collection: sessions gone
    /// get a synthetic COM_QUIT.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400), help_heading = "MySQL")]
    pub gc_interval: u64,

    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 8, value_parser = ring_mb, help_heading = "Capture")]
    pub ring_buffer_mb: u32,

    /// How to attach: tcx (kernel 6.6+, detached by the kernel if the agent dies), netlink
    /// (clsact qdisc + filter), or auto (tcx where the kernel has it).
    #[arg(long, value_enum, default_value_t = AttachMode::Auto, help_heading = "Capture")]
    pub attach_mode: AttachMode,

    /// How records reach user space: ring (BPF ring buffer, record sized to the payload),
    /// ring_fixed (ring buffer, every record 16 KiB) or perf (per-CPU perf buffers, the skb
    /// appended by the helper). `ring` measured best (README, "Record transport").
    #[arg(long, value_enum, default_value_t = TransportArg::Ring, help_heading = "Capture")]
    pub transport: TransportArg,

    /// Least microseconds between two wake-ups of the agent by the kernel program. Waking on
    /// every record costs the server a self-IPI per request; a record whose wake-up was skipped
    /// waits at most about twice this long. 0 wakes on (nearly) every record.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=100_000), help_heading = "Capture")]
    pub wakeup_interval_us: u64,

    /// Publish replication traffic too: replicas' sessions (COM_REGISTER_SLAVE,
    /// COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID) and semi-sync ACK packets, which are left out
    /// of the replay stream (and counted) by default.
    #[arg(long, help_heading = "Capture")]
    pub include_replication: bool,

    /// Turn on the kernel's BPF run-time statistics while running, and print the capture
    /// program's average ns per packet in the exit summary (costs two clock reads per packet).
    #[arg(long, help_heading = "Status")]
    pub bpf_stats: bool,

    /// Seconds between status lines.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600), help_heading = "Status")]
    pub status_interval: u64,
}

impl Cli {
    /// The MySQL port of the bootstrap connection: --mysql_port, else the first --port.
    pub fn mysql_port(&self) -> u16 {
        self.mysql_port.unwrap_or(self.port[0])
    }
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
    if v == 0 || (4096..=65535).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is outside 4096..=65535 (or 0 for whole segments)"
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
