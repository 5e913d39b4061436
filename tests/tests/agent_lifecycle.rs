//! The `mrte-collector` binary as a process: it attaches, it leaves nothing attached after
//! SIGINT, SIGTERM or SIGKILL, and bad input stops it with a message that says what to fix.

mod common;

use std::{os::unix::process::CommandExt as _, process::Command, time::Duration};

use collector::capture::PROGRAM_NAME;
use common::{
    agent::{Agent, binary, ours_attached, wait_detached},
    broker::TestExchange,
};
use nix::sys::signal::Signal;

#[test]
fn sigint_and_sigterm_detach_and_print_totals() {
    let mq = TestExchange::new("lifecycle");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let before = ours_attached("lo");
        let mut agent = Agent::start(&[
            "--interface=lo",
            "--port=3306",
            "--status_interval=1",
            &exchange,
        ]);
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
    let mq = TestExchange::new("sigkill");
    let args = [
        "--interface",
        "lo",
        "--port",
        "3306",
        "--rabbitmq_exchange_name",
        &mq.exchange,
    ];
    let before = ours_attached("lo");
    let mut agent = Agent::start(&args);
    agent.wait_attached();
    assert_eq!(ours_attached("lo"), before + 1);
    agent.signal(Signal::SIGKILL);
    let out = agent.wait();
    assert!(!out.status.success());
    // The TCX link belonged to the dead process's descriptors: the kernel removed it.
    wait_detached("lo");
    assert_eq!(ours_attached("lo"), before);

    let mut again = Agent::start(&args);
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
        &["--snapshot_len", "4096..=65535"],
    );
    fails_with(
        &["--interface=lo", "--max_mem_mb=64", "--ring_buffer_mb=64"],
        &[
            "--max_mem_mb 64 is too small",
            "Raise --max_mem_mb to 172 or more",
        ],
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
    let mq = TestExchange::new("netlink");
    let mut agent = Agent::start(&[
        &format!("--interface={}", ns.host),
        "--attach_mode=netlink",
        // The veth end has no address of its own.
        "--local_ip=198.18.0.1",
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
    ]);
    agent.wait_attached();
    assert!(tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
    let filters = tc_show(&["filter", "show", "dev", &ns.host, "ingress"]);
    assert!(filters.contains(PROGRAM_NAME), "filter: {filters}");
    agent.signal(Signal::SIGINT);
    assert!(agent.wait().status.success());
    assert_eq!(tc_show(&["filter", "show", "dev", &ns.host, "ingress"]), "");
    assert!(!tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
}
