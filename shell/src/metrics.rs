//! Prometheus text exposition (format 0.0.4): a small writer that puts each
//! family's `# HELP` and `# TYPE` once before its samples and escapes what
//! the format says must be escaped.
//!
//! ```
//! use vpnnat_shell::metrics::{Exposition, Kind};
//! let mut m = Exposition::new("vpnnat_gateway_");
//! m.family("peers", Kind::Gauge, "Peers configured.");
//! m.sample("peers", &[], 3);
//! m.family("drops_total", Kind::Counter, "Packets dropped, by reason.");
//! m.sample("drops_total", &[("reason", "no_route")], 5);
//! assert!(m.finish().ends_with("vpnnat_gateway_drops_total{reason=\"no_route\"} 5\n"));
//! ```

use std::collections::BTreeSet;
use std::fmt::{Display, Write as _};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets at restart); names end in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
        }
    }
}

/// The exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    prefix: String,
    text: String,
    declared: BTreeSet<String>,
}

impl Exposition {
    /// An empty exposition whose metric names all start with `prefix`
    /// (e.g. `vpnnat_gateway_`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            text: String::with_capacity(4096),
            declared: BTreeSet::new(),
        }
    }

    /// Declares a family: its `# HELP` and `# TYPE` lines, written once
    /// however often it is declared.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        if !self.declared.insert(name.to_owned()) {
            return;
        }
        let prefix = &self.prefix;
        let help = escape(help, false);
        let _ = writeln!(self.text, "# HELP {prefix}{name} {help}");
        let _ = writeln!(self.text, "# TYPE {prefix}{name} {}", kind.as_str());
    }

    /// One sample of a family, with its labels.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        let _ = write!(self.text, "{}{name}", self.prefix);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v, true));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A family with one sample per value of one label, e.g. packets by
    /// `direction`.
    pub fn labelled<'v, V: Display>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'v str, V)>,
    ) {
        self.family(name, kind, help);
        for (value, n) in samples {
            self.sample(name, &[(label, value)], n);
        }
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

/// Backslash and newline are escaped in help text; label values also escape
/// the double quote.
fn escape(s: &str, quote: bool) -> std::borrow::Cow<'_, str> {
    let special = |c: char| c == '\\' || c == '\n' || (quote && c == '"');
    if !s.contains(special) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_and_type_come_once_per_family_before_its_samples() {
        let mut m = Exposition::new("x_");
        m.family("up", Kind::Gauge, "Whether it is up.");
        m.sample("up", &[], 1);
        m.family("up", Kind::Gauge, "Whether it is up.");
        m.single("bytes_total", Kind::Counter, "Bytes.", 10);
        assert_eq!(
            m.finish(),
            "# HELP x_up Whether it is up.\n# TYPE x_up gauge\nx_up 1\n\
             # HELP x_bytes_total Bytes.\n# TYPE x_bytes_total counter\nx_bytes_total 10\n"
        );
    }

    #[test]
    fn a_labelled_family_has_one_sample_per_value() {
        let mut m = Exposition::new("a_");
        m.labelled(
            "io_total",
            Kind::Counter,
            "IO.",
            "kind",
            [("reads", 1), ("writes", 2)],
        );
        assert_eq!(
            m.finish(),
            "# HELP a_io_total IO.\n# TYPE a_io_total counter\n\
             a_io_total{kind=\"reads\"} 1\na_io_total{kind=\"writes\"} 2\n"
        );
    }

    #[test]
    fn labels_are_escaped_and_joined() {
        let mut m = Exposition::new("");
        m.sample(
            "names",
            &[("a", "pc \"1\""), ("b", "back\\slash\nnewline")],
            format_args!("{}.{:03}", 2, 5),
        );
        assert_eq!(
            m.finish(),
            "names{a=\"pc \\\"1\\\"\",b=\"back\\\\slash\\nnewline\"} 2.005\n"
        );
    }

    #[test]
    fn help_text_escapes_backslash_and_newline_but_not_quotes() {
        let mut m = Exposition::new("");
        m.family("h", Kind::Gauge, "say \"hi\"\\\nbye");
        assert!(m.finish().starts_with("# HELP h say \"hi\"\\\\\\nbye\n"));
    }
}
