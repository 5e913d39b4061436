//! Session bootstrap and garbage collection against the real MariaDB and RabbitMQ: sessions
//! open before the collector started get exactly one COM_INIT_DB with their database, ahead of
//! everything captured from them; a session that vanishes gets a COM_QUIT.

mod common;

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use collector::encode::{COM_QUIT, Unit, com_init_db};
use common::{
    agent::{Agent, fails_before_attaching, local_server_args, totals},
    broker::TestExchange,
    mariadb::TestServer,
    *,
};
use mysql_async::prelude::*;
use nix::sys::signal::Signal;

/// Opens a session through the relay and returns it with the relay port the server sees.
async fn open(relay: &Relay, db: Option<&str>, use_db: Option<&str>) -> (mysql_async::Conn, u16) {
    let before: Vec<u16> = relay.sent.lock().unwrap().keys().copied().collect();
    let opts = mysql_async::OptsBuilder::from_opts(mysql_opts(relay.addr)).db_name(db);
    let mut conn = mysql_async::Conn::new(opts).await.unwrap();
    if let Some(db) = use_db {
        conn.query_drop(format!("USE {db}")).await.unwrap();
    }
    let port = relay
        .sent
        .lock()
        .unwrap()
        .keys()
        .copied()
        .find(|p| !before.contains(p))
        .unwrap();
    (conn, port)
}

