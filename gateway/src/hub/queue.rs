//! One connection's queue from the hub: bounded in frames and in bytes, one producer side shared by the hub's
//! clones ([`Outbound`]) and one consumer ([`OutboundQueue`]), the connection's task.
//!
//! A fan-out pushes one item to every member's queue and each push wakes a task, so the queue is on the hottest
//! path of the gateway and is held by every idle connection. It is a `VecDeque` behind a mutex that only its two
//! ends take (uncontended but for the moment both touch it), and an `AtomicWaker`: a push is one lock, one
//! `push_back` and one wake; a pop one lock; an idle, empty queue holds no buffer. The queue closes when the last
//! [`Outbound`] is dropped (the hub cut the connection off, or unregistered it): the consumer then takes what is
//! left, if it wants, and sees the end.

use super::OutboundFrame;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

/// A queue whose buffer grew past this many slots gives it back once it is empty again (after a burst).
const KEEP_SLOTS: usize = 16;

/// The hub's end of one connection's queue, bounded in frames and in bytes (what the frames waiting in it hold). A
/// frame that does not fit is refused as `Full`: the hub then cuts the connection off as a slow consumer.
#[derive(Debug)]
pub struct Outbound {
    shared: Arc<Shared>,
}

/// The connection's end of its queue.
#[derive(Debug)]
pub struct OutboundQueue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    items: Mutex<Items>,
    /// The consumer's task, woken by a push and by the close.
    waker: AtomicWaker,
    /// Live [`Outbound`]s: the queue closes when the last one goes.
    senders: AtomicUsize,
    /// The bytes waiting in the queue.
    queued: AtomicUsize,
    max_bytes: usize,
    frames: usize,
}

#[derive(Debug, Default)]
struct Items {
    queue: VecDeque<OutboundFrame>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Items> {
        // A panic while the lock was held cannot leave the queue half-changed (each change is one call).
        self.items.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Outbound {
    /// A queue of at most `frames` frames and `max_bytes` bytes (one frame of any size fits an empty queue).
    pub fn channel(frames: usize, max_bytes: usize) -> (Outbound, OutboundQueue) {
        let shared = Arc::new(Shared {
            items: Mutex::new(Items::default()),
            waker: AtomicWaker::new(),
            senders: AtomicUsize::new(1),
            queued: AtomicUsize::new(0),
            max_bytes,
            frames: frames.max(1),
        });
        (Outbound { shared: shared.clone() }, OutboundQueue { shared })
    }

    /// Queues a frame unless the queue is full (in frames or bytes) or closed.
    pub fn try_send(&self, item: OutboundFrame) -> Result<(), TrySendError<OutboundFrame>> {
        let shared = &*self.shared;
        let size = item.0.frame.len();
        let before = shared.queued.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before.saturating_add(size) > shared.max_bytes {
            shared.queued.fetch_sub(size, Ordering::AcqRel);
            return Err(TrySendError::Full(item));
        }
        {
            let mut items = shared.lock();
            if items.closed {
                drop(items);
                shared.queued.fetch_sub(size, Ordering::AcqRel);
                return Err(TrySendError::Closed(item));
            }
            if items.queue.len() >= shared.frames {
                drop(items);
                shared.queued.fetch_sub(size, Ordering::AcqRel);
                return Err(TrySendError::Full(item));
            }
            items.queue.push_back(item);
        }
        shared.waker.wake();
        Ok(())
    }
}

impl Clone for Outbound {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self { shared: self.shared.clone() }
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.lock().closed = true;
            self.shared.waker.wake();
        }
    }
}

