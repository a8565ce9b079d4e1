//! `POST /v1/devices:import`: NDJSON bulk registration.
//!
//! The body is streamed: lines are validated as they arrive, good ones are
//! handed to the store in chunks with a bounded number of chunks awaiting
//! their sync, bad ones are counted and the first of them reported by line
//! number. Memory stays bounded whatever the body size.

use super::body::{check_declared_length, next_chunk, require_content_type};
use super::devices::{validate_registration, ChannelBody};
use super::error::{json_error, ApiError};
use super::limits::{
    IMPORTS_RUNNING_MAX, IMPORT_CHUNKS_INFLIGHT_MAX, IMPORT_CHUNK_LINES,
    IMPORT_ERRORS_REPORTED_MAX, IMPORT_LINE_BYTES_MAX,
};
use super::response::{json_response, Resp};
use crate::core::{merge_registration, DeviceId};
use crate::gateway::Gateway;
use crate::store::committer::{SubmitError, Ticket};
use crate::store::Mutation;
use crate::telemetry::metrics as m;
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    device_id: String,
    pfn: String,
    channel_uri: String,
    #[serde(default)]
    issued_at: Option<String>,
    #[serde(default)]
    provider_id: Option<String>,
}

#[derive(Debug, Serialize)]
struct LineError {
    line: u64,
    code: &'static str,
    message: String,
}

#[derive(Debug, Serialize, Default)]
struct ImportReport {
    accepted: u64,
    rejected: u64,
    errors: Vec<LineError>,
    errors_truncated: bool,
}

struct Importer {
    gw: Arc<Gateway>,
    report: ImportReport,
    chunk: Vec<Mutation>,
    inflight: VecDeque<(Ticket, u64)>,
    /// Devices whose new channel URI closes an open refresh job.
    closes: Vec<DeviceId>,
    line_no: u64,
}

impl Importer {
    fn reject(&mut self, err: ApiError) {
        self.report.rejected += 1;
        if self.report.errors.len() < IMPORT_ERRORS_REPORTED_MAX {
            self.report.errors.push(LineError {
                line: self.line_no,
                code: err.code,
                message: err.message,
            });
        } else {
            self.report.errors_truncated = true;
        }
    }

    async fn line(&mut self, raw: &[u8]) -> Result<(), ApiError> {
        self.line_no += 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let parsed: ImportLine = match serde_json::from_slice(raw) {
            Ok(p) => p,
            Err(e) => {
                self.reject(json_error(&e));
                return Ok(());
            }
        };
        let now = self.gw.now();
        let body = ChannelBody {
            pfn: parsed.pfn,
            channel_uri: parsed.channel_uri,
            issued_at: parsed.issued_at,
            provider_id: parsed.provider_id,
        };
        match validate_registration(&self.gw, &parsed.device_id, body, now) {
            Ok(reg) => {
                let existing = self.gw.registry.get(reg.device_id.as_str());
                let rec = merge_registration(existing.as_ref(), reg, now);
                if existing.is_some_and(|e| e.refresh.is_some() && rec.refresh.is_none()) {
                    self.closes.push(rec.device_id.clone());
                }
                self.gw.lifecycle.registered_aged(&rec, now);
                self.chunk.push(Mutation::Put(rec));
                if self.chunk.len() >= IMPORT_CHUNK_LINES {
                    self.flush().await?;
                }
            }
            Err(e) => self.reject(e),
        }
        Ok(())
    }

    /// A complete line, refused when over [`IMPORT_LINE_BYTES_MAX`].
    async fn bounded_line(&mut self, raw: &[u8]) -> Result<(), ApiError> {
        if raw.len() > IMPORT_LINE_BYTES_MAX {
            self.line_no += 1;
            self.reject(line_too_long());
            return Ok(());
        }
        self.line(raw).await
    }