async fn database(conn: &mut mysql_async::Conn) -> Option<String> {
    conn.query_first("SELECT DATABASE()")
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_open_before_capture_get_their_database_first_and_a_quit_when_gone() {
    let mq = TestExchange::new("boot");
    let mut admin = mysql_async::Conn::new(mysql_opts(MYSQL_ADDR.parse().unwrap()))
        .await
        .unwrap();
    for db in ["mrte_boot_a", "mrte_boot_b"] {
        admin
            .query_drop(format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .await
            .unwrap();
    }
    let relay = Relay::start(MYSQL_ADDR.parse().unwrap()).await;

    // Before the collector: databases named at connect (CONNECT_WITH_DB) and with USE, a
    // session without a database, and one that will be killed.
    let mut pre = Vec::new();
    for i in 0..3 {
        pre.push((
            open(&relay, Some("mrte_boot_a"), None).await,
            "mrte_boot_a",
            i,
        ));
        pre.push((
            open(&relay, None, Some("mrte_boot_b")).await,
            "mrte_boot_b",
            i,
        ));
    }
    let (mut no_db, no_db_port) = open(&relay, None, None).await;
    let (mut doomed, doomed_port) = open(&relay, Some("mrte_boot_a"), None).await;
    let doomed_id: u64 = doomed
        .query_first("SELECT CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    let sent_before: HashMap<u16, usize> = relay
        .sent
        .lock()
        .unwrap()
        .iter()
        .map(|(p, s)| (*p, s.len()))
        .collect();

    let mut agent = Agent::start(&[
        "--interface=lo",
        "--port=3306",
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--gc_interval=1",
        "--bootstrap_second_pass_ms=300",
        "--read_timeout=20",
    ]);
    agent.wait_attached();

    // Used at once: the bootstrap must still come first.
    for ((conn, _), db, i) in &mut pre {
        assert_eq!(database(conn).await.as_deref(), Some(*db));
        conn.query_drop(format!("CREATE TABLE IF NOT EXISTS t{i} (v INT)"))
            .await
            .unwrap();
        conn.query_drop(format!("INSERT INTO t{i} VALUES ({i})"))
            .await
            .unwrap();
    }
    assert_eq!(database(&mut no_db).await, None);
    // A session opened while capturing: its handshake says its database.
    let (mut fresh, fresh_port) = open(&relay, Some("mrte_boot_b"), None).await;
    assert_eq!(database(&mut fresh).await.as_deref(), Some("mrte_boot_b"));
    // A session that vanishes without a COM_QUIT of its own.
    admin
        .query_drop(format!("KILL CONNECTION {doomed_id}"))
        .await
        .unwrap();
    // Two GC passes: the second began after the kill.
    agent.wait_log_more("pass=Gc", 2).await;

    let stdout = agent.stop();
    let units = mq.units_by_port();
    assert!(
        units
            .values()
            .flatten()
            .all(|u| u.ip == Ipv4Addr::LOCALHOST)
    );
    let sent = relay.sent.lock().unwrap().clone();
    let rest = |port: u16, from: usize| -> Vec<u8> {
        units[&port][from..]
            .iter()
            .flat_map(|u| u.data.clone())
            .collect()
    };
    let is_init_db = |u: &Unit| u.data.len() > 5 && u.data[3] == 0 && u.data[4] == 2;
    for ((_, port), db, _) in &pre {
        let us = &units[port];
        assert_eq!(
            us[0].data,
            com_init_db(db.as_bytes()),
            "port {port}: first unit"
        );
        assert_eq!(
            us.iter().filter(|u| is_init_db(u)).count(),
            1,
            "port {port}"
        );
        assert!(
            rest(*port, 1) == sent[port][sent_before[port]..],
            "port {port}: the rest is what the client sent while captured"
        );
    }
    assert!(!units[&no_db_port].iter().any(is_init_db));
    assert!(rest(no_db_port, 0) == sent[&no_db_port][sent_before[&no_db_port]..]);
    assert!(!units[&fresh_port].iter().any(is_init_db));
    assert!(
        rest(fresh_port, 0) == sent[&fresh_port],
        "the handshake included"
    );
    let doomed_units: Vec<Vec<u8>> = units[&doomed_port].iter().map(|u| u.data.clone()).collect();
    assert_eq!(
        doomed_units,
        vec![com_init_db(b"mrte_boot_a"), COM_QUIT.to_vec()],
        "the killed session: its database, then its end"
    );

    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert_eq!(get("bootstrap_units"), 7, "{stdout}");
    assert!(get("gc_quits") >= 1, "{stdout}");
    assert!(
        get("own_traffic") >= 1,
        "the process-list reads were seen and left out"
    );
    assert_eq!(get("mysql_errors"), 0, "{stdout}");
    assert_eq!(get("hold_overflow"), 0, "{stdout}");
    drop(pre);
    drop((no_db, fresh, doomed));
}

/// A MariaDB user of the test's own without the PROCESS privilege, dropped on drop.
struct NoProcessUser(String);

impl NoProcessUser {
    fn new() -> Self {
        let name = unique("mrte_noproc_");
        sh(&[
            "mariadb",
            "-e",
            &format!("CREATE USER '{name}'@'localhost' IDENTIFIED BY 'p'"),
        ]);
        Self(name)
    }
}

impl Drop for NoProcessUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("mariadb")
            .args([
                "-e",
                &format!("DROP USER IF EXISTS '{}'@'localhost'", self.0),
            ])
            .output();
    }
}

/// PROCESS however the server grants it. Through a role (nested, enabled by default) the
/// agent sees another user's session; a user whose name merely contains "process", or whose
/// role is not enabled, is refused (its process list really is limited); a server without
/// grant tables lets any user read the whole list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_privilege_counts_however_the_server_grants_it() {
    let mut server = TestServer::start(&[]);
    server.root_sql(
        "CREATE DATABASE mrte_priv; CREATE TABLE mrte_priv.t (v INT);
         CREATE ROLE mrte_mon; GRANT PROCESS ON *.* TO mrte_mon;
         CREATE ROLE mrte_ops; GRANT mrte_mon TO mrte_ops;
         CREATE USER 'via_role'@'localhost' IDENTIFIED BY 'p';
         GRANT mrte_ops TO 'via_role'@'localhost';
         SET DEFAULT ROLE mrte_ops FOR 'via_role'@'localhost';
         CREATE USER 'role_off'@'localhost' IDENTIFIED BY 'p';
         GRANT mrte_ops TO 'role_off'@'localhost';
         CREATE USER 'processor'@'localhost' IDENTIFIED BY 'p';",
    );
    let mq = TestExchange::new("priv");
    let port = server.port;
    let args = |user: &str| {
        let mut a = local_server_args(port, &mq.exchange);
        a.push(format!("--mysql_user={user}"));
        a.push("--mysql_password=p".into());
        a
    };
    for user in ["processor", "role_off"] {
        let a = args(user);
        fails_before_attaching(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
            &["lacks the PROCESS privilege", "GRANT PROCESS"],
        );
    }

    // Another user's session with a database, open before capture: the bootstrap finds it.
    let opts = mysql_async::OptsBuilder::from_opts(server.opts()).db_name(Some("mrte_priv"));
    let mut other = mysql_async::Conn::new(opts).await.unwrap();
    let a = args("via_role");
    let mut agent = Agent::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    other.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
    agent.wait_log("pass=Second").await;
    let stdout = tokio::task::block_in_place(|| agent.stop());
    let t = totals(&stdout);
    assert_eq!(t["bootstrap_units"], 1, "{stdout}");
    assert_eq!(t["mysql_errors"], 0, "{stdout}");
    drop(other);

    // No grant tables: any user, any password, and a warning of what it costs.
    tokio::task::block_in_place(|| server.restart_with(&["--skip-grant-tables"], Duration::ZERO));
    let a = args("anyone");
    let mut agent = Agent::start(&a.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    let log = agent.log.clone();
    let stdout = tokio::task::block_in_place(|| agent.stop());
    assert_eq!(totals(&stdout)["mysql_errors"], 0, "{stdout}");
    let log = log.lock().unwrap();
    assert!(log.contains("--skip-grant-tables"), "{log}");
}

#[test]
fn mysql_problems_stop_the_agent_before_it_attaches_unless_optional() {
    let mq = TestExchange::new("bootbad");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    fails_before_attaching(
        &[
            "--interface=lo",
            &exchange,
            "--mysql_user=mrte",
            "--mysql_password=wrong",
        ],
        &[],
        &[
            "cannot connect to MySQL",
            "--mysql_password",
            "--mysql_optional",
        ],
    );
    let user = NoProcessUser::new();
    fails_before_attaching(
        &[
            "--interface=lo",
            &exchange,
            &format!("--mysql_user={}", user.0),
            "--mysql_password=p",
        ],
        &[],
        &["lacks the PROCESS privilege", "GRANT PROCESS"],
    );

    // Optional: the agent runs, counts the failed retries and captures meanwhile.
    let mut agent = Agent::start(&[
        "--interface=lo",
        &exchange,
        "--mysql_password=wrong",
        "--mysql_optional",
        "--status_interval=1",
    ]);
    let lines = agent.take_stdout_lines();
    agent.wait_attached();
    let log = agent.log.clone();
    // Two failed retries (each counted), and a status line (its header names the column).
    while agent.log_count("retrying in") < 2 {
        agent.wait_log_more_blocking("retrying in", 1);
    }
    common::agent::wait_stdout_line(&lines, 0, 60, |l| l.starts_with("DateTime"));
    agent.signal(Signal::SIGINT);
    let out = agent.wait();
    let stdout = lines.lock().unwrap().join("\n");
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("MySQLError"), "{stdout}");
    assert!(totals(&stdout)["mysql_errors"] >= 2, "{stdout}");
    let log = log.lock().unwrap();
    assert!(
        log.contains("--mysql_optional"),
        "the warning names the flag: {log}"
    );
}

