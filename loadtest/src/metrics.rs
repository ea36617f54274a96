//! The server's own counters, read from outside: `pairs --metrics-url`
//! scrapes each node's Prometheus text (`GET /metrics`) before and after the
//! measured phase, and reports what the ack window did in between: copies
//! acked before they were written (`sealpost_copies_elided_total`) against
//! copies written (`sealpost_copies_written_total`).
//!
//! `wakeups --metrics-url` reads the wake-up counters the same way
//! ([`Wakeups`]): `sealpost_wakeups_total` by outcome, and the mean of
//! `sealpost_wakeup_latency_seconds` (its `_sum` over its `_count`).
//!
//! Only the few lines of the text format needed here are parsed: `name
//! value` and `name{labels} value` (a timestamp after the value is
//! ignored), labelled series of one name summed or grouped by one label.
//! Comments and other names are skipped.

use std::collections::BTreeMap;
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
    for (_, value) in series(text, name) {
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// The series named `name`, summed by the value of their label `label`
/// (`""` for series without it).
pub fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut grouped = BTreeMap::new();
    for (labels, value) in series(text, name) {
        let key = labels
            .into_iter()
            .find(|(k, _)| k == label)
            .map(|(_, v)| v)
            .unwrap_or_default();
        *grouped.entry(key).or_insert(0.0) += value;
    }
    grouped
}

/// Every series named `name`: its labels and its value.
fn series(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `x_total` is not `x_total_created`.
        let (labels, rest) = if let Some(labelled) = rest.strip_prefix('{') {
            // Label values are quoted and may hold spaces or braces; the
            // set ends at the last `}`.
            match labelled.rfind('}') {
                Some(end) => (labels(&labelled[..end]), &labelled[end + 1..]),
                None => continue,
            }
        } else if rest.starts_with(char::is_whitespace) {
            (Vec::new(), rest)
        } else {
            continue;
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        if let Ok(value) = value.parse::<f64>() {
            found.push((labels, value));
        }
    }
    found
}

/// `a="x",b="y \"z\""` as pairs, escapes undone.
fn labels(set: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = set.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .skip_while(|c| *c == ',' || c.is_whitespace())
            .take_while(|c| *c != '=')
            .collect();
        if key.is_empty() || chars.next() != Some('"') {
            return pairs;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        pairs.push((key.trim().to_owned(), value));
    }
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
        let mut total = Self::default();
        for (url, text) in urls.iter().zip(fetch(urls).await?) {
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

/// The Prometheus text of every URL, in order.
pub async fn fetch(urls: &[String]) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let mut texts = Vec::with_capacity(urls.len());
    for url in urls {
        let response = http
            .get(url)
            .send()
            .await
            .with_context(|| format!("scraping {url}"))?;
        if !response.status().is_success() {
            bail!("scraping {url}: {}", response.status());
        }
        texts.push(
            response
                .text()
                .await
                .with_context(|| format!("reading {url}"))?,
        );
    }
    Ok(texts)
}

pub const WAKEUPS: &str = "sealpost_wakeups_total";
pub const WAKEUP_LATENCY: &str = "sealpost_wakeup_latency_seconds";
pub const PUSH_TARGETS: &str = "sealpost_push_targets";

/// The wake-up counters of every node, summed: `sealpost_wakeups_total` by
/// `outcome` (over every provider), the wake-up latency histogram's sum
/// and count, and the targets gauge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wakeups {
    pub by_outcome: BTreeMap<String, f64>,
    pub latency_sum: f64,
    pub latency_count: f64,
    pub targets: f64,
}

impl Wakeups {
    /// A server without wake-ups has none of these series: all zero, and
    /// `present` false.
    pub fn parse(text: &str) -> (Self, bool) {
        let present = sum(text, WAKEUPS).is_some() || sum(text, PUSH_TARGETS).is_some();
        let wakeups = Self {
            by_outcome: by_label(text, WAKEUPS, "outcome"),
            latency_sum: sum(text, &format!("{WAKEUP_LATENCY}_sum")).unwrap_or(0.0),
            latency_count: sum(text, &format!("{WAKEUP_LATENCY}_count")).unwrap_or(0.0),
            targets: sum(text, PUSH_TARGETS).unwrap_or(0.0),
        };
        (wakeups, present)
    }

