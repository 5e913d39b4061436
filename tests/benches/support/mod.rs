//! What the benchmarks share: their arguments, min/median/max over rounds, per-round ratios,
//! a process's CPU time, and writing a table as Markdown and JSON into `target/bench/`.
#![allow(dead_code)]

use std::{collections::HashMap, path::PathBuf, time::Duration};

/// `--name value` pairs after the bench's own name; `--bench` (added by cargo) is ignored.
pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse(known: &[&str]) -> Self {
        let mut map = HashMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            if k == "--bench" {
                continue;
            }
            let name = k
                .strip_prefix("--")
                .filter(|n| known.contains(n))
                .unwrap_or_else(|| panic!("unknown argument {k}; known: --{}", known.join(" --")));
            let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
            map.insert(name.to_owned(), v);
        }
        Self(map)
    }

    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.0.get(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--{name}: cannot parse {v:?}"))
        })
    }

    pub fn list<T: std::str::FromStr + Clone>(&self, name: &str, default: &[T]) -> Vec<T> {
        self.0.get(name).map_or_else(
            || default.to_vec(),
            |v| {
                v.split(',')
                    .map(|s| {
                        s.parse()
                            .unwrap_or_else(|_| panic!("--{name}: cannot parse {s:?}"))
                    })
                    .collect()
            },
        )
    }

    pub fn out_dir(&self) -> PathBuf {
        self.0.get("out").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
            PathBuf::from,
        )
    }
}

/// Min, median and max of `v` (NaNs last); all NaN when empty.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.to_vec();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// The median of `v`.
pub fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    spread(&v.into_iter().collect::<Vec<_>>()).1
}

/// "min / median / max" with `decimals` digits.
pub fn fmt_spread(v: &[f64], decimals: usize) -> String {
    let (lo, m, hi) = spread(v);
    format!("{lo:.decimals$} / {m:.decimals$} / {hi:.decimals$}")
}

/// `a[i] / b[i]` for each round: ratios of runs that were measured next to each other.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// User + system CPU time of process `pid` so far (from /proc/PID/stat, clock ticks).
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15; `fields[0]` is field 3.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos((ticks(11) + ticks(12)) * 1_000_000_000 / hz)
}

/// Where the benchmark ran: kernel, CPU model, cores, date.
pub fn machine() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("kernel {}, {cores} cores ({cpu})", release.trim())
}

/// Writes `NAME.md` and `NAME.json` into the output directory and prints the Markdown.
pub fn write(args: &Args, name: &str, md: &str, json: &serde_json::Value) {
    let dir = args.out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.md")), md).unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(json).unwrap(),
    )
    .unwrap();
    println!("{md}");
}

/// Runs `cmd` to success; its stdout.
pub fn output(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (cargo xtask setup installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
