//! [`RedisPubSub`]: `PUBLISH` over the shared connection, one dedicated pub/sub connection per subscriber.

use super::{call, RedisConfig};
use crate::pubsub::{Delivery, PubSub, Subscription};
use ::redis::aio::{ConnectionManager, PubSubSink, PubSubStream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use parley_api::BackendError;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Pub/sub on Redis channels named `<prefix><topic>`.
#[derive(Clone)]
pub struct RedisPubSub {
    client: ::redis::Client,
    publisher: ConnectionManager,
    config: Arc<RedisConfig>,
}

impl std::fmt::Debug for RedisPubSub {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RedisPubSub").field("config", &self.config).finish_non_exhaustive()
    }
}

impl RedisPubSub {
    /// Connects the publishing connection; fails if Redis cannot be reached within the timeout, or refuses the TLS
    /// handshake or the credentials ([`RedisConfig::check`]).
    pub async fn connect(config: RedisConfig) -> Result<Self, BackendError> {
        config.check().await?;
        let client = config.client()?;
        let publisher = config.connection_manager().await?;
        Ok(Self { client, publisher, config: Arc::new(config) })
    }

    /// How many times subscribers opened by this driver re-connected after losing their connection.
    pub fn reconnects(&self) -> u64 {
        self.config.stats.subscriber_reconnects.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl PubSub for RedisPubSub {
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), BackendError> {
        let mut connection = self.publisher.clone();
        let channel = format!("{}{topic}", self.config.prefix);
        let mut command = ::redis::cmd("PUBLISH");
        command.arg(channel).arg(payload.as_ref());
        call(self.config.timeout, &self.config.stats, "publish", command.query_async::<i64>(&mut connection))
            .await
            .map(|_receivers| ())
    }

    async fn publish_batch(&self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
        if items.is_empty() {
            return Ok(());
        }
        // One pipeline: the commands go out in order on one connection, so per-topic order holds.
        let mut connection = self.publisher.clone();
        let mut pipeline = ::redis::pipe();
        for (topic, payload) in &items {
            pipeline.cmd("PUBLISH").arg(format!("{}{topic}", self.config.prefix)).arg(payload.as_ref()).ignore();
        }
        call(self.config.timeout, &self.config.stats, "publish", pipeline.query_async::<()>(&mut connection)).await
    }

    fn open(&self, sink: mpsc::Sender<Delivery>) -> Arc<dyn Subscription> {
        let topics = Arc::new(Mutex::new(HashSet::new()));
        let (commands, receiver) = mpsc::unbounded_channel();
        let driver = Driver {
            client: self.client.clone(),
            config: self.config.clone(),
            topics: topics.clone(),
            commands: receiver,
            sink,
        };
        let task = tokio::spawn(driver.run());
        Arc::new(RedisSubscription { topics, commands, timeout: self.config.timeout, task })
    }
}

enum Change {
    Subscribe,
    Unsubscribe,
}

struct Command {
    change: Change,
    topics: Vec<String>,
    reply: oneshot::Sender<Result<(), BackendError>>,
}

fn lock(topics: &Mutex<HashSet<String>>) -> MutexGuard<'_, HashSet<String>> {
    // A poisoned lock only means a panic elsewhere mid-update of a plain set; keep going.
    topics.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One subscriber. The topic set it holds is the truth; the driver task brings the connection in line with it,
/// and re-subscribes all of it after every re-connection.
struct RedisSubscription {
    topics: Arc<Mutex<HashSet<String>>>,
    commands: mpsc::UnboundedSender<Command>,
    timeout: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl RedisSubscription {
    async fn change(&self, change: Change, topics: Vec<String>) -> Result<(), BackendError> {
        if topics.is_empty() {
            // An empty UNSUBSCRIBE would drop every topic.
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        {
            // Update the set and queue the command under one lock, so commands apply in the order of the updates.
            let mut held = lock(&self.topics);
            for topic in &topics {
                match change {
                    Change::Subscribe => held.insert(topic.clone()),
                    Change::Unsubscribe => held.remove(topic),
                };
            }
            self.commands
                .send(Command { change, topics, reply })
                .map_err(|_| BackendError::Unavailable("redis subscriber stopped".into()))?;
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BackendError::Unavailable("redis subscriber stopped".into())),
            Err(_) => Err(BackendError::Unavailable(format!(
                "redis subscription change timed out after {} ms; it applies once the connection is back",
                self.timeout.as_millis()
            ))),
        }
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    /// Adds topics. An error means they are not active yet: they are kept, and subscribed as soon as the
    /// connection is back.
    async fn subscribe(&self, topics: Vec<String>) -> Result<(), BackendError> {
        self.change(Change::Subscribe, topics).await
    }

    async fn unsubscribe(&self, topics: Vec<String>) -> Result<(), BackendError> {
        self.change(Change::Unsubscribe, topics).await
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Owns a subscriber's connection: forwards its messages, applies topic changes, and re-connects.
struct Driver {
    client: ::redis::Client,
    config: Arc<RedisConfig>,
    topics: Arc<Mutex<HashSet<String>>>,
    commands: mpsc::UnboundedReceiver<Command>,
    sink: mpsc::Sender<Delivery>,
}

/// Why the connected loop ended.
enum End {
    /// The subscription or its consumer is gone: stop.
    Stop,
    /// The connection failed: re-connect.
    Lost,
}

impl Driver {
    fn channels(&self, topics: &[String]) -> Vec<String> {
        topics.iter().map(|topic| format!("{}{topic}", self.config.prefix)).collect()
    }

    async fn run(mut self) {
        let mut delay = self.config.reconnect_min;
        let mut first = true;
        loop {
            // Commands queued meanwhile wait in the channel and apply after the re-subscription, in order.
            match self.connect().await {
                Ok((sink, stream)) => {
                    if !first {
                        self.config.stats.subscriber_reconnects.fetch_add(1, Ordering::Relaxed);
                        debug!("redis subscriber re-connected");
                    }
                    first = false;
                    delay = self.config.reconnect_min;
                    match self.serve(sink, stream).await {
                        End::Stop => return,
                        End::Lost => warn!("redis subscriber lost its connection; re-connecting"),
                    }
                }
                Err(error) => warn!(%error, delay_ms = delay.as_millis() as u64, "redis subscriber cannot connect"),
            }
            if !self.back_off(delay).await {
                return;
            }
            delay = (delay * 2).min(self.config.reconnect_max);
        }
    }

    /// Opens the connection and subscribes every topic held now.
    async fn connect(&self) -> Result<(PubSubSink, PubSubStream), BackendError> {
        let (mut sink, stream) =
            call(self.config.timeout, &self.config.stats, "connect", self.client.get_async_pubsub()).await?.split();
        let held: Vec<String> = lock(&self.topics).iter().cloned().collect();
        if !held.is_empty() {
            call(self.config.timeout, &self.config.stats, "subscribe", sink.subscribe(self.channels(&held))).await?;
        }
        Ok((sink, stream))
    }

    /// Waits before the next attempt, refusing topic changes meanwhile (they stay held and apply on re-connect).
    /// Returns false when the subscription is gone.
    async fn back_off(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                _ = self.sink.closed() => return false,
                command = self.commands.recv() => match command {
                    None => return false,
                    Some(command) => {
                        let _ = command.reply.send(Err(BackendError::Unavailable(
                            "redis pub/sub is re-connecting; the change applies once it is back".into(),
                        )));
                    }
                },
            }
        }
    }

    /// Hands one publication to the subscriber; `Err` ends the connection (`Lost` when the stream ended,
    /// `Stop` when the subscriber is gone).
    async fn forward(&self, message: Option<::redis::Msg>) -> Result<(), End> {
        let Some(message) = message else { return Err(End::Lost) };
        let Some(topic) = message.get_channel_name().strip_prefix(self.config.prefix.as_str()) else {
            return Ok(());
        };
        let delivery = (Arc::from(topic), Bytes::copy_from_slice(message.get_payload_bytes()));
        self.sink.send(delivery).await.map_err(|_| End::Stop)
    }

    /// Awaits `call` (a subscription change or a ping on the sink) while still reading publications: under
    /// load its answer queues behind them, and a reader that waited for the answer first would stall the change
    /// (and every gateway connect waiting on it) behind all the publications in flight.
    async fn while_reading<T>(
        &self,
        stream: &mut PubSubStream,
        call: impl std::future::Future<Output = T>,
    ) -> Result<T, End> {
        tokio::pin!(call);
        loop {
            tokio::select! {
                result = &mut call => return Ok(result),
                message = stream.next() => self.forward(message).await?,
            }
        }
    }

    async fn serve(&mut self, mut sink: PubSubSink, mut stream: PubSubStream) -> End {
        let period = self.config.health_check;
        let mut health = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                message = stream.next() => {
                    if let Err(end) = self.forward(message).await {
                        return end;
                    }
                }
                command = self.commands.recv() => {
                    let Some(Command { change, topics, reply }) = command else { return End::Stop };
                    let channels = self.channels(&topics);
                    let (timeout, stats) = (self.config.timeout, &self.config.stats);
                    let change = async {
                        match change {
                            Change::Subscribe => call(timeout, stats, "subscribe", sink.subscribe(channels)).await,
                            Change::Unsubscribe => {
                                call(timeout, stats, "unsubscribe", sink.unsubscribe(channels)).await
                            }
                        }
                    };
                    let result = match self.while_reading(&mut stream, change).await {
                        Ok(result) => result,
                        Err(end) => return end,
                    };
                    let failed = result.is_err();
                    let _ = reply.send(result);
                    if failed {
                        return End::Lost;
                    }
                }
                _ = health.tick() => {
                    let ping = call(self.config.timeout, &self.config.stats, "ping", sink.ping::<::redis::Value>());
                    let result = match self.while_reading(&mut stream, ping).await {
                        Ok(result) => result,
                        Err(end) => return end,
                    };
                    if let Err(error) = result {
                        warn!(%error, "redis subscriber health check failed");
                        return End::Lost;
                    }
                }
                _ = self.sink.closed() => return End::Stop,
            }
        }
    }
}
