//! Fallback transports for clients that cannot use WebSocket: Server-Sent Events and long-polling.
//!
//! Both run the very same per-connection loop as WebSocket ([`crate::connection::serve`]) over a [`VirtualSocket`]
//! made of two bounded channels, so ACK/retransmit, resume with `sync`, the idle timeout, every limit and every
//! error frame behave exactly as over WebSocket. Only the framing differs:
//!
//! - SSE: `GET /v1/sse` streams each server frame as one event; the client posts its frames to
//!   `POST /v1/sse/{session_id}`.
//! - Long-poll: `POST /v1/poll/connect` opens a session, `GET /v1/poll/{session_id}` waits for frames,
//!   `POST /v1/poll/{session_id}` sends frames and `DELETE /v1/poll/{session_id}` ends the session.
//!
//! A session is admitted like a WebSocket ([`crate::admission`]): it lives in a [`Sessions`] registry and holds one
//! of the process's connection permits.
//! The outbound side is bounded end to end: the loop's queue, then [`OUTBOUND_FRAMES`] frames in the virtual
//! socket; a client that takes nothing blocks the loop's writes, which fail after `write_timeout_ms` (a slow
//! consumer, 4008, like a WebSocket whose TCP window stays full), and the virtual socket itself gives up after
//! `idle_timeout_ms` without progress.

use crate::admission::{parse_connect_query, token, Admission, AppState, ConnectQuery};
use crate::metrics::Limit;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router as AxumRouter;
use futures_util::{Sink, Stream};
use parley_api::http::{code, HttpError};
use parley_core::UserId;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tracing::{info_span, Instrument};

/// Frames buffered between the loop and the client (SSE stream or the next poll), beyond the loop's own queue.
pub const OUTBOUND_FRAMES: usize = 128;
/// Client frames buffered between a POST and the loop; past this a POST waits for the loop to read.
const INBOUND_FRAMES: usize = 32;
/// Interval of the SSE keep-alive comment.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Default `wait_ms` of a poll.
pub const DEFAULT_WAIT_MS: u64 = 25_000;
/// Largest `wait_ms` of a poll.
pub const MAX_WAIT_MS: u64 = 30_000;
/// How long `POST /v1/poll/connect` waits for the `ready` frame.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long a POST waits for the loop to take its frames before answering 503.
const POST_WAIT: Duration = Duration::from_secs(10);
/// Close code reported to a poll client whose session ended without a close frame.
const ABNORMAL_CLOSE: u16 = 1006;

type Reserving = Pin<Box<dyn Future<Output = Result<OwnedPermit<Message>, SendError<()>>> + Send>>;

/// The client of a [`VirtualSocket`] went away (or took no frame for the stall timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

impl std::fmt::Display for ClientGone {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("the fallback client went away")
    }
}

impl std::error::Error for ClientGone {}

/// A WebSocket stand-in made of two bounded channels: client frames come in through `inbound`, server frames go
/// out through `outbound`. Sending waits while `outbound` is full (backpressure) and fails once its receiver is
/// gone or after `stall` without room; the stream ends when every inbound sender is dropped.
pub struct VirtualSocket {
    inbound: mpsc::Receiver<Message>,
    outbound: Option<mpsc::Sender<Message>>,
    permit: Option<OwnedPermit<Message>>,
    reserving: Option<Reserving>,
    stall: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl VirtualSocket {
    /// A socket reading `inbound` and writing `outbound`.
    pub fn new(inbound: mpsc::Receiver<Message>, outbound: mpsc::Sender<Message>, stall: Duration) -> Self {
        Self { inbound, outbound: Some(outbound), permit: None, reserving: None, stall, stalled: None }
    }
}

impl Stream for VirtualSocket {
    type Item = Result<Message, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inbound.poll_recv(context).map(|message| message.map(Ok))
    }
}

impl Sink<Message> for VirtualSocket {
    type Error = ClientGone;

