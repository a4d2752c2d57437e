//! Sends awaiting confirmation, without I/O. A send stays here, in submission order, until its `send_result` (or
//! a final error) arrives; when the connection drops, every unconfirmed send goes out again on the next one with
//! the same `client_msg_id`, which the server deduplicates.
//!
//! Generic over the waiter `W` (a oneshot sender in the client, anything in tests).

use parley_core::protocol::ClientFrame;
use std::collections::VecDeque;

#[derive(Debug)]
struct Entry<W> {
    client_msg_id: String,
    channel: String,
    text: String,
    waiters: Vec<W>,
    /// Written on the current connection and not yet answered.
    in_flight: bool,
}

/// Unconfirmed sends.
#[derive(Debug)]
pub struct Outbox<W> {
    entries: VecDeque<Entry<W>>,
    in_flight: usize,
}

impl<W> Default for Outbox<W> {
    fn default() -> Self {
        Self { entries: VecDeque::new(), in_flight: 0 }
    }
}

impl<W> Outbox<W> {
    /// Adds a send. A send with a `client_msg_id` already waiting just gains a waiter.
    pub fn push(&mut self, channel: String, client_msg_id: String, text: String, waiter: W) {
        if let Some(entry) = self.entries.iter_mut().find(|entry| entry.client_msg_id == client_msg_id) {
            entry.waiters.push(waiter);
            return;
        }
        self.entries.push_back(Entry { client_msg_id, channel, text, waiters: vec![waiter], in_flight: false });
    }

    /// Whether a send waits to be written.
    pub fn has_unsent(&self) -> bool {
        self.in_flight < self.entries.len()
    }

    /// Sends written on this connection and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The oldest send not yet written on this connection, as a frame; marks it in flight.
    pub fn next_unsent(&mut self) -> Option<ClientFrame> {
        let entry = self.entries.iter_mut().find(|entry| !entry.in_flight)?;
        entry.in_flight = true;
        self.in_flight += 1;
        Some(ClientFrame::Send {
            req_id: None,
            channel: entry.channel.clone(),
            client_msg_id: entry.client_msg_id.clone(),
            text: entry.text.clone(),
        })
    }

    /// Removes a send that got its final answer; returns its waiters (empty if it was unknown).
    pub fn complete(&mut self, client_msg_id: &str) -> Vec<W> {
        match self.entries.iter().position(|entry| entry.client_msg_id == client_msg_id) {
            Some(index) => match self.entries.remove(index) {
                Some(entry) => {
                    if entry.in_flight {
                        self.in_flight -= 1;
                    }
                    entry.waiters
                }
                None => Vec::new(),
            },
            None => Vec::new(),
        }
    }

    /// Marks a send to be written again (it was refused for now, e.g. `rate_limited`). `false` if unknown.
    pub fn retry(&mut self, client_msg_id: &str) -> bool {
        match self.entries.iter_mut().find(|entry| entry.client_msg_id == client_msg_id) {
            Some(entry) => {
                if entry.in_flight {
                    entry.in_flight = false;
                    self.in_flight -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// The connection is gone: every unconfirmed send is to be written again.
    pub fn reset(&mut self) {
        for entry in &mut self.entries {
            entry.in_flight = false;
        }
        self.in_flight = 0;
    }

    /// Removes everything; returns all waiters.
    pub fn drain(&mut self) -> Vec<W> {
        let entries = std::mem::take(&mut self.entries);
        self.in_flight = 0;
        entries.into_iter().flat_map(|entry| entry.waiters).collect()
    }

    /// Unconfirmed sends.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is unconfirmed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(frame: Option<ClientFrame>) -> Option<String> {
        match frame {
            Some(ClientFrame::Send { client_msg_id, .. }) => Some(client_msg_id),
            _ => None,
        }
    }

    #[test]
    fn sends_in_order_and_resends_unconfirmed_with_the_same_id_after_reset() {
        let mut outbox = Outbox::default();
        outbox.push("g:a".into(), "c1".into(), "one".into(), 1);
        outbox.push("g:a".into(), "c2".into(), "two".into(), 2);
        outbox.push("g:a".into(), "c3".into(), "three".into(), 3);
        assert_eq!(id(outbox.next_unsent()).as_deref(), Some("c1"));
        assert_eq!(id(outbox.next_unsent()).as_deref(), Some("c2"));
        assert_eq!(outbox.in_flight(), 2);
        assert_eq!(outbox.complete("c1"), [1]);
        assert_eq!(outbox.in_flight(), 1);
        assert!(outbox.has_unsent());
        outbox.reset();
        assert_eq!(outbox.in_flight(), 0);
        assert_eq!(id(outbox.next_unsent()).as_deref(), Some("c2"));
        assert_eq!(id(outbox.next_unsent()).as_deref(), Some("c3"));
        assert!(!outbox.has_unsent());
        assert_eq!(outbox.next_unsent(), None);
        assert_eq!(outbox.len(), 2);
    }

    #[test]
    fn same_id_joins_the_waiting_send_and_retry_requeues() {
        let mut outbox = Outbox::default();
        outbox.push("g:a".into(), "c1".into(), "one".into(), 1);
        outbox.push("g:a".into(), "c1".into(), "one".into(), 2);
        assert_eq!(outbox.len(), 1);
        assert_eq!(id(outbox.next_unsent()).as_deref(), Some("c1"));
        assert!(outbox.retry("c1"));
        assert!(!outbox.retry("nope"));
        assert_eq!(id(outbox.next_unsent()).as_deref(), Some("c1"));
        assert_eq!(outbox.complete("c1"), [1, 2]);
        assert!(outbox.complete("c1").is_empty());
        assert!(outbox.is_empty());
    }

    #[test]
    fn drain_returns_every_waiter() {
        let mut outbox = Outbox::default();
        outbox.push("g:a".into(), "c1".into(), "one".into(), 1);
        outbox.push("g:b".into(), "c2".into(), "two".into(), 2);
        assert_eq!(outbox.drain(), [1, 2]);
        assert!(outbox.is_empty());
    }
}
