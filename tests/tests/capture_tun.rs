//! The raw-IP path: a tun device (no L2 header). Packets written to the tun file descriptor
//! arrive on the device's ingress, where the program must parse them from the IP header on.

mod common;

use std::{
    fs::{File, OpenOptions},
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    time::Duration,
};

use collector_common::Counter;
use common::*;

const PORT: u16 = 13307;

/// A tun device; closing the descriptor (on drop) removes it.
struct Tun {
    name: String,
    file: File,
}

nix::ioctl_write_ptr_bad!(tunsetiff, 0x400454ca, libc::ifreq);

impl Tun {
    fn new() -> Self {
        Self::with_flags(0)
    }

    /// With `IFF_VNET_HDR`, each write starts with a `virtio_net_hdr` whose `hdr_len` is how
    /// much of a packet over a page the skb holds in its linear part: the rest goes into page
    /// fragments, as some drivers deliver it.
    fn with_vnet_header() -> Self {
        Self::with_flags(libc::IFF_VNET_HDR)
    }

    fn with_flags(flags: libc::c_int) -> Self {
        let name = unique("mtun");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | flags) as i16;
        unsafe { tunsetiff(file.as_raw_fd(), &req) }.expect("TUNSETIFF");
        sh(&["ip", "addr", "add", "198.18.9.1/24", "dev", &name]);
        sh(&["ip", "link", "set", &name, "up"]);
        Self { name, file }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_tcp(src: [u8; 4], sport: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&[198, 18, 9, 1]);
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&PORT.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x18;
    p.extend_from_slice(payload);
    p
}

