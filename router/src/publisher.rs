//! The publisher: the writer's only way out to pub/sub. The writer decides, appends, confirms its senders and
//! then hands what became durable to this task over a bounded queue; it never waits for Redis. The task takes
//! every job waiting in the queue at once, resolves the gateways of all membership changes in one registry read,
//! and sends everything in one pipelined publish per round, in the order the writer made it durable. Each round
//! has a deadline; publishes that fail or time out are counted and not retried (receivers recover messages from
//! history and the feed; membership changes are re-read when a connection resubscribes).

use bytes::Bytes;
use parley_api::RouterStats;
use parley_bus::presence::PresenceStore;
use parley_bus::pubsub::{channel_topic, gateway_topic, ControlEvent, Event, PubSub, ALL_GATEWAYS_TOPIC};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, instrument, warn};

/// Publisher settings.
#[derive(Debug, Clone, Copy)]
pub struct PublisherConfig {
    /// Jobs the queue holds before the writer waits (back pressure: nothing is dropped).
    pub queue: usize,
    /// Most publications in one pipelined publish.
    pub batch_max: usize,
    /// Deadline of one pipelined publish (and of the registry read before it).
    pub timeout: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self { queue: 1024, batch_max: 4096, timeout: Duration::from_secs(2) }
    }
}

/// One membership change to announce. Serialized into `{prefix}memberships` for other regions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MembershipEvent {
    /// The channel.
    pub channel: String,
    /// The user who joined or left.
    pub user: String,
    /// Joined (true) or left (false).
    pub joined: bool,
    /// Whether the channel's members hear of it too (small channels only: per-member events in a large
    /// channel would be quadratic in its member count).
    pub tell_members: bool,
    /// An invitation (by this user) rather than a membership change: only the invited user hears of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invited_by: Option<String>,
}

/// What the writer hands over, in durable order.
#[derive(Debug)]
pub enum Job {
    /// Ready publications (messages and feed notices of one batch).
    Publications(Vec<(String, Bytes)>),
    /// Membership changes: each goes to the gateways holding the user, and to the channel when `tell_members`.
    Memberships(Vec<MembershipEvent>),
}

/// The writer's end of the queue.
#[derive(Clone, Debug)]
pub struct PublisherHandle {
    jobs: mpsc::Sender<(Instant, Job)>,
}

impl PublisherHandle {
    /// Queues a job; waits only while the queue is full. A stopped publisher loses nothing durable, so the
    /// error is only logged.
    pub async fn submit(&self, job: Job) {
        if self.jobs.send((Instant::now(), job)).await.is_err() {
            warn!("publisher stopped; a durable batch was not announced");
        }
    }
}

/// Starts the publisher task. It ends when every [`PublisherHandle`] is dropped and the queue is empty.
pub fn start(
    config: PublisherConfig,
    pubsub: Arc<dyn PubSub>,
    directory: Option<Arc<dyn PresenceStore>>,
    stats: Arc<RouterStats>,
) -> (PublisherHandle, tokio::task::JoinHandle<()>) {
    let (jobs, queue) = mpsc::channel(config.queue.max(1));
    let publisher = Publisher { queue, pubsub, directory, stats, config };
    (PublisherHandle { jobs }, tokio::spawn(publisher.run()))
}

struct Publisher {
    queue: mpsc::Receiver<(Instant, Job)>,
    pubsub: Arc<dyn PubSub>,
    directory: Option<Arc<dyn PresenceStore>>,
    stats: Arc<RouterStats>,
    config: PublisherConfig,
}

impl Publisher {
    async fn run(mut self) {
        let mut jobs = Vec::new();
        while self.queue.recv_many(&mut jobs, 256).await > 0 {
            self.stats.publish_queue.store(self.queue.len() as u64, Ordering::Relaxed);
            let handed_over: Vec<Instant> = jobs.iter().map(|(at, _)| *at).collect();
            let publications = self.resolve(jobs.drain(..).map(|(_, job)| job).collect()).await;
            for chunk in publications.chunks(self.config.batch_max.max(1)) {
                self.publish(chunk.to_vec()).await;
            }
            // Each job was handed over as soon as it was durable: this is its durable→published time (whether the
            // publish succeeded or not; failures and timeouts are counted apart).
            for at in handed_over {
                self.stats.durable_published_seconds.observe(at.elapsed().as_secs_f64());
            }
        }
        debug!("publisher stopped");
    }

