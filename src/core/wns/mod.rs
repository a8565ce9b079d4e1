//! The WNS sender's protocol core: no I/O, no clock.
//!
//! Owns everything the sender must know about WNS (the wake-up request, the
//! answers to it, access tokens) as plain functions and state machines fed inputs and the current time:
//!
//! - [`classify`](mod@classify): a push response (status + headers) to an [`Outcome`],
//! - [`retry`]: what to do next with a push, and per-credential throttling
//!   and pacing,
//! - [`backoff`]: how long a retry waits, its level shared per WNS
//!   authority and credential,
//! - [`breaker`]: the circuit breaker of one WNS authority,
//! - [`token`]: access-token requests, responses and the per-credential
//!   token cache,
//! - [`request`]: the wake-up request's body and headers,
//! - [`result`]: how a wake ended, as one typed value.
//!
//! It must not touch sockets, timers, the system clock or randomness: the
//! sender passes in `now` and random numbers, and carries decisions out.

#![deny(missing_docs)]

pub mod backoff;
pub mod breaker;
pub mod classify;
pub mod headers;
pub mod request;
pub mod result;
pub mod retry;
pub mod token;

pub use backoff::RetryGate;
pub use breaker::{Admit, Breaker, BreakerPolicy, BreakerState, Transition};
pub use classify::{classify, Classified, DeviceConnection, Outcome, WnsMeta};
pub use request::{
    check_body, new_cv, new_cv_header, wake_headers, write_wake_headers, BodyError, MAX_BODY,
    WAKE_BODY,
};
pub use result::PushResult;
pub use retry::{
    CredentialSignal, CredentialThrottle, Decision, FinalFailure, NoAnswer, Pacer, PushAttempt,
    Resend, RetryContext, RetryPolicy, Verdict,
};
pub use token::{
    parse_token_response, token_request, AccessToken, RefreshTicket, TokenCache, TokenCacheConfig,
    TokenError, TokenFlow, TokenPoll, TokenRequest,
};
