//! The Debian package as an operator installs it: built from this build of the agent by
//! `scripts/package.sh` (what `cargo xtask package` runs on the release build), installed with
//! dpkg, its unit verified by systemd-analyze, and the unit's ExecStart line run with exactly
//! the capabilities the unit lists (no systemd runs here: setpriv drops the rest), against the
//! local MariaDB and RabbitMQ.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::{
    agent::{Agent, binary, fails_before_attaching_as},
    broker::TestExchange,
};

const UNIT: &str = "/lib/systemd/system/mrte-collector@.service";
const CONFIG: &str = "/etc/mrte-collector/mrte-collector.conf";

/// The installed package, purged when dropped (also when the test fails).
struct Installed;

impl Installed {
    fn install(deb: &Path) -> Self {
        let there = Command::new("dpkg-query")
            .args(["-W", "mrte-collector"])
            .output()
            .unwrap();
        assert!(
            !there.status.success(),
            "an mrte-collector package is installed already; the test would replace it"
        );
        let out = Command::new("dpkg").arg("-i").arg(deb).output().unwrap();
        let installed = Installed;
        assert!(out.status.success(), "dpkg -i: {out:?}");
        installed
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", "mrte-collector"]).output();
    }
}

fn build_package(out: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package.sh");
    let built = Command::new("bash")
        .arg(script)
        .arg(binary())
        .arg(out)
        .output()
        .unwrap();
    assert!(built.status.success(), "package.sh: {built:?}");
    let stdout = String::from_utf8_lossy(&built.stdout);
    PathBuf::from(stdout.lines().last().expect("the package's path").trim())
}

/// The value of `key=` in the unit's [Service] section.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

/// setpriv's arguments that leave root exactly `caps` (`CAP_BPF` ...) across the exec.
fn only_caps(caps: &[&str]) -> String {
    let mut spec = String::from("-all");
    for c in caps {
        spec.push_str(&format!(
            ",+{}",
            c.trim_start_matches("CAP_").to_lowercase()
        ));
    }
    spec
}

