//! A RabbitMQ exchange and queue of the test's own, removed on drop (also when a test panics).
//!
//! Every operation opens its own connection on a runtime of its own, so the fixture works the
//! same from plain and from async tests.

use std::future::Future;

use lapin::{
    BasicProperties, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};

pub const AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One published message as the consumer receives it.
#[derive(Debug)]
pub struct Received {
    pub data: Vec<u8>,
    pub properties: BasicProperties,
    pub routing_key: String,
}

pub struct TestExchange {
    pub exchange: String,
    pub queue: String,
}

/// Runs `f` to completion on a fresh runtime in a thread of its own.
fn on_own_runtime<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

async fn connect() -> Connection {
    Connection::connect(AMQP_URI, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (scripts/setup.sh starts it)")
}

impl TestExchange {
    /// A fresh fanout exchange with a queue bound to it.
    pub fn new(tag: &str) -> Self {
        Self::declared(tag, false)
    }

    /// A durable fanout exchange with a quorum queue bound to it: both, and every message in
    /// the queue, survive a broker restart (`rabbitmqctl stop_app` / `start_app`).
    pub fn durable(tag: &str) -> Self {
        Self::declared(tag, true)
    }

    fn declared(tag: &str, durable: bool) -> Self {
        let this = Self::named(tag);
        let (e, q) = (this.exchange.clone(), this.queue.clone());
        on_own_runtime(async move {
            let conn = connect().await;
            let ch = conn.create_channel().await.unwrap();
            ch.exchange_declare(
                e.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
            let mut args = FieldTable::default();
            if durable {
                args.insert(
                    "x-queue-type".into(),
                    lapin::types::AMQPValue::LongString("quorum".into()),
                );
            }
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
            ch.queue_bind(
                q.as_str().into(),
                e.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            conn.close(200, "".into()).await.unwrap();
        });
        this
    }

    /// Names only, for an exchange and queue that the agent creates (removed on drop too).
    pub fn named(tag: &str) -> Self {
        let exchange = super::unique(&format!("mrte_test_{tag}_"));
        let queue = format!("{exchange}_q");
        Self { exchange, queue }
    }

    /// Every unit of every message taken from the queue, per client port, in order.
    pub fn units_by_port(&self) -> std::collections::HashMap<u16, Vec<collector::encode::Unit>> {
        let mut units: std::collections::HashMap<u16, Vec<collector::encode::Unit>> =
            Default::default();
        for m in self.take_all() {
            for u in collector::encode::decode_message(&m.data).unwrap().units {
                units.entry(u.port).or_default().push(u);
            }
        }
        units
    }

    /// Takes every message now in the queue, in order.
    pub fn take_all(&self) -> Vec<Received> {
        let q = self.queue.clone();
        on_own_runtime(async move {
            let conn = connect().await;
            let ch = conn.create_channel().await.unwrap();
            let mut out = Vec::new();
            while let Some(m) = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                out.push(Received {
                    data: m.delivery.data,
                    properties: m.delivery.properties,
                    routing_key: m.delivery.routing_key.to_string(),
                });
            }
            conn.close(200, "".into()).await.unwrap();
            out
        })
    }
}

impl Drop for TestExchange {
    fn drop(&mut self) {
        let (e, q) = (self.exchange.clone(), self.queue.clone());
        // Never panics: a panic in drop during a failing test would abort the run.
        on_own_runtime(async move {
            let Ok(conn) = Connection::connect(AMQP_URI, ConnectionProperties::default()).await
            else {
                return;
            };
            let Ok(ch) = conn.create_channel().await else {
                return;
            };
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = conn.close(200, "".into()).await;
        });
    }
}
