//! What reading TLS sessions costs: sysbench `oltp_point_select` at a paced rate against a
//! MariaDB of the bench's own that has a certificate, over TLS (`--mysql-ssl=on`) and plain,
//! with nothing attached, with the agent leaving TLS sessions out (`--tls=off`) and reading
//! them (`--tls=auto`: uprobes on the server's `SSL_read`, the `sys_enter` raw tracepoint).
//! The uprobes run in the server's threads, so their cost is in MariaDB's CPU: each figure is
//! CPU time per query by process (MariaDB, the agent), against nothing attached in the same
//! round (rounds rotate the order). qps at a paced rate only shows that the rate was held.
//!
//! `cargo xtask bench tls -- [--secs 10] [--rounds 5] [--threads 4] [--rate 4000]`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::{process::Command, time::Duration};

use common::{
    MYSQL_PASSWORD, MYSQL_USER,
    agent::{Agent, local_server_args, totals},
    broker::TestExchange,
    mariadb::TestServer,
};
use serde_json::json;
use support::{Args, fmt_spread, output, process_cpu, ratios};

const TABLES: u32 = 4;
const TABLE_SIZE: u32 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Nothing,
    TlsOff,
    TlsRead,
}

const CONFIGS: [(Config, &str); 3] = [
    (Config::Nothing, "nothing attached"),
    (Config::TlsOff, "mrte-collector --tls=off"),
    (Config::TlsRead, "mrte-collector --tls=auto"),
];

#[derive(Clone, Debug, Default)]
struct Run {
    qps: f64,
    queries: f64,
    server_cpu: Duration,
    agent_cpu: Duration,
    /// TLS reads the kernel handed over, and units published.
    tls_reads: u64,
    published: u64,
}

/// Where sysbench runs: with `--mysql-ssl=on` it loads `cacert.pem`, `client-cert.pem` and
/// `client-key.pem` from its working directory (the server does not ask for a client
/// certificate, so the server's own pair serves).
static WORKDIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn sysbench(port: u16, tls: bool, threads: u32, secs: u32, rate: u32, action: &str) -> Command {
    let mut c = Command::new("sysbench");
    c.current_dir(WORKDIR.get().expect("the bench's directory"));
    c.arg("oltp_point_select").args([
        "--db-driver=mysql",
        "--mysql-host=127.0.0.1",
        &format!("--mysql-port={port}"),
        &format!("--mysql-user={MYSQL_USER}"),
        &format!("--mysql-password={MYSQL_PASSWORD}"),
        "--mysql-db=sbtest",
        &format!("--mysql-ssl={}", if tls { "on" } else { "off" }),
        &format!("--tables={TABLES}"),
        &format!("--table-size={TABLE_SIZE}"),
        &format!("--threads={threads}"),
        &format!("--time={secs}"),
        &format!("--rate={rate}"),
        action,
    ]);
    c
}

/// Queries and qps from sysbench's report.
fn parse(out: &str) -> (f64, f64) {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("queries:"))
        .unwrap_or_else(|| panic!("no queries line in sysbench's report:\n{out}"));
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse::<f64>().ok());
    (nums.next().unwrap(), nums.next().unwrap())
}

fn run(server: &TestServer, config: Config, tls: bool, a: &(u32, u32, u32)) -> Run {
    let (threads, secs, rate) = *a;
    let pid = server_pid(server);
    let mut bench = sysbench(server.port, tls, threads, secs, rate, "run");
    if config == Config::Nothing {
        let cpu0 = process_cpu(pid);
        let (queries, qps) = parse(&output(&mut bench));
        return Run {
            qps,
            queries,
            server_cpu: process_cpu(pid) - cpu0,
            ..Default::default()
        };
    }
    let exchange = TestExchange::capped("tls_bench");
    let mut args = local_server_args(server.port, &exchange.exchange);
    if config == Config::TlsOff {
        args.push("--tls=off".into());
    }
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    agent.wait_attached();
    if config == Config::TlsRead {
        agent.wait_log_blocking("TLS probes attached");
    }
    let (s0, a0) = (process_cpu(pid), process_cpu(agent.pid()));
    let (queries, qps) = parse(&output(&mut bench));
    let (server_cpu, agent_cpu) = (process_cpu(pid) - s0, process_cpu(agent.pid()) - a0);
    let t = totals(&agent.stop());
    let get = |k: &str| t.get(k);
    Run {
        qps,
        queries,
        server_cpu,
        agent_cpu,
        tls_reads: get("tls_reads"),
        published: get("published_units"),
    }
}

