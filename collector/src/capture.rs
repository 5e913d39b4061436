//! Capture: loads the TC programs (ingress; egress when prepared statements are followed),
//! attaches them, and drains their ring buffer into typed [`Record`]s handed to a
//! [`RecordSink`].
//!
//! Attach is TCX-first: a TCX link is owned by the agent's file descriptor, so the kernel
//! detaches it by itself if the agent dies. Kernels without TCX get a clsact qdisc and a netlink
//! filter, both removed on drop (the qdisc only if this agent added it).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, MapData, MapError, PerCpuArray, RingBuf,
        perf::{PerfEvent, PerfEventArray, PerfEventArrayBuffer},
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError, qdisc_add_clsact},
    },
};
use bytes::{Bytes, BytesMut};
pub use collector_common::Transport;
use collector_common::{
    COUNTER_COUNT, COUNTERS_EGRESS, COUNTERS_INGRESS, Counter, Counters, DEFAULT_RING_BYTES,
    FAMILY_V4, KIND_CLIENT, KIND_PREPARE_REPLY, LinkKind, MAX_PORTS, RecordHeader,
};
use tokio::io::{Interest, unix::AsyncFd};

/// The kernel program, embedded at build time (see `build.rs`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MRTE_EBPF_OBJECT"));

/// Default least time between two wake-ups of the ring buffer's reader.
pub const DEFAULT_WAKEUP_INTERVAL: Duration = Duration::from_millis(2);

