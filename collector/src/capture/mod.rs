//! Capture, the source stage: loads the TC programs (ingress; egress when prepared statements
//! are followed) and attaches them (this file); [`drain`] reads their ring buffer into typed
//! [`Record`]s handed to a [`RecordSink`]; `iface` and `qdisc` are the interface helpers
//! (privileges, index, address, framing; the clsact qdisc over rtnetlink).
//!
//! Attach is TCX-first: a TCX link is owned by the agent's file descriptor, so the kernel
//! detaches it by itself if the agent dies. Kernels without TCX get a clsact qdisc and a netlink
//! filter, both removed on drop (the qdisc only if this agent added it).

use std::{io, os::fd::OwnedFd, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapError, PerCpuArray, RingBuf, perf::PerfEventArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError, qdisc_add_clsact},
    },
};
pub use collector_common::Transport;
use collector_common::{
    COUNTER_COUNT, COUNTERS_EGRESS, COUNTERS_INGRESS, COUNTERS_TLS, Counter, Counters,
    DEFAULT_RING_BYTES, LinkKind, MAX_PORTS,
};

pub mod drain;
mod iface;
pub mod pcap;
mod qdisc;
pub mod tls;

use drain::RawSource;
pub use drain::{Drain, DrainStats, Record, RecordKind, RecordSink, SharedDrainStats, decode};
use iface::{check_privileges, link_kind, page_size};
pub use iface::{interface_index, interface_ipv4};
pub use qdisc::{bpf_filters, delete_filter, has_clsact, held_programs, remove_clsact_if_unused};

/// The kernel program, embedded at build time (see `build.rs`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MRTE_EBPF_OBJECT"));

/// Default cadence of the reader's own drain timer (the agent's follows `--read_timeout`).
pub const DEFAULT_WAKEUP_INTERVAL: Duration = Duration::from_millis(20);

