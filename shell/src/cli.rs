//! What every program's `main` does the same way: logging to stderr (text or
//! JSON) and turning the result into an exit code.

use std::process::ExitCode;

/// The log format on stderr (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// The options every program has; `#[command(flatten)]` them into its CLI.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Log format on stderr.
    #[arg(long, env = "VPNNAT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Print the commented example configuration and exit.
    #[arg(long)]
    pub print_example_config: bool,
}

/// Installs the tracing subscriber: `RUST_LOG`, or `info` with boringtun
/// quieted (it logs an idle session's routine expiry at ERROR).
pub fn init_logging(format: LogFormat) {
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

/// The exit code of `program`'s run; an error is logged and printed on one line.
pub fn exit_code(program: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{program} failed");
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
