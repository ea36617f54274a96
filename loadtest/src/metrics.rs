//! The server's own counters, read from outside: `pairs --metrics-url`
//! scrapes each node's Prometheus text (`GET /metrics`) before and after the
//! measured phase, and reports what the ack window did in between: copies
//! acked before they were written (`sealpost_copies_elided_total`) against
//! copies written (`sealpost_copies_written_total`).
//!
//! Only the few lines of the text format needed here are parsed: `name
//! value` and `name{labels} value` (a timestamp after the value is
//! ignored), labelled series of one name summed. Comments and other names
//! are skipped.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

pub const ELIDED: &str = "sealpost_copies_elided_total";
pub const WRITTEN: &str = "sealpost_copies_written_total";

/// One scrape: a request to a local server answers in milliseconds, so a
/// slow one is a stuck server, and the run goes on without its figures.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sum of every series named `name` in Prometheus text, or `None` when
/// there is none.
pub fn sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `x_total` is not `x_total_created`.
        let rest = if let Some(labelled) = rest.strip_prefix('{') {
            // Label values are quoted and may hold spaces or braces; the
            // set ends at the last `}`.
            match labelled.rfind('}') {
                Some(end) => &labelled[end + 1..],
                None => continue,
            }
        } else if rest.starts_with(char::is_whitespace) {
            rest
        } else {
            continue;
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        if let Ok(value) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// The elision counters of every node, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub elided: f64,
    pub written: f64,
}

impl Counts {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        match (sum(text, ELIDED), sum(text, WRITTEN)) {
            (Some(elided), Some(written)) => Ok(Self { elided, written }),
            _ => bail!("no {ELIDED} or {WRITTEN} in the metrics (a server before the ack window?)"),
        }
    }

    /// Scrapes every URL and adds their counts up.
    pub async fn scrape(urls: &[String]) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(SCRAPE_TIMEOUT)
            .build()
            .context("HTTP client")?;
        let mut total = Self::default();
        for url in urls {
            let response = http
                .get(url)
                .send()
                .await
                .with_context(|| format!("scraping {url}"))?;
            if !response.status().is_success() {
                bail!("scraping {url}: {}", response.status());
            }
            let text = response
                .text()
                .await
                .with_context(|| format!("reading {url}"))?;
            let counts = Self::parse(&text).with_context(|| url.clone())?;
            total.elided += counts.elided;
            total.written += counts.written;
        }
        Ok(total)
    }

    /// What was counted between `self` and a later `after`; a counter that
    /// went down was reset (its server restarted), and counts from zero.
    fn until(&self, after: &Counts) -> Counts {
        let delta = |before: f64, after: f64| {
            if after >= before {
                after - before
            } else {
                after
            }
        };
        Counts {
            elided: delta(self.elided, after.elided),
            written: delta(self.written, after.written),
        }
    }
}

/// What the ack window did during a measured phase, for `results.elision`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Elision {
    /// Copies acked by their device before they were written.
    pub elided: u64,
    /// Copies written to a queue (and deleted again on their ack).
    pub written: u64,
    /// elided / (elided + written); `None` when there was neither.
    pub elided_fraction: Option<f64>,
    /// True when the servers restarted during the phase (`--restart-cmd`):
    /// the figures are then the counts up to the last scrape before the
    /// restart plus those after it, and miss what the killed server
    /// counted in between.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub restarted: bool,
}

impl Elision {
    /// From the scrape at the start, the one just before a restart (if
    /// any), and the one at the end.
    pub fn between(before: &Counts, before_restart: Option<&Counts>, after: &Counts) -> Self {
        let counts = match before_restart {
            Some(at_kill) => {
                let first = before.until(at_kill);
                // The restarted server counts from zero.
                let second = Counts::default().until(after);
                Counts {
                    elided: first.elided + second.elided,
                    written: first.written + second.written,
                }
            }
            None => before.until(after),
        };
        let (elided, written) = (counts.elided.round() as u64, counts.written.round() as u64);
        Self {
            elided,
            written,
            elided_fraction: (elided + written > 0)
                .then(|| elided as f64 / (elided + written) as f64),
            restarted: before_restart.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP sealpost_copies_elided_total Message copies acked by their device before they were written.
# TYPE sealpost_copies_elided_total counter
sealpost_copies_elided_total 750
sealpost_copies_elided_total_created 1700000000
sealpost_copies_written_total{node=\"a b}\"} 200 1700000000000
sealpost_copies_written_total{node=\"c\"} 50
sealpost_copies_writtenx 9
";

    #[test]
    fn sums_labelled_series_and_skips_lookalikes() {
        assert_eq!(sum(TEXT, ELIDED), Some(750.0));
        assert_eq!(sum(TEXT, WRITTEN), Some(250.0));
        assert_eq!(sum(TEXT, "sealpost_nothing"), None);
        let counts = Counts::parse(TEXT).unwrap();
        assert_eq!((counts.elided, counts.written), (750.0, 250.0));
        assert!(Counts::parse("# nothing\n").is_err());
    }

    #[test]
    fn elision_is_a_delta_and_survives_a_restart() {
        let at = |elided, written| Counts { elided, written };
        let plain = Elision::between(&at(100.0, 10.0), None, &at(850.0, 260.0));
        assert_eq!((plain.elided, plain.written), (750, 250));
        assert_eq!(plain.elided_fraction, Some(0.75));
        assert!(!plain.restarted);

        // Restarted: up to the kill, then everything the new server counted.
        let restarted = Elision::between(&at(100.0, 10.0), Some(&at(400.0, 60.0)), &at(30.0, 20.0));
        assert_eq!((restarted.elided, restarted.written), (330, 70));
        assert!(restarted.restarted);

        let idle = Elision::between(&at(5.0, 5.0), None, &at(5.0, 5.0));
        assert_eq!(idle.elided_fraction, None);
    }
}
