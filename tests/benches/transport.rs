//! Record transport benchmark: ring buffer with size classes (the default) against a ring
//! buffer of fixed 16 KiB records and per-CPU perf buffers with the skb appended by the helper.
//!
//! For each payload size, rounds alternate the transports (A B C A B C ...). A load generator
//! writes fixed-size messages over loopback TCP connections to a sink as fast as it can for a
//! fixed time; the capture on `lo` hands them over. Reported per configuration: captured
//! segments per second, kernel program ns per packet (bpf_stats), the drain thread's CPU ns per
//! record (getrusage RUSAGE_THREAD), and losses; each as min/median/max over rounds and as a
//! ratio of medians against the default.
//!
//! `cargo xtask bench -- [--secs N] [--rounds N] [--conns N] [--sizes 64,1024,16384] [--hot_only]`

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use collector::capture::{Capture, CaptureConfig, Record, RecordSink, Transport};
use collector_common::Counter;

struct Args {
    secs: u64,
    rounds: usize,
    conns: usize,
    sizes: Vec<usize>,
    out: std::path::PathBuf,
    /// Only the kernel programs' hot cost (BPF_PROG_TEST_RUN), no load.
    hot_only: bool,
}

fn args() -> Args {
    let mut a = Args {
        secs: 4,
        rounds: 3,
        conns: 4,
        sizes: vec![64, 1024, 16384],
        out: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        hot_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--secs" => a.secs = v().parse().unwrap(),
            "--rounds" => a.rounds = v().parse().unwrap(),
            "--conns" => a.conns = v().parse().unwrap(),
            "--sizes" => a.sizes = v().split(',').map(|s| s.parse().unwrap()).collect(),
            "--out" => a.out = v().into(),
            "--hot_only" => a.hot_only = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn thread_cpu() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Count {
    records: u64,
    bytes: u64,
}

impl RecordSink for Count {
    fn push(&mut self, r: Record) {
        self.records += 1;
        self.bytes += r.data.len() as u64;
    }
}

/// A sink server on loopback: a thread per connection reading and discarding.
fn sink() -> (u16, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 18];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    (port, stop)
}

/// The capture's drain, registered with a runtime of its own (to run on another thread).
fn drain_with_runtime(
    capture: &mut Capture,
) -> (tokio::runtime::Runtime, collector::capture::Drain) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let drain = {
        let _in_rt = rt.enter();
        capture.take_drain().unwrap().unwrap()
    };
    (rt, drain)
}

#[derive(Clone, Copy, Default, Debug)]
struct Sample {
    segs_per_sec: f64,
    kernel_ns_per_pkt: f64,
    drain_ns_per_record: f64,
    lost: u64,
    sent_bytes: u64,
    captured_bytes: u64,
}

const BENCH_RING_BYTES: u32 = 64 << 20;

