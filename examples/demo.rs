//! The demo (`scripts/demo.sh`, the README's first command): builds the
//! namespace world, plays the whole mission with a short narrative per step,
//! prints the final table and cleans up. The scenario is the same code as the
//! end-to-end test (`vpnnat_test_support::mission`).
//!
//! Usage: demo [--keep] [--samples N] [--world PREFIX]
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use vpnnat_test_support::{mission, require};

fn usage() -> ! {
    eprintln!(
        "usage: demo [--keep] [--samples N] [--world PREFIX]\n\
         \n  --keep         leave the world running and print how to reach it\n  \
         --samples N    button-press → TCP samples in step 9 (default 20)\n  \
         --world P      namespace prefix (default vnd)"
    );
    std::process::exit(2)
}

fn main() {
    let mut opts = mission::Options {
        world: "vnd".to_owned(),
        keep: false,
        samples: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--keep" => opts.keep = true,
            "--samples" => {
                opts.samples = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage())
            }
            "--world" => opts.world = args.next().unwrap_or_else(|| usage()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    // The demo needs what the test needs; missing pieces are named, not skipped.
    if !require(mission::PREREQS) {
        std::process::exit(1);
    }
    let outcome = mission::run(opts);
    let (p50, p99) = mission::percentiles(&outcome.press_to_tcp);
    println!(
        "\nbutton → first TCP connection: p50 {} ms, p99 {} ms ({} samples)",
        p50.as_millis(),
        p99.as_millis(),
        outcome.press_to_tcp.len()
    );
    println!(
        "end → mapping, address and tunnel gone: {} ms; kill -9 of a gateway → its site reached again: {} ms (site 2)",
        outcome.end_to_gone.as_millis(),
        outcome.failover.as_millis()
    );
    for kind in [
        mission::Tunnel::Wireguard,
        mission::Tunnel::WireguardTls,
        mission::Tunnel::IpsecAgent,
        mission::Tunnel::IpsecRouter,
        mission::Tunnel::WireguardRouter,
    ] {
        let times: Vec<String> = outcome
            .failovers
            .iter()
            .filter(|f| f.tunnel == kind)
            .map(|f| format!("{} ms", f.reached.as_millis()))
            .collect();
        if !times.is_empty() {
            println!("  failover of {}: {}", kind.label(), times.join(", "));
        }
    }
    println!("demo: all {} sites reached", outcome.rows.len());
}
