//! The control API, on the simulator's own port under `/_sim/`:
//!
//! | method and path | effect |
//! |---|---|
//! | `GET /_sim/stats` | counters as JSON ([`SimStats`](super::SimStats)) |
//! | `POST /_sim/reset` | counters start from zero (tokens, bindings and faults stay) |
//! | `PUT /_sim/channels` | bind a channel: `{"channel_uri", "behaviour", "app_sid"?}` |
//! | `DELETE /_sim/channels` | forget every binding |
//! | `GET /_sim/faults` | the faults in force ([`Faults`]) |
//! | `PUT /_sim/faults` | replace them (missing fields are off; outage windows count from this request) |
//!
//! Changes answer 204; bad input 400 with `{"error": "..."}`. Control
//! requests are not counted in the stats.

use super::behaviour::Behaviour;
use super::faults::Faults;
use super::service::{read_body, BodyRead, BodySource, Head, Reply};
use super::state::Shared;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// Largest control request body.
pub const MAX_CONTROL_BODY_BYTES: usize = 64 * 1024;

/// The body of `PUT /_sim/channels`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelBehaviour {
    /// The channel URI exactly as a device would report it,
    /// e.g. `https://db5.notify.windows.com/?token=AwYAAAD...`.
    pub channel_uri: String,
    /// How the channel answers valid pushes.
    pub behaviour: Behaviour,
    /// When set, a push with a token of another app gets 403.
    #[serde(default)]
    pub app_sid: Option<String>,
}

fn error(status: StatusCode, message: &str) -> Reply {
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    Reply::json(status, body)
}

fn done(r: Result<(), String>) -> Reply {
    match r {
        Ok(()) => Reply::empty(StatusCode::NO_CONTENT),
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

async fn json_body<T: serde::de::DeserializeOwned, B: BodySource>(
    body: &mut B,
) -> Option<Result<T, String>> {
    match read_body(body, MAX_CONTROL_BODY_BYTES).await {
        BodyRead::Aborted => None,
        BodyRead::TooLarge => Some(Err(format!(
            "body larger than {MAX_CONTROL_BODY_BYTES} bytes"
        ))),
        BodyRead::Done(b) => Some(serde_json::from_slice(&b).map_err(|e| e.to_string())),
    }
}

/// Answers a `/_sim/...` request; `None` when the peer went away.
pub(crate) async fn serve<B: BodySource>(
    shared: &Shared,
    head: &Head<'_>,
    body: &mut B,
) -> Option<Reply> {
    let m = head.method;
    let reply = match head.path {
        b"/_sim/stats" if m == Method::GET => Reply::json(
            StatusCode::OK,
            serde_json::to_vec(&shared.stats.snapshot()).unwrap_or_default(),
        ),
        b"/_sim/reset" if m == Method::POST => {
            shared.stats.reset();
            Reply::empty(StatusCode::NO_CONTENT)
        }
        b"/_sim/channels" if m == Method::PUT => done(
            json_body::<ChannelBehaviour, B>(body)
                .await?
                .and_then(|c| shared.set_behaviour(&c.channel_uri, c.behaviour, c.app_sid)),
        ),
        b"/_sim/channels" if m == Method::DELETE => {
            shared.clear_behaviours();
            Reply::empty(StatusCode::NO_CONTENT)
        }
        b"/_sim/faults" if m == Method::GET => Reply::json(
            StatusCode::OK,
            serde_json::to_vec(&shared.faults()).unwrap_or_default(),
        ),
        b"/_sim/faults" if m == Method::PUT => done(
            json_body::<Faults, B>(body)
                .await?
                .and_then(|f| shared.set_faults(f)),
        ),
        b"/_sim/stats" | b"/_sim/reset" | b"/_sim/channels" | b"/_sim/faults" => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "no such control endpoint"),
    };
    Some(reply)
}
