//! Exact streams under loss: an nftables rule drops a random share of client segments in the
//! input hook, after TC ingress saw them. The client retransmits, so the capture sees
//! duplicates and segments out of order; every session's published stream must still be
//! exactly what the client sent, once.

mod common;

use std::{collections::HashMap, io::Write, net::Ipv4Addr, process::Command};

use collector::{
    encode::{COM_QUIT, decode_message},
    protocol::command,
};
use common::{
    agent::{Agent, totals},
    broker::TestExchange,
    *,
};

/// An nftables table of the test's own, deleted on drop.
struct NftTable(String);

impl NftTable {
    fn drop_share(interface: &str, port: u16, percent: u32) -> Self {
        let name = unique("mrte_loss_");
        let rules = format!(
            "table inet {name} {{\n chain input {{\n type filter hook input priority 0;\n \
             iifname \"{interface}\" tcp dport {port} numgen random mod 100 < {percent} drop\n }}\n}}\n"
        );
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft {rules}");
        Self(name)
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

/// COM_QUERY packets of every size in `sizes`, as one client sends them.
fn queries(sizes: &[usize], seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let body = pattern(size, seed * 1000 + i as u64);
        out.extend_from_slice(&((size + 1) as u32).to_le_bytes()[..3]);
        out.push(0);
        out.push(command::QUERY);
        out.extend_from_slice(&body);
    }
    out
}

async fn exact_under_loss(percent: u32, sizes: &[&[usize]]) {
    let mq = TestExchange::new("loss");
    let ns = NetNs::new();
    let third = 20 + percent as u8;
    let (server, client) = (
        format!("198.18.{third}.1"),
        Ipv4Addr::new(198, 18, third, 2),
    );
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{server}/24"),
        "dev",
        &ns.host,
    ]);
    sh(&["ip", "link", "set", &ns.host, "up"]);
    ns.ip(&["addr", "add", &format!("{client}/24"), "dev", &ns.peer]);
    ns.ip(&["link", "set", &ns.peer, "up"]);
    let sink = Sink::start(format!("{server}:0").parse().unwrap()).await;
    let port = sink.addr.port();
    let _loss = NftTable::drop_share(&ns.host, port, percent);

    let mut agent = Agent::start(&[
        &format!("--interface={}", ns.host),
        &format!("--port={port}"),
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--read_timeout=20",
        // 20 sessions sending queries of up to 4 MiB at veth speed: a burst the default 8 MiB
        // ring does not absorb on two cores (that shows as ring_full; this test is about TCP
        // loss, so the ring is sized for the burst).
        "--ring_buffer_mb=64",
        "--max_mem_mb=256",
        "--queue_size=1000",
    ]);
    agent.wait_attached();

    // 20 sessions at once from the namespace, each a different mix of query sizes; half end
    // with their own COM_QUIT, half just close.
    let streams: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let mut q = queries(sizes[i % sizes.len()], i as u64 + 1);
            if i % 2 == 0 {
                q.extend_from_slice(&COM_QUIT);
            }
            q
        })
        .collect();
    let to_send = streams.clone();
    let addr = sink.addr;
    let sent: HashMap<u16, Vec<u8>> = tokio::task::block_in_place(|| {
        ns.run(move || {
            let threads: Vec<_> = to_send
                .into_iter()
                .map(|bytes| {
                    std::thread::spawn(move || {
                        let mut s = std::net::TcpStream::connect(addr).unwrap();
                        let port = s.local_addr().unwrap().port();
                        s.write_all(&bytes).unwrap();
                        s.shutdown(std::net::Shutdown::Write).unwrap();
                        // Wait until the server has read everything (it closes in turn).
                        let mut rest = Vec::new();
                        std::io::Read::read_to_end(&mut s, &mut rest).unwrap();
                        (port, bytes)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    });
    // The last batches leave at exit (the final drain and flush).
    let stdout = agent.stop();

    let mut got: HashMap<u16, Vec<u8>> = HashMap::new();
    for m in mq.take_all() {
        for u in decode_message(&m.data).unwrap().units {
            assert_eq!(u.ip, client);
            got.entry(u.port).or_default().extend_from_slice(&u.data);
        }
    }
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    // Whether a loss also leaves a gap (later segments passing first) is up to the sender;
    // the flow table's unit and property tests cover reordering deterministically.
    assert!(
        get("retransmitted") > 0,
        "the loss showed as duplicates: {stdout}"
    );
    // Every connection opened (SYN) and ended (FIN, once all its bytes were in) while
    // captured; those that closed without a COM_QUIT got one after their last byte.
    assert_eq!(
        (get("syn_opened"), get("fin_closed"), get("close_quits")),
        (20, 20, 10),
        "{stdout}"
    );
    for k in [
        "gap_timeouts",
        "gap_overflow",
        "gap_bytes",
        "queue_full",
        "mem_limit",
    ] {
        assert_eq!(get(k), 0, "{k}: {stdout}");
    }
    assert_eq!(got.len(), sent.len(), "{stdout}");
    for (port, bytes) in &sent {
        let published = &got[port];
        let bytes = &if bytes.ends_with(&COM_QUIT) {
            bytes.clone()
        } else {
            [&bytes[..], &COM_QUIT].concat()
        };
        assert!(
            published == bytes,
            "port {port}: published {} bytes, sent {} (first difference at {:?})",
            published.len(),
            bytes.len(),
            published.iter().zip(bytes).position(|(a, b)| a != b)
        );
    }
    drop(ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_exact_with_5_percent_loss() {
    exact_under_loss(
        5,
        &[
            &[10, 100, 1000],
            &[16 << 10, 10, 64 << 10],
            &[1 << 20, 10],
            &[4 << 20],
            &[10; 50],
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_exact_with_20_percent_loss() {
    exact_under_loss(
        20,
        &[
            &[10, 100, 1000],
            &[16 << 10, 10],
            &[256 << 10],
            &[10; 20],
            &[4 << 20],
        ],
    )
    .await;
}
