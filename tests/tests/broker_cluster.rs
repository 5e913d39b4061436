//! Broker failover: a three-node RabbitMQ cluster of the test's own on this machine (each node
//! its own name, AMQP and distribution ports, and data directory; joined to the first), a
//! quorum queue, and an agent given the three nodes (`--rabbitmq_host a,b,c`). Four sessions
//! send a query every millisecond while the first node's application is stopped: the agent
//! moves to the second node (`mq_failovers`) and stays up; when the first node is started
//! again it moves back (`mq_failbacks`) without losing anything. Every session is in order,
//! with a jump only right after a COM_QUIT of the agent's, and every loss is counted.

mod common;

use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use collector::encode::COM_QUIT;
use common::{Sink, agent::Agent, check_ended_at_losses, numbered_query};
use futures_util::StreamExt as _;
use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

const SESSIONS: usize = 4;

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rabbitmqctl(node: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "-n", node])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl -n {node} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

struct Node {
    name: String,
    port: u16,
}

/// The cluster; every node is stopped and its directory removed on drop (also when the test
/// fails).
struct Cluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl Cluster {
    fn start(n: usize) -> Self {
        let tag = common::unique("mrtec");
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for i in 0..n {
            let node = Node {
                name: format!("{tag}n{i}@localhost"),
                port: free_port(),
            };
            let home = cluster.dir.join(format!("n{i}"));
            std::fs::create_dir_all(home.join("mnesia")).unwrap();
            std::fs::create_dir_all(home.join("log")).unwrap();
            // The server drops to the rabbitmq user, which must own its directories.
            common::sh(&[
                "chown",
                "-R",
                "rabbitmq:rabbitmq",
                &home.display().to_string(),
            ]);
            let path = |p: &str| home.join(p).display().to_string();
            let started = Command::new("rabbitmq-server")
                .arg("-detached")
                .env("RABBITMQ_NODENAME", &node.name)
                .env("RABBITMQ_NODE_PORT", node.port.to_string())
                .env("RABBITMQ_DIST_PORT", free_port().to_string())
                .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
                .env("RABBITMQ_LOG_BASE", path("log"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("plugins"))
                .env("RABBITMQ_PID_FILE", path("pid"))
                .env("RABBITMQ_FEATURE_FLAGS_FILE", path("feature_flags"))
                .status()
                .unwrap();
            assert!(started.success(), "starting {}", node.name);
            let name = node.name.clone();
            cluster.nodes.push(node);
            cluster.await_node(&name);
            if i > 0 {
                let first = cluster.nodes[0].name.clone();
                for args in [
                    vec!["stop_app"],
                    vec!["join_cluster", first.as_str()],
                    vec!["start_app"],
                ] {
                    rabbitmqctl(&name, &args).unwrap();
                }
                cluster.await_node(&name);
            }
        }
        cluster
    }

    /// Until the node's application runs and takes AMQP connections (a node takes seconds to
    /// boot; it keeps being asked while it makes progress, up to 3 minutes).
    fn await_node(&self, name: &str) {
        let start = Instant::now();
        loop {
            if rabbitmqctl(name, &["await_startup", "--timeout", "10"]).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "RabbitMQ node {name} did not start; its log: {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn uri(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    fn hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in self.nodes.iter().rev() {
            let _ = rabbitmqctl(&n.name, &["stop"]);
        }
        // A node that did not stop: by its pid file.
        for i in 0..self.nodes.len() {
            let pid = self.dir.join(format!("n{i}/pid"));
            if let Ok(pid) = std::fs::read_to_string(pid) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(uri: &str) -> Connection {
    Connection::connect(uri, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("{uri}: {e}"))
}

/// A client that sends a query every millisecond until told to stop, then its COM_QUIT.
fn load_session(
    addr: std::net::SocketAddr,
    s: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u16, u32)> {
    std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_nodelay(true).unwrap();
        let port = c.local_addr().unwrap().port();
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            c.write_all(&numbered_query(s, sent)).unwrap();
            sent += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        c.write_all(&COM_QUIT).unwrap();
        (port, sent)
    })
}

/// The totals of the last JSON status line.
fn last_totals(lines: &std::sync::Mutex<Vec<String>>) -> Option<serde_json::Value> {
    let lines = lines.lock().unwrap();
    lines
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("totals").cloned())
}

fn get(t: &serde_json::Value, k: &str) -> u64 {
    t.get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no {k} in {t}"))
}

/// Until `done` holds of the last status line's totals, within `secs`.
async fn wait_totals(
    lines: &std::sync::Mutex<Vec<String>>,
    secs: u64,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(t) = last_totals(lines)
            && done(&t)
        {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: {:?}",
            last_totals(lines)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_moves_to_the_next_node_and_back_and_loses_nothing_it_does_not_count() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(3));
    let exchange = common::unique("mrte_cluster_");
    let queue = format!("{exchange}_q");
    {
        let conn = connect(&cluster.uri(0)).await;
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        conn.close(200, "".into()).await.unwrap();
    }

    let sink = Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let mut agent = Agent::start(&[
        "--interface=lo",
        &format!("--port={}", sink.addr.port()),
        &format!("--rabbitmq_host={}", cluster.hosts()),
        &format!("--rabbitmq_exchange_name={exchange}"),
        "--rabbitmq_timeout=3",
        "--mysql_optional",
        "--mysql_port=1",
        "--status_interval=1",
        "--status_format=json",
    ]);
    let lines = agent.take_stdout_lines();
    agent.wait_attached();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..SESSIONS)
        .map(|s| load_session(sink.addr, s, stop.clone()))
        .collect();
    wait_totals(&lines, 30, "publishing to the first node", |t| {
        get(t, "published_units") > 1000
    })
    .await;

