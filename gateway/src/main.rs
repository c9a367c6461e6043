//! `gateway`: see ../README.md.

use clap::Parser;

/// vpnnat gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
