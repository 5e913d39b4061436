//! The `mrte-collector` binary on `lo` with its real flags, a real MariaDB behind a recording
//! relay, a real RabbitMQ: what a consumer reads from the queue, decoded and reassembled per
//! session, is exactly what each client sent; the exit totals agree with what the test counted;
//! bad broker settings stop the agent before it attaches.

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use collector::encode::decode_message;
use common::{
    agent::{Agent, binary, fails_before_attaching, totals, wait_stdout_line},
    broker::{Received, TestExchange},
    *,
};
use mysql_async::prelude::*;
use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt as _;

type Streams = HashMap<(Ipv4Addr, u16), Vec<u8>>;

/// Decodes every message (checksums verified by the decoder), checks the AMQP properties and
/// LOCAL_IP, and concatenates each session's units in queue order. Returns the streams and the
/// number of units.
fn reassemble(messages: &[Received], local_ip: Ipv4Addr) -> (Streams, u64) {
    let mut streams = Streams::new();
    let mut units = 0;
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(
            m.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain"),
            "message {i}: content type"
        );
        assert_eq!(*m.properties.delivery_mode(), Some(1), "message {i}");
        assert_eq!(*m.properties.headers(), None, "message {i}: headers");
        let msg = decode_message(&m.data).unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(msg.local_ip, local_ip, "message {i}: LOCAL_IP");
        for u in msg.units {
            units += 1;
            streams.entry((u.ip, u.port)).or_default().extend(u.data);
        }
    }
    (streams, units)
}

/// What the agent publishes for a client stream of this test with `--prepared_statements=on`:
/// the stream with each COM_STMT_PREPARE left out and each COM_STMT_EXECUTE replaced by the
/// COM_QUERY it stands for. The test's only statement takes one integer, and each session
/// executes it with `q` = 2, 5, 8, 11 (every third query).
fn with_executes_as_text(sent: &[u8]) -> Vec<u8> {
    use collector::protocol::{self, command};
    let mut packets = protocol::Packets::default();
    packets.push(sent);
    let (mut out, mut sql, mut q) = (Vec::with_capacity(sent.len()), String::new(), 2);
    while let Some(p) = packets.next_packet() {
        match (p.seq, p.payload.as_slice().first()) {
            (0, Some(&command::STMT_PREPARE)) => {
                sql = String::from_utf8(p.payload[1..].to_vec()).unwrap()
            }
            (0, Some(&command::STMT_EXECUTE)) => {
                let text = sql.replace('?', &q.to_string());
                out.extend(protocol::command_packets(
                    protocol::command::QUERY,
                    text.as_bytes(),
                ));
                q += 3;
            }
            _ => out.extend(protocol::packet(p.seq, &p.payload)),
        }
    }
    assert_eq!(q, 14, "four executes per session");
    out
}

