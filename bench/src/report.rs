//! Figures, the bar each is held to, and how they are printed: a table, or JSON with `--json`.
//!
//! Besides what the scenarios measured, the report derives two kinds of comparison: each broker figure as a
//! fraction of the database limit measured on the same Postgres in the same run, and each figure as a ratio to
//! the peer's (graphile-worker) when `--peer` ran it right after. The bench asserts nothing; "met" only says how
//! a figure compares with the bar of the performance issue. With `--repeat N` each figure is the median of N rounds
//! (comparisons are taken within each round, then their median), and the lowest and highest are shown beside it.

use std::time::Duration;

/// One measured (or derived) figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Stable identifier, for JSON readers and for the comparisons below.
    pub key: String,
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub bar: Option<Bar>,
    /// Lowest and highest over the rounds, when `value` is the median of several.
    pub range: Option<(f64, f64)>,
}

/// The target a figure is held to.
#[derive(Debug, Clone, Copy)]
pub enum Bar {
    AtLeast(f64),
    AtMost(f64),
}

impl Bar {
    fn met(self, value: f64) -> bool {
        match self {
            Bar::AtLeast(bar) => value >= bar,
            Bar::AtMost(bar) => value <= bar,
        }
    }

    fn text(self) -> String {
        match self {
            Bar::AtLeast(bar) => format!("≥ {}", number(bar)),
            Bar::AtMost(bar) => format!("≤ {}", number(bar)),
        }
    }
}

impl Figure {
    pub fn new(key: impl Into<String>, name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
        Figure { key: key.into(), name: name.into(), value, unit, bar: None, range: None }
    }

    pub fn rate(key: &str, name: impl Into<String>, jobs: usize, took: Duration) -> Figure {
        Figure::new(key, name, jobs as f64 / took.as_secs_f64(), "jobs/s")
    }

    pub fn millis(key: &str, name: impl Into<String>, took: Duration) -> Figure {
        Figure::new(key, name, took.as_secs_f64() * 1000.0, "ms")
    }

    pub fn bar(mut self, bar: Bar) -> Figure {
        self.bar = Some(bar);
        self
    }
}

/// p50, p99 and max of `samples` as figures `{key}.p50` etc.
pub fn percentiles(key: &str, name: &str, samples: &mut [Duration], bars: [Option<Bar>; 2]) -> Vec<Figure> {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1))];
    let mut figures = vec![
        Figure::millis(&format!("{key}.p50"), format!("{name} p50"), at(0.5)),
        Figure::millis(&format!("{key}.p99"), format!("{name} p99"), at(0.99)),
        Figure::millis(&format!("{key}.max"), format!("{name} max"), at(1.0)),
    ];
    for (figure, bar) in figures.iter_mut().zip(bars) {
        figure.bar = bar;
    }
    figures
}

/// Each figure any round measured, in the order first seen, as the median of the rounds that measured it. Figures
/// are matched by key and, among figures sharing a key (the peer reports its bulk enqueue twice), by order.
pub fn medians(rounds: &[Vec<Figure>]) -> Vec<Figure> {
    let mut merged: Vec<((&str, usize), &Figure, Vec<f64>)> = Vec::new();
    for round in rounds {
        let mut seen = std::collections::HashMap::<&str, usize>::new();
        for figure in round {
            let nth = seen.entry(figure.key.as_str()).or_default();
            *nth += 1;
            let id = (figure.key.as_str(), *nth);
            match merged.iter_mut().find(|(other, _, _)| *other == id) {
                Some((_, _, values)) => values.push(figure.value),
                None => merged.push((id, figure, vec![figure.value])),
            }
        }
    }
    merged
        .into_iter()
        .map(|(_, figure, mut values)| {
            values.sort_by(f64::total_cmp);
            let middle = values.len() / 2;
            let median =
                if values.len() % 2 == 1 { values[middle] } else { (values[middle - 1] + values[middle]) / 2.0 };
            let range = (rounds.len() > 1).then(|| (values[0], values[values.len() - 1]));
            Figure { value: median, range, ..figure.clone() }
        })
        .collect()
}

/// Broker figures read as a fraction of what raw SQL does on the same Postgres: (ours, the limit, what).
const OF_DATABASE: [(&str, &str, &str); 4] = [
    ("enqueue.single", "db.single_commits", "single-job Enqueue / single-row commits"),
    ("enqueue.batch1000", "db.insert", "Enqueue batches of 1000 / multi-row insert"),
    ("drain.rate", "db.claim_complete", "drain through gRPC / claim + complete in SQL"),
    ("drain.rate", "db.pipeline", "drain through gRPC / insert → claim → complete in SQL"),
];

/// Ours against the peer's: (ours, peer, what, higher is better).
const OF_PEER: [(&str, &str, &str, bool); 7] = [
    ("enqueue.single", "peer.single8", "single-job enqueue (64 clients) / add_job (8 clients)", true),
    ("enqueue.batch1000", "peer.bulk", "Enqueue batches of 1000 / bulk add_jobs", true),
    ("drain.rate", "peer.drain1", "drain / graphile-worker drain, 1 process", true),
    ("drain.rate", "peer.drain2", "drain / graphile-worker drain, 2 processes", true),
    ("pickup.p50", "peer.pickup.p50", "pickup p50 (theirs / ours: > 1 is faster)", false),
    ("pickup.p99", "peer.pickup.p99", "pickup p99 (theirs / ours: > 1 is faster)", false),
    ("pickup.max", "peer.pickup.max", "pickup max (theirs / ours: > 1 is faster)", false),
];