fn run_one(transport: Option<Transport>, size: usize, a: &Args) -> Sample {
    let (port, _stop) = sink();
    // `None`: attached, but capturing another port: what parsing and skipping costs.
    let mut cfg = CaptureConfig::new("lo", vec![if transport.is_some() { port } else { 1 }]);
    let transport_is_capturing = transport.is_some();
    let transport = transport.unwrap_or(Transport::RingClasses);
    cfg.transport = transport;
    // The size the README's table was measured with (the agent's default became 8 MiB later):
    // this compares transports, not ring sizes.
    cfg.ring_bytes = BENCH_RING_BYTES;
    let mut capture = Capture::attach(&cfg).expect("attach");
    let (rt, mut drain) = drain_with_runtime(&mut capture);
    let info0 = capture.program_info().unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let (d2, t2) = (done.clone(), target.clone());
    let drainer = std::thread::spawn(move || {
        rt.block_on(async move {
            let cpu0 = thread_cpu();
            let mut c = Count {
                records: 0,
                bytes: 0,
            };
            loop {
                let r =
                    tokio::time::timeout(Duration::from_millis(50), drain.drain_once(&mut c)).await;
                if let Ok(r) = r {
                    r.unwrap();
                }
                if d2.load(Ordering::SeqCst) && c.bytes >= t2.load(Ordering::SeqCst) {
                    break;
                }
            }
            (c, thread_cpu() - cpu0, drain.stats.lost)
        })
    });

    let start = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..a.conns)
        .map(|i| {
            let sent = sent.clone();
            let secs = a.secs;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_nodelay(true).unwrap();
                let msg = vec![i as u8; size];
                let mut n = 0u64;
                while start.elapsed() < Duration::from_secs(secs) {
                    s.write_all(&msg).unwrap();
                    n += size as u64;
                }
                sent.fetch_add(n, Ordering::SeqCst);
            })
        })
        .collect();
    for l in load {
        l.join().unwrap();
    }
    let elapsed = start.elapsed();
    // Wait until the drain has everything the kernel handed over (bounded).
    let deadline = Instant::now() + Duration::from_secs(if transport_is_capturing { 5 } else { 0 });
    let counters = loop {
        let c = capture.read_counters().unwrap();
        target.store(c.get(Counter::Bytes), Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        let c2 = capture.read_counters().unwrap();
        if c2 == c || Instant::now() > deadline {
            target.store(c2.get(Counter::Bytes), Ordering::SeqCst);
            break c2;
        }
    };
    done.store(true, Ordering::SeqCst);
    let (count, cpu, lost) = drainer.join().unwrap();
    let info1 = capture.program_info().unwrap();
    let runs = info1.run_count() - info0.run_count();
    let run_ns = (info1.run_time() - info0.run_time()).as_nanos() as f64;
    capture.detach().unwrap();
    Sample {
        segs_per_sec: counters.get(Counter::WithPayload) as f64 / elapsed.as_secs_f64(),
        kernel_ns_per_pkt: run_ns / runs.max(1) as f64,
        drain_ns_per_record: cpu.as_nanos() as f64 / count.records.max(1) as f64,
        lost: counters.get(Counter::RingFull) + counters.get(Counter::Truncated) + lost,
        sent_bytes: sent.load(Ordering::SeqCst),
        captured_bytes: count.bytes,
    }
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let a = args();
    if a.hot_only {
        println!("{}", hot_cost());
        return;
    }
    let stats_fd = collector::capture::enable_bpf_stats().expect("BPF_ENABLE_STATS (root?)");
    let transports = [
        (Some(Transport::RingClasses), "ring (size classes)"),
        (Some(Transport::RingFixed), "ring (fixed 16 KiB)"),
        (Some(Transport::PerfSkb), "perf (skb appended)"),
        (None, "attached, port not captured"),
    ];
    let mut md = format!(
        "Record transport, {} s per run, {} rounds (rotated), {} loopback connections, {} cores.\n\n\
         | payload | transport | segments/s (min / median / max) | ratio | kernel ns/packet (median) | ratio | drain CPU ns/record (median) | ratio | lost | captured/sent |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        a.secs,
        a.rounds,
        a.conns,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    );
    let mut json = Vec::new();
    for &size in &a.sizes {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); transports.len()];
        for round in 0..a.rounds {
            for k in 0..transports.len() {
                // Rotate the order each round so that no configuration always runs first.
                let i = (k + round) % transports.len();
                let s = run_one(transports[i].0, size, &a);
                eprintln!("size {size} round {round} {}: {s:?}", transports[i].1);
                samples[i].push(s);
            }
        }
        let med = |i: usize, f: fn(&Sample) -> f64| {
            stats(&mut samples[i].iter().map(f).collect::<Vec<_>>()).1
        };
        let base_rate = med(0, |s| s.segs_per_sec);
        let base_k = med(0, |s| s.kernel_ns_per_pkt);
        let base_d = med(0, |s| s.drain_ns_per_record);
        for (i, (_, name)) in transports.iter().enumerate() {
            let (lo, m, hi) = stats(
                &mut samples[i]
                    .iter()
                    .map(|s| s.segs_per_sec)
                    .collect::<Vec<_>>(),
            );
            let k = med(i, |s| s.kernel_ns_per_pkt);
            let d = med(i, |s| s.drain_ns_per_record);
            let lost: u64 = samples[i].iter().map(|s| s.lost).sum();
            let cap: u64 = samples[i].iter().map(|s| s.captured_bytes).sum();
            let sent: u64 = samples[i].iter().map(|s| s.sent_bytes).sum();
            if transports[i].0.is_none() {
                // Nothing captured: only the kernel cost means something.
                md.push_str(&format!(
                    "| {size} B | {name} | - | - | {k:.0} | {:.2} | - | - | - | - |\n",
                    k / base_k
                ));
            } else {
                md.push_str(&format!(
                    "| {size} B | {name} | {lo:.0} / {m:.0} / {hi:.0} | {:.2} | {k:.0} | {:.2} | {d:.0} | {:.2} | {lost} | {:.4} |\n",
                    m / base_rate,
                    k / base_k,
                    d / base_d,
                    cap as f64 / sent.max(1) as f64,
                ));
            }
            json.push(serde_json::json!({
                "payload": size, "transport": name,
                "segments_per_sec": {"min": lo, "median": m, "max": hi},
                "kernel_ns_per_packet_median": k, "drain_cpu_ns_per_record_median": d,
                "lost": lost, "captured_bytes": cap, "sent_bytes": sent,
            }));
        }
    }
    // BPF_PROG_TEST_RUN times the runs itself; bpf_stats would add its own clock reads.
    drop(stats_fd);
    md.push_str(&hot_cost());
    std::fs::create_dir_all(&a.out).unwrap();
    std::fs::write(a.out.join("transport.md"), &md).unwrap();
    std::fs::write(
        a.out.join("transport.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("{md}");
}

/// A minimal Ethernet + IPv4 + TCP frame to `dport` with `payload` bytes.
fn frame(dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    frame_from(40000, dport, flags, payload)
}

fn frame_from(sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 54 + payload];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[127, 0, 0, 1]);
    f[30..34].copy_from_slice(&[127, 0, 0, 1]);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = flags;
    if payload >= 5 {
        // One COM_QUERY packet, as a client's payload starts.
        f[54..58].copy_from_slice(&((payload - 4) as u32).to_le_bytes());
        f[57] = 0;
        f[58] = 3;
    }
    f
}

