//! Capture capacity and cost curve of the whole agent (the release binary, capturing on `lo`
//! and publishing to RabbitMQ), under a load generator of the benchmark's own: many loopback
//! connections writing MySQL COM_QUERY packets to a sink server (so that MariaDB is not the
//! limit), each packet one `write` with TCP_NODELAY.
//!
//! - Capacity: for each packet size, at `--capacity_conns` connections, the load runs unpaced
//!   with nothing attached (the baseline) and with the agent, then paced at fractions of the
//!   baseline's rate. A consumer on a queue bound to the agent's exchange decodes every message
//!   (checksums verified) and adds up the payload bytes it carries: a run loses nothing when
//!   those equal the bytes the generator wrote.
//! - Cost curve: unpaced, at each number of connections and packet size, nothing attached and
//!   with the agent alternating, to show how the agent's cost grows with the work.
//!
//! Per run, from the agent: CPU seconds (user + system, /proc) per million captured segments
//! between attach and the last byte reaching the queue, the kernel program's ns per packet
//! (`--bpf_stats`), peak RSS (VmHWM) and every drop counter that moved.
//!
//! `cargo xtask bench capacity -- [--secs 5] [--rounds 3] [--sizes 64,1024,16384]
//!  [--conns 1,10,100,1000] [--capacity_conns 100] [--fractions 0.1,0.25,0.5,0.75]
//!  [--parts capacity,cost] [--agent_args "--thread_count=8 ..."]`

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    Sink,
    agent::{Agent, totals},
    broker::{Consumer, TestExchange},
};
use serde_json::json;
use support::{Args, fmt_spread, median, process_cpu, ratios};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

/// Drop and loss counters of the agent's exit summary, any of which moving means a loss.
const DROPS: [&str; 10] = [
    "ring_full",
    "truncated",
    "lost",
    "malformed",
    "queue_full",
    "mem_limit",
    "mq_error_units",
    "mq_unroutable_units",
    "gap_bytes",
    "hold_overflow",
];

/// A COM_QUERY packet of `size` bytes in all: `SELECT 'xxx…'`.
fn com_query(size: usize) -> Vec<u8> {
    assert!(size >= 16, "packets of at least 16 bytes");
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(&(size as u32 - 4).to_le_bytes()[..3]);
    p.extend_from_slice(&[0, 0x03]);
    p.extend_from_slice(b"SELECT '");
    p.resize(size - 1, b'x');
    p.push(b'\'');
    p
}

#[derive(Clone, Copy, Debug)]
struct Load {
    conns: usize,
    size: usize,
    /// Packets per second in all; `None`: as fast as the connections take them.
    rate: Option<f64>,
    secs: f64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    bytes: u64,
    packets: u64,
    secs: f64,
}

impl Sent {
    fn rate(&self) -> f64 {
        self.packets as f64 / self.secs
    }
}

/// Opens the connections, writes for `secs`, then closes them (FIN).
async fn generate(addr: SocketAddr, load: Load) -> Sent {
    let mut streams = Vec::with_capacity(load.conns);
    for _ in 0..load.conns {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        streams.push(s);
    }
    let msg = Arc::new(com_query(load.size));
    let per_conn = load.rate.map(|r| r / load.conns as f64);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(load.secs);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let msg = msg.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    match per_conn {
                        None => {
                            s.write_all(&msg).await.unwrap();
                            n += 1;
                        }
                        Some(r) => {
                            // Whatever is due by now, then a tick: the average rate holds
                            // at any rate, whatever the timer's resolution.
                            let due = ((now - start).as_secs_f64() * r) as u64;
                            while n < due {
                                s.write_all(&msg).await.unwrap();
                                n += 1;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                s.shutdown().await.unwrap();
                n
            })
        })
        .collect();
    let mut packets = 0;
    for t in tasks {
        packets += t.await.unwrap();
    }
    Sent {
        bytes: packets * load.size as u64,
        packets,
        secs: start.elapsed().as_secs_f64(),
    }
}

/// One run with the agent attached.
#[derive(Clone, Debug, Default)]
struct Captured {
    sent: Sent,
    published: u64,
    segments: u64,
    /// Agent CPU from attach until the last byte reached the queue.
    cpu: Duration,
    kernel_ns_per_packet: f64,
    rss_peak_mb: u64,
    drops: Vec<(String, u64)>,
}

