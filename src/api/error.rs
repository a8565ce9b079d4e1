//! API errors: always `{"error": {"code": "snake_case_code", "message": "..."}}`
//! with the status that says what went wrong.

use super::response::{json_response, Resp};
use crate::store::committer::SubmitError;
use crate::store::StoreError;
use http::{HeaderValue, StatusCode};
use serde::Serialize;

/// An error answered to an API caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds to put in `Retry-After`.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub(crate) fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    pub(crate) fn body_too_large(limit: u64) -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// The JSON error response.
    pub(crate) fn into_response(self) -> Resp {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        let mut resp = json_response(
            self.status,
            &Body {
                error: Inner {
                    code: self.code,
                    message: &self.message,
                },
            },
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded => ApiError::unavailable(
                "store_overloaded",
                "the store is not keeping up with writes; retry shortly",
            ),
            SubmitError::Closed => {
                ApiError::unavailable("shutting_down", "the gateway is shutting down")
            }
        }
    }
}

impl From<crate::registration::WriteError> for ApiError {
    fn from(e: crate::registration::WriteError) -> Self {
        match e {
            crate::registration::WriteError::Submit(e) => e.into(),
            crate::registration::WriteError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store operation failed");
        if let StoreError::NotOwner(why) = &e {
            return ApiError::unavailable(
                "store_unavailable",
                format!("{why}; nothing was changed"),
            );
        }
        ApiError::unavailable(
            "store_unavailable",
            "the store could not complete the operation; nothing was changed",
        )
    }
}

/// Maps a JSON decoding error: malformed JSON is 400, well-formed JSON of
/// the wrong shape (missing or unknown fields, wrong types) is 422.
pub(crate) fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        ),
        Category::Data => ApiError::unprocessable("invalid_request", e.to_string()),
    }
}