/// The address a session's process-list row gives (`localhost:PORT` here): its client port.
fn port_of(host: &str) -> u16 {
    host.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_connections_are_neither_bootstrapped_nor_closed() {
    let mq = TestExchange::new("bootrepl");
    let server = TestServer::start(&[]);
    server.root_sql("CREATE DATABASE mrte_repl; CREATE TABLE mrte_repl.t (v INT)");
    let with_db = || mysql_async::OptsBuilder::from_opts(server.opts()).db_name(Some("mrte_repl"));

    // A replica-like client that has a default database, so a bootstrap that did not
    // recognise it would announce it; and an ordinary client as the control.
    let replica = mysql_async::Conn::new(with_db()).await.unwrap();
    let stream = replica
        .get_binlog_stream(mysql_async::BinlogStreamRequest::new(
            server.server_id + 1000,
        ))
        .await
        .unwrap();
    let mut client = mysql_async::Conn::new(with_db()).await.unwrap();
    let client_port = port_of(
        &client
            .query_first::<String, _>(
                "SELECT host FROM information_schema.processlist WHERE id = CONNECTION_ID()",
            )
            .await
            .unwrap()
            .unwrap(),
    );
    let (replica_id, replica_host, replica_db): (u64, String, Option<String>) = client
        .query_first(
            "SELECT id, host, db FROM information_schema.processlist \
             WHERE command LIKE 'Binlog Dump%'",
        )
        .await
        .unwrap()
        .expect("the binlog dump shows in the process list");
    assert_eq!(replica_db.as_deref(), Some("mrte_repl"));

    let args = local_server_args(server.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    client.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
    // The bootstrap's passes have seen the replica: a GC pass (they come after the first).
    agent.wait_log_more("pass=Gc", 1).await;
    // The replica goes away: it was never a replayed session, so it gets no COM_QUIT.
    client
        .query_drop(format!("KILL CONNECTION {replica_id}"))
        .await
        .unwrap();
    // Two GC passes: the second began after the kill.
    agent.wait_log_more("pass=Gc", 2).await;
    client.query_drop("INSERT INTO t VALUES (2)").await.unwrap();

    let stdout = agent.stop();
    let units = mq.units_by_port();
    assert!(
        !units.contains_key(&port_of(&replica_host)),
        "nothing published for the replica: {:?}",
        units.get(&port_of(&replica_host))
    );
    assert_eq!(units[&client_port][0].data, com_init_db(b"mrte_repl"));
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert_eq!(get("replication_skipped"), 1, "{stdout}");
    assert_eq!(get("gc_quits"), 0, "{stdout}");
    assert_eq!(get("bootstrap_units"), 1, "{stdout}");
    drop(stream);
}

/// The client port of `conn`'s session, from its process-list row.
async fn own_port(conn: &mut mysql_async::Conn) -> u16 {
    let host: String = conn
        .query_first("SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()")
        .await
        .unwrap()
        .unwrap();
    port_of(&host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_restart_mid_run_is_survived_and_the_gc_ends_its_sessions() {
    let mut server = TestServer::start(&[]);
    server.root_sql("CREATE DATABASE mrte_restart");
    let mq = TestExchange::new("restart");
    let mut args = local_server_args(server.port, &mq.exchange);
    // A GC interval past the hold's 10 s limit: after reconnecting, the agent must read the
    // process list at once, not a GC interval later.
    args.retain(|a| !a.starts_with("--gc_interval"));
    args.push("--gc_interval=12".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&args);
    agent.wait_attached();

    // A session captured from its start, connected directly: the restart ends it on the
    // server, and its client never closes (no FIN): only the GC can end it.
    let opts = mysql_async::OptsBuilder::from_opts(server.opts()).db_name(Some("mrte_restart"));
    let mut a = mysql_async::Conn::new(opts.clone()).await.unwrap();
    a.query_drop("CREATE TABLE t (v INT)").await.unwrap();
    let a_port = own_port(&mut a).await;

    // Both bootstrap passes are done: the next read is the GC's, 12 s away...
    agent.wait_log("pass=Second").await;
    tokio::task::block_in_place(|| server.restart(Duration::from_secs(2)));
    // ...or the one SIGUSR1 asks for: the agent finds its connection dead and connects again.
    agent.signal(Signal::SIGUSR1);
    agent.wait_log("reconnecting").await;
    agent.wait_log("connected to MySQL").await;
    let reconnected = std::time::Instant::now();

    // The read right after reconnecting ends the session the restart ended.
    let quit_a = loop {
        let units = mq.units_by_port();
        if units
            .get(&a_port)
            .and_then(|u| u.last())
            .is_some_and(|u| u.data == COM_QUIT)
        {
            break units;
        }
        assert!(
            reconnected.elapsed() < Duration::from_secs(5),
            "no COM_QUIT for the session the restart ended: {:?}",
            agent.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Capture went on: a session after the restart is published exactly as sent.
    let relay = Relay::start(server.addr()).await;
    let b = mysql_async::Conn::new(
        mysql_async::OptsBuilder::from_opts(mysql_opts(relay.addr)).db_name(Some("mrte_restart")),
    )
    .await
    .unwrap();
    let mut b = b;
    b.query_drop("INSERT INTO t VALUES (1), (2)").await.unwrap();
    b.disconnect().await.unwrap();
    let sent = relay.sent_when_closed(1).await;
    let stdout = agent.stop();
    drop(a);

    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert!(get("mysql_errors") >= 1, "{stdout}");
    assert!(get("gc_quits") >= 1, "{stdout}");
    assert_eq!(get("hold_overflow"), 0, "{stdout}");
    assert!(
        get("own_traffic") >= 1,
        "the new connection of ours was seen: {stdout}"
    );
    let mut units = quit_a;
    for (port, more) in mq.units_by_port() {
        units.entry(port).or_default().extend(more);
    }
    let (b_port, b_sent) = sent.into_iter().next().unwrap();
    let b_stream: Vec<u8> = units[&b_port].iter().flat_map(|u| u.data.clone()).collect();
    assert_eq!(b_stream, b_sent, "the session after the restart, exactly");
    // Nothing else: neither of the agent's own connections (before and after the restart).
    let mut ports: Vec<u16> = units.keys().copied().collect();
    ports.sort();
    let mut expected = vec![a_port, b_port];
    expected.sort();
    let extra: Vec<_> = units
        .iter()
        .filter(|(p, _)| !expected.contains(p))
        .map(|(p, u)| {
            (
                p,
                u.iter()
                    .map(|u| String::from_utf8_lossy(&u.data).into_owned())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(ports, expected, "{extra:?} {stdout}");
}
