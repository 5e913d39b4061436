//! Server overhead: sysbench against the local MariaDB over TCP on loopback, with nothing
//! attached, with mrte-collector (release build, default flags) capturing port 3306 and
//! publishing to RabbitMQ, the same with `--prepared_statements=off` (sysbench uses server-side
//! prepared statements: the difference is what rendering them as text costs, egress program
//! included), and with `tcpdump -i lo -w /dev/null 'tcp dst port 3306'` (the libpcap capture
//! the original collector used); with `--baseline_bin PATH`, another build of the agent too.
//! Rounds rotate the order of the configurations.
//!
//! The agent publishes as it is used: to an exchange bound to a queue that a consumer drains
//! (in this process, as a player would), so the broker routes, stores and delivers each
//! message; every round checks that the consumer got every unit the agent published.
//!
//! Two modes, each reported against nothing attached in the same round:
//! - `saturated`: sysbench as fast as it goes; qps and p95 latency ratios.
//! - `paced`: sysbench held at `--rate` transactions/s; CPU time per query by process (the
//!   capturer, RabbitMQ, MariaDB, and the softirq time of the whole machine), and the kernel
//!   programs' ns per run and runs per query (from a run of the agent with `--bpf_stats`,
//!   whose clock reads the CPU figures of the other rows do not include). At a paced rate
//!   these are far steadier than saturated qps on a noisy VM.
//!
//! `cargo xtask bench overhead -- [--secs 10] [--rounds 5] [--threads 4] [--rate 12000]
//!  [--modes saturated,paced] [--workloads oltp_point_select,oltp_read_write]
//!  [--agent_args "--batch_segments=200 ..."] [--baseline_bin PATH] [--configs 1,4]`
//! (`--configs`: a subset by index: 1 the agent, 2 without prepared statements, 3 tcpdump, 4
//! the baseline, 5 the agent with `--bpf_stats` (paced only: the kernel programs' ns per run;
//! the other rows run without stats); nothing attached always runs.)
//! (paced runs use the first workload.)

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::{
    io::{BufRead, BufReader, Read as _},
    path::PathBuf,
    process::{Child, ChildStderr, Command, Stdio},
    time::Duration,
};

use common::{
    MYSQL_PASSWORD, MYSQL_USER,
    agent::{Agent, binary, totals},
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
    Baseline,
    /// The agent with `--bpf_stats` (paced only): the kernel programs' ns per run. Its stats
    /// cost two clock reads per run of every program, the `sys_enter` one included where it is
    /// attached, so the CPU columns come from the agent without them.
    AgentStats,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Saturated,
    Paced,
}

#[derive(Clone, Debug, Default)]
struct Run {
    qps: f64,
    queries: f64,
    p95_ms: f64,
    /// The capturing process's CPU during the sysbench run.
    cpu: Duration,
    /// RabbitMQ's (beam.smp) CPU during the run: on this machine it takes CPU from MariaDB
    /// too, where in production it usually runs elsewhere.
    broker_cpu: Duration,
    server_cpu: Duration,
    /// The machine's softirq time (all CPUs): where loopback's packets and the TC programs run.
    softirq: Duration,
    /// What the capturing process says it missed: drop counters or tcpdump's kernel drops.
    drops: u64,
    /// What it captured: published units (agent), packets captured (tcpdump).
    captured: u64,
    /// Units the consumer took from the queue.
    consumed: u64,
    /// Messages published (agent).
    messages: u64,
    /// The agent's COM_STMT_EXECUTEs published as text.
    rendered: u64,
    /// Kernel programs (with `--bpf_stats`): runs and ns per run of ingress and egress.
    ingress_runs: u64,
    ingress_ns: u64,
    egress_runs: u64,
    egress_ns: u64,
    /// The agent's peak RSS (VmHWM), MiB.
    rss_mb: u64,
}

fn sysbench_cmd(workload: &str, threads: u32, secs: u32, action: &str) -> Command {
    sysbench_paced(workload, threads, secs, 0, action)
}

