//! Soak: the agent under a steady MySQL load for minutes (`MRTE_SOAK_SECS`, 120 by default):
//! connections opening and closing all the time next to long-lived ones, GC reads every 5 s.
//! Its RSS, flow table and queues must stay flat: what grows with the number of connections
//! made (18,000 or so) would show. Ignored by default (it takes minutes); `cargo xtask test`
//! runs it.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    MYSQL_ADDR,
    agent::{Agent, status_rows},
    broker::TestExchange,
    mysql_opts,
};
use mysql_async::prelude::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes minutes; cargo xtask test runs it"]
async fn a_steady_load_for_minutes_grows_nothing() {
    let secs: u64 = std::env::var("MRTE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let mq = TestExchange::new("soak");
    let mut admin = mysql_async::Conn::new(mysql_opts(MYSQL_ADDR.parse().unwrap()))
        .await
        .unwrap();
    admin
        .query_drop("CREATE DATABASE IF NOT EXISTS mrte_soak")
        .await
        .unwrap();
    let mut agent = Agent::start(&[
        "--interface=lo",
        "--port=3306",
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--gc_interval=5",
        "--status_interval=5",
    ]);
    agent.wait_attached();

    let stop = Arc::new(AtomicBool::new(false));
    let (queries, connections) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let opts = mysql_async::OptsBuilder::from_opts(mysql_opts(MYSQL_ADDR.parse().unwrap()))
        .db_name(Some("mrte_soak"));
    let mut load = Vec::new();
    // Churn: connect, five queries, quit; about 150 connections a second in all.
    for w in 0..3u64 {
        let (stop, queries, connections, opts) = (
            stop.clone(),
            queries.clone(),
            connections.clone(),
            opts.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut c = mysql_async::Conn::new(opts.clone()).await.unwrap();
                for i in 0..5u64 {
                    let _: Option<u64> = c.query_first(format!("SELECT {w} + {i}")).await.unwrap();
                }
                c.disconnect().await.unwrap();
                queries.fetch_add(5, Ordering::Relaxed);
                connections.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Long-lived sessions: a query every 5 ms each.
    for w in 0..3u64 {
        let (stop, queries, opts) = (stop.clone(), queries.clone(), opts.clone());
        load.push(tokio::spawn(async move {
            let mut c = mysql_async::Conn::new(opts).await.unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _: Option<u64> = c
                    .query_first(format!("SELECT {w} * 1000000 + {n}"))
                    .await
                    .unwrap();
                n += 1;
                queries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            c.disconnect().await.unwrap();
        }));
    }
    let start = Instant::now();
    let mut peak_rss = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(agent.proc_status_bytes("VmRSS"));
        // Nothing accumulates at the broker meanwhile.
        if start.elapsed().as_secs().is_multiple_of(20) {
            mq.take_all();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let stdout = agent.stop();
    let rows = status_rows(&stdout);
    let t = common::agent::totals(&stdout);
    let (queries, connections) = (
        queries.load(Ordering::Relaxed),
        connections.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak: {secs} s, {queries} queries, {connections} connections, peak RSS {} MiB",
        peak_rss >> 20
    );
    for r in &rows {
        eprintln!(
            "  RssMB {:>4} Flows {:>4} WaitingQueueCnt {:>4} QueuedKB {:>6} ReorderKB {:>6}",
            r["RssMB"], r["Flows"], r["WaitingQueueCnt"], r["QueuedKB"], r["ReorderKB"]
        );
    }
    assert!(rows.len() as u64 >= secs / 5 - 2, "{stdout}");
    assert!(connections > 20 * secs, "the churn ran: {connections}");
    assert_eq!(t["PacketDropped"], 0, "{stdout}");
    // The flow table holds the open sessions, not every one that was: 3 long-lived, the few
    // churning ones in flight, the GC's own.
    let flows_max = rows.iter().map(|r| r["Flows"]).max().unwrap();
    assert!(flows_max <= 16, "flow table grew to {flows_max}: {stdout}");
    assert!(
        rows.iter()
            .all(|r| r["WaitingQueueCnt"] <= 8 && r["ReorderKB"] == 0)
    );
    // RSS: after a warm-up third, the rest may not climb.
    let third = rows.len() / 3;
    let warm = rows[third..2 * third]
        .iter()
        .map(|r| r["RssMB"])
        .max()
        .unwrap();
    let last = rows[2 * third..].iter().map(|r| r["RssMB"]).max().unwrap();
    assert!(
        last <= warm + 2,
        "RSS grew from {warm} MiB to {last} MiB over the last third: {stdout}"
    );
}
