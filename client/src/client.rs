//! The application-facing handle.

use crate::config::ClientConfig;
use crate::driver::{open, Command, Driver, Reply, Request, RequestCommand, SendCommand};
use crate::error::ClientError;
use crate::event::{Event, HistoryPage, HistoryQuery, SendReceipt};
use parley_core::presence::PresenceView;
use parley_core::protocol::ChannelView;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A handle on one client connection (which reconnects by itself). Cheap to clone; the connection task stops
/// when [`Client::close`] is called or every handle is dropped.
///
/// Every method may be called at any time, also while disconnected: sends wait in order and go out (with their
/// original `client_msg_id`) once connected; requests go out on the next connection.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    ids: Arc<IdSource>,
}

#[derive(Debug)]
struct IdSource {
    prefix: String,
    counter: AtomicU64,
}

impl Client {
    /// Connects, waits for `ready`, and starts the connection task. Fails if this first attempt fails (bad URL,
    /// refused token, server down), so configuration errors surface at once; later losses are retried.
    ///
    /// Returns the handle and the event stream. Must be called inside a Tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<(Client, mpsc::Receiver<Event>), ClientError> {
        let config = Arc::new(config);
        let first = open(config.clone(), config.token.clone(), 0).await?;
        Ok(Self::start(config, Some(first)))
    }

    /// Starts the connection task without waiting: every attempt, the first one included, is retried with
    /// backoff. Fails only on an unusable URL. Must be called inside a Tokio runtime.
    pub fn spawn(config: ClientConfig) -> Result<(Client, mpsc::Receiver<Event>), ClientError> {
        config.endpoints()?;
        Ok(Self::start(Arc::new(config), None))
    }

    fn start(
        config: Arc<ClientConfig>,
        first: Option<(crate::driver::Ws, crate::driver::Ready)>,
    ) -> (Client, mpsc::Receiver<Event>) {
        let (commands, command_receiver) = mpsc::channel(config.command_capacity.max(1));
        let (event_sender, events) = mpsc::channel(config.event_capacity.max(1));
        let driver = Driver::new(config, command_receiver, event_sender);
        tokio::spawn(driver.run(first));
        let prefix: String = rand::random::<[u8; 8]>().iter().map(|byte| format!("{byte:02x}")).collect();
        (Client { commands, ids: Arc::new(IdSource { prefix, counter: AtomicU64::new(1) }) }, events)
    }

    /// A fresh idempotency key: a random per-client prefix and a counter.
    pub fn next_client_msg_id(&self) -> String {
        format!("{}-{}", self.ids.prefix, self.ids.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a message and waits until it is durable. Retried across reconnects with the same `client_msg_id`,
    /// so it is stored exactly once.
    pub async fn send(&self, channel: impl Into<String>, text: impl Into<String>) -> Result<SendReceipt, ClientError> {
        self.submit(channel.into(), self.next_client_msg_id(), text.into(), true).await
    }

    /// Like [`Client::send`] with the caller's idempotency key (1-64 bytes, unique per user). Sending the same key
    /// again returns the original receipt with `duplicate: true`.
    pub async fn send_with_id(
        &self,
        channel: impl Into<String>,
        client_msg_id: impl Into<String>,
        text: impl Into<String>,
    ) -> Result<SendReceipt, ClientError> {
        // The caller's key may have been sent before (by an earlier run of the application, say): always a
        // possible retry, so the server looks for the earlier send.
        self.submit(channel.into(), client_msg_id.into(), text.into(), false).await
    }

    async fn submit(
        &self,
        channel: String,
        client_msg_id: String,
        text: String,
        fresh: bool,
    ) -> Result<SendReceipt, ClientError> {
        let (reply, answer) = oneshot::channel();
        let send = SendCommand { channel, client_msg_id, text, reply, fresh };
        self.commands.send(Command::Send(Box::new(send))).await.map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
    }

    async fn request(&self, request: Request) -> Result<Reply, ClientError> {
        let (reply, answer) = oneshot::channel();
        let command = RequestCommand { request, reply };
        self.commands.send(Command::Request(Box::new(command))).await.map_err(|_| ClientError::Closed)?;
        answer.await.map_err(|_| ClientError::Closed)?
    }

    async fn channel_request(&self, request: Request) -> Result<ChannelView, ClientError> {
        match self.request(request).await? {
            Reply::Channel(channel) => Ok(channel),
            other => Err(unexpected("channel", &other)),
        }
    }

    /// Reads a page of history (independent of the event stream).
    pub async fn history(&self, channel: impl Into<String>, query: HistoryQuery) -> Result<HistoryPage, ClientError> {
        match self.request(Request::History { channel: channel.into(), query }).await? {
            Reply::History(page) => Ok(page),
            other => Err(unexpected("history", &other)),
        }
    }

    /// Creates the group channel `g:<name>` with the caller and `members`.
    pub async fn create_channel(
        &self,
        name: impl Into<String>,
        members: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<ChannelView, ClientError> {
        let members = members.into_iter().map(Into::into).collect();
        self.channel_request(Request::CreateChannel { name: name.into(), members }).await
    }

    /// Joins a group channel; its messages are delivered from its current `last_seq` on.
    pub async fn join(&self, channel: impl Into<String>) -> Result<ChannelView, ClientError> {
        self.channel_request(Request::Join { channel: channel.into() }).await
    }

    /// Leaves a channel.
    pub async fn leave(&self, channel: impl Into<String>) -> Result<ChannelView, ClientError> {
        self.channel_request(Request::Leave { channel: channel.into() }).await
    }

    /// Opens (creates on first use) the direct-message channel with `user`.
    pub async fn open_dm(&self, user: impl Into<String>) -> Result<ChannelView, ClientError> {
        self.channel_request(Request::OpenDm { user: user.into() }).await
    }

    /// Lists the user's channels.
    pub async fn list_channels(&self) -> Result<Vec<ChannelView>, ClientError> {
        match self.request(Request::ListChannels).await? {
            Reply::Channels(channels) => Ok(channels),
            other => Err(unexpected("channels", &other)),
        }
    }

    /// Watches users' presence: answers with their presence now, then each change arrives as
    /// [`Event::Presence`](crate::Event::Presence). Watching holds across reconnects (the client watches again and
    /// reports the state then).
    pub async fn watch_presence(
        &self,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Vec<PresenceView>, ClientError> {
        let users = users.into_iter().map(Into::into).collect();
        match self.request(Request::WatchPresence { users, watch: true }).await? {
            Reply::Presence(views) => Ok(views),
            other => Err(unexpected("presence_state", &other)),
        }
    }

    /// Stops watching users' presence.
    pub async fn unwatch_presence(
        &self,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<(), ClientError> {
        let users = users.into_iter().map(Into::into).collect();
        match self.request(Request::WatchPresence { users, watch: false }).await? {
            Reply::Presence(_) => Ok(()),
            other => Err(unexpected("presence_state", &other)),
        }
    }

    /// Says the user is away (`true`) or back (`false`); holds across reconnects. Answers with the user's presence.
    pub async fn set_away(&self, away: bool) -> Result<PresenceView, ClientError> {
        match self.request(Request::SetAway { away }).await? {
            Reply::Presence(mut views) if !views.is_empty() => Ok(views.remove(0)),
            other => Err(unexpected("presence_state", &other)),
        }
    }

    /// Replaces the token used by the next connection attempts (e.g. after close code 4001, token expired).
    pub async fn set_token(&self, token: impl Into<String>) -> Result<(), ClientError> {
        self.commands.send(Command::SetToken(token.into())).await.map_err(|_| ClientError::Closed)
    }

    /// Closes the connection (code 1000) and stops the task. Waiting sends and requests fail with
    /// [`ClientError::Closed`]; the event stream ends with [`Event::Closed`].
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
    }

    /// Whether the connection task has stopped.
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }
}

fn unexpected(wanted: &str, reply: &Reply) -> ClientError {
    let got = match reply {
        Reply::History(_) => "history",
        Reply::Channel(_) => "channel",
        Reply::Channels(_) => "channels",
        Reply::Presence(_) => "presence_state",
    };
    ClientError::Protocol { detail: format!("expected a {wanted} frame, got {got}") }
}