/// Name of the classifier in the object, and the name the kernel shows for it: how a later
/// start recognises a hook that a killed instance left behind.
pub const PROGRAM_NAME: &str = "mrte_capture";
/// The egress classifier (COM_STMT_PREPARE replies).
pub const REPLIES_PROGRAM_NAME: &str = "mrte_replies";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "missing privileges: {missing} (run as root, or grant the binary CAP_BPF, CAP_PERFMON \
         and CAP_NET_ADMIN, and for TLS sessions CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: setcap \
         cap_bpf,cap_perfmon,cap_net_admin,cap_sys_ptrace,cap_dac_read_search+ep mrte-collector)"
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
    #[error(
        "--attach_mode=tcx needs Linux 6.6 or later (TCX links); this kernel is {kernel}: use \
         --attach_mode=auto (TCX where there is, else clsact + netlink) or netlink"
    )]
    TcxUnsupported { kernel: String },
    #[error("attaching to {interface} {side} ({mode}) failed")]
    Attach {
        interface: String,
        side: &'static str,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("detaching from {interface} {side} ({mode}) failed")]
    Detach {
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// How often the reader drains on its own timer; the kernel wakes it sooner only once an
    /// eighth of the ring is unread. Zero: the kernel wakes it on (nearly) every record.
    pub wakeup_interval: Duration,
    /// Follow prepared statements: the ingress program marks connections that sent a
    /// COM_STMT_PREPARE, and an egress program hands over the head of the reply.
    pub prepared: bool,
    /// Read TLS sessions' plaintext from the server listening on this port (uprobes on its
    /// SSL library); when that cannot be done, a warning says why and they stay unread.
    pub tls: Option<u16>,
    /// What ties a TLS read to its connection.
    pub tls_hook: tls::TlsHook,
    /// Capture segments received for other hosts' MACs too (promiscuous mode, a mirror
    /// port); else they are left out and counted (`other_host`).
    pub other_hosts: bool,
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
            tls: None,
            tls_hook: tls::TlsHook::Auto,
            other_hosts: false,
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
    cadence: Duration,
    /// The TLS probes, when attached.
    tls: Option<tls::TlsProbes>,
}

impl Capture {
    /// Checks privileges and the interface, loads the program, sets its ports and attaches it
    /// to the interface's ingress (and the replies program to its egress, with `prepared`).
    pub fn attach(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let (ifindex, link_kind) = cfg.check()?;
        // The TLS programs' kernel offsets, from BTF: load-time constants.
        let offsets = cfg.tls.map(|_| {
            if cfg.tls_hook.may_use_sys_enter() {
                tls::kernel_offsets()
            } else {
                // Only the raw tracepoint reads them.
                Ok([0; 6])
            }
        });
        let mut ebpf = load(
            cfg,
            link_kind,
            offsets.as_ref().and_then(|o| o.as_ref().ok()),
        )?;
        set_ports(&mut ebpf, &cfg.ports)?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?).map_err(|source| {
                CaptureError::Map {
                    name: "COUNTERS",
                    source,
                }
            })?;
        // The TLS probes first: once the TC programs are attached, the bootstrap's process-list
        // pass follows at once. And before the ring is mapped (its pages count in the RSS at
        // once): the fentry program's BTF parse takes some 16 MiB for a moment, which would
        // otherwise add to the ring's in the peak. What they hand over waits in the ring.
        let tls = match (cfg.tls, offsets) {
            (Some(port), Some(offsets)) => attach_tls(&mut ebpf, cfg, port, offsets),
            _ => None,
        };
        let source = open_source(&mut ebpf, cfg)?;
        let attached = attach_programs(&mut ebpf, cfg)?;
        tracing::info!(
            interface = %cfg.interface, ifindex, mode = attached.mode, ports = ?cfg.ports,
            "capture program attached to ingress"
        );
        Ok(Self {
            ebpf,
            link: Some(attached.ingress),
            replies_link: attached.egress,
            source: Some(source),
            counters,
            interface: cfg.interface.clone(),
            ifindex,
            added_clsact: attached.added_clsact,
            mode: attached.mode,
            cadence: cfg.wakeup_interval,
            tls,
        })
    }

    /// The TLS probes, when attached.
    pub fn tls(&self) -> Option<&tls::TlsProbes> {
        self.tls.as_ref()
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The ingress program's counters, summed over CPUs, with the TLS programs' (their
    /// `tls_*` counters, and the records and bytes they handed over through the same ring).
    pub fn read_counters(&self) -> Result<Counters, CaptureError> {
        let mut c = self.read_block(COUNTERS_INGRESS)?;
        let tls = self.read_block(COUNTERS_TLS)?;
        for i in 0..COUNTER_COUNT {
            c.0[i] += tls.0[i];
        }
        Ok(c)
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
            Some(source) => Ok(Some(Drain::new(source, self.cadence)?)),
        }
    }

    /// Whether attaching added the clsact qdisc (netlink mode), which detaching removes.
    pub fn added_clsact(&self) -> bool {
        self.added_clsact
    }

    fn detach_one(
        &mut self,
        link: Option<SchedClassifierLinkId>,
        name: &'static str,
        side: &'static str,
        what: &str,
    ) -> Result<(), CaptureError> {
        let Some(link) = link else {
            return Ok(());
        };
        let prog = classifier(&mut self.ebpf, name)?;
        prog.detach(link).map_err(|source| CaptureError::Detach {
            interface: self.interface.clone(),
            side,
            mode: self.mode,
            source: Box::new(source),
        })?;
        tracing::info!(interface = %self.interface, "{what} detached");
        Ok(())
    }

    /// Detaches the program (and removes a clsact qdisc this agent added, unless another
    /// filter is on it).
    pub fn detach(mut self) -> Result<(), CaptureError> {
        self.detach_programs()
    }

    /// [`Self::detach`], keeping the maps readable: the counters are read, and the ring
    /// drained, once nothing can add to them.
    pub fn detach_programs(&mut self) -> Result<(), CaptureError> {
        // The reply program first: it was attached first.
        let replies = self.replies_link.take();
        self.detach_one(replies, REPLIES_PROGRAM_NAME, "egress", "reply program")?;
        let capture = self.link.take();
        self.detach_one(capture, PROGRAM_NAME, "ingress", "capture program")?;
        if self.added_clsact {
            self.added_clsact = false;
            remove_clsact_if_unused(&self.interface);
        }
        if self.tls.take().is_some() {
            tls::detach(&mut self.ebpf);
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = self.detach_programs() {
            tracing::warn!("detaching on drop: {e}");
        }
    }
}

/// The programs attached: their links, the attach mode, and whether a clsact qdisc was added.
struct Attached {
    ingress: SchedClassifierLinkId,
    egress: Option<SchedClassifierLinkId>,
    mode: &'static str,
    added_clsact: bool,
}

/// Loads the object with the load-time constants of `cfg` (the verifier prunes what they
/// turn off).
fn load(
    cfg: &CaptureConfig,
    link_kind: LinkKind,
    tls_offsets: Option<&[u32; 6]>,
) -> Result<Ebpf, CaptureError> {
    let link_kind = link_kind as u8;
    let transport = cfg.transport as u8;
    let wake_at = if cfg.wakeup_interval.is_zero() {
        0
    } else {
        cfg.ring_bytes as u64 / 8
    };
    let perf = cfg.transport == Transport::PerfSkb;
    // `check` has made sure there is one.
    let first_port = cfg.ports.first().copied().unwrap_or(0);
    let more_ports = u8::from(cfg.ports.len() > 1);
    let mut loader = EbpfLoader::new();
    // Unknown ones stay 0: the TLS programs then read nothing (`attach_tls` says why).
    if let Some(offsets) = tls_offsets {
        for ((name, ..), value) in tls::OFFSETS.iter().zip(offsets) {
            loader.override_global(name, value, true);
        }
    }
    Ok(loader
        .override_global("LINK_KIND", &link_kind, true)
        .override_global("SNAP_LEN", &cfg.snap_len, true)
        .override_global("TRANSPORT", &transport, true)
        .override_global("WAKE_AT_BYTES", &wake_at, true)
        .override_global("PREPARED", &u8::from(cfg.prepared), true)
        .override_global("OTHER_HOSTS", &u8::from(cfg.other_hosts), true)
        .override_global("FIRST_PORT", &first_port, true)
        .override_global("MORE_PORTS", &more_ports, true)
        // The unused transport's map is kept at its minimum size.
        .map_max_entries("RECORDS", if perf { page_size() } else { cfg.ring_bytes })
        .load(EBPF_OBJECT)?)
}

/// The TLS probes for the server on `port`, or a warning that says why not.
fn attach_tls(
    ebpf: &mut Ebpf,
    cfg: &CaptureConfig,
    port: u16,
    offsets: Result<[u32; 6], tls::TlsError>,
) -> Option<tls::TlsProbes> {
    if cfg.transport == Transport::PerfSkb {
        tracing::warn!(
            "TLS sessions are not read with --transport=perf (the plaintext goes through the \
             ring buffer): they are left out and counted"
        );
        return None;
    }
    match offsets.and_then(|_| tls::attach(ebpf, port, cfg.prepared, cfg.tls_hook)) {
        Ok(p) => {
            tracing::info!(
                pid = p.pid, library = %p.library.display(), ssl_read_ex = p.read_ex,
                socket_hook = p.socket_hook,
                "TLS probes attached: TLS sessions are read as the server decrypts them"
            );
            Some(p)
        }
        Err(e) => {
            let why = crate::error_chain(&e);
            tracing::warn!(
                "TLS sessions will not be read (left out and counted, as tls_sessions): {why} \
                 (--tls=off silences this)"
            );
            None
        }
    }
}

/// Marks the captured ports in the `PORTS` array.
fn set_ports(ebpf: &mut Ebpf, ports: &[u16]) -> Result<(), CaptureError> {
    let map_err = |source| CaptureError::Map {
        name: "PORTS",
        source,
    };
    let mut array: Array<_, u8> =
        Array::try_from(ebpf.map_mut("PORTS").ok_or(CaptureError::Missing {
            what: "map",
            name: "PORTS",
        })?)
        .map_err(map_err)?;
    for &port in ports {
        array.set(port as u32, 1, 0).map_err(map_err)?;
    }
    Ok(())
}

/// The buffer records arrive in: the ring buffer, or per-CPU perf buffers sharing
/// `ring_bytes` (each a power of two in pages).
fn open_source(ebpf: &mut Ebpf, cfg: &CaptureConfig) -> Result<RawSource, CaptureError> {
    if cfg.transport != Transport::PerfSkb {
        let ring =
            RingBuf::try_from(take_map(ebpf, "RECORDS")?).map_err(|source| CaptureError::Map {
                name: "RECORDS",
                source,
            })?;
        return Ok(RawSource::Ring(ring));
    }
    let mut array =
        PerfEventArray::try_from(take_map(ebpf, "PERF_RECORDS")?).map_err(|source| {
            CaptureError::Map {
                name: "PERF_RECORDS",
                source,
            }
        })?;
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
    Ok(RawSource::Perf(bufs))
}

/// Loads and attaches the programs: the reply program first (once the ingress program marks
/// a connection, the reply it awaits must not pass before anything is there to see it), the
/// ingress program in the same mode. If the ingress attach fails, the reply program is
/// detached again (and a clsact it added removed).
fn attach_programs(ebpf: &mut Ebpf, cfg: &CaptureConfig) -> Result<Attached, CaptureError> {
    let mut egress = None;
    if cfg.prepared {
        let prog = classifier(ebpf, REPLIES_PROGRAM_NAME)?;
        prog.load().map_err(|source| CaptureError::Load {
            name: REPLIES_PROGRAM_NAME,
            source,
        })?;
        egress = Some(attach_program(
            prog,
            &cfg.interface,
            cfg.attach_mode,
            TcAttachType::Egress,
        )?);
    }
    let ingress = classifier(ebpf, PROGRAM_NAME).and_then(|prog| {
        prog.load().map_err(|source| CaptureError::Load {
            name: PROGRAM_NAME,
            source,
        })?;
        let mode = match egress {
            Some((_, "tcx", _)) => AttachMode::Tcx,
            Some(_) => AttachMode::Netlink,
            None => cfg.attach_mode,
        };
        attach_program(prog, &cfg.interface, mode, TcAttachType::Ingress)
    });
    match ingress {
        Ok((link, mode, added)) => {
            if egress.is_some() {
                tracing::info!(
                    interface = %cfg.interface,
                    "prepared-statement reply program attached to egress"
                );
            }
            Ok(Attached {
                ingress: link,
                added_clsact: added || egress.as_ref().is_some_and(|r| r.2),
                egress: egress.map(|r| r.0),
                mode,
            })
        }
        Err(e) => {
            if let Some((link, _, added)) = egress {
                if let Ok(prog) = classifier(ebpf, REPLIES_PROGRAM_NAME) {
                    let _ = prog.detach(link);
                }
                if added {
                    remove_clsact_if_unused(&cfg.interface);
                }
            }
            Err(e)
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

/// The first kernel with TCX links.
const TCX_SINCE: aya::util::KernelVersion = aya::util::KernelVersion::new(6, 6, 0);

/// `uname -r`, for errors that name the kernel.
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn attach_program(
    prog: &mut SchedClassifier,
    interface: &str,
    mode: AttachMode,
    side: TcAttachType,
) -> Result<(SchedClassifierLinkId, &'static str, bool), CaptureError> {
    if mode == AttachMode::Tcx
        && let Ok(kernel) = aya::util::KernelVersion::current()
        && kernel < TCX_SINCE
    {
        return Err(CaptureError::TcxUnsupported {
            kernel: kernel_release(),
        });
    }
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
