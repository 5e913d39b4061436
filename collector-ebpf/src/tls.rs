//! TLS sessions' plaintext, taken where the server decrypts it: uprobes on `SSL_read` and
//! `SSL_read_ex` of the SSL library the server process maps (attached for that process only),
//! a uretprobe that hands over what the call returned, and a hook that ties the call to its
//! connection at the socket read OpenSSL makes inside `SSL_read`: fentry on `tcp_recvmsg`,
//! which is handed the `struct sock`, or where fentry is refused, a raw tracepoint on
//! `sys_enter`, whose read syscall names a file descriptor that the task's file table
//! (offsets from the kernel's BTF) leads to its socket. The first fields of `struct sock`
//! (`struct sock_common`: addresses and ports) have kept their offsets since Linux 2.6. Tying
//! the read to its socket in the kernel, at the read, means a descriptor reused by the next
//! connection cannot be mistaken for the last one. A read served from OpenSSL's own buffer
//! reads no socket: the SSL object's last socket (`SSL_SOCKS`) stands for it.
//!
//! They only read: the probed functions run as they would without them.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_probe_read_user as probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use collector_common::{
    COM_STMT_PREPARE, COUNTERS_TLS, Counter, Counters, FAMILY_V4, KIND_PREPARE_REPLY,
    KIND_TLS_PLAIN, MAX_RECORDS_PER_SEGMENT, MAX_TLS_READ, REPLY_HEAD, RecordHeader,
    SSL_CALL_ENTRIES, SSL_SOCK_ENTRIES, SslCall, SslPrepares, SslSock, SslStream,
};

use crate::{
    CAP_LARGE, CAP_MEDIUM, CAP_SMALL, COUNTERS, HDR, RECORDS, atomic_add, bump, nonzero,
    prepared_on, wake_flags,
};

const BPF_NOEXIST: u64 = 1;

/// `SSL_read`s under way, by thread.
#[map]
static SSL_CALLS: HashMap<u64, SslCall> = HashMap::with_max_entries(SSL_CALL_ENTRIES, 0);

/// The number of `SSL_CALLS` entries (atomically kept): while it is 0, which is always the case
/// on a server without TLS sessions, a read syscall or TCP read costs no hash lookup. Each
/// thread adds and removes only its own entry, so the count is exact.
#[map]
static SSL_CALLS_OPEN: Array<u64> = Array::with_max_entries(1, 0);

/// Each SSL object's PREPAREs awaiting their reply (prepared statements followed).
#[map]
static SSL_PREPARES: LruHashMap<u64, SslPrepares> =
    LruHashMap::with_max_entries(SSL_SOCK_ENTRIES, 0);

/// Each SSL object's connection, from its last read syscall, and its plaintext position.
#[map]
static SSL_SOCKS: LruHashMap<u64, SslStream> = LruHashMap::with_max_entries(SSL_SOCK_ENTRIES, 0);

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `struct sock_common` offsets: skc_daddr, skc_rcv_saddr, then skc_dport (network order)
/// with skc_num (host order) after it, skc_family.
const SKC_DADDR: usize = 0;
const SKC_RCV_SADDR: usize = 4;
const SKC_PORTS: usize = 12;
const SKC_FAMILY: usize = 16;

fn counters() -> Option<&'static mut Counters> {
    // SAFETY: a per-CPU map value; this block is only written by these programs, which do
    // not preempt each other on a CPU.
    COUNTERS
        .get_ptr_mut(COUNTERS_TLS)
        .map(|c| unsafe { &mut *c })
}

fn enter(ssl: u64, buf: u64, readbytes: u64) {
    let id = bpf_get_current_pid_tgid();
    let call = SslCall {
        ssl,
        buf,
        readbytes,
        sock: SslSock::default(),
    };
    // A new entry is counted; one left by a call that never returned is replaced.
    if SSL_CALLS.insert(&id, &call, BPF_NOEXIST).is_ok() {
        atomic_add(&SSL_CALLS_OPEN, 1);
    } else {
        let _ = SSL_CALLS.insert(&id, &call, 0);
    }
}

