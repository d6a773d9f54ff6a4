//! The benchmark plots: SVG charts drawn with plotters (line charts on a log x axis, grouped
//! bars), each written beside the CSV of its points, and redrawn from that CSV by `replot`.
//!
//! A chart's titles and axes are fixed per chart (`Spec`), so its CSV alone redraws it: the
//! committed SVGs can be re-rendered without measuring anything again. plotters is used without
//! a font crate: its SVG backend writes `<text>` that the viewer renders in its own sans-serif,
//! and lays labels out with a width estimate, so no system font is needed.
use anyhow::Context as _;
use plotters::prelude::*;

/// A named line (or a bar colour across groups).
#[derive(Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: where it goes, what it says, and how its CSV is laid out.
pub struct Spec {
    /// File stem of `NAME.svg` and `NAME.csv`.
    pub name: &'static str,
    /// Alt text of the Markdown image link.
    pub alt: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    pub layout: Layout,
}

pub enum Layout {
    /// Lines on a log x axis with ticks at the measured x values, y from 0. CSV: a header
    /// `x_column,SERIES...`, then one row per x (a cell is empty where a series has no point).
    Lines { x_label: &'static str, x_column: &'static str },
    /// Grouped bars, one bar per series in each group. CSV: a header `row_header,COLUMN...`,
    /// then one row per series; `groups` pairs each group's axis label with its CSV column.
    Bars { row_header: &'static str, groups: &'static [(&'static str, &'static str)] },
}

const W: u32 = 880;
const H: u32 = 380;
/// Width kept right of the plot for the legend.
const LEGEND: u32 = 260;
const FONT: &str = "sans-serif";
const COLOURS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// Where plots go: `LB_BENCH_PLOTS`, else `bench/plots` (relative to the repository root, where
/// `cargo xtask bench` runs and BENCHMARKS.md lives).
pub fn dir() -> String {
    std::env::var("LB_BENCH_PLOTS").unwrap_or_else(|_| "bench/plots".into())
}

/// Writes `NAME.svg` and `NAME.csv` into the plot directory and returns a Markdown image link.
pub fn save(spec: &Spec, series: &[Series]) -> anyhow::Result<String> {
    let dir = dir();
    std::fs::create_dir_all(&dir)?;
    let name = spec.name;
    std::fs::write(format!("{dir}/{name}.svg"), render(spec, series)?)?;
    std::fs::write(format!("{dir}/{name}.csv"), csv(spec, series))?;
    Ok(format!("![{}]({dir}/{name}.svg) ([points]({dir}/{name}.csv))\n", spec.alt))
}

/// Redraws `NAME.svg` from the `NAME.csv` beside it (the CSV is left as it is).
pub fn replot(spec: &Spec) -> anyhow::Result<()> {
    let (dir, name) = (dir(), spec.name);
    let path = format!("{dir}/{name}.csv");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let series = parse(spec, &text).with_context(|| path.clone())?;
    std::fs::write(format!("{dir}/{name}.svg"), render(spec, &series)?)?;
    Ok(())
}

/// The chart as an SVG document.
pub fn render(spec: &Spec, series: &[Series]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE)?;
        let (plot, legend_area) = root.split_horizontally(W - LEGEND);
        match spec.layout {
            Layout::Lines { x_label, .. } => lines(&plot, spec, x_label, series)?,
            Layout::Bars { groups, .. } => bars(&plot, spec, groups, series)?,
        }
        legend(&legend_area, series)?;
        root.present()?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn lines(area: &Area, spec: &Spec, x_label: &str, series: &[Series]) -> anyhow::Result<()> {
    let mut xs: Vec<f64> = points(series).map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let (Some(&lo), Some(&hi)) = (xs.first(), xs.last()) else {
        anyhow::bail!("{}: no points to plot", spec.name);
    };
    anyhow::ensure!(lo > 0.0, "{}: x = {lo} cannot go on a log axis", spec.name);
    // A margin of half a decade either side keeps the end points off the frame.
    let x_range = Axis { range: lo / 3.0..hi * 3.0, log: true, ticks: xs };
    let mut chart = ChartBuilder::on(area)
        .caption(spec.title, (FONT, 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y_axis(series))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(spec.y_label)
        .label_style((FONT, 14))
        .x_label_formatter(&|x| compact(*x))
        .y_label_formatter(&|y| compact(*y))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let finite = || s.points.iter().copied().filter(|p| p.1.is_finite());
        chart.draw_series(LineSeries::new(finite(), colour.stroke_width(2)))?;
        chart.draw_series(finite().map(|p| Circle::new(p, 3, colour.filled())))?;
    }
    Ok(())
}

