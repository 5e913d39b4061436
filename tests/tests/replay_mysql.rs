//! End to end: a mixed workload on a MariaDB of the test's own, over sessions opened before
//! the collector started and sessions opened while it runs, is published to RabbitMQ;
//! a consumer replays the queue into a second MariaDB that started from the same schema, and
//! both servers end up with identical tables.

mod common;

use common::{
    agent::{Agent, local_server_args, totals},
    broker::TestExchange,
    mariadb::TestServer,
    replay::{dump, replay},
};
use mysql_async::{Conn, OptsBuilder, prelude::*};

const SCHEMA: &str = "
    CREATE DATABASE shop; CREATE DATABASE crm;
    CREATE TABLE shop.orders (id INT PRIMARY KEY, item VARCHAR(40), qty INT, note TEXT);
    CREATE TABLE shop.stock (item VARCHAR(40) PRIMARY KEY, n INT);
    INSERT INTO shop.stock VALUES ('apple', 1000), ('pear', 500);
    CREATE TABLE crm.notes (id INT PRIMARY KEY, body TEXT);";

/// One round of work for session `k` in whatever database it is in now: the statements name
/// no database, so they land in the wrong place (or fail) unless the replay knows the
/// session's database.
async fn work(conn: &mut Conn, k: u32, round: u32) {
    let db: Option<String> = conn
        .query_first("SELECT DATABASE()")
        .await
        .unwrap()
        .unwrap();
    let id = k * 1000 + round;
    match db.as_deref() {
        Some("shop") => {
            conn.query_drop(format!(
                "INSERT INTO orders VALUES ({id}, 'apple', {round}, 'it''s k{k} \\\\ ü')"
            ))
            .await
            .unwrap();
            conn.query_drop("UPDATE stock SET n = n - 1 WHERE item = 'apple'")
                .await
                .unwrap();
            if round % 3 == 2 {
                conn.query_drop(format!("DELETE FROM orders WHERE id = {}", id - 1))
                    .await
                    .unwrap();
            }
        }
        Some("crm") => {
            conn.query_drop(format!(
                "INSERT INTO notes VALUES ({id}, 'session {k} round {round}')"
            ))
            .await
            .unwrap();
            conn.query_drop(format!(
                "UPDATE notes SET body = CONCAT(body, '+') WHERE id = {id}"
            ))
            .await
            .unwrap();
        }
        other => panic!("session {k} has no database: {other:?}"),
    }
}

async fn connect(server: &TestServer, db: Option<&str>) -> Conn {
    Conn::new(OptsBuilder::from_opts(server.opts()).db_name(db))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_queue_into_a_second_server_gives_identical_tables() {
    let mq = TestExchange::new("replay");
    let source = TestServer::start(&[]);
    let target = TestServer::start(&[]);
    source.root_sql(SCHEMA);
    target.root_sql(SCHEMA);

    // Sessions open before the collector: database named at connect, chosen with USE, none
    // yet (it picks one later), one that quits and one that is killed while capturing.
    let mut pre = vec![
        (1, connect(&source, Some("shop")).await),
        (2, connect(&source, None).await),
        (3, connect(&source, Some("crm")).await),
    ];
    pre[1].1.query_drop("USE crm").await.unwrap();
    let mut later = connect(&source, None).await;
    let mut quits = connect(&source, Some("shop")).await;
    let mut killed = connect(&source, Some("crm")).await;
    let killed_id = killed.id();

    let port = source.port.to_string();
    let args = local_server_args(source.port, &mq.exchange);
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();

    work(&mut quits, 4, 1).await;
    quits.disconnect().await.unwrap();
    work(&mut killed, 5, 1).await;
    let mut fresh = vec![
        (6, connect(&source, Some("crm")).await),
        (7, connect(&source, None).await),
    ];
    fresh[1].1.query_drop("USE shop").await.unwrap();
    for round in 1..6 {
        for (k, conn) in pre.iter_mut().chain(fresh.iter_mut()) {
            work(conn, *k, round).await;
        }
        if round == 2 {
            later.query_drop("USE shop").await.unwrap();
            pre[1].1.query_drop("USE shop").await.unwrap();
        }
        if round >= 2 {
            work(&mut later, 8, round).await;
        }
    }
    // A statement spread over many segments.
    let values: Vec<String> = (0..2000)
        .map(|i| format!("({}, 'bulk {i} {}')", 100_000 + i, "x".repeat(100)))
        .collect();
    fresh[0]
        .1
        .query_drop(format!("INSERT INTO notes VALUES {}", values.join(",")))
        .await
        .unwrap();
    // Short sessions, and the mariadb client, which changes database with COM_INIT_DB.
    for k in 10..15 {
        let mut c = connect(&source, Some("shop")).await;
        work(&mut c, k, 0).await;
        c.disconnect().await.unwrap();
    }
    let cli = std::process::Command::new("mariadb")
        .args([
            "-h127.0.0.1",
            &format!("-P{port}"),
            "-umrte",
            "-pmrte",
            "-Dshop",
        ])
        .args([
            "-e",
            "INSERT INTO orders VALUES (20000, 'pear', 1, 'cli'); use crm; \
             INSERT INTO notes VALUES (20000, 'cli');",
        ])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    // Over the server's socket: not captured, not replayed.
    source.root_sql(&format!("KILL CONNECTION {killed_id}"));
    // Two GC passes (the second began after the kill): the killed session is closed on the
    // consumer's side too.
    agent.wait_log_more("pass=Gc", 2).await;

    let stdout = agent.stop();
    let t = totals(&stdout);
    let get = |k: &str| t.get(k);
    assert_eq!(get("bootstrap_units"), 5, "{stdout}");
    assert!(get("gc_quits") >= 1, "{stdout}");
    for dropped in [
        "queue_full",
        "mem_limit",
        "hold_overflow",
        "mq_errors",
        "seq_gaps",
        "bootstrap_db_changed",
        "unresolved_hosts",
    ] {
        assert_eq!(get(dropped), 0, "{dropped}: {stdout}");
    }

    let replayed = replay(&mq.take_all(), target.opts()).await;
    assert!(replayed.errors.is_empty(), "{:#?}", replayed.errors);
    assert!(replayed.init_dbs >= 6, "{replayed:?}");
    assert!(replayed.quits >= 7, "{replayed:?}");
    let databases = ["shop", "crm"];
    let (want, got) = (
        dump(source.opts(), &databases).await,
        dump(target.opts(), &databases).await,
    );
    let rows: usize = want.iter().map(|(_, r)| r.len()).sum();
    assert!(rows > 2000, "the workload ran: {rows} rows");
    for ((table, a), (_, b)) in want.iter().zip(&got) {
        let only = |x: &[String], y: &[String]| -> Vec<String> {
            x.iter().filter(|r| !y.contains(r)).cloned().collect()
        };
        assert!(
            a == b,
            "{table} differs: {} vs {} rows; only in the source: {:?}; only in the replay: {:?}",
            a.len(),
            b.len(),
            only(a, b),
            only(b, a)
        );
    }
    assert_eq!(want, got);
    drop((pre, fresh, later, killed));
}
