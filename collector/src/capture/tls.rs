//! TLS sessions read where the server decrypts them: the server process is the one listening
//! on the MySQL port; its SSL library is the `libssl` it maps (or its own executable, when it
//! links OpenSSL statically and exports the symbols). The uprobes on `SSL_read` /
//! `SSL_read_ex` are attached for that process only. What ties a call to its connection runs
//! for all: fentry on `tcp_recvmsg` (a map lookup per TCP read outside a probed `SSL_read`),
//! or where the kernel refuses fentry, the raw tracepoint on `sys_enter`, which puts every
//! syscall on the host through the tracing entry path (the kernel structure offsets it needs
//! come from the running kernel's BTF). See `collector-ebpf/src/tls.rs`.

use std::{num::NonZeroU32, path::PathBuf};

use aya::{
    Btf, Ebpf,
    programs::{FEntry, ProgramError, RawTracePoint, UProbe, uprobe::UProbeScope},
};

/// What ties an `SSL_read` to the connection it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsHook {
    /// fentry, else the raw tracepoint.
    Auto,
    /// fentry on `tcp_recvmsg`: runs for TCP reads only (Linux 5.5+, BTF).
    Fentry,
    /// The raw tracepoint on `sys_enter`: runs for every syscall on the host.
    #[value(name = "sys_enter")]
    SysEnter,
}

impl TlsHook {
    /// Whether the raw tracepoint may be used, so that its kernel offsets must be known at
    /// load time.
    pub fn may_use_sys_enter(self) -> bool {
        self != TlsHook::Fentry
    }
}

/// Why TLS sessions cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "no process listens on TCP port {port} here (the MySQL server whose TLS sessions are read)"
    )]
    NoServer { port: u16 },
    #[error(
        "the server process {pid} ({exe}) maps no libssl and exports no SSL_read: its TLS \
         library is not OpenSSL (a wolfSSL or GnuTLS build), or it is linked without symbols"
    )]
    NoLibrary { pid: u32, exe: String },
    #[error("reading the TCP socket table (sock_diag netlink) for the listener on port {port}")]
    SocketTable {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {what}")]
    Proc {
        what: String,
        #[source]
        source: procfs::ProcError,
    },
    #[error("{missing} is missing: {needed_for}")]
    NotPrivileged {
        missing: &'static str,
        needed_for: &'static str,
    },
    #[error("the kernel's BTF does not give the socket path: {what}")]
    Btf { what: String },
    #[error("the eBPF object has no program {name}")]
    Missing { name: &'static str },
    #[error("the kernel refused the TLS program {name}")]
    Load {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {name} to {target} failed")]
    Attach {
        name: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
}

/// The load-time constants of the TLS programs and their BTF paths: task to socket.
pub const OFFSETS: [(&str, &str, &str); 6] = [
    ("OFF_TASK_FILES", "task_struct", "files"),
    ("OFF_FILES_FDT", "files_struct", "fdt"),
    ("OFF_FDT_MAX_FDS", "fdtable", "max_fds"),
    ("OFF_FDT_FD", "fdtable", "fd"),
    ("OFF_FILE_PRIVATE_DATA", "file", "private_data"),
    ("OFF_SOCKET_SK", "socket", "sk"),
];

/// The running kernel's BTF, for `btfparse`.
struct BtfBytes(Vec<u8>);

impl btfparse::Readable for BtfBytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let from = offset as usize;
        match self.0.get(from..from + buffer.len()) {
            Some(b) => {
                buffer.copy_from_slice(b);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF",
            )),
        }
    }
}

/// `mrte-collector tls-offsets`: [`parse_kernel_offsets`], printed as numbers.
pub fn print_kernel_offsets() -> anyhow::Result<()> {
    let o = parse_kernel_offsets()?;
    println!("{}", o.map(|v| v.to_string()).join(" "));
    Ok(())
}

