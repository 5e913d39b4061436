//! The `mrte-collector` binary as a process: it attaches, it leaves nothing attached after
//! SIGINT, SIGTERM or SIGKILL, and bad input stops it with a message that says what to fix.

mod common;

use std::{os::unix::process::CommandExt as _, process::Command, time::Duration};

use collector::capture::{PROGRAM_NAME, REPLIES_PROGRAM_NAME};
use common::{
    agent::{Agent, binary, ours_attached, replies_attached, wait_detached, wait_stdout_line},
    broker::TestExchange,
};
use nix::sys::signal::Signal;

#[test]
fn sigint_and_sigterm_detach_and_print_totals() {
    let mq = TestExchange::new("lifecycle");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let before = ours_attached("lo");
        let replies_before = replies_attached("lo");
        let mut agent = Agent::start(&[
            "--interface=lo",
            "--port=3306",
            "--status_interval=1",
            &exchange,
        ]);
        let lines = agent.take_stdout_lines();
        agent.wait_attached();
        assert_eq!(ours_attached("lo"), before + 1, "{sig}: attached once");
        assert_eq!(
            replies_attached("lo"),
            replies_before + 1,
            "{sig}: the reply program on egress"
        );
        // A status line (the first comes with the header), then the signal.
        wait_stdout_line(&lines, 0, 60, |l| l.starts_with("DateTime"));
        agent.signal(sig);
        let out = agent.wait();
        assert!(out.status.success(), "{sig}: exit status {}", out.status);
        let stdout = lines.lock().unwrap().join("\n");
        assert!(
            stdout.contains("Totals: TotalPacket="),
            "{sig}: totals in {stdout}"
        );
        assert_eq!(ours_attached("lo"), before, "{sig}: detached");
        assert_eq!(replies_attached("lo"), replies_before, "{sig}: detached");
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
    assert!(
        stderr.contains("missing privileges: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        "{stderr}"
    );
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
    let filters = tc_show(&["filter", "show", "dev", &ns.host, "egress"]);
    assert!(filters.contains(REPLIES_PROGRAM_NAME), "filter: {filters}");
    agent.signal(Signal::SIGINT);
    assert!(agent.wait().status.success());
    assert_eq!(tc_show(&["filter", "show", "dev", &ns.host, "ingress"]), "");
    assert_eq!(tc_show(&["filter", "show", "dev", &ns.host, "egress"]), "");
    assert!(!tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
}

#[test]
fn a_second_agent_on_the_same_interface_is_refused() {
    let mq = TestExchange::new("second");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    let before = ours_attached("lo");
    let mut first = Agent::start(&["--interface=lo", "--port=3306", &exchange]);
    first.wait_attached();
    // Another port on the same interface: refused, saying who is there; nothing attached.
    let out = Command::new(binary())
        .args(["--interface=lo", "--port=3307", &exchange])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let who = format!(
        "another mrte-collector (pid {}, --port 3306) is already capturing on lo",
        first.pid()
    );
    assert!(stderr.contains(&who), "{stderr}");
    assert!(stderr.contains("--port takes a list"), "{stderr}");
    assert_eq!(ours_attached("lo"), before + 1, "the first one's hook only");

    // Another interface meanwhile: fine.
    let ns = common::NetNs::new();
    common::sh(&["ip", "link", "set", &ns.host, "up"]);
    let mut other = Agent::start(&[
        &format!("--interface={}", ns.host),
        "--local_ip=198.18.0.1",
        &exchange,
    ]);
    other.wait_attached();
    other.stop();

    // Once the first is gone, the interface is free.
    first.stop();
    let mut second = Agent::start(&["--interface=lo", "--port=3307", &exchange]);
    second.wait_attached();
    second.stop();
    assert_eq!(ours_attached("lo"), before);
    // A clean exit leaves no lock file behind (one per interface would pile up).
    let locks: Vec<_> = std::fs::read_dir(collector::instance::LOCK_DIR)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-lo.lock") || n.contains(&ns.host))
        .collect();
    assert!(locks.is_empty(), "{locks:?}");
}

/// The filters named like ours: the capture program on `dev`'s ingress, the reply program on
/// its egress.
fn our_filters(dev: &str) -> usize {
    [("ingress", PROGRAM_NAME), ("egress", REPLIES_PROGRAM_NAME)]
        .iter()
        .map(|(side, name)| {
            tc_show(&["filter", "show", "dev", dev, side])
                .lines()
                .filter(|l| l.contains(name))
                .count()
        })
        .sum()
}

#[test]
fn sigkill_in_netlink_mode_leaves_a_filter_the_next_start_removes() {
    let ns = common::NetNs::addressed(7);
    let mq = TestExchange::new("netlink_kill");
    let iface = format!("--interface={}", ns.host);
    let args = [
        iface.as_str(),
        "--attach_mode=netlink",
        "--mysql_optional",
        "--mysql_port=1",
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
    ];
    let qdisc = || tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact");

    // Killed: its filter and the clsact qdisc it added stay in the kernel.
    let mut killed = Agent::start(&args);
    killed.wait_attached();
    killed.signal(Signal::SIGKILL);
    assert!(!killed.wait().status.success());
    assert_eq!(our_filters(&ns.host), 2);
    assert!(qdisc());
    // Someone else's filter on the same hook (a classic BPF one, no name): never touched.
    common::sh(&[
        "tc",
        "filter",
        "add",
        "dev",
        &ns.host,
        "ingress",
        "prio",
        "7",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);

    // The next start removes the dead agent's filter, attaches its own, captures.
    let mut next = Agent::start(&args);
    next.wait_attached();
    next.wait_log_blocking(
        "removed the mrte_capture filter an agent that did not exit cleanly left",
    );
    next.wait_log_blocking(
        "removed the mrte_replies filter an agent that did not exit cleanly left",
    );
    assert_eq!(our_filters(&ns.host), 2, "exactly ours, one on each side");
    ns.run(|| {
        // A SYN to the MySQL port through the veth (nothing listens: refused).
        let _ = std::net::TcpStream::connect_timeout(
            &"198.18.7.1:3306".parse().unwrap(),
            Duration::from_secs(2),
        );
    });
    let next_log = next.log.clone();
    let stdout = next.stop();
    let next_log = next_log.lock().unwrap().clone();
    let t = common::agent::totals(&stdout);
    assert!(
        t["TotalPacket"] >= 1,
        "captured after the clean-up: {stdout}"
    );
    assert_eq!(our_filters(&ns.host), 0);
    let foreign = tc_show(&["filter", "show", "dev", &ns.host, "ingress"]);
    assert!(foreign.contains("bytecode '1,6 0 0 0'"), "{foreign}");
    // The qdisc carries the other filter, so it stays...
    assert!(qdisc());

    // ...until that filter is gone: the agent after that removes it (it inherited the job).
    common::sh(&[
        "tc", "filter", "del", "dev", &ns.host, "ingress", "prio", "7",
    ]);
    let mut last = Agent::start(&args);
    last.wait_attached();
    let out = last.stop();
    assert!(
        !qdisc(),
        "{}{out}\nthe agent before it:\n{next_log}",
        tc_show(&["qdisc", "show", "dev", &ns.host])
    );
}

/// `inspect` and an agent on one interface in netlink mode, in both start orders: the agent's
/// clean-up leaves the filter of a program a live process holds, both capture the same query,
/// and each removes only its own filter.
#[test]
fn inspect_and_an_agent_coexist_in_netlink_mode() {
    let ns = common::NetNs::addressed(8);
    let listener = std::net::TcpListener::bind("198.18.8.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mq = TestExchange::new("netlink_both");
    let iface = format!("--interface={}", ns.host);
    let port_arg = format!("--port={port}");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    let agent_args = [
        iface.as_str(),
        &port_arg,
        "--attach_mode=netlink",
        "--mysql_optional",
        "--mysql_port=1",
        &exchange,
    ];
    let inspect_args = ["inspect", &iface, &port_arg, "--attach_mode=netlink"];
    let ingress = || {
        tc_show(&["filter", "show", "dev", &ns.host, "ingress"])
            .lines()
            .filter(|l| l.contains(PROGRAM_NAME))
            .count()
    };
    for inspect_first in [true, false] {
        let (mut inspect, mut agent);
        if inspect_first {
            inspect = Agent::start(&inspect_args);
            inspect.wait_attached();
            agent = Agent::start(&agent_args);
            agent.wait_attached();
        } else {
            agent = Agent::start(&agent_args);
            agent.wait_attached();
            inspect = Agent::start(&inspect_args);
            inspect.wait_attached();
        }
        assert_eq!(ingress(), 2, "inspect first: {inspect_first}");
        assert!(inspect.running(), "inspect first: {inspect_first}");
        let sql = format!("SELECT 0, {}", u8::from(inspect_first));
        ns.run({
            let query = common::numbered_query(0, u32::from(inspect_first));
            move || {
                let mut c = std::net::TcpStream::connect(("198.18.8.1", port)).unwrap();
                std::io::Write::write_all(&mut c, &query).unwrap();
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let _ = listener.accept().unwrap();
        let agent_log = agent.log.clone();
        let stdout = agent.stop();
        let agent_log = agent_log.lock().unwrap().clone();
        assert!(
            !agent_log.contains("removed the"),
            "inspect first: {inspect_first}: {agent_log}"
        );
        assert!(
            common::agent::totals(&stdout)["ValidPacket"] >= 1,
            "{stdout}"
        );
        // The agent took only its own filter with it.
        assert_eq!(ingress(), 1, "inspect first: {inspect_first}");
        assert!(inspect.running(), "inspect first: {inspect_first}");
        let inspect_log = inspect.log.clone();
        let out = inspect.stop();
        let inspect_log = inspect_log.lock().unwrap().clone();
        assert!(out.contains(&sql), "inspect first: {inspect_first}: {out}");
        assert!(!inspect_log.contains(" ERROR "), "{inspect_log}");
        assert_eq!(ingress(), 0, "inspect first: {inspect_first}");
        if inspect_first {
            // The inspect added the qdisc and was the last to leave it.
            assert!(!tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
        }
    }
}

/// A segment for another host's MAC (what a bridge port, a macvlan parent or a mirror port
/// sees): left out and counted, and the log says so once, naming --other_hosts; with the flag
/// it is captured.
#[test]
fn segments_for_other_hosts_are_left_out_and_told_unless_asked_for() {
    use common::frames::{PORT, frame, ipv4, tcp};
    let ns = common::NetNs::new();
    common::sh(&["ip", "link", "set", &ns.host, "up"]);
    ns.ip(&["link", "set", &ns.peer, "up"]);
    let mq = TestExchange::new("other_host");
    let iface = format!("--interface={}", ns.host);
    let port = format!("--port={PORT}");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    let mut other = frame(
        0x0800,
        &ipv4(5, 6, 0, None, &tcp(PORT, 5, 0x18, b"\x01\0\0\0\x0e")),
    );
    other[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x09]);
    for asked in [false, true] {
        let mut args = vec![
            iface.as_str(),
            &port,
            "--mysql_optional",
            "--mysql_port=1",
            &exchange,
            "--status_interval=1",
            "--status_format=json",
            "--local_ip=198.18.9.1",
        ];
        if asked {
            args.push("--other_hosts");
        }
        let mut agent = Agent::start(&args);
        let lines = agent.take_stdout_lines();
        agent.wait_attached();
        ns.inject(other.clone());
        // A status line that counted it.
        let counted = |key: &str| {
            lines.lock().unwrap().iter().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|v| v["totals"][key].as_u64().is_some_and(|n| n > 0))
            })
        };
        let key = if asked { "with_payload" } else { "other_host" };
        let start = std::time::Instant::now();
        while !counted(key) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "asked: {asked}: no {key} counted"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if !asked {
            agent.wait_log_blocking("left out (other_host)");
            assert!(!counted("with_payload"));
        } else {
            assert!(!counted("other_host"));
        }
        let log = agent.log.clone();
        agent.stop();
        let told = log.lock().unwrap().matches("left out (other_host)").count();
        assert_eq!(told, usize::from(!asked), "asked: {asked}");
    }
}

#[test]
fn sighup_prints_a_status_line_and_a_closed_stdout_stops_nothing() {
    let mq = TestExchange::new("sighup");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    // No status line is due for an hour: the one printed is SIGHUP's.
    let mut agent = Agent::start(&["--interface=lo", "--status_interval=3600", &exchange]);
    agent.wait_attached();
    agent.signal(Signal::SIGHUP);
    agent.wait_log_blocking("SIGHUP: a status line now; nothing is re-read");
    assert!(agent.running(), "SIGHUP must not end the agent");
    let stdout = agent.stop();
    assert_eq!(common::agent::status_rows(&stdout).len(), 1, "{stdout}");

    // Whoever read stdout went away: status lines fail to print, capture goes on, and the
    // agent still exits cleanly.
    let mut agent = Agent::start(&["--interface=lo", "--status_interval=1", &exchange]);
    agent.wait_attached();
    agent.close_stdout();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(agent.running(), "{}", agent.log.lock().unwrap());
    let log = agent.log.clone();
    agent.signal(Signal::SIGINT);
    let out = agent.wait();
    assert!(out.status.success(), "{}", log.lock().unwrap());
    assert!(!log.lock().unwrap().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kernel_buffer_never_blocks_traffic_and_shows_in_packet_dropped() {
    let mq = TestExchange::new("ringfull");
    let sink = common::Sink::start("127.0.0.1:0".parse().unwrap()).await;
    let mut agent = Agent::start(&[
        "--interface=lo",
        &format!("--port={}", sink.addr.port()),
        &format!("--rabbitmq_exchange_name={}", mq.exchange),
        "--ring_buffer_mb=1",
        "--mysql_optional",
        "--mysql_port=1",
    ]);
    agent.wait_attached();
    // The agent stopped: nothing drains the 1 MiB ring. 16 MiB still goes through.
    agent.signal(Signal::SIGSTOP);
    let addr = sink.addr;
    let sender = std::thread::spawn(move || {
        use std::io::Write as _;
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        for _ in 0..1024 {
            c.write_all(&[0x55; 16 << 10]).unwrap();
        }
    });
    let start = std::time::Instant::now();
    while !sender.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "traffic blocked behind a full ring"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sender.join().unwrap();
    agent.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stdout = agent.stop();
    let t = common::agent::totals(&stdout);
    assert!(t["ring_full"] > 0, "{stdout}");
    assert!(t["PacketDropped"] >= t["ring_full"], "{stdout}");
    // Counted per segment that did not fit (a segment is one or more records).
    assert!(t["ring_full"] <= t["with_payload"], "{stdout}");
}

/// The attach modes by kernel: from 6.6 `auto` takes TCX and `--attach_mode=tcx` works; before
/// it `auto` falls back to clsact + netlink, and `tcx` is refused before anything is attached,
/// with an error naming the kernel and what TCX needs (the kernel matrix runs this on 6.1).
#[test]
fn attach_modes_follow_the_kernel() {
    let kernel = aya::util::KernelVersion::current().unwrap();
    let has_tcx = kernel >= aya::util::KernelVersion::new(6, 6, 0);
    let ns = common::NetNs::new();
    common::sh(&["ip", "link", "set", &ns.host, "up"]);
    let mq = TestExchange::new("modes");
    let iface = format!("--interface={}", ns.host);
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    let base = [iface.as_str(), "--local_ip=198.18.0.1", exchange.as_str()];
    let mut modes = vec!["auto"];
    if has_tcx {
        modes.push("tcx");
    }
    for mode in modes {
        let mut agent = Agent::start(&[&base[..], &[&format!("--attach_mode={mode}")]].concat());
        agent.wait_attached();
        let line = agent.log_line("capture program attached").unwrap();
        let want = if has_tcx { "tcx" } else { "netlink" };
        assert!(line.contains(&format!("mode=\"{want}\"")), "{mode}: {line}");
        let clsact = tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact");
        assert_eq!(
            clsact, !has_tcx,
            "{mode}: a clsact qdisc only in netlink mode"
        );
        agent.signal(Signal::SIGINT);
        assert!(agent.wait().status.success());
        assert!(!tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
    }
    if !has_tcx {
        let release = nix::sys::utsname::uname().unwrap();
        let release = release.release().to_string_lossy().into_owned();
        common::agent::fails_before_attaching(
            &[
                &base[..],
                &[
                    "--attach_mode=tcx",
                    "--mysql_user=mrte",
                    "--mysql_password=mrte",
                ],
            ]
            .concat(),
            &[],
            &["--attach_mode=tcx needs Linux 6.6 or later", &release],
        );
        assert!(!tc_show(&["qdisc", "show", "dev", &ns.host]).contains("clsact"));
    }
}
