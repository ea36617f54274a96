//! Measurements that survive a trip between processes: a latency histogram
//! (hdrhistogram, serialised as base64 V2), named counters, and timelines
//! of events counted per time slot, all mergeable.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Latencies in microseconds, from 1 µs to 10 minutes at 3 significant
/// digits.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, latency: Duration) {
        let micros = latency.as_micros().clamp(1, 600_000_000) as u64;
        self.0.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile `q` (0..=1) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// p50, p90, p99, p99.9 and max in milliseconds.
    pub fn summary(&self) -> Value {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if self.0.is_empty() {
            return json!(null);
        }
        json!({
            "count": self.0.len(),
            "p50_ms": ms(self.0.value_at_quantile(0.50)),
            "p90_ms": ms(self.0.value_at_quantile(0.90)),
            "p99_ms": ms(self.0.value_at_quantile(0.99)),
            "p999_ms": ms(self.0.value_at_quantile(0.999)),
            "max_ms": ms(self.0.max()),
        })
    }

    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .expect("serialise histogram");
        STANDARD.encode(bytes)
    }

    pub fn decode(text: &str) -> anyhow::Result<Self> {
        let bytes = STANDARD.decode(text).context("histogram base64")?;
        let histogram = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .context("histogram bytes")?;
        Ok(Self(histogram))
    }
}

/// What one shard (a worker process, or the whole run) measured.
#[derive(Default, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Named counts: sockets ready, messages sent, lost, failures by cause.
    pub counters: BTreeMap<String, u64>,
    /// Named latency histograms, encoded.
    #[serde(default)]
    pub latencies: BTreeMap<String, String>,
    /// Named durations in seconds (a shard's are combined by maximum).
    #[serde(default)]
    pub seconds: BTreeMap<String, f64>,
    /// Named timelines: events per [`SLOT`] of wall-clock time, keyed by
    /// the slot's start in ns since the epoch (comparable across the
    /// processes of one machine), so shards' timelines add up.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timelines: BTreeMap<String, BTreeMap<u64, u64>>,
}

/// A timeline's resolution: fine beside the 250 ms between memory samples.
pub const SLOT: Duration = Duration::from_millis(10);

impl Report {
    pub fn add(&mut self, name: &str, n: u64) {
        *self.counters.entry(name.to_owned()).or_default() += n;
    }

    pub fn count(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    pub fn set_latency(&mut self, name: &str, latency: &Latency) {
        self.latencies.insert(name.to_owned(), latency.encode());
    }

    pub fn latency(&self, name: &str) -> Latency {
        self.latencies
            .get(name)
            .and_then(|text| Latency::decode(text).ok())
            .unwrap_or_default()
    }

    /// Records a duration, keeping the longest when shards are merged.
    pub fn set_seconds(&mut self, name: &str, duration: Duration) {
        let value = self.seconds.entry(name.to_owned()).or_default();
        *value = value.max(duration.as_secs_f64());
    }

    pub fn seconds(&self, name: &str) -> f64 {
        self.seconds.get(name).copied().unwrap_or(0.0)
    }

    /// Counts one event of timeline `name` at `at` (ns since the epoch).
    pub fn mark(&mut self, name: &str, at: u64) {
        let slot = SLOT.as_nanos() as u64;
        *self
            .timelines
            .entry(name.to_owned())
            .or_default()
            .entry(at / slot * slot)
            .or_default() += 1;
    }

    /// Events of timeline `name` in slots that ended by `at` (ns since the
    /// epoch).
    pub fn marked_by(&self, name: &str, at: u64) -> u64 {
        let slot = SLOT.as_nanos() as u64;
        self.timelines.get(name).map_or(0, |timeline| {
            timeline
                .range(..=at.saturating_sub(slot))
                .map(|(_, n)| n)
                .sum()
        })
    }

    pub fn merge(&mut self, other: &Report) {
        for (name, n) in &other.counters {
            self.add(name, *n);
        }
        for name in other.latencies.keys() {
            let mut mine = self.latency(name);
            mine.merge(&other.latency(name));
            self.set_latency(name, &mine);
        }
        for (name, secs) in &other.seconds {
            self.set_seconds(name, Duration::from_secs_f64(*secs));
        }
        for (name, timeline) in &other.timelines {
            let mine = self.timelines.entry(name.clone()).or_default();
            for (slot, n) in timeline {
                *mine.entry(*slot).or_default() += n;
            }
        }
    }
}

/// Nanoseconds since the Unix epoch: comparable across processes on one
/// machine, which is how send-to-push latency is carried in a body.
pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_merge_across_processes() {
        let mut a = Report::default();
        let mut latency = Latency::default();
        latency.record(Duration::from_millis(2));
        a.set_latency("push", &latency);
        a.add("sent", 3);
        a.set_seconds("ready", Duration::from_secs(2));

        let mut b: Report = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        b.set_seconds("ready", Duration::from_secs(5));
        a.merge(&b);
        assert_eq!(a.count("sent"), 6);
        assert_eq!(a.latency("push").count(), 2);
        assert_eq!(a.seconds("ready"), 5.0);
    }

    #[test]
    fn timelines_add_up_across_shards() {
        let ms = 1_000_000;
        let mut a = Report::default();
        a.mark("ready", 1_000 * ms + 3 * ms);
        a.mark("ready", 1_000 * ms + 25 * ms);
        let mut b = Report::default();
        b.mark("ready", 1_000 * ms + 4 * ms);
        let b: Report = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        a.merge(&b);
        // Two in the slot from 1,000 ms, one in the slot from 1,020 ms.
        assert_eq!(a.marked_by("ready", 1_000 * ms), 0);
        assert_eq!(a.marked_by("ready", 1_010 * ms), 2);
        assert_eq!(a.marked_by("ready", 1_029 * ms), 2);
        assert_eq!(a.marked_by("ready", 1_030 * ms), 3);
        assert_eq!(a.marked_by("other", 2_000 * ms), 0);
    }
}
