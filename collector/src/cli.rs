//! Command-line flags. Names follow the original collector (`--name=value`, snake_case) so that
//! existing start scripts keep working; `--name value` works too. Without a subcommand the
//! agent runs (capture and publish); `inspect` and `publish-file` are tools beside it.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent::AgentConfig,
    bootstrap::MysqlConfig,
    capture::{AttachMode, CaptureConfig, Transport, tls::TlsHook},
    inspect::{InspectConfig, Source},
    publish::{BatchLimits, BrokerConfig},
};

/// inspect's drain cadence unless --wakeup_interval_us is given: prompt enough to watch.
const INSPECT_DRAIN_CADENCE: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Parser)]
#[command(
    name = "mrte-collector",
    version,
    about = "Captures MySQL client requests with an eBPF TC ingress program and publishes them \
             to RabbitMQ in the MRTE format, for MRTE-Player and compatible replayers.",
    long_about = None,
    rename_all = "snake_case",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Run,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Shows what is captured, one line per client command (tcpdump-like, MySQL-aware), from
    /// the kernel, a RabbitMQ queue or a recording. Needs neither MySQL nor RabbitMQ (except
    /// --from_queue).
    Inspect(Inspect),
    /// Publishes a recording made with --output file:PATH to RabbitMQ, message by message in
    /// the recorded order (so each session's order is kept).
    PublishFile(PublishFile),
    /// Prints the kernel structure offsets the TLS programs need, from the kernel's BTF (run
    /// by the agent itself in a child process, so that parsing 5 MB of BTF does not raise its
    /// own peak memory).
    #[command(hide = true)]
    TlsOffsets,
    /// Prints the man page (roff, section 8), generated from these flags (the package's).
    #[command(hide = true)]
    Man,
    /// Prints the shell completions for SHELL (the package's).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The man page of [`Cli`] (and its subcommands' flags), roff.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .section("8")
        .manual("System Administration")
        .render(&mut out)?;
    Ok(out)
}

/// The completions of [`Cli`] for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "mrte-collector", &mut out);
    out
}