    fn poll_ready(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Result<(), ClientGone>> {
        let this = &mut *self;
        if this.permit.is_some() {
            return Poll::Ready(Ok(()));
        }
        let Some(sender) = &this.outbound else {
            return Poll::Ready(Err(ClientGone));
        };
        if this.reserving.is_none() {
            match sender.clone().try_reserve_owned() {
                Ok(permit) => {
                    this.permit = Some(permit);
                    return Poll::Ready(Ok(()));
                }
                Err(TrySendError::Closed(_)) => return Poll::Ready(Err(ClientGone)),
                Err(TrySendError::Full(sender)) => this.reserving = Some(Box::pin(sender.reserve_owned())),
            }
        }
        let Some(reserving) = this.reserving.as_mut() else {
            return Poll::Ready(Err(ClientGone));
        };
        match reserving.as_mut().poll(context) {
            Poll::Ready(reserved) => {
                this.reserving = None;
                this.stalled = None;
                let permit = reserved.map_err(|_| ClientGone)?;
                this.permit = Some(permit);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let stall = this.stall;
                let stalled = this.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match stalled.as_mut().poll(context) {
                    Poll::Ready(()) => Poll::Ready(Err(ClientGone)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), ClientGone> {
        let permit = self.permit.take().ok_or(ClientGone)?;
        permit.send(item);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _context: &mut Context<'_>) -> Poll<Result<(), ClientGone>> {
        Poll::Ready(if self.outbound.is_some() { Ok(()) } else { Err(ClientGone) })
    }

    fn poll_close(mut self: Pin<&mut Self>, _context: &mut Context<'_>) -> Poll<Result<(), ClientGone>> {
        // Dropping the last sender ends the client's side once it has taken what is buffered.
        self.permit = None;
        self.reserving = None;
        self.outbound = None;
        Poll::Ready(Ok(()))
    }
}

/// The virtual socket never fails a read.
fn never_fails(error: &Infallible) -> crate::connection::ReadFailure {
    match *error {}
}

/// Which transport a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Sse,
    Poll,
}

/// The server-to-client side of a long-poll session: the frames waiting for the next poll.
struct PollQueue {
    receiver: tokio::sync::Mutex<mpsc::Receiver<Message>>,
    /// Incremented by each poll; a poll that sees a newer ticket hands over at once.
    tickets: AtomicU64,
    /// Wakes the current poll when a newer one arrives.
    preempt: Notify,
    /// When a poll last started or ended.
    last_poll: Mutex<Instant>,
}

impl PollQueue {
    fn touch(&self) {
        if let Ok(mut last) = self.last_poll.lock() {
            *last = Instant::now();
        }
    }

    /// How long no poll has been waiting; `None` while one is.
    fn unpolled_for(&self) -> Option<Duration> {
        if self.receiver.try_lock().is_err() {
            return None;
        }
        self.last_poll.lock().ok().map(|last| last.elapsed())
    }
}

/// One fallback session.
struct Entry {
    user: UserId,
    transport: Transport,
    /// Client frames into the loop; taken when the session is removed, which ends the loop's input.
    inbound: Mutex<Option<mpsc::Sender<Message>>>,
    /// Long-poll only: the frames waiting for the client.
    queue: Option<PollQueue>,
}

impl Entry {
    fn inbound(&self) -> Option<mpsc::Sender<Message>> {
        self.inbound.lock().ok().and_then(|inbound| inbound.clone())
    }
}

/// The registry of fallback sessions of one application, by session id.
#[derive(Default)]
pub struct Sessions {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Sessions").field("len", &self.len()).finish()
    }
}

impl Sessions {
    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|entries| entries.len()).unwrap_or(0)
    }

    /// Whether there is no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, id: String, entry: Arc<Entry>) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(id, entry);
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.entries.lock().ok()?.get(id).cloned()
    }

    /// Removes a session and ends its loop's input (the loop then closes and unregisters).
    fn remove(&self, id: &str) {
        let removed = self.entries.lock().ok().and_then(|mut entries| entries.remove(id));
        if let Some(entry) = removed {
            if let Ok(mut inbound) = entry.inbound.lock() {
                inbound.take();
            }
        }
    }
}

/// State of the fallback routes: the application's state and the session registry.
#[derive(Clone)]
struct FallbackState {
    app: AppState,
    sessions: Arc<Sessions>,
}

