//! One number per row, with its ratio to a baseline measured in the same run, or the reason there
//! is no number. Printed as a table and written as JSON for comparing runs.
use std::fmt::Write as _;

use serde::Serialize;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Group: `tcp bulk`, `udp`, `setup`, `scale`, `egress`, `peer`.
    pub section: &'static str,
    /// Unique within the report; baselines are referred to by it.
    pub name: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    /// `value / baseline value`.
    pub ratio: Option<f64>,
    pub baseline: Option<String>,
    /// The goal this row is checked against, in words (`≥ 0.6× raw quinn`).
    pub target: Option<String>,
    pub met: Option<bool>,
    pub note: Option<String>,
    /// Why there is no number.
    pub unavailable: Option<String>,
    /// When the row was measured more than once: every run's value; `value` is their median.
    pub runs: Option<Vec<f64>>,
}

impl Row {
    pub fn new(
        section: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            section,
            name: name.into(),
            value: Some(value),
            unit,
            ratio: None,
            baseline: None,
            target: None,
            met: None,
            note: None,
            unavailable: None,
            runs: None,
        }
    }

    pub fn unavailable(
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        why: impl Into<String>,
    ) -> Row {
        Row {
            value: None,
            unavailable: Some(why.into()),
            ..Row::new(section, name, 0.0, unit)
        }
    }

    /// A number, or the reason there is none.
    pub fn from_result(
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        r: Result<f64, String>,
    ) -> Row {
        match r {
            Ok(v) => Row::new(section, name, v, unit),
            Err(e) => Row::unavailable(section, name, unit, e),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }
}

/// Folds the rows of repeated runs of the same sections into one row per name: the median value
/// (the lower middle one for an even count), every run's value in `runs`, and the spread in the
/// note. A name some run could not measure keeps the numbers the other runs have; with none, the
/// first run's reason.
pub fn merge_runs(runs: Vec<Vec<Row>>) -> Vec<Row> {
    let mut runs = runs.into_iter();
    let Some(first) = runs.next() else {
        return Vec::new();
    };
    let rest: Vec<Vec<Row>> = runs.collect();
    if rest.is_empty() {
        return first;
    }
    first
        .into_iter()
        .map(|row| {
            let mut values: Vec<f64> = std::iter::once(&row)
                .chain(
                    rest.iter()
                        .filter_map(|r| r.iter().find(|x| x.name == row.name)),
                )
                .filter_map(|r| r.value)
                .collect();
            if values.is_empty() {
                return row;
            }
            let in_order = values.clone();
            values.sort_by(|a, b| a.total_cmp(b));
            let median = values[(values.len() - 1) / 2];
            let (lo, hi) = (values[0], values[values.len() - 1]);
            let spread = if median != 0.0 {
                format!(", spread ±{:.0} %", 50.0 * (hi - lo) / median.abs())
            } else {
                String::new()
            };
            let runs_note = format!(
                "median of {}: {}–{}{spread}",
                values.len(),
                fmt_num(lo),
                fmt_num(hi)
            );
            Row {
                value: Some(median),
                unavailable: None,
                note: Some(match row.note {
                    Some(n) => format!("{runs_note}; {n}"),
                    None => runs_note,
                }),
                runs: Some(in_order),
                ..row
            }
        })
        .collect()
}

/// Where the numbers were measured.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    /// 1-minute load average at the start and at the end of the run.
    pub load_start: f64,
    pub load_end: f64,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let load = load_average();
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            kernel,
            load_start: load,
            load_end: load,
        }
    }
}

