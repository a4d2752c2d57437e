//! Server to client: frames queued by the hub, gap fills and replays from history, and retransmissions. Messages
//! reach the client in order, without duplicates, each tracked until the client acknowledges it.

use super::{close, text, Connection, Ending, Step, OUTBOUND_BATCH};
use crate::hub::OutboundFrame;
use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::{Sink, Stream};
use parley_api::{HistoryQuery, RouterError};
use parley_core::delivery::{Admit, Due};
use parley_core::protocol::ServerFrame;
use std::sync::Arc;

/// Messages one history read of a replay asks for.
const REPLAY_PAGE: u32 = 200;

impl<S, E> Connection<'_, S, E>
where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    /// A frame from the hub's queue, and whatever else is queued already (up to a batch), then one flush. The
    /// queue ends when the hub cut this connection off because the queue overflowed: the client is too slow.
    pub(super) async fn on_outbound(&mut self, queued: Option<OutboundFrame>) -> Step {
        let Some(item) = queued else {
            return Err(Ending::Close(
                close::SLOW_CONSUMER,
                "slow consumer: outbound queue overflowed; reconnect and fill gaps with history",
            ));
        };
        self.deliver(item).await?;
        for _ in 0..OUTBOUND_BATCH {
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
    /// messages missing before it (read from history) when there is a gap.
    async fn deliver(&mut self, item: OutboundFrame) -> Step {
        let Some((channel, seq)) = item.0.message.clone() else {
            return self.feed(Message::Text(item.0.frame.clone())).await;
        };
        match self.tracker.admit(&channel, seq) {
            Admit::Duplicate => return Ok(()),
            Admit::Deliver => {}
            Admit::Gap { from, to } => {
                self.shared.metrics.gaps_filled.inc();
                // The gap is reported but the stream goes on: the client refetches with history.
                // Boxed: gaps are rare, and keeping this future out of line keeps every connection's task small.
                let _ = Box::pin(self.replay(&channel, from - 1, Some(to))).await?;
            }
        }
        if self.tracker.admit(&channel, seq) == Admit::Duplicate {
            return Ok(());
        }
        self.feed(Message::Text(item.0.frame.clone())).await?;
        self.tracker.sent(&channel, seq, item.0.frame.clone(), self.clock.now_ms());
        Ok(())
    }

    /// Sends the messages of `channel` after `after` (up to `upto`, or to the end) from storage, in order, each
    /// tracked for acknowledgement. A part no longer retained is announced with `resync_required`.
    /// Outer `Err`: the connection ends; inner `Err`: the router refused (not a member, unavailable).
    pub(super) async fn replay(
        &mut self,
        channel: &Arc<str>,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Result<(), RouterError>, Ending> {
        let router = self.shared.router;
        let mut cursor = after;
        loop {
            let query = HistoryQuery { after: Some(cursor), before: upto.map(|last| last + 1), limit: REPLAY_PAGE };
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
            let expected = cursor + 1;
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
            for message in page.messages {
                let seq = message.seq;
                cursor = seq;
                if self.tracker.admit(channel, seq) == Admit::Duplicate && upto.is_some() {
                    continue;
                }
                let frame = Utf8Bytes::from(ServerFrame::Message(message).to_json());
                self.feed(Message::Text(frame.clone())).await?;
                self.tracker.sent(channel, seq, frame, self.clock.now_ms());
            }
            if !page.has_more {
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