/// One group per entry of `groups`, one bar per series (its `points[g].1`).
fn bars(
    area: &Area,
    spec: &Spec,
    groups: &[(&str, &str)],
    series: &[Series],
) -> anyhow::Result<()> {
    let n = groups.len();
    let centres: Vec<f64> = (0..n).map(|g| g as f64 + 0.5).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(spec.title, (FONT, 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            Axis { range: 0.0..n as f64, log: false, ticks: centres },
            y_axis(series),
        )?;
    let label = |x: &f64| groups.get(x.floor() as usize).map_or("", |g| g.0).to_string();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(spec.y_label)
        .label_style((FONT, 14))
        .x_label_formatter(&label)
        .y_label_formatter(&|y| compact(*y))
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let bars = s.points.iter().take(n).enumerate().filter(|(_, p)| p.1.is_finite()).map(
            |(g, &(_, y))| {
                let x = g as f64 + 0.1 + width * i as f64;
                Rectangle::new([(x, 0.0), (x + width * 0.92, y)], colour.filled())
            },
        );
        chart.draw_series(bars)?;
    }
    Ok(())
}

/// Swatches and names, top down, in the area right of the plot.
fn legend(area: &Area, series: &[Series]) -> anyhow::Result<()> {
    for (i, s) in series.iter().enumerate() {
        let y = 50 + 20 * i as i32;
        let colour = COLOURS[i % COLOURS.len()];
        area.draw(&Rectangle::new([(8, y - 6), (20, y + 6)], colour.filled()))?;
        let style =
            TextStyle::from((FONT, 14).into_font()).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            ));
        area.draw(&Text::new(s.name.clone(), (26, y), style))?;
    }
    Ok(())
}

/// y from 0 to a round top, with a grid line every round step.
fn y_axis(series: &[Series]) -> Axis {
    let y_max = points(series).map(|p| p.1).fold(0.0, f64::max);
    let (step, top) = nice(y_max);
    let ticks = (0..).map(|k| k as f64 * step).take_while(|y| *y <= top * 1.0001).collect();
    Axis { range: 0.0..top, log: false, ticks }
}

/// An axis with its ticks and grid lines exactly at `ticks` (the measured x values, round y
/// steps), linear or log. plotters' own `WithKeyPoints` over f64 cannot take a label
/// formatter (it lacks the `ValueFormatter` that the mesh asks for), hence this small one.
struct Axis {
    range: std::ops::Range<f64>,
    log: bool,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let scale = |v: f64| if self.log { v.log10() } else { v };
        let (a, b) = (scale(self.range.start), scale(self.range.end));
        let t = (scale(*value) - a) / (b - a);
        limit.0 + (f64::from(limit.1 - limit.0) * t).round() as i32
    }

    fn key_points<H: plotters::coord::ranged1d::KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Bold points only: light (minor) grid lines would not sit on measured values.
        if hint.weight().allow_light_points() { Vec::new() } else { self.ticks.clone() }
    }
}

/// Every point with a finite y.
fn points(series: &[Series]) -> impl Iterator<Item = (f64, f64)> + '_ {
    series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.1.is_finite())
}

