//! When the agent carries its tunnel over TLS instead of UDP: the decision,
//! without IO (docs/DESIGN.md, "Tunnels", TLS fallback).
//!
//! UDP first. When no authenticated datagram arrives over UDP within
//! `udp_timeout` of dialling (no handshake completes), or a UDP path that
//! worked goes silent (data unanswered for the data plane's silence limit),
//! the agent moves to TLS. While on TLS it probes UDP every
//! `probe_interval` (a handshake initiation leaves over UDP instead of the
//! stream); the gateway answers the way the probe came, so an authenticated
//! datagram arriving over UDP means UDP works both ways again, and the agent
//! moves back. A lost probe costs only a handshake retry over the stream. The
//! tunnel session is the same on both carriers: only the endpoint the
//! gateway sees changes (WireGuard roaming), so open connections survive.

use std::time::{Duration, Instant};

use serde::Deserialize;

/// `[tunnel] transport`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    /// UDP, TLS when UDP does not work.
    #[default]
    Auto,
    /// UDP only.
    Udp,
    /// TLS only (when the gateway offers it).
    Tls,
}

/// What the data plane shows the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// A tunnel is dialled and its gateway offers TLS.
    pub tls_offered: bool,
    /// A tunnel is dialled.
    pub tunnel: bool,
    /// When an authenticated datagram last arrived over UDP.
    pub udp_heard: Option<Instant>,
    /// Data sent into the tunnel has gone unanswered too long.
    pub silent: bool,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing changes.
    Stay,
    /// Open the TLS stream (and keep it, redialling).
    UseTls,
    /// Close the TLS stream; datagrams go over UDP.
    UseUdp,
    /// On TLS: send the next datagram over UDP too.
    ProbeUdp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// No tunnel (or none to decide about).
    Idle,
    /// On UDP since `since`; `verified` once a datagram came back over it.
    Udp { since: Instant, verified: bool },
    /// On TLS since `since`; the next UDP probe is due at `probe`.
    Tls { since: Instant, probe: Instant },
}

/// The decision's state.
#[derive(Debug, Clone)]
pub struct Fallback {
    setting: Setting,
    udp_timeout: Duration,
    probe_interval: Duration,
    carrier: Carrier,
}

impl Fallback {
    /// A decision with these settings, idle.
    pub fn new(setting: Setting, udp_timeout: Duration, probe_interval: Duration) -> Self {
        Self {
            setting,
            udp_timeout,
            probe_interval,
            carrier: Carrier::Idle,
        }
    }

    /// Whether the tunnel is on TLS now.
    pub fn on_tls(&self) -> bool {
        matches!(self.carrier, Carrier::Tls { .. })
    }

    /// Starts over (a new gateway or endpoint): UDP first again.
    pub fn reset(&mut self) -> Action {
        let was_tls = self.on_tls();
        self.carrier = Carrier::Idle;
        if was_tls {
            Action::UseUdp
        } else {
            Action::Stay
        }
    }

    fn switch_to_tls(&mut self, now: Instant) -> Action {
        self.carrier = Carrier::Tls {
            since: now,
            probe: now + self.probe_interval,
        };
        Action::UseTls
    }

