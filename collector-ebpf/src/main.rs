//! TC programs of the capture.
//!
//! `mrte_capture` (ingress) hands every client payload byte arriving on the MySQL port(s) to
//! user space through a ring buffer, and counts everything it does not hand over. It also marks
//! a connection whose client sent a COM_STMT_PREPARE as awaiting the reply (`AWAITING`).
//!
//! `mrte_replies` (egress, only with prepared statements on) hands over the first bytes of the
//! reply to such a COM_STMT_PREPARE: the statement id the client's COM_STMT_EXECUTEs will carry.
//! On any other packet it costs the header parse and a lookup of the source port; on other
//! server segments a read of the number of marks, and while a connection awaits a reply, a
//! hash lookup.
//!
//! Both only observe: every path returns `TC_ACT_UNSPEC` ("continue"; `TCX_NEXT` under TCX),
//! so the packet and the programs after them are untouched.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target's atomic add (see `atomic_add`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::size_of,
    ptr,
};

use aya_ebpf::{
    bindings::BPF_F_CURRENT_CPU,
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_ktime_get_ns, bpf_perf_event_output, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, LruHashMap, PerCpuArray, PerfEventByteArray, RingBuf},
    programs::TcContext,
};
use collector_common::{
    AWAITING_ENTRIES, Awaiting, COM_STMT_PREPARE, COUNTER_COUNT, COUNTERS_EGRESS, COUNTERS_INGRESS,
    Counter, Counters, DEFAULT_RING_BYTES, FAMILY_V4, FAMILY_V6, FlowKey, KIND_CLIENT,
    KIND_PREPARE_REPLY, LinkKind, MAX_RECORDS_PER_SEGMENT, MAX_SEGMENT_CAPTURE, PERF_MAX_SAMPLE,
    PORT_MAP_ENTRIES, PREPARE_SCAN, RECORD_CAPACITIES, REPLY_HEAD, RecordHeader, TCP_FIN, TCP_RST,
    TCP_SYN, Transport,
};

/// Load-time constants (`.rodata`, set by the agent with `EbpfLoader::override_global`); the
/// verifier sees them as constants and prunes the branches they rule out.
#[unsafe(no_mangle)]
static LINK_KIND: u8 = LinkKind::Ethernet as u8;
/// Most payload bytes handed over per segment; 0 = the whole segment.
#[unsafe(no_mangle)]
static SNAP_LEN: u32 = 0;
/// A `Transport`.
#[unsafe(no_mangle)]
static TRANSPORT: u8 = Transport::RingClasses as u8;
/// Unread bytes in the ring past which a submit wakes the reader; below it, records wait for the
/// reader's own timer (its cadence follows `--read_timeout`). Each wake-up is an irq_work (a
/// self-IPI, a VM exit under virtualisation) charged to the packet that triggered it, so at
/// request/response rates none is sent at all. 0: the kernel's own rule (wake whenever the
/// reader had caught up, i.e. on nearly every record).
#[unsafe(no_mangle)]
static WAKE_AT_BYTES: u64 = DEFAULT_RING_BYTES as u64 / 8;
/// Non-zero: follow prepared statements (mark connections awaiting a COM_STMT_PREPARE reply).
#[unsafe(no_mangle)]
static PREPARED: u8 = 1;

/// Non-zero: capture segments the interface received for other hosts too (promiscuous mode,
/// a mirror port); zero: leave them out, counted.
#[unsafe(no_mangle)]
static OTHER_HOSTS: u8 = 0;

/// `skb->pkt_type` of a frame addressed to another host's MAC (uapi `if_packet.h`).
const PACKET_OTHERHOST: u32 = 3;

/// The first captured port; with `MORE_PORTS` non-zero, `PORTS` holds the others. A packet on
/// the one port most captures have is matched without touching the 64 KiB `PORTS` array,
/// whose line for the port is a cache miss at request rates.
#[unsafe(no_mangle)]
static FIRST_PORT: u16 = 0;
#[unsafe(no_mangle)]
static MORE_PORTS: u8 = 1;

#[map]
static PORTS: Array<u8> = Array::with_max_entries(PORT_MAP_ENTRIES, 0);

/// `COUNTERS_INGRESS` and `COUNTERS_EGRESS`: one block per program.
#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(3, 0);

