//! A real MariaDB replica of a test server, semi-synchronous on both sides, replicating while
//! clients run queries on the source: the clients' streams are published exactly, the replica's
//! traffic (its binlog dump, the semi-sync ACK after every transaction) is not, and the counters
//! say how much was kept out.

mod common;

use std::time::{Duration, Instant};

use collector::{encode::COM_QUIT, protocol::command};
use common::{
    Relay,
    agent::{Agent, local_server_args, totals},
    broker::TestExchange,
    mariadb::TestServer,
    mysql_opts,
};
use mysql_async::prelude::*;

/// The value of a status variable on `server`.
fn status(server: &TestServer, name: &str) -> u64 {
    let out = server.root_sql(&format!("SHOW GLOBAL STATUS LIKE '{name}'"));
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("{name}: {out:?}"))
        .parse()
        .unwrap()
}

/// Waits until `server`'s status variable `name` satisfies `ok`.
fn wait_status(server: &TestServer, name: &str, ok: impl Fn(u64) -> bool) {
    let start = Instant::now();
    while !ok(status(server, name)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} stayed at {}",
            status(server, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client port of the source's binlog dump connection.
fn dump_port(source: &TestServer) -> u16 {
    let host = source.root_sql(
        "SELECT host FROM information_schema.processlist WHERE command LIKE 'Binlog Dump%'",
    );
    host.trim()
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no binlog dump: {host:?}"))
        .1
        .parse()
        .unwrap()
}

/// Three client sessions through the relay, each 15 autocommit inserts: every commit waits
/// for the replica's semi-sync ACK.
async fn workload(relay: &Relay, round: u32) {
    let mut tasks = Vec::new();
    for c in 0..3 {
        let opts = mysql_async::OptsBuilder::from_opts(mysql_opts(relay.addr)).db_name(Some("app"));
        tasks.push(tokio::spawn(async move {
            let mut conn = mysql_async::Conn::new(opts).await.unwrap();
            for i in 0..15 {
                conn.query_drop(format!(
                    "INSERT INTO t (v) VALUES ('round {round} client {c} row {i}')"
                ))
                .await
                .unwrap();
            }
            conn.disconnect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semi_sync_replica_is_kept_out_and_counted() {
    let mq = TestExchange::new("semisync");
    let source = TestServer::start(&[
        "--rpl-semi-sync-master-enabled=ON",
        "--rpl-semi-sync-master-timeout=20000",
    ]);
    let replica = TestServer::start(&["--rpl-semi-sync-slave-enabled=ON"]);
    // Replication starts after the servers' own set-up (each created its test user itself).
    let pos = source.root_sql("SHOW MASTER STATUS");
    let mut pos = pos.split_whitespace();
    let (file, offset) = (pos.next().unwrap(), pos.next().unwrap());
    replica.root_sql(&format!(
        "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='mrte', \
         MASTER_PASSWORD='mrte', MASTER_LOG_FILE='{file}', MASTER_LOG_POS={offset}, \
         MASTER_USE_GTID=no; START SLAVE",
        source.port
    ));
    source.root_sql(
        "CREATE DATABASE app; CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v TEXT)",
    );
    wait_status(&source, "Rpl_semi_sync_master_clients", |n| n == 1);
    let first_dump = dump_port(&source);

    let relay = Relay::start(source.addr()).await;
    let args = local_server_args(source.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    // The inspect view next to the agent: it leaves replication in, and shows it.
    let source_port = source.port.to_string();
    let mut inspect = Agent::start(&[
        "inspect",
        "--interface=lo",
        "--port",
        &source_port,
        "--json",
    ]);
    let inspected = inspect.take_stdout_lines();
    inspect.wait_attached();
    let acked = status(&source, "Rpl_semi_sync_master_yes_tx");
    let got_ack = status(&source, "Rpl_semi_sync_master_get_ack");

    // The replica connected before capture: it only sends ACKs now.
    workload(&relay, 1).await;
    // It reconnects while captured: set-up queries, COM_REGISTER_SLAVE, COM_BINLOG_DUMP, ACKs.
    replica.root_sql("STOP SLAVE");
    wait_status(&source, "Rpl_semi_sync_master_clients", |n| n == 0);
    replica.root_sql("START SLAVE");
    wait_status(&source, "Rpl_semi_sync_master_clients", |n| n == 1);
    let second_dump = dump_port(&source);
    workload(&relay, 2).await;
    let sent = relay.sent_when_closed(6).await;
    // The replica has every row, and the source waited for its ACK on each commit.
    let rows = |s: &TestServer| s.root_sql("SELECT COUNT(*) FROM app.t").trim().to_owned();
    let start = Instant::now();
    while rows(&replica) != "90" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replica has {} rows",
            rows(&replica)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked = status(&source, "Rpl_semi_sync_master_yes_tx") - acked;
    assert!(acked >= 90, "{acked} transactions acknowledged");
    // A process-list pass that shows the reconnected replica (`replication_skipped`).
    agent.wait_log_more("pass=Gc", 1).await;
    // ACK packets the source read (each passed the capture before): one ACK may acknowledge
    // several commits that waited together, so this can be fewer than the transactions.
    let acks = status(&source, "Rpl_semi_sync_master_get_ack") - got_ack;
    assert!(acks > 0, "no ACK received");
    let stdout = agent.stop();
    inspect.stop();
    let lines: Vec<serde_json::Value> = inspected
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |c: &'static str| lines.iter().filter(move |l| l["command"] == c);
    // Every ACK decoded to the binlog file and a position; the reconnection's registration
    // and dump shown too.
    let shown_acks: Vec<_> = of("SEMI_SYNC_ACK").collect();
    assert!(
        shown_acks.len() as u64 >= acks,
        "{} of {acks} ACKs shown",
        shown_acks.len()
    );
    for a in &shown_acks {
        assert!(
            a["binlog_file"].as_str().unwrap().starts_with("bin."),
            "{a}"
        );
        assert!(a["binlog_pos"].as_u64().unwrap() > 4, "{a}");
    }
    assert_eq!(of("COM_REGISTER_SLAVE").count(), 1, "{lines:?}");
    assert_eq!(
        of("COM_BINLOG_DUMP")
            .chain(of("COM_BINLOG_DUMP_GTID"))
            .count(),
        1,
        "{lines:?}"
    );

    let units = mq.units_by_port();
    // The clients: exactly what they sent, nothing else.
    for (port, bytes) in &sent {
        let got: Vec<u8> = units
            .get(port)
            .unwrap_or_else(|| panic!("nothing published for client port {port}"))
            .iter()
            .flat_map(|u| u.data.clone())
            .collect();
        assert!(
            got == *bytes,
            "client port {port}: {} of {} bytes",
            got.len(),
            bytes.len()
        );
    }
    // The replica that was dumping before capture: nothing at all.
    assert!(
        !units.contains_key(&first_dump),
        "published for the replica's first connection: {:?}",
        units[&first_dump]
            .iter()
            .map(|u| u.data.len())
            .collect::<Vec<_>>()
    );
    // The new connection: its set-up queries (published before it showed itself a replica),
    // then a COM_QUIT; no replication command, no ACK.
    let second = units
        .get(&second_dump)
        .expect("the replica's set-up queries were published");
    assert_eq!(
        second.last().unwrap().data,
        COM_QUIT,
        "the replica's session ends"
    );
    let stream: Vec<u8> = second.iter().flat_map(|u| u.data.clone()).collect();
    let mut packets = collector::protocol::Packets::default();
    packets.push(&stream);
    while let Some(p) = packets.next_packet() {
        assert!(
            !(p.seq == 0
                && matches!(
                    p.payload.as_slice().first(),
                    Some(
                        &(command::REGISTER_SLAVE
                            | command::BINLOG_DUMP
                            | command::BINLOG_DUMP_GTID
                            | 0xef)
                    )
                )),
            "a replication packet was published: {:?}",
            &p.payload[..p.payload.len().min(16)]
        );
    }
    assert_eq!(packets.pending(), 0, "whole packets");
    // The replica, stopping, kills its dump thread on the source over a connection of its
    // own: that KILL is left out (the connection's login and COM_QUIT are harmless).
    let others: Vec<_> = units
        .iter()
        .filter(|(p, _)| !sent.contains_key(p) && **p != second_dump)
        .collect();
    assert!(others.len() <= 1, "{others:?}");
    for (_, units) in &others {
        for u in units.iter() {
            assert!(
                u.data.get(4) != Some(&command::QUERY),
                "a query of the replica's was published: {:?}",
                String::from_utf8_lossy(&u.data)
            );
        }
    }
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    // Every ACK the source received (23 bytes: header, 0xef, position, "bin.000001") was
    // seen and left out: the first connection's because the process list shows a replica
    // there, the second's because the flow saw it become one.
    assert!(get("semi_sync_acks") >= acks, "{acks} acks: {stdout}");
    assert!(
        get("replication_bytes") >= 23 * acks,
        "{acks} acks: {stdout}"
    );
    assert_eq!(get("replication_sessions"), 1, "{stdout}");
    assert!(get("replication_skipped") >= 2, "{stdout}");
    assert_eq!(get("replica_kills"), others.len() as u64, "{stdout}");
}
