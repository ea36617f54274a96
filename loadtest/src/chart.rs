//! `sealpost-loadtest chart`: SVG charts from a directory of JSON results
//! (what `run-benchmarks.sh` leaves in `target/bench/`), one line or bar per
//! run, named by its file (`sqlite-pairs-20k.json` is `sqlite-pairs-20k`).
//!
//! - `push-latency.svg`: every `pairs` run's send-to-push latency by
//!   percentile, from the full histogram in `results.push_latency_hist`.
//!   The x axis is in "nines" (0, 90, 99, 99.9, 99.99 evenly spaced), the
//!   y axis in ms on a log scale, so the tail is as readable as the median.
//! - `sent-latency.svg`: the same for send-to-`sent` (durable) latency,
//!   `results.durable_latency_hist`.
//! - `memory-per-socket.svg`: the server's KiB per socket as the sockets
//!   of a `connect` run opened (`results.memory_curve`).
//! - `elided.svg`: the fraction of copies the ack window kept from being
//!   written (`results.elision`), a bar per run.
//!
//! A chart with no run to show is not written. Text is left to the SVG
//! viewer's sans-serif font: no font files are read.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde_json::Value;

use crate::stats::Latency;

const SIZE: (u32, u32) = (1000, 620);
/// The percentile axis ends at 99.99: four nines.
const NINES: f64 = 4.0;
/// Points per line of a percentile plot: smooth at this size.
const QUANTILE_STEPS: usize = 400;
/// Memory points from fewer sockets are left off the chart: a few MiB of
/// allocator arenas over a hundred sockets would dwarf the curve.
pub const MIN_SOCKETS_CHARTED: u64 = 500;

/// Tableau's ten colours: distinct on white, and in print.
const COLOURS: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];

/// A run's line style: a colour each, dashed after the first ten.
fn style(index: usize) -> (ShapeStyle, bool) {
    (
        COLOURS[index % COLOURS.len()].stroke_width(2),
        index >= COLOURS.len(),
    )
}

/// One result file: its name (the file stem) and its JSON.
pub struct Run {
    pub name: String,
    pub result: Value,
}

/// Every `*.json` in `dir` that is a load-test result (has a `scenario`),
/// by name.
pub fn load(dir: &Path) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        // Token caches and half-written files sit beside the results.
        let Ok(result) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        if !result["scenario"].is_string() {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        runs.push(Run { name, result });
    }
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(runs)
}

/// Draws one chart into a file; false when no run has its data.
type Draw = fn(&[Run], &Path) -> anyhow::Result<bool>;

/// Writes every chart that has data into `out`; returns the files written.
pub fn write_all(runs: &[Run], out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let charts: [(&str, Draw); 4] = [
        ("push-latency.svg", |runs, path| {
            percentiles(
                runs,
                path,
                "push_latency_hist",
                "Send-to-push latency by percentile",
            )
        }),
        ("sent-latency.svg", |runs, path| {
            percentiles(
                runs,
                path,
                "durable_latency_hist",
                "Send-to-sent (durable) latency by percentile",
            )
        }),
        ("memory-per-socket.svg", memory),
        ("elided.svg", elided),
    ];
    for (file, chart) in charts {
        let path = out.join(file);
        if chart(runs, &path).with_context(|| format!("drawing {}", path.display()))? {
            written.push(path);
        }
    }
    Ok(written)
}

/// The percentile at `nines` on the nines axis: 0 is 0, 1 is 90, 2 is 99.
pub fn percentile_at(nines: f64) -> f64 {
    100.0 * (1.0 - 10f64.powf(-nines))
}

/// A number without trailing zeros: 99.9, 0.25, 12.
fn trim(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// Labels the nines axis at whole nines only ("99.9"); between them, none.
fn nines_label(x: f64) -> String {
    if (x - x.round()).abs() > 1e-9 {
        return String::new();
    }
    trim(percentile_at(x.round()), 4)
}

fn plotting<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("{e}")
}

