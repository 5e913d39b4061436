//! The Ethernet path: a veth pair into a network namespace. Real TCP clients in the namespace
//! (IPv4 and IPv6), and hand-made frames injected with an AF_PACKET socket: malformed and
//! unusual ones must move the right counter and produce no bogus record.

mod common;

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use collector_common::{Counter, Counters};
use common::{frames::*, *};

/// Namespace with addresses: host side 198.18.<n>.1 / 2001:2::1, peer side .2 / 2001:2::2.
fn addressed_ns() -> NetNs {
    let ns = NetNs::new();
    sh(&["ip", "addr", "add", "198.18.7.1/24", "dev", &ns.host]);
    sh(&[
        "ip",
        "addr",
        "add",
        "2001:2::1/64",
        "dev",
        &ns.host,
        "nodad",
    ]);
    sh(&["ip", "link", "set", &ns.host, "up"]);
    ns.ip(&["addr", "add", "198.18.7.2/24", "dev", &ns.peer]);
    ns.ip(&["addr", "add", "2001:2::2/64", "dev", &ns.peer, "nodad"]);
    ns.ip(&["link", "set", &ns.peer, "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    ns
}

#[tokio::test]
async fn veth_ipv4_and_ipv6_clients_are_captured() {
    let ns = addressed_ns();
    let sink4 = Sink::start(SocketAddr::new("198.18.7.1".parse().unwrap(), PORT)).await;
    let sink6 = Sink::start(SocketAddr::new("2001:2::1".parse().unwrap(), PORT)).await;
    let mut cap = TestCapture::start(&ns.host, &[PORT]);

    let mut sent = Vec::new();
    for (i, server) in [sink4.addr, sink6.addr].into_iter().enumerate() {
        let payload = pattern(200_000 + i * 777, 40 + i as u64);
        let p = payload.clone();
        let local = ns.run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5))
                .expect("connect from the namespace");
            s.write_all(&p).unwrap();
            s.local_addr().unwrap()
        });
        sent.push((local, payload));
    }
    let total: usize = sent.iter().map(|(_, p)| p.len()).sum();
    cap.collect_until(Duration::from_secs(15), "both streams", |recs, _| {
        recs.iter().map(|r| r.data.len()).sum::<usize>() >= total
    })
    .await;
    let got = streams(&cap.records, PORT);
    for (local, payload) in &sent {
        let s = &got[&(local.ip(), local.port())];
        assert_eq!(s.len(), payload.len());
        assert!(s == payload, "stream from {local} differs");
    }
    let (records, counters, capture) = cap.stop().await;
    assert!(records.iter().all(|r| r.ifindex == capture.ifindex()));
    assert_eq!(counters.get(Counter::RingFull), 0);
    drop(ns);
}

async fn wait_packets(cap: &TestCapture, before: &Counters, n: u64) -> Counters {
    let start = Instant::now();
    loop {
        let c = cap.counters();
        if c.get(Counter::Packets) >= before.get(Counter::Packets) + n {
            return c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "frame never reached the program"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn malformed_and_unusual_frames_move_the_right_counter() {
    // No addresses and no IPv6 on either side: nothing but the injected frames crosses.
    let ns = NetNs::new();
    for (path, dev) in [("", &ns.host), ("peer", &ns.peer)] {
        let sysctl = format!("net.ipv6.conf.{dev}.disable_ipv6=1");
        if path.is_empty() {
            sh(&["sysctl", "-q", "-w", &sysctl]);
        } else {
            sh(&[
                "ip", "netns", "exec", &ns.name, "sysctl", "-q", "-w", &sysctl,
            ]);
        }
    }
    sh(&["ip", "link", "set", &ns.host, "up"]);
    ns.ip(&["link", "set", &ns.peer, "up"]);
    let mut cap = TestCapture::start(&ns.host, &[PORT]);
    tokio::time::sleep(Duration::from_millis(200)).await;

    for case in cases() {
        cap.collect();
        let records_before = cap.records.len();
        let before = cap.counters();
        ns.inject(case.frame.clone());
        let after = wait_packets(&cap, &before, 1).await;
        // Give the ring buffer a moment to deliver a record, if one was made.
        tokio::time::sleep(Duration::from_millis(30)).await;
        cap.collect();
        let after = {
            let c = cap.counters();
            assert_eq!(
                c, after,
                "{}: more than the injected frame reached the program",
                case.name
            );
            c
        };
        assert_eq!(delta(&before, &after, Counter::Packets), 1, "{}", case.name);
        assert_eq!(
            delta(&before, &after, case.counter),
            1,
            "{}: {:?} did not move",
            case.name,
            case.counter
        );
        let new = &cap.records[records_before..];
        match &case.record {
            Some(payload) => {
                assert_eq!(new.len(), 1, "{}: records", case.name);
                assert_eq!(&new[0].data[..], &payload[..], "{}", case.name);
                assert_eq!(new[0].sport, 40000, "{}", case.name);
                assert_eq!(new[0].dport, PORT, "{}", case.name);
                assert_eq!(new[0].seq, 1000, "{}", case.name);
                let want_src: IpAddr = if new[0].src.is_ipv4() {
                    IpAddr::from(SRC4)
                } else {
                    "2001:2::2".parse().unwrap()
                };
                assert_eq!(new[0].src, want_src, "{}", case.name);
            }
            None => {
                assert!(new.is_empty(), "{}: produced a bogus record", case.name);
                assert_eq!(delta(&before, &after, Counter::Records), 0, "{}", case.name);
            }
        }
    }
    drop(cap);
    drop(ns);
}
