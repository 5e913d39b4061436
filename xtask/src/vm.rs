//! The kernel matrix: integration tests run inside a VM booted with another kernel than the
//! host's, Debian 12's own (6.1: no TCX, clsact + netlink; fentry allowed), under qemu's TCG
//! (this machine's /dev/kvm cannot boot a stock kernel). `scripts/vm-kernel.sh` (run by the
//! set-up) unpacks the kernel and builds the initramfs; the guest mounts the host's root
//! read-only over 9p, so the test binaries, the agent and every tool are the host's, and
//! reaches the host's MariaDB and RabbitMQ on its own 127.0.0.1 through relays to qemu's
//! user-mode network (which hands 10.0.2.2 to the host's loopback).

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where `scripts/vm-kernel.sh` puts the kernels.
const VM_DIR: &str = "/var/cache/mrte-collector/vm";

/// The kernels of the matrix: their directory under [`VM_DIR`].
pub const KERNELS: [&str; 1] = ["debian-12"];

/// The tests run in the guest, by test target: those that depend on the kernel (attach modes,
/// clean-up, coexistence in netlink mode, the programs' parsing through veth, tun and
/// BPF_PROG_TEST_RUN, the TLS socket hooks). Empty: every test of the target.
const TESTS: [(&str, &[&str]); 5] = [
    ("capture_testrun", &[]),
    ("capture_veth", &[]),
    ("capture_tun", &[]),
    (
        "agent_lifecycle",
        &[
            "attach_modes_follow_the_kernel",
            "netlink_mode_removes_its_filter_and_qdisc",
            "sigkill_in_netlink_mode_leaves_a_filter_the_next_start_removes",
            "inspect_and_an_agent_coexist_in_netlink_mode",
            "a_second_agent_on_the_same_interface_is_refused",
        ],
    ),
    (
        "modern_sessions",
        &[
            "tls_compressed_and_change_user_sessions_replay_identically",
            "tls_sessions_replay_identically_through_the_sys_enter_hook",
        ],
    ),
];

/// Modules the tests need, loaded in the guest from the unpacked package (an installed kernel
/// loads them on demand; this one's modules are not where modprobe looks). `tcp_diag` (with
/// `inet_diag`): the sock_diag socket table.
const MODULES: [&str; 5] = ["sch_ingress", "cls_bpf", "veth", "tun", "tcp_diag"];

/// The whole guest run; qemu is killed past it.
const TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// qemu, killed when dropped (a failed or timed-out run leaves no VM behind).
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the test binaries, then runs [`TESTS`] in a guest of each kernel; returns the
/// tests passed and failed, added up.
pub fn run(root: &Path) -> anyhow::Result<(u64, u64)> {
    let binaries = build(root)?;
    let (mut passed, mut failed) = (0, 0);
    for kernel in KERNELS {
        let (p, f) = run_kernel(root, kernel, &binaries)?;
        passed += p;
        failed += f;
    }
    Ok((passed, failed))
}

