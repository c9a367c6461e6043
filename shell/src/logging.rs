//! Logging and the exit of a program: one setup for the gateway and the
//! router agent (the maintenance server logs requests its own way).

use std::process::ExitCode;

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Installs the global subscriber: `RUST_LOG` when set, else `info`.
///
/// boringtun logs a responder's routine session expiry at ERROR and its
/// timers at length; both are muted unless `RUST_LOG` asks for them.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,boringtun=warn,boringtun::noise::timers=off")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The process exit of `program` after `result`: an error is logged and
/// printed as one line (`program: cause: cause…`) on standard error.
pub fn exit(program: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{program} failed");
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
