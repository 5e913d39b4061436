//! `--metrics_addr`: every figure of the status totals and the capture-to-publish latency
//! histogram as Prometheus (OpenMetrics) text on `/metrics`.
//!
//! Each scrape asks the agent's main loop for a fresh [`Totals`] (the same snapshot the status
//! line is made of), so that a scrape and a status line taken at the same moment agree.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use collector_common::{Counter as KernelCounter, CounterClass};

use crate::status::{Kind, Totals};

/// A request for the current totals, answered by the main loop.
pub type TotalsRequest = oneshot::Sender<Totals>;

/// The latency histogram: seconds from the kernel's capture of a message's first segment to
/// the broker's acceptance of the message (its write, or its confirm with confirms on).
pub fn latency_histogram() -> Histogram {
    // 0.25 ms to ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

#[derive(Debug, thiserror::Error)]
#[error(
    "--metrics_addr {addr}: cannot listen there; is the port in use, or the address not one of \
     this host's?"
)]
pub struct MetricsError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Binds the endpoint (before capture starts, so that a bad address stops the agent).
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError {
            addr: addr.to_owned(),
            source,
        })
}

/// Serves `/metrics` until the agent stops.
pub async fn serve(
    listener: TcpListener,
    requests: mpsc::Sender<TotalsRequest>,
    latency: Histogram,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (requests, latency) = (requests.clone(), latency.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, requests.clone(), latency.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "metrics connection: {e}");
            }
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    requests: mpsc::Sender<TotalsRequest>,
    latency: Histogram,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(ctype),
        );
        Ok(r)
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into());
    }
    let (tx, rx) = oneshot::channel();
    let totals = match requests.send(tx).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    match totals {
        Some(t) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&t, &latency),
        ),
        None => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the agent is stopping\n".into(),
        ),
    }
}

/// Labels of one sample: `program` (ingress, egress) and/or `reason`.
type Labels = Vec<(&'static str, &'static str)>;

/// The families of a scrape, each registered once.
#[derive(Default)]
struct Families {
    labelled: Vec<(&'static str, &'static str, Family<Labels, Counter>)>,
    plain: Vec<(&'static str, &'static str, u64)>,
}

impl Families {
    /// Adds `v` to the sample of `family` with `labels`, registering the family on first use.
    fn add(&mut self, family: &'static str, help: &'static str, labels: Labels, v: u64) {
        if labels.is_empty() {
            self.plain.push((family, help, v));
            return;
        }
        let f = match self.labelled.iter().position(|(n, _, _)| *n == family) {
            Some(i) => &self.labelled[i].2,
            None => {
                self.labelled.push((family, help, Family::default()));
                &self.labelled.last().expect("pushed").2
            }
        };
        f.get_or_create(&labels).inc_by(v);
    }
}

/// The help of a pipeline counter family (the `in` of `pipeline_counters!`).
fn family_help(family: &str) -> &'static str {
    match family {
        "gaps_lost" => {
            "TCP gaps given up and TLS plaintext lost (the session got a COM_QUIT there), by \
             reason"
        }
        "flows_closed" => "flows ended by the client's FIN or RST, by reason",
        "lost_units" => {
            "units handed to the publishers and not published, by reason; with published_units \
             they account for batched_units plus mq_lost_sessions"
        }
        "mq_given_up" => "broker connections (and channels) given up, by cause",
        "stmt_lost" => "prepared-statement commands that could not be published, by reason",
        _ => "see docs/status.md",
    }
}