    // The first node's application stops: its connections close, and it takes no new one.
    let first = cluster.nodes[0].name.clone();
    tokio::task::block_in_place(|| rabbitmqctl(&first, &["stop_app"]).unwrap());
    let moved = wait_totals(&lines, 60, "moving to another node", |t| {
        get(t, "mq_failovers") >= 1
    })
    .await;
    let published = get(&moved, "published_units");
    wait_totals(&lines, 60, "publishing on the second node", |t| {
        get(t, "published_units") > published + 1000
    })
    .await;

    // Back: the agent moves back within its check interval, and loses nothing doing so.
    let before_back = last_totals(&lines).unwrap();
    tokio::task::block_in_place(|| {
        rabbitmqctl(&first, &["start_app"]).unwrap();
        cluster.await_node(&first);
    });
    let back = wait_totals(&lines, 60, "moving back to the first node", |t| {
        get(t, "mq_failbacks") >= 1
    })
    .await;
    let published = get(&back, "published_units");
    wait_totals(&lines, 60, "publishing on the first node again", |t| {
        get(t, "published_units") > published + 1000
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let load: Vec<(u16, u32)> =
        tokio::task::block_in_place(|| load.into_iter().map(|t| t.join().unwrap()).collect());
    // Until every session's COM_QUIT is published (read_timeout flushes the last batches).
    wait_totals(&lines, 60, "the sessions' ends", |t| {
        let lost: u64 = [
            "mq_error_units",
            "mq_in_flight_units",
            "mq_unroutable_units",
            "mq_lost_skipped",
            "queue_full",
            "mem_limit",
        ]
        .iter()
        .map(|k| get(t, k))
        .sum();
        get(t, "batched_units") + get(t, "mq_lost_sessions") == get(t, "published_units") + lost
            && get(t, "queued_bytes") == 0
    })
    .await;
    // And nothing more comes (a batch leaves within --read_timeout, 100 ms).
    let mut last = (
        get(&last_totals(&lines).unwrap(), "published_units"),
        Instant::now(),
    );
    while last.1.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = get(&last_totals(&lines).unwrap(), "published_units");
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let log = agent.stop();
    let t = last_totals(&lines).unwrap();
    let all = format!("{t}\n{log}");
    assert!(get(&t, "mq_failovers") >= 1, "{all}");
    assert!(get(&t, "mq_failbacks") >= 1, "{all}");
    assert!(log.contains("RabbitMQ node answers again"), "{all}");
    // The move back lost nothing: no session was ended for a loss after it began.
    for k in ["mq_lost_sessions", "mq_in_flight_units", "mq_error_units"] {
        assert_eq!(
            get(&t, k),
            get(&before_back, k),
            "{k} grew in the move back: {all}"
        );
    }

    // Everything the queue holds, from the third node (the queue is replicated).
    let mut streams: HashMap<u16, Vec<u8>> = HashMap::new();
    let mut units = 0u64;
    {
        let conn = connect(&cluster.uri(2)).await;
        let ch = conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
        {
            for u in collector::encode::decode_message(&d.data).unwrap().units {
                units += 1;
                streams.entry(u.port).or_default().extend(u.data);
            }
        }
        let _ = conn.close(200, "".into()).await;
    }
    let unknown = get(&t, "mq_in_flight_units");
    assert!(
        get(&t, "published_units") <= units && units <= get(&t, "published_units") + unknown,
        "{units} units in the queue: {all}"
    );
    let mut quits = 0;
    for (s, &(port, sent)) in load.iter().enumerate() {
        let got = common::numbered_commands(&streams[&port], s);
        quits += check_ended_at_losses(&got, sent, &format!("session {s}"));
    }
    assert!(quits <= get(&t, "mq_lost_sessions"), "{all}");
    eprintln!(
        "failovers {}, failbacks {}, units published {}, lost in flight {unknown}, sessions \
         ended at a loss {quits}",
        get(&t, "mq_failovers"),
        get(&t, "mq_failbacks"),
        get(&t, "published_units"),
    );
    drop(sink);
}