/// The test binaries of [`TESTS`], by target name.
fn build(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args([
        "test",
        "-p",
        "integration-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for (target, _) in TESTS {
        cmd.args(["--test", target]);
    }
    eprintln!("+ {cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests for the VM failed");
    }
    let mut found = Vec::new();
    for line in out.stdout.lines() {
        let msg: serde_json::Value = serde_json::from_str(&line?)?;
        let name = msg["target"]["name"].as_str();
        if let (Some(exe), Some(name)) = (msg["executable"].as_str(), name)
            && TESTS.iter().any(|(t, _)| *t == name)
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    for (target, _) in TESTS {
        if !found.iter().any(|(n, _)| n == target) {
            bail!("cargo built no test binary {target}");
        }
    }
    Ok(found)
}

fn run_kernel(
    root: &Path,
    kernel: &str,
    binaries: &[(String, PathBuf)],
) -> anyhow::Result<(u64, u64)> {
    let kdir = Path::new(VM_DIR).join(kernel);
    let (vmlinuz, initramfs) = (kdir.join("vmlinuz"), kdir.join("initramfs.cpio.gz"));
    if !vmlinuz.exists() || !initramfs.exists() {
        bail!(
            "no {kernel} kernel in {}: run scripts/vm-kernel.sh (cargo xtask setup does)",
            kdir.display()
        );
    }
    let run = root.join("target/vm").join(kernel);
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run)?;
    let stage2 = run.join("stage2.sh");
    std::fs::write(&stage2, stage2_script(root, &kdir, &run, binaries))?;
    let console = run.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg,thread=multi", "-smp", "2", "-m", "3072"])
        .args(["-display", "none", "-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet mrte.stage2={}",
            stage2.display()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=none",
            run.display()
        ))
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .stdin(Stdio::null());
    eprintln!("+ {qemu:?}");
    let started = Instant::now();
    let mut vm = Vm(qemu.spawn().context("starting qemu-system-x86_64")?);
    let status = loop {
        if let Some(status) = vm.0.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(vm);
    eprintln!(
        "vm {kernel}: {} s, qemu {}",
        started.elapsed().as_secs(),
        status.map_or("killed at the timeout".into(), |s| s.to_string())
    );
    let (mut passed, mut failed) = (0, 0);
    for (target, _) in TESTS {
        let log = std::fs::read_to_string(run.join(format!("{target}.log"))).unwrap_or_default();
        let rc = std::fs::read_to_string(run.join(format!("{target}.rc"))).unwrap_or_default();
        let (p, f) = results(&log);
        println!(
            "vm {kernel} {target}: {p} passed, {f} failed (exit {})",
            rc.trim()
        );
        if rc.trim() != "0" || p == 0 {
            println!("--- {target} in the {kernel} guest:\n{log}\n---");
            // A binary that did not finish counts as one failure at least.
            failed += f.max(1);
        } else {
            failed += f;
        }
        passed += p;
    }
    if failed > 0 {
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        println!("--- the {kernel} guest's console (last lines):");
        for l in tail.iter().rev() {
            println!("{l}");
        }
    }
    Ok((passed, failed))
}

/// The libtest summary of one binary's log.
fn results(log: &str) -> (u64, u64) {
    log.lines()
        .filter_map(crate::test_summary)
        .fold((0, 0), |(p, f), (dp, df)| (p + dp, f + df))
}

/// What the guest runs once the host's root is mounted: file systems, modules, network and
/// relays, each test binary (its log and exit code into the shared run directory), power off.
fn stage2_script(root: &Path, kdir: &Path, run: &Path, binaries: &[(String, PathBuf)]) -> String {
    let mut s = format!(
        "#!/bin/sh\n\
         # Written by cargo xtask vm-test; run by the guest's init.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp\n\
         RUN={run}\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out \"$RUN\"\n\
         exec > \"$RUN/stage2.log\" 2>&1\n\
         set -x\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t tracefs tracefs /sys/kernel/tracing\n\
         for m in {modules}; do modprobe -d {kroot} -S \"$(uname -r)\" \"$m\"; done\n\
         ip link set lo up\n\
         ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2\n\
         # The host's services, on the guest's loopback as the tests expect them.\n\
         for p in 3306 5672; do\n\
         \x20 socat TCP-LISTEN:$p,bind=127.0.0.1,fork,reuseaddr TCP:10.0.2.2:$p &\n\
         done\n\
         uname -r > \"$RUN/kernel\"\n\
         grep -cw tcp_recvmsg /sys/kernel/tracing/available_filter_functions\n\
         cd {tests}\n",
        run = run.display(),
        modules = MODULES.join(" "),
        kroot = kdir.join("root").display(),
        tests = root.join("tests").display(),
    );
    for (target, names) in TESTS {
        let exe = &binaries.iter().find(|(n, _)| n == target).expect("built").1;
        let exact = if names.is_empty() {
            String::new()
        } else {
            format!(" --exact {}", names.join(" "))
        };
        s.push_str(&format!(
            "{exe} --test-threads=1{exact} > \"$RUN/{target}.log\" 2>&1; echo $? > \"$RUN/{target}.rc\"\n",
            exe = exe.display(),
        ));
    }
    s.push_str("sync\n/bin/busybox poweroff -f\n");
    s
}