/// Name of the classifier in the object, and the name the kernel shows for it: how a later
/// start recognises a hook that a killed instance left behind.
pub const PROGRAM_NAME: &str = "mrte_capture";
/// The egress classifier (COM_STMT_PREPARE replies).
pub const REPLIES_PROGRAM_NAME: &str = "mrte_replies";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "missing privileges: {missing} (run as root, or grant the binary CAP_BPF, CAP_NET_ADMIN \
         and CAP_PERFMON: setcap cap_bpf,cap_net_admin,cap_perfmon+ep mrte-collector)"
    )]
    NotPrivileged { missing: String },
    #[error("unknown interface {name:?}; interfaces on this host: {available}")]
    UnknownInterface { name: String, available: String },
    #[error(
        "interface {name:?} has link type {arphrd}, which the capture program cannot parse \
         (supported: Ethernet, loopback, raw IP such as tun)"
    )]
    UnsupportedLink { name: String, arphrd: u32 },
    #[error(
        "interface {name:?} has no IPv4 address for the messages' LOCAL_IP field: give one with \
         --local_ip"
    )]
    NoIpv4 { name: String },
    #[error("listing interface addresses")]
    Addresses(#[source] io::Error),
    #[error("{count} ports given; at most {MAX_PORTS} can be captured at once")]
    TooManyPorts { count: usize },
    #[error("no port to capture")]
    NoPorts,
    #[error("loading the eBPF object failed")]
    Object(#[from] aya::EbpfError),
    #[error("the kernel refused the program {name}")]
    Load {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to {interface} {side} ({mode}) failed")]
    Attach {
        interface: String,
        side: &'static str,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("registering the record buffer with the runtime")]
    Ring(#[source] io::Error),
    #[error("opening the perf buffer of CPU {cpu}")]
    PerfOpen {
        cpu: u32,
        #[source]
        source: aya::maps::perf::PerfBufferError,
    },
    #[error("BPF_PROG_TEST_RUN of {name}")]
    TestRun {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("listing online CPUs ({0})")]
    Cpus(&'static str, #[source] io::Error),
}

/// How to attach. `Auto` is TCX where the kernel has it (6.6+), netlink otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    #[default]
    Auto,
    Tcx,
    Netlink,
}

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub interface: String,
    pub ports: Vec<u16>,
    /// Most payload bytes handed over per segment; 0 = whole segments.
    pub snap_len: u32,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_bytes: u32,
    pub attach_mode: AttachMode,
    /// How records reach user space; the ring buffer with size classes unless measuring.
    pub transport: Transport,
    /// Least time between reader wake-ups; zero wakes on nearly every record.
    pub wakeup_interval: Duration,
    /// Follow prepared statements: the ingress program marks connections that sent a
    /// COM_STMT_PREPARE, and an egress program hands over the head of the reply.
    pub prepared: bool,
}

impl CaptureConfig {
    /// What can be checked without loading anything: privileges, the interface and its link
    /// type, the ports. Returns the interface's index and framing.
    pub fn check(&self) -> Result<(u32, LinkKind), CaptureError> {
        check_privileges()?;
        let ifindex = interface_index(&self.interface)?;
        let link_kind = link_kind(&self.interface)?;
        if self.ports.is_empty() {
            return Err(CaptureError::NoPorts);
        }
        if self.ports.len() > MAX_PORTS {
            return Err(CaptureError::TooManyPorts {
                count: self.ports.len(),
            });
        }
        Ok((ifindex, link_kind))
    }

    pub fn new(interface: impl Into<String>, ports: Vec<u16>) -> Self {
        Self {
            interface: interface.into(),
            ports,
            snap_len: 0,
            ring_bytes: DEFAULT_RING_BYTES,
            attach_mode: AttachMode::Auto,
            transport: Transport::RingClasses,
            wakeup_interval: DEFAULT_WAKEUP_INTERVAL,
            prepared: false,
        }
    }
}

/// What a [`Record`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A piece of a client's TCP stream (ingress).
    Client,
    /// The first bytes of a server's reply to a COM_STMT_PREPARE (egress): `src`/`sport` are
    /// the server's. `awaiting`: PREPAREs of the connection unanswered when it left, this one
    /// included (1 = the latest).
    PrepareReply { awaiting: u8 },
}

/// One captured piece of a client's TCP stream, or of a server's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    /// CLOCK_MONOTONIC nanoseconds when the kernel saw the segment.
    pub ts_ns: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP sequence number of `data[0]`.
    pub seq: u32,
    pub tcp_flags: u8,
    /// Payload length of the whole segment this record came from.
    pub segment_len: u32,
    /// Where `data` starts within that segment's payload.
    pub offset: u32,
    pub ifindex: u32,
    pub data: Bytes,
}

impl Record {
    /// The client's address and port: the source of client data, the destination of a reply.
    pub fn client(&self) -> (IpAddr, u16) {
        match self.kind {
            RecordKind::Client => (self.src, self.sport),
            RecordKind::PrepareReply { .. } => (self.dst, self.dport),
        }
    }

    pub fn is_client(&self) -> bool {
        self.kind == RecordKind::Client
    }
}

/// Where drained records go: the later pipeline stages implement this.
pub trait RecordSink {
    fn push(&mut self, record: Record);
    /// Called before each drain hands over its first record.
    fn begin(&mut self) {}
}

/// What the drain handed over. `malformed` (an item shorter than its header says) should
/// never move; `lost` is what the perf transport reports as dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DrainStats {
    pub records: u64,
    pub bytes: u64,
    pub malformed: u64,
    pub lost: u64,
}

/// [`DrainStats`] readable from other tasks (the status line); published after each drain.
#[derive(Debug, Default)]
pub struct SharedDrainStats {
    records: AtomicU64,
    bytes: AtomicU64,
    malformed: AtomicU64,
    lost: AtomicU64,
}

impl SharedDrainStats {
    fn publish(&self, s: &DrainStats) {
        self.records.store(s.records, Ordering::Relaxed);
        self.bytes.store(s.bytes, Ordering::Relaxed);
        self.malformed.store(s.malformed, Ordering::Relaxed);
        self.lost.store(s.lost, Ordering::Relaxed);
    }

