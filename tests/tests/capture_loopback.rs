//! The real program on `lo`, a real MariaDB behind a recording relay: what the capture hands
//! over for each connection, in sequence order, is exactly what the client sent.

mod common;

use std::time::Duration;

use collector_common::Counter;
use common::*;
use mysql_async::prelude::*;

/// Waits until the capture holds, for every relayed connection, as many bytes as were sent.
async fn assert_streams_match(cap: &mut TestCapture, relay: &Relay, connections: u32) {
    let sent = relay.sent_when_closed(connections).await;
    assert_eq!(sent.len(), connections as usize);
    let total: usize = sent.values().map(Vec::len).sum();
    cap.collect_until(
        Duration::from_secs(20),
        "all relayed bytes and FINs",
        |recs, _| {
            let ours = || {
                recs.iter()
                    .filter(|r| r.dport == 3306 && sent.contains_key(&r.sport))
            };
            let fins: std::collections::HashSet<u16> = ours()
                .filter(|r| r.tcp_flags & 0x01 != 0)
                .map(|r| r.sport)
                .collect();
            ours().map(|r| r.data.len()).sum::<usize>() >= total && fins.len() == sent.len()
        },
    )
    .await;
    let got = streams(&cap.records, 3306);
    for (port, bytes) in &sent {
        let key = (std::net::IpAddr::from([127, 0, 0, 1]), *port);
        let captured = got
            .get(&key)
            .unwrap_or_else(|| panic!("no capture for {key:?}"));
        assert_eq!(captured.len(), bytes.len(), "length for {key:?}");
        assert!(captured == bytes, "bytes differ for {key:?}");
    }
}

