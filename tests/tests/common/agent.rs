//! The `mrte-collector` binary as a child process, killed on drop if a test fails half-way.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use collector::capture::{PROGRAM_NAME, REPLIES_PROGRAM_NAME};
use nix::{sys::signal::Signal, unistd::Pid};

pub fn binary() -> PathBuf {
    let path = std::env::var_os("MRTE_COLLECTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mrte-collector")
        });
    assert!(
        path.is_file(),
        "{} not found: build it first (cargo build -p collector; `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Flags for an agent on `lo` capturing a MariaDB server of the test's own on `port`, with a
/// GC every second and a short second pass and read timeout.
pub fn local_server_args(port: u16, exchange: &str) -> Vec<String> {
    vec![
        "--interface=lo".into(),
        format!("--port={port}"),
        format!("--mysql_port={port}"),
        format!("--rabbitmq_exchange_name={exchange}"),
        "--gc_interval=1".into(),
        "--bootstrap_second_pass_ms=300".into(),
        "--read_timeout=20".into(),
    ]
}

/// Our capture programs attached to `interface`'s TCX ingress.
pub fn ours_attached(interface: &str) -> usize {
    tcx_count(interface, TcAttachType::Ingress, PROGRAM_NAME)
}

/// Our prepared-statement reply programs attached to `interface`'s TCX egress.
pub fn replies_attached(interface: &str) -> usize {
    tcx_count(interface, TcAttachType::Egress, REPLIES_PROGRAM_NAME)
}

/// On a kernel without TCX (before 6.6), where the TCX query is refused and the agent attaches
/// through netlink, its tc filters of that name are counted instead.
fn tcx_count(interface: &str, side: TcAttachType, name: &str) -> usize {
    let tcx = aya::util::KernelVersion::new(6, 6, 0);
    if aya::util::KernelVersion::current().is_ok_and(|k| k < tcx) {
        let dir = if side == TcAttachType::Ingress {
            "ingress"
        } else {
            "egress"
        };
        let out = Command::new("tc")
            .args(["filter", "show", "dev", interface, dir])
            .output()
            .unwrap();
        return String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == name))
            .count();
    }
    let (_, progs) = SchedClassifier::query_tcx(interface, side).unwrap();
    progs
        .iter()
        .filter(|p| p.name_as_str() == Some(name))
        .count()
}

/// Kills the agent if a test fails half-way.
pub struct Agent {
    child: Option<Child>,
    /// What the agent logged so far (stderr), once `wait_attached` took it over.
    pub log: Arc<Mutex<String>>,
    /// The thread reading stdout's lines ([`Self::take_stdout_lines`]): joined once the agent
    /// exits, so that every line is there when `wait` or `stop` returns.
    stdout_reader: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    /// Starts the agent with `args`, plus the test MariaDB's port and credentials unless
    /// `args` name them.
    pub fn start(args: &[&str]) -> Self {
        Self::start_binary(&binary(), args)
    }

    /// [`Self::start`] with another build of the agent (a benchmark's baseline).
    pub fn start_binary(binary: &std::path::Path, args: &[&str]) -> Self {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // A subcommand (inspect, publish-file) takes no MySQL flags.
        let subcommand = args.first().is_some_and(|a| !a.starts_with('-'));
        for (flag, value) in [
            ("--mysql_port", "3306"),
            ("--mysql_user", super::MYSQL_USER),
            ("--mysql_password", super::MYSQL_PASSWORD),
        ] {
            if !subcommand && !args.iter().any(|a| a.starts_with(flag)) {
                all.push(format!("{flag}={value}"));
            }
        }
        let child = Command::new(binary)
            .args(&all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            log: Arc::default(),
            stdout_reader: None,
        }
    }

