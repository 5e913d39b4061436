//! `--metrics_addr` and `--status_format json`: the endpoint's text parses as Prometheus text,
//! every total in the JSON status line that follows the scrape equals its counter sample (by
//! name, or by program and reason label),
//! and the capture-to-publish histogram counted the messages published.

mod common;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{
    agent::{Agent, local_server_args},
    broker::TestExchange,
    mariadb::TestServer,
    mysql_opts,
};
use mysql_async::{Conn, prelude::*};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// A sample's key: its name, then its labels sorted, as `name{a="x",b="y"}` (no braces
/// without labels).
fn key(metric: &str, labels: &HashMap<String, String>) -> String {
    if labels.is_empty() {
        return metric.to_owned();
    }
    let mut l: Vec<_> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    l.sort();
    format!("{metric}{{{}}}", l.join(","))
}

/// Every sample as key → value (histograms: `_count`, `_sum` and buckets by `le`).
fn samples(text: &str) -> HashMap<String, f64> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let mut out = HashMap::new();
    for s in scrape.samples {
        match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                let k = key(&s.metric, &s.labels);
                assert!(out.insert(k.clone(), v).is_none(), "{k} twice");
            }
            Value::Histogram(buckets) => {
                for b in buckets {
                    out.insert(
                        format!("{}_bucket{{le={}}}", s.metric, b.less_than),
                        b.count,
                    );
                }
            }
            Value::Summary(_) => panic!("no summaries expected: {}", s.metric),
        }
    }
    // Strict: every line is a comment or a sample the parser took.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(
            out.keys().any(|k| k.starts_with(name)),
            "not parsed as a sample: {l:?}"
        );
        assert!(name.starts_with("mrte_collector_"), "{l}");
    }
    out
}