impl Captured {
    fn lost(&self) -> u64 {
        self.sent.bytes.saturating_sub(self.published)
    }

    fn cpu_s_per_million(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.segments.max(1) as f64
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "packets_per_sec": self.sent.rate(),
            "sent_bytes": self.sent.bytes,
            "published_bytes": self.published,
            "segments": self.segments,
            "agent_cpu_s": self.cpu.as_secs_f64(),
            "agent_cpu_s_per_million_segments": self.cpu_s_per_million(),
            "kernel_ns_per_packet": self.kernel_ns_per_packet,
            "rss_peak_mb": self.rss_peak_mb,
            "drops": self.drops.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        })
    }
}

struct Bench {
    rt: tokio::runtime::Runtime,
    /// Extra agent flags (`--agent_args "--thread_count=8 ..."`).
    agent_args: Vec<String>,
    sink: SocketAddr,
    _sink: Sink,
}

impl Bench {
    fn new(agent_args: Vec<String>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let sink = rt.block_on(Sink::start("127.0.0.1:0".parse().unwrap()));
        Self {
            rt,
            agent_args,
            sink: sink.addr,
            _sink: sink,
        }
    }

    fn baseline(&self, load: Load) -> Sent {
        let sent = self.rt.block_on(generate(self.sink, load));
        eprintln!("  nothing attached {load:?}: {:.0} packets/s", sent.rate());
        sent
    }

    fn captured(&self, load: Load) -> Captured {
        let exchange = TestExchange::new("bench");
        let consumer = Consumer::start(&exchange.queue);
        let mut args = vec![
            "--interface=lo".to_owned(),
            format!("--port={}", self.sink.port()),
            format!("--rabbitmq_exchange_name={}", exchange.exchange),
            "--bpf_stats".to_owned(),
            "--bootstrap_second_pass_ms=500".to_owned(),
        ];
        args.extend(self.agent_args.iter().cloned());
        let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
        agent.wait_attached();
        // Steady state: the bootstrap holds every segment during its first two process-list
        // reads and releases them in one burst (see the README's benchmark notes).
        agent.wait_log_blocking("pass=Second");
        let cpu0 = process_cpu(agent.pid());
        let sent = self.rt.block_on(generate(self.sink, load));
        consumer.wait(|c| c.payload_bytes >= sent.bytes, Duration::from_secs(3));
        let cpu = process_cpu(agent.pid()) - cpu0;
        let out = agent.stop();
        let t = totals(&out);
        let get = |k: &str| t.get(k);
        // Everything the agent published is in the queue: wait for it (bounded).
        let got = consumer.wait(
            |c| c.units >= get("published_units"),
            Duration::from_secs(10),
        );
        drop(consumer);
        assert_eq!(
            got.undecodable, 0,
            "a published message that does not decode"
        );
        let (published, received_units) = (got.payload_bytes, got.units);
        assert_eq!(
            received_units,
            get("published_units"),
            "units the agent counted as published against units in the queue"
        );
        let run = Captured {
            sent,
            published,
            segments: get("with_payload"),
            cpu,
            kernel_ns_per_packet: get("kernel_ns_per_packet") as f64,
            rss_peak_mb: get("rss_peak_mb"),
            drops: DROPS
                .iter()
                .filter(|&&k| get(k) != 0)
                .map(|&k| (k.to_owned(), get(k)))
                .collect(),
        };
        eprintln!(
            "  agent {load:?}: {:.0} packets/s, lost {} of {} B, {:.2} CPU s/M segments, {} ns/packet, {} MiB, drops {:?}",
            run.sent.rate(),
            run.lost(),
            run.sent.bytes,
            run.cpu_s_per_million(),
            run.kernel_ns_per_packet,
            run.rss_peak_mb,
            run.drops
        );
        assert!(
            run.published <= run.sent.bytes,
            "more bytes published ({}) than sent ({}): a stream published twice",
            run.published,
            run.sent.bytes
        );
        run
    }
}

fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn drops_text(runs: &[Captured]) -> String {
    let mut all = std::collections::BTreeMap::<String, u64>::new();
    for r in runs {
        for (k, v) in &r.drops {
            *all.entry(k.clone()).or_default() += v;
        }
    }
    if all.is_empty() {
        "none".into()
    } else {
        all.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn capacity(b: &Bench, a: &Args, md: &mut String, json: &mut Vec<serde_json::Value>) {
    let (secs, rounds) = (a.get("secs", 5.0), a.get("rounds", 3usize));
    let conns = a.get("capacity_conns", 100usize);
    let fractions = a.list("fractions", &[0.1, 0.25, 0.5, 0.75]);
    md.push_str(&format!(
        "### Capacity: {conns} connections, {secs} s per run, {rounds} rounds\n\n\
         Steps: unpaced with nothing attached (the baseline), unpaced with the agent, then paced \
         at fractions of the round's baseline rate. \"lost\": payload bytes written by the \
         generator and not found in the queue, over all rounds.\n\n\
         | packet | step | packets/s (min / median / max) | ratio to nothing attached (min / median / max) | MB/s (median) | lost B | rounds without loss | drops | agent CPU s / M segments (median) | kernel ns/packet (median) | peak RSS MiB (max) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    ));
    let mut summary = Vec::new();
    for size in a.list("sizes", &[64usize, 1024, 16384]) {
        eprintln!("capacity: {} packets", size_name(size));
        let load = |rate| Load {
            conns,
            size,
            rate,
            secs,
        };
        let mut base = Vec::new();
        let mut steps: Vec<Vec<Captured>> = vec![Vec::new(); fractions.len() + 1];
        for round in 0..rounds {
            // A B, then B A: neither always runs first.
            let (b0, unpaced) = if round % 2 == 0 {
                let s = b.baseline(load(None));
                (s, b.captured(load(None)))
            } else {
                let c = b.captured(load(None));
                (b.baseline(load(None)), c)
            };
            steps[fractions.len()].push(unpaced);
            for (i, f) in fractions.iter().enumerate() {
                steps[i].push(b.captured(load(Some(b0.rate() * f))));
            }
            base.push(b0);
        }
        let base_rates: Vec<f64> = base.iter().map(Sent::rate).collect();
        md.push_str(&format!(
            "| {} | nothing attached, unpaced | {} | 1 | {:.1} | - | - | - | - | - | - |\n",
            size_name(size),
            fmt_spread(&base_rates, 0),
            median(base_rates.iter().copied()) * size as f64 / 1e6,
        ));
        let mut best_zero_loss: Option<f64> = None;
        for (i, runs) in steps.iter().enumerate() {
            let step = fractions.get(i).map_or("unpaced".to_owned(), |f| {
                format!("paced at {f} of baseline")
            });
            let rates: Vec<f64> = runs.iter().map(|r| r.sent.rate()).collect();
            let med = |f: fn(&Captured) -> f64| median(runs.iter().map(f));
            let lost: u64 = runs.iter().map(Captured::lost).sum();
            let clean = runs.iter().filter(|r| r.lost() == 0).count();
            if clean == runs.len() {
                let m = median(rates.iter().copied());
                best_zero_loss = Some(best_zero_loss.map_or(m, |b: f64| b.max(m)));
            }
            md.push_str(&format!(
                "| {} | {step} | {} | {} | {:.1} | {lost} | {clean} of {} | {} | {:.2} | {:.0} | {} |\n",
                size_name(size),
                fmt_spread(&rates, 0),
                fmt_spread(&ratios(&rates, &base_rates), 3),
                median(rates.iter().copied()) * size as f64 / 1e6,
                runs.len(),
                drops_text(runs),
                med(Captured::cpu_s_per_million),
                med(|r| r.kernel_ns_per_packet),
                runs.iter().map(|r| r.rss_peak_mb).max().unwrap_or(0),
            ));
            json.push(json!({
                "part": "capacity", "packet_bytes": size, "connections": conns, "step": step,
                "baseline_packets_per_sec": base_rates,
                "runs": runs.iter().map(Captured::json).collect::<Vec<_>>(),
            }));
        }
        summary.push(format!(
            "- {}: highest rate without loss in every round: {}",
            size_name(size),
            best_zero_loss.map_or("none (every step lost bytes)".into(), |r| format!(
                "{r:.0} packets/s ({:.1} MB/s)",
                r * size as f64 / 1e6
            ))
        ));
    }
    md.push('\n');
    md.push_str(&summary.join("\n"));
    md.push_str("\n\n");
}

fn cost_curve(b: &Bench, a: &Args, md: &mut String, json: &mut Vec<serde_json::Value>) {
    let (secs, rounds) = (a.get("secs", 5.0), a.get("rounds", 3usize));
    md.push_str(&format!(
        "### Cost curve: unpaced, {secs} s per run, {rounds} rounds (nothing attached and the agent alternating)\n\n\
         \"cost ratio\": the agent's CPU per segment against the same packet size at the fewest connections, measured in this run.\n\n\
         | packet | connections | packets/s, nothing attached (median) | packets/s, agent (median) | ratio (min / median / max) | lost B | drops | agent CPU s / M segments (median) | cost ratio | kernel ns/packet (median) | ratio | peak RSS MiB (max) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    ));
    for size in a.list("sizes", &[64usize, 1024, 16384]) {
        let mut first: Option<(f64, f64)> = None;
        for conns in a.list("conns", &[1usize, 10, 100, 1000]) {
            eprintln!(
                "cost curve: {} packets, {conns} connections",
                size_name(size)
            );
            let load = Load {
                conns,
                size,
                rate: None,
                secs,
            };
            let (mut base, mut runs) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                if round % 2 == 0 {
                    base.push(b.baseline(load).rate());
                    runs.push(b.captured(load));
                } else {
                    runs.push(b.captured(load));
                    base.push(b.baseline(load).rate());
                }
            }
            let rates: Vec<f64> = runs.iter().map(|r| r.sent.rate()).collect();
            let cpu = median(runs.iter().map(Captured::cpu_s_per_million));
            let ns = median(runs.iter().map(|r| r.kernel_ns_per_packet));
            let (cpu0, ns0) = *first.get_or_insert((cpu, ns));
            md.push_str(&format!(
                "| {} | {conns} | {:.0} | {:.0} | {} | {} | {} | {cpu:.2} | {:.2} | {ns:.0} | {:.2} | {} |\n",
                size_name(size),
                median(base.iter().copied()),
                median(rates.iter().copied()),
                fmt_spread(&ratios(&rates, &base), 3),
                runs.iter().map(Captured::lost).sum::<u64>(),
                drops_text(&runs),
                cpu / cpu0,
                ns / ns0,
                runs.iter().map(|r| r.rss_peak_mb).max().unwrap_or(0),
            ));
            json.push(json!({
                "part": "cost_curve", "packet_bytes": size, "connections": conns,
                "baseline_packets_per_sec": base,
                "runs": runs.iter().map(Captured::json).collect::<Vec<_>>(),
            }));
        }
    }
    md.push('\n');
}

fn main() {
    let a = Args::parse(&[
        "secs",
        "rounds",
        "sizes",
        "conns",
        "capacity_conns",
        "fractions",
        "parts",
        "agent_args",
        "out",
    ]);
    // 1000 connections are 2000 sockets in this process.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let parts: Vec<String> = a.list("parts", &["capacity".to_owned(), "cost".to_owned()]);
    let agent_args: String = a.get("agent_args", String::new());
    let b = Bench::new(agent_args.split_whitespace().map(str::to_owned).collect());
    let mut md = format!(
        "## Capture capacity and cost ({})\n\n\
         The agent: release build, default flags plus `--bpf_stats --bootstrap_second_pass_ms=500` {}, \
         the load started after the bootstrap's second pass, on `lo`, publishing to a \
         RabbitMQ exchange on this machine with a queue that this benchmark consumes; load \
         generator, sink, broker and consumer share the same cores.\n\n",
        support::machine(),
        agent_args,
    );
    let mut json = Vec::new();
    if parts.iter().any(|p| p == "capacity") {
        capacity(&b, &a, &mut md, &mut json);
    }
    if parts.iter().any(|p| p == "cost") {
        cost_curve(&b, &a, &mut md, &mut json);
    }
    support::write(&a, "capacity", &md, &serde_json::Value::Array(json));
}
