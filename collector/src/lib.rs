//! mrte-collector: eBPF capture of MySQL client traffic, published for replay in the MRTE
//! format.
//!
//! Records flow one way: capture → tcp → session → publish (fan-out, encode, RabbitMQ or a
//! recording); the bootstrap feeds the pipeline with what the MySQL process list says; status
//! reports on all. docs/architecture.md draws the stages.
//!
//! - [`capture`]: loads and attaches the TC programs (and the TLS probes), drains their ring
//!   buffer into [`capture::Record`]s; capture files give the same records ([`capture::pcap`]).
//! - [`tcp`]: each connection's client byte stream exactly once and in order
//!   (retransmissions, reordering, gaps, SYN/FIN/RST).
//! - [`session`]: each connection's MySQL packets: TLS plaintext, compressed frames inflated,
//!   query attributes off, replication left out, prepared statements as text.
//! - [`types`]: the session and connection keys, the record clock.
//! - [`pipeline`]: the agent's record sink: own connection left out, segments held for the
//!   bootstrap, flows, fan-out.
//! - [`bootstrap`]: the MySQL process list: COM_INIT_DB for sessions open before capture,
//!   COM_QUIT for sessions gone.
//! - [`prepared`]: server-side prepared statements as text (binary parameters to literals).
//! - [`protocol`]: MySQL packet framing, command bytes, the handshake response.
//! - [`encode`]: the MRTE wire format, encoder and decoder.
//! - [`publish`]: the fan-out and batching ([`publish::fanout`]), the publisher tasks
//!   ([`publish::publisher`]), the RabbitMQ connection, its checks and the supervisor that
//!   reconnects it ([`publish::broker`]).
//! - [`instance`]: one agent per interface (a lock), and clean-up after one that died.
//! - [`memory`]: how `--max_mem_mb` is split between the buffers, the budget they take from.
//! - [`recording`]: `--output file:PATH` recordings, `publish-file`.
//! - [`status`]: the counters and the periodic status line (text or JSON).
//! - [`metrics`]: the Prometheus endpoint (`--metrics_addr`).
//! - [`inspect`]: the `inspect` view: each session's commands, from the kernel, a queue or a
//!   recording.
//! - [`agent`]: every stage wired together: checks, start, the run loop, the orderly exit.
//! - [`cli`]: command-line flags, turned into each module's configuration.
pub mod agent;
pub mod bootstrap;
pub mod capture;
pub mod cli;
pub mod config_file;
pub mod encode;
pub mod inspect;
pub mod instance;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod prepared;
pub mod protocol;
pub mod publish;
pub mod recording;
pub mod session;
pub mod sockets;
pub mod status;
pub mod tcp;
pub mod types;

/// An error and its sources, joined by ": " (for a log line or a message that is not
/// anyhow's `{:#}`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    why
}