/// The agent: capture, flows, bootstrap, publishing.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct Run {
    /// Read flags from FILE: one `flag = value` per line (`flag` alone for a switch), `#`
    /// comments. The command line, and a password's environment variable, override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Network interface to capture on (e.g. eth0, lo).
    #[arg(long, required = true, help_heading = "Capture")]
    pub interface: Option<String>,

    #[command(flatten)]
    pub capture: CaptureArgs,

    /// Publish replication traffic too: replicas' sessions (COM_REGISTER_SLAVE,
    /// COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID) and semi-sync ACK packets, which are left out
    /// of the replay stream (and counted) by default.
    #[arg(long, help_heading = "Capture")]
    pub include_replication: bool,

    /// on: server-side prepared statements are published as text: each COM_STMT_EXECUTE
    /// becomes the COM_QUERY it stands for (parameters as literals), and PREPARE, CLOSE,
    /// RESET, SEND_LONG_DATA and FETCH are left out; the statement ids come from the server's
    /// replies, which a second program on the interface's egress hands over. off: those
    /// packets are published as they are (the original's behaviour), nothing on egress.
    #[arg(long, value_enum, default_value_t = OnOff::On, help_heading = "Capture")]
    pub prepared_statements: OnOff,

    /// Longest time in milliseconds from a segment's capture to its batch's publishing: the
    /// agent drains the kernel's buffer at a quarter of it (--wakeup_interval_us) and a batch
    /// leaves once its oldest unit has waited the rest.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000), help_heading = "Publishing")]
    pub read_timeout: u64,

    /// Publisher tasks, each with its own AMQP channel and queue.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=10), help_heading = "Publishing")]
    pub thread_count: u16,

    /// Most batches each publisher's queue holds; past it new batches are dropped and counted
    /// (PacketDropped, queue_full). Default: no count, the queues are bounded by their share
    /// of --max_mem_mb.
    #[arg(long, value_parser = clap::value_parser!(u32).range(100..=5000), help_heading = "Publishing")]
    pub queue_size: Option<u32>,

    /// A batch (one message) is published once it holds more than this many segments. Each
    /// message costs the agent and the broker about the same whatever its size: large ones
    /// are cheap at high rates, and --read_timeout keeps low rates prompt.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=100_000), help_heading = "Publishing")]
    pub batch_segments: u64,

    /// A batch (one message) is published once it holds more than this many bytes.
    #[arg(long, default_value_t = 262144, value_parser = clap::value_parser!(u64).range(0..=(64 << 20)), help_heading = "Publishing")]
    pub batch_bytes: u64,

    /// Most MiB of messages queued for the broker; batches past it are dropped and counted
    /// (PacketDropped) instead of growing memory.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536), help_heading = "Publishing")]
    pub max_mem_mb: u64,

    /// LOCAL_IP written at the start of every message. Default: the interface's first IPv4
    /// address (127.0.0.1 on lo).
    #[arg(long, help_heading = "Publishing")]
    pub local_ip: Option<Ipv4Addr>,

    /// Where messages go: rabbitmq, file:PATH, or both (repeat the flag, or a comma list).
    /// A file gets each MRTE message as published, after a 4-byte big-endian length; it is
    /// cut into PATH, PATH.1, PATH.2, ... of --output_file_mb each. PATH must not exist, or be
    /// a FIFO that a process reads (one stream, not cut).
    #[arg(long, value_delimiter = ',', default_value = "rabbitmq", value_parser = output, help_heading = "Publishing")]
    pub output: Vec<Output>,

    /// Size in MiB after which a recording moves on to its next file.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20), help_heading = "Publishing")]
    pub output_file_mb: u64,

    #[command(flatten)]
    pub rabbitmq: RabbitArgs,

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

    /// Turn on the kernel's BPF run-time statistics while running, and print the capture
    /// program's average ns per packet in the exit summary (costs two clock reads per packet).
    #[arg(long, help_heading = "Status")]
    pub bpf_stats: bool,

    /// Seconds between status lines.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600), help_heading = "Status")]
    pub status_interval: u64,

    /// text: the original's status line; json: one JSON object per status line, with the
    /// same figures (and the exit totals as one object), for log shippers.
    #[arg(long, value_enum, default_value_t = StatusFormat::Text, help_heading = "Status")]
    pub status_format: StatusFormat,

    /// Serve every counter, gauge and the capture-to-publish latency histogram as Prometheus
    /// text on http://HOST:PORT/metrics.
    #[arg(long, help_heading = "Status")]
    pub metrics_addr: Option<String>,
}

