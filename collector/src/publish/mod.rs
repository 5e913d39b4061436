//! Publishing, in the order data flows: the [`fanout`] batches units per publisher, the
//! [`publisher`] tasks hand the batches to RabbitMQ (or a recording), over the connection the
//! [`broker`] module keeps alive.
//!
//! Loss is counted wherever it happens, and a session that lost units on the way (a dropped
//! batch, a nacked message, a message whose fate is unknown when a connection died) is ended
//! for the consumer as after a TCP gap: a synthetic COM_QUIT in its place, then nothing of the
//! session until a unit that starts a command.

use std::time::Duration;

use tokio::time::Instant;

pub mod broker;
pub mod fanout;
pub mod file;
pub mod publisher;

pub use broker::{Broker, BrokerConfig, Down, PublishError, login};
pub use fanout::{Batch, BatchLimits, Fanout, LaneReceiver, LaneSender, lane, lane_of};
pub use file::{FromPcap, publish_file, publish_pcap};
pub use publisher::{PublisherShared, Publishers, message_properties, start_publishers};

/// Logs a recurring problem at most once per period, with how often it happened meanwhile.
#[derive(Debug, Default)]
pub(crate) struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    const PERIOD: Duration = Duration::from_secs(10);

    pub(crate) fn hit(&mut self, now: Instant, log: impl FnOnce(u64)) {
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= Self::PERIOD)
        {
            log(self.suppressed);
            self.last = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}