    pub fn load(&self) -> DrainStats {
        DrainStats {
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// The loaded and attached capture program.
pub struct Capture {
    ebpf: Ebpf,
    link: Option<SchedClassifierLinkId>,
    /// The egress program's link, when prepared statements are followed.
    replies_link: Option<SchedClassifierLinkId>,
    source: Option<RawSource>,
    counters: PerCpuArray<MapData, Counters>,
    interface: String,
    ifindex: u32,
    /// Set when the netlink fallback added the clsact qdisc, which drop then removes.
    added_clsact: bool,
    mode: &'static str,
    recheck_after: Duration,
}

impl Capture {
    /// Checks privileges and the interface, loads the program, sets its ports and attaches it
    /// to the interface's ingress (and the replies program to its egress, with `prepared`).
    pub fn attach(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let (ifindex, link_kind) = cfg.check()?;
        let link_kind = link_kind as u8;
        let transport = cfg.transport as u8;
        let wake_ns = cfg.wakeup_interval.as_nanos() as u64;
        let wake_at = cfg.ring_bytes as u64 / 4;
        let perf = cfg.transport == Transport::PerfSkb;
        let mut ebpf = EbpfLoader::new()
            .override_global("LINK_KIND", &link_kind, true)
            .override_global("SNAP_LEN", &cfg.snap_len, true)
            .override_global("TRANSPORT", &transport, true)
            .override_global("WAKE_INTERVAL_NS", &wake_ns, true)
            .override_global("WAKE_AT_BYTES", &wake_at, true)
            .override_global("PREPARED", &u8::from(cfg.prepared), true)
            // The unused transport's map is kept at its minimum size.
            .map_max_entries("RECORDS", if perf { page_size() } else { cfg.ring_bytes })
            .load(EBPF_OBJECT)?;

        let mut ports: Array<_, u8> =
            Array::try_from(ebpf.map_mut("PORTS").ok_or(CaptureError::Missing {
                what: "map",
                name: "PORTS",
            })?)
            .map_err(|source| CaptureError::Map {
                name: "PORTS",
                source,
            })?;
        for &port in &cfg.ports {
            ports
                .set(port as u32, 1, 0)
                .map_err(|source| CaptureError::Map {
                    name: "PORTS",
                    source,
                })?;
        }
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?).map_err(|source| {
                CaptureError::Map {
                    name: "COUNTERS",
                    source,
                }
            })?;
        let source = if perf {
            let mut array = PerfEventArray::try_from(take_map(&mut ebpf, "PERF_RECORDS")?)
                .map_err(|source| CaptureError::Map {
                    name: "PERF_RECORDS",
                    source,
                })?;
            // Per-CPU buffers sharing ring_bytes, each a power of two in pages.
            let cpus = aya::util::online_cpus().map_err(|(what, e)| CaptureError::Cpus(what, e))?;
            let pages = ((cfg.ring_bytes / page_size()) as usize / cpus.len().max(1))
                .max(1)
                .next_power_of_two();
            let mut bufs = Vec::new();
            for cpu in cpus {
                bufs.push(
                    array
                        .open(cpu, Some(pages))
                        .map_err(|source| CaptureError::PerfOpen { cpu, source })?,
                );
            }
            RawSource::Perf(bufs)
        } else {
            RawSource::Ring(RingBuf::try_from(take_map(&mut ebpf, "RECORDS")?).map_err(
                |source| CaptureError::Map {
                    name: "RECORDS",
                    source,
                },
            )?)
        };

        // The reply program goes first: once the ingress program marks a connection, the
        // reply it awaits must not pass before anything is there to see it.
        let mut replies = None;
        if cfg.prepared {
            let prog = classifier(&mut ebpf, REPLIES_PROGRAM_NAME)?;
            prog.load().map_err(|source| CaptureError::Load {
                name: REPLIES_PROGRAM_NAME,
                source,
            })?;
            let (link, mode, added) =
                attach_program(prog, &cfg.interface, cfg.attach_mode, TcAttachType::Egress)?;
            replies = Some((link, mode, added));
        }
        let ingress = classifier(&mut ebpf, PROGRAM_NAME).and_then(|prog| {
            prog.load().map_err(|source| CaptureError::Load {
                name: PROGRAM_NAME,
                source,
            })?;
            // The same attach mode as the reply program's.
            let mode = match replies {
                Some((_, "tcx", _)) => AttachMode::Tcx,
                Some(_) => AttachMode::Netlink,
                None => cfg.attach_mode,
            };
            attach_program(prog, &cfg.interface, mode, TcAttachType::Ingress)
        });
        let (link, mode, added_clsact) = match ingress {
            Ok((link, mode, added)) => (link, mode, added || replies.as_ref().is_some_and(|r| r.2)),
            Err(e) => {
                if let Some((link, _, added)) = replies {
                    if let Ok(prog) = classifier(&mut ebpf, REPLIES_PROGRAM_NAME) {
                        let _ = prog.detach(link);
                    }
                    if added {
                        remove_clsact_if_unused(&cfg.interface);
                    }
                }
                return Err(e);
            }
        };
        if replies.is_some() {
            tracing::info!(
                interface = %cfg.interface,
                "prepared-statement reply program attached to egress"
            );
        }
        tracing::info!(
            interface = %cfg.interface, ifindex, mode, ports = ?cfg.ports,
            "capture program attached to ingress"
        );
        Ok(Self {
            ebpf,
            link: Some(link),
            replies_link: replies.map(|r| r.0),
            source: Some(source),
            counters,
            interface: cfg.interface.clone(),
            ifindex,
            added_clsact,
            mode,
            recheck_after: cfg.wakeup_interval * 2,
        })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The ingress program's counters, summed over CPUs.
    pub fn read_counters(&self) -> Result<Counters, CaptureError> {
        self.read_block(COUNTERS_INGRESS)
    }

    /// The egress (replies) program's counters, summed over CPUs.
    pub fn read_reply_counters(&self) -> Result<Counters, CaptureError> {
        self.read_block(COUNTERS_EGRESS)
    }

    fn read_block(&self, index: u32) -> Result<Counters, CaptureError> {
        let per_cpu = self
            .counters
            .get(&index, 0)
            .map_err(|source| CaptureError::Map {
                name: "COUNTERS",
                source,
            })?;
        let mut total = Counters::default();
        for cpu in per_cpu.iter() {
            for i in 0..COUNTER_COUNT {
                total.0[i] += cpu.0[i];
            }
        }
        Ok(total)
    }

    /// The loaded program.
    fn program(&self, name: &'static str) -> Result<&SchedClassifier, CaptureError> {
        self.ebpf
            .program(name)
            .ok_or(CaptureError::Missing {
                what: "program",
                name,
            })?
            .try_into()
            .map_err(|source| CaptureError::Load { name, source })
    }

    /// The kernel's view of the loaded ingress program (`bpf_stats` run time / count).
    pub fn program_info(&self) -> Result<aya::programs::ProgramInfo, CaptureError> {
        self.program_info_of(PROGRAM_NAME)
    }

    /// The same for the program `name` ([`PROGRAM_NAME`] or [`REPLIES_PROGRAM_NAME`]).
    pub fn program_info_of(
        &self,
        name: &'static str,
    ) -> Result<aya::programs::ProgramInfo, CaptureError> {
        self.program(name)?
            .info()
            .map_err(|source| CaptureError::Load { name, source })
    }

    /// Takes the record buffer out for a [`Drain`]; `None` if already taken.
    pub fn take_drain(&mut self) -> Result<Option<Drain>, CaptureError> {
        match self.source.take() {
            None => Ok(None),
            Some(source) => Ok(Some(Drain::new(source, self.recheck_after)?)),
        }
    }

    /// Whether attaching added the clsact qdisc (netlink mode), which detaching removes.
    pub fn added_clsact(&self) -> bool {
        self.added_clsact
    }

    /// Detaches the program (and removes a clsact qdisc this agent added, unless another
    /// filter is on it).
    pub fn detach(mut self) -> Result<(), CaptureError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), CaptureError> {
        if let Some(link) = self.replies_link.take() {
            let prog = classifier(&mut self.ebpf, REPLIES_PROGRAM_NAME)?;
            prog.detach(link).map_err(|source| CaptureError::Attach {
                interface: self.interface.clone(),
                side: "egress",
                mode: self.mode,
                source: Box::new(source),
            })?;
            tracing::info!(interface = %self.interface, "reply program detached");
        }
        if let Some(link) = self.link.take() {
            let prog = classifier(&mut self.ebpf, PROGRAM_NAME)?;
            prog.detach(link).map_err(|source| CaptureError::Attach {
                interface: self.interface.clone(),
                side: "ingress",
                mode: self.mode,
                source: Box::new(source),
            })?;
            tracing::info!(interface = %self.interface, "capture program detached");
        }
        if self.added_clsact {
            self.added_clsact = false;
            remove_clsact_if_unused(&self.interface);
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            tracing::warn!("detaching on drop: {e}");
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name)
        .ok_or(CaptureError::Missing { what: "map", name })
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, CaptureError> {
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(|source| CaptureError::Load { name, source })
}

fn side_name(side: TcAttachType) -> &'static str {
    match side {
        TcAttachType::Ingress => "ingress",
        TcAttachType::Egress => "egress",
        TcAttachType::Custom(_) => "custom",
    }
}

fn attach_program(
    prog: &mut SchedClassifier,
    interface: &str,
    mode: AttachMode,
    side: TcAttachType,
) -> Result<(SchedClassifierLinkId, &'static str, bool), CaptureError> {
    if mode != AttachMode::Netlink {
        match prog.attach_with_options(
            interface,
            side,
            TcAttachOptions::TcxOrder(Default::default()),
        ) {
            Ok(link) => return Ok((link, "tcx", false)),
            Err(source) if mode == AttachMode::Tcx => {
                return Err(CaptureError::Attach {
                    interface: interface.into(),
                    side: side_name(side),
                    mode: "tcx",
                    source: Box::new(source),
                });
            }
            Err(e) => tracing::info!("TCX attach failed ({e}); falling back to clsact + netlink"),
        }
    }
    // clsact already present (another tool's, or ours from a previous run) is left as found.
    let added_clsact = match qdisc_add_clsact(interface) {
        Ok(()) => true,
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => {
            return Err(CaptureError::Attach {
                interface: interface.into(),
                side: side_name(side),
                mode: "netlink",
                source: Box::new(ProgramError::from(e)),
            });
        }
    };
    match prog.attach_with_options(
        interface,
        side,
        TcAttachOptions::Netlink(NlOptions::default()),
    ) {
        Ok(link) => Ok((link, "netlink", added_clsact)),
        Err(source) => {
            if added_clsact {
                remove_clsact_if_unused(interface);
            }
            Err(CaptureError::Attach {
                interface: interface.into(),
                side: side_name(side),
                mode: "netlink",
                source: Box::new(source),
            })
        }
    }
}

/// Whether a line of `tc filter show` is a filter, not the header line of a (priority,
/// protocol) group (`filter protocol all pref 7 bpf chain 0`), which the kernel may still list
/// for a moment after its last filter went.
fn is_filter_line(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    let header = words.len() >= 2
        && words[words.len() - 2] == "chain"
        && words[words.len() - 1].parse::<u32>().is_ok();
    !words.is_empty() && !header
}

/// Runs `tc` with `args`: its output, or `None` (logged) if it could not run or failed.
fn tc(interface: &str, args: &[&str]) -> Option<String> {
    match Command::new("tc").args(args).output() {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            tracing::warn!(
                interface,
                "tc {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            tracing::warn!(interface, "could not run tc: {e}");
            None
        }
    }
}

/// Whether the interface has a clsact qdisc (`None`: `tc` failed, logged).
pub fn has_clsact(interface: &str) -> Option<bool> {
    tc(interface, &["qdisc", "show", "dev", interface]).map(|out| out.contains("clsact"))
}

/// Removes the interface's clsact qdisc unless a filter (anyone's) is still on it: `Some(true)`
/// removed, `Some(false)` in use and left, `None` not there (or `tc` failed: logged). aya adds a
/// clsact qdisc but has no call to remove one; iproute2's `tc` does.
pub fn remove_clsact_if_unused(interface: &str) -> Option<bool> {
    let tc = |args: &[&str]| tc(interface, args);
    if !has_clsact(interface)? {
        return None;
    }
    for side in ["ingress", "egress"] {
        if tc(&["filter", "show", "dev", interface, side])?
            .lines()
            .any(is_filter_line)
        {
            tracing::info!(
                interface,
                "left the clsact qdisc we added: another filter uses it"
            );
            return Some(false);
        }
    }
    tc(&["qdisc", "del", "dev", interface, "clsact"])?;
    tracing::info!(interface, "removed the clsact qdisc we added");
    Some(true)
}

/// Reads the effective capability set: loading needs CAP_BPF (or CAP_SYS_ADMIN) and attaching
/// needs CAP_NET_ADMIN; checking first gives a clearer message than the kernel's EPERM.
fn check_privileges() -> Result<(), CaptureError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
    else {
        // No /proc: let the kernel decide.
        return Ok(());
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::NotPrivileged {
            missing: missing.join(" and "),
        })
    }
}

/// The interface's index, or an error listing the interfaces that do exist.
pub fn interface_index(name: &str) -> Result<u32, CaptureError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| CaptureError::UnknownInterface {
        name: name.into(),
        available: nix::net::if_::if_nameindex()
            .map(|list| {
                list.iter()
                    .map(|i| i.name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
    })
}

/// The interface's first IPv4 address: LOCAL_IP in every MRTE message.
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr, CaptureError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| CaptureError::Addresses(e.into()))?;
    addrs
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .ok_or_else(|| CaptureError::NoIpv4 { name: name.into() })
}

