//! Broker faults under load. Stopped for 20 s, then started again: the agent stays up,
//! reports the errors and the drops, reconnects by itself, delivers every session that lost
//! nothing complete, and ends each session that lost units with a COM_QUIT at the loss,
//! resuming it only at a command. Stalled (RabbitMQ's memory alarm blocks publishers) while
//! the load runs far past what the budget holds: the agent's RSS stays under `--max_mem_mb`,
//! and publishing resumes when the broker does.

mod common;

use std::{
    io::Write,
    time::{Duration, Instant},
};

use collector::encode::COM_QUIT;
use common::{
    Sink,
    agent::{Agent, status_rows, totals},
    broker::{AppStopped, MemoryAlarm, TestExchange},
    check_ended_at_losses, numbered_commands, numbered_query,
};

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
                        c.write_all(&numbered_query(s, sent)).unwrap();
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Sessions 4-7 send after the outage too.
                if s >= 4 {
                    for _ in 0..50 {
                        c.write_all(&numbered_query(s, sent)).unwrap();
                        sent += 1;
                    }
                }
                c.write_all(&COM_QUIT).unwrap();
                (s, c.local_addr().unwrap().port(), sent)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let broker = tokio::task::block_in_place(AppStopped::stop);
    tokio::time::sleep(Duration::from_secs(20)).await;
    tokio::task::block_in_place(|| drop(broker));
    let clients: Vec<(usize, u16, u32)> =
        tokio::task::block_in_place(|| clients.into_iter().map(|c| c.join().unwrap()).collect());
    // Time to reconnect (backoff up to 16 s by now) and publish what waited.
    agent.wait_log("connected to RabbitMQ again").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stdout = agent.stop();

    let units = mq.units_by_port();
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
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
        let got = numbered_commands(&stream, s);
        let complete: Vec<Option<u32>> = (0..sent).map(Some).chain([None]).collect();
        if s >= 4 {
            assert_eq!(got, complete, "session {s} lost nothing: complete");
            continue;
        }
        quits_at_losses += check_ended_at_losses(&got, sent, &format!("session {s}"));
    }
    assert!(quits_at_losses >= 1, "some session lost units: {stdout}");
    // A COM_QUIT lost in flight is made again: as many as the losses, or more.
    assert!(get("mq_lost_sessions") >= quits_at_losses, "{stdout}");
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
    let stalled = tokio::task::block_in_place(MemoryAlarm::raise);
    let addr = sink.addr;
    let sent: u64 = tokio::task::block_in_place(|| {
        let blasters: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = std::net::TcpStream::connect(addr).unwrap();
                    let mut p = numbered_query(0, 0);
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
    tokio::task::block_in_place(|| drop(stalled));

    // Publishing resumes by itself: a query sent now reaches the queue.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(&numbered_query(1, 1)).unwrap();
    let port = c.local_addr().unwrap().port();
    let start = Instant::now();
    let mut delivered = false;
    while !delivered && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        delivered = mq.units_by_port().contains_key(&port);
    }
    let stdout = agent.stop();
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
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
    // The exit summary's peak (taken later) is within the budget too, and no lower than the
    // test's reading but for the kernel's own imprecision: RSS is summed from per-CPU counters
    // read without folding them (each CPU may hold up to 31 pages of each kind unfolded), so
    // two VmHWM readings can be a MiB boundary apart (a CI run read 62 MiB, then the agent 61).
    let summary_peak = get("rss_peak_mb");
    assert!(
        summary_peak + 1 >= peak >> 20 && summary_peak <= MAX_MEM_MB,
        "summary {summary_peak} MiB, the test's reading {} MiB: {stdout}",
        peak >> 20
    );
    drop(sink);
}
