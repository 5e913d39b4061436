use std::{io::IsTerminal as _, process::ExitCode, time::Duration};

use clap::Parser as _;
use collector::{
    agent::Agent,
    cli::{Cli, Command, OnOff, Run},
    inspect, publish,
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MRTE_LOG")
                // lapin logs the broker errors this agent reports itself, with advice.
                .unwrap_or_else(|_| "info,lapin=off".into()),
        )
        .init();
    let args = match collector::config_file::expand(std::env::args_os().collect(), |w| {
        tracing::warn!("{w}")
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mrte-collector: error: {}", collector::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mrte-collector: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async {
        match cli.command {
            None => run(cli.run).await,
            Some(Command::Inspect(args)) => inspect::run(args.config()).await,
            Some(Command::PublishFile(args)) => match (&args.path, &args.pcap) {
                (_, Some(pcap)) => {
                    let from = publish::FromPcap {
                        path: pcap.clone(),
                        ports: args.port.clone(),
                        prepared: args.prepared_statements == OnOff::On,
                        include_replication: args.include_replication,
                    };
                    publish::publish_pcap(&from, &args.rabbitmq.config()).await
                }
                (Some(path), None) => publish::publish_file(path, &args.rabbitmq.config()).await,
                (None, None) => unreachable!("clap requires a recording or --pcap"),
            },
            Some(Command::TlsOffsets) => collector::capture::tls::print_kernel_offsets(),
            Some(Command::Man) => {
                use std::io::Write as _;
                let page = collector::cli::man_page()?;
                std::io::stdout().write_all(&page).map_err(Into::into)
            }
            Some(Command::Completions { shell }) => {
                use std::io::Write as _;
                let out = collector::cli::completions(shell);
                std::io::stdout().write_all(&out).map_err(Into::into)
            }
        }
    };
    let code = match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mrte-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Everything was flushed and reported; a client library's blocking thread still waiting
    // on a socket must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(run: Run) -> anyhow::Result<()> {
    let mut agent = Agent::start(run.config()?).await?;
    let ran = agent.run_until_signal().await;
    if let Err(e) = &ran {
        // Attached and capturing: what was captured is still published and counted.
        tracing::error!("{e:#}; stopping");
    }
    let shut = agent.shutdown().await;
    ran.and(shut)
}
