//! Capture files as a record source: tcpdump and Wireshark captures (pcap and pcapng, read by
//! `pcap-file`), each packet's link, IP and TCP headers read by `etherparse` (Ethernet with
//! VLAN tags, Linux cooked SLL and SLL2, raw IP, BSD loopback). Packets become the records the
//! kernel programs hand over live: client payload to a captured port (and payload-less SYN,
//! FIN and RST), and the first bytes of a server reply to a COM_STMT_PREPARE, counted as the
//! ingress program counts them. The same flow and session stages follow them.

use std::{
    fs::File,
    io::{BufReader, Read as _, Seek as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use collector_common::{COM_STMT_PREPARE, PREPARE_SCAN, REPLY_HEAD, TCP_FIN, TCP_RST, TCP_SYN};
use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use foldhash::HashMap;
use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
};
use tokio::time::Instant;

use super::{Record, RecordKind, RecordSink};
use crate::types::FlowKey;

/// Why a capture file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("opening capture file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading capture file {path} (pcap or pcapng): {source}")]
    Format {
        path: PathBuf,
        source: pcap_file::PcapError,
    },
    #[error(
        "capture file {path} has link type {link:?}: only Ethernet, Linux cooked (SLL, SLL2), \
         raw IP and BSD loopback are read"
    )]
    LinkType { path: PathBuf, link: DataLink },
}

/// What the reader saw and what it left out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PcapStats {
    pub packets: u64,
    /// Records handed over: client segments, and reply heads.
    pub records: u64,
    /// Packets that are not TCP over IPv4/IPv6, or whose headers are cut.
    pub not_tcp: u64,
    /// TCP segments to or from other ports, and payload-less ACKs.
    pub skipped: u64,
    /// Segments whose payload the capture cut (snap length, `truncated` live).
    pub truncated: u64,
}

/// Client PREPAREs not yet answered, per connection, as the ingress program counts them.
#[derive(Default)]
struct Awaiting {
    count: u32,
    /// Sequence number of the last segment that counted: its retransmission does not.
    seq: Option<u32>,
}

/// Reads the capture at `path`; hands every record for `ports` to `sink`, in file order.
pub fn read(
    path: &Path,
    ports: &[u16],
    sink: &mut impl RecordSink,
) -> Result<PcapStats, PcapError> {
    let open = |source| PcapError::Open {
        path: path.to_owned(),
        source,
    };
    let format = |source| PcapError::Format {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(open)?;
    file.rewind().map_err(open)?;
    let mut reader = Reader {
        ports,
        stats: PcapStats::default(),
        awaiting: HashMap::default(),
        path,
    };
    sink.begin();
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut ng = PcapNgReader::new(BufReader::new(file)).map_err(format)?;
        let mut links = Vec::new();
        while let Some(block) = ng.next_block() {
            match block.map_err(format)? {
                Block::SectionHeader(_) => links.clear(),
                Block::InterfaceDescription(i) => links.push(i.linktype),
                Block::EnhancedPacket(p) => {
                    let link = links.get(p.interface_id as usize).copied();
                    let link = link.unwrap_or(DataLink::ETHERNET);
                    reader.packet(link, p.timestamp, p.original_len, &p.data, sink)?;
                }
                Block::SimplePacket(p) => {
                    let link = links.first().copied().unwrap_or(DataLink::ETHERNET);
                    reader.packet(link, Duration::ZERO, p.original_len, &p.data, sink)?;
                }
                _ => {}
            }
        }
    } else {
        let mut pcap = PcapReader::new(BufReader::new(file)).map_err(format)?;
        let link = pcap.header().datalink;
        while let Some(p) = pcap.next_packet() {
            let p = p.map_err(format)?;
            reader.packet(link, p.timestamp, p.orig_len, &p.data, sink)?;
        }
    }
    Ok(reader.stats)
}

struct Reader<'a> {
    ports: &'a [u16],
    stats: PcapStats,
    awaiting: HashMap<FlowKey, Awaiting>,
    path: &'a Path,
}

