//! `--output file:PATH` and `publish-file`: a recording made beside a live publish, published
//! later to a fresh queue, yields the same messages as the live publish, and every session's
//! units in the same order; the recording is cut into files of `--output_file_mb`. A
//! recording without a broker works too, `inspect --from_file` and `--from_queue` read what
//! was recorded and published, and an existing recording is never overwritten.

mod common;

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    agent::{Agent, binary, fails_before_attaching, local_server_args, totals},
    broker::{Received, TestExchange},
    mariadb::TestServer,
    mysql_opts,
};
use mysql_async::{Conn, prelude::*};

/// A directory of the test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(common::unique("mrte-test-rec-"));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sessions that each insert rows of 2 KiB: well over 1 MiB in all.
async fn workload(server: &TestServer, sessions: u32, rows: u32) {
    let mut tasks = Vec::new();
    for k in 0..sessions {
        let opts = mysql_opts(server.addr());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::new(opts).await.unwrap();
            for i in 0..rows {
                let body = format!("{k}-{i}-").repeat(2048 / 6);
                c.query_drop(format!(
                    "INSERT INTO rec.t VALUES ({}, '{body}')",
                    k * 100_000 + i
                ))
                .await
                .unwrap();
            }
            c.disconnect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Per client port, the units' data in order.
fn sessions(messages: &[Vec<u8>]) -> HashMap<u16, Vec<Vec<u8>>> {
    let mut out: HashMap<u16, Vec<Vec<u8>>> = HashMap::new();
    for m in messages {
        for u in collector::encode::decode_message(m).unwrap().units {
            out.entry(u.port).or_default().push(u.data);
        }
    }
    out
}

fn data(received: Vec<Received>) -> Vec<Vec<u8>> {
    received.into_iter().map(|r| r.data).collect()
}

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new(binary()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_published_later_equals_the_live_publish() {
    let server = TestServer::start(&[]);
    server.root_sql("CREATE DATABASE rec; CREATE TABLE rec.t (id INT PRIMARY KEY, body TEXT)");
    let dir = Dir::new();
    let path = dir.0.join("capture.mrte");
    let live = TestExchange::new("rec_live");

    let mut args = local_server_args(server.port, &live.exchange);
    args.push(format!("--output=rabbitmq,file:{}", path.display()));
    args.push("--output_file_mb=1".into());
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    workload(&server, 4, 200).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = agent.stop();
    let t = totals(&out);
    let live_messages = data(live.take_all());
    assert_eq!(t["published_msgs"], live_messages.len() as u64, "{out}");
    assert_eq!(t["recorded_msgs"], t["published_msgs"], "{out}");
    assert_eq!(t.printed("PacketDropped"), Some(0), "{out}");
    // Cut into files of 1 MiB at most.
    let parts: Vec<PathBuf> = (0..)
        .map(|i| collector::recording::part(&path, i))
        .take_while(|p| p.exists())
        .collect();
    assert!(parts.len() >= 2, "{parts:?}");
    let sizes: u64 = parts.iter().map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!(sizes, t["recorded_bytes"]);
    assert!(parts.iter().all(|p| p.metadata().unwrap().len() <= 1 << 20));

    // Published later to a fresh exchange and queue.
    let later = TestExchange::named("rec_later");
    let path_arg = path.display().to_string();
    let queue_arg = format!("--rabbitmq_queue={}", later.queue);
    let exchange_arg = format!("--rabbitmq_exchange_name={}", later.exchange);
    let publish = [
        "publish-file",
        &path_arg,
        &exchange_arg,
        "--rabbitmq_declare",
        &queue_arg,
        "--rabbitmq_confirm",
    ];
    let printed = run(&publish);
    assert!(
        String::from_utf8_lossy(&printed.stdout)
            .contains(&format!("published {} messages", live_messages.len())),
        "{}",
        String::from_utf8_lossy(&printed.stdout)
    );
    let later_messages = data(later.take_all());
    // The same messages, byte for byte (the queue interleaves the live publishers'
    // channels in its own order), and every session's units in the same order.
    let (mut a, mut b) = (live_messages.clone(), later_messages.clone());
    a.sort();
    b.sort();
    assert!(a == b, "different messages");
    let (live_sessions, later_sessions) = (sessions(&live_messages), sessions(&later_messages));
    assert_eq!(live_sessions.len(), 4);
    assert!(live_sessions == later_sessions, "different session streams");

    // To an exchange no queue is bound to: the broker returns every message, an error.
    let unbound = TestExchange::unbound("rec_unbound");
    let out = Command::new(binary())
        .args([
            "publish-file",
            &path_arg,
            &format!("--rabbitmq_exchange_name={}", unbound.exchange),
            "--rabbitmq_confirm",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "routed {} of {0} messages to no queue",
            live_messages.len()
        )),
        "{stderr}"
    );

    // inspect reads the recording, and the same from the queue.
    let from_file = String::from_utf8(run(&["inspect", "--from_file", &path_arg]).stdout).unwrap();
    let inserts = from_file
        .lines()
        .filter(|l| l.contains("COM_QUERY INSERT INTO rec.t"))
        .count();
    assert_eq!(inserts, 800, "{from_file}");
    run(&publish);
    let mut from_queue = Agent::start(&["inspect", "--from_queue", &later.queue]);
    let want = from_file.lines().count();
    let start = std::time::Instant::now();
    let stdout = from_queue.take_stdout_lines();
    while stdout.lock().unwrap().len() < want {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "inspect --from_queue too slow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    from_queue.stop();
    let from_queue = stdout.lock().unwrap().clone();
    // One publisher's messages in the same order: each session's lines in the same order.
    let per_session = |lines: Vec<&str>| {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for l in lines {
            let (client, rest) = l.split_once(' ').unwrap();
            m.entry(client.into()).or_default().push(rest.into());
        }
        m
    };
    assert!(
        per_session(from_file.lines().collect())
            == per_session(from_queue.iter().map(String::as_str).collect()),
        "inspect --from_queue differs from --from_file"
    );
}

#[test]
fn a_recording_needs_no_broker_and_is_never_overwritten() {
    let server = TestServer::start(&[]);
    server.root_sql("CREATE DATABASE rec; CREATE TABLE rec.t (id INT PRIMARY KEY, body TEXT)");
    let dir = Dir::new();
    let path = dir.0.join("only-file.mrte");
    let file_arg = format!("--output=file:{}", path.display());
    let port = server.port.to_string();
    // Nothing listens on port 1: the agent must not try the broker.
    let mut agent = Agent::start(&[
        "--interface=lo",
        "--port",
        &port,
        "--mysql_port",
        &port,
        "--rabbitmq_port=1",
        &file_arg,
        "--read_timeout=20",
    ]);
    agent.wait_attached();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(workload(&server, 2, 5));
    std::thread::sleep(Duration::from_millis(300));
    let out = agent.stop();
    let t = totals(&out);
    assert!(t["recorded_msgs"] > 0, "{out}");
    assert_eq!(t["published_msgs"], t["recorded_msgs"], "{out}");
    assert_eq!(t.printed("mq_errors"), None, "{out}");
    let shown =
        String::from_utf8(run(&["inspect", "--from_file", &path.display().to_string()]).stdout)
            .unwrap();
    assert_eq!(
        shown
            .lines()
            .filter(|l| l.contains("COM_QUERY INSERT"))
            .count(),
        10,
        "{shown}"
    );

    // The file exists now: refused before anything is attached.
    fails_before_attaching(
        &[
            "--interface=lo",
            "--port",
            &port,
            "--mysql_port",
            &port,
            &file_arg,
        ],
        &[],
        &["exists", "never overwritten"],
    );
}

/// Neither the recording's disk nor the host's socket table stalls the drain: with the
/// recording going to a FIFO whose reader stops for 2 s at a time, and 50,000 other TCP
/// sockets on the host while the bootstrap reads the socket table every second, a load that
/// fills the 1 MiB ring within a fraction of one such stall loses nothing (`ring_full` 0),
/// and every query is in the recording, each session's in order.
#[test]
fn a_stalled_recording_and_50000_sockets_do_not_stall_the_drain() {
    // 50,000 sockets: connections between loopback listeners of 4 processes of their own
    // (a process may hold 20,000 files here).
    let held = SocketHolders::start(4, 6_250);
    let server = TestServer::start(&[]);
    let dir = Dir::new();
    let fifo = dir.0.join("recording.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let load_on = Arc::new(AtomicBool::new(false));
    let stalls_under_load = Arc::new(AtomicU64::new(0));
    let reader = std::thread::spawn({
        let (fifo, load_on, stalls) = (fifo.clone(), load_on.clone(), stalls_under_load.clone());
        move || {
            let mut f = std::fs::File::open(&fifo).unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut reading_since = Instant::now();
            loop {
                match std::io::Read::read(&mut f, &mut buf).unwrap() {
                    0 => break got,
                    n => got.extend_from_slice(&buf[..n]),
                }
                if reading_since.elapsed() > Duration::from_millis(300) {
                    if load_on.load(Ordering::Relaxed) {
                        stalls.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_secs(2));
                    reading_since = Instant::now();
                }
            }
        }
    });

    let port = server.port.to_string();
    let fifo_arg = format!("--output=file:{}", fifo.display());
    let mut agent = Agent::start(&[
        "--interface=lo",
        "--port",
        &port,
        "--mysql_port",
        &port,
        &fifo_arg,
        "--ring_buffer_mb=1",
        "--gc_interval=1",
    ]);
    agent.wait_attached();
    load_on.store(true, Ordering::Relaxed);
    let sent = tokio::runtime::Runtime::new().unwrap().block_on(timed_load(
        &server,
        4,
        Duration::from_secs(8),
    ));
    load_on.store(false, Ordering::Relaxed);
    let reads = agent.log.lock().unwrap().matches("pass=Gc").count();
    let out = agent.stop();
    let stream = reader.join().unwrap();
    drop(held);

    let t = totals(&out);
    let queries: usize = sent.values().map(Vec::len).sum();
    assert!(
        stalls_under_load.load(Ordering::Relaxed) >= 2,
        "the reader did not stall under load"
    );
    assert!(reads >= 4, "{reads} socket table reads under load:\n{out}");
    assert_eq!(t["ring_full"], 0, "{queries} queries:\n{out}");
    assert_eq!(t.printed("PacketDropped"), Some(0), "{out}");
    assert_eq!(t["record_errors"], 0, "{out}");
    assert_eq!(t["socket_table_errors"], 0, "{out}");
    assert_eq!(t["recorded_msgs"], t["published_msgs"], "{out}");
    // The stream as written: every session's queries, in order.
    let mut got: HashMap<u16, Vec<String>> = HashMap::new();
    let mut at = 0;
    while at < stream.len() {
        let len = u32::from_be_bytes(stream[at..at + 4].try_into().unwrap()) as usize;
        let message = &stream[at + 4..at + 4 + len];
        at += 4 + len;
        for u in collector::encode::decode_message(message).unwrap().units {
            if let Some(q) = u.data.get(5..).filter(|_| u.data.get(4) == Some(&3)) {
                let q = String::from_utf8_lossy(q).into_owned();
                if q.starts_with("SELECT 'load") {
                    got.entry(u.port).or_default().push(q);
                }
            }
        }
    }
    assert_eq!(t["recorded_bytes"], stream.len() as u64, "{out}");
    let (mut want, mut have): (Vec<_>, Vec<_>) =
        (sent.into_values().collect(), got.into_values().collect());
    want.sort();
    have.sort();
    assert_eq!(want.len(), have.len(), "sessions");
    assert!(
        want == have,
        "the recording differs from the queries sent ({queries})"
    );
}

/// Processes that each hold `connections` loopback connections (2 sockets each) to listeners
/// of their own, until dropped.
struct SocketHolders(Vec<std::process::Child>);

impl SocketHolders {
    fn start(processes: usize, connections: usize) -> Self {
        const HOLD: &str = r#"
import socket, sys, resource
n = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listeners = [socket.create_server(("127.0.0.1", 0), backlog=4096) for _ in range(4)]
held = []
for i in range(n):
    l = listeners[i % 4]
    c = socket.create_connection(l.getsockname())
    held += [c, l.accept()[0]]
print("ready", len(held), flush=True)
sys.stdin.read()
"#;
        // Killed on drop, also when a holder fails to start.
        let mut holders = Self(Vec::new());
        holders.0 = (0..processes)
            .map(|_| {
                Command::new("python3")
                    .args(["-c", HOLD, &connections.to_string()])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in &mut holders.0 {
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(c.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(line.trim(), format!("ready {}", 2 * connections));
        }
        holders
    }
}

impl Drop for SocketHolders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `sessions` clients, each querying as fast as it can for `secs`; the queries of each, in
/// the order sent, by client port.
async fn timed_load(
    server: &TestServer,
    sessions: u32,
    secs: Duration,
) -> HashMap<u16, Vec<String>> {
    let end = Instant::now() + secs;
    let mut tasks = Vec::new();
    for k in 0..sessions {
        let opts = mysql_opts(server.addr());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::new(opts).await.unwrap();
            let port: u16 = c
                .query_first::<u16, _>(
                    "SELECT SUBSTRING_INDEX(HOST, ':', -1) FROM information_schema.PROCESSLIST \
                     WHERE ID = CONNECTION_ID()",
                )
                .await
                .unwrap()
                .unwrap();
            let mut sent = Vec::new();
            let mut i = 0u64;
            while Instant::now() < end {
                let q = format!("SELECT 'load-{k}-{i}'");
                c.query_drop(&q).await.unwrap();
                sent.push(q);
                i += 1;
            }
            c.disconnect().await.unwrap();
            (port, sent)
        }));
    }
    let mut out = HashMap::new();
    for t in tasks {
        let (port, sent) = t.await.unwrap();
        out.insert(port, sent);
    }
    out
}