    /// Waits for the "attached" log line; the log keeps being collected into `self.log`.
    pub fn wait_attached(&mut self) {
        let stderr = self.child.as_mut().unwrap().stderr.take().unwrap();
        let log = self.log.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let attached = line.contains("capture program attached");
                {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                // Told once the line is in the log, for a test that reads it next.
                if attached {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!(
                "the agent did not report the program attached; its log:\n{}",
                self.log.lock().unwrap()
            );
        }
    }

    /// Waits (at most 20 s) until the log, collected since `wait_attached`, contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let start = Instant::now();
        while !self.logged(needle, start) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first line of the log so far that contains `needle`.
    pub fn log_line(&self, needle: &str) -> Option<String> {
        let log = self.log.lock().unwrap();
        log.lines().find(|l| l.contains(needle)).map(str::to_owned)
    }

    /// [`Self::wait_log`] for tests without a runtime.
    pub fn wait_log_blocking(&self, needle: &str) {
        let start = Instant::now();
        while !self.logged(needle, start) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How often the log so far contains `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    /// Waits (at most 30 s) until the log holds `more` more lines with `needle` than now:
    /// `pass=Gc` for garbage-collection passes, say.
    pub fn wait_log_more_blocking(&self, needle: &str, more: usize) {
        let want = self.log_count(needle) + more;
        let start = Instant::now();
        while self.log_count(needle) < want {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the agent did not log {needle:?} {more} more times; its log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Self::wait_log_more_blocking`] in a test with a runtime.
    pub async fn wait_log_more(&self, needle: &str, more: usize) {
        let want = self.log_count(needle) + more;
        let start = Instant::now();
        while self.log_count(needle) < want {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the agent did not log {needle:?} {more} more times; its log:\n{}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn logged(&self, needle: &str, since: Instant) -> bool {
        let log = self.log.lock().unwrap();
        assert!(
            log.contains(needle) || since.elapsed() < Duration::from_secs(20),
            "the agent did not log {needle:?}; its log:\n{log}"
        );
        log.contains(needle)
    }

    /// SIGINT, then waits; asserts a clean exit and returns stdout followed by the log.
    pub fn stop(self) -> String {
        self.signal(Signal::SIGINT);
        let log = self.log.clone();
        let out = self.wait();
        let all = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            log.lock().unwrap()
        );
        assert!(out.status.success(), "{all}");
        all
    }

    /// Collects stdout's lines as they come (`stop` then returns the log only; every line is
    /// in them once it returns).
    pub fn take_stdout_lines(&mut self) -> Arc<Mutex<Vec<String>>> {
        let stdout = self.child.as_mut().unwrap().stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let l = lines.clone();
        self.stdout_reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        }));
        lines
    }

    /// Closes the read end of the agent's stdout, as a reader that quit would.
    pub fn close_stdout(&mut self) {
        drop(self.child.as_mut().unwrap().stdout.take());
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// A field of the agent's /proc status (e.g. `VmHWM`), in bytes.
    pub fn proc_status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        collector::memory::proc_status_bytes(&status, field)
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    pub fn signal(&self, sig: Signal) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        nix::sys::signal::kill(Pid::from_raw(pid), sig).unwrap();
    }

    /// Waits (at most 30 s) for the agent to exit.
    pub fn wait(mut self) -> Output {
        let child = self.child.take().unwrap();
        let start = Instant::now();
        let pid = Pid::from_raw(child.id() as i32);
        // Bounded wait: a hung agent fails the test instead of hanging it.
        let out = std::thread::spawn(move || child.wait_with_output().unwrap());
        while !out.is_finished() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                panic!("the agent did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = out.join().unwrap();
        // The pipe's end follows the exit: the last lines are read by then.
        if let Some(reader) = self.stdout_reader.take() {
            reader.join().unwrap();
        }
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (at most `secs`) for a line of `lines` (see [`Agent::take_stdout_lines`]), from the
/// `from`th on, that `pred` takes; returns its index. Panics with the lines if none comes.
pub fn wait_stdout_line(
    lines: &Mutex<Vec<String>>,
    from: usize,
    secs: u64,
    pred: impl Fn(&str) -> bool,
) -> usize {
    let start = Instant::now();
    loop {
        {
            let lines = lines.lock().unwrap();
            if let Some(i) = lines.iter().skip(from).position(|l| pred(l)) {
                return from + i;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "no such line in {secs} s:\n{}",
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_detached(interface: &str) {
    let start = Instant::now();
    while ours_attached(interface) + replies_attached(interface) != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "our program is still attached to {interface}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The status rows (not the header or log lines) of `stdout`, each as column → value (the
/// numeric columns; Broker is text). Rows start "YYYY-MM-DD hh:mm:ss"; log lines
/// "YYYY-MM-DDThh".
pub fn status_rows(stdout: &str) -> Vec<std::collections::HashMap<String, u64>> {
    let header: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("DateTime"))
        .map(|h| h.split_whitespace().collect())
        .unwrap_or_default();
    stdout
        .lines()
        .filter(|l| l.starts_with("20") && l.as_bytes().get(10) == Some(&b' '))
        .map(|l| {
            // The date and time are two words; the header names them with one.
            let values = l.split_whitespace().skip(2);
            header
                .iter()
                .skip(1)
                .zip(values)
                .filter(|(h, _)| **h != "Broker")
                .map(|(h, v)| (h.to_string(), v.parse().unwrap()))
                .collect()
        })
        .collect()
}

/// The exit summary's `Totals:` line. A counter that did not move is not printed and reads 0;
/// a name the agent has no counter for panics, so a renamed counter cannot pass as zero.
pub fn totals(stdout: &str) -> Totals {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Totals: "))
        .unwrap_or_else(|| panic!("no Totals line in: {stdout}"));
    Totals(
        line.split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect(),
    )
}

/// See [`totals`].
pub struct Totals(std::collections::HashMap<String, u64>);

impl Totals {
    /// The counter's total, 0 if it did not move.
    pub fn get(&self, name: &str) -> u64 {
        self[name]
    }

    /// The counter's total if the line printed it (the original's columns always are).
    pub fn printed(&self, name: &str) -> Option<u64> {
        let _ = self[name];
        self.0.get(name).copied()
    }
}

impl std::ops::Index<&str> for Totals {
    type Output = u64;

    fn index(&self, name: &str) -> &u64 {
        self.0.get(name).unwrap_or_else(|| {
            let known = [
                "TotalPacket",
                "ValidPacket",
                "PacketDropped",
                "PacketIfDropped",
                "WaitingQueueCnt",
                "MQError",
                "rss_peak_mb",
            ]
            .contains(&name)
                || collector::status::Totals::default()
                    .named()
                    .iter()
                    .any(|(n, kind, _)| *n == name && *kind == collector::status::Kind::Counter);
            assert!(known, "the agent has no counter {name:?}");
            &0
        })
    }
}

/// Runs the agent with `args` (and `env`) and checks that it fails with every one of
/// `needles` in its error, and that nothing was attached.
pub fn fails_before_attaching(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    fails_before_attaching_as(&binary(), args, env, needles)
}

/// [`fails_before_attaching`] with `program` (the agent under a wrapper, say) in its place.
pub fn fails_before_attaching_as(
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    needles: &[&str],
) {
    let before = ours_attached("lo");
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // An agent that did not stop is running: it is stopped, and the test fails.
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still ran after 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} not in: {stderr}");
    }
    assert!(!stderr.contains("capture program attached"), "{stderr}");
    assert_eq!(ours_attached("lo"), before);
}
