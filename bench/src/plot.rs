//! Minimal SVG charts for BENCHMARKS.md (line charts on a log x axis, grouped bars), written
//! by hand so the benchmark needs no plotting crate; the points go next to them as CSV.
use std::fmt::Write as _;

/// A named line (or a bar colour across groups).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 720.0;
const H: f64 = 380.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;
const COLOURS: [&str; 6] = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// Where plots go: `LB_BENCH_PLOTS`, else `bench/plots` (relative to the repository root, where
/// `cargo xtask bench` runs and BENCHMARKS.md lives).
pub fn dir() -> String {
    std::env::var("LB_BENCH_PLOTS").unwrap_or_else(|_| "bench/plots".into())
}

/// Writes `NAME.svg` and `NAME.csv` into the plot directory and returns a Markdown image link.
pub fn save(name: &str, title: &str, svg: &str, csv: &str) -> anyhow::Result<String> {
    let dir = dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(format!("{dir}/{name}.svg"), svg)?;
    std::fs::write(format!("{dir}/{name}.csv"), csv)?;
    Ok(format!("![{title}]({dir}/{name}.svg) ([points]({dir}/{name}.csv))\n"))
}

/// CSV with one row per x and one column per series (empty where a series has no point).
pub fn csv(x_label: &str, series: &[Series]) -> String {
    let mut xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut out = x_label.to_string();
    for s in series {
        out += &format!(",{}", s.name.replace(',', ";"));
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

/// A line chart with a log-scaled x axis (ticks at the measured x values) and y from 0.
pub fn lines(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let mut xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let (lo, hi) = match (xs.first(), xs.last()) {
        (Some(&a), Some(&b)) if a > 0.0 && b > a => (a.log10(), b.log10()),
        (Some(&a), _) if a > 0.0 => (a.log10() - 0.5, a.log10() + 0.5),
        _ => (0.0, 1.0),
    };
    let y_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0, f64::max);
    let (step, top) = nice(y_max);
    let px = |x: f64| LEFT + (x.log10() - lo) / (hi - lo) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / top * (H - TOP - BOTTOM);
    let mut svg = frame(title, x_label, y_label, step, top);
    for &x in &xs {
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#eee\"/>\
             <text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{4}</text>",
            px(x),
            TOP,
            H - BOTTOM,
            H - BOTTOM + 18.0,
            compact(x)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> =
            s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        for &(x, y) in &s.points {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"><title>{}: {} → {}</title></circle>",
                px(x),
                py(y),
                escape(&s.name),
                compact(x),
                compact(y)
            );
        }
        legend(&mut svg, i, &s.name);
    }
    svg + "</svg>\n"
}

/// Grouped bars: one group per entry of `groups`, one bar per series (its `points[g].1`).
pub fn bars(title: &str, y_label: &str, groups: &[&str], series: &[Series]) -> String {
    let y_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0, f64::max);
    let (step, top) = nice(y_max);
    let py = |y: f64| H - BOTTOM - y / top * (H - TOP - BOTTOM);
    let mut svg = frame(title, "", y_label, step, top);
    let group_w = (W - LEFT - RIGHT) / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (g, name) in groups.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            LEFT + group_w * (g as f64 + 0.5),
            H - BOTTOM + 18.0,
            escape(name)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        for (g, &(_, y)) in s.points.iter().enumerate().take(groups.len()) {
            if !y.is_finite() {
                continue;
            }
            let x = LEFT + group_w * g as f64 + group_w * 0.1 + bar_w * i as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{c}\">\
                 <title>{}: {}</title></rect>",
                py(y),
                bar_w * 0.92,
                (H - BOTTOM - py(y)).max(0.0),
                escape(&s.name),
                compact(y)
            );
        }
        legend(&mut svg, i, &s.name);
    }
    svg + "</svg>\n"
}

/// The SVG header, title, axis labels, y grid and ticks.
fn frame(title: &str, x_label: &str, y_label: &str, step: f64, top: f64) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        (LEFT + W - RIGHT) / 2.0,
        escape(title),
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        escape(x_label),
        (TOP + H - BOTTOM) / 2.0,
        escape(y_label)
    );
    let mut y = 0.0;
    while y <= top * 1.0001 {
        let py = H - BOTTOM - y / top * (H - TOP - BOTTOM);
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            compact(y)
        );
        y += step;
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{0:.1}\" stroke=\"#333\"/>\
         <line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#333\"/>",
        H - BOTTOM,
        W - RIGHT
    );
    svg
}

fn legend(svg: &mut String, i: usize, name: &str) {
    let (x, y) = (W - RIGHT + 16.0, TOP + 10.0 + 20.0 * i as f64);
    let _ = writeln!(
        svg,
        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
         <text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
        y - 10.0,
        COLOURS[i % COLOURS.len()],
        x + 18.0,
        escape(name)
    );
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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_numbers() {
        assert_eq!(compact(1500.0), "1.5k");
        assert_eq!(compact(1_000_000.0), "1M");
        assert_eq!(compact(0.25), "0.25");
        assert_eq!(compact(2500.0), "2.5k");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice(47_000.0), (10_000.0, 50_000.0));
        assert_eq!(nice(3.2), (1.0, 4.0));
    }
}