/// Connections whose client sent a COM_STMT_PREPARE the server has not answered yet.
#[map]
static AWAITING: LruHashMap<FlowKey, Awaiting> = LruHashMap::with_max_entries(AWAITING_ENTRIES, 0);

/// The sum of the `AWAITING` counts (atomically kept): while it is 0, which is most of the time
/// once clients have prepared their statements, a server segment costs no hash lookup. It can
/// only stay too high (an entry evicted with a count), which costs lookups, never a reply.
#[map]
static MARKS: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static RECORDS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Used only with `Transport::PerfSkb`.
#[map]
static PERF_RECORDS: PerfEventByteArray = PerfEventByteArray::new(0);

mod tls;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
const IPV6_HLEN: usize = 40;
/// Packet offsets read in place (beyond: through the helper).
const MAX_DIRECT_OFFSET: usize = 0xff00;
/// IPv6 extension headers skipped before giving up (counted as too deep).
const MAX_IPV6_EXT: usize = 6;

const HDR: usize = size_of::<RecordHeader>();
const CAP_SMALL: u32 = RECORD_CAPACITIES[0];
const CAP_MEDIUM: u32 = RECORD_CAPACITIES[1];
const CAP_LARGE: u32 = RECORD_CAPACITIES[2];

#[classifier]
pub fn mrte_capture(ctx: TcContext) -> i32 {
    let Some(counters) = COUNTERS.get_ptr_mut(COUNTERS_INGRESS) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a per-CPU map value, only this CPU touches it while the program runs.
    let counters = unsafe { &mut *counters };
    bump(counters, Counter::Packets);
    if let Err(reason) = capture(&ctx, counters) {
        bump(counters, reason);
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn mrte_replies(ctx: TcContext) -> i32 {
    let Some(counters) = COUNTERS.get_ptr_mut(COUNTERS_EGRESS) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: as in `mrte_capture`.
    let counters = unsafe { &mut *counters };
    bump(counters, Counter::Packets);
    // While no connection awaits a reply, nothing on egress is wanted: not even the headers
    // are read.
    if !nonzero(&MARKS) {
        bump(counters, Counter::Unawaited);
        return TC_ACT_UNSPEC;
    }
    if let Err(reason) = reply(&ctx, counters) {
        bump(counters, reason);
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn bump(c: &mut Counters, which: Counter) {
    let i = which as usize;
    if i < COUNTER_COUNT {
        c.0[i] += 1;
    }
}

/// What the headers say about one TCP segment.
struct Segment {
    family: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
    /// Offset of the payload from `skb->data`.
    payload_off: u32,
    payload_len: u32,
}

/// Bounds of the packet as the program may read it directly.
struct Packet {
    data: usize,
    data_end: usize,
    /// `skb->len`: the whole packet, linear part and fragments.
    len: usize,
}

/// Where headers are read from: the packet's linear data (the common case), or a copy of the
/// packet's first bytes (headers a driver left in page fragments).
trait Headers {
    /// `skb->len`.
    fn len(&self) -> usize;
    /// The header `T` at `off`; `short` if the packet ends first, [`Counter::HeaderNonlinear`]
    /// if it is not where this source can read it.
    fn read<T: Copy>(&self, off: usize, short: Counter) -> Result<T, Counter>;
}

impl Packet {
    /// `T` at `off` if it is in the linear data.
    #[inline(always)]
    fn linear<T: Copy>(&self, off: usize) -> Option<T> {
        let start = self.data + off;
        if start + size_of::<T>() > self.data_end {
            return None;
        }
        // SAFETY: `size_of::<T>()` bytes at `start` are inside the linear packet data; all
        // header types are byte arrays (alignment 1).
        Some(unsafe { ptr::read_unaligned(start as *const T) })
    }
}

impl Headers for Packet {
    fn len(&self) -> usize {
        self.len
    }

    /// Bounds-checked against the linear data. Each header is read whole through the one
    /// checked pointer: a field read through a pointer recomputed from another base after a
    /// variable-length hop is rejected by the verifier.
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize, short: Counter) -> Result<T, Counter> {
        match self.linear(off) {
            Some(h) => Ok(h),
            None if off + size_of::<T>() > self.len => Err(short),
            None => Err(Counter::HeaderNonlinear),
        }
    }
}

/// Bytes of headers copied when they are not all linear: deeper ones (long IPv6 extension
/// chains) are still counted as `header_nonlinear`.
const HEADER_COPY: usize = 256;

/// Scratch for [`Copied`]: twice [`HEADER_COPY`], so that a header read at a masked offset
/// below it stays inside.
#[map]
static HEADER_SCRATCH: PerCpuArray<[u8; 2 * HEADER_COPY]> = PerCpuArray::with_max_entries(1, 0);

/// The packet's first bytes, copied through `bpf_skb_load_bytes` (which reads past the linear
/// part) into this CPU's scratch.
struct Copied {
    buf: *const u8,
    /// Bytes copied: `HEADER_COPY`, or the whole packet if shorter.
    copied: usize,
    len: usize,
}

impl Copied {
    #[inline(always)]
    fn new(ctx: &TcContext, len: usize) -> Result<Self, Counter> {
        let buf = HEADER_SCRATCH
            .get_ptr_mut(0)
            .ok_or(Counter::HeaderNonlinear)? as *mut u8;
        let n = if len < HEADER_COPY { len } else { HEADER_COPY };
        if n == 0 {
            return Err(Counter::HeaderNonlinear);
        }
        // In 1..=HEADER_COPY for the verifier: read back through a volatile load, or LLVM
        // drops the mask as redundant and older verifiers (6.1) lose the bound.
        // SAFETY: reads a local.
        let n = unsafe { ptr::read_volatile(&(n as u32)) };
        let n = (n.wrapping_sub(1) & (HEADER_COPY as u32 - 1)) + 1;
        // SAFETY: the scratch holds 2 * HEADER_COPY bytes; the helper checks the skb side.
        let r = unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                ctx.skb.skb as *const c_void,
                0,
                buf as *mut c_void,
                n,
            )
        };
        if r < 0 {
            return Err(Counter::HeaderNonlinear);
        }
        Ok(Self {
            buf,
            copied: n as usize,
            len,
        })
    }
}

impl Headers for Copied {
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize, short: Counter) -> Result<T, Counter> {
        if off + size_of::<T>() > self.len {
            return Err(short);
        }
        if off + size_of::<T>() > self.copied {
            return Err(Counter::HeaderNonlinear);
        }
        // The mask changes nothing (`off` < HEADER_COPY here) but bounds it for the verifier.
        let off = off & (HEADER_COPY - 1);
        // SAFETY: `off + size_of::<T>()` <= 2 * HEADER_COPY: inside the scratch.
        Ok(unsafe { ptr::read_unaligned(self.buf.add(off) as *const T) })
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    ver_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Ext {
    next: u8,
    len: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    doff: u8,
    flags: u8,
    window: [u8; 2],
    check: [u8; 2],
    urg: [u8; 2],
}

/// Parses L2 to L4: the TCP segment, and the interface it is on.
#[inline(always)]
fn parse(ctx: &TcContext, counters: &mut Counters) -> Result<(Segment, u32, Packet), Counter> {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer the kernel passed in.
    let (len, protocol, ifindex) = unsafe { ((*skb).len, (*skb).protocol, (*skb).ifindex) };
    let pkt = Packet {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: len as usize,
    };
    // Headers outside the linear part: parsed again, from a copy. A restart rather than a
    // helper read at each header, which would double the verifier's paths at every one.
    let (seg, gso) = match parse_headers(&pkt, protocol) {
        Err(Counter::HeaderNonlinear) => parse_headers(&Copied::new(ctx, len as usize)?, protocol)?,
        r => r?,
    };
    if gso {
        bump(counters, Counter::GsoLength);
    }
    Ok((seg, ifindex, pkt))
}

#[inline(always)]
fn parse_headers(pkt: &impl Headers, protocol: u32) -> Result<Parsed, Counter> {
    // L2. The outer VLAN tag (if any) is already in skb metadata at TC ingress; an inner
    // (QinQ) tag, or both when the frame comes from BPF_PROG_TEST_RUN, is still in the bytes.
    // SAFETY: a load-time constant.
    let link = unsafe { ptr::read_volatile(&LINK_KIND) };
    let (mut l3_proto, mut off) = if link == LinkKind::Ethernet as u8 {
        let eth: [u8; ETH_HLEN] = pkt.read(0, Counter::EthShort)?;
        (u16::from_be_bytes([eth[12], eth[13]]), ETH_HLEN)
    } else {
        (u16::from_be(protocol as u16), 0)
    };
    for _ in 0..2 {
        if l3_proto != ETH_P_8021Q && l3_proto != ETH_P_8021AD {
            break;
        }
        let tag: [u8; 4] = pkt.read(off, Counter::VlanShort)?;
        l3_proto = u16::from_be_bytes([tag[2], tag[3]]);
        off += 4;
    }
    if l3_proto == ETH_P_8021Q || l3_proto == ETH_P_8021AD {
        return Err(Counter::VlanTooDeep);
    }
    match l3_proto {
        ETH_P_IP => parse_ipv4(pkt, off),
        ETH_P_IPV6 => parse_ipv6(pkt, off),
        _ => Err(Counter::NotIp),
    }
}

#[inline(always)]
fn captured_port(port: u16) -> bool {
    // SAFETY: load-time constants.
    let (first, more) = unsafe {
        (
            ptr::read_volatile(&FIRST_PORT),
            ptr::read_volatile(&MORE_PORTS),
        )
    };
    port == first || (more != 0 && matches!(PORTS.get(port as u32), Some(v) if *v != 0))
}

#[inline(always)]
fn prepared_on() -> bool {
    // SAFETY: a load-time constant.
    unsafe { ptr::read_volatile(&PREPARED) != 0 }
}

#[inline(always)]
fn capture(ctx: &TcContext, counters: &mut Counters) -> Result<(), Counter> {
    let (seg, ifindex, pkt) = parse(ctx, counters)?;
    if !captured_port(seg.dport) {
        return Err(Counter::OtherPort);
    }
    // SAFETY: the context pointer the kernel passed in; OTHER_HOSTS is a load-time constant.
    let (pkt_type, other_hosts) =
        unsafe { ((*ctx.skb.skb).pkt_type, ptr::read_volatile(&OTHER_HOSTS)) };
    if pkt_type == PACKET_OTHERHOST && other_hosts == 0 {
        return Err(Counter::OtherHost);
    }
    bump(counters, Counter::TcpToPort);
    if seg.payload_len == 0 {
        if seg.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
            return Err(Counter::NoPayload);
        }
        bump(counters, Counter::Control);
        if prepared_on() && seg.flags & (TCP_FIN | TCP_RST) != 0 {
            // Whatever the connection awaited, it will not come.
            let key = client_key(&seg);
            if let Some(v) = AWAITING.get_ptr_mut(&key) {
                // SAFETY: a pointer to the map value.
                let count = unsafe { core::mem::replace(&mut (*v).count, 0) };
                atomic_add(&MARKS, 0u64.wrapping_sub(count as u64));
                let _ = AWAITING.remove(&key);
            }
        }
        return emit_control(ctx, counters, &seg, ifindex);
    }
    bump(counters, Counter::WithPayload);
    if prepared_on() {
        mark_prepares(ctx, &pkt, counters, &seg);
    }
    emit(ctx, counters, &seg, ifindex)
}

/// The connection of a client-to-server segment.
#[inline(always)]
fn client_key(seg: &Segment) -> FlowKey {
    FlowKey {
        client: seg.saddr,
        server: seg.daddr,
        client_port: seg.sport,
        server_port: seg.dport,
    }
}

/// Counts the COM_STMT_PREPAREs among the first packets of a client segment into the
/// connection's `AWAITING` entry. Looks at packet starts only as far as the segment starts
/// one: a segment in the middle of a packet matches only by chance, which costs one reply head
/// that user space then finds unmatched.
#[inline(always)]
fn mark_prepares(ctx: &TcContext, pkt: &Packet, counters: &mut Counters, seg: &Segment) {
    let mut off = 0u32;
    let mut found = 0u32;
    for _ in 0..PREPARE_SCAN {
        if off + 5 > seg.payload_len {
            break;
        }
        let at = (seg.payload_off + off) as usize;
        // Read in place where the bytes are linear (the common case), by the helper where not.
        // The verifier tracks packet offsets only below 64 KiB: the bound is stated here.
        let direct = if at < MAX_DIRECT_OFFSET {
            pkt.linear::<[u8; 5]>(at)
        } else {
            None
        };
        let h = match direct {
            Some(h) => h,
            None => match ctx.load::<[u8; 5]>(at) {
                Ok(h) => h,
                Err(_) => break,
            },
        };
        let len = u32::from_le_bytes([h[0], h[1], h[2], 0]);
        if h[3] == 0 && h[4] == COM_STMT_PREPARE && len > 0 {
            found += 1;
        }
        off += 4 + len;
    }
    if found == 0 {
        return;
    }
    let key = client_key(seg);
    match AWAITING.get_ptr_mut(&key) {
        Some(v) => {
            // SAFETY: a pointer to the map value; a race with the reply (another CPU) at worst
            // loses one count, which costs that statement its id, never a wrong one.
            let v = unsafe { &mut *v };
            if v.seq == seg.seq && v.count != 0 {
                // A retransmission of the segment that marked already.
                return;
            }
            v.count += found;
            v.seq = seg.seq;
        }
        None => {
            let v = Awaiting {
                count: found,
                seq: seg.seq,
            };
            if AWAITING.insert(&key, &v, 0).is_err() {
                bump(counters, Counter::AwaitFull);
                return;
            }
        }
    }
    atomic_add(&MARKS, found as u64);
    counters.0[Counter::PrepareMarked as usize] += found as u64;
}

/// Adds `n` (wrapping: a negative amount is its two's complement) to the one value of a count
/// shared by all CPUs (`MARKS`, `SSL_CALLS_OPEN`), atomically.
#[inline(always)]
pub(crate) fn atomic_add(count: &Array<u64>, n: u64) {
    if let Some(p) = count.get_ptr_mut(0) {
        // SAFETY: the map's one value, 8-aligned, shared by all CPUs: only atomic access (the
        // BPF target has no `AtomicU64::fetch_add`; the intrinsic is its atomic add).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
    }
}

/// Whether such a count is non-zero (true if its value cannot be read: the safe side).
#[inline(always)]
pub(crate) fn nonzero(count: &Array<u64>) -> bool {
    match count.get_ptr(0) {
        // SAFETY: as in `atomic_add`; a plain load of an aligned u64 is atomic.
        Some(p) => (unsafe { core::ptr::read_volatile(p) }) != 0,
        None => true,
    }
}

/// A record with the first bytes of a reply, built on the stack and copied into the buffer.
#[repr(C)]
struct ReplyRecord {
    hdr: RecordHeader,
    head: [u8; REPLY_HEAD as usize],
}

/// Egress: the first bytes of a server segment that starts the reply a connection awaits.
#[inline(always)]
fn reply(ctx: &TcContext, counters: &mut Counters) -> Result<(), Counter> {
    let (seg, ifindex, _) = parse(ctx, counters)?;
    if !captured_port(seg.sport) {
        return Err(Counter::OtherPort);
    }
    bump(counters, Counter::TcpToPort);
    let key = FlowKey {
        client: seg.daddr,
        server: seg.saddr,
        client_port: seg.dport,
        server_port: seg.sport,
    };
    let Some(v) = AWAITING.get_ptr_mut(&key) else {
        return Ok(());
    };
    // SAFETY: a pointer to the map value (see `mark_prepares`).
    let v = unsafe { &mut *v };
    if v.count == 0 {
        return Ok(());
    }
    bump(counters, Counter::Awaited);
    if seg.payload_len == 0 {
        return Err(Counter::NoPayload);
    }
    let mut rec = ReplyRecord {
        hdr: header(&seg, ifindex),
        head: [0; REPLY_HEAD as usize],
    };
    let first: [u8; 5] = if seg.payload_len >= 5 {
        ctx.load(seg.payload_off as usize)
            .map_err(|_| Counter::LoadFailed)?
    } else {
        return Err(Counter::NotReply);
    };
    // A reply's first packet has sequence id 1 (the command had 0).
    if first[3] != 1 {
        return Err(Counter::NotReply);
    }
    // This reply answers the latest PREPARE; any older mark is stale (its reply was not
    // seen, or a client pipelined PREPAREs): user space pairs only replies with one.
    let awaiting = v.count;
    v.count = 0;
    atomic_add(&MARKS, 0u64.wrapping_sub(awaiting as u64));
    rec.hdr.kind = KIND_PREPARE_REPLY;
    rec.hdr.awaiting = if awaiting > 255 { 255 } else { awaiting as u8 };
    if seg.payload_len >= REPLY_HEAD {
        rec.head = ctx
            .load(seg.payload_off as usize)
            .map_err(|_| Counter::LoadFailed)?;
        rec.hdr.cap_len = REPLY_HEAD;
    } else {
        rec.head[..5].copy_from_slice(&first);
        rec.hdr.cap_len = 5;
    }
    // SAFETY: a load-time constant.
    if unsafe { ptr::read_volatile(&TRANSPORT) } == Transport::PerfSkb as u8 {
        // SAFETY: the map is a perf event array; the record is on the stack.
        let ret = unsafe {
            bpf_perf_event_output(
                ctx.skb.skb as *mut c_void,
                &PERF_RECORDS as *const PerfEventByteArray as *mut c_void,
                BPF_F_CURRENT_CPU,
                &mut rec as *mut ReplyRecord as *mut c_void,
                size_of::<ReplyRecord>() as u64,
            )
        };
        if ret < 0 {
            return Err(Counter::RingFull);
        }
    } else if RECORDS
        .output::<ReplyRecord>(&rec, wake_flags(size_of::<ReplyRecord>() as u64))
        .is_err()
    {
        return Err(Counter::RingFull);
    }
    bump(counters, Counter::Records);
    counters.0[Counter::Bytes as usize] += rec.hdr.cap_len as u64;
    Ok(())
}

/// The segment, and whether the IP length was 0 (GSO / BIG TCP) so that the payload length
/// came from `skb->len`.
type Parsed = (Segment, bool);

#[inline(always)]
fn parse_ipv4(pkt: &impl Headers, off: usize) -> Result<Parsed, Counter> {
    let ip: Ipv4Hdr = pkt.read(off, Counter::Ipv4Short)?;
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(Counter::Ipv4BadIhl);
    }
    // Options: the whole header must be there too, checked at its real length.
    if off + ihl > pkt.len() {
        return Err(Counter::Ipv4Short);
    }
    let available = pkt.len() - off;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    let (ip_len, gso) = if tot_len == 0 {
        (available, true)
    } else if tot_len < ihl || tot_len > available {
        return Err(Counter::Ipv4BadLength);
    } else {
        (tot_len, false)
    };
    // MF set or a fragment offset: not a whole TCP segment.
    if u16::from_be_bytes(ip.frag_off) & 0x3fff != 0 {
        return Err(Counter::Fragment);
    }
    if ip.proto != IPPROTO_TCP {
        return Err(Counter::NotTcp);
    }
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr[..4].copy_from_slice(&ip.saddr);
    daddr[..4].copy_from_slice(&ip.daddr);
    let seg = parse_tcp(pkt, off + ihl, ip_len - ihl, FAMILY_V4, saddr, daddr)?;
    Ok((seg, gso))
}