/// The fallback routes, with their own session registry. Merged into [`crate::http::app`].
pub fn routes(state: AppState) -> AxumRouter {
    let state = FallbackState { app: state, sessions: Arc::new(Sessions::default()) };
    AxumRouter::new()
        .route("/v1/sse", get(sse_connect))
        .route("/v1/sse/{session_id}", post(sse_post))
        .route("/v1/poll/connect", post(poll_connect))
        .route("/v1/poll/{session_id}", get(poll_get).post(poll_post).delete(poll_delete))
        .with_state(state)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

#[derive(Deserialize)]
struct PollQuery {
    token: Option<String>,
    wait_ms: Option<u64>,
}

fn no_such_session(session_id: &str) -> HttpError {
    HttpError::new(StatusCode::NOT_FOUND, code::NO_SUCH_SESSION, format!("no session {session_id}; connect again"))
}

/// A freshly opened session: its id, and for SSE the receiver of its frames.
struct Opened {
    session_id: String,
    outbound: Option<mpsc::Receiver<Message>>,
    entry: Arc<Entry>,
}

/// Admits a connection (version, token, draining, connection limit), registers its session and starts its loop.
async fn open(
    state: &FallbackState,
    query: &ConnectQuery,
    headers: &HeaderMap,
    transport: Transport,
) -> Result<Opened, HttpError> {
    let admission = state.app.admit(query.v, token(query.token.as_deref(), headers)).await?;
    let session_id = admission.session.session_id.clone();
    let user = admission.session.user.clone();
    let (inbound_sender, inbound) = mpsc::channel(INBOUND_FRAMES);
    let (outbound, outbound_receiver) = mpsc::channel(OUTBOUND_FRAMES);
    let idle = Duration::from_millis(state.app.config.idle_timeout_ms.max(1));
    let socket = VirtualSocket::new(inbound, outbound, idle);
    let (queue, outbound_receiver) = match transport {
        Transport::Sse => (None, Some(outbound_receiver)),
        Transport::Poll => (
            Some(PollQueue {
                receiver: tokio::sync::Mutex::new(outbound_receiver),
                tickets: AtomicU64::new(0),
                preempt: Notify::new(),
                last_poll: Mutex::new(Instant::now()),
            }),
            None,
        ),
    };
    let entry = Arc::new(Entry { user, transport, inbound: Mutex::new(Some(inbound_sender)), queue });
    state.sessions.insert(session_id.clone(), entry.clone());

    let span = match transport {
        Transport::Sse => info_span!("sse"),
        Transport::Poll => info_span!("poll"),
    };
    tokio::spawn(run(state.sessions.clone(), socket, admission, transport).instrument(span));
    Ok(Opened { session_id, outbound: outbound_receiver, entry })
}

/// Runs a session's loop (which releases its permit when it ends), then (once the client has had its last frames)
/// removes its entry.
async fn run(sessions: Arc<Sessions>, socket: VirtualSocket, admission: Admission, transport: Transport) {
    let idle = Duration::from_millis(admission.context.config.idle_timeout_ms.max(1));
    let session_id = admission.session.session_id.clone();
    // However this task ends (a panic included), the session goes from the registry.
    let _remove = RemoveOnDrop { sessions: sessions.clone(), session_id: session_id.clone() };
    // No kernel socket under the virtual one: nothing to linger for after a close.
    let serving = admission.serve(socket, crate::connection::Transport::in_memory(never_fails));
    tokio::pin!(serving);
    let reaping = reap(&sessions, &session_id, idle, transport);
    tokio::pin!(reaping);
    let reaped = tokio::select! {
        () = &mut serving => false,
        () = &mut reaping => true,
    };
    if reaped {
        // The entry is gone, so the loop's input has ended: it closes at once.
        serving.await;
    }
    if !reaped {
        // Long-poll: keep the last frames (the close) for the client's next poll, as long as it keeps polling.
        reaping.await;
    }
}

/// Removes a long-poll session once no poll has come for `idle`; returns when the session is gone. SSE
/// sessions end with their stream instead, so for them this never returns.
async fn reap(sessions: &Sessions, session_id: &str, idle: Duration, transport: Transport) {
    if transport == Transport::Sse {
        return std::future::pending().await;
    }
    loop {
        let wait = {
            let Some(entry) = sessions.get(session_id) else { return };
            let Some(queue) = &entry.queue else { return };
            match queue.unpolled_for() {
                None => idle,
                Some(elapsed) if elapsed >= idle => {
                    sessions.remove(session_id);
                    return;
                }
                Some(elapsed) => idle - elapsed,
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Removes an SSE session when its response stream is dropped (the client went away).
struct RemoveOnDrop {
    sessions: Arc<Sessions>,
    session_id: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.sessions.remove(&self.session_id);
    }
}

fn close_json(code: u16, reason: &str) -> serde_json::Value {
    json!({ "code": code, "reason": reason })
}

async fn sse_connect(
    State(state): State<FallbackState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let connect = parse_connect_query(query.as_deref().unwrap_or_default())?;
    let opened = open(&state, &connect, &headers, Transport::Sse).await?;
    let receiver = opened.outbound.ok_or_else(|| HttpError::internal("an sse session without a stream"))?;
    let guard = RemoveOnDrop { sessions: state.sessions.clone(), session_id: opened.session_id };
    let events = futures_util::stream::unfold((receiver, guard, false), |(mut receiver, guard, done)| async move {
        if done {
            return None;
        }
        loop {
            match receiver.recv().await? {
                Message::Text(text) => {
                    return Some((Ok::<_, Infallible>(Event::default().data(text.as_str())), (receiver, guard, false)));
                }
                Message::Close(frame) => {
                    let (code, reason) = frame.map(|frame| (frame.code, frame.reason.to_string())).unwrap_or_default();
                    let event = Event::default().event("close").data(close_json(code, &reason).to_string());
                    return Some((Ok(event), (receiver, guard, true)));
                }
                Message::Binary(_) | Message::Ping(_) | Message::Pong(_) => continue,
            }
        }
    });
    let mut response = Sse::new(events).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE)).into_response();
    // Ask reverse proxies not to buffer the stream.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

async fn poll_connect(
    State(state): State<FallbackState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let connect = parse_connect_query(query.as_deref().unwrap_or_default())?;
    let opened = open(&state, &connect, &headers, Transport::Poll).await?;
    let queue = opened.entry.queue.as_ref().ok_or_else(|| HttpError::internal("a poll session without a queue"))?;
    let batch = collect(queue, CONNECT_WAIT).await;
    if batch.closed.is_some() {
        state.sessions.remove(&opened.session_id);
    }
    Ok(batch.into_response(Some(&opened.session_id)))
}

/// Frames taken for one poll.
struct Batch {
    frames: Vec<Utf8Bytes>,
    closed: Option<(u16, String)>,
}

impl Batch {
    /// `{"session_id":..,"frames":[..],"closed":{..}}`, with the frames copied verbatim (they are JSON already).
    fn into_response(self, session_id: Option<&str>) -> Response {
        let size: usize = self.frames.iter().map(|frame| frame.len() + 1).sum();
        let mut body = String::with_capacity(size + 96);
        body.push('{');
        if let Some(session_id) = session_id {
            body.push_str("\"session_id\":");
            body.push_str(&json!(session_id).to_string());
            body.push(',');
        }
        body.push_str("\"frames\":[");
        for (index, frame) in self.frames.iter().enumerate() {
            if index > 0 {
                body.push(',');
            }
            body.push_str(frame.as_str());
        }
        body.push(']');
        if let Some((code, reason)) = self.closed {
            body.push_str(",\"closed\":");
            body.push_str(&close_json(code, &reason).to_string());
        }
        body.push('}');
        ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
    }
}

/// Waits up to `wait` for at least one frame, then takes every frame already queued. A newer poll of the same
/// session makes this one return at once (empty), so a client that abandoned a poll is not locked out.
async fn collect(queue: &PollQueue, wait: Duration) -> Batch {
    let ticket = queue.tickets.fetch_add(1, Ordering::SeqCst) + 1;
    queue.preempt.notify_waiters();
    let mut receiver = queue.receiver.lock().await;
    queue.touch();
    let preempted = queue.preempt.notified();
    tokio::pin!(preempted);
    let mut batch = Batch { frames: Vec::new(), closed: None };
    let superseded = queue.tickets.load(Ordering::SeqCst) != ticket;
    let first = if superseded {
        receiver.try_recv().map_err(|error| error == mpsc::error::TryRecvError::Disconnected)
    } else {
        tokio::select! {
            received = receiver.recv() => received.ok_or(true),
            () = tokio::time::sleep(wait) => Err(false),
            () = &mut preempted => Err(false),
        }
    };
    let mut next = first;
    loop {
        match next {
            Ok(Message::Text(text)) => batch.frames.push(text),
            Ok(Message::Close(frame)) => {
                batch.closed = Some(frame.map(|frame| (frame.code, frame.reason.to_string())).unwrap_or_default());
                break;
            }
            Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_)) => {}
            Err(true) => {
                batch.closed = Some((ABNORMAL_CLOSE, "session ended".to_owned()));
                break;
            }
            Err(false) => break,
        }
        if batch.frames.len() >= OUTBOUND_FRAMES {
            break;
        }
        next = receiver.try_recv().map_err(|error| error == mpsc::error::TryRecvError::Disconnected);
    }
    drop(receiver);
    queue.touch();
    batch
}

/// Looks up a session of `transport` and checks that the caller is its user.
async fn authorize(
    state: &FallbackState,
    session_id: &str,
    query_token: Option<&str>,
    headers: &HeaderMap,
    transport: Transport,
) -> Result<Arc<Entry>, HttpError> {
    let identity = state.app.authenticate(token(query_token, headers)).await?;
    let entry = state
        .sessions
        .get(session_id)
        .filter(|entry| entry.transport == transport)
        .ok_or_else(|| no_such_session(session_id))?;
    if entry.user != identity.user {
        return Err(HttpError::new(StatusCode::FORBIDDEN, code::FORBIDDEN, "this session belongs to another user"));
    }
    Ok(entry)
}

async fn poll_get(
    State(state): State<FallbackState>,
    session_id: Result<Path<String>, PathRejection>,
    poll: Result<Query<PollQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let Path(session_id) = session_id?;
    let Query(poll) = poll?;
    let entry = authorize(&state, &session_id, poll.token.as_deref(), &headers, Transport::Poll).await?;
    let queue = entry.queue.as_ref().ok_or_else(|| no_such_session(&session_id))?;
    let wait = Duration::from_millis(poll.wait_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS));
    let batch = collect(queue, wait).await;
    if batch.closed.is_some() {
        state.sessions.remove(&session_id);
    }
    Ok(batch.into_response(None))
}

