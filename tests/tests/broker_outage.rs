//! Broker faults under load. Stopped for 20 s, then started again: the agent stays up,
//! reports the errors and the drops, reconnects by itself, delivers every session that lost
//! nothing complete, and ends each session that lost units with a COM_QUIT at the loss,
//! resuming it only at a command. Stalled (RabbitMQ's memory alarm blocks publishers) while
//! the load runs far past what the budget holds: the agent's RSS stays under `--max_mem_mb`,
//! and publishing resumes when the broker does.

mod common;

use std::{
    io::Write,
    process::Command,
    time::{Duration, Instant},
};

use collector::{encode::COM_QUIT, protocol::command};
use common::{
    Sink,
    agent::{Agent, status_rows, totals},
    broker::TestExchange,
    sh,
};

/// Starts the broker application again when dropped, also when the test fails.
struct StoppedBroker;

impl StoppedBroker {
    fn stop() -> Self {
        sh(&["rabbitmqctl", "-q", "stop_app"]);
        Self
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "await_startup"])
            .status();
    }
}

/// RabbitMQ's memory alarm raised (it blocks every publishing connection) until dropped, also
/// when the test fails; the high watermark is put back as it was.
struct StalledBroker {
    watermark: String,
}

impl StalledBroker {
    fn stall() -> Self {
        let out = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                "vm_memory_monitor:get_vm_memory_high_watermark().",
            ])
            .output()
            .unwrap();
        let watermark = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(watermark.parse::<f64>().is_ok(), "watermark: {watermark:?}");
        sh(&[
            "rabbitmqctl",
            "-q",
            "set_vm_memory_high_watermark",
            "0.00001",
        ]);
        let start = Instant::now();
        while !Self::alarmed() {
            assert!(start.elapsed() < Duration::from_secs(20), "no memory alarm");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { watermark }
    }

    fn alarmed() -> bool {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "eval", "rabbit_alarm:get_alarms()."])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("memory")
    }
}

impl Drop for StalledBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "set_vm_memory_high_watermark", &self.watermark])
            .status();
        let start = Instant::now();
        while Self::alarmed() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Query `n` of session `s`, as a COM_QUERY packet.
fn query(s: usize, n: u32) -> Vec<u8> {
    let sql = format!("SELECT {s}, {n}");
    let mut p = ((sql.len() + 1) as u32).to_le_bytes()[..3].to_vec();
    p.extend_from_slice(&[0, command::QUERY]);
    p.extend_from_slice(sql.as_bytes());
    p
}