/// The text of one scrape. Kernel counters are `kernel_packets_total`, `kernel_records_total`
/// and `kernel_bytes_total` with a `program` label (ingress, egress) and, for packets, a
/// `reason` (the counter's name); pipeline counters that are one reason among others are a
/// family with a `reason` label (the counter's name in the exit summary: `lost_units_total`,
/// `mq_given_up_total`, `gaps_lost_total`, `flows_closed_total`, `stmt_lost_total`); every
/// other figure is `<name>_total` (counters) or `<name>` (gauges), named as in the exit
/// summary. Then PacketDropped, ParseError (per program) and the latency histogram.
pub fn render(t: &Totals, latency: &Histogram) -> String {
    let mut registry = Registry::with_prefix("mrte_collector");
    let mut families = Families::default();
    for (program, counters) in [("ingress", &t.kernel), ("egress", &t.replies)] {
        let egress = program == "egress";
        let mut parse_errors = 0;
        for c in KernelCounter::ALL {
            let v = counters.get(c);
            if c.is_parse_error() {
                parse_errors += v;
            }
            // The egress program counts only some, under names of its own.
            let reason = match (egress, c.egress_name()) {
                (false, _) => c.name(),
                (true, Some(n)) => n.strip_prefix("reply_").unwrap_or(n),
                (true, None) if c.is_parse_error() => c.name(),
                (true, None) => continue,
            };
            let labels = vec![("program", program)];
            match c.class() {
                CounterClass::Bytes => families.add(
                    "kernel_bytes",
                    "payload bytes the kernel program handed over",
                    labels,
                    v,
                ),
                CounterClass::Records => families.add(
                    "kernel_records",
                    "records the kernel program handed over",
                    labels,
                    v,
                ),
                CounterClass::Packets | CounterClass::ParseError => families.add(
                    "kernel_packets",
                    "packets the kernel program counted, by reason (docs/status.md)",
                    [labels, vec![("reason", reason)]].concat(),
                    v,
                ),
            }
        }
        families.add(
            "parse_errors",
            "ParseError: packets the kernel program could not parse",
            vec![("program", program)],
            parse_errors,
        );
    }
    for (reason, v) in [("lost", t.drain.lost), ("malformed", t.drain.malformed)] {
        families.add(
            "drain_dropped",
            "records lost between the kernel and the pipeline, by reason",
            vec![("reason", reason)],
            v,
        );
    }
    families.add(
        "if_dropped",
        "PacketIfDropped: the interface's rx_dropped since start",
        vec![],
        t.if_dropped,
    );
    for (name, family, v) in t.pipeline.in_families() {
        match family {
            Some(f) => families.add(f, family_help(f), vec![("reason", name)], v),
            None => families.add(name, "see docs/status.md", vec![], v),
        }
    }
    families.add(
        "packets_dropped",
        "PacketDropped: every loss inside the collector, kernel buffer to publisher queues",
        vec![],
        t.dropped(),
    );
    for (name, help, family) in families.labelled {
        registry.register(name, help, family);
    }
    for (name, help, v) in families.plain {
        registry.register(name, help, ConstCounter::new(v));
    }
    for (name, kind, v) in t.named() {
        if kind == Kind::Gauge {
            registry.register(
                name,
                format!("{name} now (docs/status.md)"),
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)),
            );
        }
    }
    registry.register(
        "capture_to_publish_seconds",
        "Seconds from the capture of a message's first segment to the broker taking the message",
        latency.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel counter of each program is one sample, labelled with its program and
    /// reason, and the parse errors are summed per program.
    #[test]
    fn kernel_counters_are_labelled_by_program_and_reason() {
        let mut t = Totals::default();
        for (i, c) in KernelCounter::ALL.iter().enumerate() {
            t.kernel.0[*c as usize] = 1000 + i as u64;
            t.replies.0[*c as usize] = 2000 + i as u64;
        }
        let text = render(&t, &latency_histogram());
        let value = |sample: &str| -> u64 {
            let line = text
                .lines()
                .find(|l| l.split(' ').next() == Some(sample))
                .unwrap_or_else(|| panic!("no {sample} in\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let ingress = |c: KernelCounter| {
            format!(
                "mrte_collector_kernel_packets_total{{program=\"ingress\",reason=\"{}\"}}",
                c.name()
            )
        };
        assert_eq!(
            value(&ingress(KernelCounter::RingFull)),
            t.kernel.get(KernelCounter::RingFull)
        );
        assert_eq!(
            value(&ingress(KernelCounter::EthShort)),
            t.kernel.get(KernelCounter::EthShort)
        );
        assert_eq!(
            value("mrte_collector_kernel_packets_total{program=\"egress\",reason=\"from_port\"}"),
            t.replies.get(KernelCounter::TcpToPort)
        );
        assert_eq!(
            value("mrte_collector_kernel_bytes_total{program=\"egress\"}"),
            t.replies.get(KernelCounter::Bytes)
        );
        assert_eq!(
            value("mrte_collector_parse_errors_total{program=\"ingress\"}"),
            t.parse_errors()
        );
        let egress_errors: u64 = KernelCounter::ALL
            .iter()
            .filter(|c| c.is_parse_error())
            .map(|&c| t.replies.get(c))
            .sum();
        assert_eq!(
            value("mrte_collector_parse_errors_total{program=\"egress\"}"),
            egress_errors
        );
        // Counted by the ingress program only: no egress sample.
        assert!(!text.contains("program=\"egress\",reason=\"with_payload\""));
        // Unlabelled figures have no braces.
        assert_eq!(value("mrte_collector_packets_dropped_total"), t.dropped());
        assert!(!text.contains("{}"), "{text}");
    }
}
