//! Names of the WNS request and response headers. Header names are case-insensitive on the wire; these are the
//! lowercase forms `http` compares with.

#![allow(missing_docs)]

use http::HeaderName;

// Request headers.
pub const X_WNS_TYPE: HeaderName = HeaderName::from_static("x-wns-type");
pub const X_WNS_CACHE_POLICY: HeaderName = HeaderName::from_static("x-wns-cache-policy");
pub const X_WNS_TTL: HeaderName = HeaderName::from_static("x-wns-ttl");
pub const X_WNS_REQUEST_FOR_STATUS: HeaderName = HeaderName::from_static("x-wns-requestforstatus");
/// Correlation vector; sent with every request and echoed in answers.
pub const MS_CV: HeaderName = HeaderName::from_static("ms-cv");

// Response headers.
pub const X_WNS_STATUS: HeaderName = HeaderName::from_static("x-wns-status");
/// The older name of `X-WNS-Status`.
pub const X_WNS_NOTIFICATION_STATUS: HeaderName =
    HeaderName::from_static("x-wns-notificationstatus");
pub const X_WNS_MSG_ID: HeaderName = HeaderName::from_static("x-wns-msg-id");
pub const X_WNS_DEBUG_TRACE: HeaderName = HeaderName::from_static("x-wns-debug-trace");
pub const X_WNS_ERROR_DESCRIPTION: HeaderName = HeaderName::from_static("x-wns-error-description");
pub const X_WNS_DEVICE_CONNECTION_STATUS: HeaderName =
    HeaderName::from_static("x-wns-deviceconnectionstatus");
/// The older name of `Retry-After` on 406 answers.
pub const X_WNS_CONTINUE_AFTER: HeaderName = HeaderName::from_static("x-wns-continue-after");
