//! The requests a connection runs concurrently with its loop (history, channel membership, presence, read
//! cursors), each answered with one frame: its result, or an error frame with the request's id.

use super::Shared;
use parley_api::{ChannelAction, ChannelSettings, HistoryQuery, RouterError};
use parley_core::presence::Status;
use parley_core::protocol::{ClientFrame, ErrorCode, ServerFrame};
use parley_core::UserId;

/// Most users one connection may watch the presence of.
const MAX_WATCHED: usize = 1_000;

/// Page size of a history request that names none.
const DEFAULT_HISTORY_LIMIT: u32 = 50;

pub(super) fn error_frame(
    req_id: Option<String>,
    code: ErrorCode,
    message: impl Into<String>,
    client_msg_id: Option<String>,
) -> ServerFrame {
    ServerFrame::Error { req_id, code, message: message.into(), client_msg_id }
}

pub(super) fn router_error(req_id: Option<String>, error: RouterError, client_msg_id: Option<String>) -> ServerFrame {
    error_frame(req_id, error.code(), error.to_string(), client_msg_id)
}

fn presence_unavailable() -> RouterError {
    RouterError::InvalidArgument("presence is not available".into())
}

/// Runs one request and gives the frame that answers it.
pub(super) async fn request(shared: Shared<'_>, frame: ClientFrame) -> ServerFrame {
    let req_id = frame.req_id().map(str::to_owned);
    let Shared { router, session, .. } = shared;
    let user = &session.user;
    let result: Result<ServerFrame, RouterError> = match frame {
        ClientFrame::History { req_id, channel, before, after, limit } => {
            let query = HistoryQuery { before, after, limit: limit.unwrap_or(DEFAULT_HISTORY_LIMIT) };
            history(shared, req_id, channel, query, limit == Some(0)).await
        }
        ClientFrame::CreateChannel { req_id, name, members, visibility, posting } => {
            let limit = router.limits().max_channel_members;
            if members.len() > limit as usize {
                Err(RouterError::TooManyMembers { channel: format!("g:{name}"), limit })
            } else {
                let settings = ChannelSettings {
                    visibility: visibility.unwrap_or_default(),
                    posting: posting.unwrap_or_default(),
                };
                joined(shared, req_id, router.create_channel_with(user, &name, &members, settings).await).await
            }
        }
        ClientFrame::Invite { req_id, channel, user: other } => {
            manage(shared, req_id, channel, ChannelAction::Invite { user: other }).await
        }
        ClientFrame::RemoveMember { req_id, channel, user: other } => {
            manage(shared, req_id, channel, ChannelAction::Remove { user: other }).await
        }
        ClientFrame::Ban { req_id, channel, user: other } => {
            manage(shared, req_id, channel, ChannelAction::Ban { user: other }).await
        }
        ClientFrame::Unban { req_id, channel, user: other } => {
            manage(shared, req_id, channel, ChannelAction::Unban { user: other }).await
        }
        ClientFrame::SetRole { req_id, channel, user: other, role } => {
            manage(shared, req_id, channel, ChannelAction::SetRole { user: other, role }).await
        }
        ClientFrame::UpdateChannel { req_id, channel, visibility, posting } => {
            manage(shared, req_id, channel, ChannelAction::Update { visibility, posting }).await
        }
        ClientFrame::Block { req_id, user: other, blocked } => {
            router.block(user, &other, blocked).await.map(|()| ServerFrame::BlockState { req_id, user: other, blocked })
        }
        ClientFrame::Join { req_id, channel } => joined(shared, req_id, router.join(user, &channel).await).await,
        ClientFrame::Leave { req_id, channel } => {
            router.leave(user, &channel).await.map(|channel| ServerFrame::Channel { req_id, channel })
        }
        ClientFrame::OpenDm { req_id, user: other } => joined(shared, req_id, router.open_dm(user, &other).await).await,
        ClientFrame::ListChannels { req_id } => {
            router.list_channels(user).await.map(|channels| ServerFrame::Channels { req_id, channels })
        }
        ClientFrame::SubscribePresence { req_id, users, watch } => {
            subscribe_presence(shared, req_id, users, watch).await
        }
        ClientFrame::SetPresence { req_id, status } => set_presence(shared, req_id, status).await,
        ClientFrame::ChannelPresence { req_id, channel } => channel_presence(shared, req_id, channel).await,
        ClientFrame::Read { req_id, channel, seq } => router
            .mark_read(user, &channel, seq)
            .await
            .map(|seq| ServerFrame::Read { req_id, channel, user: user.to_string(), seq }),
        ClientFrame::Send { .. } | ClientFrame::Ack { .. } | ClientFrame::Ping { .. } | ClientFrame::Sync { .. } => {
            Err(RouterError::InvalidArgument("handled by the connection loop".into()))
        }
    };
    result.unwrap_or_else(|error| {
        shared.metrics.error(error.code());
        router_error(req_id, error, None)
    })
}