/// The comparisons whose both sides were measured, as figures.
pub fn derived(figures: &[Figure]) -> Vec<Figure> {
    let value = |key: &str| figures.iter().find(|f| f.key == key).map(|f| f.value);
    let mut derived = Vec::new();
    let backlog = [
        ("backlog.other", "drain with the backlog in another queue / empty drain"),
        ("backlog.same", "drain with the backlog behind in the same queue / empty drain"),
    ];
    for (key, what) in backlog {
        if let (Some(ours), Some(empty)) = (value(key), value("drain.rate")) {
            let ratio = Figure::new(format!("{key}.of_empty"), what, 100.0 * ours / empty, "%");
            derived.push(ratio.bar(Bar::AtLeast(80.0)));
        }
    }
    for (ours, limit, what) in OF_DATABASE {
        if let (Some(ours_value), Some(limit_value)) = (value(ours), value(limit)) {
            derived.push(Figure::new(format!("{ours}.of_{limit}"), what, 100.0 * ours_value / limit_value, "%"));
        }
    }
    for (ours, peer, what, higher_is_better) in OF_PEER {
        if let (Some(ours_value), Some(peer_value)) = (value(ours), value(peer)) {
            let ratio = if higher_is_better { ours_value / peer_value } else { peer_value / ours_value };
            derived.push(Figure::new(format!("{ours}.vs_{peer}"), what, ratio, "×"));
        }
    }
    derived
}

pub fn print(figures: &[Figure], json: bool) {
    if json {
        let rows: Vec<_> = figures
            .iter()
            .map(|f| {
                serde_json::json!({
                    "key": f.key, "name": f.name, "value": f.value, "unit": f.unit,
                    "bar": f.bar.map(Bar::text), "met": f.bar.map(|bar| bar.met(f.value)),
                    "min": f.range.map(|r| r.0), "max": f.range.map(|r| r.1),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    let width = figures.iter().map(|f| f.name.chars().count()).max().unwrap_or(0);
    let ranges = figures.iter().any(|f| f.range.is_some());
    let (range_head, range_rule) = if ranges {
        (format!(" {:>21} |", "lowest – highest"), format!("{}:|", "-".repeat(22)))
    } else {
        Default::default()
    };
    println!("| {:width$} | {:>12} |{range_head} {:6} | {:>10} | met |", "figure", "value", "unit", "bar");
    println!("|{}|{}:|{range_rule}{}|{}:|-----|", "-".repeat(width + 2), "-".repeat(13), "-".repeat(8), "-".repeat(11));
    for f in figures {
        let (bar, met) = match f.bar {
            Some(bar) => (bar.text(), if bar.met(f.value) { "yes" } else { "NO" }),
            None => (String::new(), ""),
        };
        let range = match f.range {
            Some((low, high)) if ranges => format!(" {:>21} |", format!("{} – {}", number(low), number(high))),
            _ if ranges => format!(" {:>21} |", ""),
            _ => String::new(),
        };
        println!("| {:width$} | {:>12} |{range} {:6} | {:>10} | {met:3} |", f.name, number(f.value), f.unit, bar);
    }
}

/// Thousands separated by thin spaces above 1000, one or two decimals below.
fn number(value: f64) -> String {
    if value.abs() >= 1000.0 {
        let digits = format!("{:.0}", value.abs());
        let mut grouped = String::new();
        for (i, digit) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(' ');
            }
            grouped.push(digit);
        }
        if value < 0.0 { format!("-{grouped}") } else { grouped }
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::{Figure, medians};

    #[test]
    fn medians_match_figures_by_key_and_order_and_keep_the_range() {
        let round = |values: &[(&str, f64)]| values.iter().map(|(k, v)| Figure::new(*k, *k, *v, "x")).collect();
        let rounds = vec![
            round(&[("a", 3.0), ("bulk", 10.0), ("bulk", 20.0)]),
            round(&[("a", 1.0), ("bulk", 30.0), ("bulk", 40.0), ("late", 7.0)]),
            round(&[("a", 2.0), ("bulk", 50.0), ("bulk", 60.0), ("late", 9.0)]),
        ];
        let summary: Vec<_> = medians(&rounds).into_iter().map(|f| (f.key, f.value, f.range)).collect();
        assert_eq!(
            summary,
            [
                ("a".into(), 2.0, Some((1.0, 3.0))),
                ("bulk".into(), 30.0, Some((10.0, 50.0))),
                ("bulk".into(), 40.0, Some((20.0, 60.0))),
                ("late".into(), 8.0, Some((7.0, 9.0))),
            ]
        );
        let single: Vec<_> = medians(&rounds[..1]).into_iter().map(|f| f.range).collect();
        assert_eq!(single, [None, None, None], "one round has no range");
    }
}
