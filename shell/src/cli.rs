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

/// A program's `main` around its own work: logging, `--print-example-config`
/// (prints `example` and succeeds), and the exit code of `work`.
#[allow(clippy::print_stdout)]
pub fn run_program(
    program: &str,
    common: &CommonArgs,
    example: &str,
    work: impl FnOnce() -> anyhow::Result<ExitCode>,
) -> ExitCode {
    init_logging(common.log_format);
    if common.print_example_config {
        print!("{example}");
        return ExitCode::SUCCESS;
    }
    exit_code(program, work())
}

/// The runtime of a program's control plane (HTTP client and server,
/// netlink): two threads named `thread_name`; the data plane runs on its own
/// threads.
///
/// # Errors
/// When the runtime cannot be built.
pub fn control_runtime(thread_name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(thread_name)
        .build()
        .context("tokio runtime")
}

/// Prints a `status` report: the JSON document with `--json`, else its text
/// rendering.
///
/// # Errors
/// When the report cannot be serialised.
#[allow(clippy::print_stdout)]
pub fn print_status<T: serde::Serialize>(
    json: bool,
    report: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", text(report));
    }
    Ok(ExitCode::SUCCESS)
}

/// What the operating system asked a running program to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: clean up and exit.
    Stop,
    /// SIGHUP: read the file-based desired state again.
    Reload,
}

/// The signals a running program listens to (inside its runtime).
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers for SIGTERM, SIGINT and SIGHUP.
    ///
    /// # Errors
    /// When a handler cannot be installed.
    pub fn new() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }

    /// The next signal (cancel-safe: a `select!` arm).
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
