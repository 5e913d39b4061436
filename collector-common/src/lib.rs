//! Types shared by the kernel program (`collector-ebpf`) and the agent (`collector`).
//!
//! Everything here is `#[repr(C)]` and read by both sides byte for byte: changing a layout means
//! rebuilding both (`cargo xtask build-ebpf` then the agent).
#![no_std]

/// The most ports one agent captures (`--port` list length).
pub const MAX_PORTS: usize = 16;

/// Entries of the `PORTS` array map: indexed by destination port, non-zero = captured. An array
/// indexed by port is a single inlined lookup in the verifier-rewritten program, cheaper than a
/// hash of at most [`MAX_PORTS`] entries.
pub const PORT_MAP_ENTRIES: u32 = 65536;

/// Default ring buffer size (bytes, a power-of-two multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// Link-layer framing of the captured interface, set by the agent as a load-time constant.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// No L2 header: the packet starts at the IP header (tun, wireguard, raw IP).
    RawIp = 0,
    /// Ethernet header (also loopback, which carries a zeroed Ethernet header).
    Ethernet = 1,
}

/// How records reach user space (a load-time constant; the verifier prunes the others).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// BPF ring buffer, smallest record class that holds the payload (the default).
    RingClasses = 0,
    /// BPF ring buffer, every record of the largest class (for comparison).
    RingFixed = 1,
    /// Per-CPU perf buffers, the skb appended by `bpf_perf_event_output` itself.
    PerfSkb = 2,
}

/// Largest perf sample the program emits: the perf record size is a u16.
pub const PERF_MAX_SAMPLE: u32 = 65000;

/// Payload capacities of the record sizes in the ring buffer. `bpf_ringbuf_reserve` takes only
/// a constant size, so the program picks the smallest class that holds the payload (a record is
/// the header plus the capacity). Powers of two, so that the program can prove a length in
/// 1..=capacity to the verifier with a mask instead of a branch.
pub const RECORD_CAPACITIES: [u32; 3] = [256, 2048, 16384];

/// Records one segment may take: a segment larger than the biggest class is handed over as
/// several records, each with the sequence number of its first byte. Four cover 64 KiB, the
/// largest segment of loopback and GRO; anything beyond is cut and counted as truncated.
pub const MAX_RECORDS_PER_SEGMENT: u32 = 4;

/// Most payload bytes handed over per segment.
pub const MAX_SEGMENT_CAPTURE: u32 = RECORD_CAPACITIES[2] * MAX_RECORDS_PER_SEGMENT;

/// TCP flags (`RecordHeader::tcp_flags`).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// `family` values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Header of every ring buffer record; `cap_len` payload bytes follow it.
///
/// Addresses are in network byte order; an IPv4 address fills the first 4 bytes of the 16.
/// Ports and the other integers are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// `bpf_ktime_get_ns()` when the program saw the segment (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// TCP sequence number of the first payload byte in this record (segment seq + `offset`).
    pub seq: u32,
    /// Payload length of the whole TCP segment.
    pub payload_len: u32,
    /// Where this record's bytes start within the segment's payload.
    pub offset: u32,
    /// Payload bytes carried by this record.
    pub cap_len: u32,
    pub ifindex: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub tcp_flags: u8,
    /// Bytes to skip after the header before the payload: 0 for ring buffer records; the
    /// packet headers for perf records, where the helper appends the skb from its start.
    pub data_skip: u16,
    /// [`KIND_CLIENT`] or [`KIND_PREPARE_REPLY`].
    pub kind: u8,
    /// For a [`KIND_PREPARE_REPLY`]: how many COM_STMT_PREPAREs the connection had sent since
    /// the last reply the egress program took (at most 255). 1: this answers that one. More:
    /// the client sent several before reading (or a reply was missed), and which one this
    /// answers is not known.
    pub awaiting: u8,
    pub _pad: [u8; 2],
}