#[tokio::test]
async fn mariadb_sessions_are_captured_byte_for_byte() {
    let mut cap = TestCapture::start("lo", &[3306]);
    let relay = Relay::start(MYSQL_ADDR.parse().unwrap()).await;

    // One connection with a 1 MiB query (spread over many 64 KiB loopback segments).
    let big = "x".repeat(1 << 20);
    let mut conn = mysql_async::Conn::new(mysql_opts(relay.addr))
        .await
        .unwrap();
    let len: Option<u64> = conn
        .query_first(format!("SELECT LENGTH('{big}')"))
        .await
        .unwrap();
    assert_eq!(len, Some(1 << 20));
    conn.disconnect().await.unwrap();

    // 200 small queries over 20 concurrent connections.
    let mut tasks = Vec::new();
    for c in 0..20 {
        let addr = relay.addr;
        tasks.push(tokio::spawn(async move {
            let mut conn = mysql_async::Conn::new(mysql_opts(addr)).await.unwrap();
            for q in 0..10 {
                let v: Option<u32> = conn
                    .query_first(format!("SELECT {c} * 100 + {q} /* conn {c} query {q} */"))
                    .await
                    .unwrap();
                assert_eq!(v, Some(c * 100 + q));
            }
            conn.disconnect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_streams_match(&mut cap, &relay, 21).await;

    let (records, counters, _capture) = cap.stop().await;
    // Of the payload-less segments only SYN/FIN/RST crossed over, header-only: each of the 21
    // connections opened and ended while captured. The kernel dropped and counted the rest.
    let control: Vec<_> = records.iter().filter(|r| r.data.is_empty()).collect();
    assert!(control.iter().all(|r| r.tcp_flags & 0x07 != 0));
    assert_eq!(counters.get(Counter::Control), control.len() as u64);
    for (flag, name) in [(0x02, "SYN"), (0x01, "FIN")] {
        let conns: std::collections::HashSet<_> = control
            .iter()
            .filter(|r| r.tcp_flags & flag != 0 && r.dport == 3306)
            .map(|r| r.sport)
            .collect();
        assert!(conns.len() >= 21, "{name} of {} connections", conns.len());
    }
    assert!(
        counters.get(Counter::NoPayload) > 0,
        "ACKs were seen and dropped"
    );
    assert_eq!(counters.get(Counter::RingFull), 0);
    assert_eq!(counters.get(Counter::Truncated), 0);
    // Every record the kernel submitted arrived, and its byte count agrees.
    assert_eq!(counters.get(Counter::Records), records.len() as u64);
    assert_eq!(
        counters.get(Counter::Bytes),
        records.iter().map(|r| r.data.len() as u64).sum::<u64>()
    );
    // Large segments were carried whole: some record continues a segment (offset > 0).
    assert!(
        records
            .iter()
            .any(|r| r.offset > 0 && r.segment_len > 16384)
    );
}

#[tokio::test]
async fn ipv6_loopback_is_captured() {
    let sink = Sink::start("[::1]:0".parse().unwrap()).await;
    let port = sink.addr.port();
    let mut cap = TestCapture::start("lo", &[port]);
    let payload = pattern(300_000, 6);
    let mut s = tokio::net::TcpStream::connect(sink.addr).await.unwrap();
    let local = s.local_addr().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &payload)
        .await
        .unwrap();
    drop(s);
    cap.collect_until(Duration::from_secs(10), "IPv6 payload", |recs, _| {
        recs.iter().map(|r| r.data.len()).sum::<usize>() >= payload.len()
    })
    .await;
    let got = streams(&cap.records, port);
    assert_eq!(got[&(local.ip(), local.port())], payload);
    assert!(
        cap.records
            .iter()
            .all(|r| r.src.is_ipv6() && r.dst.is_ipv6())
    );
}

#[tokio::test]
async fn snapshot_length_cuts_and_counts() {
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let port = sink.addr.port();
    let mut cfg = collector::capture::CaptureConfig::new("lo", vec![port]);
    cfg.snap_len = 100;
    let mut cap = TestCapture::start_with(cfg);
    let mut s = std::net::TcpStream::connect(sink.addr).unwrap();
    s.set_nodelay(true).unwrap();
    std::io::Write::write_all(&mut s, &pattern(1000, 1)).unwrap();
    cap.collect_until(Duration::from_secs(10), "cut record", |recs, c| {
        recs.iter().any(|r| !r.data.is_empty()) && c.get(Counter::Truncated) >= 1
    })
    .await;
    let r = cap.records.iter().find(|r| !r.data.is_empty()).unwrap();
    assert_eq!(r.data.len(), 100);
    assert_eq!(r.segment_len, 1000);
    assert_eq!(&r.data[..], &pattern(1000, 1)[..100]);
}

/// Sends each payload on its own connection and returns (client address, payload) pairs.
async fn send_streams(
    to: std::net::SocketAddr,
    sizes: &[usize],
    seed: u64,
) -> Vec<(std::net::SocketAddr, Vec<u8>)> {
    let mut sent = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let payload = pattern(len, seed + i as u64);
        let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
        let local = s.local_addr().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &payload)
            .await
            .unwrap();
        sent.push((local, payload));
    }
    sent
}

#[tokio::test]
async fn every_transport_hands_over_the_same_bytes() {
    use collector::capture::{CaptureConfig, Transport};
    for transport in [
        Transport::RingClasses,
        Transport::RingFixed,
        Transport::PerfSkb,
    ] {
        let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
        let port = sink.addr.port();
        let mut cfg = CaptureConfig::new("lo", vec![port]);
        cfg.transport = transport;
        let mut cap = TestCapture::start_with(cfg);
        let sent = send_streams(sink.addr, &[10, 3000, 40_000, 500_000], 90).await;
        let perf = transport == Transport::PerfSkb;
        // Done when the segments seen cover every byte sent (cut or not) and every record the
        // kernel emitted has been drained.
        let total: u64 = sent.iter().map(|(_, p)| p.len() as u64).sum();
        cap.collect_until(Duration::from_secs(10), "every stream", |recs, c| {
            let segments: u64 = recs
                .iter()
                .filter(|r| r.offset == 0)
                .map(|r| u64::from(r.segment_len))
                .sum();
            let got: u64 = recs.iter().map(|r| r.data.len() as u64).sum();
            segments >= total && got == c.get(Counter::Bytes)
        })
        .await;
        let (records, counters, _) = cap.stop().await;
        // A record cut short of its segment's end. A perf sample's size is a u16: loopback
        // segments near 64 KiB (most of the 500 KB stream's, when the window lets TCP send
        // them) cannot be carried whole; the ring buffer's records carry every segment.
        let cut_short = |r: &&collector::capture::Record| {
            (r.offset as usize + r.data.len()) < r.segment_len as usize
                && !records
                    .iter()
                    .any(|n| n.sport == r.sport && n.seq == r.seq.wrapping_add(r.data.len() as u32))
        };
        let cut_records: Vec<_> = records.iter().filter(cut_short).collect();
        // The limit counts the headers too: at most 134 bytes of them on lo over IPv4.
        let limit = collector_common::PERF_MAX_SAMPLE;
        for r in &cut_records {
            assert!(
                perf,
                "{transport:?}: a segment of {} bytes was cut",
                r.segment_len
            );
            assert!(
                r.segment_len + 134 > limit,
                "{transport:?}: a segment of {} bytes, under the perf limit, was cut",
                r.segment_len
            );
        }
        if perf {
            // A segment whose payload alone is over the limit is always cut.
            for r in records.iter().filter(|r| r.segment_len >= limit) {
                assert!(
                    cut_records
                        .iter()
                        .any(|c| c.sport == r.sport && c.seq == r.seq),
                    "a segment of {} bytes was not cut",
                    r.segment_len
                );
            }
        }
        assert_eq!(
            counters.get(Counter::Truncated),
            cut_records.len() as u64,
            "{transport:?}"
        );
        // The cut streams have holes: leave them out of the reassembly.
        let cut: Vec<u16> = cut_records.iter().map(|r| r.sport).collect();
        let kept: Vec<_> = records
            .into_iter()
            .filter(|r| !cut.contains(&r.sport))
            .collect();
        let got = streams(&kept, port);
        for (local, payload) in &sent {
            if cut.contains(&local.port()) {
                continue;
            }
            assert!(
                got[&(local.ip(), local.port())] == *payload,
                "{transport:?}: stream of {} bytes differs",
                payload.len()
            );
        }
        assert_eq!(counters.get(Counter::RingFull), 0, "{transport:?}");
    }
}

#[tokio::test]
async fn a_record_submitted_without_a_wakeup_still_arrives() {
    use collector::capture::CaptureConfig;
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let port = sink.addr.port();
    let mut cfg = CaptureConfig::new("lo", vec![port]);
    // The kernel wakes the reader only once an eighth of the ring is unread: neither segment
    // does, so only the reader's own timer finds them (nothing else on the ring to wake it).
    cfg.wakeup_interval = Duration::from_millis(300);
    let mut cap = TestCapture::start_with(cfg);
    let mut s = std::net::TcpStream::connect(sink.addr).unwrap();
    s.set_nodelay(true).unwrap();
    std::io::Write::write_all(&mut s, b"first").unwrap();
    let payloads =
        |r: &[collector::capture::Record]| r.iter().filter(|r| !r.data.is_empty()).count();
    cap.collect_until(Duration::from_secs(5), "first record", |r, _| {
        payloads(r) == 1
    })
    .await;
    std::io::Write::write_all(&mut s, b"second").unwrap();
    cap.collect_until(Duration::from_secs(5), "second record", |r, _| {
        payloads(r) == 2
    })
    .await;
    assert_eq!(&cap.records.last().unwrap().data[..], b"second");
}