    /// Turns the jobs into publications, keeping their order. Membership changes are addressed with one
    /// registry read for all of them.
    async fn resolve(&self, jobs: Vec<Job>) -> Vec<(String, Bytes)> {
        let users: Vec<String> = jobs
            .iter()
            .filter_map(|job| match job {
                Job::Memberships(events) => Some(events.iter().map(|event| event.user.clone())),
                Job::Publications(_) => None,
            })
            .flatten()
            .collect();
        let mut targets = self.direct_topics(&users).await.into_iter();
        let mut publications = Vec::new();
        for job in jobs {
            match job {
                Job::Publications(items) => publications.extend(items),
                Job::Memberships(events) => {
                    for event in events {
                        let topics = targets.next().unwrap_or_else(|| vec![ALL_GATEWAYS_TOPIC.to_owned()]);
                        publications.extend(membership_publications(&event, topics));
                    }
                }
            }
        }
        publications
    }

    /// Where the direct events of `users` go: for each (same order), the direct topics of the gateway instances
    /// holding their connections. Without a registry, or when it cannot be read in time, every gateway's topic.
    async fn direct_topics(&self, users: &[String]) -> Vec<Vec<String>> {
        let everyone = || vec![vec![ALL_GATEWAYS_TOPIC.to_owned()]; users.len()];
        let Some(directory) = &self.directory else { return everyone() };
        if users.is_empty() {
            return Vec::new();
        }
        match tokio::time::timeout(self.config.timeout, directory.locate(users)).await {
            Ok(Ok(located)) if located.len() == users.len() => located
                .into_iter()
                .map(|instances| instances.iter().map(|instance| gateway_topic(instance)).collect())
                .collect(),
            Ok(Ok(_)) => everyone(),
            Ok(Err(error)) => {
                // Never lose a membership change to a registry hiccup: every gateway gets it and keeps it only
                // for its own users.
                warn!(%error, "user→gateway registry unreadable; membership changes go to every gateway");
                everyone()
            }
            Err(_) => {
                warn!("user→gateway registry read timed out; membership changes go to every gateway");
                everyone()
            }
        }
    }

    #[instrument(skip_all, fields(publications = items.len()))]
    async fn publish(&self, items: Vec<(String, Bytes)>) {
        let count = items.len() as u64;
        match tokio::time::timeout(self.config.timeout, self.pubsub.publish_batch(items)).await {
            Ok(Ok(())) => {
                self.stats.published.fetch_add(count, Ordering::Relaxed);
                self.stats.publish_batches.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                self.stats.publish_failures.fetch_add(count, Ordering::Relaxed);
                warn!(%error, count, "publish failed; receivers recover the messages from history");
            }
            Err(_) => {
                self.stats.publish_timeouts.fetch_add(count, Ordering::Relaxed);
                warn!(
                    count,
                    timeout_ms = self.config.timeout.as_millis() as u64,
                    "publish timed out; receivers recover the messages from history"
                );
            }
        }
    }
}