/// The chart's points as CSV (laid out as `Layout` says). Commas in series names become semicolons.
pub fn csv(spec: &Spec, series: &[Series]) -> String {
    let name = |s: &Series| s.name.replace(',', ";");
    match spec.layout {
        Layout::Lines { x_column, .. } => {
            let mut xs: Vec<f64> =
                series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            let mut out = x_column.to_string();
            for s in series {
                out += &format!(",{}", name(s));
            }
            out.push('\n');
            for x in xs {
                out += &format!("{x}");
                for s in series {
                    match s.points.iter().find(|p| p.0 == x) {
                        Some(p) => out += &format!(",{:.3}", p.1),
                        None => out.push(','),
                    }
                }
                out.push('\n');
            }
            out
        }
        Layout::Bars { row_header, groups } => {
            let mut out = row_header.to_string();
            for (_, column) in groups {
                out += &format!(",{column}");
            }
            out.push('\n');
            for s in series {
                let v: Vec<String> = s.points.iter().map(|p| format!("{:.0}", p.1)).collect();
                out += &format!("{},{}\n", name(s), v.join(","));
            }
            out
        }
    }
}

/// Reads back what `csv` wrote. A bars row takes its last fields as the values, so a name
/// with a comma (written before names were escaped) still reads.
pub fn parse(spec: &Spec, text: &str) -> anyhow::Result<Vec<Series>> {
    let mut rows = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = rows.next().context("empty CSV")?;
    let header: Vec<&str> = header.split(',').collect();
    let number = |line: usize, cell: &str| -> anyhow::Result<f64> {
        cell.trim().parse().with_context(|| format!("line {}: {cell:?} is not a number", line + 1))
    };
    match spec.layout {
        Layout::Lines { .. } => {
            anyhow::ensure!(header.len() > 1, "line 1: a header with at least one series");
            let mut series: Vec<Series> = header[1..]
                .iter()
                .map(|n| Series { name: n.to_string(), points: Vec::new() })
                .collect();
            for (line, row) in rows {
                let cells: Vec<&str> = row.split(',').collect();
                anyhow::ensure!(
                    cells.len() == header.len(),
                    "line {}: {} fields, the header has {}",
                    line + 1,
                    cells.len(),
                    header.len()
                );
                let x = number(line, cells[0])?;
                for (s, cell) in series.iter_mut().zip(&cells[1..]) {
                    if !cell.is_empty() {
                        s.points.push((x, number(line, cell)?));
                    }
                }
            }
            Ok(series)
        }
        Layout::Bars { groups, .. } => rows
            .map(|(line, row)| {
                let cells: Vec<&str> = row.split(',').collect();
                anyhow::ensure!(
                    cells.len() > groups.len(),
                    "line {}: a name and {} values",
                    line + 1,
                    groups.len()
                );
                let (name, values) = cells.split_at(cells.len() - groups.len());
                let points = values
                    .iter()
                    .enumerate()
                    .map(|(g, v)| Ok((g as f64, number(line, v)?)))
                    .collect::<anyhow::Result<_>>()?;
                Ok(Series { name: name.join(","), points })
            })
            .collect(),
    }
}

/// A round grid step and the axis top for values up to `max` (about five lines).
fn nice(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 1.0);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(mag);
    (step, (max / step).ceil() * step)
}

/// 1500 → "1.5k", 1000000 → "1M", 0.25 → "0.25".
fn compact(v: f64) -> String {
    let (d, s) = match v.abs() {
        a if a >= 1e6 => (1e6, "M"),
        a if a >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    let n = v / d;
    let t = if n.fract().abs() < 1e-9 || n.abs() >= 100.0 {
        format!("{n:.0}")
    } else {
        format!("{:.2}", n).trim_end_matches('0').trim_end_matches('.').to_string()
    };
    t + s
}

#[cfg(test)]
mod tests;