#[inline(always)]
fn parse_ipv6(pkt: &impl Headers, off: usize) -> Result<Parsed, Counter> {
    let ip: Ipv6Hdr = pkt.read(off, Counter::Ipv6Short)?;
    if ip.ver_class_flow[0] >> 4 != 6 {
        return Err(Counter::Ipv6Short);
    }
    let available = pkt.len() - off - IPV6_HLEN;
    let plen = u16::from_be_bytes(ip.payload_len) as usize;
    let (plen, gso) = if plen == 0 {
        (available, true)
    } else if plen > available {
        return Err(Counter::Ipv6BadLength);
    } else {
        (plen, false)
    };
    let end = off + IPV6_HLEN + plen;
    let mut next = ip.next;
    let mut l4 = off + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT {
        if !matches!(next, 0 | 43 | 60 | 51) {
            break;
        }
        let ext: Ipv6Ext = pkt.read(l4, Counter::Ipv6ExtShort)?;
        l4 += if next == 51 {
            // Authentication header: (len + 2) * 4 bytes.
            (ext.len as usize + 2) * 4
        } else {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            (ext.len as usize + 1) * 8
        };
        next = ext.next;
        if l4 > end {
            return Err(Counter::Ipv6ExtShort);
        }
    }
    match next {
        IPPROTO_TCP => {}
        0 | 43 | 60 | 51 => return Err(Counter::Ipv6ExtTooDeep),
        44 => return Err(Counter::Fragment),
        _ => return Err(Counter::NotTcp),
    }
    let seg = parse_tcp(pkt, l4, end - l4, FAMILY_V6, ip.saddr, ip.daddr)?;
    Ok((seg, gso))
}