async fn poll_delete(
    State(state): State<FallbackState>,
    session_id: Result<Path<String>, PathRejection>,
    token_query: Result<Query<TokenQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, HttpError> {
    let Path(session_id) = session_id?;
    authorize(&state, &session_id, token_query?.0.token.as_deref(), &headers, Transport::Poll).await?;
    state.sessions.remove(&session_id);
    Ok(StatusCode::NO_CONTENT)
}

async fn sse_post(
    State(state): State<FallbackState>,
    session_id: Result<Path<String>, PathRejection>,
    token_query: Result<Query<TokenQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let Path(session_id) = session_id?;
    post_frames(&state, &session_id, token_query?.0.token.as_deref(), &headers, body, Transport::Sse).await
}

async fn poll_post(
    State(state): State<FallbackState>,
    session_id: Result<Path<String>, PathRejection>,
    token_query: Result<Query<TokenQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let Path(session_id) = session_id?;
    post_frames(&state, &session_id, token_query?.0.token.as_deref(), &headers, body, Transport::Poll).await
}

/// Feeds the frames of a POST body into the session's loop, which answers on the downstream.
async fn post_frames(
    state: &FallbackState,
    session_id: &str,
    token: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    transport: Transport,
) -> Result<Response, HttpError> {
    let entry = authorize(state, session_id, token, headers, transport).await?;
    let limit = state.app.config.max_frame_bytes;
    let too_big = || {
        state.app.metrics.limit(Limit::FrameSize);
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::FRAME_TOO_BIG,
            format!("the body is larger than max_frame_bytes ({limit})"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok())
        .and_then(|length| length.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_big());
    }
    // Past the limit reading fails; any other failure means the client is gone and sees no answer anyway.
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| too_big())?;
    let frames = split_frames(body);
    let inbound = entry.inbound().ok_or_else(|| no_such_session(session_id))?;
    drop(entry);
    let accepted = frames.len();
    for frame in frames {
        match tokio::time::timeout(POST_WAIT, inbound.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(no_such_session(session_id)),
            Err(_) => {
                return Err(HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    code::OVERLOADED,
                    "the session is not reading; retry the frames not yet answered",
                ))
            }
        }
    }
    Ok((StatusCode::ACCEPTED, axum::Json(json!({ "accepted": accepted }))).into_response())
}