/// The framing the program must parse, from the interface's ARPHRD type.
fn link_kind(name: &str) -> Result<LinkKind, CaptureError> {
    const ARPHRD_ETHER: u32 = 1;
    const ARPHRD_PPP: u32 = 512;
    const ARPHRD_RAWIP: u32 = 519;
    const ARPHRD_LOOPBACK: u32 = 772;
    const ARPHRD_NONE: u32 = 65534;
    let arphrd = std::fs::read_to_string(format!("/sys/class/net/{name}/type"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(ARPHRD_ETHER);
    match arphrd {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(LinkKind::Ethernet),
        ARPHRD_NONE | ARPHRD_RAWIP | ARPHRD_PPP => Ok(LinkKind::RawIp),
        arphrd => Err(CaptureError::UnsupportedLink {
            name: name.into(),
            arphrd,
        }),
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u32 }
}

/// The record buffer as the loader hands it over.
enum RawSource {
    Ring(RingBuf<MapData>),
    Perf(Vec<PerfEventArrayBuffer<MapData>>),
}

/// The record buffer registered with tokio: wakes on epoll, never sleep-polls.
enum Source {
    Ring(AsyncFd<RingBuf<MapData>>),
    Perf(Vec<AsyncFd<PerfEventArrayBuffer<MapData>>>),
}

/// Drains the record buffer into a [`RecordSink`].
pub struct Drain {
    source: Source,
    /// The kernel skips wake-ups for records within its wake-up interval; after a drain that
    /// found records, look once more this long after it (none while idle).
    recheck_after: Duration,
    recheck_at: Option<tokio::time::Instant>,
    /// Arena the records' payloads are copied into; split off per record so that one
    /// allocation serves many records.
    arena: BytesMut,
    pub stats: DrainStats,
    shared: Arc<SharedDrainStats>,
}

const ARENA_CHUNK: usize = 1 << 20;

fn register<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>, CaptureError> {
    // SAFETY: the map (or perf buffer) owns its fd for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| CaptureError::Ring(e.into()))
}

impl Drain {
    fn new(source: RawSource, recheck_after: Duration) -> Result<Self, CaptureError> {
        let source = match source {
            RawSource::Ring(ring) => Source::Ring(register(ring)?),
            RawSource::Perf(bufs) => {
                Source::Perf(bufs.into_iter().map(register).collect::<Result<_, _>>()?)
            }
        };
        Ok(Self {
            source,
            recheck_after,
            recheck_at: None,
            arena: BytesMut::with_capacity(ARENA_CHUNK),
            stats: DrainStats::default(),
            shared: Arc::default(),
        })
    }

    /// The drain's counters, for another task to read.
    pub fn shared_stats(&self) -> Arc<SharedDrainStats> {
        self.shared.clone()
    }

    /// Waits until the buffer has records (or a re-check is due), then hands all of them to
    /// `sink`.
    pub async fn drain_once(&mut self, sink: &mut impl RecordSink) -> Result<usize, CaptureError> {
        match &self.source {
            Source::Ring(ring) => {
                let recheck = self.recheck_at;
                tokio::select! {
                    guard = ring.readable() => {
                        // Cleared before draining: data arriving meanwhile wakes us again.
                        guard.map_err(CaptureError::Ring)?.clear_ready();
                    }
                    _ = tokio::time::sleep_until(recheck.unwrap_or_else(tokio::time::Instant::now)),
                        if recheck.is_some() =>
                    {
                        // Only the re-check itself, finding nothing, ends the re-checking: a
                        // wake-up for records already drained must not cancel it while records
                        // submitted without a wake-up may still follow.
                        self.recheck_at = None;
                    }
                }
            }
            Source::Perf(bufs) => {
                let ready = bufs.iter().map(|b| Box::pin(b.readable()));
                let (guard, _, _) = futures_util::future::select_all(ready).await;
                guard.map_err(CaptureError::Ring)?.clear_ready();
            }
        }
        let n = self.drain_now(sink);
        if n > 0 && !self.recheck_after.is_zero() {
            self.recheck_at = Some(tokio::time::Instant::now() + self.recheck_after);
        }
        Ok(n)
    }

    /// Hands over whatever is in the buffer now, without waiting.
    pub fn drain_now(&mut self, sink: &mut impl RecordSink) -> usize {
        sink.begin();
        let n = match &mut self.source {
            Source::Ring(ring) => {
                drain_ring(ring.get_mut(), &mut self.arena, &mut self.stats, sink)
            }
            Source::Perf(bufs) => bufs
                .iter_mut()
                .map(|b| drain_perf(b.get_mut(), &mut self.arena, &mut self.stats, sink))
                .sum(),
        };
        self.shared.publish(&self.stats);
        n
    }

    /// Drains until `shutdown` completes, then once more for what arrived meanwhile.
    pub async fn run(
        &mut self,
        sink: &mut impl RecordSink,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), CaptureError> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                r = self.drain_once(sink) => { r?; }
                _ = &mut shutdown => break,
            }
        }
        self.drain_now(sink);
        Ok(())
    }
}