#[inline(always)]
fn parse_tcp(
    pkt: &impl Headers,
    off: usize,
    l4_len: usize,
    family: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
) -> Result<Segment, Counter> {
    let tcp: TcpHdr = pkt.read(off, Counter::TcpShort)?;
    if l4_len < size_of::<TcpHdr>() {
        return Err(Counter::TcpShort);
    }
    let doff = (tcp.doff >> 4) as usize * 4;
    if doff < size_of::<TcpHdr>() || doff > l4_len {
        return Err(Counter::TcpBadOffset);
    }
    Ok(Segment {
        family,
        saddr,
        daddr,
        sport: u16::from_be_bytes(tcp.sport),
        dport: u16::from_be_bytes(tcp.dport),
        seq: u32::from_be_bytes(tcp.seq),
        flags: tcp.flags,
        payload_off: (off + doff) as u32,
        payload_len: (l4_len - doff) as u32,
    })
}

#[inline(always)]
fn header(seg: &Segment, ifindex: u32) -> RecordHeader {
    RecordHeader {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        saddr: seg.saddr,
        daddr: seg.daddr,
        seq: seg.seq,
        payload_len: seg.payload_len,
        offset: 0,
        cap_len: 0,
        ifindex,
        sport: seg.sport,
        dport: seg.dport,
        family: seg.family,
        tcp_flags: seg.flags,
        data_skip: 0,
        kind: KIND_CLIENT,
        awaiting: 0,
        _pad: [0; 2],
    }
}