/// `int SSL_read(SSL *ssl, void *buf, int num)`
#[uprobe]
pub fn mrte_ssl_read(ctx: ProbeContext) -> u32 {
    if let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        enter(ssl, buf, 0);
    }
    0
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)`
#[uprobe]
pub fn mrte_ssl_read_ex(ctx: ProbeContext) -> u32 {
    if let (Some(ssl), Some(buf), Some(rb)) =
        (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(3))
    {
        enter(ssl, buf, rb);
    }
    0
}

/// `void SSL_free(SSL *ssl)`: the SSL object's connection is over. What was remembered of it
/// goes, so that a later SSL object at the same address (the allocator reuses it) does not
/// inherit its connection: one on a unix socket, which no read ties, would otherwise have its
/// plaintext handed over as the old TCP client's.
#[uprobe]
pub fn mrte_ssl_free(ctx: ProbeContext) -> u32 {
    if let Some(ssl) = ctx.arg::<u64>(0) {
        let _ = SSL_SOCKS.remove(&ssl);
        let _ = SSL_PREPARES.remove(&ssl);
    }
    0
}

/// Offsets of the kernel structures between a task and its sockets, from the running
/// kernel's BTF (load-time constants set by the agent; 0: not known, nothing is read).
#[unsafe(no_mangle)]
static OFF_TASK_FILES: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FILES_FDT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FDT_MAX_FDS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FDT_FD: u32 = 0;
#[unsafe(no_mangle)]
static OFF_FILE_PRIVATE_DATA: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SOCKET_SK: u32 = 0;

/// x86_64 syscall numbers of the reads OpenSSL's socket BIO (and a server's own BIO) makes.
const SYS_READ: u64 = 0;
const SYS_READV: u64 = 19;
const SYS_RECVFROM: u64 = 45;
const SYS_RECVMSG: u64 = 47;
/// `struct pt_regs` offset of `di`, the first syscall argument (x86_64 uapi).
const PT_REGS_DI: usize = 112;

fn off(global: &u32) -> usize {
    // SAFETY: a load-time constant.
    unsafe { core::ptr::read_volatile(global) as usize }
}

/// Reads a kernel pointer at `base + offset`.
fn kptr(base: u64, offset: usize) -> Option<u64> {
    // SAFETY: the helper fails cleanly on a bad address.
    unsafe { bpf_probe_read_kernel((base as usize + offset) as *const u64) }
        .ok()
        .filter(|p| *p != 0)
}

/// The `struct sock` of the current task's file descriptor `fd`, if it is a socket:
/// task->files->fdt->fd[fd]->private_data->sk.
fn fd_sock(fd: u64) -> Option<u64> {
    // SAFETY: helper without arguments; the pointer is only read through helpers.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let files = kptr(task, off(&OFF_TASK_FILES))?;
    let fdt = kptr(files, off(&OFF_FILES_FDT))?;
    // SAFETY: as in `kptr`.
    let max =
        unsafe { bpf_probe_read_kernel((fdt as usize + off(&OFF_FDT_MAX_FDS)) as *const u32) }
            .ok()?;
    if fd >= u64::from(max) {
        return None;
    }
    let fds = kptr(fdt, off(&OFF_FDT_FD))?;
    let file = kptr(fds, fd as usize * 8)?;
    let socket = kptr(file, off(&OFF_FILE_PRIVATE_DATA))?;
    kptr(socket, off(&OFF_SOCKET_SK))
}

/// `tcp_recvmsg` (fentry): a TCP read inside a probed `SSL_read` names the connection it
/// reads. It runs only for TCP reads (of any process: one map lookup for those not inside a
/// probed call), and hands the socket itself: no walk of the file table.
#[aya_ebpf::macros::fentry(function = "tcp_recvmsg")]
pub fn mrte_tcp_recv(ctx: aya_ebpf::programs::FEntryContext) -> i32 {
    if !nonzero(&SSL_CALLS_OPEN) {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a pointer into the map's value, only this thread's entry.
    let Some(call) = SSL_CALLS.get_ptr_mut(&id).map(|c| unsafe { &mut *c }) else {
        return 0;
    };
    let sk: u64 = ctx.arg(0);
    tie(call, sk);
    0
}

/// `sys_enter` (raw tracepoint), where fentry is not to be had: a read syscall inside a
/// probed `SSL_read` names the connection it reads (its fd, and through the task's file
/// table, its socket). It runs for every syscall on the host, which then all take the
/// tracing entry path: the fallback, not the default.
#[aya_ebpf::macros::raw_tracepoint(tracepoint = "sys_enter")]
pub fn mrte_sys_enter(ctx: aya_ebpf::programs::RawTracePointContext) -> i32 {
    let nr: u64 = ctx.arg(1);
    if !matches!(nr, SYS_READ | SYS_READV | SYS_RECVFROM | SYS_RECVMSG) || !nonzero(&SSL_CALLS_OPEN)
    {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a pointer into the map's value, only this thread's entry.
    let Some(call) = SSL_CALLS.get_ptr_mut(&id).map(|c| unsafe { &mut *c }) else {
        return 0;
    };
    if off(&OFF_TASK_FILES) == 0 {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    // SAFETY: as in `kptr`.
    let Ok(fd) = (unsafe { bpf_probe_read_kernel((regs as usize + PT_REGS_DI) as *const u64) })
    else {
        return 0;
    };
    if let Some(sk) = fd_sock(fd) {
        tie(call, sk);
    }
    0
}

/// Ties the SSL call under way to the connection of `sk` (a `struct sock`), if it is one to
/// a captured port, and remembers it as the SSL object's last connection.
#[inline(always)]
fn tie(call: &mut SslCall, sk: u64) {
    let sk = sk as *const u8;
    // SAFETY: kernel reads through the helper, which fails cleanly on a bad address.
    let read = |off: usize| unsafe { bpf_probe_read_kernel(sk.add(off) as *const [u8; 4]) };
    let (Ok(daddr), Ok(saddr), Ok(ports), Ok(family)) = (
        read(SKC_DADDR),
        read(SKC_RCV_SADDR),
        read(SKC_PORTS),
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel(sk.add(SKC_FAMILY) as *const u16) },
    ) else {
        return;
    };
    let server_port = u16::from_ne_bytes([ports[2], ports[3]]);
    // Only a connection to a captured port (a stale table entry, a pipe, a file: not ours).
    if !crate::captured_port(server_port) {
        return;
    }
    // An IPv6 socket carries an IPv4 client's address here too (v4-mapped); a real IPv6
    // client has none.
    if family != AF_INET && (family != AF_INET6 || daddr == [0; 4]) {
        if let Some(c) = counters() {
            bump(c, Counter::TlsIpv6);
        }
        return;
    }
    call.sock = SslSock {
        client: daddr,
        server: saddr,
        client_port: u16::from_be_bytes([ports[0], ports[1]]),
        server_port,
    };
    // Updated in place: a copy of the entry chosen between two values compiles to a read of
    // a register the verifier sees as unset on one path.
    match SSL_SOCKS.get_ptr_mut(&call.ssl) {
        Some(known) => {
            // SAFETY: this SSL object's entry, one thread's reads at a time.
            let known = unsafe { &mut *known };
            if known.sock == call.sock {
                return;
            }
            // A new connection of the SSL object: its plaintext count starts again. One whose
            // socket was not known yet keeps what was read meanwhile.
            if known.sock.client_port != 0 {
                known.read = 0;
            }
            known.sock = call.sock;
        }
        None => {
            // The SSL object's first connection seen: its plaintext count starts.
            let stream = SslStream {
                sock: call.sock,
                read: 0,
            };
            let _ = SSL_SOCKS.insert(&call.ssl, &stream, 0);
        }
    }
}

/// `SSL_read` / `SSL_read_ex` return: the plaintext they gave the server, handed over.
#[uretprobe]
pub fn mrte_ssl_read_ret(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the entry is copied out before it is removed.
    let Some(call) = (unsafe { SSL_CALLS.get(&id) }).copied() else {
        return 0;
    };
    if SSL_CALLS.remove(&id).is_ok() {
        atomic_add(&SSL_CALLS_OPEN, 0u64.wrapping_sub(1));
    }
    let ret: i64 = ctx.ret::<i64>() as i32 as i64;
    if ret <= 0 {
        return 0;
    }
    let n = if call.readbytes != 0 {
        // SAFETY: a user pointer read through the helper.
        let mut got: u64 = 0;
        let r = unsafe {
            probe_read_user(
                &mut got as *mut u64 as *mut c_void,
                8,
                call.readbytes as *const c_void,
            )
        };
        if r < 0 {
            return 0;
        }
        got
    } else {
        ret as u64
    };
    let Some(c) = counters() else {
        return 0;
    };
    // The connection, tied at this call's read syscall or at an earlier one (a read served
    // from OpenSSL's buffer). Its position counts every byte read, handed over or not, so
    // that user space sees each loss as a jump.
    let Some(stream) = SSL_SOCKS.get_ptr_mut(&call.ssl) else {
        // Counted from here, so that the first read with a socket shows what went before.
        bump(c, Counter::TlsNoSocket);
        let stream = SslStream {
            sock: SslSock::default(),
            read: n as u32,
        };
        let _ = SSL_SOCKS.insert(&call.ssl, &stream, 0);
        return 0;
    };
    // SAFETY: this SSL object's reads are one thread's, one at a time.
    let stream = unsafe { &mut *stream };
    let at = stream.read;
    stream.read = at.wrapping_add(n as u32);
    let sock = stream.sock;
    if sock.client_port == 0 {
        bump(c, Counter::TlsNoSocket);
        return 0;
    }
    bump(c, Counter::TlsReads);
    let mut want = n as u32;
    if n > MAX_TLS_READ as u64 {
        want = MAX_TLS_READ;
        bump(c, Counter::TlsTruncated);
    }
    emit(c, &call, &sock, at, want);
    if prepared_on() {
        count_prepares(c, &call, n);
    }
    0
}

/// A plaintext read that starts a COM_STMT_PREPARE (a server reads a packet's header alone,
/// or with its payload): its reply will be written by `SSL_write`, whose head is handed over.
fn count_prepares(c: &mut Counters, call: &SslCall, n: u64) {
    let mut head = [0u8; 5];
    let len = if n < 5 { n as u32 } else { 5 };
    if len == 0 {
        return;
    }
    // SAFETY: a user buffer read through the helper; `len` is 1..=5.
    let r = unsafe {
        probe_read_user(
            head.as_mut_ptr() as *mut c_void,
            len,
            call.buf as *const c_void,
        )
    };
    if r < 0 {
        return;
    }
    // SAFETY: copied out of the map.
    let mut state = unsafe { SSL_PREPARES.get(&call.ssl) }
        .copied()
        .unwrap_or_default();
    let starts = if n == 4 {
        state.header = u8::from(head[3] == 0);
        false
    } else if n >= 5 && head[3] == 0 {
        state.header = 0;
        head[4] == COM_STMT_PREPARE
    } else {
        let after_header = state.header != 0;
        state.header = 0;
        after_header && head[0] == COM_STMT_PREPARE
    };
    if starts {
        state.awaiting += 1;
        bump(c, Counter::TlsPrepares);
    }
    if starts || state.header != 0 || state.awaiting != 0 {
        let _ = SSL_PREPARES.insert(&call.ssl, &state, 0);
    }
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)` (and `SSL_write_ex`, same first
/// arguments): while the connection awaits a COM_STMT_PREPARE reply, the head of what the
/// server writes, as the egress program hands it over for plain sessions.
#[uprobe]
pub fn mrte_ssl_write(ctx: ProbeContext) -> u32 {
    let (Some(ssl), Some(buf), Some(num)) =
        (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2))
    else {
        return 0;
    };
    // SAFETY: copied out of the map.
    let Some(mut state) = (unsafe { SSL_PREPARES.get(&ssl) }).copied() else {
        return 0;
    };
    if state.awaiting == 0 || num == 0 {
        return 0;
    }
    // SAFETY: copied out of the map.
    let Some(sock) = (unsafe { SSL_SOCKS.get(&ssl) }).map(|s| s.sock) else {
        return 0;
    };
    let Some(c) = counters() else {
        return 0;
    };
    let awaiting = state.awaiting;
    state.awaiting = 0;
    let _ = SSL_PREPARES.insert(&ssl, &state, 0);
    let n = if num < REPLY_HEAD as u64 {
        num as u32
    } else {
        REPLY_HEAD
    };
    // SAFETY: reads a local (see `emit_one`).
    let n = unsafe { core::ptr::read_volatile(&n) };
    let n = (n.wrapping_sub(1) & (CAP_SMALL - 1)) + 1;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut hdr = RecordHeader {
        ts_ns: now,
        payload_len: n,
        cap_len: n,
        sport: sock.server_port,
        dport: sock.client_port,
        family: FAMILY_V4,
        kind: KIND_PREPARE_REPLY,
        awaiting: if awaiting > 255 { 255 } else { awaiting as u8 },
        ..Default::default()
    };
    hdr.saddr[..4].copy_from_slice(&sock.server);
    hdr.daddr[..4].copy_from_slice(&sock.client);
    let Some(mut entry) = RECORDS.reserve::<[u8; HDR + CAP_SMALL as usize]>(0) else {
        bump(c, Counter::RingFull);
        return 0;
    };
    let base = entry.as_mut_ptr() as *mut u8;
    // SAFETY: the entry holds the header and CAP_SMALL bytes; `n` <= REPLY_HEAD.
    let r = unsafe {
        core::ptr::write(base as *mut RecordHeader, hdr);
        probe_read_user(base.add(HDR) as *mut c_void, n, buf as *const c_void)
    };
    if r < 0 {
        entry.discard(0);
        bump(c, Counter::TlsReadFailed);
        return 0;
    }
    entry.submit(wake_flags((HDR + CAP_SMALL as usize) as u64));
    bump(c, Counter::TlsReplies);
    bump(c, Counter::Records);
    c.0[Counter::Bytes as usize] += n as u64;
    0
}