/// How the kernel program is attached and what it keeps: the agent's and `inspect`'s.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct CaptureArgs {
    /// MySQL server port(s) to capture: one port or a comma list, at most 16.
    #[arg(long, value_delimiter = ',', default_value = "3306", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Capture")]
    pub port: Vec<u16>,

    /// Most payload bytes kept per TCP segment: 0 (whole segments, up to 64 KiB) or
    /// 4096..=65535. The original's 8192 cut large queries; every cut segment is counted
    /// (Truncated) and leaves that session's stream unusable for replay.
    #[arg(long, default_value_t = 0, value_parser = snapshot_len, help_heading = "Capture")]
    pub snapshot_len: u32,

    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 8, value_parser = ring_mb, help_heading = "Capture")]
    pub ring_buffer_mb: u32,

    /// How to attach: tcx (kernel 6.6+, detached by the kernel if the agent dies), netlink
    /// (clsact qdisc + filter), or auto (tcx where the kernel has it).
    #[arg(long, value_enum, default_value_t = AttachModeArg::Auto, help_heading = "Capture")]
    pub attach_mode: AttachModeArg,

    /// How records reach user space: ring (BPF ring buffer, record sized to the payload),
    /// ring_fixed (ring buffer, every record 16 KiB) or perf (per-CPU perf buffers, the skb
    /// appended by the helper). `ring` measured best (README, "Record transport").
    #[arg(long, value_enum, default_value_t = TransportArg::Ring, help_heading = "Capture")]
    pub transport: TransportArg,

    /// How often, in microseconds, the agent drains the kernel's buffer on its own timer; the
    /// kernel program wakes it sooner only once an eighth of the buffer is unread (a wake-up
    /// costs the packet that sends it a self-IPI). Default: a quarter of --read_timeout, at
    /// most 50 ms (20 ms for inspect). 0: the kernel wakes the agent on (nearly) every record.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1_000_000), help_heading = "Capture")]
    pub wakeup_interval_us: Option<u64>,

    /// TLS sessions: auto reads their plaintext where the server decrypts it (uprobes on
    /// SSL_read of the SSL library the process listening on the MySQL port maps), and warns
    /// when that cannot be done; off leaves them out. Either way a TLS session's ciphertext is
    /// never published (counted: tls_sessions, tls_bytes).
    #[arg(long, value_enum, default_value_t = AutoOff::Auto, help_heading = "Capture")]
    pub tls: AutoOff,

    /// What ties a TLS read to its connection: fentry on tcp_recvmsg (runs for TCP reads
    /// only), or the sys_enter raw tracepoint (every syscall on the host then takes the
    /// tracing entry path); auto: fentry, else the raw tracepoint.
    #[arg(long, value_enum, default_value_t = TlsHook::Auto, help_heading = "Capture")]
    pub tls_hook: TlsHook,

    /// Capture segments the interface received for other hosts' MAC addresses too (the
    /// interface in promiscuous mode, a mirror port). By default they are left out and counted
    /// (other_host): they are not this server's sessions.
    #[arg(long, help_heading = "Capture")]
    pub other_hosts: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AutoOff {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The drain's cadence when --wakeup_interval_us is not given: a quarter of the longest time a
/// segment may take to be published, so that batches have the rest of it to fill.
fn default_drain_cadence(read_timeout: Duration) -> Duration {
    (read_timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

impl CaptureArgs {
    /// The capture as these flags set it (prepared statements not followed: the agent sets
    /// that from its own flag); `cadence` is the drain's unless --wakeup_interval_us is given.
    pub fn config(&self, interface: &str, cadence: Duration) -> CaptureConfig {
        CaptureConfig {
            interface: interface.to_owned(),
            ports: self.port.clone(),
            snap_len: self.snapshot_len,
            ring_bytes: self.ring_buffer_mb << 20,
            attach_mode: self.attach_mode.into(),
            transport: self.transport.into(),
            wakeup_interval: self
                .wakeup_interval_us
                .map_or(cadence, Duration::from_micros),
            prepared: false,
            tls: (self.tls == AutoOff::Auto).then(|| self.port[0]),
            tls_hook: self.tls_hook,
            other_hosts: self.other_hosts,
        }
    }
}

/// The broker: the agent's, `publish-file`'s, and `inspect --from_queue`'s.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct RabbitArgs {
    /// RabbitMQ host name or address; or a cluster's nodes, `host[:port],...` (IPv6 in
    /// brackets with a port), in order of preference: the agent moves to the next when its
    /// node goes away, and back when an earlier one answers again.
    #[arg(long, default_value = "127.0.0.1", value_parser = broker_hosts, help_heading = "RabbitMQ")]
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

    /// Publisher confirms: a message counts as published once the broker confirmed it; what
    /// was unconfirmed when a connection died is counted (mq_in_flight_units) and its sessions
    /// ended. false: a message counts as published once written to the socket, and what the
    /// broker did not take before a connection died is lost uncounted.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, help_heading = "RabbitMQ")]
    pub rabbitmq_confirm: bool,

    /// Seconds to wait for the broker at start.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300), help_heading = "RabbitMQ")]
    pub rabbitmq_connect_timeout: u64,

    /// Seconds each broker operation may take: a message written and confirmed, a channel
    /// opened, the connection closed, a blocked connection unblocked. Past it the connection
    /// is given up and opened again. Also the AMQP heartbeat: a broker silent for twice this
    /// is given up.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300), help_heading = "RabbitMQ")]
    pub rabbitmq_timeout: u64,
}

impl RabbitArgs {
    pub fn config(&self) -> BrokerConfig {
        let nodes = crate::publish::broker::parse_nodes(&self.rabbitmq_host, self.rabbitmq_port)
            .expect("checked when parsed");
        BrokerConfig {
            host: nodes[0].0.clone(),
            port: nodes[0].1,
            nodes,
            user: self.rabbitmq_user.clone(),
            password: self.rabbitmq_password.clone(),
            vhost: self.rabbitmq_vhost.clone(),
            exchange: self.rabbitmq_exchange_name.clone(),
            routing_key: self.rabbitmq_routing_key.clone(),
            declare: self.rabbitmq_declare,
            queue: self.rabbitmq_queue.clone(),
            confirm: self.rabbitmq_confirm,
            connect_timeout: Duration::from_secs(self.rabbitmq_connect_timeout),
            timeout: Duration::from_secs(self.rabbitmq_timeout),
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct Inspect {
    /// Network interface to capture on; not with --from_queue, --from_file or --from_pcap.
    #[arg(long, required_unless_present_any = ["from_queue", "from_file", "from_pcap"], conflicts_with_all = ["from_queue", "from_file", "from_pcap"], help_heading = "Capture")]
    pub interface: Option<String>,

    #[command(flatten)]
    pub capture: CaptureArgs,

    /// Read MRTE messages from this RabbitMQ queue instead of the kernel (they are consumed:
    /// bind a queue of its own to the exchange).
    #[arg(
        long,
        visible_alias = "from-queue",
        conflicts_with_all = ["from_file", "from_pcap"],
        help_heading = "Inspect"
    )]
    pub from_queue: Option<String>,

    /// Read a recording (--output file:PATH) instead of the kernel: PATH, then PATH.1, ...
    #[arg(
        long,
        visible_alias = "from-file",
        conflicts_with = "from_pcap",
        help_heading = "Inspect"
    )]
    pub from_file: Option<PathBuf>,

    /// Read a tcpdump or Wireshark capture (pcap or pcapng) instead of the kernel: client
    /// segments to --port go through the agent's flow and session code.
    #[arg(long, visible_alias = "from-pcap", help_heading = "Inspect")]
    pub from_pcap: Option<PathBuf>,

    /// One JSON object per line instead of text.
    #[arg(long, help_heading = "Inspect")]
    pub json: bool,

    /// Whole SQL text and arguments; by default a text line is cut to the terminal width.
    #[arg(long, help_heading = "Inspect")]
    pub full: bool,

    #[command(flatten)]
    pub rabbitmq: RabbitArgs,
}

#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct PublishFile {
    /// The recording's first file (its PATH.1, PATH.2, ... follow); not with --pcap.
    #[arg(required_unless_present = "pcap", conflicts_with = "pcap")]
    pub path: Option<PathBuf>,

    /// Publish a tcpdump or Wireshark capture (pcap or pcapng) instead: its client segments
    /// to --port, through the agent's flow and session code, as the agent would have.
    #[arg(long, help_heading = "Capture file")]
    pub pcap: Option<PathBuf>,

    /// MySQL server port(s) in the capture: one port or a comma list.
    #[arg(long, value_delimiter = ',', default_value = "3306", value_parser = clap::value_parser!(u16).range(1..), requires = "pcap", help_heading = "Capture file")]
    pub port: Vec<u16>,

    /// Publish prepared-statement executes as the text queries they stand for (as the
    /// agent's --prepared_statements).
    #[arg(long, value_enum, default_value_t = OnOff::On, requires = "pcap", help_heading = "Capture file")]
    pub prepared_statements: OnOff,

    /// Keep replicas' sessions and semi-sync ACKs (as the agent's --include_replication).
    #[arg(long, requires = "pcap", help_heading = "Capture file")]
    pub include_replication: bool,

    #[command(flatten)]
    pub rabbitmq: RabbitArgs,
}