/// A payload-less SYN, FIN or RST: a header-only record, so that user space opens or frees the
/// flow at once instead of waiting for the process-list GC or idle expiry.
#[inline(always)]
fn emit_control(
    ctx: &TcContext,
    counters: &mut Counters,
    seg: &Segment,
    ifindex: u32,
) -> Result<(), Counter> {
    let mut hdr = header(seg, ifindex);
    // SAFETY: a load-time constant.
    if unsafe { ptr::read_volatile(&TRANSPORT) } == Transport::PerfSkb as u8 {
        // SAFETY: the map is a perf event array; the header is on the stack, HDR bytes long;
        // no skb bytes are appended.
        let ret = unsafe {
            bpf_perf_event_output(
                ctx.skb.skb as *mut c_void,
                &PERF_RECORDS as *const PerfEventByteArray as *mut c_void,
                BPF_F_CURRENT_CPU,
                &mut hdr as *mut RecordHeader as *mut c_void,
                HDR as u64,
            )
        };
        if ret < 0 {
            return Err(Counter::RingFull);
        }
    } else {
        let Some(mut entry) = RECORDS.reserve::<RecordHeader>(0) else {
            return Err(Counter::RingFull);
        };
        entry.write(hdr);
        entry.submit(wake_flags(HDR as u64));
    }
    bump(counters, Counter::Records);
    Ok(())
}