/// The 1-minute load average (`/proc/loadavg`), or -1 when unreadable.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub machine: Machine,
    /// Bytes per TCP bulk transfer.
    pub bytes: u64,
    pub started_unix: u64,
    pub duration_secs: f64,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn get(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    fn value(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(|r| r.value)
    }

    /// Sets `row.ratio = row / baseline` when both have numbers.
    pub fn ratio(&mut self, row: &str, baseline: &str) {
        let b = self.value(baseline);
        if let Some(r) = self.rows.iter_mut().find(|r| r.name == row) {
            r.baseline = Some(baseline.to_owned());
            r.ratio = match (r.value, b) {
                (Some(v), Some(b)) if b != 0.0 => Some(v / b),
                _ => None,
            };
        }
    }

    /// A derived row `row ÷ peer` (the ratio of two measured rows) with the target `≥ min×`, for a
    /// row that already has another baseline. Nothing when `peer` was not measured at all.
    pub fn versus(&mut self, section: &'static str, row: &str, peer: &str, min: f64) {
        if self.get(peer).is_none() {
            return;
        }
        let name = format!("{row} ÷ {peer}");
        let r = match (self.value(row), self.value(peer)) {
            (Some(a), Some(b)) if b != 0.0 => Row::new(section, name.clone(), a / b, "×"),
            _ => Row::unavailable(section, name.clone(), "×", "one side has no number"),
        };
        self.rows.push(r);
        self.target(&name, &format!("≥ {min}×"), |row| {
            row.value.map(|x| x >= min)
        });
    }

    /// Marks a row with a target and whether it was met (`None` when there is no number).
    pub fn target(&mut self, row: &str, target: &str, met: impl FnOnce(&Row) -> Option<bool>) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.name == row) {
            r.target = Some(target.to_owned());
            r.met = if r.value.is_some() { met(r) } else { None };
        }
    }

    /// The table printed at the end of a run (also the README's format).
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "cfr bench ({} mode): {} × {}, Linux {}, load avg {:.2} → {:.2}, {:.0} s",
            self.mode, m.nproc, m.cpu, m.kernel, m.load_start, m.load_end, self.duration_secs
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| section | measurement | value | unit | ratio | baseline | target | note |"
        );
        let _ = writeln!(out, "|---|---|---:|---|---:|---|---|---|");
        for r in &self.rows {
            let value = match (r.value, &r.unavailable) {
                (Some(v), _) => fmt_num(v),
                (None, Some(why)) => format!("unavailable: {why}"),
                (None, None) => "—".into(),
            };
            let ratio = r.ratio.map(|x| format!("{x:.2}×")).unwrap_or_default();
            let target = match (&r.target, r.met) {
                (Some(t), Some(true)) => format!("{t} ✔"),
                (Some(t), Some(false)) => format!("{t} ✘"),
                (Some(t), None) => t.clone(),
                (None, _) => String::new(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.section,
                r.name,
                value,
                r.unit,
                ratio,
                r.baseline.as_deref().unwrap_or(""),
                target,
                r.note.as_deref().unwrap_or("")
            );
        }
        out
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// p-th percentile (0..=100) of unsorted samples, nearest-rank.
pub fn percentile(samples: &mut [f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let mut s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut s, 50.0), Some(50.0));
        assert_eq!(percentile(&mut s, 99.0), Some(99.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn ratio_uses_the_named_baseline() {
        let mut r = Report {
            mode: "quick",
            machine: Machine::probe(),
            bytes: 0,
            started_unix: 0,
            duration_secs: 0.0,
            rows: vec![
                Row::new("tcp bulk", "a", 3.0, "Gbit/s"),
                Row::new("tcp bulk", "b", 6.0, "Gbit/s"),
                Row::unavailable("tcp bulk", "c", "Gbit/s", "not built"),
            ],
        };
        r.ratio("a", "b");
        r.ratio("c", "b");
        assert_eq!(r.get("a").unwrap().ratio, Some(0.5));
        assert_eq!(r.get("c").unwrap().ratio, None);
        assert!(r.table().contains("unavailable: not built"));
    }

    #[test]
    fn repeated_runs_merge_into_the_median_with_their_spread() {
        let run = |v: Option<f64>| {
            vec![match v {
                Some(v) => Row::new("udp", "x", v, "dgram/s"),
                None => Row::unavailable("udp", "x", "dgram/s", "noise"),
            }]
        };
        let merged = merge_runs(vec![run(Some(90.0)), run(Some(110.0)), run(Some(100.0))]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].value, Some(100.0));
        assert_eq!(merged[0].runs.as_deref(), Some(&[90.0, 110.0, 100.0][..]));
        let note = merged[0].note.as_deref().unwrap();
        assert!(
            note.contains("median of 3: 90.00–110.0, spread ±10 %"),
            "{note}"
        );

        let partial = merge_runs(vec![run(None), run(Some(7.0))]);
        assert_eq!(partial[0].value, Some(7.0));
        assert!(partial[0].unavailable.is_none());
        let none = merge_runs(vec![run(None), run(None)]);
        assert_eq!(none[0].unavailable.as_deref(), Some("noise"));
    }
}
