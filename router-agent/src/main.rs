//! `router-agent`: see ../README.md.

use clap::Parser;

/// vpnnat router-agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