/// The programs' own cost per packet with hot caches and no contention: BPF_PROG_TEST_RUN
/// repeats one frame and the kernel reports the average. The ingress program with prepared
/// statements off and on (it then reads the first packet header of each payload), and the
/// egress (reply) program on what it mostly sees: traffic that is not a reply it awaits.
fn hot_cost() -> String {
    const PORT: u16 = 3;
    let mut out = String::from(
        "\nKernel programs alone, hot cache (BPF_PROG_TEST_RUN: median of 11 averages of 5000 \
         runs, the ring drained between frames; ratios against the ingress program with prepared statements \
         off on the same frame, same run):\n\n\
         | frame | ingress, prepared off (ns) | ingress, prepared on (ns) | ratio | egress reply program (ns) | ratio |\n\
         |---|---|---|---|---|---|\n",
    );
    let mut arp = frame(PORT, 0x10, 0);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // A COM_STMT_PREPARE packet at the payload's start (60 bytes of SQL), from another client
    // port, and the server's reply to it (sequence id 1), which the reply program takes once
    // per repetition: every repetition starts with no connection awaiting a reply.
    let mut prepare = frame_from(40001, PORT, 0x18, 64);
    prepare[54..59].copy_from_slice(&[61, 0, 0, 0, 0x16]);
    let mut reply = frame_from(PORT, 40001, 0x18, 64);
    reply[57] = 1;
    let frames: [(&str, Vec<u8>, bool); 9] = [
        ("ARP (not IP)", arp, true),
        ("TCP between other ports", frame(PORT + 1, 0x18, 64), true),
        ("pure ACK to the port", frame(PORT, 0x10, 0), false),
        ("64 B payload to the port", frame(PORT, 0x18, 64), false),
        ("1400 B payload to the port", frame(PORT, 0x18, 1400), false),
        (
            "64 B from the port, no connection awaiting a reply",
            frame_from(PORT, 40000, 0x18, 64),
            true,
        ),
        (
            "COM_STMT_PREPARE to the port (marks its connection; its retransmissions do not)",
            prepare,
            false,
        ),
        (
            "64 B from the port while another connection awaits a reply (a hash lookup)",
            frame_from(PORT, 40000, 0x18, 64),
            true,
        ),
        (
            "the reply to that PREPARE (taken by the first run, then a lookup that finds it answered)",
            reply,
            true,
        ),
    ];
    // Per frame and column, the runs of every repetition; the table shows medians.
    const REPEATS: usize = 11;
    let mut costs = vec![[Vec::new(), Vec::new(), Vec::new()]; frames.len()];
    for prepared in [false, true] {
        let mut cfg = CaptureConfig::new("lo", vec![PORT]);
        // 5000 records of up to 1400 B between two drains.
        cfg.ring_bytes = BENCH_RING_BYTES;
        cfg.prepared = prepared;
        let mut capture = Capture::attach(&cfg).unwrap();
        let (_rt, mut drain) = drain_with_runtime(&mut capture);
        for _ in 0..REPEATS {
            for (i, (_, f, _)) in frames.iter().enumerate() {
                let mut sink = Count {
                    records: 0,
                    bytes: 0,
                };
                let run = capture.test_run(f, 5_000).unwrap();
                drain.drain_now(&mut sink);
                costs[i][usize::from(prepared)].push(run.duration_ns as f64);
                if prepared {
                    let run = capture
                        .test_run_of(collector::capture::REPLIES_PROGRAM_NAME, f, 5_000)
                        .unwrap();
                    drain.drain_now(&mut sink);
                    costs[i][2].push(run.duration_ns as f64);
                }
            }
        }
        let c = capture.read_counters().unwrap();
        assert_eq!(
            c.get(Counter::RingFull),
            0,
            "the ring filled during the hot-cost runs"
        );
    }
    let ratio = |a: f64, base: f64| format!("{:.2}", a / base.max(1.0));
    for ((name, _, egress), [off, on, reply]) in frames.iter().zip(&costs) {
        let median = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                stats(&mut v.to_vec()).1
            }
        };
        let (off, on, reply) = (median(off), median(on), median(reply));
        let (reply, reply_ratio) = if *egress {
            (format!("{reply:.0}"), ratio(reply, off))
        } else {
            ("".into(), "".into())
        };
        out.push_str(&format!(
            "| {name} | {off:.0} | {on:.0} | {} | {reply} | {reply_ratio} |\n",
            ratio(on, off)
        ));
    }
    out
}
