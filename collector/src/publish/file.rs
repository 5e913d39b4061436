//! `publish-file`: a recording (`--output file:PATH`) published to RabbitMQ later.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

use super::{Broker, BrokerConfig, message_properties};
use crate::{encode, recording::Reader};

/// A broker operation under the `--rabbitmq_timeout` deadline.
async fn within<T>(
    timeout: Duration,
    f: impl Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("no answer within {timeout:?} (--rabbitmq_timeout)"),
    }
}

/// `publish-file`: every message of the recording to the exchange, in the recorded order, on
/// one channel (so every session's order is kept). The whole recording is checked before the
/// first message goes out: a cut or damaged recording publishes nothing.
pub async fn publish_file(path: &Path, cfg: &BrokerConfig) -> anyhow::Result<()> {
    let (mut messages, mut units, mut bytes) = (0u64, 0u64, 0u64);
    let mut check = Reader::open(path)?;
    while let Some(m) = check.next_message()? {
        messages += 1;
        units += encode::decode_message(&m).map_or(0, |m| m.units.len() as u64);
        bytes += m.len() as u64;
    }
    let files = check.files;
    let broker = Broker::connect(cfg, Default::default()).await?;
    let channel = broker.open_channel().await?;
    if cfg.confirm {
        within(
            cfg.timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        .context("turning on publisher confirms")?;
    }
    let props: BasicProperties = message_properties();
    let mut reader = Reader::open(path)?;
    let mut confirms = Vec::new();
    while let Some(m) = reader.next_message()? {
        let publish = channel.basic_publish(
            cfg.exchange.as_str().into(),
            cfg.routing_key.as_str().into(),
            // With confirms, a message no queue takes comes back and is reported.
            BasicPublishOptions {
                mandatory: cfg.confirm,
                ..Default::default()
            },
            &m,
            props.clone(),
        );
        let confirm = within(cfg.timeout, publish)
            .await
            .with_context(|| format!("publishing to {}", broker.addr()))?;
        if cfg.confirm {
            confirms.push(confirm);
        }
    }
    let (mut nacked, mut unroutable) = (0, 0);
    for c in confirms {
        match within(cfg.timeout, c)
            .await
            .context("waiting for the broker's confirms")?
        {
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => unroutable += 1,
            Confirmation::Nack(None) => nacked += 1,
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
        }
    }
    broker.close().await;
    if nacked > 0 {
        anyhow::bail!("the broker nacked {nacked} of {messages} messages");
    }
    if unroutable > 0 {
        anyhow::bail!(
            "the broker routed {unroutable} of {messages} messages to no queue: bind a queue \
             to exchange {:?} (or pass --rabbitmq_declare --rabbitmq_queue=NAME)",
            cfg.exchange
        );
    }
    println!(
        "published {messages} messages ({units} units, {bytes} bytes) from {files} file(s) of \
         {} to exchange {:?} at {}",
        path.display(),
        cfg.exchange,
        broker.addr()
    );
    Ok(())
}