fn deliver(
    item: &[u8],
    arena: &mut BytesMut,
    stats: &mut DrainStats,
    sink: &mut impl RecordSink,
) -> usize {
    match decode(item, arena) {
        Some(rec) => {
            stats.records += 1;
            stats.bytes += rec.data.len() as u64;
            sink.push(rec);
            1
        }
        None => {
            stats.malformed += 1;
            0
        }
    }
}

fn drain_ring(
    ring: &mut RingBuf<MapData>,
    arena: &mut BytesMut,
    stats: &mut DrainStats,
    sink: &mut impl RecordSink,
) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        n += deliver(&item, arena, stats, sink);
    }
    n
}

fn drain_perf(
    buf: &mut PerfEventArrayBuffer<MapData>,
    arena: &mut BytesMut,
    stats: &mut DrainStats,
    sink: &mut impl RecordSink,
) -> usize {
    let mut n = 0;
    let mut joined = Vec::new();
    buf.for_each(|ev| match ev {
        PerfEvent::Sample { head, tail: [] } => {
            n += deliver(head, arena, stats, sink);
        }
        PerfEvent::Sample { head, tail } => {
            // A sample that wraps around the end of the buffer.
            joined.clear();
            joined.extend_from_slice(head);
            joined.extend_from_slice(tail);
            n += deliver(&joined, arena, stats, sink);
        }
        PerfEvent::Lost { count } => stats.lost += count,
    });
    n
}

