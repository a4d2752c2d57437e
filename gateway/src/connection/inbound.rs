//! Client to server: reading the socket, decoding frames and dispatching them. Pings, acknowledgements, syncs
//! and the rate limit are handled on the loop; sends and other requests run concurrently as [`super::Pending`]
//! futures whose answers the loop sends when they complete.

use super::requests::{error_frame, request, router_error};
use super::timers::unix_ms;
use super::{close, Connection, Ending, ReadFailure, Shared, Step};
use crate::metrics::Limit;
use axum::extract::ws::Message;
use futures_util::{Sink, Stream};
use parley_core::protocol::{decode_client, ClientFrame, ErrorCode, ServerFrame};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::time::Instant;
use tracing::debug;

impl<S, E> Connection<'_, S, E>
where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    /// What the socket gave: a message, or the end of the connection: the client left or the read failed (no
    /// close), or the client broke a rule of the wire, closed with its code (RFC 6455 §7.4.1): a frame too big
    /// (1009), a frame that breaks the protocol (1002), a text frame that is not UTF-8 (1007).
    pub(super) fn received(&mut self, incoming: Option<Result<Message, E>>) -> Result<Message, Ending> {
        let error = match incoming {
            Some(Ok(message)) => return Ok(message),
            None => {
                self.read_failed = true;
                return Err(Ending::Gone);
            }
            Some(Err(error)) => error,
        };
        // The stream reads nothing more after an error.
        self.read_failed = true;
        match (self.transport.classify)(&error) {
            ReadFailure::TooBig => {
                self.shared.metrics.limit(Limit::FrameSize);
                Err(Ending::Close(close::TOO_BIG, "frame too big: the limit is max_frame_bytes"))
            }
            ReadFailure::Protocol => {
                debug!(%error, "protocol error");
                Err(Ending::Close(close::PROTOCOL_ERROR, "protocol error: a frame breaks RFC 6455"))
            }
            ReadFailure::InvalidUtf8 => {
                debug!(%error, "invalid UTF-8");
                Err(Ending::Close(close::INVALID_PAYLOAD, "invalid payload: a text frame that is not UTF-8"))
            }
            ReadFailure::Gone => {
                debug!(%error, "read failed");
                Err(Ending::Gone)
            }
        }
    }

    /// A message from the client: any traffic counts against the idle timeout; text and binary messages are
    /// decoded as client frames (a binary frame's payload is read as UTF-8 JSON too), and an undecodable one is
    /// answered with an error frame.
    pub(super) async fn on_message(&mut self, message: Message) -> Step {
        self.deadlines.touch();
        let bytes = match message {
            Message::Text(text) => axum::body::Bytes::from(text),
            Message::Binary(bytes) => bytes,
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Ending::Gone),
        };
        self.shared.metrics.frames_in.inc();
        match decode_client(&bytes) {
            // An acknowledgement, the frame most clients send most, is handled in line; every other frame's future
            // is boxed: kept out of line, it does not enlarge every idle connection's task.
            Ok(ClientFrame::Ack { channel, seq }) => {
                self.on_ack(channel, seq);
                Ok(())
            }
            Ok(frame) => Box::pin(self.on_frame(frame)).await,
            Err(error) => {
                self.shared.metrics.error(error.code);
                let frame = super::text(&error_frame(error.req_id, error.code, error.message, None));
                Box::pin(self.write(frame)).await
            }
        }
    }

    async fn on_frame(&mut self, frame: ClientFrame) -> Step {
        match frame {
            ClientFrame::Ping { req_id } => self.send(&ServerFrame::Pong { req_id, ts: unix_ms() }).await,
            ClientFrame::Ack { channel, seq } => {
                self.on_ack(channel, seq);
                Ok(())
            }
            ClientFrame::Sync { req_id, channels } => self.on_sync(req_id, channels).await,
            ClientFrame::Send { req_id, channel, client_msg_id, text, first_attempt } => {
                self.on_send(req_id, channel, client_msg_id, text, first_attempt).await
            }
            other => {
                let shared = self.shared;
                self.pending.push(Box::pin(async move { Some(request(shared, other).await) }));
                Ok(())
            }
        }
    }

    /// A cumulative acknowledgement. Progress in a small channel is published as a delivery receipt (the sender
    /// sees "delivered"), best effort and off the loop. The receipt says no more than this connection delivered:
    /// `seq` is the client's number, and may be anything.
    fn on_ack(&mut self, channel: String, seq: u64) {
        let Shared { router, hub, session, .. } = self.shared;
        let seq = seq.min(self.tracker.delivered(&channel).unwrap_or(seq));
        // Receipts only for small channels (the router checks again; this spares it the calls).
        if self.tracker.ack(&channel, seq) > 0 && hub.small_channel(&channel, parley_api::DELIVERY_RECEIPT_MEMBERS) {
            self.pending.push(Box::pin(async move {
                if let Err(error) = router.mark_delivered(&session.user, &channel, seq).await {
                    debug!(%error, "delivery receipt not published");
                }
                None
            }));
        }
    }

    /// A resume: replays each channel after the sequence the client has, then says `synced`.
    async fn on_sync(&mut self, req_id: Option<String>, channels: BTreeMap<String, u64>) -> Step {
        let metrics = self.shared.metrics;
        let mut replayed = Ok(());
        for (channel, have) in channels {
            match self.replay(&Arc::from(channel.as_str()), have, None).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    metrics.error(error.code());
                    if let Err(ending) = self.feed(super::text(&router_error(req_id.clone(), error, None))).await {
                        replayed = Err(ending);
                        break;
                    }
                }
                Err(ending) => {
                    replayed = Err(ending);
                    break;
                }
            }
        }
        let outcome = if replayed.is_err() { "failed" } else { "replayed" };
        metrics.resumes.get_or_create(&vec![("outcome", outcome)]).inc();
        replayed?;
        self.send(&ServerFrame::Synced { req_id }).await
    }

    /// A send: refused at once past the rate limit, else handed to the router concurrently.
    async fn on_send(
        &mut self,
        req_id: Option<String>,
        channel: String,
        client_msg_id: String,
        text: String,
        first_attempt: bool,
    ) -> Step {
        let Shared { router, metrics, config, session, .. } = self.shared;
        if !self.bucket.try_take(self.clock.now_ms()) {
            metrics.limit(Limit::Rate);
            metrics.error(ErrorCode::RateLimited);
            let (rate, burst) = (config.send_rate_per_sec, config.send_burst);
            let message = format!("more than {rate} sends per second (burst {burst}); retry later");
            return self.send(&error_frame(req_id, ErrorCode::RateLimited, message, Some(client_msg_id))).await;
        }
        self.pending.push(Box::pin(async move {
            let started = Instant::now();
            let result = router.send_attempt(&session.user, &channel, &client_msg_id, &text, first_attempt).await;
            metrics.send_seconds.observe(started.elapsed().as_secs_f64());
            Some(match result {
                Ok(outcome) => ServerFrame::SendResult {
                    req_id,
                    client_msg_id,
                    channel: outcome.channel,
                    id: outcome.placement.id,
                    seq: outcome.placement.seq,
                    ts: outcome.placement.ts,
                    duplicate: outcome.duplicate,
                },
                Err(error) => {
                    metrics.error(error.code());
                    router_error(req_id, error, Some(client_msg_id))
                }
            })
        }));
        Ok(())
    }
}