/// Hands the payload over as one record, or several for payloads above the largest class.
#[inline(always)]
fn emit(
    ctx: &TcContext,
    counters: &mut Counters,
    seg: &Segment,
    ifindex: u32,
) -> Result<(), Counter> {
    // SAFETY: a load-time constant.
    let snap = unsafe { ptr::read_volatile(&SNAP_LEN) };
    let mut want = seg.payload_len;
    if snap != 0 && want > snap {
        want = snap;
    }
    if want > MAX_SEGMENT_CAPTURE {
        want = MAX_SEGMENT_CAPTURE;
    }
    if want < seg.payload_len {
        bump(counters, Counter::Truncated);
    }
    let mut hdr = header(seg, ifindex);
    // SAFETY: a load-time constant.
    let transport = unsafe { ptr::read_volatile(&TRANSPORT) };
    if transport == Transport::PerfSkb as u8 {
        return emit_perf(ctx, counters, seg, &mut hdr, want);
    }
    let fixed = transport == Transport::RingFixed as u8;
    let wake = wake_flags((want as usize + HDR) as u64);
    let mut done = 0u32;
    for _ in 0..MAX_RECORDS_PER_SEGMENT {
        if done >= want {
            break;
        }
        let n = want - done;
        hdr.offset = done;
        hdr.seq = seg.seq.wrapping_add(done);
        let from = seg.payload_off + done;
        // Only the segment's last record may wake the reader.
        let flags = if n <= CAP_LARGE {
            wake
        } else {
            BPF_RB_NO_WAKEUP
        };
        let sent = if fixed {
            emit_one::<{ HDR + CAP_LARGE as usize }, CAP_LARGE>(ctx, &mut hdr, from, n, flags)
        } else if n <= CAP_SMALL {
            emit_one::<{ HDR + CAP_SMALL as usize }, CAP_SMALL>(ctx, &mut hdr, from, n, flags)
        } else if n <= CAP_MEDIUM {
            emit_one::<{ HDR + CAP_MEDIUM as usize }, CAP_MEDIUM>(ctx, &mut hdr, from, n, flags)
        } else {
            emit_one::<{ HDR + CAP_LARGE as usize }, CAP_LARGE>(ctx, &mut hdr, from, n, flags)
        }?;
        bump(counters, Counter::Records);
        counters.0[Counter::Bytes as usize] += sent as u64;
        done += sent;
    }
    Ok(())
}

