//! The `mrte-collector` binary as a process: it attaches, it leaves nothing attached after
//! SIGINT, SIGTERM or SIGKILL, and bad input stops it with a message that says what to fix.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt as _;

use aya::programs::{SchedClassifier, TcAttachType};
use collector::capture::PROGRAM_NAME;
use nix::{sys::signal::Signal, unistd::Pid};

fn binary() -> PathBuf {
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

/// Our programs attached to `interface`'s TCX ingress.
fn ours_attached(interface: &str) -> usize {
    let (_, progs) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress).unwrap();
    progs
        .iter()
        .filter(|p| p.name_as_str() == Some(PROGRAM_NAME))
        .count()
}

/// Kills the agent if a test fails half-way.
struct Agent(Option<Child>);

impl Agent {
    fn start(args: &[&str]) -> Self {
        let child = Command::new(binary())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self(Some(child))
    }

    /// Waits for the "attached" log line.
    fn wait_attached(&mut self) {
        let stderr = self.0.as_mut().unwrap().stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("attached") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the agent did not report the program attached");
    }

    fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.0.as_ref().unwrap().id() as i32), sig).unwrap();
    }

    fn wait(mut self) -> Output {
        let child = self.0.take().unwrap();
        let start = Instant::now();
        let pid = Pid::from_raw(child.id() as i32);
        // Bounded wait: a hung agent fails the test instead of hanging it.
        let out = std::thread::spawn(move || child.wait_with_output().unwrap());
        while !out.is_finished() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                panic!("the agent did not exit within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        out.join().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_detached(interface: &str) {
    let start = Instant::now();
    while ours_attached(interface) != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "our program is still attached to {interface}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigint_and_sigterm_detach_and_print_totals() {
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let before = ours_attached("lo");
        let mut agent = Agent::start(&["--interface=lo", "--port=3306", "--status_interval=1"]);
        agent.wait_attached();
        assert_eq!(ours_attached("lo"), before + 1, "{sig}: attached once");
        std::thread::sleep(Duration::from_millis(1500));
        agent.signal(sig);
        let out = agent.wait();
        assert!(out.status.success(), "{sig}: exit status {}", out.status);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("DateTime"),
            "{sig}: status header in {stdout}"
        );
        assert!(
            stdout.contains("Totals: TotalPacket="),
            "{sig}: totals in {stdout}"
        );
        assert_eq!(ours_attached("lo"), before, "{sig}: detached");
    }
}

#[test]
fn sigkill_leaves_no_hook_and_a_new_start_works() {
    let before = ours_attached("lo");
    let mut agent = Agent::start(&["--interface", "lo", "--port", "3306"]);
    agent.wait_attached();
    assert_eq!(ours_attached("lo"), before + 1);
    agent.signal(Signal::SIGKILL);
    let out = agent.wait();
    assert!(!out.status.success());
    // The TCX link belonged to the dead process's descriptors: the kernel removed it.
    wait_detached("lo");
    assert_eq!(ours_attached("lo"), before);

    let mut again = Agent::start(&["--interface", "lo", "--port", "3306"]);
    again.wait_attached();
    again.signal(Signal::SIGINT);
    assert!(again.wait().status.success());
    assert_eq!(ours_attached("lo"), before);
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = Command::new(binary()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} not in: {stderr}");
    }
}

#[test]
fn bad_input_says_what_to_fix() {
    fails_with(
        &["--interface=nosuchif0"],
        &["unknown interface \"nosuchif0\"", "lo"],
    );
    fails_with(
        &[
            "--interface=lo",
            "--port=1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17",
        ],
        &["17 ports given", "at most 16"],
    );
    fails_with(&["--interface=lo", "--port=0"], &["--port", "0"]);
    fails_with(
        &["--interface=lo", "--snapshot_len=10"],
        &["--snapshot_len", "64..=65535"],
    );
    fails_with(&["--interface=lo", "--no_such_flag=1"], &["--no_such_flag"]);
    fails_with(&[], &["--interface"]);
}

#[test]
fn unprivileged_user_is_told_which_capabilities_are_missing() {
    let out = Command::new(binary())
        .args(["--interface=lo"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing privileges"), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
    assert_eq!(ours_attached("lo"), 0);
}

fn tc_show(args: &[&str]) -> String {
    let out = Command::new("tc").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netlink_mode_removes_its_filter_and_qdisc() {
    let ns = common::NetNs::new();
    common::sh(&["ip", "link", "set", &ns.host, "up"]);
    assert!(!tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
    let mut agent = Agent::start(&[&format!("--interface={}", ns.host), "--attach_mode=netlink"]);
    agent.wait_attached();
    assert!(tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
    let filters = tc_show(&["filter", "show", "dev", &ns.host, "ingress"]);
    assert!(filters.contains(PROGRAM_NAME), "filter: {filters}");
    agent.signal(Signal::SIGINT);
    assert!(agent.wait().status.success());
    assert_eq!(tc_show(&["filter", "show", "dev", &ns.host, "ingress"]), "");
    assert!(!tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
}