fn ipv6_tcp(sport: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[6] = 6;
    p[7] = 64;
    p[8..24].copy_from_slice(&"2001:2::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p[24..40].copy_from_slice(&"2001:2::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p[40..42].copy_from_slice(&sport.to_be_bytes());
    p[42..44].copy_from_slice(&PORT.to_be_bytes());
    p[44..48].copy_from_slice(&seq.to_be_bytes());
    p[52] = 5 << 4;
    p[53] = 0x18;
    p.extend_from_slice(payload);
    p
}

#[tokio::test]
async fn raw_ip_device_is_parsed_from_the_ip_header() {
    let mut tun = Tun::new();
    let mut cap = TestCapture::start(&tun.name, &[PORT]);
    let a = pattern(1200, 3);
    let b = pattern(700, 4);
    let c = pattern(333, 5);
    tun.file
        .write_all(&ipv4_tcp([198, 18, 9, 2], 41000, 7, &a))
        .unwrap();
    tun.file
        .write_all(&ipv4_tcp([198, 18, 9, 2], 41000, 7 + 1200, &b))
        .unwrap();
    tun.file.write_all(&ipv6_tcp(41001, 99, &c)).unwrap();
    // A pure ACK: dropped in the kernel.
    tun.file
        .write_all(&ipv4_tcp([198, 18, 9, 2], 41000, 1907, b""))
        .unwrap();
    cap.collect_until(Duration::from_secs(5), "three records", |recs, c| {
        recs.len() >= 3 && c.get(Counter::NoPayload) >= 1
    })
    .await;
    let got = streams(&cap.records, PORT);
    let mut ab = a.clone();
    ab.extend_from_slice(&b);
    assert_eq!(got[&(IpAddr::from([198, 18, 9, 2]), 41000)], ab);
    assert_eq!(got[&("2001:2::9".parse().unwrap(), 41001)], c);
    let (records, counters, _) = cap.stop().await;
    assert_eq!(records.len(), 3);
    assert_eq!(counters.get(Counter::TcpToPort), 4);
    assert_eq!(counters.get(Counter::EthShort), 0);
    drop(tun);
}

/// `virtio_net_hdr` (10 bytes, no offload; the host's byte order, as tun reads it unless told
/// otherwise): only `hdr_len`, the linear part's size.
fn vnet_header(linear: u16) -> Vec<u8> {
    let mut h = vec![0u8; 10];
    h[2..4].copy_from_slice(&linear.to_ne_bytes());
    h
}

/// Headers past the skb's linear part (packets over a page whose linear part holds 1 byte, the
/// IPv4 header only, or the IPv6 header only): read through `bpf_skb_load_bytes`, so every
/// segment is captured whole and none is counted as `header_nonlinear`.
#[tokio::test]
async fn headers_in_page_fragments_are_read_through_the_helper() {
    let mut tun = Tun::with_vnet_header();
    let mut cap = TestCapture::start(&tun.name, &[PORT]);
    let (a, b, c) = (pattern(8000, 6), pattern(9000, 7), pattern(8500, 8));
    let writes = [
        (1, ipv4_tcp([198, 18, 9, 2], 41002, 7, &a)),
        (20, ipv4_tcp([198, 18, 9, 2], 41002, 7 + 8000, &b)),
        (40, ipv6_tcp(41003, 99, &c)),
    ];
    for (linear, packet) in &writes {
        let mut w = vnet_header(*linear);
        w.extend_from_slice(packet);
        tun.file.write_all(&w).unwrap();
    }
    cap.collect_until(Duration::from_secs(5), "the three segments", |_, c| {
        c.get(Counter::TcpToPort) >= 3
    })
    .await;
    let (records, counters, _) = cap.stop().await;
    let got = streams(&records, PORT);
    assert_eq!(counters.get(Counter::HeaderNonlinear), 0);
    assert_eq!(counters.get(Counter::TcpToPort), 3);
    let mut ab = a.clone();
    ab.extend_from_slice(&b);
    assert!(
        got[&(IpAddr::from([198, 18, 9, 2]), 41002)] == ab,
        "the IPv4 stream differs"
    );
    assert!(
        got[&("2001:2::9".parse().unwrap(), 41003)] == c,
        "the IPv6 stream differs"
    );
    drop(tun);
}

/// A retransmission whose bytes differ from the first copy (the case of a corrupt segment TCP
/// dropped, or of bytes injected): the agent counts it (`retransmit_differs`), ends the session
/// there with a COM_QUIT, and resumes at the next command; an identical retransmission is only
/// `retransmitted`.
#[test]
fn differing_retransmitted_bytes_end_the_session() {
    let mut tun = Tun::new();
    let exchange = broker::TestExchange::new("tun_differs");
    let port = PORT.to_string();
    let mut agent = agent::Agent::start(&[
        &format!("--interface={}", tun.name),
        "--port",
        &port,
        &format!("--rabbitmq_exchange_name={}", exchange.exchange),
        "--read_timeout=20",
    ]);
    agent.wait_attached();
    let query = |text: &str| {
        let mut p = ((text.len() + 1) as u32).to_le_bytes()[..3].to_vec();
        p.push(0);
        p.push(collector::protocol::command::QUERY);
        p.extend_from_slice(text.as_bytes());
        p
    };
    let (q1, q2, q3) = (query("SELECT 1"), query("SELECT 2"), query("SELECT 3"));
    let mut q1_changed = q1.clone();
    *q1_changed.last_mut().unwrap() = b'9';
    let client = [198, 18, 9, 2];
    let len = q1.len() as u32;
    for (seq, payload) in [
        (5000, &q1),
        (5000, &q1),
        (5000, &q1_changed),
        (5000 + len, &q2),
        (5000 + 2 * len, &q3),
    ] {
        tun.file
            .write_all(&ipv4_tcp(client, 41010, seq, payload))
            .unwrap();
    }
    let units = || {
        exchange
            .units_by_port()
            .remove(&41010)
            .unwrap_or_default()
            .into_iter()
            .map(|u| u.data)
            .collect::<Vec<_>>()
    };
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    while got.len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "published {got:?}; the agent's log:\n{}",
            agent.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
        got.extend(units());
    }
    let out = agent.stop();
    let t = agent::totals(&out);
    assert_eq!(
        got[..4],
        [q1, collector::encode::COM_QUIT.to_vec(), q2, q3],
        "{out}"
    );
    assert_eq!(t["retransmit_differs"], 1, "{out}");
    assert_eq!(t["retransmitted"], 2, "{out}");
    drop(tun);
}