/// One record of `SIZE` bytes (header + `CAP`) carrying up to `CAP` of the `n` bytes at `from`.
#[inline(always)]
fn emit_one<const SIZE: usize, const CAP: u32>(
    ctx: &TcContext,
    hdr: &mut RecordHeader,
    from: u32,
    n: u32,
    submit_flags: u64,
) -> Result<u32, Counter> {
    let n = if n > CAP { CAP } else { n };
    // The verifier must see the length in 1..=CAP at the helper call. A volatile read hides
    // the range from LLVM, so that the mask (a no-op for 1..=CAP, CAP a power of two) is kept
    // rather than folded away together with the check it would replace.
    // SAFETY: reads a local.
    let n = unsafe { ptr::read_volatile(&n) };
    let n = (n.wrapping_sub(1) & (CAP - 1)) + 1;
    let Some(mut entry) = RECORDS.reserve::<[u8; SIZE]>(0) else {
        return Err(Counter::RingFull);
    };
    hdr.cap_len = n;
    let base = entry.as_mut_ptr() as *mut u8;
    // SAFETY: ring buffer entries are 8-aligned and SIZE bytes; the header takes the first HDR.
    unsafe { ptr::write(base as *mut RecordHeader, *hdr) };
    // SAFETY: `n` <= CAP bytes fit after the header; the helper bounds-checks the skb side.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            from,
            base.add(HDR) as *mut c_void,
            n,
        )
    };
    if ret < 0 {
        entry.discard(0);
        return Err(Counter::LoadFailed);
    }
    entry.submit(submit_flags);
    Ok(n)
}

