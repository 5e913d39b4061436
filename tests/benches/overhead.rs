//! Server overhead: sysbench against the local MariaDB over TCP on loopback, with nothing
//! attached, with mrte-collector (release build, default flags) capturing port 3306 and
//! publishing to RabbitMQ, the same with `--prepared_statements=off` (sysbench uses server-side
//! prepared statements: the difference is what rendering them as text costs, egress program
//! included), and with `tcpdump -i lo -w /dev/null 'tcp dst port 3306'` (the libpcap capture
//! the original collector used). Rounds rotate the order of the four; qps and p95 latency are
//! reported as ratios against "nothing attached" of the same round.
//!
//! The agent publishes to an exchange of its own whose queue keeps only the newest message (the
//! broker routes and confirms each, then drops it): the replaying consumer runs elsewhere, as
//! tcpdump's file is /dev/null here. (With no queue bound at all, every message would come
//! back unroutable and count as lost.)
//!
//! `cargo xtask bench overhead -- [--secs 10] [--rounds 5] [--threads 4]
//!  [--workloads oltp_point_select,oltp_read_write] [--agent_args "--batch_segments=200 ..."]`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::{
    io::{BufRead, BufReader, Read as _},
    process::{Child, ChildStderr, Command, Stdio},
    time::Duration,
};

use common::{
    MYSQL_PASSWORD, MYSQL_USER,
    agent::{Agent, totals},
    broker::TestExchange,
};
use serde_json::json;
use support::{Args, fmt_spread, median, output, process_cpu, ratios};

const TABLES: u32 = 4;
const TABLE_SIZE: u32 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Nothing,
    Agent,
    AgentRaw,
    Tcpdump,
}

const CONFIGS: [(Config, &str); 4] = [
    (Config::Nothing, "nothing attached"),
    (Config::Agent, "mrte-collector"),
    (
        Config::AgentRaw,
        "mrte-collector, `--prepared_statements=off`",
    ),
    (Config::Tcpdump, "tcpdump"),
];

#[derive(Clone, Debug, Default)]
struct Run {
    qps: f64,
    p95_ms: f64,
    /// The capturing process's CPU during the sysbench run.
    cpu: Duration,
    /// RabbitMQ's (beam.smp) CPU during the run: on this machine it takes CPU from MariaDB
    /// too, where in production it usually runs elsewhere.
    broker_cpu: Duration,
    /// What the capturing process says it missed: drop counters or tcpdump's kernel drops.
    drops: u64,
    /// What it captured: published units (agent), packets captured (tcpdump).
    captured: u64,
    /// The agent's COM_STMT_EXECUTEs published as text.
    rendered: u64,
}

fn sysbench_cmd(workload: &str, threads: u32, secs: u32, action: &str) -> Command {
    let mut c = Command::new("sysbench");
    c.arg(workload).args([
        "--db-driver=mysql",
        "--mysql-host=127.0.0.1",
        "--mysql-port=3306",
        &format!("--mysql-user={MYSQL_USER}"),
        &format!("--mysql-password={MYSQL_PASSWORD}"),
        "--mysql-db=sbtest",
        &format!("--tables={TABLES}"),
        &format!("--table-size={TABLE_SIZE}"),
        &format!("--threads={threads}"),
        &format!("--time={secs}"),
        "--percentile=95",
        action,
    ]);
    c
}

/// Creates the sbtest tables unless they are there with the expected size.
fn prepare() {
    output(Command::new("mariadb").args(["-e", "CREATE DATABASE IF NOT EXISTS sbtest"]));
    let rows = Command::new("mariadb")
        .args([
            "-N",
            "-e",
            &format!("SELECT COUNT(*) FROM sbtest.sbtest{TABLES}"),
        ])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u32>()
                .ok()
        });
    if rows != Some(TABLE_SIZE) {
        eprintln!("preparing sbtest ({TABLES} tables of {TABLE_SIZE} rows)");
        output(&mut sysbench_cmd("oltp_read_write", 2, 10, "cleanup"));
        output(&mut sysbench_cmd("oltp_read_write", 2, 10, "prepare"));
    }
}

