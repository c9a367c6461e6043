//! `maintenance-server`: see ../README.md.

use clap::Parser;

/// vpnnat maintenance-server.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