/// A JSON array is a batch of frames; anything else is one frame, passed on as is so the loop answers malformed
/// input with the same error frames as over WebSocket.
fn split_frames(body: Bytes) -> Vec<Message> {
    let array = body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'[');
    if array {
        if let Ok(values) = serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
            return values.into_iter().map(|value| Message::Text(Utf8Bytes::from(value.to_string()))).collect();
        }
    }
    match Utf8Bytes::try_from(body.clone()) {
        Ok(text) => vec![Message::Text(text)],
        Err(_) => vec![Message::Binary(body)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};

    fn text(value: &str) -> Message {
        Message::Text(Utf8Bytes::from(value))
    }

    #[tokio::test]
    async fn the_sink_applies_backpressure_then_fails_after_the_stall_timeout() {
        let stall = Duration::from_millis(300);
        let (_inbound_sender, inbound) = mpsc::channel(1);
        let (outbound, mut receiver) = mpsc::channel(2);
        let mut socket = VirtualSocket::new(inbound, outbound, stall);
        socket.send(text("1")).await.expect("room");
        socket.send(text("2")).await.expect("room");
        // Full: the third send waits, and taking one frame lets it through.
        let third = tokio::time::timeout(Duration::from_millis(100), socket.send(text("3"))).await;
        assert!(third.is_err(), "a full channel blocks the sender");
        assert_eq!(receiver.recv().await, Some(text("1")));
        socket.send(text("3")).await.expect("room again");
        // Nobody takes anything for the stall timeout: the send fails rather than waiting for ever.
        let started = Instant::now();
        assert_eq!(socket.send(text("4")).await, Err(ClientGone));
        assert!(started.elapsed() >= stall);
    }

    #[tokio::test]
    async fn the_sink_fails_once_the_client_is_gone_and_close_ends_the_client_side() {
        let (inbound_sender, inbound) = mpsc::channel(1);
        let (outbound, mut receiver) = mpsc::channel(4);
        let mut socket = VirtualSocket::new(inbound, outbound, Duration::from_secs(5));
        inbound_sender.send(text("ping")).await.expect("send");
        drop(inbound_sender);
        assert!(matches!(socket.next().await, Some(Ok(message)) if message == text("ping")));
        assert!(socket.next().await.is_none(), "the stream ends with its senders");
        socket.send(text("last")).await.expect("send");
        socket.close().await.expect("close");
        assert_eq!(receiver.recv().await, Some(text("last")));
        assert_eq!(receiver.recv().await, None);
        assert_eq!(socket.send(text("after")).await, Err(ClientGone));

        let (_inbound_sender, inbound) = mpsc::channel(1);
        let (outbound, receiver) = mpsc::channel(4);
        let mut socket = VirtualSocket::new(inbound, outbound, Duration::from_secs(5));
        drop(receiver);
        assert_eq!(socket.send(text("nobody")).await, Err(ClientGone));
    }

    #[test]
    fn bodies_split_into_frames() {
        let one = split_frames(Bytes::from_static(br#"{"type":"ping"}"#));
        assert_eq!(one, vec![text(r#"{"type":"ping"}"#)]);
        let many = split_frames(Bytes::from_static(br#" [{"type":"ping"},{"type":"ack","channel":"g:a","seq":3}]"#));
        assert_eq!(many.len(), 2);
        assert_eq!(many[0], text(r#"{"type":"ping"}"#));
        let broken = split_frames(Bytes::from_static(b"[{"));
        assert_eq!(broken, vec![text("[{")], "malformed input reaches the loop, which answers invalid_json");
        assert!(matches!(split_frames(Bytes::from_static(b"\xff"))[..], [Message::Binary(_)]));
    }
}