/// sysbench held at `rate` transactions/s (0: unpaced).
fn sysbench_paced(workload: &str, threads: u32, secs: u32, rate: u32, action: &str) -> Command {
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
        &format!("--rate={rate}"),
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

/// Queries, qps and p95 latency (ms) from sysbench's report.
fn parse_sysbench(out: &str) -> (f64, f64, f64) {
    let value_after = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in sysbench's report:\n{out}"))
            .trim()
            .to_owned()
    };
    let queries = value_after("queries:");
    let count = queries
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read queries from {queries:?}"));
    let qps = queries
        .split_once('(')
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("cannot read qps from {queries:?}"));
    let p95 = value_after("95th percentile:").parse().unwrap();
    (count, qps, p95)
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

/// The MariaDB server's process.
fn server_pid() -> u32 {
    let out = output(Command::new("pgrep").args(["-o", "mariadbd"]));
    out.trim().parse().expect("MariaDB's mariadbd process")
}

/// Softirq time of all CPUs so far (/proc/stat, the `cpu` line's seventh field).
fn softirq_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .and_then(|l| l.split_whitespace().nth(6)?.parse().ok())
        .unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

struct Setup<'a> {
    mode: Mode,
    workload: &'a str,
    threads: u32,
    secs: u32,
    rate: u32,
    agent_args: &'a [&'a str],
    baseline: Option<&'a PathBuf>,
}

fn run(config: Config, s: &Setup) -> Run {
    let (broker, server) = (broker_pid(), server_pid());
    let (b0, s0, q0) = (process_cpu(broker), process_cpu(server), softirq_time());
    let mut r = run_capturing(config, s);
    r.broker_cpu = process_cpu(broker) - b0;
    r.server_cpu = process_cpu(server) - s0;
    r.softirq = softirq_time() - q0;
    r
}

fn run_capturing(config: Config, s: &Setup) -> Run {
    let rate = if s.mode == Mode::Paced { s.rate } else { 0 };
    let mut bench = sysbench_paced(s.workload, s.threads, s.secs, rate, "run");
    match config {
        Config::Nothing => {
            let (queries, qps, p95_ms) = parse_sysbench(&output(&mut bench));
            Run {
                qps,
                queries,
                p95_ms,
                ..Default::default()
            }
        }
        Config::Agent | Config::AgentRaw | Config::Baseline | Config::AgentStats => {
            let (exchange, consumer) = TestExchange::consumed("overhead");
            let name = format!("--rabbitmq_exchange_name={}", exchange.exchange);
            let mut args = vec!["--interface=lo", "--port=3306", &name];
            if config == Config::AgentRaw {
                args.push("--prepared_statements=off");
            }
            if config == Config::AgentStats {
                args.push("--bpf_stats");
            }
            args.extend(s.agent_args);
            let bin = match config {
                Config::Baseline => s.baseline.expect("--baseline_bin").clone(),
                _ => binary(),
            };
            let mut agent = Agent::start_binary(&bin, &args);
            agent.wait_attached();
            let cpu0 = process_cpu(agent.pid());
            let (queries, qps, p95_ms) = parse_sysbench(&output(&mut bench));
            let cpu = process_cpu(agent.pid()) - cpu0;
            let t = totals(&agent.stop());
            let stats = config == Config::AgentStats || s.agent_args.contains(&"--bpf_stats");
            let get = |k: &str| t.get(k);
            let published = get("published_units");
            let got = consumer.wait(|c| c.units >= published, Duration::from_secs(10));
            assert_eq!(
                got.undecodable, 0,
                "messages in the queue that are not MRTE"
            );
            let consumed = got.units;
            Run {
                qps,
                queries,
                p95_ms,
                cpu,
                drops: get("PacketDropped") + get("mq_unroutable_units"),
                captured: published,
                consumed,
                messages: get("published_msgs"),
                rendered: get("stmt_rendered"),
                ingress_runs: if stats { get("kernel_runs") } else { 0 },
                ingress_ns: if stats {
                    get("kernel_ns_per_packet")
                } else {
                    0
                },
                egress_runs: if stats { get("reply_kernel_runs") } else { 0 },
                egress_ns: if stats {
                    get("reply_kernel_ns_per_packet")
                } else {
                    0
                },
                rss_mb: get("rss_peak_mb"),
                ..Default::default()
            }
        }
        Config::Tcpdump => {
            let tcpdump = Tcpdump::start();
            let cpu0 = process_cpu(tcpdump.child.id());
            let (queries, qps, p95_ms) = parse_sysbench(&output(&mut bench));
            let cpu = process_cpu(tcpdump.child.id()) - cpu0;
            let (captured, drops) = tcpdump.stop();
            Run {
                qps,
                queries,
                p95_ms,
                cpu,
                drops,
                captured,
                ..Default::default()
            }
        }
    }
}