impl Drop for OutboundQueue {
    /// The connection is gone: what is queued is dropped, and the hub's next push is refused as `Closed` (not
    /// queued for nobody until the queue is full).
    fn drop(&mut self) {
        let mut items = self.shared.lock();
        items.closed = true;
        let bytes: usize = items.queue.drain(..).map(|item| item.0.frame.len()).sum();
        self.shared.queued.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl OutboundQueue {
    /// The next frame; `None` once the hub let go of the queue and it is empty.
    pub async fn recv(&mut self) -> Option<OutboundFrame> {
        std::future::poll_fn(|context| {
            let mut taken = self.take();
            if matches!(taken, Err(TryRecvError::Empty)) {
                // Registered, then a second look: a push after the first look either is seen now or wakes the task.
                self.shared.waker.register(context.waker());
                taken = self.take();
            }
            match taken {
                Ok(item) => Poll::Ready(Some(item)),
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }

    /// The next frame if one is waiting.
    pub fn try_recv(&mut self) -> Result<OutboundFrame, TryRecvError> {
        self.take()
    }

    /// Whether the hub let go of the queue: it cut the connection off as a slow consumer (or unregistered it).
    pub fn is_closed(&self) -> bool {
        self.shared.senders.load(Ordering::Acquire) == 0
    }

    /// Bytes waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    fn take(&self) -> Result<OutboundFrame, TryRecvError> {
        let shared = &*self.shared;
        let mut items = shared.lock();
        match items.queue.pop_front() {
            Some(item) => {
                if items.queue.is_empty() && items.queue.capacity() > KEEP_SLOTS {
                    items.queue = VecDeque::new();
                }
                drop(items);
                shared.queued.fetch_sub(item.0.frame.len(), Ordering::AcqRel);
                Ok(item)
            }
            None if items.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;

    fn frame(text: &'static str) -> OutboundFrame {
        OutboundFrame::control(Utf8Bytes::from_static(text))
    }

    #[tokio::test]
    async fn frames_come_out_in_order_and_the_queue_ends_when_the_last_sender_goes() {
        let (sender, mut queue) = Outbound::channel(4, usize::MAX);
        let clone = sender.clone();
        sender.try_send(frame("a")).expect("room");
        clone.try_send(frame("b")).expect("room");
        drop(sender);
        assert!(!queue.is_closed(), "a sender is left");
        assert_eq!(queue.recv().await.expect("queued").0.frame.as_str(), "a");
        drop(clone);
        assert!(queue.is_closed());
        // What was queued before the close is still there.
        assert_eq!(queue.recv().await.expect("queued").0.frame.as_str(), "b");
        assert!(queue.recv().await.is_none());
        assert_eq!(queue.try_recv().map(|_| ()), Err(TryRecvError::Disconnected));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_by_frames_and_by_bytes() {
        let (sender, mut queue) = Outbound::channel(2, usize::MAX);
        sender.try_send(frame("a")).expect("room");
        sender.try_send(frame("b")).expect("room");
        assert!(matches!(sender.try_send(frame("c")), Err(TrySendError::Full(_))));
        queue.try_recv().expect("queued");
        sender.try_send(frame("c")).expect("room again");

        let (sender, mut queue) = Outbound::channel(16, 4);
        // One frame of any size fits an empty queue.
        sender.try_send(frame("too big")).expect("empty queue");
        assert!(matches!(sender.try_send(frame("x")), Err(TrySendError::Full(_))));
        assert_eq!(queue.queued_bytes(), 7);
        queue.try_recv().expect("queued");
        assert_eq!(queue.queued_bytes(), 0);
        sender.try_send(frame("abc")).expect("fits");
        assert!(matches!(sender.try_send(frame("de")), Err(TrySendError::Full(_))));
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_by_a_push_and_by_the_close() {
        let (sender, mut queue) = Outbound::channel(4, usize::MAX);
        let waiting = tokio::spawn(async move {
            let first = queue.recv().await.map(|item| item.0.frame.to_string());
            let end = queue.recv().await.is_none();
            (first, end)
        });
        tokio::task::yield_now().await;
        sender.try_send(frame("a")).expect("room");
        tokio::task::yield_now().await;
        drop(sender);
        assert_eq!(waiting.await.expect("no panic"), (Some("a".to_string()), true));
    }

    #[test]
    fn a_push_to_a_queue_whose_connection_is_gone_is_refused_as_closed() {
        let (sender, queue) = Outbound::channel(4, usize::MAX);
        sender.try_send(frame("a")).expect("room");
        drop(queue);
        assert!(matches!(sender.try_send(frame("b")), Err(TrySendError::Closed(_))));
    }

    #[test]
    fn an_emptied_queue_gives_its_buffer_back_after_a_burst() {
        let (sender, mut queue) = Outbound::channel(512, usize::MAX);
        for _ in 0..100 {
            sender.try_send(frame("x")).expect("room");
        }
        while queue.try_recv().is_ok() {}
        assert_eq!(queue.shared.lock().queue.capacity(), 0);
    }
}