impl Inspect {
    pub fn config(&self) -> InspectConfig {
        let source = if let Some(path) = &self.from_file {
            Source::File(path.clone())
        } else if let Some(path) = &self.from_pcap {
            Source::Pcap {
                path: path.clone(),
                ports: self.capture.port.clone(),
            }
        } else if let Some(queue) = &self.from_queue {
            Source::Queue {
                queue: queue.clone(),
                broker: self.rabbitmq.config(),
            }
        } else {
            let interface = self.interface.as_deref().expect("clap requires one source");
            Source::Kernel(self.capture.config(interface, INSPECT_DRAIN_CADENCE))
        };
        InspectConfig {
            source,
            json: self.json,
            full: self.full,
        }
    }
}

impl Run {
    /// The agent's configuration; flags that contradict each other are an error here.
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let read_timeout = Duration::from_millis(self.read_timeout);
        let mut capture = self
            .capture
            .config(self.interface(), default_drain_cadence(read_timeout));
        capture.prepared = self.prepared_statements == OnOff::On;
        capture.tls = (self.capture.tls == AutoOff::Auto).then(|| self.mysql_port());
        // A unit waits up to one drain cadence before it reaches its batch.
        let max_wait = read_timeout.saturating_sub(capture.wakeup_interval);
        let (to_broker, to_file) = self.outputs();
        if self
            .output
            .iter()
            .filter(|o| matches!(o, Output::File(_)))
            .count()
            > 1
        {
            anyhow::bail!("--output: one file:PATH at most");
        }
        Ok(AgentConfig {
            capture,
            max_mem_mb: self.max_mem_mb,
            ring_buffer_mb: self.capture.ring_buffer_mb.into(),
            broker: to_broker.then(|| self.rabbitmq.config()),
            recording: to_file.map(|path| (path.clone(), self.output_file_mb)),
            metrics_addr: self.metrics_addr.clone(),
            local_ip: self.local_ip,
            snapshot_len: self.capture.snapshot_len,
            mysql: MysqlConfig {
                host: self.mysql_host.clone(),
                port: self.mysql_port(),
                user: self.mysql_user.clone(),
                password: self.mysql_password.clone(),
                server_ports: self.capture.port.clone(),
                connect_timeout: Duration::from_secs(self.mysql_connect_timeout),
                second_pass: Duration::from_millis(self.bootstrap_second_pass_ms),
                gc_interval: Duration::from_secs(self.gc_interval),
            },
            mysql_optional: self.mysql_optional,
            publishers: self.thread_count.into(),
            queue_size: self.queue_size.map(u64::from),
            batch: BatchLimits {
                segments: self.batch_segments,
                bytes: self.batch_bytes as usize,
                max_wait,
            },
            include_replication: self.include_replication,
            bpf_stats: self.bpf_stats,
            status_interval: Duration::from_secs(self.status_interval),
            status_json: self.status_format == StatusFormat::Json,
        })
    }

    pub fn interface(&self) -> &str {
        self.interface
            .as_deref()
            .expect("clap requires --interface without a subcommand")
    }

    /// The MySQL port of the bootstrap connection: --mysql_port, else the first --port.
    pub fn mysql_port(&self) -> u16 {
        self.mysql_port.unwrap_or(self.capture.port[0])
    }

    /// Whether messages go to RabbitMQ, and the recording's path if they go to a file.
    pub fn outputs(&self) -> (bool, Option<&PathBuf>) {
        let broker = self.output.contains(&Output::Rabbitmq);
        let file = self.output.iter().find_map(|o| match o {
            Output::File(p) => Some(p),
            Output::Rabbitmq => None,
        });
        (broker, file)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Rabbitmq,
    File(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum StatusFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum AttachModeArg {
    Auto,
    Tcx,
    Netlink,
}

impl From<AttachModeArg> for AttachMode {
    fn from(m: AttachModeArg) -> Self {
        match m {
            AttachModeArg::Auto => AttachMode::Auto,
            AttachModeArg::Tcx => AttachMode::Tcx,
            AttachModeArg::Netlink => AttachMode::Netlink,
        }
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

fn broker_hosts(s: &str) -> Result<String, String> {
    crate::publish::broker::parse_nodes(s, 5672)?;
    Ok(s.to_owned())
}

fn ring_mb(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if (1..=1024).contains(&v) && v.is_power_of_two() {
        Ok(v)
    } else {
        Err(format!("{v} is not a power of two in 1..=1024"))
    }
}

fn output(s: &str) -> Result<Output, String> {
    match s.split_once(':') {
        None if s == "rabbitmq" => Ok(Output::Rabbitmq),
        Some(("file", path)) if !path.is_empty() => Ok(Output::File(path.into())),
        _ => Err(format!("{s:?} is neither rabbitmq nor file:PATH")),
    }
}