/// Submit flags for a segment's last record (`size` bytes of records): wake the reader when
/// the unread bytes cross `WAKE_AT_BYTES`; the reader drains on its own timer otherwise. Past
/// the crossing (and a sixteenth more, for producers on other CPUs that read the positions
/// at the same time) no record wakes it again: one wake-up per fill, not one per record while
/// a lagging reader catches up. Reads only the ring's two positions, which the reservation has
/// just touched: no shared word is written for it.
#[inline(always)]
pub(crate) fn wake_flags(size: u64) -> u64 {
    // SAFETY: a load-time constant.
    let wake_at = unsafe { ptr::read_volatile(&WAKE_AT_BYTES) };
    if wake_at == 0 {
        return 0;
    }
    let unread = RECORDS.query(BPF_RB_AVAIL_DATA);
    if unread + size > wake_at && unread <= wake_at + (wake_at >> 4) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// One perf sample: the header, then the skb from its first byte through the captured payload,
/// appended by the helper itself (no copy through the program). The perf record size is a u16,
/// so a segment whose headers and payload exceed `PERF_MAX_SAMPLE` is cut (and counted).
#[inline(always)]
fn emit_perf(
    ctx: &TcContext,
    counters: &mut Counters,
    seg: &Segment,
    hdr: &mut RecordHeader,
    want: u32,
) -> Result<(), Counter> {
    let room = PERF_MAX_SAMPLE.saturating_sub(seg.payload_off);
    let n = if want > room {
        if want == seg.payload_len {
            bump(counters, Counter::Truncated);
        }
        room
    } else {
        want
    };
    hdr.cap_len = n;
    hdr.data_skip = seg.payload_off as u16;
    let skb_len = (seg.payload_off + n) as u64;
    // SAFETY: the map is a perf event array; the header is on the stack, HDR bytes long.
    let ret = unsafe {
        bpf_perf_event_output(
            ctx.skb.skb as *mut c_void,
            &PERF_RECORDS as *const PerfEventByteArray as *mut c_void,
            (skb_len << 32) | BPF_F_CURRENT_CPU,
            hdr as *mut RecordHeader as *mut c_void,
            HDR as u64,
        )
    };
    if ret < 0 {
        return Err(Counter::RingFull);
    }
    bump(counters, Counter::Records);
    counters.0[Counter::Bytes as usize] += n as u64;
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