/// `RecordHeader::kind`: client payload arriving on a captured port (ingress).
pub const KIND_CLIENT: u8 = 0;
/// `RecordHeader::kind`: the first bytes of a server reply to a COM_STMT_PREPARE (egress);
/// addresses and ports are the server's (source) and the client's (destination).
pub const KIND_PREPARE_REPLY: u8 = 1;
/// `RecordHeader::kind`: plaintext a TLS session's client sent, as the server's `SSL_read`
/// returned it (uprobes); addresses and ports as for [`KIND_CLIENT`] (the client's the
/// source), from the socket the read went to. `seq` is the position of the record's first
/// byte in the connection's plaintext (bytes the server read before it since its first read
/// tied to this socket, wrapping), `offset` its place in the read, `payload_len` what the
/// read handed over; the flags are 0. Plaintext lost (ring full, a read truncated or
/// unreadable) shows as a jump in `seq`.
pub const KIND_TLS_PLAIN: u8 = 2;

/// Most plaintext bytes handed over per `SSL_read` (records of the largest class): a read
/// returns at most one TLS record's 16 KiB unless its buffer is larger.
pub const MAX_TLS_READ: u32 = RECORD_CAPACITIES[2] * MAX_RECORDS_PER_SEGMENT;

/// Threads inside an `SSL_read` at once (`SSL_CALLS`), and TLS connections whose socket is
/// remembered (`SSL_SOCKS`, an LRU map: a read served from OpenSSL's buffer makes no syscall).
pub const SSL_CALL_ENTRIES: u32 = 16384;
pub const SSL_SOCK_ENTRIES: u32 = 65536;

/// An `SSL_read` under way (`SSL_CALLS`, by thread): its arguments, and the socket the read
/// syscall inside it went to, once seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslCall {
    pub ssl: u64,
    pub buf: u64,
    /// `SSL_read_ex`'s `size_t *readbytes`; 0 for `SSL_read`.
    pub readbytes: u64,
    pub sock: SslSock,
}

/// The TCP connection of a TLS session, as the kernel's `struct sock` has it (IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslSock {
    /// Client address and server address, network order; 0: not known.
    pub client: [u8; 4],
    pub server: [u8; 4],
    /// Host order.
    pub client_port: u16,
    pub server_port: u16,
}

/// What `SSL_SOCKS` remembers of an SSL object: its connection, and how far its plaintext
/// has been read there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslStream {
    pub sock: SslSock,
    /// Plaintext bytes the server read on this connection (wrapping): the next read's
    /// `RecordHeader::seq`.
    pub read: u32,
}

/// A TLS connection's COM_STMT_PREPAREs whose reply the server has not written yet, as the
/// plaintext reads show them (`SSL_PREPARES`, by SSL object).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslPrepares {
    pub awaiting: u32,
    /// The last read was a packet header alone, sequence 0: the next one starts a command.
    pub header: u8,
    pub _pad: [u8; 3],
}

/// Reply bytes handed over per awaited reply: the packet header and COM_STMT_PREPARE_OK's 12
/// bytes (status, statement id, column count, parameter count, filler, warnings).
pub const REPLY_HEAD: u32 = 16;

/// The MySQL command byte of COM_STMT_PREPARE.
pub const COM_STMT_PREPARE: u8 = 0x16;

/// Key of the `AWAITING` map: a TCP connection, by the client's and the server's address
/// (network order, IPv4 in the first 4 bytes) and port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
}

/// Value of the `AWAITING` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Awaiting {
    /// COM_STMT_PREPAREs sent since the last reply the egress program took (which resets it).
    pub count: u32,
    /// TCP sequence number of the last segment that added to `count`: its retransmission
    /// does not add again.
    pub seq: u32,
}

/// Packets of a client segment the ingress program looks at for a COM_STMT_PREPARE (a client
/// may write a COM_STMT_CLOSE, which has no reply, and the next PREPARE at once).
pub const PREPARE_SCAN: usize = 4;

