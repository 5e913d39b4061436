//! Hand-made frames: valid, unusual and malformed, each with the counter it must move.
#![allow(dead_code)]

use collector_common::Counter;

pub const PORT: u16 = 13306;

pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const DST_MAC: [u8; 6] = [0xff; 6];
pub const SRC4: [u8; 4] = [198, 18, 7, 2];
pub const DST4: [u8; 4] = [198, 18, 7, 1];

pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

pub fn tcp(dport: u16, doff_words: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&40000u16.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.push(doff_words << 4);
    t.push(flags);
    t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    // Options to fill a data offset above 5 words.
    t.resize(t.len().max(doff_words as usize * 4), 1);
    t.extend_from_slice(payload);
    t
}

/// IPv4 header (`ihl_words` words, options zero-filled) + body; `tot_len` overrides the length.
pub fn ipv4(ihl_words: u8, proto: u8, frag: u16, tot_len: Option<u16>, body: &[u8]) -> Vec<u8> {
    let hlen = (ihl_words.max(5) as usize) * 4;
    let mut h = vec![0u8; hlen];
    h[0] = 0x40 | ihl_words;
    let len = tot_len.unwrap_or((hlen + body.len()) as u16);
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&SRC4);
    h[16..20].copy_from_slice(&DST4);
    h.extend_from_slice(body);
    h
}

/// IPv6 header + extension headers (each `(type, 8-byte units)`) + TCP.
pub fn ipv6(exts: &[(u8, u8)], last: u8, body: &[u8], plen: Option<u16>) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, &(_, units)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map(|e| e.0).unwrap_or(last);
        let mut e = vec![0u8; (units as usize + 1) * 8];
        e[0] = next;
        e[1] = units;
        chain.extend_from_slice(&e);
    }
    chain.extend_from_slice(body);
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&plen.unwrap_or(chain.len() as u16).to_be_bytes());
    h[6] = exts.first().map(|e| e.0).unwrap_or(last);
    h[7] = 64;
    h[8..24].copy_from_slice(&"2001:2::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    h[24..40].copy_from_slice(&"2001:2::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    h.extend_from_slice(&chain);
    h
}

pub fn frame(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = eth(ethertype);
    f.extend_from_slice(l3);
    f
}

pub fn vlan(tags: &[u16], inner: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = eth(tags[0]);
    for (i, _) in tags.iter().enumerate() {
        let next = tags.get(i + 1).copied().unwrap_or(inner);
        f.extend_from_slice(&(100 + i as u16).to_be_bytes());
        f.extend_from_slice(&next.to_be_bytes());
    }
    f.extend_from_slice(l3);
    f
}

pub struct Case {
    pub name: &'static str,
    pub frame: Vec<u8>,
    pub counter: Counter,
    /// Payload the one record must carry, if the frame is a valid segment.
    pub record: Option<Vec<u8>>,
}