/// The publications of one membership change: a direct event on each of `direct` (the gateways holding the
/// user), then, for small channels, a member event on the channel's topic.
pub fn membership_publications(event: &MembershipEvent, direct: Vec<String>) -> Vec<(String, Bytes)> {
    let mut publications = Vec::with_capacity(direct.len() + 1);
    if let Some(by) = &event.invited_by {
        for topic in direct {
            let control =
                ControlEvent::Invited { user: event.user.clone(), channel: event.channel.clone(), by: by.clone() };
            publications.push((topic, Event::Control(control).encode()));
        }
        return publications;
    }
    for topic in direct {
        let control =
            ControlEvent::Membership { user: event.user.clone(), channel: event.channel.clone(), joined: event.joined };
        publications.push((topic, Event::Control(control).encode()));
    }
    if event.tell_members {
        let control =
            ControlEvent::Member { channel: event.channel.clone(), user: event.user.clone(), joined: event.joined };
        publications.push((channel_topic(&event.channel), Event::Control(control).encode()));
    }
    publications
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use parley_api::BackendError;
    use parley_bus::pubsub::{Delivery, LocalPubSub, Subscription};
    use std::sync::Mutex;

    /// Records every batch; can be told to fail or to hang.
    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<Vec<String>>>,
        mode: Mutex<Mode>,
    }

    #[derive(Default, Clone, Copy, PartialEq)]
    enum Mode {
        #[default]
        Ok,
        Fail,
        Hang,
    }

    #[async_trait]
    impl PubSub for Recorder {
        async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), BackendError> {
            self.publish_batch(vec![(topic.to_owned(), payload)]).await
        }

        async fn publish_batch(&self, items: Vec<(String, Bytes)>) -> Result<(), BackendError> {
            let mode = *self.mode.lock().expect("mode");
            match mode {
                Mode::Ok => {
                    self.batches.lock().expect("batches").push(items.into_iter().map(|(topic, _)| topic).collect());
                    Ok(())
                }
                Mode::Fail => Err(BackendError::Unavailable("down".into())),
                Mode::Hang => std::future::pending().await,
            }
        }

        fn open(&self, sink: mpsc::Sender<Delivery>) -> Arc<dyn Subscription> {
            LocalPubSub::new().open(sink)
        }
    }

    fn event(channel: &str, user: &str, tell_members: bool) -> MembershipEvent {
        MembershipEvent { channel: channel.into(), user: user.into(), joined: true, tell_members, invited_by: None }
    }

    #[test]
    fn membership_goes_to_gateways_then_channel() {
        let topics: Vec<String> = membership_publications(&event("g:a", "bob", true), vec!["gw:1".into()])
            .into_iter()
            .map(|(topic, _)| topic)
            .collect();
        assert_eq!(topics, vec!["gw:1".to_owned(), channel_topic("g:a")]);
        let large = membership_publications(&event("g:a", "bob", false), vec!["gw:1".into(), "gw:2".into()]);
        assert_eq!(large.len(), 2, "no member event for a large channel");
        let invitation = MembershipEvent { invited_by: Some("ann".into()), ..event("g:a", "bob", true) };
        let published = membership_publications(&invitation, vec!["gw:1".into()]);
        assert_eq!(published.len(), 1, "only the invited user hears of an invitation");
        let expected = ControlEvent::Invited { user: "bob".into(), channel: "g:a".into(), by: "ann".into() };
        assert_eq!(Event::decode(&published[0].1), Some(Event::Control(expected)));
    }

    #[tokio::test]
    async fn ten_thousand_memberships_go_out_in_few_batches_in_order() {
        let recorder = Arc::new(Recorder::default());
        let stats = Arc::new(RouterStats::default());
        let config = PublisherConfig { queue: 8, batch_max: 4096, timeout: Duration::from_secs(5) };
        let (handle, task) = start(config, recorder.clone(), None, stats.clone());
        handle.submit(Job::Publications(vec![("first".into(), Bytes::new())])).await;
        let events: Vec<MembershipEvent> = (0..10_000).map(|n| event("g:big", &format!("u{n}"), false)).collect();
        handle.submit(Job::Memberships(events)).await;
        handle.submit(Job::Publications(vec![("last".into(), Bytes::new())])).await;
        drop(handle);
        task.await.expect("publisher");
        let batches = recorder.batches.lock().expect("batches").clone();
        let all: Vec<String> = batches.iter().flatten().cloned().collect();
        assert_eq!(all.len(), 10_002);
        assert_eq!(all.first().map(String::as_str), Some("first"));
        assert_eq!(all.last().map(String::as_str), Some("last"));
        assert!(batches.len() <= 6, "10,002 publications in {} round trips", batches.len());
        assert_eq!(stats.published.load(Ordering::Relaxed), 10_002);
        assert_eq!(stats.publish_batches.load(Ordering::Relaxed), batches.len() as u64);
    }

    #[tokio::test]
    async fn failures_are_counted() {
        let recorder = Arc::new(Recorder::default());
        *recorder.mode.lock().expect("mode") = Mode::Fail;
        let stats = Arc::new(RouterStats::default());
        let (handle, task) = start(PublisherConfig::default(), recorder, None, stats.clone());
        handle.submit(Job::Publications(vec![("a".into(), Bytes::new()), ("b".into(), Bytes::new())])).await;
        drop(handle);
        task.await.expect("publisher");
        assert_eq!(stats.publish_failures.load(Ordering::Relaxed), 2);
        assert_eq!(stats.published.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_publish_times_out_and_the_next_goes_through() {
        let recorder = Arc::new(Recorder::default());
        *recorder.mode.lock().expect("mode") = Mode::Hang;
        let stats = Arc::new(RouterStats::default());
        let config = PublisherConfig { queue: 1, batch_max: 16, timeout: Duration::from_millis(500) };
        let (handle, task) = start(config, recorder.clone(), None, stats.clone());
        handle.submit(Job::Publications(vec![("hung".into(), Bytes::new())])).await;
        while stats.publish_timeouts.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *recorder.mode.lock().expect("mode") = Mode::Ok;
        handle.submit(Job::Publications(vec![("next".into(), Bytes::new())])).await;
        drop(handle);
        task.await.expect("publisher");
        assert_eq!(stats.publish_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(recorder.batches.lock().expect("batches").clone(), vec![vec!["next".to_owned()]]);
    }
}