/// A page of history: from this instance's feed cache when it holds it, else from the router.
async fn history(
    shared: Shared<'_>,
    req_id: Option<String>,
    channel: String,
    query: HistoryQuery,
    empty_limit: bool,
) -> Result<ServerFrame, RouterError> {
    if empty_limit {
        return Err(RouterError::InvalidArgument("limit must be 1-200".into()));
    }
    let page = match shared.hub.cached_page(shared.session.conn, &channel, &query) {
        Some(page) => page,
        None => shared.router.history(&shared.session.user, &channel, query).await?,
    };
    Ok(ServerFrame::History { req_id, channel, messages: page.messages, has_more: page.has_more })
}

/// An owner's or admin's action on a group channel; answered with the channel as the actor sees it.
async fn manage(
    shared: Shared<'_>,
    req_id: Option<String>,
    channel: String,
    action: ChannelAction,
) -> Result<ServerFrame, RouterError> {
    let channel = shared.router.manage_channel(&shared.session.user, &channel, action).await?;
    Ok(ServerFrame::Channel { req_id, channel })
}

/// The connection joined a channel (created, joined or a DM opened): its messages reach the connection from now.
async fn joined(
    shared: Shared<'_>,
    req_id: Option<String>,
    result: Result<parley_core::protocol::ChannelView, RouterError>,
) -> Result<ServerFrame, RouterError> {
    let channel = result?;
    shared.hub.add_channels(shared.session.conn, vec![channel.id.clone()]).await;
    Ok(ServerFrame::Channel { req_id, channel })
}

/// Starts or stops watching users' presence; when starting, answers with their presence now.
async fn subscribe_presence(
    shared: Shared<'_>,
    req_id: Option<String>,
    users: Vec<String>,
    watch: bool,
) -> Result<ServerFrame, RouterError> {
    let users: Vec<String> =
        users.into_iter().map(|user| UserId::new(user).map(String::from)).collect::<Result<_, _>>()?;
    let presence = shared.hub.presence().ok_or_else(presence_unavailable)?;
    shared
        .hub
        .watch(shared.session.conn, &users, watch, MAX_WATCHED)
        .await
        .map_err(|limit| RouterError::InvalidArgument(format!("a connection can watch at most {limit} users")))?;
    let users = if watch { presence.views(&users).await } else { Vec::new() };
    Ok(ServerFrame::PresenceState { req_id, users })
}

/// Sets the user online or away (offline follows from disconnecting).
async fn set_presence(shared: Shared<'_>, req_id: Option<String>, status: Status) -> Result<ServerFrame, RouterError> {
    let presence = shared.hub.presence().ok_or_else(presence_unavailable)?;
    if status == Status::Offline {
        return Err(RouterError::InvalidArgument("set online or away; offline follows from disconnecting".into()));
    }
    let view = presence.set_away(shared.session.user.as_str(), status == Status::Away).await;
    Ok(ServerFrame::PresenceState { req_id, users: vec![view] })
}

/// How many members of a channel are online, with each member's presence when the channel is small.
async fn channel_presence(
    shared: Shared<'_>,
    req_id: Option<String>,
    channel: String,
) -> Result<ServerFrame, RouterError> {
    let members = shared.router.members(&shared.session.user, &channel).await?;
    let presence = shared.hub.presence().ok_or_else(presence_unavailable)?;
    let online = presence.online_count(&members).await as u32;
    let count = members.len() as u32;
    let users = if count <= shared.hub.fanout_threshold() { Some(presence.views(&members).await) } else { None };
    Ok(ServerFrame::ChannelPresence { req_id, channel, members: count, online, users })
}
