//! `POST /v1/devices:import`: NDJSON bulk registration.
//!
//! The body is streamed: lines are validated as they arrive, good ones are
//! handed to the store in chunks with a bounded number of chunks awaiting
//! their sync, bad ones are counted and the first of them reported by line
//! number. Memory stays bounded whatever the body size.
//!
//! In cluster mode, lines for devices of another node's partitions are
//! gathered per owner and sent to it as imports of their own (marked as
//! forwarded, [`FORWARD_LINES`] at a time); its report is merged into this
//! one, with its line numbers turned back into the caller's.

use super::body::{check_declared_length, next_chunk, require_content_type};
use super::devices::{validate_registration, ChannelBody};
use super::error::{json_error, ApiError};
use super::limits::{
    IMPORTS_RUNNING_MAX, IMPORT_CHUNKS_INFLIGHT_MAX, IMPORT_CHUNK_LINES,
    IMPORT_ERRORS_REPORTED_MAX, IMPORT_LINE_BYTES_MAX,
};
use super::response::{json_response, Resp};
use crate::gateway::Gateway;
use crate::registration::{Import, WriteError};
use crate::telemetry::metrics as m;
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Lines for another node sent to it in one forwarded import.
const FORWARD_LINES: usize = 4096;

/// Lines gathered for one other node: the body of its import, and the
/// caller's line number of each.
#[derive(Default)]
struct Remote {
    body: Vec<u8>,
    lines: Vec<u64>,
}

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

