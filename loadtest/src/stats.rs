//! Measurements that survive a trip between processes: a latency histogram
//! (hdrhistogram, serialised as base64 V2) and named counters, both mergeable.

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
}

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
}