    /// Hands the current chunk to the store, waiting for room when the
    /// store's queue is full (an import slows down rather than failing).
    async fn flush(&mut self) -> Result<(), ApiError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.chunk);
        let n = chunk.len() as u64;
        let mut pending = Some(chunk);
        while let Some(chunk) = pending.take() {
            match self.gw.commits.try_submit(chunk) {
                Ok(ticket) => self.inflight.push_back((ticket, n)),
                Err((SubmitError::Overloaded, chunk)) => {
                    pending = Some(chunk);
                    if !self.settle_oldest().await? {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        while self.inflight.len() > IMPORT_CHUNKS_INFLIGHT_MAX {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Waits for the oldest submission. False when none was in flight.
    async fn settle_oldest(&mut self) -> Result<bool, ApiError> {
        let Some((ticket, n)) = self.inflight.pop_front() else {
            return Ok(false);
        };
        ticket.await.map_err(|e| {
            let mut err = ApiError::from(e);
            err.message = format!(
                "{}; {} registrations before line {} were stored",
                err.message, self.report.accepted, self.line_no
            );
            err
        })?;
        self.report.accepted += n;
        metrics::counter!(m::IMPORT_LINES, "result" => "accepted").increment(n);
        Ok(true)
    }
}

/// `POST /v1/devices:import`.
pub(crate) async fn import(
    gw: Arc<Gateway>,
    headers: HeaderMap,
    mut body: Incoming,
) -> Result<Resp, ApiError> {
    require_content_type(
        &headers,
        &[
            "application/x-ndjson",
            "application/jsonl",
            "application/json",
            "text/plain",
        ],
    )?;
    let limit = gw.settings.max_import_bytes;
    check_declared_length(&headers, limit)?;
    let _slot = ImportSlot::acquire(&gw)?;
    let gw_for_closes = gw.clone();
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let mut imp = Importer {
        gw,
        report: ImportReport::default(),
        chunk: Vec::with_capacity(IMPORT_CHUNK_LINES),
        inflight: VecDeque::new(),
        closes: Vec::new(),
        line_no: 0,
    };
    let mut carry: Vec<u8> = Vec::new();
    let mut skipping_long_line = false;
    let mut received: u64 = 0;
    while let Some(data) = next_chunk(&mut body, idle).await? {
        received += data.len() as u64;
        if received > limit {
            imp.flush().await?;
            while imp.settle_oldest().await? {}
            let mut err = ApiError::body_too_large(limit);
            err.message = format!(
                "{}; {} registrations before it were stored",
                err.message, imp.report.accepted
            );
            return Err(err);
        }
        let mut rest: &[u8] = &data;
        while let Some(pos) = memchr(b'\n', rest) {
            let (line, tail) = (&rest[..pos], &rest[pos + 1..]);
            rest = tail;
            if skipping_long_line {
                skipping_long_line = false;
                carry.clear();
                continue;
            }
            if carry.is_empty() {
                imp.bounded_line(line).await?;
            } else {
                carry.extend_from_slice(line);
                let whole = std::mem::take(&mut carry);
                imp.bounded_line(&whole).await?;
            }
        }
        if !skipping_long_line {
            carry.extend_from_slice(rest);
            if carry.len() > IMPORT_LINE_BYTES_MAX {
                imp.line_no += 1;
                imp.reject(line_too_long());
                carry.clear();
                skipping_long_line = true;
            }
        }
    }
    if !carry.is_empty() && !skipping_long_line {
        let last = std::mem::take(&mut carry);
        imp.bounded_line(&last).await?;
    }
    imp.flush().await?;
    while imp.settle_oldest().await? {}
    for id in std::mem::take(&mut imp.closes) {
        gw_for_closes
            .lifecycle
            .registered(id.as_str(), gw_for_closes.now())
            .await;
    }
    if imp.report.rejected > 0 {
        metrics::counter!(m::IMPORT_LINES, "result" => "rejected").increment(imp.report.rejected);
    }
    Ok(json_response(StatusCode::OK, &imp.report))
}

/// One of the [`IMPORTS_RUNNING_MAX`] import slots, released on drop.
struct ImportSlot(Arc<Gateway>);

impl ImportSlot {
    fn acquire(gw: &Arc<Gateway>) -> Result<ImportSlot, ApiError> {
        let running = gw.imports_running.fetch_add(1, Ordering::AcqRel);
        let slot = ImportSlot(gw.clone());
        if running >= IMPORTS_RUNNING_MAX {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_imports",
                format!(
                    "{IMPORTS_RUNNING_MAX} imports are already running; retry when one finishes"
                ),
            ));
        }
        Ok(slot)
    }
}

impl Drop for ImportSlot {
    fn drop(&mut self) {
        self.0.imports_running.fetch_sub(1, Ordering::AcqRel);
    }
}

fn line_too_long() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "line_too_long",
        format!("line is longer than {IMPORT_LINE_BYTES_MAX} bytes"),
    )
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}
