//! Build, set-up and test tasks: `cargo xtask --help`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent): rust-src for nightly, LLVM 22,
    /// bpf-linker, MariaDB, RabbitMQ, iproute2, nftables, qemu and Debian 12's kernel for the
    /// kernel matrix; start MariaDB and RabbitMQ.
    Setup,
    /// Build the kernel program into target/ebpf/collector-ebpf.o.
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Build the kernel program and the agent (release).
    Build,
    /// Set up, build, and run mrte-collector (release) with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release), then run the benchmarks (all, or those named); each prints
    /// its table and writes it as Markdown and JSON into target/bench/.
    Bench {
        /// overhead (sysbench: nothing, the agent, tcpdump), tls (sysbench over TLS: what reading
        /// TLS sessions costs per query), capacity (load generator: zero-loss
        /// rate and cost curve), transport (ring buffer against perf buffer).
        #[arg(value_parser = ["overhead", "capacity", "transport", "tls"])]
        benches: Vec<String>,
        /// Arguments for the benchmark(s), after `--` (see the top of tests/benches/NAME.rs).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the release binary and the Debian package from it (binary, man page, shell
    /// completions, systemd unit, configuration file): target/package/mrte-collector_*.deb.
    Package,
    /// Build, then run the kernel matrix: the kernel-dependent integration tests inside a
    /// qemu guest of each kernel (Debian 12's 6.1; see xtask/src/vm.rs).
    VmTest,
    /// Set up, build, then run every test (unit and integration) plus fmt and clippy checks,
    /// and, unless a filter is given, the soak (two minutes) and the kernel matrix.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through; returns every test binary's results added
/// up (passed, failed), or an error if it failed.
fn test_and_sum(cmd: &mut Command) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = test_summary(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("tests: {passed} passed, {failed} failed");
        bail!("cargo test failed: {status}");
    }
    Ok((passed, failed))
}

/// (passed, failed) of a libtest `test result:` line.
fn test_summary(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let num = |word: &str| {
        rest.split(';')
            .find_map(|p| p.trim().strip_suffix(word))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((num("passed"), num("failed")))
}

fn setup() -> anyhow::Result<()> {
    run(Command::new("bash").arg(root().join("scripts/setup.sh")))
}

fn build_ebpf(release: bool) -> anyhow::Result<()> {
    let root = root();
    let dir = root.join("collector-ebpf");
    let target_dir = root.join("target/ebpf-build");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        // The user-space toolchain's variables would point the nightly build at the wrong rustc.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO")
        .args([
            "+nightly",
            "build",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let built = target_dir.join(format!("bpfel-unknown-none/{profile}/collector-ebpf"));
    let out = root.join("target/ebpf/collector-ebpf.o");
    std::fs::create_dir_all(out.parent().unwrap())?;
    // Copy only when changed, so that the agent's build script does not rebuild needlessly.
    let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if std::fs::read(&out).ok().as_deref() != Some(&new[..]) {
        std::fs::write(&out, &new).with_context(|| format!("writing {}", out.display()))?;
    }
    eprintln!("eBPF object: {}", out.display());
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root());
    c
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf { release } => build_ebpf(release),
        Cmd::Build => {
            build_ebpf(true)?;
            run(cargo().args(["build", "--release", "-p", "collector"]))
        }
        Cmd::Run { args } => {
            setup()?;
            build_ebpf(true)?;
            run(cargo().args(["build", "--release", "-p", "collector"]))?;
            run(Command::new(root().join("target/release/mrte-collector")).args(args))
        }
        Cmd::Bench { benches, args } => {
            setup()?;
            build_ebpf(true)?;
            run(cargo().args(["build", "--release", "-p", "collector"]))?;
            let benches = if benches.is_empty() {
                vec![
                    "overhead".into(),
                    "capacity".into(),
                    "transport".into(),
                    "tls".into(),
                ]
            } else {
                benches
            };
            for bench in benches {
                run(cargo()
                    .args(["bench", "-p", "integration-tests", "--bench", &bench, "--"])
                    .args(&args)
                    // The benchmarks run the agent as users do: the release build.
                    .env(
                        "MRTE_COLLECTOR_BIN",
                        root().join("target/release/mrte-collector"),
                    ))?;
            }
            Ok(())
        }
        Cmd::Package => {
            build_ebpf(true)?;
            run(cargo().args(["build", "--release", "-p", "collector"]))?;
            run(Command::new("bash")
                .arg(root().join("scripts/package.sh"))
                .arg(root().join("target/release/mrte-collector"))
                .arg(root().join("target/package")))
        }
        Cmd::VmTest => {
            build_ebpf(true)?;
            run(cargo().args(["build", "-p", "collector"]))?;
            let (passed, failed) = vm::run(&root())?;
            println!("kernel matrix: {passed} passed, {failed} failed");
            if failed > 0 {
                bail!("{failed} tests failed in the kernel matrix");
            }
            Ok(())
        }
        Cmd::Test { args } => {
            setup()?;
            build_ebpf(true)?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The integration tests run the real binary too.
            run(cargo().args(["build", "-p", "collector"]))?;
            // Tests share the kernel, the interfaces and the services: one at a time.
            let filtered = !args.is_empty();
            let (mut passed, mut failed) = test_and_sum(
                cargo()
                    .args(["test", "--workspace", "--lib", "--bins", "--tests"])
                    .args(["--", "--test-threads=1"])
                    .args(args),
            )?;
            // The soak (minutes, ignored by plain `cargo test`) runs when everything does.
            if !filtered {
                let (p, f) = test_and_sum(cargo().args([
                    "test",
                    "-p",
                    "integration-tests",
                    "--test",
                    "soak",
                    "--",
                    "--ignored",
                    "--nocapture",
                ]))?;
                passed += p;
                failed += f;
                // The kernel matrix: the kernel-dependent tests on Debian 12's own kernel.
                let (p, f) = vm::run(&root())?;
                println!("kernel matrix: {p} passed, {f} failed");
                passed += p;
                failed += f;
            }
            println!("tests: {passed} passed, {failed} failed");
            if failed > 0 {
                bail!("{failed} tests failed");
            }
            Ok(())
        }
    }
}