    /// Decides at `now` from what the data plane shows.
    pub fn tick(&mut self, now: Instant, seen: Observed) -> Action {
        let tls_ok = seen.tunnel && seen.tls_offered && self.setting != Setting::Udp;
        if !seen.tunnel || !tls_ok {
            let action = if self.on_tls() {
                Action::UseUdp
            } else {
                Action::Stay
            };
            self.carrier = if seen.tunnel {
                match self.carrier {
                    Carrier::Tls { .. } | Carrier::Idle => Carrier::Udp {
                        since: now,
                        verified: false,
                    },
                    udp => udp,
                }
            } else {
                Carrier::Idle
            };
            return action;
        }
        if self.setting == Setting::Tls {
            return match self.carrier {
                Carrier::Tls { .. } => Action::Stay,
                _ => self.switch_to_tls(now),
            };
        }
        match self.carrier {
            Carrier::Idle => {
                self.carrier = Carrier::Udp {
                    since: now,
                    verified: false,
                };
                Action::Stay
            }
            Carrier::Udp { since, verified } => {
                let heard = seen.udp_heard.is_some_and(|t| t >= since);
                if verified || heard {
                    self.carrier = Carrier::Udp {
                        since,
                        verified: true,
                    };
                    if seen.silent {
                        return self.switch_to_tls(now);
                    }
                    Action::Stay
                } else if now.saturating_duration_since(since) >= self.udp_timeout {
                    self.switch_to_tls(now)
                } else {
                    Action::Stay
                }
            }
            Carrier::Tls { since, probe } => {
                if seen.udp_heard.is_some_and(|t| t > since) {
                    self.carrier = Carrier::Udp {
                        since: now,
                        verified: true,
                    };
                    Action::UseUdp
                } else if now >= probe {
                    self.carrier = Carrier::Tls {
                        since,
                        probe: now + self.probe_interval,
                    };
                    Action::ProbeUdp
                } else {
                    Action::Stay
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);
    const PROBE: Duration = Duration::from_secs(30);

    fn seen(udp_heard: Option<Instant>, silent: bool) -> Observed {
        Observed {
            tls_offered: true,
            tunnel: true,
            udp_heard,
            silent,
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn udp_that_never_answers_falls_back_after_the_timeout() {
        let t0 = Instant::now();
        let mut f = Fallback::new(Setting::Auto, TIMEOUT, PROBE);
        assert_eq!(f.tick(t0, seen(None, false)), Action::Stay);
        assert_eq!(f.tick(secs(t0, 4), seen(None, false)), Action::Stay);
        assert_eq!(f.tick(secs(t0, 5), seen(None, false)), Action::UseTls);
        assert!(f.on_tls());
        assert_eq!(f.tick(secs(t0, 6), seen(None, false)), Action::Stay);
    }

    #[test]
    fn udp_that_answers_stays_even_when_idle_until_it_goes_silent() {
        let t0 = Instant::now();
        let mut f = Fallback::new(Setting::Auto, TIMEOUT, PROBE);
        f.tick(t0, seen(None, false));
        let heard = Some(secs(t0, 1));
        assert_eq!(f.tick(secs(t0, 2), seen(heard, false)), Action::Stay);
        // Idle for long: nothing arrives, nothing is unanswered.
        assert_eq!(f.tick(secs(t0, 300), seen(heard, false)), Action::Stay);
        assert_eq!(f.tick(secs(t0, 301), seen(heard, true)), Action::UseTls);
    }

    #[test]
    fn on_tls_udp_is_probed_and_an_answer_over_udp_moves_back() {
        let t0 = Instant::now();
        let mut f = Fallback::new(Setting::Auto, TIMEOUT, PROBE);
        f.tick(t0, seen(None, false));
        assert_eq!(f.tick(secs(t0, 5), seen(None, false)), Action::UseTls);
        assert_eq!(f.tick(secs(t0, 34), seen(None, false)), Action::Stay);
        assert_eq!(f.tick(secs(t0, 35), seen(None, false)), Action::ProbeUdp);
        assert_eq!(f.tick(secs(t0, 36), seen(None, false)), Action::Stay);
        assert_eq!(f.tick(secs(t0, 65), seen(None, false)), Action::ProbeUdp);
        let answered = Some(secs(t0, 66));
        assert_eq!(f.tick(secs(t0, 67), seen(answered, false)), Action::UseUdp);
        assert!(!f.on_tls());
        // Back on UDP it counts as verified: an idle tunnel stays.
        assert_eq!(f.tick(secs(t0, 200), seen(answered, false)), Action::Stay);
    }

    #[test]
    fn the_setting_and_the_offer_decide_first() {
        let t0 = Instant::now();
        let mut udp_only = Fallback::new(Setting::Udp, TIMEOUT, PROBE);
        udp_only.tick(t0, seen(None, false));
        assert_eq!(udp_only.tick(secs(t0, 60), seen(None, true)), Action::Stay);

        let mut tls_only = Fallback::new(Setting::Tls, TIMEOUT, PROBE);
        assert_eq!(tls_only.tick(t0, seen(None, false)), Action::UseTls);
        assert_eq!(
            tls_only.tick(secs(t0, 60), seen(Some(secs(t0, 59)), false)),
            Action::Stay,
            "no probing back to UDP"
        );
        // The gateway stops offering TLS: back to UDP.
        let no_offer = Observed {
            tls_offered: false,
            ..seen(None, false)
        };
        assert_eq!(tls_only.tick(secs(t0, 61), no_offer), Action::UseUdp);
        // The tunnel goes away, and the decision starts over.
        let mut f = Fallback::new(Setting::Auto, TIMEOUT, PROBE);
        f.tick(t0, seen(None, false));
        f.tick(secs(t0, 5), seen(None, false));
        let none = Observed {
            tunnel: false,
            ..seen(None, false)
        };
        assert_eq!(f.tick(secs(t0, 6), none), Action::UseUdp);
        assert_eq!(f.tick(secs(t0, 7), seen(None, false)), Action::Stay);
        assert_eq!(f.tick(secs(t0, 12), seen(None, false)), Action::UseTls);
        assert_eq!(f.reset(), Action::UseUdp);
    }
}