/// Decodes one ring buffer item (header + payload) into a [`Record`].
pub fn decode(item: &[u8], arena: &mut BytesMut) -> Option<Record> {
    const H: usize = std::mem::size_of::<RecordHeader>();
    if item.len() < H {
        return None;
    }
    // SAFETY: RecordHeader is Pod, and `item` has at least H bytes.
    let hdr: RecordHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    let start = H + hdr.data_skip as usize;
    let payload = item.get(start..start + hdr.cap_len as usize)?;
    if arena.capacity() - arena.len() < payload.len() {
        *arena = BytesMut::with_capacity(ARENA_CHUNK.max(payload.len()));
    }
    arena.extend_from_slice(payload);
    let data = arena.split().freeze();
    let (src, dst) = if hdr.family == FAMILY_V4 {
        (v4(&hdr.saddr), v4(&hdr.daddr))
    } else {
        (
            IpAddr::V6(Ipv6Addr::from(hdr.saddr)),
            IpAddr::V6(Ipv6Addr::from(hdr.daddr)),
        )
    };
    let kind = match hdr.kind {
        KIND_CLIENT => RecordKind::Client,
        KIND_PREPARE_REPLY => RecordKind::PrepareReply {
            awaiting: hdr.awaiting,
        },
        _ => return None,
    };
    Some(Record {
        kind,
        ts_ns: hdr.ts_ns,
        src,
        dst,
        sport: hdr.sport,
        dport: hdr.dport,
        seq: hdr.seq,
        tcp_flags: hdr.tcp_flags,
        segment_len: hdr.payload_len,
        offset: hdr.offset,
        ifindex: hdr.ifindex,
        data,
    })
}