/// qps and p95 latency (ms) from sysbench's report.
fn parse_sysbench(out: &str) -> (f64, f64) {
    let value_after = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in sysbench's report:\n{out}"))
            .trim()
            .to_owned()
    };
    let queries = value_after("queries:");
    let qps = queries
        .split_once('(')
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("cannot read qps from {queries:?}"));
    let p95 = value_after("95th percentile:").parse().unwrap();
    (qps, p95)
}

/// tcpdump as a child, killed if the benchmark fails half-way.
struct Tcpdump {
    child: Child,
    /// The rest of its stderr: its statistics at exit.
    stderr: BufReader<ChildStderr>,
}

impl Tcpdump {
    fn start() -> Self {
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-n", "-w", "/dev/null", "tcp dst port 3306"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (cargo xtask setup installs it)");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("listening on") {
            line.clear();
        }
        let this = Self { child, stderr };
        assert!(line.contains("listening on"), "tcpdump did not start");
        this
    }

    /// SIGINT, then (packets captured, packets dropped by kernel).
    fn stop(mut self) -> (u64, u64) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let mut rest = String::new();
        self.stderr.read_to_string(&mut rest).unwrap();
        self.child.wait().unwrap();
        let count = |what: &str| {
            rest.lines()
                .find(|l| l.contains(what))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {what:?} in tcpdump's statistics:\n{rest}"))
        };
        (
            count("packets captured"),
            count("packets dropped by kernel"),
        )
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        // After `stop` the process is gone: both fail quietly.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The RabbitMQ node's process.
fn broker_pid() -> u32 {
    let out = output(Command::new("pgrep").args(["-o", "beam.smp"]));
    out.trim().parse().expect("RabbitMQ's beam.smp process")
}

fn run(config: Config, workload: &str, threads: u32, secs: u32, agent_args: &[&str]) -> Run {
    let broker = broker_pid();
    let cpu0 = process_cpu(broker);
    let mut r = run_capturing(config, workload, threads, secs, agent_args);
    r.broker_cpu = process_cpu(broker) - cpu0;
    r
}

fn run_capturing(
    config: Config,
    workload: &str,
    threads: u32,
    secs: u32,
    agent_args: &[&str],
) -> Run {
    let mut bench = sysbench_cmd(workload, threads, secs, "run");
    match config {
        Config::Nothing => {
            let (qps, p95_ms) = parse_sysbench(&output(&mut bench));
            Run {
                qps,
                p95_ms,
                ..Default::default()
            }
        }
        Config::Agent | Config::AgentRaw => {
            // A queue that keeps only the newest message; deleted on drop.
            let exchange = TestExchange::capped("overhead");
            let name = format!("--rabbitmq_exchange_name={}", exchange.exchange);
            let mut args = vec!["--interface=lo", "--port=3306", &name];
            if config == Config::AgentRaw {
                args.push("--prepared_statements=off");
            }
            args.extend(agent_args);
            let mut agent = Agent::start(&args);
            agent.wait_attached();
            let cpu0 = process_cpu(agent.pid());
            let (qps, p95_ms) = parse_sysbench(&output(&mut bench));
            let cpu = process_cpu(agent.pid()) - cpu0;
            let t = totals(&agent.stop());
            let get = |k: &str| t.get(k).copied().unwrap_or(0);
            Run {
                qps,
                p95_ms,
                cpu,
                drops: get("PacketDropped"),
                captured: get("published_units"),
                rendered: get("stmt_rendered"),
                ..Default::default()
            }
        }
        Config::Tcpdump => {
            let tcpdump = Tcpdump::start();
            let cpu0 = process_cpu(tcpdump.child.id());
            let (qps, p95_ms) = parse_sysbench(&output(&mut bench));
            let cpu = process_cpu(tcpdump.child.id()) - cpu0;
            let (captured, drops) = tcpdump.stop();
            Run {
                qps,
                p95_ms,
                cpu,
                drops,
                captured,
                ..Default::default()
            }
        }
    }
}