fn exchange_arg(mq: &TestExchange) -> String {
    format!("--rabbitmq_exchange_name={}", mq.exchange)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mixed_sessions_reach_the_queue_byte_exact() {
    let mq = TestExchange::new("fifty");
    let mut setup = mysql_async::Conn::new(mysql_opts(MYSQL_ADDR.parse().unwrap()))
        .await
        .unwrap();
    setup
        .query_drop("CREATE DATABASE IF NOT EXISTS mrte_test")
        .await
        .unwrap();
    setup.disconnect().await.unwrap();
    let relay = Relay::start(MYSQL_ADDR.parse().unwrap()).await;
    let mut agent = Agent::start(&[
        "--interface=lo",
        "--port=3306",
        "--status_interval=1",
        &exchange_arg(&mq),
    ]);
    agent.wait_attached();

    let mut tasks = Vec::new();
    for c in 0..50u32 {
        let addr = relay.addr;
        tasks.push(tokio::spawn(async move {
            // Half the sessions name their database at connect, half with USE.
            let mut conn = if c % 2 == 0 {
                let opts = mysql_async::OptsBuilder::from_opts(mysql_opts(addr))
                    .db_name(Some("mrte_test"));
                mysql_async::Conn::new(opts).await.unwrap()
            } else {
                let mut conn = mysql_async::Conn::new(mysql_opts(addr)).await.unwrap();
                conn.query_drop("USE mrte_test").await.unwrap();
                conn
            };
            conn.query_drop(format!(
                "CREATE TEMPORARY TABLE t{c} (id INT PRIMARY KEY, v LONGTEXT)"
            ))
            .await
            .unwrap();
            for q in 0..12u32 {
                // Every fifth session also sends queries over 64 KiB (several segments each).
                let len = if c % 5 == 0 && q % 4 == 0 {
                    70_000 + 30_000 * q as usize
                } else {
                    10 + (c * 37 + q * 11) as usize % 900
                };
                let v = String::from_utf8(
                    pattern(len, (c * 100 + q) as u64)
                        .iter()
                        .map(|b| b'a' + b % 26)
                        .collect(),
                )
                .unwrap();
                match q % 3 {
                    0 => conn
                        .query_drop(format!("INSERT INTO t{c} VALUES ({q}, '{v}')"))
                        .await
                        .unwrap(),
                    1 => {
                        let got: Option<u64> = conn
                            .query_first(format!("SELECT LENGTH('{v}') /* {c}.{q} */"))
                            .await
                            .unwrap();
                        assert_eq!(got, Some(len as u64));
                    }
                    _ => {
                        // A prepared statement: COM_STMT_PREPARE and COM_STMT_EXECUTE.
                        let n: Option<u64> = conn
                            .exec_first(format!("SELECT COUNT(*) FROM t{c} WHERE id <= ?"), (q,))
                            .await
                            .unwrap();
                        assert_eq!(n, Some(q.div_ceil(3) as u64));
                    }
                }
            }
            conn.disconnect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent = relay.sent_when_closed(50).await;
    assert_eq!(sent.len(), 50);
    assert!(sent.values().any(|s| s.len() > 250_000));
    // What is still in the ring or a batch goes out at exit.
    agent.signal(Signal::SIGINT);
    let out = agent.wait();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "exit {}: {stdout}", out.status);

    let messages = mq.take_all();
    let (streams, units) = reassemble(&messages, Ipv4Addr::LOCALHOST);
    for (port, bytes) in &sent {
        let bytes = &with_executes_as_text(bytes);
        let got = streams
            .get(&(Ipv4Addr::LOCALHOST, *port))
            .unwrap_or_else(|| panic!("nothing published for port {port}"));
        let at = got.iter().zip(bytes).position(|(a, b)| a != b);
        assert!(
            got == bytes,
            "port {port}: published {} bytes, sent {}, first difference at {at:?}: {:?}\n{stdout}",
            got.len(),
            bytes.len(),
            at.map(|i| &got[i.saturating_sub(8)..(i + 24).min(got.len())])
        );
    }
    assert_eq!(
        streams.len(),
        50,
        "sessions other than the test's were published"
    );

    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert_eq!(get("PacketDropped"), 0, "{stdout}");
    assert_eq!(get("MQError"), 0, "{stdout}");
    assert_eq!(get("published_msgs"), messages.len() as u64, "{stdout}");
    assert_eq!(get("published_units"), units, "{stdout}");
    assert_eq!(
        get("published_bytes"),
        messages.iter().map(|m| m.data.len() as u64).sum::<u64>()
    );
    // Every record became a unit, except data already published (retransmissions), the
    // collector's own MySQL connection, the header-only SYN/FIN/RST records, and the
    // PREPAREs (a segment each: the client waits for the reply) taken out without a
    // replacement. Every session opened and ended while captured, each with its own COM_QUIT.
    assert_eq!(
        (
            get("stmt_prepares"),
            get("stmt_known"),
            get("stmt_rendered")
        ),
        (50, 50, 200),
        "{stdout}"
    );
    assert_eq!(
        get("records"),
        units + get("retransmitted") + get("own_traffic") + get("control") + get("stmt_commands")
            - get("stmt_rendered"),
        "{stdout}"
    );
    assert_eq!(
        (get("syn_opened"), get("fin_closed"), get("close_quits")),
        (50, 50, 0),
        "{stdout}"
    );
    assert_eq!(
        get("hold_overflow"),
        0,
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get("ValidPacket"), get("with_payload"));
    let payload: u64 = sent
        .values()
        .map(|s| with_executes_as_text(s).len() as u64)
        .sum();
    // Message bytes: LOCAL_IP per message, 14 bytes around each unit, the clients' payload
    // (executes as text).
    assert_eq!(
        get("published_bytes"),
        4 * get("published_msgs") + 14 * units + payload,
        "{stdout}"
    );
    assert!(
        get("TotalPacket") > get("ValidPacket"),
        "ACKs count as packets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_counted_as_unencodable_not_lost() {
    let mq = TestExchange::new("v6");
    let v4 = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let v6 = Sink::start("[::1]:0".parse().unwrap()).await;
    let ports = format!("--port={},{}", v4.addr.port(), v6.addr.port());
    let mut agent = Agent::start(&[
        "--interface=lo",
        &ports,
        &exchange_arg(&mq),
        "--status_interval=1",
    ]);
    let lines = agent.take_stdout_lines();
    agent.wait_attached();
    let mut sent = Streams::new();
    for (i, addr) in [v4.addr, v6.addr, v4.addr].into_iter().enumerate() {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let data = pattern(1000 + i * 100, i as u64);
        s.write_all(&data).await.unwrap();
        if let (SocketAddr::V4(local), IpAddr::V4(ip)) = (s.local_addr().unwrap(), addr.ip()) {
            assert_eq!(ip, Ipv4Addr::LOCALHOST);
            // The connection ends (FIN) without a COM_QUIT of its own: it gets a synthetic one.
            sent.insert(
                (*local.ip(), local.port()),
                [&data[..], &[1, 0, 0, 0, 1]].concat(),
            );
        }
    }
    // One status line at least (the first comes with the header).
    let header = |l: &str| l.starts_with("DateTime");
    tokio::task::block_in_place(|| wait_stdout_line(&lines, 0, 60, header));
    agent.signal(Signal::SIGINT);
    let out = tokio::task::block_in_place(|| agent.wait());
    let stdout = lines.lock().unwrap().join("\n");
    assert!(out.status.success(), "{stdout}");
    let (streams, units) = reassemble(&mq.take_all(), Ipv4Addr::LOCALHOST);
    assert_eq!(streams, sent);
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert_eq!(get("unencodable"), 1, "one IPv6 segment: {stdout}");
    assert_eq!((get("fin_closed"), get("close_quits")), (2, 2), "{stdout}");
    assert_eq!(
        get("records") + get("close_quits"),
        units + get("unencodable") + get("retransmitted") + get("control")
    );
    assert!(stdout.contains("Unencodable"), "status column: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_creates_exchange_and_queue_and_confirms_publishes() {
    // Names only: the agent creates them; the fixture deletes them on drop.
    let mq = TestExchange::named("declared");
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let mut agent = Agent::start(&[
        "--interface=lo",
        &format!("--port={}", sink.addr.port()),
        &exchange_arg(&mq),
        "--rabbitmq_declare",
        &format!("--rabbitmq_queue={}", mq.queue),
        "--rabbitmq_routing_key=replay",
        "--rabbitmq_confirm",
        "--thread_count=2",
        "--read_timeout=20",
    ]);
    agent.wait_attached();
    let mut s = tokio::net::TcpStream::connect(sink.addr).await.unwrap();
    let mut sent = Vec::new();
    for i in 0..30 {
        let data = pattern(100 + i, i as u64);
        s.write_all(&data).await.unwrap();
        sent.extend(data);
        // Separate segments, several batches.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let port = s.local_addr().unwrap().port();
    // The sink's receipt is not known here: time for the last segment to pass the capture.
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.signal(Signal::SIGINT);
    let out = agent.wait();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let messages = mq.take_all();
    assert!(messages.len() > 1, "batches left by --read_timeout");
    assert!(messages.iter().all(|m| m.routing_key == "replay"));
    let (streams, _) = reassemble(&messages, Ipv4Addr::LOCALHOST);
    assert_eq!(streams[&(Ipv4Addr::LOCALHOST, port)], sent);
    let t = totals(&stdout);
    assert_eq!(t.printed("MQError"), Some(0));
}

#[test]
fn bad_broker_settings_stop_the_agent_before_it_attaches() {
    let mq = TestExchange::new("bad");
    let exchange = exchange_arg(&mq);
    let missing = unique("mrte_test_missing_");
    fails_before_attaching(
        &[
            "--interface=lo",
            &format!("--rabbitmq_exchange_name={missing}"),
        ],
        &[],
        &[
            &format!("exchange \"{missing}\" does not exist"),
            "--rabbitmq_declare",
        ],
    );
    fails_before_attaching(
        &["--interface=lo", &exchange, "--rabbitmq_password=wrong"],
        &[],
        &["refused the login", "--rabbitmq_password"],
    );
    // The secret from the environment is the one used.
    fails_before_attaching(
        &["--interface=lo", &exchange],
        &[("MRTE_RABBITMQ_PASSWORD", "wrong")],
        &["refused the login", "MRTE_RABBITMQ_PASSWORD"],
    );
    // Nothing listens on a port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fails_before_attaching(
        &[
            "--interface=lo",
            &exchange,
            &format!("--rabbitmq_port={port}"),
        ],
        &[],
        &["cannot reach RabbitMQ", "--rabbitmq_port"],
    );
    fails_before_attaching(
        &["--interface=lo", &exchange, "--thread_count=11"],
        &[],
        &["--thread_count", "2..=10"],
    );
    fails_before_attaching(
        &["--interface=lo", &exchange, "--queue_size=99"],
        &[],
        &["--queue_size", "100..=5000"],
    );
    fails_before_attaching(
        &["--interface=lo", &exchange, "--rabbitmq_queue=q"],
        &[],
        &["--rabbitmq_declare"],
    );
    fails_before_attaching(
        &["--interface=lo", &exchange, "--not_a_flag=1"],
        &[],
        &["--not_a_flag"],
    );
}

#[test]
fn the_help_names_every_original_flag_and_the_secret_variables() {
    let out = Command::new(binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    // The flags --help defines (its option lines, `  -h, --help` or `      --port <PORT>`), not
    // words of its texts.
    let flag_at = |line: &str| -> Option<String> {
        let l = line.trim_start();
        let l = l
            .strip_prefix("-h, ")
            .or(l.strip_prefix("-V, "))
            .unwrap_or(l);
        let name: String = l
            .strip_prefix("--")?
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        (!name.is_empty()).then(|| format!("--{name}"))
    };
    let defined: std::collections::BTreeSet<String> = help.lines().filter_map(flag_at).collect();
    // The README's flag table lists each of them, and nothing else.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| flag_at(l.split('`').next()?))
        .chain(["--version".to_owned()])
        .collect();
    assert_eq!(defined, documented, "--help and the README's flag table");
    for flag in ["MRTE_RABBITMQ_PASSWORD", "MRTE_MYSQL_PASSWORD"] {
        assert!(help.contains(flag), "{flag} not in --help:\n{help}");
    }
    for flag in [
        "--interface",
        "--port",
        "--snapshot_len",
        "--read_timeout",
        "--thread_count",
        "--queue_size",
        "--rabbitmq_host",
        "--rabbitmq_port",
        "--rabbitmq_user",
        "--rabbitmq_password",
        "--rabbitmq_exchange_name",
        "--rabbitmq_routing_key",
        "--mysql_host",
        "--mysql_port",
        "--mysql_user",
        "--mysql_password",
        "--max_mem_mb",
    ] {
        assert!(
            defined.contains(flag),
            "{flag} not a flag of --help:\n{help}"
        );
    }
    // Both spellings of a value.
    let out = Command::new(binary())
        .args(["--interface", "lo", "--thread_count", "11"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("2..=10"));
}

/// SIGTERM in the middle of a burst: the agent detaches before its last drain and reads the
/// kernel's counters after it, so every query segment the kernel counted (ValidPacket) is
/// published, left out as the agent's own, or counted as dropped, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_accounts_for_every_segment_the_kernel_saw() {
    const SESSIONS: usize = 4;
    let mq = TestExchange::new("burst_exit");
    // Opened before the agent: while captured, their only payload is these queries.
    let mut conns = Vec::new();
    for _ in 0..SESSIONS {
        conns.push(
            mysql_async::Conn::new(mysql_opts(MYSQL_ADDR.parse().unwrap()))
                .await
                .unwrap(),
        );
    }
    let mut agent = Agent::start(&[
        "--interface=lo",
        "--port=3306",
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--read_timeout=20",
    ]);
    agent.wait_attached();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(s, mut c)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.query_drop(format!("SELECT {s}, {n}")).await.unwrap();
                    n += 1;
                }
                (c, n)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Signalled while the queries go on, and they go on until it has exited.
    agent.signal(Signal::SIGTERM);
    let out = tokio::task::block_in_place(|| agent.wait());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for l in load {
        let (c, n) = l.await.unwrap();
        sent += u64::from(n);
        c.disconnect().await.unwrap();
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let t = totals(&stdout);
    let queries = mq
        .units_by_port()
        .values()
        .flatten()
        .filter(|u| {
            u.data.len() > 5
                && u.data[4] == collector::protocol::command::QUERY
                && u.data[5..].starts_with(b"SELECT ")
        })
        .count() as u64;
    eprintln!(
        "burst: {sent} queries sent, {queries} published, ValidPacket {}, own_traffic {}, \
         PacketDropped {}",
        t["ValidPacket"], t["own_traffic"], t["PacketDropped"]
    );
    assert!(
        queries > 1000,
        "a burst: {queries} of {sent} queries: {stdout}"
    );
    assert!(queries < sent, "queries went on after the detach: {stdout}");
    assert_eq!(
        t["ValidPacket"],
        queries + t["own_traffic"] + t["PacketDropped"],
        "{stdout}"
    );
}
