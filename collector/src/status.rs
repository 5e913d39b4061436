//! The status line: every `--status_interval` seconds one line of per-second rates, a header
//! every 20 lines, in the original collector's columns, then this collector's own.

use std::{
    fmt::Write as _,
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::programs::ProgramInfo;
use collector_common::{Counter, Counters};

use crate::{
    capture::{self, Capture, DrainStats, SharedDrainStats},
    memory::{self, MemoryBudget},
    tcp::Flows,
};

/// Declares the user-side counters once: the shared atomics the pipeline bumps, and the plain
/// snapshot the status line subtracts.
macro_rules! pipeline_counters {
    (@family) => { None };
    (@family $family:ident) => { Some(stringify!($family)) };
    ($($(#[$doc:meta])* $name:ident $(in $family:ident)?),* $(,)?) => {
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

            /// Every counter with its name and, for those that are one reason among others,
            /// the metric family that has them as its `reason` label.
            pub fn in_families(
                &self,
            ) -> impl Iterator<Item = (&'static str, Option<&'static str>, u64)> {
                [$((
                    stringify!($name),
                    pipeline_counters!(@family $($family)?),
                    self.$name,
                )),*]
                .into_iter()
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
    gap_timeouts in gaps_lost,
    gap_overflow in gaps_lost,
    /// TLS sessions' plaintext lost before a read (the kernel's position jumped: a read lost
    /// to a full ring, truncated or unreadable): the session got a COM_QUIT there.
    tls_gaps in gaps_lost,
    /// Retransmitted segments whose bytes differ from the first copy's (compared with the
    /// flow's last 4 segments, and with segments waiting behind a gap): a corrupt segment
    /// that TCP dropped, or bytes injected. Which copy the server took is unknown, so the
    /// session got a COM_QUIT there and resumed at the next command.
    retransmit_differs in gaps_lost,
    /// Bytes never published because of given-up gaps: the missing ones, those skipped until
    /// the next command, and those still waiting behind a gap when the flow was freed.
    gap_bytes,
    /// Flows restarted because a segment was far from the expected byte: a new connection on
    /// the same client address.
    flow_restarts,
    /// Connections opened by a SYN the capture saw (their stream is exact from the first byte),
    /// and flows ended by the client's FIN (once every byte before it arrived) or RST.
    syn_opened,
    /// SYNs of a connection already opened (the client sent its SYN again).
    syn_retransmitted,
    fin_closed in flows_closed,
    rst_closed in flows_closed,
    /// Flows given up because the flow table was at its cap (the memory plan's share of
    /// `--max_mem_mb`): those that published nothing (a bare SYN, a flood) first, then the
    /// longest idle, whose session got a COM_QUIT.
    flow_evicted in flows_closed,
    /// Ended flows not remembered because their table was at the same cap: a retransmission
    /// of theirs then looks like a new connection's first segment.
    closed_unremembered,
    /// RSTs outside the connection's window (behind what the client already sent, or far
    /// past it): the server drops them too, so the flow goes on.
    rst_ignored,
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
    /// Units handed to the publishers' queues in batches (dropped there or not): each is
    /// later published or counted lost (`queue_full`, `mem_limit`, `mq_error_units`,
    /// `mq_in_flight_units`, `mq_unroutable_units`, `mq_lost_skipped`, `exit_unpublished`).
    batched_units,
    /// Segments dropped because their publisher's queue held `--queue_size` batches.
    queue_full in lost_units,
    /// Segments dropped because the queued bytes would pass `--max_mem_mb`.
    mem_limit in lost_units,
    /// Messages handed to the broker (to the recording when it is the only output), and the
    /// units and bytes in them.
    published_msgs,
    published_units,
    published_bytes,
    /// Messages written to the recording (`--output file:PATH`), with their length prefixes
    /// bytes; messages that could not be written (a full disk), and their units.
    recorded_msgs,
    recorded_bytes,
    record_errors,
    record_error_units in lost_units,
    /// Failed or overdue broker operations, nacks, returned (unroutable) messages and failed
    /// reconnection attempts (MQError); the units of nacked messages.
    mq_errors,
    mq_error_units in lost_units,
    /// Units of messages in flight (handed to lapin, not confirmed) when their channel or
    /// connection died: they may or may not have reached the broker, and their sessions were
    /// ended.
    mq_in_flight_units in lost_units,
    /// Units of messages the broker routed to no queue (published `mandatory` with
    /// confirms): no queue bound to the exchange. Their sessions were ended.
    mq_unroutable_units in lost_units,
    /// Connections to the broker opened again after one was given up.
    mq_reconnects,
    /// Of those, opened on another node than the one given up (`--rabbitmq_host` with several
    /// nodes); and moves back to an earlier node once it answered again (the publishers
    /// finish what they have in flight first: nothing is lost in a move back).
    mq_failovers,
    mq_failbacks,
    /// Connections given up, by cause: the socket reset or closed; the broker closed the
    /// connection; a publish failed while the connection looked fine; a publish not written
    /// and confirmed (or a channel not opened) within `--rabbitmq_timeout`; blocked by the
    /// broker for longer than that; two heartbeats missed. And channels the broker closed
    /// (each replaced by a new one on the same connection).
    mq_reconnect_socket in mq_given_up,
    mq_reconnect_closed in mq_given_up,
    mq_reconnect_publish_error in mq_given_up,
    mq_reconnect_timeout in mq_given_up,
    mq_reconnect_blocked in mq_given_up,
    mq_reconnect_heartbeat in mq_given_up,
    mq_reconnect_channel in mq_given_up,
    /// Units still waiting for the broker when the exit deadline passed.
    exit_unpublished in lost_units,
    /// Sessions that lost units on the way to the broker (a dropped batch, a lost message):
    /// each got a synthetic COM_QUIT there; their units skipped until the next command.
    mq_lost_sessions,
    mq_lost_skipped in lost_units,
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
    /// Reads of the kernel's TCP socket table (sock_diag netlink) that failed: the rows
    /// listed by host name could not be placed then.
    socket_table_errors,
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
    /// Prepared statements (`--prepared_statements=on`): COM_STMT_* commands taken out of the
    /// stream; of those, COM_STMT_PREPAREs, and COM_STMT_EXECUTEs published as the COM_QUERY
    /// they stand for.
    stmt_commands,
    stmt_prepares,
    stmt_rendered,
    /// Server replies that gave a statement its id; PREPAREs the server refused.
    stmt_known,
    stmt_prepare_failed,
    /// EXECUTEs of a statement whose id is not known: prepared before capture began, or its
    /// reply lost or unmatched. Not published.
    stmt_unknown in stmt_lost,
    /// EXECUTEs of known statements that could not be rendered (a parameter type or value
    /// with no literal, cut long data), and MariaDB's COM_STMT_BULK_EXECUTE. Not published.
    stmt_unrenderable in stmt_lost,
    /// Commands over 64 MiB, or past the memory budget (`command_mem_limit`), not kept (their
    /// statements unknown). Not published.
    stmt_too_large in stmt_lost,
    /// Commands collected whole (prepared-statement commands, queries with attributes, the
    /// handshake) and long-data pieces given up because the bytes collected in all sessions,
    /// with the batches queued for the broker, would pass the queue budget (`--max_mem_mb`).
    /// Each is also counted by its outcome: `stmt_too_large`, `unreplayable_attributes`,
    /// `unreplayable_frames`, or (long data) its execute in `stmt_unrenderable`.
    command_mem_limit,
    /// COM_STMT_FETCHes left out: the rendered execute returned every row at once.
    stmt_fetches,
    /// Reply heads that could not be paired with a PREPARE (or did not match it), and
    /// PREPAREs whose reply never came (a later reply came first, or the stream before it
    /// was lost): those statements have no id.
    stmt_reply_unmatched,
    stmt_reply_lost,
    /// Sessions that asked for TLS (their TLS request) or were encrypted when capture began,
    /// and their encrypted bytes, left out: a player cannot replay ciphertext.
    tls_sessions,
    tls_bytes,
    /// Sessions with the compressed protocol (zlib or zstd), and the bytes their frames
    /// inflated to.
    compressed_sessions,
    inflated_bytes,
    /// COM_QUERYs published without their query attributes (CLIENT_QUERY_ATTRIBUTES).
    query_attributes,
    /// COM_INIT_DBs published after a COM_CHANGE_USER, for the database it names.
    change_user_dbs,
    /// Sessions ended with a COM_QUIT because the rest could not be made replayable: a
    /// compressed frame that does not inflate; query attributes that do not parse (or a
    /// COM_QUERY with them over 64 MiB). Their later bytes, left out.
    unreplayable_frames in unreplayable,
    unreplayable_attributes in unreplayable,
    unreplayable_bytes,
    /// TLS sessions whose plaintext was read (`--tls=auto`: uprobes on the server's SSL
    /// library), and the plaintext bytes taken.
    tls_read_sessions,
    tls_plain_bytes,
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
    /// The egress (prepared-statement replies) program's counters.
    pub replies: Counters,
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
    pub broker: BrokerStatus,
}

/// Assembles [`Totals`] from what each stage shares: the drain's and the pipeline's
/// counters, the queue budget, the interface's drop counter (since start).
pub struct TotalsReader {
    interface: String,
    if_dropped_base: u64,
    drain: Arc<SharedDrainStats>,
    counters: Arc<PipelineCounters>,
    budget: Arc<MemoryBudget>,
}

impl TotalsReader {
    pub fn new(
        interface: &str,
        drain: Arc<SharedDrainStats>,
        counters: Arc<PipelineCounters>,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        Self {
            interface: interface.into(),
            if_dropped_base: if_rx_dropped(interface),
            drain,
            counters,
            budget,
        }
    }

    /// The totals now: `kernel` holds the ingress and egress programs' counters, `waiting`
    /// the batches in the publisher queues.
    pub fn read(
        &self,
        (kernel, replies): (Counters, Counters),
        waiting: u64,
        flows: &Flows,
        broker: BrokerStatus,
    ) -> Totals {
        Totals {
            kernel,
            replies,
            drain: self.drain.load(),
            pipeline: self.counters.load(),
            if_dropped: if_rx_dropped(&self.interface).saturating_sub(self.if_dropped_base),
            waiting,
            flows: flows.len() as u64,
            reorder_bytes: flows.pending_bytes() as u64,
            queued_bytes: self.budget.used(),
            rss: memory::rss(),
            broker,
        }
    }
}

/// With `--bpf_stats`: the kernel's run-time statistics on while it lives, and the programs'
/// run counts and time at start, for their cost per packet in the exit summary.
pub struct KernelCost {
    _stats: OwnedFd,
    ingress: Option<ProgramInfo>,
    egress: Option<ProgramInfo>,
}

impl KernelCost {
    pub fn start(capture: &Capture, prepared: bool) -> anyhow::Result<Self> {
        let stats = capture::enable_bpf_stats().context("enabling BPF run-time statistics")?;
        Ok(Self {
            _stats: stats,
            ingress: capture.program_info().ok(),
            egress: prepared
                .then(|| capture.program_info_of(capture::REPLIES_PROGRAM_NAME).ok())
                .flatten(),
        })
    }

    /// Runs and average ns per run of each program since [`Self::start`], by summary name.
    pub fn since(self, capture: &Capture) -> Vec<(&'static str, u64)> {
        let mut cost = Vec::new();
        for (before, name, [runs_name, ns_name]) in [
            (
                self.ingress,
                capture::PROGRAM_NAME,
                ["kernel_runs", "kernel_ns_per_packet"],
            ),
            (
                self.egress,
                capture::REPLIES_PROGRAM_NAME,
                ["reply_kernel_runs", "reply_kernel_ns_per_packet"],
            ),
        ] {
            let (Some(a), Ok(b)) = (before, capture.program_info_of(name)) else {
                continue;
            };
            let runs = b.run_count() - a.run_count();
            let ns = (b.run_time() - a.run_time()).as_nanos();
            if runs > 0 {
                cost.push((runs_name, runs));
                cost.push((ns_name, (ns as f64 / runs as f64).round() as u64));
            }
        }
        cost
    }
}

/// Whether messages can go to the broker now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BrokerStatus {
    /// Messages go to a recording only.
    #[default]
    None,
    Up,
    /// No live, unblocked connection for this long.
    Down {
        secs: u64,
    },
}

impl std::fmt::Display for BrokerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerStatus::None => f.write_str("-"),
            BrokerStatus::Up => f.write_str("up"),
            BrokerStatus::Down { secs } => write!(f, "down:{secs}s"),
        }
    }
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
            + self.pipeline.record_error_units
            + self.pipeline.exit_unpublished
            + self.replies.get(Counter::RingFull)
            + self.replies.get(Counter::LoadFailed)
    }

    /// Prepared-statement executes (and other commands) that could not be published.
    pub fn statements_lost(&self) -> u64 {
        let p = &self.pipeline;
        p.stmt_unknown + p.stmt_unrenderable + p.stmt_too_large
    }
    pub fn mq_errors(&self) -> u64 {
        self.pipeline.mq_errors
    }
    /// Sessions ended because the rest could not be made replayable.
    pub fn unreplayable(&self) -> u64 {
        self.pipeline.unreplayable_frames + self.pipeline.unreplayable_attributes
    }

    /// Gaps given up (and streams that cannot be trusted): the sessions got a COM_QUIT there.
    pub fn gaps_lost(&self) -> u64 {
        let p = &self.pipeline;
        p.gap_timeouts + p.gap_overflow + p.tls_gaps + p.retransmit_differs
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

/// Whether a figure only grows (a counter) or goes up and down (a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Totals {
    /// Every figure, named as in the exit summary: kernel counters, drain losses, pipeline
    /// counters, then the gauges.
    pub fn named(&self) -> Vec<(&'static str, Kind, u64)> {
        let kernel = Counter::ALL.iter().map(|&c| (c.name(), self.kernel.get(c)));
        let drain = [
            ("lost", self.drain.lost),
            ("malformed", self.drain.malformed),
        ];
        let replies = Counter::ALL
            .iter()
            .filter_map(|&c| Some((c.egress_name()?, self.replies.get(c))))
            .chain(std::iter::once((
                "reply_parse_errors",
                Counter::ALL
                    .iter()
                    .filter(|c| c.is_parse_error())
                    .map(|&c| self.replies.get(c))
                    .sum(),
            )));
        let mut out: Vec<_> = kernel
            .chain(replies)
            .chain(drain)
            .chain(std::iter::once(("if_dropped", self.if_dropped)))
            .chain(self.pipeline.named())
            .map(|(n, v)| (n, Kind::Counter, v))
            .collect();
        out.extend(
            [
                ("waiting_batches", self.waiting),
                ("flows", self.flows),
                ("reorder_bytes", self.reorder_bytes),
                ("queued_bytes", self.queued_bytes),
                ("rss_bytes", self.rss.0),
                ("rss_peak_bytes", self.rss.1),
                ("broker_up", u64::from(self.broker == BrokerStatus::Up)),
                (
                    "broker_down_seconds",
                    match self.broker {
                        BrokerStatus::Down { secs } => secs,
                        _ => 0,
                    },
                ),
            ]
            .map(|(n, v)| (n, Kind::Gauge, v)),
        );
        out
    }
}

const HEADER_EVERY: u64 = 20;

/// A status column between DateTime and Broker: its name, its width, and its figure from
/// the totals now and at the previous line, `secs` apart.
struct Column {
    name: &'static str,
    width: usize,
    figure: fn(&Totals, &Totals, f64) -> u64,
}

fn per_sec(now: u64, prev: u64, secs: f64) -> u64 {
    (now.saturating_sub(prev) as f64 / secs).round() as u64
}

/// A column of the per-second rate of an expression on the totals.
macro_rules! rate {
    ($name:literal, $width:literal, |$t:ident| $e:expr) => {
        Column {
            name: $name,
            width: $width,
            figure: |now, prev, secs| {
                let f = |$t: &Totals| $e;
                per_sec(f(now), f(prev), secs)
            },
        }
    };
}

/// A column of a gauge, as it is now.
macro_rules! gauge {
    ($name:literal, $width:literal, |$t:ident| $e:expr) => {
        Column {
            name: $name,
            width: $width,
            figure: |now, _, _| {
                let $t = now;
                $e
            },
        }
    };
}

/// The status columns, in the original's order, then this collector's: each defined here
/// only (the text line, its header and the JSON line all read this table).
const COLUMNS: [Column; 25] = [
    rate!("TotalPacket", 16, |t| t.total_packets()),
    rate!("ValidPacket", 16, |t| t.valid_packets()),
    rate!("PacketDropped", 17, |t| t.dropped()),
    rate!("PacketIfDropped", 19, |t| t.if_dropped),
    gauge!("WaitingQueueCnt", 21, |t| t.waiting),
    rate!("MQError", 16, |t| t.mq_errors()),
    Column {
        name: "CaptureKB",
        width: 12,
        figure: |now, prev, secs| {
            per_sec(
                now.kernel.get(Counter::Bytes),
                prev.kernel.get(Counter::Bytes),
                secs,
            ) / 1024
        },
    },
    rate!("NoPayload", 11, |t| t.kernel.get(Counter::NoPayload)),
    rate!("Truncated", 11, |t| t.kernel.get(Counter::Truncated)),
    rate!("ParseError", 11, |t| t.parse_errors()),
    rate!("Retransmit", 11, |t| t.pipeline.retransmitted),
    rate!("Unencodable", 12, |t| t.pipeline.unencodable),
    rate!("Messages", 10, |t| t.pipeline.published_msgs),
    rate!("MySQLError", 12, |t| t.pipeline.mysql_errors),
    gauge!("Flows", 8, |t| t.flows),
    gauge!("ReorderKB", 10, |t| t.reorder_bytes / 1024),
    rate!("GapLost", 8, |t| t.gaps_lost()),
    rate!("Closed", 8, |t| t.closed()),
    gauge!("QueuedKB", 10, |t| t.queued_bytes / 1024),
    gauge!("RssMB", 7, |t| t.rss.0 >> 20),
    rate!("Prepared", 10, |t| t.pipeline.stmt_rendered),
    rate!("StmtLost", 10, |t| t.statements_lost()),
    rate!("TlsSess", 9, |t| t.pipeline.tls_sessions),
    rate!("ZipSess", 9, |t| t.pipeline.compressed_sessions),
    rate!("Unreplayable", 14, |t| t.unreplayable()),
];

/// The first and last columns, which are not figures.
const DATE_TIME: (&str, usize) = ("DateTime", 19);
const BROKER: (&str, usize) = ("Broker", 10);

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
        let mut out = format!("{:<w$}", DATE_TIME.0, w = DATE_TIME.1);
        for c in &COLUMNS {
            let _ = write!(out, "{:>w$}", c.name, w = c.width);
        }
        let _ = write!(out, "{:>w$}", BROKER.0, w = BROKER.1);
        out
    }

    /// The figures of the columns between DateTime and Broker: per-second rates over
    /// `elapsed`, gauges as they are.
    fn figures<'a>(
        &'a self,
        now: &'a Totals,
        elapsed: Duration,
    ) -> impl Iterator<Item = (&'static Column, u64)> + 'a {
        let secs = elapsed.as_secs_f64().max(0.001);
        COLUMNS
            .iter()
            .map(move |c| (c, (c.figure)(now, &self.prev, secs)))
    }

    /// The next line (preceded by the header every 20 lines), rates over `elapsed`.
    pub fn next(&mut self, now: &Totals, elapsed: Duration) -> String {
        let mut out = String::new();
        if self.lines.is_multiple_of(HEADER_EVERY) {
            out.push_str(&Self::header());
            out.push('\n');
        }
        let _ = write!(
            out,
            "{:<19}",
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
        );
        for (c, v) in self.figures(now, elapsed) {
            let _ = write!(out, "{v:>w$}", w = c.width);
        }
        let _ = write!(out, "{:>w$}", now.broker.to_string(), w = BROKER.1);
        self.lines += 1;
        self.prev = now.clone();
        out
    }

    /// The next line as one JSON object (`--status_format json`): the columns of the text
    /// line under their names, and every total since start under `totals`.
    pub fn next_json(&mut self, now: &Totals, elapsed: Duration) -> String {
        let mut line = serde_json::Map::new();
        line.insert("time".into(), chrono::Local::now().to_rfc3339().into());
        for (c, v) in self.figures(now, elapsed) {
            line.insert(c.name.into(), v.into());
        }
        line.insert("Broker".into(), now.broker.to_string().into());
        line.insert("totals".into(), Self::totals_json(now));
        self.lines += 1;
        self.prev = now.clone();
        serde_json::Value::Object(line).to_string()
    }

    /// The exit summary as one JSON object: `"summary": true` and every total.
    pub fn summary_json(now: &Totals, extra: &[(&str, u64)]) -> String {
        let mut totals = Self::totals_json(now);
        if let serde_json::Value::Object(m) = &mut totals {
            for (k, v) in extra {
                m.insert((*k).into(), (*v).into());
            }
        }
        serde_json::json!({
            "time": chrono::Local::now().to_rfc3339(),
            "summary": true,
            "TotalPacket": now.total_packets(),
            "ValidPacket": now.valid_packets(),
            "PacketDropped": now.dropped(),
            "PacketIfDropped": now.if_dropped,
            "WaitingQueueCnt": now.waiting,
            "MQError": now.mq_errors(),
            "totals": totals,
        })
        .to_string()
    }

    fn totals_json(now: &Totals) -> serde_json::Value {
        serde_json::Value::Object(
            now.named()
                .into_iter()
                .map(|(n, _, v)| (n.to_owned(), v.into()))
                .collect(),
        )
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
        for (name, kind, v) in now.named() {
            if kind == Kind::Counter && name != "if_dropped" && v != 0 {
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
            "           40005           34154                0                  0                    1               0           0          0          0          0          0           0         0           0       0         0       0       0         0      0         0         0        0        0             0         -"
        );
        // The Broker column: up, or down for how long.
        t.broker = BrokerStatus::Down { secs: 12 };
        assert!(s.next(&t, Duration::from_secs(10)).ends_with("  down:12s"));
        t.broker = BrokerStatus::Up;
        let json: serde_json::Value =
            serde_json::from_str(&s.next_json(&t, Duration::from_secs(10))).unwrap();
        assert_eq!(json["Broker"], "up");
        assert_eq!(json["totals"]["broker_up"], 1);
        // The header comes back every 20 lines.
        for _ in 0..17 {
            assert_eq!(s.next(&t, Duration::from_secs(10)).lines().count(), 1);
        }
        assert_eq!(s.next(&t, Duration::from_secs(10)).lines().count(), 2);
    }
}