/// The counter sample of the total `name` (`reply_...`: the egress program's), if there is
/// one: `<name>_total`, or a sample whose `reason` is the name (with the program's label, if
/// it has one), or the kernel's records and bytes of that program. Never more than one.
fn counter_sample(scraped: &HashMap<String, f64>, name: &str) -> Option<f64> {
    let (program, base) = match name.strip_prefix("reply_") {
        Some(base) => ("egress", base),
        None => ("ingress", name),
    };
    let p = format!("program=\"{program}\"");
    let reason = format!("reason=\"{base}\"");
    let found: Vec<f64> = scraped
        .iter()
        .filter(|(k, _)| {
            let Some((metric, labels)) = k.trim_end_matches('}').split_once('{') else {
                return program == "ingress" && **k == format!("mrte_collector_{name}_total");
            };
            let labels: Vec<&str> = labels.split(',').collect();
            let program_ok = labels.contains(&p.as_str())
                || (program == "ingress" && !labels.iter().any(|l| l.starts_with("program=")));
            program_ok
                && (labels.contains(&reason.as_str())
                    || (labels.len() == 1
                        && [
                            format!("mrte_collector_{base}_total"),
                            format!("mrte_collector_kernel_{base}_total"),
                        ]
                        .contains(&metric.to_owned())))
        })
        .map(|(_, v)| *v)
        .collect();
    assert!(found.len() <= 1, "{name}: {} samples", found.len());
    found.first().copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_status_totals() {
    let server = TestServer::start(&[]);
    let mq = TestExchange::new("metrics");
    let mut args: Vec<String> = local_server_args(server.port, &mq.exchange)
        .into_iter()
        .filter(|a| !a.starts_with("--gc_interval"))
        .collect();
    // No process-list reads after the bootstrap: nothing moves once the clients are done.
    args.extend(
        [
            "--gc_interval=3600",
            "--metrics_addr=127.0.0.1:0",
            "--status_format=json",
            "--status_interval=1",
        ]
        .map(String::from),
    );
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = agent.take_stdout_lines();
    agent.wait_attached();
    agent.wait_log("serving metrics on http://").await;
    let addr = {
        let log = agent.log.lock().unwrap();
        let from = log.find("serving metrics on http://").unwrap() + 26;
        log[from..].split('/').next().unwrap().to_owned()
    };

    for k in 0..3 {
        let mut c = Conn::new(mysql_opts(server.addr())).await.unwrap();
        for i in 0..20 {
            c.query_drop(format!("SELECT {k}, {i}")).await.unwrap();
        }
        c.disconnect().await.unwrap();
    }
    // Until everything is published (3 sessions of a handshake, 20 queries and a COM_QUIT):
    // nothing moves after that.
    tokio::task::block_in_place(|| {
        common::agent::wait_stdout_line(&stdout, 0, 60, |l| {
            let t = &serde_json::from_str::<Json>(l).unwrap()["totals"];
            t["published_units"].as_u64() >= Some(3 * 22)
                && t["published_units"] == t["batched_units"]
        })
    });

    let (head, _) = get(&addr, "/nothing");
    assert!(
        head.starts_with("HTTP/1.0 404") || head.starts_with("HTTP/1.1 404"),
        "{head}"
    );

    let (head, text) = get(&addr, "/metrics");
    assert!(head.contains(" 200 "), "{head}");
    assert!(head.contains("openmetrics-text"), "{head}");
    let scraped = samples(&text);
    // The next status line, printed after the scrape was answered.
    let seen = stdout.lock().unwrap().len();
    let start = Instant::now();
    while stdout.lock().unwrap().len() <= seen {
        assert!(start.elapsed() < Duration::from_secs(10), "no status line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line: Json = serde_json::from_str(&stdout.lock().unwrap()[seen]).unwrap();
    // The text line's columns, in its order, then the totals.
    let keys: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(&keys[..3], ["time", "TotalPacket", "ValidPacket"]);
    assert_eq!(keys.last(), Some(&"totals"));
    let totals = line["totals"].as_object().unwrap();
    assert!(
        totals["published_units"].as_u64().unwrap() >= 3 * 22,
        "{line}"
    );
    let mut compared = 0;
    for (name, v) in totals {
        let v = v.as_u64().unwrap();
        // Counts of every packet on lo, in (ingress) and out (egress, the reply program), which
        // the scrape's own HTTP and the broker's traffic move; everything about the captured
        // port must match.
        let base = name.strip_prefix("reply_").unwrap_or(name);
        if ["packets", "not_ip", "not_tcp", "other_port", "unawaited"].contains(&base) {
            continue;
        }
        if let Some(m) = counter_sample(&scraped, name) {
            assert_eq!(m as u64, v, "{name}: metrics {m}, status {v}");
            compared += 1;
        } else {
            // Gauges: present, values of their own moment.
            assert!(
                scraped.contains_key(&format!("mrte_collector_{name}")),
                "{name} missing from the metrics:\n{text}"
            );
        }
    }
    assert!(compared > 50, "{compared} counters compared");
    // Labelled families: the kernel's per program and reason, losses by reason.
    assert!(
        scraped.contains_key(
            "mrte_collector_kernel_packets_total{program=\"ingress\",reason=\"ring_full\"}"
        ),
        "{text}"
    );
    assert_eq!(
        scraped["mrte_collector_lost_units_total{reason=\"queue_full\"}"],
        0.0
    );
    assert_eq!(scraped["mrte_collector_packets_dropped_total"], 0.0);

    // The histogram: one observation per message of captured segments, buckets cumulative.
    let count = scraped["mrte_collector_capture_to_publish_seconds_count"];
    let published = totals["published_msgs"].as_u64().unwrap() as f64;
    assert!(count > 0.0 && count <= published, "{count} of {published}");
    let mut buckets: Vec<(f64, f64)> = scraped
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix("mrte_collector_capture_to_publish_seconds_bucket{le=")?;
            Some((le.trim_end_matches('}').parse().unwrap(), *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
    let sum = scraped["mrte_collector_capture_to_publish_seconds_sum"];
    // Each message waits for its batch (--read_timeout=20 ms) and no more than a few seconds.
    assert!(
        sum / count > 0.001 && sum / count < 5.0,
        "mean {}",
        sum / count
    );

    // Every line is read once it returns.
    agent.stop();
    let lines = stdout.lock().unwrap().clone();
    let summary: Json = serde_json::from_str(
        lines
            .iter()
            .find(|l| l.contains("\"summary\":true"))
            .unwrap_or_else(|| panic!("no JSON summary in {lines:?}")),
    )
    .unwrap();
    assert_eq!(summary["PacketDropped"], 0);
    assert_eq!(
        summary["totals"]["published_units"],
        line["totals"]["published_units"]
    );
}