#[derive(Debug, Serialize, Deserialize)]
struct LineError {
    line: u64,
    code: std::borrow::Cow<'static, str>,
    message: String,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct ImportReport {
    accepted: u64,
    rejected: u64,
    errors: Vec<LineError>,
    errors_truncated: bool,
}

struct Importer {
    gw: Arc<Gateway>,
    report: ImportReport,
    registrations: Import,
    /// Durable registrations counted in the metrics so far.
    counted: u64,
    line_no: u64,
    /// The caller's headers (its token goes with forwarded lines); a call
    /// forwarded by another node is never forwarded again.
    headers: HeaderMap,
    /// Lines for other nodes, by their API address.
    remote: HashMap<String, Remote>,
    /// Registrations other nodes stored for this import.
    remote_accepted: u64,
}

impl Importer {
    fn reject(&mut self, err: ApiError) {
        self.report.rejected += 1;
        if self.report.errors.len() < IMPORT_ERRORS_REPORTED_MAX {
            self.report.errors.push(LineError {
                line: self.line_no,
                code: err.code.into(),
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
        match super::forward::owner_of(&self.gw, &parsed.device_id, &self.headers) {
            Ok(None) => {}
            Ok(Some(owner)) => {
                let r = self.remote.entry(owner.clone()).or_default();
                r.body.extend_from_slice(raw);
                r.body.push(b'\n');
                r.lines.push(self.line_no);
                if r.lines.len() >= FORWARD_LINES {
                    self.flush_remote(&owner).await?;
                }
                return Ok(());
            }
            Err(mut e) => {
                e.message = format!(
                    "{}; {} registrations before line {} were stored",
                    e.message,
                    self.registrations.accepted() + self.remote_accepted,
                    self.line_no
                );
                return Err(e);
            }
        }
        match validate_registration(&self.gw, &parsed.device_id, body, now) {
            Ok(reg) => {
                let added = self.registrations.add(reg, now).await;
                self.count_accepted();
                added.map_err(|e| self.stored_before(e))?;
            }
            Err(e) => self.reject(e),
        }
        Ok(())
    }

    /// Counts the registrations made durable since the last call.
    fn count_accepted(&mut self) {
        let accepted = self.registrations.accepted();
        metrics::counter!(m::IMPORT_LINES, "result" => "accepted")
            .increment(accepted - self.counted);
        self.counted = accepted;
        self.report.accepted = accepted + self.remote_accepted;
    }

    /// A write error, with how far the import got.
    fn stored_before(&self, e: WriteError) -> ApiError {
        let mut err = ApiError::from(e);
        err.message = format!(
            "{}; {} registrations before line {} were stored",
            err.message,
            self.registrations.accepted() + self.remote_accepted,
            self.line_no
        );
        err
    }

    /// Sends the lines gathered for the node at `owner` to it as an import
    /// of their own and merges its report.
    async fn flush_remote(&mut self, owner: &str) -> Result<(), ApiError> {
        let Some(r) = self.remote.remove(owner) else {
            return Ok(());
        };
        if r.lines.is_empty() {
            return Ok(());
        }
        let answer = super::forward::post_to(
            owner,
            "/v1/devices:import",
            "application/x-ndjson",
            bytes::Bytes::from(r.body),
            &self.headers,
        )
        .await;
        let report: ImportReport = match answer {
            Ok((StatusCode::OK, body)) => serde_json::from_slice(&body).map_err(|e| {
                ApiError::unavailable(
                    "owner_unreachable",
                    format!("node {owner} answered an import with {e}"),
                )
            })?,
            Ok((status, body)) => {
                let why = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| status.to_string());
                let mut err = ApiError::unavailable(
                    "store_unavailable",
                    format!(
                        "node {owner}, which serves some of these devices, refused them: {why}"
                    ),
                );
                err.message = format!(
                    "{}; {} registrations before line {} were stored",
                    err.message,
                    self.registrations.accepted() + self.remote_accepted,
                    r.lines.first().copied().unwrap_or(self.line_no)
                );
                return Err(err);
            }
            Err(e) => return Err(e),
        };
        self.remote_accepted += report.accepted;
        self.report.accepted = self.registrations.accepted() + self.remote_accepted;
        self.report.rejected += report.rejected;
        for mut e in report.errors {
            let at = usize::try_from(e.line).unwrap_or(0);
            e.line = at
                .checked_sub(1)
                .and_then(|i| r.lines.get(i))
                .copied()
                .unwrap_or(0);
            if self.report.errors.len() < IMPORT_ERRORS_REPORTED_MAX {
                self.report.errors.push(e);
            } else {
                self.report.errors_truncated = true;
            }
        }
        self.report.errors_truncated |= report.errors_truncated;
        self.report.errors.sort_by_key(|e| e.line);
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

    /// Makes everything added durable and closes the refresh jobs the new
    /// channels end.
    async fn finish(mut self) -> Result<ImportReport, ApiError> {
        let owners: Vec<String> = self.remote.keys().cloned().collect();
        for owner in owners {
            self.flush_remote(&owner).await?;
        }
        let finished = self.registrations.finish(self.gw.now()).await;
        self.count_accepted();
        finished.map_err(|e| self.stored_before(e))?;
        Ok(self.report)
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
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let mut imp = Importer {
        registrations: gw
            .registrar
            .import(IMPORT_CHUNK_LINES, IMPORT_CHUNKS_INFLIGHT_MAX),
        gw,
        report: ImportReport::default(),
        counted: 0,
        line_no: 0,
        headers: headers.clone(),
        remote: HashMap::new(),
        remote_accepted: 0,
    };
    let mut carry: Vec<u8> = Vec::new();
    let mut skipping_long_line = false;
    let mut received: u64 = 0;
    while let Some(data) = next_chunk(&mut body, idle).await? {
        received += data.len() as u64;
        if received > limit {
            let stored = imp.finish().await?.accepted;
            let mut err = ApiError::body_too_large(limit);
            err.message = format!(
                "{}; {} registrations before it were stored",
                err.message, stored
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
    let report = imp.finish().await?;
    if report.rejected > 0 {
        metrics::counter!(m::IMPORT_LINES, "result" => "rejected").increment(report.rejected);
    }
    Ok(json_response(StatusCode::OK, &report))
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