pub fn cases() -> Vec<Case> {
    let hello = b"\x05\x00\x00\x00\x03hello".to_vec();
    let good4 = ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x18, &hello));
    let good6 = ipv6(&[], 6, &tcp(PORT, 5, 0x18, &hello), None);
    let ok = |name, frame| Case {
        name,
        frame,
        counter: Counter::WithPayload,
        record: Some(hello.clone()),
    };
    // Payload-less SYN/FIN/RST: one header-only record each.
    let control = |name, frame| Case {
        name,
        frame,
        counter: Counter::Control,
        record: Some(Vec::new()),
    };
    let bad = |name, frame, counter| Case {
        name,
        frame,
        counter,
        record: None,
    };
    let mut padded = ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x18, &hello));
    padded.extend_from_slice(&[0xee; 12]); // trailing bytes past the IP length: not payload
    let tcp_short = ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x18, b"")[..12]);
    // A destination-options header whose 8 bytes run past a 4-byte IPv6 payload.
    let mut ext_cut = ipv6(&[], 60, &[6, 0, 0, 0], None);
    ext_cut[4..6].copy_from_slice(&4u16.to_be_bytes());
    // For another host's MAC (a mirror port, promiscuous mode): the kernel marks it
    // PACKET_OTHERHOST (on a veth, and in a test run on lo, whose address is all zeros).
    let mut other_host = frame(0x0800, &good4);
    other_host[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x09]);
    vec![
        bad("for another host", other_host, Counter::OtherHost),
        ok("valid IPv4", frame(0x0800, &good4)),
        ok(
            "IPv4 with options",
            frame(0x0800, &ipv4(8, 6, 0, None, &tcp(PORT, 5, 0x18, &hello))),
        ),
        ok(
            "TCP with options",
            frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 8, 0x18, &hello))),
        ),
        ok("IP length shorter than the frame", frame(0x0800, &padded)),
        ok("valid IPv6", frame(0x86dd, &good6)),
        ok(
            "IPv6 extension chain",
            frame(
                0x86dd,
                &ipv6(
                    &[(0, 0), (60, 1), (43, 0)],
                    6,
                    &tcp(PORT, 5, 0x18, &hello),
                    None,
                ),
            ),
        ),
        ok("one 802.1Q tag", vlan(&[0x8100], 0x0800, &good4)),
        ok("802.1ad + 802.1Q", vlan(&[0x88a8, 0x8100], 0x0800, &good4)),
        // The kernel moves the outer tag to metadata; two stay in the bytes for the program.
        ok(
            "three tags",
            vlan(&[0x88a8, 0x8100, 0x8100], 0x0800, &good4),
        ),
        ok(
            "802.1ad + 802.1Q, IPv6",
            vlan(&[0x88a8, 0x8100], 0x86dd, &good6),
        ),
        bad(
            "pure ACK",
            frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x10, b""))),
            Counter::NoPayload,
        ),
        control(
            "SYN",
            frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x02, b""))),
        ),
        control(
            "FIN",
            frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x11, b""))),
        ),
        control(
            "RST",
            frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x04, b""))),
        ),
        control(
            "FIN, IPv6",
            frame(0x86dd, &ipv6(&[], 6, &tcp(PORT, 5, 0x11, b""), None)),
        ),
        bad(
            "other port",
            frame(
                0x0800,
                &ipv4(5, 6, 0, None, &tcp(PORT + 1, 5, 0x18, &hello)),
            ),
            Counter::OtherPort,
        ),
        bad(
            "UDP",
            frame(0x0800, &ipv4(5, 17, 0, None, &hello)),
            Counter::NotTcp,
        ),
        bad("ARP", frame(0x0806, &[0u8; 28]), Counter::NotIp),
        bad(
            "IHL < 5",
            frame(0x0800, &ipv4(4, 6, 0, None, &tcp(PORT, 5, 0x18, &hello))),
            Counter::Ipv4BadIhl,
        ),
        bad(
            "IP length larger than the frame",
            frame(
                0x0800,
                &ipv4(5, 6, 0, Some(1500), &tcp(PORT, 5, 0x18, &hello)),
            ),
            Counter::Ipv4BadLength,
        ),
        bad(
            "IP length below the header",
            frame(
                0x0800,
                &ipv4(5, 6, 0, Some(12), &tcp(PORT, 5, 0x18, &hello)),
            ),
            Counter::Ipv4BadLength,
        ),
        bad(
            "IPv4 header cut",
            frame(0x0800, &good4[..12]),
            Counter::Ipv4Short,
        ),
        bad(
            "IPv4 options cut",
            frame(0x0800, &ipv4(15, 6, 0, None, b"")[..40]),
            Counter::Ipv4Short,
        ),
        bad(
            "TCP header cut",
            frame(0x0800, &tcp_short),
            Counter::TcpShort,
        ),
        bad(
            "TCP offset < 5",
            frame(0x0800, &ipv4(5, 6, 0, None, &tcp(PORT, 4, 0x18, &hello))),
            Counter::TcpBadOffset,
        ),
        bad(
            "TCP offset past the segment",
            frame(
                0x0800,
                &ipv4(5, 6, 0, None, &tcp(PORT, 15, 0x18, b"")[..24]),
            ),
            Counter::TcpBadOffset,
        ),
        bad(
            "IPv4 first fragment",
            frame(
                0x0800,
                &ipv4(5, 6, 0x2000, None, &tcp(PORT, 5, 0x18, &hello)),
            ),
            Counter::Fragment,
        ),
        bad(
            "IPv4 later fragment",
            frame(0x0800, &ipv4(5, 6, 0x0010, None, &hello)),
            Counter::Fragment,
        ),
        bad(
            "IPv6 header cut",
            frame(0x86dd, &good6[..30]),
            Counter::Ipv6Short,
        ),
        bad(
            "IPv6 length larger than the frame",
            frame(
                0x86dd,
                &ipv6(&[], 6, &tcp(PORT, 5, 0x18, &hello), Some(900)),
            ),
            Counter::Ipv6BadLength,
        ),
        bad(
            "IPv6 fragment header",
            frame(
                0x86dd,
                &ipv6(&[(44, 0)], 6, &tcp(PORT, 5, 0x18, &hello), None),
            ),
            Counter::Fragment,
        ),
        bad(
            "IPv6 extension past the payload",
            frame(0x86dd, &ext_cut),
            Counter::Ipv6ExtShort,
        ),
        bad(
            "IPv6 extension chain too long",
            frame(
                0x86dd,
                &ipv6(&[(60, 0); 7], 6, &tcp(PORT, 5, 0x18, &hello), None),
            ),
            Counter::Ipv6ExtTooDeep,
        ),
        bad(
            "IPv6 UDP",
            frame(0x86dd, &ipv6(&[], 17, &hello, None)),
            Counter::NotTcp,
        ),
        bad(
            "four VLAN tags",
            vlan(&[0x88a8, 0x8100, 0x8100, 0x8100], 0x0800, &good4),
            Counter::VlanTooDeep,
        ),
        bad(
            "inner VLAN tag cut",
            {
                let mut f = eth(0x88a8);
                f.extend_from_slice(&[0, 100, 0x81, 0x00, 0, 101]);
                f
            },
            Counter::VlanShort,
        ),
    ]
}