    /// Scrapes every URL and adds their counts up; `present` is true when
    /// any node has the series.
    pub async fn scrape(urls: &[String]) -> anyhow::Result<(Self, bool)> {
        let mut total = Self::default();
        let mut any = false;
        for text in fetch(urls).await? {
            let (wakeups, present) = Self::parse(&text);
            any |= present;
            for (outcome, n) in wakeups.by_outcome {
                *total.by_outcome.entry(outcome).or_insert(0.0) += n;
            }
            total.latency_sum += wakeups.latency_sum;
            total.latency_count += wakeups.latency_count;
            total.targets += wakeups.targets;
        }
        Ok((total, any))
    }

    /// What was counted between `self` and a later `after`, for
    /// `results.server_wakeups`: wake-ups by outcome, their mean latency
    /// (commit to the provider's answer) over the phase, and the targets
    /// gauge at the end.
    pub fn since(&self, after: &Wakeups) -> serde_json::Value {
        let outcomes: BTreeMap<&str, u64> = after
            .by_outcome
            .iter()
            .map(|(outcome, n)| {
                let before = self.by_outcome.get(outcome).copied().unwrap_or(0.0);
                (outcome.as_str(), (n - before).max(0.0).round() as u64)
            })
            .collect();
        let count = after.latency_count - self.latency_count;
        serde_json::json!({
            "by_outcome": outcomes,
            "latency_mean_ms": (count > 0.0)
                .then(|| (after.latency_sum - self.latency_sum) / count * 1000.0),
            "latency_count": count.max(0.0).round() as u64,
            "targets": after.targets.round() as u64,
        })
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
    fn wake_ups_group_by_outcome_and_their_latency_is_a_mean() {
        let text = |sent: u64, coalesced: u64, sum: f64, count: u64| {
            format!(
                "# TYPE sealpost_wakeups_total counter\n\
                 sealpost_wakeups_total{{provider=\"webpush\",outcome=\"sent\"}} {sent}\n\
                 sealpost_wakeups_total{{outcome=\"sent\",provider=\"apns\"}} 1\n\
                 sealpost_wakeups_total{{provider=\"webpush\",outcome=\"coalesced\"}} {coalesced}\n\
                 sealpost_wakeups_total_created{{provider=\"webpush\",outcome=\"sent\"}} 17\n\
                 sealpost_push_targets{{kind=\"webpush\"}} 10000\n\
                 sealpost_wakeup_latency_seconds_bucket{{provider=\"webpush\",le=\"0.1\"}} {count}\n\
                 sealpost_wakeup_latency_seconds_sum{{provider=\"webpush\"}} {sum}\n\
                 sealpost_wakeup_latency_seconds_count{{provider=\"webpush\"}} {count}\n"
            )
        };
        let (before, present) = Wakeups::parse(&text(10, 90, 1.0, 10));
        assert!(present);
        assert_eq!(before.by_outcome["sent"], 11.0);
        assert_eq!(before.by_outcome["coalesced"], 90.0);
        let (after, _) = Wakeups::parse(&text(110, 1990, 3.0, 110));
        let delta = before.since(&after);
        assert_eq!(delta["by_outcome"]["sent"], 100);
        assert_eq!(delta["by_outcome"]["coalesced"], 1900);
        assert_eq!(delta["latency_count"], 100);
        assert!((delta["latency_mean_ms"].as_f64().unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(delta["targets"], 10000);
        let (none, present) = Wakeups::parse(TEXT);
        assert!(!present && none.by_outcome.is_empty());
        assert_eq!(
            labels(r#"a="x",b="y \"z\"", c="{}""#),
            [("a", "x"), ("b", "y \"z\""), ("c", "{}")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
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
