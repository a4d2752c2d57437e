//! Server to client: frames queued by the hub, gap fills and replays from history, and retransmissions. Messages
//! reach the client in order, without duplicates, each tracked until the client acknowledges it: live and
//! replayed messages pass the same admission ([`parley_core::delivery::DeliveryTracker::admit`]), so a sequence
//! goes out once per connection however it arrives. A [`Directive`] in the queue (the server API's disconnect or
//! token revocation) ends the connection after the frames queued before it.

use super::{close, text, Connection, Ending, Step, OUTBOUND_BATCH, TOKEN_REVOKED_REASON};
use crate::hub::{Directive, OutboundFrame};
use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::{Sink, Stream};
use parley_api::{HistoryQuery, RouterError};
use parley_bus::revocation::is_revoked;
use parley_core::delivery::{Admit, Due, Source};
use parley_core::protocol::ServerFrame;
use std::sync::Arc;

/// Messages one history read of a replay asks for.
const REPLAY_PAGE: u32 = 200;

impl<S, E> Connection<'_, S, E>
where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    /// A frame from the hub's queue, and whatever else is queued already (up to a batch), then one flush. Once the
    /// hub cut this connection off because its queue overflowed (the client is too slow), the connection closes at
    /// once: the frames still queued are dropped, and the client fills the gap with `sync`.
    pub(super) async fn on_outbound(&mut self, queued: Option<OutboundFrame>) -> Step {
        let Some(item) = queued.filter(|_| !self.outbound.is_closed()) else {
            return Err(slow_consumer());
        };
        self.deliver(item).await?;
        for _ in 0..OUTBOUND_BATCH {
            if self.outbound.is_closed() {
                return Err(slow_consumer());
            }
            match self.outbound.try_recv() {
                Ok(item) => self.deliver(item).await?,
                Err(_) => break,
            }
        }
        self.flush().await?;
        if self.tracker.overloaded() {
            return Err(Ending::Close(close::UNACKNOWLEDGED, "too many unacknowledged messages; resume with sync"));
        }
        Ok(())
    }

    /// Feeds one queued frame (no flush). A message is dropped when the client has it already, and follows the
    /// messages missing before it (read from history) when there is a gap. A directive closes the connection (after
    /// the frames queued before it): a disconnect always, a revocation when this connection's token is revoked.
    async fn deliver(&mut self, item: OutboundFrame) -> Step {
        if let Some(directive) = item.0.directive {
            return match directive {
                // The close frame follows the frames fed before it, in one flush.
                Directive::Close(code, reason) => Err(Ending::Close(code, reason)),
                Directive::Revoke { before } if is_revoked(self.shared.session.issued_at, before) => {
                    Err(Ending::Close(close::TOKEN_REVOKED, TOKEN_REVOKED_REASON))
                }
                Directive::Revoke { .. } => Ok(()),
            };
        }
        let Some((channel, seq)) = item.0.message.clone() else {
            return self.feed(Message::Text(item.0.frame.clone())).await;
        };
        match self.tracker.admit(&channel, seq, Source::Live) {
            Admit::Duplicate => return Ok(()),
            Admit::Deliver => {}
            Admit::Gap { from, to } => {
                self.shared.metrics.gaps_filled.inc();
                // The gap is reported but the stream goes on: the client refetches with history.
                // Boxed: gaps are rare, and keeping this future out of line keeps every connection's task small.
                // (`from` is at least 1: it follows a sequence.)
                let _ = Box::pin(self.replay(&channel, from.saturating_sub(1), Some(to))).await?;
                // The replay may have sent this message already.
                if self.tracker.admit(&channel, seq, Source::Live) == Admit::Duplicate {
                    return Ok(());
                }
            }
        }
        self.feed(Message::Text(item.0.frame.clone())).await?;
        // Read after the feed: a feed that waited on the socket (or a gap replay before it) must not make the
        // message look older than it is, or its retransmission would fall due early.
        self.tracker.sent(&channel, seq, item.0.frame.clone(), self.clock.now_ms());
        Ok(())
    }

    /// Sends the messages of `channel` after `after` (up to `upto`, or to the end) from storage, in order, each
    /// tracked for acknowledgement, except those this connection sent already. A part no longer retained is
    /// announced with `resync_required`. `after` may be any number a client sent (`sync`): nothing follows
    /// `u64::MAX`. Outer `Err`: the connection ends; inner `Err`: the router refused (not a member, unavailable).
    pub(super) async fn replay(
        &mut self,
        channel: &Arc<str>,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Result<(), RouterError>, Ending> {
        let router = self.shared.router;
        let mut cursor = after;
        loop {
            let Some(expected) = cursor.checked_add(1) else {
                return Ok(Ok(()));
            };
            // Up to `u64::MAX` is to the end.
            let before = upto.and_then(|last| last.checked_add(1));
            let query = HistoryQuery { after: Some(cursor), before, limit: REPLAY_PAGE };
            let cached = self.shared.hub.cached_page(self.shared.session.conn, channel, &query);
            let read = match cached {
                Some(page) => Ok(page),
                None => router.history(&self.shared.session.user, channel, query).await,
            };
            let page = match read {
                Ok(page) => page,
                Err(error) => return Ok(Err(error)),
            };
            let first_available = page.messages.first().map(|message| message.seq);
            let missing = match first_available {
                Some(first) => first > expected,
                None => upto.is_some_and(|last| last >= expected),
            };
            if missing {
                let first_available = match first_available {
                    Some(first) => first,
                    None => router.first_retained_seq(channel).await.unwrap_or(expected),
                };
                let frame =
                    ServerFrame::ResyncRequired { channel: channel.to_string(), from: expected, first_available };
                self.feed(text(&frame)).await?;
                self.tracker.start_at(channel, first_available.saturating_sub(1));
            }
            let before_page = cursor;
            for message in page.messages {
                let seq = message.seq;
                if seq <= cursor {
                    // Out of order: not a page of this query.
                    continue;
                }
                cursor = seq;
                if self.tracker.admit(channel, seq, Source::Replay) == Admit::Duplicate {
                    continue;
                }
                let frame = Utf8Bytes::from(ServerFrame::Message(message).to_json());
                self.feed(Message::Text(frame.clone())).await?;
                self.tracker.sent(channel, seq, frame, self.clock.now_ms());
            }
            // A page that does not move on (it should not happen) ends the replay rather than looping.
            if !page.has_more || cursor == before_page {
                return Ok(Ok(()));
            }
        }
    }

    /// Sends again what the client has not acknowledged in time; ends the connection when a message went
    /// unacknowledged through every retransmission.
    pub(super) async fn retransmit(&mut self) -> Step {
        match self.tracker.due(self.clock.now_ms()) {
            Due::Nothing => Ok(()),
            Due::Retransmit(items) => {
                self.shared.metrics.retransmits.inc_by(items.len() as u64);
                for (_, _, frame) in items {
                    self.feed(Message::Text(frame)).await?;
                }
                self.flush().await
            }
            Due::Dead { .. } => Err(Ending::Close(
                close::UNACKNOWLEDGED,
                "messages unacknowledged after every retransmission; resume with sync",
            )),
        }
    }
}

/// The close for a connection the hub cut off.
fn slow_consumer() -> Ending {
    Ending::Close(close::SLOW_CONSUMER, "slow consumer: outbound queue overflowed; reconnect and sync")
}
