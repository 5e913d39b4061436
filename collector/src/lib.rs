//! mrte-collector: eBPF capture of MySQL client traffic, published for replay in the MRTE
//! format.
//!
//! Records flow capture → flow → publish (fan-out, encode, RabbitMQ); status reports on all.
//!
//! - [`capture`]: loads and attaches the TC program, drains its ring buffer into [`capture::Record`]s.
//! - [`flow`]: per-session state: retransmissions dropped, the agent's record sink.
//! - [`encode`]: the MRTE wire format, encoder and decoder.
//! - [`publish`]: RabbitMQ connection and checks, fan-out, batching, publisher tasks.
//! - [`status`]: the counters and the periodic status line.
//! - [`cli`]: command-line flags.
pub mod capture;
pub mod cli;
pub mod encode;
pub mod flow;
pub mod publish;
pub mod status;