fn main() {
    let a = Args::parse(&[
        "secs",
        "rounds",
        "threads",
        "workloads",
        "agent_args",
        "out",
    ]);
    let agent_args: String = a.get("agent_args", String::new());
    let agent_args: Vec<&str> = agent_args.split_whitespace().collect();
    let (secs, rounds, threads) = (
        a.get("secs", 10u32),
        a.get("rounds", 5usize),
        a.get("threads", 4u32),
    );
    let workloads: Vec<String> = a.list(
        "workloads",
        &["oltp_point_select".to_owned(), "oltp_read_write".to_owned()],
    );
    prepare();
    let mut md = format!(
        "## Server overhead ({})\n\n\
         sysbench against the local MariaDB over TCP on `lo`, {threads} threads, {secs} s per run, \
         {rounds} rounds, the order of the four rotated each round. Ratios are per round, \
         against nothing attached in the same round. The agent: release build, default flags{}, \
         publishing to RabbitMQ on this machine (a queue that keeps the newest message only); tcpdump: `tcpdump \
         -i lo -w /dev/null 'tcp dst port 3306'`. \"capturer CPU\": the capturing process's \
         user + system time during the run, as a share of one core (the machine has {}).\n\n\
         | workload | configuration | qps (min / median / max) | qps ratio (min / median / max) | p95 ms (median) | p95 ratio (min / median / max) | capturer CPU % (median) | RabbitMQ CPU % (median) | captured (median) | dropped (all rounds) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        support::machine(),
        if agent_args.is_empty() {
            String::new()
        } else {
            format!(" plus `{}`", agent_args.join(" "))
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut json = Vec::new();
    for workload in &workloads {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); CONFIGS.len()];
        for round in 0..rounds {
            for k in 0..CONFIGS.len() {
                let i = (k + round) % CONFIGS.len();
                let r = run(CONFIGS[i].0, workload, threads, secs, &agent_args);
                eprintln!("{workload} round {round} {}: {r:?}", CONFIGS[i].1);
                runs[i].push(r);
            }
        }
        let qps = |i: usize| runs[i].iter().map(|r| r.qps).collect::<Vec<_>>();
        let p95 = |i: usize| runs[i].iter().map(|r| r.p95_ms).collect::<Vec<_>>();
        for (i, (config, name)) in CONFIGS.iter().enumerate() {
            let capturing = *config != Config::Nothing;
            let cpu_pct = median(
                runs[i]
                    .iter()
                    .map(|r| r.cpu.as_secs_f64() * 100.0 / secs as f64),
            );
            let captured = median(runs[i].iter().map(|r| r.captured as f64));
            let rendered = median(runs[i].iter().map(|r| r.rendered as f64));
            let broker_pct = median(
                runs[i]
                    .iter()
                    .map(|r| r.broker_cpu.as_secs_f64() * 100.0 / secs as f64),
            );
            let dash = |s: String| if capturing { s } else { "-".into() };
            md.push_str(&format!(
                "| {workload} | {name} | {} | {} | {:.2} | {} | {} | {broker_pct:.1} | {} | {} |\n",
                fmt_spread(&qps(i), 0),
                fmt_spread(&ratios(&qps(i), &qps(0)), 3),
                median(p95(i)),
                fmt_spread(&ratios(&p95(i), &p95(0)), 3),
                dash(format!("{cpu_pct:.1}")),
                dash(match config {
                    Config::Agent =>
                        format!("{captured:.0} units ({rendered:.0} executes as text)"),
                    Config::AgentRaw => format!("{captured:.0} units"),
                    _ => format!("{captured:.0} packets"),
                }),
                dash(runs[i].iter().map(|r| r.drops).sum::<u64>().to_string()),
            ));
            json.push(json!({
                "workload": workload, "configuration": name,
                "qps": qps(i), "p95_ms": p95(i),
                "qps_ratio": ratios(&qps(i), &qps(0)), "p95_ratio": ratios(&p95(i), &p95(0)),
                "capturer_cpu_s": runs[i].iter().map(|r| r.cpu.as_secs_f64()).collect::<Vec<_>>(),
                "broker_cpu_s": runs[i].iter().map(|r| r.broker_cpu.as_secs_f64()).collect::<Vec<_>>(),
                "captured": runs[i].iter().map(|r| r.captured).collect::<Vec<_>>(),
                "rendered": runs[i].iter().map(|r| r.rendered).collect::<Vec<_>>(),
                "dropped": runs[i].iter().map(|r| r.drops).collect::<Vec<_>>(),
            }));
        }
    }
    md.push('\n');
    support::write(&a, "overhead", &md, &serde_json::Value::Array(json));
}