/// The byte offsets of [`OFFSETS`] in the running kernel, parsed in a child process (this
/// binary's hidden `tls-offsets` command): btfparse holds the whole type graph, some 50 MiB,
/// which would stay in the agent's peak resident set.
pub fn kernel_offsets() -> Result<[u32; 6], TlsError> {
    let fail = |what: String| TlsError::Btf { what };
    let out = std::process::Command::new("/proc/self/exe")
        .arg("tls-offsets")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(format!("running /proc/self/exe tls-offsets: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let values: Vec<u32> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match <[u32; 6]>::try_from(values) {
        Ok(o) if out.status.success() => Ok(o),
        _ => Err(fail(format!(
            "tls-offsets: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// The byte offsets of [`OFFSETS`] in the running kernel.
pub fn parse_kernel_offsets() -> Result<[u32; 6], TlsError> {
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    let bytes = std::fs::read(VMLINUX).map_err(|e| TlsError::Btf {
        what: format!("reading {VMLINUX}: {e}"),
    })?;
    let types = btfparse::TypeInformation::new(&BtfBytes(bytes)).map_err(|e| TlsError::Btf {
        what: format!("parsing {VMLINUX}: {e:?}"),
    })?;
    let mut out = [0u32; 6];
    for (i, (_, ty, member)) in OFFSETS.iter().enumerate() {
        let id = types.id_of(ty).ok_or_else(|| TlsError::Btf {
            what: format!("no struct {ty} in the kernel's BTF"),
        })?;
        out[i] = match types.offset_of(id, member) {
            Ok((_, btfparse::Offset::ByteOffset(o))) => o,
            other => {
                return Err(TlsError::Btf {
                    what: format!("{ty}.{member}: {other:?}"),
                });
            }
        };
    }
    Ok(out)
}

/// What was attached.
#[derive(Debug, Clone)]
pub struct TlsProbes {
    pub pid: u32,
    pub library: PathBuf,
    /// `SSL_read_ex` was found too (OpenSSL 1.1.1+).
    pub read_ex: bool,
    /// The program that ties a read to its socket: `fentry/tcp_recvmsg` or
    /// `raw_tracepoint/sys_enter`.
    pub socket_hook: &'static str,
}

/// The process listening on TCP `port` (IPv4 or IPv6).
pub fn server_process(port: u16) -> Result<u32, TlsError> {
    let proc_err = |what: &str| {
        let what = what.to_owned();
        move |source| TlsError::Proc { what, source }
    };
    let me = nix::unistd::geteuid().as_raw();
    let listening =
        crate::sockets::listeners(port).map_err(|source| TlsError::SocketTable { port, source })?;
    let inodes: Vec<u64> = listening.iter().map(|&(inode, _)| inode).collect();
    let other_user = listening.iter().any(|&(_, uid)| uid != me);
    if inodes.is_empty() {
        return Err(TlsError::NoServer { port });
    }
    // Another user's /proc/PID/fd cannot be listed (CAP_DAC_READ_SEARCH) nor its links and
    // maps read (CAP_SYS_PTRACE) without them: the listener would seem to be no one's.
    if other_user && let Some(has) = super::iface::capabilities() {
        for (cap, name) in [
            (super::iface::CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
            (super::iface::CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
        ] {
            if !has(cap) {
                return Err(TlsError::NotPrivileged {
                    missing: name,
                    needed_for: "finding the server process and the SSL library it maps \
                                 (/proc/PID of another user)",
                });
            }
        }
    }
    for p in procfs::process::all_processes().map_err(proc_err("/proc"))? {
        let Ok(p) = p else { continue };
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target
                && inodes.contains(&inode)
            {
                return Ok(p.pid as u32);
            }
        }
    }
    Err(TlsError::NoServer { port })
}

/// The SSL library `pid` maps; else its executable, which may link OpenSSL statically.
fn ssl_library(pid: u32) -> Result<(PathBuf, bool), TlsError> {
    let p = procfs::process::Process::new(pid as i32).map_err(|source| TlsError::Proc {
        what: format!("/proc/{pid}"),
        source,
    })?;
    let maps = p.maps().map_err(|source| TlsError::Proc {
        what: format!("/proc/{pid}/maps"),
        source,
    })?;
    for m in maps {
        if let procfs::process::MMapPath::Path(path) = m.pathname
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libssl.so"))
        {
            return Ok((path, false));
        }
    }
    let exe = p.exe().map_err(|source| TlsError::Proc {
        what: format!("/proc/{pid}/exe"),
        source,
    })?;
    Ok((exe, true))
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, TlsError> {
    let prog: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or(TlsError::Missing { name })?
        .try_into()
        .map_err(|source| TlsError::Load { name, source })?;
    Ok(prog)
}

/// The uprobes.
const UPROBES: [&str; 5] = [
    "mrte_ssl_read",
    "mrte_ssl_read_ex",
    "mrte_ssl_read_ret",
    "mrte_ssl_write",
    "mrte_ssl_free",
];
const FENTRY: &str = "mrte_tcp_recv";
const SYS_ENTER: &str = "mrte_sys_enter";
/// The TLS programs: the uprobes, then the two socket hooks.
const PROGRAMS: [&str; 7] = [
    UPROBES[0], UPROBES[1], UPROBES[2], UPROBES[3], UPROBES[4], FENTRY, SYS_ENTER,
];

/// Detaches (and unloads) the TLS programs, so that nothing adds to the ring after it.
pub fn detach(ebpf: &mut Ebpf) {
    for name in PROGRAMS {
        let unloaded = match ebpf.program_mut(name) {
            Some(aya::programs::Program::UProbe(p)) => p.unload(),
            Some(aya::programs::Program::RawTracePoint(p)) => p.unload(),
            Some(aya::programs::Program::FEntry(p)) => p.unload(),
            _ => Ok(()),
        };
        match unloaded {
            // Not attached here (no SSL_read_ex, say).
            Ok(()) | Err(aya::programs::ProgramError::NotLoaded) => {}
            Err(e) => tracing::warn!("detaching {name}: {e}"),
        }
    }
}

/// Loads and attaches the TLS programs for the server listening on `port`; with `prepared`,
/// also the one on `SSL_write` that hands over the heads of COM_STMT_PREPARE replies.
pub fn attach(
    ebpf: &mut Ebpf,
    port: u16,
    prepared: bool,
    hook: TlsHook,
) -> Result<TlsProbes, TlsError> {
    let pid = server_process(port)?;
    let (library, is_exe) = ssl_library(pid)?;
    let target = library.display().to_string();
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("a process id"));
    for name in UPROBES {
        uprobe(ebpf, name)?
            .load()
            .map_err(|source| TlsError::Load { name, source })?;
    }
    let socket_hook = attach_socket_hook(ebpf, hook)?;
    // The return probe first: a call entered before it was attached would wait in
    // `SSL_CALLS` for a return nobody sees.
    let mut read_ex = false;
    for (symbol, entry) in [
        ("SSL_read", "mrte_ssl_read"),
        ("SSL_read_ex", "mrte_ssl_read_ex"),
    ] {
        let ret = uprobe(ebpf, "mrte_ssl_read_ret")?.attach(symbol, &library, scope);
        match ret {
            Ok(_) => {}
            Err(source) if symbol == "SSL_read_ex" => {
                // OpenSSL before 1.1.1 has no SSL_read_ex.
                tracing::debug!(%target, "no SSL_read_ex: {source}");
                continue;
            }
            Err(source) if is_exe => {
                let exe = target.clone();
                tracing::debug!("{exe}: {source}");
                return Err(TlsError::NoLibrary { pid, exe });
            }
            Err(source) => {
                return Err(TlsError::Attach {
                    name: "mrte_ssl_read_ret",
                    target: format!("{target}:{symbol}"),
                    source,
                });
            }
        }
        uprobe(ebpf, entry)?
            .attach(symbol, &library, scope)
            .map_err(|source| TlsError::Attach {
                name: entry,
                target: format!("{target}:{symbol}"),
                source,
            })?;
        read_ex |= symbol == "SSL_read_ex";
    }
    // A freed SSL object's entries go with it (its address is reused for later ones).
    uprobe(ebpf, "mrte_ssl_free")?
        .attach("SSL_free", &library, scope)
        .map_err(|source| TlsError::Attach {
            name: "mrte_ssl_free",
            target: format!("{target}:SSL_free"),
            source,
        })?;
    if prepared {
        for symbol in ["SSL_write", "SSL_write_ex"] {
            let r = uprobe(ebpf, "mrte_ssl_write")?.attach(symbol, &library, scope);
            if let Err(source) = r {
                if symbol == "SSL_write_ex" {
                    tracing::debug!(%target, "no SSL_write_ex: {source}");
                    continue;
                }
                return Err(TlsError::Attach {
                    name: "mrte_ssl_write",
                    target: format!("{target}:{symbol}"),
                    source,
                });
            }
        }
    }
    Ok(TlsProbes {
        pid,
        library,
        read_ex,
        socket_hook,
    })
}

/// Attaches the program that ties a read to its socket (before the uprobes: a call they
/// see must find it there): fentry unless `hook` says otherwise or the kernel refuses it.
fn attach_socket_hook(ebpf: &mut Ebpf, hook: TlsHook) -> Result<&'static str, TlsError> {
    if hook != TlsHook::SysEnter {
        match attach_fentry(ebpf) {
            Ok(()) => return Ok("fentry/tcp_recvmsg"),
            Err(e) if hook == TlsHook::Auto => {
                tracing::info!(
                    "fentry on tcp_recvmsg is not available ({}); TLS reads are tied to their \
                     sockets on the sys_enter raw tracepoint, which every syscall on the host \
                     then passes through",
                    crate::error_chain(&e)
                );
            }
            Err(e) => return Err(e),
        }
    }
    let load = |source| TlsError::Load {
        name: SYS_ENTER,
        source,
    };
    let rt: &mut RawTracePoint = ebpf
        .program_mut(SYS_ENTER)
        .ok_or(TlsError::Missing { name: SYS_ENTER })?
        .try_into()
        .map_err(load)?;
    rt.load().map_err(load)?;
    rt.attach("sys_enter").map_err(|source| TlsError::Attach {
        name: SYS_ENTER,
        target: "sys_enter".into(),
        source,
    })?;
    Ok("raw_tracepoint/sys_enter")
}

fn attach_fentry(ebpf: &mut Ebpf) -> Result<(), TlsError> {
    let load = |source| TlsError::Load {
        name: FENTRY,
        source,
    };
    let btf = Btf::from_sys_fs().map_err(|e| TlsError::Btf {
        what: format!("reading /sys/kernel/btf/vmlinux: {e}"),
    })?;
    let p: &mut FEntry = ebpf
        .program_mut(FENTRY)
        .ok_or(TlsError::Missing { name: FENTRY })?
        .try_into()
        .map_err(load)?;
    p.load("tcp_recvmsg", &btf).map_err(load)?;
    if let Err(source) = p.attach() {
        // Loaded but not attached: unloaded, so that the fallback is the only hook.
        let _ = p.unload();
        return Err(TlsError::Attach {
            name: FENTRY,
            target: "tcp_recvmsg".into(),
            source,
        });
    }
    Ok(())
}