/// Connections awaiting a COM_STMT_PREPARE reply at once (an LRU map: the oldest go first).
pub const AWAITING_ENTRIES: u32 = 16384;

/// Entries of the `COUNTERS` per-CPU array: one block for each program, so that a packet both
/// programs see (loopback) is counted once in each.
pub const COUNTERS_INGRESS: u32 = 0;
pub const COUNTERS_EGRESS: u32 = 1;
/// The TLS uprobes' block (`tls_*` counters, and their records and bytes).
pub const COUNTERS_TLS: u32 = 2;

/// What a kernel counter counts: the family the metrics export it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterClass {
    /// Packets, by the reason they were counted.
    Packets,
    /// Records handed over.
    Records,
    /// Payload bytes handed over.
    Bytes,
    /// Malformed or unparseable packets (also packets, by reason; summed as ParseError).
    ParseError,
}

/// Defines [`Counter`] once: each counter's doc, its index (the order), its stable name (status
/// output and metrics), its class, and the name the egress program's totals give it (`None`:
/// the egress program does not count it, or only in a sum).
macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $name:literal, $class:ident, $egress:expr;)*) => {
        /// Why a packet was counted. One per-CPU `u64` per reason, in the `COUNTERS` map (one
        /// entry per program, a `[u64; COUNTER_COUNT]`), indexed by this value.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $variant,)*
        }

        pub const COUNTER_COUNT: usize = [$(Counter::$variant),*].len();

        impl Counter {
            pub const ALL: [Counter; COUNTER_COUNT] = [$(Counter::$variant),*];

            /// Stable snake_case name, used in status output and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }

            pub const fn class(self) -> CounterClass {
                match self {
                    $(Counter::$variant => CounterClass::$class,)*
                }
            }

            /// The name in the egress program's totals, if it counts this one on its own.
            pub const fn egress_name(self) -> Option<&'static str> {
                match self {
                    $(Counter::$variant => $egress,)*
                }
            }
        }
    };
}