fn v4(a: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
}

/// Turns on the kernel's BPF run-time statistics while the returned fd lives.
pub fn enable_bpf_stats() -> Result<OwnedFd, aya::sys::SyscallError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
}

/// Named counters, in [`Counter::ALL`] order, for display.
pub fn named(c: &Counters) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    Counter::ALL.iter().map(move |&k| (k.name(), c.get(k)))
}

/// Result of [`Capture::test_run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (always `TC_ACT_UNSPEC`, -1: the program never acts).
    pub retval: i32,
    /// Average run time per repetition, as the kernel measured it.
    pub duration_ns: u32,
    /// The frame as the program left it.
    pub frame_out: Vec<u8>,
}

impl Capture {
    /// Runs the loaded program on `frame` (an Ethernet frame, tags and all) `repeat` times
    /// with `BPF_PROG_TEST_RUN`, without any interface: parser edge cases and hot-cache cost.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRun, CaptureError> {
        self.test_run_of(PROGRAM_NAME, frame, repeat)
    }

    /// The same for the program `name` ([`PROGRAM_NAME`] or [`REPLIES_PROGRAM_NAME`]).
    pub fn test_run_of(
        &self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRun, CaptureError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program(name)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .map_err(|source| CaptureError::TestRun {
                name,
                source: Box::new(source),
            })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRun {
            retval: result.return_value as i32,
            duration_ns: result.duration.as_nanos() as u32,
            frame_out: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_lines_and_group_headers() {
        assert!(!is_filter_line("filter protocol all pref 7 bpf chain 0 "));
        assert!(!is_filter_line(""));
        assert!(is_filter_line(
            "filter protocol all pref 7 bpf chain 0 handle 0x1 not_in_hw bytecode '1,6 0 0 0'"
        ));
        assert!(is_filter_line(
            "filter protocol all pref 49152 u32 chain 0 fh 800: ht divisor 1"
        ));
    }
}