/// One record of `SIZE` bytes (header + `CAP`) with up to `CAP` of the `n` plaintext bytes
/// at `done` in the call's buffer; the bytes it took, or None (counted) if it could not.
#[inline(always)]
fn emit_one<const SIZE: usize, const CAP: u32>(
    c: &mut Counters,
    hdr: &mut RecordHeader,
    call: &SslCall,
    done: u32,
    n: u32,
    flags: u64,
) -> Option<u32> {
    let n = if n > CAP { CAP } else { n };
    // The verifier must see the length in 1..=CAP (see the TC program's `emit_one`).
    // SAFETY: reads a local.
    let n = unsafe { core::ptr::read_volatile(&n) };
    let n = (n.wrapping_sub(1) & (CAP - 1)) + 1;
    let Some(mut entry) = RECORDS.reserve::<[u8; SIZE]>(0) else {
        bump(c, Counter::RingFull);
        return None;
    };
    hdr.cap_len = n;
    let base = entry.as_mut_ptr() as *mut u8;
    // SAFETY: entries are 8-aligned and hold the header and CAP bytes; the helper reads the
    // user buffer and fails cleanly on a bad address.
    let r = unsafe {
        core::ptr::write(base as *mut RecordHeader, *hdr);
        probe_read_user(
            base.add(HDR) as *mut c_void,
            n,
            (call.buf + done as u64) as *const c_void,
        )
    };
    if r < 0 {
        entry.discard(0);
        bump(c, Counter::TlsReadFailed);
        return None;
    }
    entry.submit(flags);
    Some(n)
}