counters! {
    /// Every packet the program ran on.
    Packets = "packets", Packets, Some("reply_packets");
    /// L3 neither IPv4 nor IPv6 (ARP, LLDP, ...).
    NotIp = "not_ip", Packets, Some("reply_not_ip");
    /// IP, but not TCP.
    NotTcp = "not_tcp", Packets, Some("reply_not_tcp");
    /// TCP to a port that is not captured.
    OtherPort = "other_port", Packets, Some("reply_other_port");
    /// TCP to a captured port, but received for another host's MAC (promiscuous mode, a mirror
    /// port, a bridge port or macvlan parent): left out unless `--other_hosts`.
    OtherHost = "other_host", Packets, None;
    /// TCP segments to a captured port (TotalPacket); egress: from it.
    TcpToPort = "tcp_to_port", Packets, Some("reply_from_port");
    /// Of those, segments with payload (ValidPacket).
    WithPayload = "with_payload", Packets, None;
    /// Payload-less segments without SYN, FIN or RST (pure ACKs, window updates), dropped in
    /// the kernel.
    NoPayload = "no_payload", Packets, Some("reply_no_payload");
    /// Payload-less SYN, FIN and RST segments, handed over as header-only records (`cap_len`
    /// 0) so that user space starts and ends flows at once.
    Control = "control", Packets, None;
    /// Records submitted to the ring buffer.
    Records = "records", Records, Some("reply_records");
    /// Payload bytes submitted to the ring buffer.
    Bytes = "bytes", Bytes, Some("reply_bytes");
    /// Segments not (or not wholly) handed over because the ring buffer was full.
    RingFull = "ring_full", Packets, Some("reply_ring_full");
    /// Segments cut by the snapshot length.
    Truncated = "truncated", Packets, None;
    /// IP fragments: not TCP segments, skipped.
    Fragment = "fragment", Packets, Some("reply_fragment");
    /// `bpf_skb_load_bytes` failed on a payload that the headers said was there.
    LoadFailed = "load_failed", Packets, Some("reply_load_failed");
    /// IP length 0 (GSO / BIG TCP): payload length taken from the skb length instead.
    GsoLength = "gso_length", Packets, None;
    /// Ingress: COM_STMT_PREPAREs (a segment starting with one) that marked their connection
    /// as awaiting the reply; marks the `AWAITING` map could not take.
    PrepareMarked = "prepare_marked", Packets, None;
    AwaitFull = "await_full", Packets, None;
    /// Egress: server segments of a connection awaiting a COM_STMT_PREPARE reply; those that
    /// did not start a reply packet (a retransmission, the rest of an earlier reply), left
    /// to the next.
    Awaited = "awaited", Packets, Some("reply_awaited");
    NotReply = "not_reply", Packets, Some("reply_not_reply");
    /// Egress: packets passed at once, not even parsed, while no connection awaited a reply
    /// (most of the time once clients have prepared their statements).
    Unawaited = "unawaited", Packets, Some("reply_unawaited");
    /// TLS uprobes: `SSL_read`s that returned plaintext, handed over; those whose socket was
    /// not known (no read syscall seen for that SSL object: its plaintext is not handed over);
    /// those of an IPv6 client (which the MRTE format cannot carry); reads cut at
    /// `MAX_TLS_READ`; plaintext the user buffer could not be read from.
    TlsReads = "tls_reads", Packets, None;
    TlsNoSocket = "tls_no_socket", Packets, None;
    TlsIpv6 = "tls_ipv6", Packets, None;
    TlsTruncated = "tls_truncated", Packets, None;
    TlsReadFailed = "tls_read_failed", Packets, None;
    /// TLS: COM_STMT_PREPAREs seen in the plaintext, and the heads of their replies handed
    /// over from the server's `SSL_write`.
    TlsPrepares = "tls_prepares", Packets, None;
    TlsReplies = "tls_replies", Packets, None;
    /// Parse failures, one per kind.
    EthShort = "eth_short", ParseError, None;
    VlanShort = "vlan_short", ParseError, None;
    VlanTooDeep = "vlan_too_deep", ParseError, None;
    Ipv4Short = "ipv4_short", ParseError, None;
    Ipv4BadIhl = "ipv4_bad_ihl", ParseError, None;
    Ipv4BadLength = "ipv4_bad_length", ParseError, None;
    Ipv6Short = "ipv6_short", ParseError, None;
    Ipv6BadLength = "ipv6_bad_length", ParseError, None;
    Ipv6ExtShort = "ipv6_ext_short", ParseError, None;
    Ipv6ExtTooDeep = "ipv6_ext_too_deep", ParseError, None;
    TcpShort = "tcp_short", ParseError, None;
    TcpBadOffset = "tcp_bad_offset", ParseError, None;
    /// Headers not in the skb's linear data (the program reads headers directly).
    HeaderNonlinear = "header_nonlinear", ParseError, None;
}

/// The per-CPU counter block (one map entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters(pub [u64; COUNTER_COUNT]);

impl Default for Counters {
    fn default() -> Self {
        Self([0; COUNTER_COUNT])
    }
}

impl Counter {
    /// True for the counters that mean "a malformed or unparseable packet".
    pub const fn is_parse_error(self) -> bool {
        matches!(self.class(), CounterClass::ParseError)
    }
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays, no padding the kernel leaves
    // uninitialised in what we read (the explicit `_pad` is part of the layout).
    unsafe impl aya::Pod for super::RecordHeader {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Awaiting {}
}

const _: () = assert!(core::mem::size_of::<RecordHeader>() == 72);
const _: () = assert!(core::mem::size_of::<RecordHeader>().is_multiple_of(8));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_in_order_and_named_once() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert!(
                c.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
        }
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert!(a.egress_name().is_none() || a.egress_name() != b.egress_name());
            }
        }
    }
}
