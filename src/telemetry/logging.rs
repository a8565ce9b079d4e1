//! Log set-up: human-readable text by default, JSON on request.
//!
//! Channel URIs are logged only through
//! [`crate::core::channel_uri::redact_uri`]; secrets are wrapped in
//! [`crate::config::Secret`], whose `Debug` prints `***`.

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// The embedded store library's own log lines (flushes, journal
/// rotations, with file paths) are for debugging it, not for operators:
/// they show at `debug`, whatever `log.level` says (`RUST_LOG` still
/// decides everything when set).
const QUIET_LIBRARIES: &str = "fjall=warn,lsm_tree=warn";

/// Installs the global tracing subscriber. `RUST_LOG` overrides `level`.
pub(crate) fn init(format: LogFormat, level: &str) {
    let quiet = if level.trim().eq_ignore_ascii_case("debug") || level.contains('=') {
        level.to_owned()
    } else {
        format!("{level},{QUIET_LIBRARIES}")
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&quiet))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: journald, files and log shippers get
    // plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