fn server_pid(server: &TestServer) -> u32 {
    collector::capture::tls::server_process(server.port).expect("the bench's MariaDB")
}

fn us_per_query(d: Duration, r: &Run) -> f64 {
    d.as_secs_f64() * 1e6 / r.queries.max(1.0)
}

fn main() {
    let a = Args::parse(&["secs", "rounds", "threads", "rate", "out"]);
    let (secs, rounds, threads, rate) = (
        a.get("secs", 10u32),
        a.get("rounds", 5usize),
        a.get("threads", 4u32),
        a.get("rate", 4000u32),
    );
    let dir = std::env::temp_dir().join(common::unique("mrte-tls-bench-"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    output(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    for (from, to) in [
        (&cert, "cacert.pem"),
        (&cert, "client-cert.pem"),
        (&key, "client-key.pem"),
    ] {
        std::fs::copy(from, dir.join(to)).unwrap();
    }
    WORKDIR.set(dir.clone()).unwrap();
    let server = TestServer::start(&[
        &format!("--ssl-cert={}", cert.display()),
        &format!("--ssl-key={}", key.display()),
        // sysbench presents a client certificate (the same pair): the server must know it.
        &format!("--ssl-ca={}", cert.display()),
        "--max-connections=200",
    ]);
    server.root_sql("CREATE DATABASE sbtest");
    output(&mut sysbench(server.port, false, 2, 10, 0, "prepare"));
    let p = (threads, secs, rate);
    let mut md = format!(
        "## Reading TLS sessions ({})\n\n\
         sysbench `oltp_point_select`, {threads} threads paced at {rate} transactions/s, \
         {secs} s per run, {rounds} rounds, the order of the three rotated each round, against a \
         MariaDB of the bench's own (system OpenSSL, a self-signed certificate). CPU per query \
         by process (user + system time / queries); the ratio is MariaDB's against nothing \
         attached in the same round: the uprobes run in its threads.\n\n\
         | sessions | configuration | qps (median) | MariaDB us/query (min / median / max) | MariaDB ratio (min / median / max) | agent us/query (min / median / max) | TLS reads (median) | units published (median) |\n\
         |---|---|---|---|---|---|---|---|\n",
        support::machine(),
    );
    let mut json = Vec::new();
    for tls in [true, false] {
        let configs: Vec<_> = CONFIGS
            .iter()
            .filter(|(c, _)| tls || *c != Config::TlsRead)
            .collect();
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); configs.len()];
        for round in 0..rounds {
            for k in 0..configs.len() {
                let i = (k + round) % configs.len();
                let r = run(&server, configs[i].0, tls, &p);
                eprintln!("tls={tls} round {round} {}: {r:?}", configs[i].1);
                runs[i].push(r);
            }
        }
        let server_us = |i: usize| {
            runs[i]
                .iter()
                .map(|r| us_per_query(r.server_cpu, r))
                .collect::<Vec<_>>()
        };
        for (i, (config, name)) in configs.iter().enumerate() {
            let agent_us: Vec<f64> = runs[i]
                .iter()
                .map(|r| us_per_query(r.agent_cpu, r))
                .collect();
            let med = |f: &dyn Fn(&Run) -> f64| support::median(runs[i].iter().map(f));
            let name = if *config == Config::TlsOff && !tls {
                "mrte-collector"
            } else {
                name
            };
            md.push_str(&format!(
                "| {} | {name} | {:.0} | {} | {} | {} | {:.0} | {:.0} |\n",
                if tls { "TLS" } else { "plain" },
                med(&|r| r.qps),
                fmt_spread(&server_us(i), 2),
                fmt_spread(&ratios(&server_us(i), &server_us(0)), 3),
                if *config == Config::Nothing {
                    "-".into()
                } else {
                    fmt_spread(&agent_us, 2)
                },
                med(&|r| r.tls_reads as f64),
                med(&|r| r.published as f64),
            ));
            json.push(json!({
                "sessions": if tls { "tls" } else { "plain" }, "configuration": name,
                "qps": runs[i].iter().map(|r| r.qps).collect::<Vec<_>>(),
                "server_us_per_query": server_us(i), "agent_us_per_query": agent_us,
                "tls_reads": runs[i].iter().map(|r| r.tls_reads).collect::<Vec<_>>(),
                "published": runs[i].iter().map(|r| r.published).collect::<Vec<_>>(),
            }));
        }
    }
    md.push('\n');
    support::write(&a, "tls", &md, &serde_json::Value::Array(json));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