/// Rounds of every configuration, the order rotated each round.
fn rounds(configs: &[(Config, String)], rounds: usize, s: &Setup) -> Vec<Vec<Run>> {
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let r = run(configs[i].0, s);
            eprintln!(
                "{:?} {} round {round} {}: {r:?}",
                s.mode, s.workload, configs[i].1
            );
            runs[i].push(r);
        }
    }
    runs
}

fn is_agent(c: Config) -> bool {
    matches!(
        c,
        Config::Agent | Config::AgentRaw | Config::Baseline | Config::AgentStats
    )
}

/// Units the agent published that the consumer did not get, and what it counted as dropped.
fn lost(runs: &[Run]) -> String {
    let missing: u64 = runs
        .iter()
        .map(|r| r.captured.saturating_sub(r.consumed))
        .sum();
    let dropped: u64 = runs.iter().map(|r| r.drops).sum();
    format!("{dropped} / {missing}")
}

fn main() {
    let a = Args::parse(&[
        "secs",
        "rounds",
        "threads",
        "rate",
        "modes",
        "workloads",
        "agent_args",
        "baseline_bin",
        "configs",
        "out",
    ]);
    let agent_args: String = a.get("agent_args", String::new());
    let agent_args: Vec<&str> = agent_args.split_whitespace().collect();
    let baseline: Option<PathBuf> = a.list::<PathBuf>("baseline_bin", &[]).into_iter().next();
    let (secs, rounds_n, threads, rate) = (
        a.get("secs", 10u32),
        a.get("rounds", 5usize),
        a.get("threads", 4u32),
        a.get("rate", 12_000u32),
    );
    let modes: Vec<String> = a.list("modes", &["paced".to_owned(), "saturated".to_owned()]);
    let workloads: Vec<String> = a.list(
        "workloads",
        &["oltp_point_select".to_owned(), "oltp_read_write".to_owned()],
    );
    let mut configs: Vec<(Config, String)> = vec![
        (Config::Nothing, "nothing attached".into()),
        (Config::Agent, "mrte-collector".into()),
        (
            Config::AgentRaw,
            "mrte-collector, `--prepared_statements=off`".into(),
        ),
        (Config::Tcpdump, "tcpdump".into()),
    ];
    if let Some(b) = &baseline {
        configs.push((
            Config::Baseline,
            format!("baseline build ({})", b.display()),
        ));
    }
    configs.push((
        Config::AgentStats,
        "mrte-collector, `--bpf_stats` (kernel columns)".into(),
    ));
    // A subset, by index (nothing attached stays: ratios need it).
    let only: Vec<usize> = a.list("configs", &[]);
    if !only.is_empty() {
        configs.retain(|(c, _)| {
            let index = match c {
                Config::Nothing => return true,
                Config::Agent => 1,
                Config::AgentRaw => 2,
                Config::Tcpdump => 3,
                Config::Baseline => 4,
                Config::AgentStats => 5,
            };
            only.contains(&index)
        });
    }
    prepare();
    let flags = if agent_args.is_empty() {
        String::new()
    } else {
        format!(" plus `{}`", agent_args.join(" "))
    };
    let mut md = format!(
        "## Server overhead ({})\n\n\
         sysbench against the local MariaDB over TCP on `lo`, {threads} threads, {secs} s per \
         run, {rounds_n} rounds, the order of the configurations rotated each round; figures \
         are min / median / max over the rounds, ratios per round against nothing attached in \
         the same round. The agent: release build, default flags{flags}, publishing to RabbitMQ \
         on this machine, to a queue a consumer drains; tcpdump: `tcpdump -i lo -w /dev/null \
         'tcp dst port 3306'`. The machine has {} cores.\n\n",
        support::machine(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let setup = |mode, workload| Setup {
        mode,
        workload,
        threads,
        secs,
        rate,
        agent_args: &agent_args,
        baseline: baseline.as_ref(),
    };
    let mut json = Vec::new();
    if modes.iter().any(|m| m == "paced") {
        let workload = &workloads[0];
        let runs = rounds(&configs, rounds_n, &setup(Mode::Paced, workload));
        md.push_str(&format!(
            "### Paced: `{workload}` at {rate} transactions/s\n\n\
             CPU time (user + system) per query by process during the run; softirq: the whole \
             machine's, where loopback's packets and the TC programs run. Kernel programs: \
             from the agent with `--bpf_stats` (a configuration of its own: the stats add two \
             clock reads to every run of every program, which the other rows do not pay). \
             Lost: units the agent counted as dropped / units published that the consumer did \
             not get, all rounds.\n\n\
             | configuration | qps (median) | capturer us/query | RabbitMQ us/query | MariaDB us/query | softirq us/query | ingress ns/run | egress ns/run | ingress runs/query | units/message (median) | lost | peak RSS MiB (max) |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n"
        ));
        for (i, (config, name)) in configs.iter().enumerate() {
            let r = &runs[i];
            let per_q = |f: &dyn Fn(&Run) -> Duration| -> Vec<f64> {
                r.iter()
                    .map(|x| f(x).as_secs_f64() * 1e6 / x.queries.max(1.0))
                    .collect()
            };
            let col =
                |v: Vec<f64>, d: usize, on: bool| if on { fmt_spread(&v, d) } else { "-".into() };
            let agent = is_agent(*config);
            // The stats configuration, or any with `--bpf_stats` among `--agent_args`.
            let kernel = agent && r.iter().all(|x| x.ingress_runs > 0);
            let ns = |f: &dyn Fn(&Run) -> u64| r.iter().map(|x| f(x) as f64).collect::<Vec<_>>();
            md.push_str(&format!(
                "| {name} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                median(r.iter().map(|x| x.qps)),
                col(per_q(&|x| x.cpu), 2, *config != Config::Nothing),
                fmt_spread(&per_q(&|x| x.broker_cpu), 2),
                fmt_spread(&per_q(&|x| x.server_cpu), 2),
                fmt_spread(&per_q(&|x| x.softirq), 2),
                col(ns(&|x| x.ingress_ns), 0, kernel),
                col(
                    ns(&|x| x.egress_ns),
                    0,
                    kernel && *config != Config::AgentRaw
                ),
                col(
                    r.iter()
                        .map(|x| x.ingress_runs as f64 / x.queries.max(1.0))
                        .collect(),
                    2,
                    kernel
                ),
                if agent {
                    format!(
                        "{:.0}",
                        median(
                            r.iter()
                                .map(|x| x.captured as f64 / x.messages.max(1) as f64)
                        )
                    )
                } else {
                    "-".into()
                },
                if agent { lost(r) } else { "-".into() },
                if agent {
                    r.iter().map(|x| x.rss_mb).max().unwrap_or(0).to_string()
                } else {
                    "-".into()
                },
            ));
            json.push(run_json("paced", workload, name, r));
        }
        md.push('\n');
    }
    // The stats configuration only serves the paced kernel columns.
    configs.retain(|(c, _)| *c != Config::AgentStats);
    if modes.iter().any(|m| m == "saturated") {
        md.push_str(
            "### Saturated\n\n\
             | workload | configuration | qps (min / median / max) | qps ratio (min / median / max) | p95 ms (median) | p95 ratio (min / median / max) | capturer CPU % (median) | RabbitMQ CPU % (median) | captured (median) | lost |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for workload in &workloads {
            let runs = rounds(&configs, rounds_n, &setup(Mode::Saturated, workload));
            let qps = |i: usize| runs[i].iter().map(|r| r.qps).collect::<Vec<_>>();
            let p95 = |i: usize| runs[i].iter().map(|r| r.p95_ms).collect::<Vec<_>>();
            for (i, (config, name)) in configs.iter().enumerate() {
                let capturing = *config != Config::Nothing;
                let pct = |f: &dyn Fn(&Run) -> Duration| {
                    median(
                        runs[i]
                            .iter()
                            .map(|r| f(r).as_secs_f64() * 100.0 / secs as f64),
                    )
                };
                let captured = median(runs[i].iter().map(|r| r.captured as f64));
                let rendered = median(runs[i].iter().map(|r| r.rendered as f64));
                let dash = |s: String| if capturing { s } else { "-".into() };
                md.push_str(&format!(
                    "| {workload} | {name} | {} | {} | {:.2} | {} | {} | {:.1} | {} | {} |\n",
                    fmt_spread(&qps(i), 0),
                    fmt_spread(&ratios(&qps(i), &qps(0)), 3),
                    median(p95(i)),
                    fmt_spread(&ratios(&p95(i), &p95(0)), 3),
                    dash(format!("{:.1}", pct(&|r| r.cpu))),
                    pct(&|r| r.broker_cpu),
                    dash(match config {
                        Config::Agent | Config::Baseline =>
                            format!("{captured:.0} units ({rendered:.0} executes as text)"),
                        Config::AgentRaw => format!("{captured:.0} units"),
                        _ => format!("{captured:.0} packets"),
                    }),
                    dash(if is_agent(*config) {
                        lost(&runs[i])
                    } else {
                        runs[i].iter().map(|r| r.drops).sum::<u64>().to_string()
                    }),
                ));
                let mut j = run_json("saturated", workload, name, &runs[i]);
                j["qps_ratio"] = json!(ratios(&qps(i), &qps(0)));
                j["p95_ratio"] = json!(ratios(&p95(i), &p95(0)));
                json.push(j);
            }
        }
        md.push('\n');
    }
    support::write(&a, "overhead", &md, &serde_json::Value::Array(json));
}

fn run_json(mode: &str, workload: &str, name: &str, r: &[Run]) -> serde_json::Value {
    let v = |f: &dyn Fn(&Run) -> serde_json::Value| r.iter().map(f).collect::<Vec<_>>();
    json!({
        "mode": mode, "workload": workload, "configuration": name,
        "qps": v(&|x| json!(x.qps)), "queries": v(&|x| json!(x.queries)),
        "p95_ms": v(&|x| json!(x.p95_ms)),
        "capturer_cpu_s": v(&|x| json!(x.cpu.as_secs_f64())),
        "broker_cpu_s": v(&|x| json!(x.broker_cpu.as_secs_f64())),
        "server_cpu_s": v(&|x| json!(x.server_cpu.as_secs_f64())),
        "softirq_s": v(&|x| json!(x.softirq.as_secs_f64())),
        "captured": v(&|x| json!(x.captured)), "consumed": v(&|x| json!(x.consumed)),
        "messages": v(&|x| json!(x.messages)), "rendered": v(&|x| json!(x.rendered)),
        "dropped": v(&|x| json!(x.drops)),
        "ingress_runs": v(&|x| json!(x.ingress_runs)), "ingress_ns_per_run": v(&|x| json!(x.ingress_ns)),
        "egress_runs": v(&|x| json!(x.egress_runs)), "egress_ns_per_run": v(&|x| json!(x.egress_ns)),
        "rss_peak_mb": v(&|x| json!(x.rss_mb)),
    })
}
