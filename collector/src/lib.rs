//! mrte-collector: eBPF capture of MySQL client traffic for replay.
//!
//! - [`capture`]: loads and attaches the TC program, drains its ring buffer into [`capture::Record`]s.
//! - [`status`]: the periodic counter line.
//! - [`cli`]: command-line flags.
pub mod capture;
pub mod cli;
pub mod status;