fn emit(c: &mut Counters, call: &SslCall, sock: &SslSock, at: u32, want: u32) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut hdr = RecordHeader {
        ts_ns: now,
        payload_len: want,
        sport: sock.client_port,
        dport: sock.server_port,
        family: FAMILY_V4,
        kind: KIND_TLS_PLAIN,
        ..Default::default()
    };
    hdr.saddr[..4].copy_from_slice(&sock.client);
    hdr.daddr[..4].copy_from_slice(&sock.server);
    let wake = wake_flags((want as usize + HDR) as u64);
    let mut done = 0u32;
    for _ in 0..MAX_RECORDS_PER_SEGMENT {
        if done >= want {
            break;
        }
        let n = want - done;
        let last = n <= CAP_LARGE;
        let flags = if last { wake } else { crate::BPF_RB_NO_WAKEUP };
        hdr.offset = done;
        hdr.seq = at.wrapping_add(done);
        // The smallest record class that holds the rest (a read is mostly a few hundred
        // bytes: a 16 KiB record for each would fill the ring 64 times sooner).
        let sent = if n <= CAP_SMALL {
            emit_one::<{ HDR + CAP_SMALL as usize }, CAP_SMALL>(c, &mut hdr, call, done, n, flags)
        } else if n <= CAP_MEDIUM {
            emit_one::<{ HDR + CAP_MEDIUM as usize }, CAP_MEDIUM>(c, &mut hdr, call, done, n, flags)
        } else {
            emit_one::<{ HDR + CAP_LARGE as usize }, CAP_LARGE>(c, &mut hdr, call, done, n, flags)
        };
        let Some(n) = sent else {
            return;
        };
        bump(c, Counter::Records);
        c.0[Counter::Bytes as usize] += n as u64;
        done += n;
    }
}