/// One line per `pairs` run that carries the histogram `field`.
fn percentiles(runs: &[Run], path: &Path, field: &str, title: &str) -> anyhow::Result<bool> {
    let lines: Vec<(&str, Vec<(f64, f64)>)> = runs
        .iter()
        .filter(|run| run.result["scenario"] == "pairs")
        .filter_map(|run| {
            let latency = Latency::decode(run.result["results"][field].as_str()?).ok()?;
            (latency.count() > 0).then(|| (run.name.as_str(), quantile_line(&latency)))
        })
        .collect();
    if lines.is_empty() {
        return Ok(false);
    }
    let values = lines.iter().flat_map(|(_, l)| l.iter().map(|p| p.1));
    let (low, high) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    // Whole decades, so the log axis is labelled at 0.1, 1, 10, ...
    let low = 10f64.powf(low.max(0.001).log10().floor());
    let high = 10f64.powf(high.max(low * 10.0).log10().ceil());

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plotting)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..NINES, (low..high).log_scale())
        .map_err(plotting)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms (log scale)")
        .x_labels(NINES as usize + 1)
        .x_label_formatter(&|x| nines_label(*x))
        .y_label_formatter(&|y| trim(*y, 3))
        .draw()
        .map_err(plotting)?;
    for (index, (name, line)) in lines.into_iter().enumerate() {
        draw_line(&mut chart, index, name, line)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plotting)?;
    Ok(true)
}

/// (nines, ms) from 0 to [`NINES`] nines.
fn quantile_line(latency: &Latency) -> Vec<(f64, f64)> {
    (0..=QUANTILE_STEPS)
        .map(|step| {
            let nines = NINES * step as f64 / QUANTILE_STEPS as f64;
            let q = percentile_at(nines) / 100.0;
            (nines, latency.quantile_ms(q).max(0.001))
        })
        .collect()
}

/// One line per run with a `memory_curve`: KiB per socket against sockets.
fn memory(runs: &[Run], path: &Path) -> anyhow::Result<bool> {
    let lines: Vec<(&str, Vec<(f64, f64)>)> = runs
        .iter()
        .filter_map(|run| {
            let curve = run.result["results"]["memory_curve"].as_array()?;
            let line: Vec<(f64, f64)> = curve
                .iter()
                .filter_map(|p| Some((p["sockets"].as_u64()?, p["kib_per_socket"].as_f64()?)))
                .filter(|(sockets, _)| *sockets >= MIN_SOCKETS_CHARTED)
                .map(|(sockets, kib)| (sockets as f64, kib))
                .collect();
            (!line.is_empty()).then_some((run.name.as_str(), line))
        })
        .collect();
    if lines.is_empty() {
        return Ok(false);
    }
    let points = || lines.iter().flat_map(|(_, l)| l.iter());
    let max_sockets = points().map(|p| p.0).fold(0f64, f64::max);
    let max_kib = points().map(|p| p.1).fold(0f64, f64::max);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plotting)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Server memory per socket as sockets open",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_sockets * 1.02, 0f64..(max_kib * 1.15).max(1.0))
        .map_err(plotting)?;
    chart
        .configure_mesh()
        .x_desc("sockets ready")
        .y_desc("KiB per socket (RSS growth / sockets)")
        .x_label_formatter(&|x| trim(*x, 0))
        .y_label_formatter(&|y| trim(*y, 1))
        .draw()
        .map_err(plotting)?;
    for (index, (name, line)) in lines.into_iter().enumerate() {
        draw_line(&mut chart, index, name, line)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(plotting)?;
    Ok(true)
}

/// A bar per run with `results.elision.elided_fraction`, in per cent.
fn elided(runs: &[Run], path: &Path) -> anyhow::Result<bool> {
    let bars: Vec<(&str, f64)> = runs
        .iter()
        .filter_map(|run| {
            let fraction = run.result["results"]["elision"]["elided_fraction"].as_f64()?;
            Some((run.name.as_str(), 100.0 * fraction))
        })
        .collect();
    if bars.is_empty() {
        return Ok(false);
    }
    let longest = bars.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let height = (120 + 36 * bars.len() as u32).max(240);
    let root = SVGBackend::new(path, (SIZE.0, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plotting)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Copies acked before they were written", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        // About 8 px per character of a 14 px sans-serif name.
        .y_label_area_size(24 + 8 * longest as u32)
        // An integer range is inclusive here: one segment per bar.
        .build_cartesian_2d(0f64..100f64, (0..bars.len() - 1).into_segmented())
        .map_err(plotting)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("elided, % of copies (elided + written)")
        .x_label_formatter(&|x| trim(*x, 0))
        .y_labels(bars.len())
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.to_owned()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(plotting)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, percent))| {
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*percent, SegmentValue::Exact(i + 1)),
                ],
                COLOURS[0].filled(),
            );
            bar.set_margin(6, 6, 0, 0);
            bar
        }))
        .map_err(plotting)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, percent))| {
            // Inside a long bar, after a short one.
            let (x, colour) = if *percent > 85.0 {
                (percent - 12.0, WHITE)
            } else {
                (percent + 1.0, BLACK)
            };
            Text::new(
                format!("{}%", trim(*percent, 1)),
                (x, SegmentValue::CenterOf(i)),
                ("sans-serif", 14).into_font().color(&colour),
            )
        }))
        .map_err(plotting)?;
    root.present().map_err(plotting)?;
    Ok(true)
}

