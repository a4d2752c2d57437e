//! The hub's index, subscriptions and feed following, without a bus or a router.

use super::*;
use async_trait::async_trait;
use parley_api::BackendError;
use parley_api::{HistoryPage, HistoryQuery};
use parley_core::protocol::MessageView;
use parley_core::UserId;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts subscription calls.
#[derive(Default)]
struct Counting {
    subscribes: AtomicUsize,
    unsubscribes: AtomicUsize,
}

#[async_trait]
impl Subscription for Counting {
    async fn subscribe(&self, _topics: Vec<String>) -> Result<(), BackendError> {
        self.subscribes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn unsubscribe(&self, _topics: Vec<String>) -> Result<(), BackendError> {
        self.unsubscribes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("user")
}

#[tokio::test]
async fn a_connect_to_channels_already_subscribed_calls_the_bus_not_at_all() {
    let bus = Arc::new(Counting::default());
    let hub = Hub::new(bus.clone(), Metrics::new(), 1_000);
    let (first, _a) = Outbound::channel(8, usize::MAX);
    let (second, _b) = Outbound::channel(8, usize::MAX);
    hub.register(1, &user("ann"), first, Vec::new()).await;
    assert!(hub.add_channels_since(1, vec![("g:room".into(), 0)]).await, "first member: subscribed, re-read");
    assert_eq!(bus.subscribes.load(Ordering::SeqCst), 1);
    hub.register(2, &user("bob"), second, Vec::new()).await;
    assert!(!hub.add_channels_since(2, vec![("g:room".into(), 0)]).await, "nothing new, nothing raced");
    assert_eq!(bus.subscribes.load(Ordering::SeqCst), 1, "no second subscribe");
    hub.unregister(1).await;
    assert_eq!(bus.unsubscribes.load(Ordering::SeqCst), 0, "bob still needs the channel");
    hub.unregister(2).await;
    assert_eq!(bus.unsubscribes.load(Ordering::SeqCst), 1, "the last member left");
}

#[tokio::test]
async fn a_message_newer_than_the_list_seen_before_joining_asks_for_a_re_read() {
    let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 1_000);
    let (first, _a) = Outbound::channel(8, usize::MAX);
    let (second, _b) = Outbound::channel(8, usize::MAX);
    hub.register(1, &user("ann"), first, Vec::new()).await;
    hub.add_channels_since(1, vec![("g:room".into(), 0)]).await;
    // Bob's list said the channel ended at 4; message 5 went by before he joined the index.
    hub.deliver("g:room", &Utf8Bytes::from_static("{}"), Some(5));
    hub.register(2, &user("bob"), second, Vec::new()).await;
    assert!(hub.add_channels_since(2, vec![("g:room".into(), 4)]).await);
    let (third, _c) = Outbound::channel(8, usize::MAX);
    hub.register(3, &user("cid"), third, Vec::new()).await;
    assert!(!hub.add_channels_since(3, vec![("g:room".into(), 5)]).await, "a list that has it is current");
}

#[tokio::test]
async fn receipts_follow_the_member_count_a_connect_read() {
    let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 1_000);
    let (first, _a) = Outbound::channel(8, usize::MAX);
    hub.register(1, &user("ann"), first, Vec::new()).await;
    hub.add_channels_since(1, vec![("g:big".into(), 0), ("g:small".into(), 0)]).await;
    // Before any count is known, the local members (one) are the bound.
    assert!(hub.small_channel("g:big", 32));
    hub.note_sizes([("g:big", 500), ("g:small", 3), ("g:elsewhere", 1)]);
    assert!(!hub.small_channel("g:big", 32));
    assert!(hub.small_channel("g:small", 32));
    assert!(hub.small_channel("g:elsewhere", 32), "not subscribed here: no members, no count kept");
}

fn seq_of(frame: &OutboundFrame) -> u64 {
    frame.0.message.as_ref().map(|(_, seq)| *seq).expect("a message")
}

#[tokio::test]
async fn pushed_messages_wait_for_a_feed_read_in_flight_then_follow_it_in_order() {
    let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 3);
    let (sender, mut queue) = Outbound::channel(16, usize::MAX);
    hub.register(1, &user("ann"), sender, Vec::new()).await;
    hub.add_channels_since(1, vec![("g:town".into(), 0)]).await;
    hub.pushed("g:town", Utf8Bytes::from_static("{}"), 1);
    assert_eq!(seq_of(&queue.try_recv().expect("pushed at once")), 1);
    // The channel became large: a read of 2..=3 is in flight when it becomes small again and 4, 5 are pushed.
    hub.lock().feeds.insert("g:town".into(), FeedState { head: 1, wanted: 3, reading: true, ..FeedState::default() });
    hub.pushed("g:town", Utf8Bytes::from_static("{}"), 5);
    hub.pushed("g:town", Utf8Bytes::from_static("{}"), 4);
    assert!(queue.try_recv().is_err(), "they wait for the read");
    {
        let mut state = hub.lock();
        // The read hands out 2 and 3 ...
        for seq in [2, 3] {
            let mut slow = Vec::new();
            Hub::deliver_in(&state, "g:town", &Utf8Bytes::from_static("{}"), Some(seq), &mut slow);
        }
        state.feeds.get_mut("g:town").expect("followed").head = 3;
        // ... and finishes: the waiting pushes follow, in sequence order.
        hub.finish_feed(&mut state, "g:town");
        assert!(!state.feeds.contains_key("g:town"), "pushed again: no longer followed");
    }
    let order: Vec<u64> = std::iter::from_fn(|| queue.try_recv().ok()).map(|frame| seq_of(&frame)).collect();
    assert_eq!(order, vec![2, 3, 4, 5]);
    assert_eq!(hub.lock().heads.get("g:town"), Some(&5));
}