/// The published stream of one session as (query number or None for a COM_QUIT).
fn commands(stream: &[u8], s: usize) -> Vec<Option<u32>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < stream.len() {
        let len = u32::from_le_bytes([stream[i], stream[i + 1], stream[i + 2], 0]) as usize;
        let packet = &stream[i..i + 4 + len];
        if packet == COM_QUIT {
            out.push(None);
        } else {
            let sql = std::str::from_utf8(&packet[5..]).unwrap();
            let (who, n) = sql["SELECT ".len()..].split_once(", ").unwrap();
            assert_eq!(who.parse::<usize>().unwrap(), s);
            out.push(Some(n.parse().unwrap()));
        }
        i += 4 + len;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_survived_and_no_session_has_a_silent_hole() {
    let mq = TestExchange::durable("outage");
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let mut agent = Agent::start(&[
        "--interface=lo",
        &format!("--port={}", sink.addr.port()),
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--rabbitmq_confirm",
        "--read_timeout=20",
        "--queue_size=100",
        "--status_interval=5",
    ]);
    agent.wait_attached();

    // Eight sessions, a query every 20 ms. Sessions 0-3 go on for 40 s, through the outage
    // (5 s to 25 s), and lose units; 4-7 send for 3 s, pause over the outage, then send 50
    // queries at the end: they must lose nothing.
    let start = Instant::now();
    let addr = sink.addr;
    let clients: Vec<_> = (0..8)
        .map(|s| {
            std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.set_nodelay(true).unwrap();
                let mut sent = 0u32;
                while start.elapsed() < Duration::from_secs(40) {
                    let t = start.elapsed();
                    let paused = s >= 4 && t > Duration::from_secs(3);
                    if !paused {
                        c.write_all(&query(s, sent)).unwrap();
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Sessions 4-7 send after the outage too.
                if s >= 4 {
                    for _ in 0..50 {
                        c.write_all(&query(s, sent)).unwrap();
                        sent += 1;
                    }
                }
                c.write_all(&COM_QUIT).unwrap();
                (s, c.local_addr().unwrap().port(), sent)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let broker = StoppedBroker::stop();
    tokio::time::sleep(Duration::from_secs(20)).await;
    drop(broker);
    let clients: Vec<(usize, u16, u32)> =
        tokio::task::block_in_place(|| clients.into_iter().map(|c| c.join().unwrap()).collect());
    // Time to reconnect (backoff up to 16 s by now) and publish what waited.
    agent.wait_log("connected to RabbitMQ again").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stdout = agent.stop();

    let units = mq.units_by_port();
    let t = totals(&stdout);
    let get = |k: &str| t.get(k).copied().unwrap_or(0);
    assert!(get("mq_reconnects") >= 1, "{stdout}");
    assert!(get("MQError") >= 1, "{stdout}");
    assert!(get("PacketDropped") >= 1, "the queues filled up: {stdout}");
    let mut quits_at_losses = 0;
    for (s, port, sent) in clients {
        let stream: Vec<u8> = units
            .get(&port)
            .unwrap_or_else(|| panic!("nothing published for session {s}"))
            .iter()
            .flat_map(|u| u.data.clone())
            .collect();
        let got = commands(&stream, s);
        let complete: Vec<Option<u32>> = (0..sent).map(Some).chain([None]).collect();
        if s >= 4 {
            assert_eq!(got, complete, "session {s} lost nothing: complete");
            continue;
        }
        // In order; a jump only right after a COM_QUIT of ours; ends with the client's quit.
        let mut next = 0;
        let mut after_quit = false;
        for (i, c) in got.iter().enumerate() {
            match c {
                Some(n) => {
                    assert!(
                        *n == next || (after_quit && *n > next),
                        "session {s}: query {n} at {i}, expected {next}: {got:?}"
                    );
                    next = n + 1;
                    after_quit = false;
                }
                None if i + 1 == got.len() => {}
                None => {
                    quits_at_losses += 1;
                    after_quit = true;
                }
            }
        }
        assert_eq!(next, sent, "session {s}: the last queries arrived");
        assert_eq!(got.last(), Some(&None), "session {s} ends with its quit");
    }
    assert!(quits_at_losses >= 1, "some session lost units: {stdout}");
    assert_eq!(get("mq_lost_sessions"), quits_at_losses, "{stdout}");
    drop(sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_keeps_rss_under_max_mem_mb() {
    const MAX_MEM_MB: u64 = 64;
    let mq = TestExchange::new("stall");
    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let mut agent = Agent::start(&[
        "--interface=lo",
        &format!("--port={}", sink.addr.port()),
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        &format!("--max_mem_mb={MAX_MEM_MB}"),
        // Queues long enough that the memory budget, not their length, is what stops them.
        "--queue_size=5000",
        "--mysql_optional",
        "--mysql_port=1",
        "--status_interval=1",
    ]);
    agent.wait_attached();
    let idle = agent.proc_status_bytes("VmRSS");

    // 4 connections writing 16 KiB packets as fast as they can for 6 s: gigabytes, while
    // the broker takes nothing.
    let stalled = tokio::task::block_in_place(StalledBroker::stall);
    let addr = sink.addr;
    let sent: u64 = tokio::task::block_in_place(|| {
        let blasters: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = std::net::TcpStream::connect(addr).unwrap();
                    let mut p = query(0, 0);
                    p.resize(16 << 10, b'x');
                    p[..3].copy_from_slice(&((16 << 10) as u32 - 4).to_le_bytes()[..3]);
                    let start = Instant::now();
                    let mut sent = 0u64;
                    while start.elapsed() < Duration::from_secs(6) {
                        c.write_all(&p).unwrap();
                        sent += p.len() as u64;
                    }
                    sent
                })
            })
            .collect();
        blasters.into_iter().map(|b| b.join().unwrap()).sum()
    });
    let peak = agent.proc_status_bytes("VmHWM");
    drop(stalled);

    // Publishing resumes by itself: a query sent now reaches the queue.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(&query(1, 1)).unwrap();
    let port = c.local_addr().unwrap().port();
    let start = Instant::now();
    let mut delivered = false;
    while !delivered && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        delivered = mq.units_by_port().contains_key(&port);
    }
    let stdout = agent.stop();
    let t = totals(&stdout);
    let get = |k: &str| t.get(k).copied().unwrap_or(0);
    eprintln!(
        "sent {} MiB; RSS idle {} MiB, peak {} MiB, budget {MAX_MEM_MB} MiB",
        sent >> 20,
        idle >> 20,
        peak >> 20
    );
    assert!(
        delivered,
        "nothing published after the broker came back: {stdout}"
    );
    assert!(get("mem_limit") > 0, "the budget was reached: {stdout}");
    assert!(
        sent > 4 * (MAX_MEM_MB << 20),
        "the load exceeded the budget many times"
    );
    assert!(
        peak <= MAX_MEM_MB << 20,
        "peak RSS {} KiB over --max_mem_mb={MAX_MEM_MB}: {stdout}",
        peak >> 10
    );
    // The status line shows the memory: RssMB within the budget.
    let rss_column: Vec<u64> = status_rows(&stdout).iter().map(|r| r["RssMB"]).collect();
    assert!(!rss_column.is_empty(), "{stdout}");
    assert!(
        rss_column.iter().all(|&mb| mb > 0 && mb <= MAX_MEM_MB),
        "{rss_column:?}"
    );
    // The exit summary's peak (taken later, so no lower) is within the budget too.
    let summary_peak = get("rss_peak_mb");
    assert!(
        summary_peak >= peak >> 20 && summary_peak <= MAX_MEM_MB,
        "{stdout}"
    );
    drop(sink);
}