/// The effective capabilities of `pid`, by name.
fn effective_caps(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let names = [
        (2, "CAP_DAC_READ_SEARCH"),
        (12, "CAP_NET_ADMIN"),
        (19, "CAP_SYS_PTRACE"),
        (38, "CAP_PERFMON"),
        (39, "CAP_BPF"),
    ];
    let mut out: Vec<String> = names
        .iter()
        .filter(|(bit, _)| eff & (1u64 << bit) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known: u64 = names.iter().map(|(b, _)| 1u64 << b).sum();
    if eff & !known != 0 {
        out.push(format!("others {:#x}", eff & !known));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_installs_a_service_that_runs_with_only_the_capabilities_it_lists() {
    let dir = tempfile::tempdir().unwrap();
    let deb = build_package(dir.path());

    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for path in [
        "./usr/sbin/mrte-collector",
        "./usr/share/man/man8/mrte-collector.8.gz",
        "./usr/share/bash-completion/completions/mrte-collector",
        "./usr/share/zsh/vendor-completions/_mrte-collector",
        "./usr/share/fish/vendor_completions.d/mrte-collector.fish",
        "./lib/systemd/system/mrte-collector@.service",
    ] {
        assert!(
            listing.contains(path),
            "{path} not in the package:\n{listing}"
        );
    }
    let config_line = listing
        .lines()
        .find(|l| l.ends_with(".conf"))
        .expect("the configuration file");
    assert!(
        config_line.starts_with("-rw------- root/root")
            && config_line.ends_with(&format!(".{CONFIG}")),
        "{config_line}"
    );

    let _installed = Installed::install(&deb);
    let verify = Command::new("systemd-analyze")
        .args(["verify", "mrte-collector@lo.service"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {verify:?}"
    );
    let man = Command::new("man")
        .args(["-w", "8", "mrte-collector"])
        .output()
        .unwrap();
    assert!(man.status.success(), "the man page: {man:?}");
    // The completions are the binary's: they name its flags.
    let bash =
        std::fs::read_to_string("/usr/share/bash-completion/completions/mrte-collector").unwrap();
    assert!(bash.contains("--rabbitmq_exchange_name") && bash.contains("--config"));

    let unit = std::fs::read_to_string(UNIT).unwrap();
    let exec = unit_value(&unit, "ExecStart").replace("%i", "lo");
    let exec: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(exec[..3], ["/usr/sbin/mrte-collector", "--config", CONFIG]);
    let caps_line = unit_value(&unit, "CapabilityBoundingSet");
    let caps: Vec<&str> = caps_line.split_whitespace().collect();
    assert_eq!(unit_value(&unit, "Restart"), "on-failure");
    assert_eq!(unit_value(&unit, "KillSignal"), "SIGTERM");

    // The unit's command with only its capabilities, the packaged configuration, and for the
    // test its own exchange and the test user (the command line overrides the file).
    let mq = TestExchange::new("package");
    let exchange = format!("--rabbitmq_exchange_name={}", mq.exchange);
    let setpriv = Path::new("/usr/bin/setpriv");
    let run = |caps: &[&str]| {
        let bounding = format!("--bounding-set={}", only_caps(caps));
        let mut args: Vec<String> = vec![bounding, "--inh-caps=-all".into(), "--".into()];
        args.extend(exec.iter().map(|s| s.to_string()));
        args.push(exchange.clone());
        args
    };
    let args = run(&caps);
    let mut agent = Agent::start_binary(
        setpriv,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    agent.wait_attached();
    if common::tcp_recvmsg_traceable() {
        // A stock kernel: CAP_PERFMON is what uprobes need.
        agent.wait_log("TLS probes attached").await;
    } else {
        // This sandboxed kernel lets only CAP_SYS_ADMIN open uprobes: the agent runs without
        // TLS sessions and says why.
        agent.wait_log("TLS sessions will not be read").await;
        let line = agent.log_line("TLS sessions will not be read").unwrap();
        assert!(line.contains("perf_event_open"), "{line}");
    }
    let mut want: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
    want.sort();
    let mut got = effective_caps(agent.pid());
    got.sort();
    assert_eq!(got, want, "the agent's effective capabilities");
    let query = Command::new("mariadb")
        .args(["-h127.0.0.1", "-P3306", "-umrte", "-pmrte", "--ssl=0"])
        .args(["-e", "SELECT 'from the packaged agent'"])
        .output()
        .unwrap();
    assert!(query.status.success(), "{query:?}");
    let stdout = agent.stop();
    let messages = mq.take_all();
    let needle = b"SELECT 'from the packaged agent'";
    let published = messages.iter().any(|m| {
        collector::encode::decode_message(&m.data)
            .unwrap()
            .units
            .iter()
            .any(|u| u.data.windows(needle.len()).any(|w| w == needle))
    });
    assert!(
        published,
        "the query is not in the queue; the agent:\n{stdout}"
    );

    // Without what loading or attaching needs: refused before anything is attached, by name.
    for missing in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| *c != missing).collect();
        let args = run(&fewer);
        fails_before_attaching_as(
            setpriv,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
            &[missing],
        );
    }
    // Without what TLS needs: the agent runs, and says TLS sessions stay unread and why.
    for (missing, why) in [
        ("CAP_SYS_PTRACE", "finding the server process"),
        ("CAP_DAC_READ_SEARCH", "finding the server process"),
    ] {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| *c != missing).collect();
        let args = run(&fewer);
        let mut agent = Agent::start_binary(
            setpriv,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        agent.wait_attached();
        agent.wait_log("TLS sessions will not be read").await;
        let line = agent.log_line("TLS sessions will not be read").unwrap();
        assert!(
            line.contains(&format!("{missing} is missing: {why}")),
            "{line}"
        );
        agent.stop();
    }
}