#[tokio::test]
async fn the_feed_cache_answers_only_what_it_holds_whole_and_only_for_members() {
    let hub = Hub::new(Arc::new(Counting::default()), Metrics::new(), 3);
    let (sender, _queue) = Outbound::channel(16, usize::MAX);
    hub.register(1, &user("ann"), sender, Vec::new()).await;
    hub.add_channels_since(1, vec![("g:town".into(), 0)]).await;
    let cache = (11..=20)
        .map(|seq| {
            Arc::new(MessageView {
                channel: "g:town".into(),
                seq,
                id: seq,
                sender: "bob".into(),
                text: format!("m{seq}"),
                ts: 0,
                client_msg_id: format!("c{seq}"),
            })
        })
        .collect();
    hub.lock().feeds.insert("g:town".into(), FeedState { head: 20, wanted: 20, cache, ..FeedState::default() });
    let query = |after: Option<u64>, before: Option<u64>, limit: u32| HistoryQuery { before, after, limit };
    let seqs = |page: HistoryPage| page.messages.iter().map(|message| message.seq).collect::<Vec<_>>();
    let page = hub.cached_page(1, "g:town", &query(Some(12), None, 3)).expect("held");
    assert!(page.has_more);
    assert_eq!(seqs(page), vec![13, 14, 15]);
    let page = hub.cached_page(1, "g:town", &query(Some(17), None, 50)).expect("held");
    assert!(!page.has_more);
    assert_eq!(seqs(page), vec![18, 19, 20]);
    assert_eq!(seqs(hub.cached_page(1, "g:town", &query(Some(10), Some(13), 50)).expect("a gap fill")), vec![11, 12]);
    assert!(hub.cached_page(1, "g:town", &query(Some(5), None, 50)).is_none(), "6..=10 are not held");
    assert!(hub.cached_page(1, "g:town", &query(None, Some(15), 50)).is_none(), "backwards reads go to the router");
    assert!(hub.cached_page(2, "g:town", &query(Some(12), None, 3)).is_none(), "not a local member");
    hub.lock().feeds.get_mut("g:town").expect("followed").wanted = 22;
    assert!(hub.cached_page(1, "g:town", &query(Some(12), None, 3)).is_none(), "21, 22 announced, not read yet");
    assert!(hub.cached_page(1, "g:town", &query(Some(12), Some(16), 3)).is_some(), "a bounded read still is");
    // The ends of the number space (a client's `after` and `before`) answer, nothing more.
    let page = hub.cached_page(1, "g:town", &query(Some(u64::MAX), Some(16), 3)).expect("nothing after the last");
    assert_eq!(seqs(page), Vec::<u64>::new());
    assert!(hub.cached_page(1, "g:town", &query(Some(12), Some(0), 3)).is_none(), "before 0: the router says");
}

#[tokio::test]
async fn a_queue_is_bounded_in_bytes_as_well_as_in_frames() {
    let metrics = Metrics::new();
    let hub = Hub::new(Arc::new(Counting::default()), metrics.clone(), 1_000);
    let (sender, mut queue) = Outbound::channel(16, 100);
    hub.register(1, &user("ann"), sender, Vec::new()).await;
    hub.add_channels_since(1, vec![("g:room".into(), 0)]).await;
    let forty = Utf8Bytes::from("x".repeat(40));
    assert_eq!(hub.deliver("g:room", &forty, None), 1);
    assert_eq!(hub.deliver("g:room", &forty, None), 1);
    assert_eq!(queue.queued_bytes(), 80);
    // Taking one frame gives its bytes back.
    assert!(queue.try_recv().is_ok());
    assert_eq!(queue.queued_bytes(), 40);
    assert_eq!(hub.deliver("g:room", &forty, None), 1);
    // 120 bytes would not fit in 100: the connection is cut off, counted as an outbound queue overflow.
    assert_eq!(hub.deliver("g:room", &forty, None), 0);
    assert!(metrics.encode().contains(r#"parley_gateway_limit_hits_total{limit="outbound_queue"} 1"#));
    assert!(queue.is_closed(), "the hub let go of the queue");
    assert_eq!(hub.deliver("g:room", &forty, None), 0, "and queues nothing more");
    // One frame larger than the bound still fits an empty queue.
    let (sender, mut queue) = Outbound::channel(16, 100);
    hub.register(2, &user("bob"), sender, Vec::new()).await;
    hub.add_channels_since(2, vec![("g:big".into(), 0)]).await;
    assert_eq!(hub.deliver("g:big", &Utf8Bytes::from("y".repeat(500)), None), 1);
    assert_eq!(queue.try_recv().map(|frame| frame.0.frame.len()).ok(), Some(500));
    assert_eq!(queue.queued_bytes(), 0);
}