type Chart<'a, X, Y> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>;

fn draw_line<X, Y>(
    chart: &mut Chart<'_, X, Y>,
    index: usize,
    name: &str,
    line: Vec<(f64, f64)>,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let (stroke, dashed) = style(index);
    let series = if dashed {
        chart.draw_series(DashedLineSeries::new(line, 8, 4, stroke))
    } else {
        chart.draw_series(LineSeries::new(line, stroke))
    };
    series
        .map_err(plotting)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], stroke));
    Ok(())
}

fn legend<X, Y>(chart: &mut Chart<'_, X, Y>, position: SeriesLabelPosition) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plotting)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    #[test]
    fn the_nines_axis_is_labelled_in_percentiles() {
        assert_eq!(nines_label(0.0), "0");
        assert_eq!(nines_label(1.0), "90");
        assert_eq!(nines_label(2.0), "99");
        assert_eq!(nines_label(3.0), "99.9");
        assert_eq!(nines_label(4.0), "99.99");
        assert_eq!(nines_label(2.5), "");
        assert_eq!(trim(0.25, 3), "0.25");
        assert_eq!(trim(10.0, 3), "10");
    }

    /// Two pairs runs, a connect run and a non-result file: every chart is
    /// written, and each is well-formed SVG with one line or bar per run.
    #[test]
    fn writes_valid_svg_from_fixture_results() {
        let dir = tempfile::tempdir().unwrap();
        let (input, out) = (dir.path().join("in"), dir.path().join("out"));
        std::fs::create_dir(&input).unwrap();
        let histogram = |scale: u64| {
            let mut latency = Latency::default();
            for i in 1..=2_000u64 {
                latency.record(Duration::from_micros(scale * (100 + i * i / 100)));
            }
            latency.encode()
        };
        let write = |name: &str, value: Value| {
            std::fs::write(input.join(name), serde_json::to_vec(&value).unwrap()).unwrap()
        };
        for (backend, scale, fraction) in [("sqlite", 1, 0.75), ("postgres", 3, 0.5)] {
            write(
                &format!("{backend}-pairs.json"),
                json!({ "scenario": "pairs", "results": {
                    "push_latency_hist": histogram(scale),
                    "durable_latency_hist": histogram(scale * 4),
                    "elision": { "elided": 3, "written": 1, "elided_fraction": fraction },
                }}),
            );
        }
        write(
            "sqlite-connect.json",
            json!({ "scenario": "connect", "results": { "memory_curve": [
                { "sockets": 100, "rss_kib": 9000, "kib_per_socket": 90.0 },
                { "sockets": 1000, "rss_kib": 16000, "kib_per_socket": 7.0 },
                { "sockets": 2000, "rss_kib": 22000, "kib_per_socket": 6.5 },
            ]}}),
        );
        write("tokens-sqlite.json", json!({ "lt-p-0": { "access": "x" } }));

        let runs = load(&input).unwrap();
        assert_eq!(runs.len(), 3);
        let written = write_all(&runs, &out).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "push-latency.svg",
                "sent-latency.svg",
                "memory-per-socket.svg",
                "elided.svg"
            ]
        );
        for path in &written {
            let text = std::fs::read_to_string(path).unwrap();
            let svg = roxmltree::Document::parse(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let root = svg.root_element();
            assert_eq!(root.tag_name().name(), "svg", "{}", path.display());
            let texts: Vec<_> = svg
                .descendants()
                .filter(|n| n.tag_name().name() == "text")
                .filter_map(|n| n.text())
                .map(str::trim)
                .collect();
            let lines = svg
                .descendants()
                .filter(|n| n.tag_name().name() == "polyline")
                .count();
            match path.file_name().unwrap().to_str().unwrap() {
                "elided.svg" => {
                    assert!(texts.contains(&"75%"), "{texts:?}");
                    assert!(texts.contains(&"sqlite-pairs"), "{texts:?}");
                }
                "memory-per-socket.svg" => {
                    assert!(texts.contains(&"sqlite-connect"), "{texts:?}");
                    assert!(lines >= 1);
                }
                _ => {
                    assert!(texts.contains(&"99.9"), "{texts:?}");
                    assert!(texts.contains(&"postgres-pairs"), "{texts:?}");
                    // A line per run, and one per legend entry.
                    assert!(lines >= 2, "{lines} lines");
                }
            }
        }
        // Nothing to chart: nothing written.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(
            write_all(&load(&empty).unwrap(), &dir.path().join("none"))
                .unwrap()
                .is_empty()
        );
    }
}