impl Reader<'_> {
    fn packet(
        &mut self,
        link: DataLink,
        ts: Duration,
        orig_len: u32,
        data: &[u8],
        sink: &mut impl RecordSink,
    ) -> Result<(), PcapError> {
        self.stats.packets += 1;
        let sliced = match link {
            DataLink::ETHERNET => LaxSlicedPacket::from_ethernet(data).ok(),
            DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => LaxSlicedPacket::from_ip(data).ok(),
            // The address family, in the writer's byte order: the IP version tells the same.
            DataLink::NULL | DataLink::LOOP => {
                data.get(4..).and_then(|d| LaxSlicedPacket::from_ip(d).ok())
            }
            // Linux cooked capture: the protocol at bytes 14-15 (SLL) or 0-1 (SLL2).
            DataLink::LINUX_SLL => data
                .get(16..)
                .map(|d| LaxSlicedPacket::from_ether_type(EtherType(be16(&data[14..])), d)),
            DataLink::LINUX_SLL2 => data
                .get(20..)
                .map(|d| LaxSlicedPacket::from_ether_type(EtherType(be16(data)), d)),
            link => {
                return Err(PcapError::LinkType {
                    path: self.path.to_owned(),
                    link,
                });
            }
        };
        let Some(seg) = sliced.as_ref().and_then(tcp_segment) else {
            self.stats.not_tcp += 1;
            return Ok(());
        };
        if (data.len() as u64) < u64::from(orig_len) || seg.payload.len() < seg.full_len {
            self.stats.truncated += 1;
        }
        let ts_ns = ts.as_nanos() as u64;
        if self.ports.contains(&seg.dport) {
            self.client(&seg, ts_ns, sink);
        } else if self.ports.contains(&seg.sport) && !seg.payload.is_empty() {
            self.server(&seg, ts_ns, sink);
        } else {
            self.stats.skipped += 1;
        }
        Ok(())
    }

    fn client(&mut self, seg: &Tcp<'_>, ts_ns: u64, sink: &mut impl RecordSink) {
        if seg.payload.is_empty() && seg.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
            self.stats.skipped += 1;
            return;
        }
        let prepares = prepares(seg.payload);
        if prepares > 0 {
            let key = FlowKey {
                client: (seg.src, seg.sport),
                server: (seg.dst, seg.dport),
            };
            let a = self.awaiting.entry(key).or_default();
            if a.seq != Some(seg.seq) {
                a.count += prepares;
                a.seq = Some(seg.seq);
            }
        }
        self.stats.records += 1;
        sink.push(seg.record(RecordKind::Client, ts_ns, seg.payload));
    }

    /// A server segment while the connection awaits PREPARE replies: its first bytes.
    fn server(&mut self, seg: &Tcp<'_>, ts_ns: u64, sink: &mut impl RecordSink) {
        let key = FlowKey {
            client: (seg.dst, seg.dport),
            server: (seg.src, seg.sport),
        };
        let Some(a) = self.awaiting.remove(&key).filter(|a| a.count > 0) else {
            self.stats.skipped += 1;
            return;
        };
        let head = &seg.payload[..seg.payload.len().min(REPLY_HEAD as usize)];
        self.stats.records += 1;
        let awaiting = a.count.min(255) as u8;
        sink.push(seg.record(RecordKind::PrepareReply { awaiting }, ts_ns, head));
    }
}

impl Tcp<'_> {
    /// The record the kernel program would have handed over for this segment.
    fn record(&self, kind: RecordKind, ts_ns: u64, data: &[u8]) -> Record {
        Record {
            kind,
            ts_ns,
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            seq: self.seq,
            tcp_flags: self.flags,
            segment_len: self.full_len as u32,
            offset: 0,
            ifindex: 0,
            data: Bytes::copy_from_slice(data),
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// COM_STMT_PREPAREs among the first packets of a client segment, as the ingress program
/// counts them: packets that start in the segment, sequence number 0, command 0x16.
fn prepares(payload: &[u8]) -> u32 {
    let (mut at, mut n) = (0usize, 0);
    for _ in 0..PREPARE_SCAN {
        let Some(h) = payload.get(at..at + 5) else {
            break;
        };
        if h[3] == 0 && h[4] == COM_STMT_PREPARE {
            n += 1;
        }
        at += 4 + u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
    }
    n
}

/// A TCP segment's fields, from whatever link the packet came on.
struct Tcp<'a> {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
    /// What the capture holds of the payload.
    payload: &'a [u8],
    /// The payload's length as the IP header gives it.
    full_len: usize,
}

fn tcp_segment<'a>(p: &LaxSlicedPacket<'a>) -> Option<Tcp<'a>> {
    let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
        return None;
    };
    let (src, dst, ip_payload) = match p.net.as_ref()? {
        LaxNetSlice::Ipv4(v4) => {
            let h = v4.header();
            // What the header says follows it (the capture may hold less).
            let claimed = usize::from(h.total_len()).saturating_sub(h.slice().len());
            (
                IpAddr::V4(Ipv4Addr::from(h.source())),
                IpAddr::V4(Ipv4Addr::from(h.destination())),
                (v4.payload().payload, claimed),
            )
        }
        LaxNetSlice::Ipv6(v6) => {
            let h = v6.header();
            // Extension headers count in the payload length; they sit before the TCP header.
            let exts = v6.payload().payload.as_ptr() as usize
                - (h.slice().as_ptr() as usize + h.slice().len());
            let claimed = usize::from(h.payload_length()).saturating_sub(exts);
            (
                IpAddr::V6(Ipv6Addr::from(h.source())),
                IpAddr::V6(Ipv6Addr::from(h.destination())),
                (v6.payload().payload, claimed),
            )
        }
        LaxNetSlice::Arp(_) => return None,
    };
    let (_, claimed) = ip_payload;
    let header = tcp.header_len();
    let flags = [
        (tcp.fin(), TCP_FIN),
        (tcp.syn(), TCP_SYN),
        (tcp.rst(), TCP_RST),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .fold(0, |f, (_, bit)| f | bit);
    let payload = tcp.payload();
    Some(Tcp {
        src,
        dst,
        sport: tcp.source_port(),
        dport: tcp.destination_port(),
        seq: tcp.sequence_number(),
        flags,
        payload,
        full_len: claimed.saturating_sub(header).max(payload.len()),
    })
}

/// A capture's time as the flow stage's clock: the first record at the moment reading began,
/// every later one as far after it as the capture says (so gaps time out as they would have).
#[derive(Debug)]
pub struct Clock {
    base: Instant,
    first: Option<u64>,
    now: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        let base = Instant::now();
        Self {
            base,
            first: None,
            now: base,
        }
    }
}

impl Clock {
    /// A record captured at `ts_ns`: the clock moves there (never back).
    pub fn at(&mut self, ts_ns: u64) {
        let first = *self.first.get_or_insert(ts_ns);
        let t = self.base + Duration::from_nanos(ts_ns.saturating_sub(first));
        self.now = self.now.max(t);
    }

    pub fn now(&self) -> Instant {
        self.now
    }
}
