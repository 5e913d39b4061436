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
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

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

/// The text of one scrape: every figure of `t` as `mrte_collector_<name>` (counters with
/// `_total`), named as in the exit summary, and the latency histogram.
pub fn render(t: &Totals, latency: &Histogram) -> String {
    let mut registry = Registry::with_prefix("mrte_collector");
    for (name, kind, v) in t.named() {
        match kind {
            Kind::Counter => registry.register(
                name,
                format!("{name} since start (README, \"Status\")"),
                ConstCounter::new(v),
            ),
            Kind::Gauge => registry.register(
                name,
                format!("{name} now (README, \"Status\")"),
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)),
            ),
        }
    }
    for (name, help, v) in [
        (
            "packets_dropped",
            "PacketDropped: every loss inside the collector, kernel buffer to publisher queues",
            t.dropped(),
        ),
        (
            "parse_errors",
            "ParseError: kernel parse failures",
            t.parse_errors(),
        ),
    ] {
        registry.register(name, help, ConstCounter::new(v));
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
