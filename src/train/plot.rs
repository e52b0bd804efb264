//! The self-contained SVG loss plot of a training run (no plotting
//! dependency; opens in any browser at 720×420): train and val losses
//! against steps, with "nice" axis ticks and decimation of long runs.

use std::fmt::Write as _;
use std::path::Path;

use crate::adapters::peft_io::write_atomic;
use crate::error::Result;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
/// Plot area: left, top, right, bottom edges in pixels.
const PLOT_L: f64 = 72.0;
const PLOT_T: f64 = 40.0;
const PLOT_R: f64 = 700.0;
const PLOT_B: f64 = 364.0;
const TRAIN_COLOUR: &str = "#1f77b4";
const VAL_COLOUR: &str = "#d62728";

/// A "nice" number near `x` (1, 2, 5 × 10^k): rounded when `round`,
/// otherwise the smallest such number ≥ x (after Heckbert, Graphics Gems I).
fn nice_number(x: f64, round: bool) -> f64 {
    let exp = x.log10().floor();
    let f = x / 10f64.powf(exp);
    let nf = if round {
        match f {
            f if f < 1.5 => 1.0,
            f if f < 3.0 => 2.0,
            f if f < 7.0 => 5.0,
            _ => 10.0,
        }
    } else {
        match f {
            f if f <= 1.0 => 1.0,
            f if f <= 2.0 => 2.0,
            f if f <= 5.0 => 5.0,
            _ => 10.0,
        }
    };
    nf * 10f64.powf(exp)
}

/// Axis range and ticks covering `[lo, hi]` (lo < hi) with about `n` ticks:
/// `(axis_lo, axis_hi, tick_step)`, axis bounds multiples of the step.
/// `min_step` keeps integer axes (steps) on integer ticks.
fn nice_ticks(lo: f64, hi: f64, n: usize, min_step: f64) -> (f64, f64, f64) {
    let step = nice_number((hi - lo) / (n.max(2) - 1) as f64, true).max(min_step);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

/// Decimals that print every multiple of `step` (1, 2 or 5 × 10^k) exactly.
fn tick_decimals(step: f64) -> usize {
    (-step.log10().floor()).max(0.0) as usize
}

/// Finite data bounds, padded when the range is empty (one point or a
/// constant series). `None` when there is no finite value.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return None;
    }
    if hi - lo <= 1e-12 * hi.abs().max(lo.abs()).max(1e-300) {
        let pad = if hi == 0.0 { 1.0 } else { hi.abs() * 0.05 };
        return Some((lo - pad, hi + pad));
    }
    Some((lo, hi))
}

/// Escape text for XML content and attribute values.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Keep at most the first, lowest, highest and last point of each pixel
/// column, so a long run stays a small file without hiding loss spikes.
fn decimate(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if pts.len() <= 2 * (PLOT_R - PLOT_L) as usize {
        return pts.to_vec();
    }
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut i = 0;
    while i < pts.len() {
        let col = pts[i].0.floor();
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < pts.len() && pts[j].0.floor() == col {
            if pts[j].1 < pts[lo].1 {
                lo = j;
            }
            if pts[j].1 > pts[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let mut keep = [i, lo, hi, j - 1];
        keep.sort_unstable();
        let mut last = usize::MAX;
        for k in keep {
            if k != last {
                out.push(pts[k]);
                last = k;
            }
        }
        i = j;
    }
    out
}

fn points_attr(pts: &[(f64, f64)]) -> String {
    let mut s = String::new();
    for (i, (x, y)) in pts.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{x:.1},{y:.1}");
    }
    s
}

/// Render the loss plot as an SVG document (see [`write_loss_plot`]).
pub fn loss_plot_svg(title: &str, train: &[(usize, f64)], val: &[(usize, f64)]) -> String {
    let finite = |s: &[(usize, f64)]| -> Vec<(usize, f64)> {
        s.iter().copied().filter(|(_, v)| v.is_finite()).collect()
    };
    let (train, val) = (finite(train), finite(val));
    let all = || train.iter().chain(val.iter());

    // x: the step range, or two steps around a lone step
    let (x_lo, x_hi) = match (all().map(|p| p.0).min(), all().map(|p| p.0).max()) {
        (Some(lo), Some(hi)) if hi > lo => (lo as f64, hi as f64),
        (Some(s), _) => (s.saturating_sub(1) as f64, (s.saturating_sub(1) + 2) as f64),
        _ => (0.0, 1.0),
    };
    // y: the loss range plus a little air, so no point sits on the frame
    let (y_lo, y_hi) = bounds(all().map(|p| p.1)).unwrap_or((0.0, 1.0));
    let air = (y_hi - y_lo) * 0.04;
    let (y_lo, y_hi) = (
        if y_lo >= 0.0 {
            (y_lo - air).max(0.0)
        } else {
            y_lo - air
        },
        y_hi + air,
    );
    let (x0, x1, xs) = nice_ticks(x_lo, x_hi, 8, 1.0);
    let (y0, y1, ys) = nice_ticks(y_lo, y_hi, 6, 0.0);
    let px = |x: f64| PLOT_L + (x - x0) / (x1 - x0) * (PLOT_R - PLOT_L);
    let py = |y: f64| PLOT_B - (y - y0) / (y1 - y0) * (PLOT_B - PLOT_T);
    let to_px = |s: &[(usize, f64)]| -> Vec<(f64, f64)> {
        s.iter().map(|&(x, y)| (px(x as f64), py(y))).collect()
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(svg, "<title>{}</title>", xml_escape(title));
    let _ = writeln!(
        svg,
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        (PLOT_L + PLOT_R) / 2.0,
        xml_escape(title)
    );

    // grid and tick labels
    svg.push_str("<g stroke=\"#e0e0e0\" stroke-width=\"1\">\n");
    let x_ticks: Vec<f64> = (0..)
        .map(|k| x0 + k as f64 * xs)
        .take_while(|&x| x <= x1 + xs * 1e-9)
        .collect();
    let y_ticks: Vec<f64> = (0..)
        .map(|k| y0 + k as f64 * ys)
        .take_while(|&y| y <= y1 + ys * 1e-9)
        .collect();
    for &x in &x_ticks {
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{PLOT_T}\" x2=\"{0:.1}\" y2=\"{PLOT_B}\"/>",
            px(x)
        );
    }
    for &y in &y_ticks {
        let _ = writeln!(
            svg,
            "<line x1=\"{PLOT_L}\" y1=\"{0:.1}\" x2=\"{PLOT_R}\" y2=\"{0:.1}\"/>",
            py(y)
        );
    }
    svg.push_str("</g>\n<g fill=\"#333\">\n");
    for &x in &x_ticks {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text>",
            px(x),
            PLOT_B + 18.0,
            x
        );
    }
    let yd = tick_decimals(ys);
    for &y in &y_ticks {
        // -0.0 would print as "-0.00"
        let y = if y.abs() < ys * 1e-9 { 0.0 } else { y };
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{y:.yd$}</text>",
            PLOT_L - 8.0,
            py(y) + 4.0
        );
    }
    svg.push_str("</g>\n");

    // axes and their labels
    let _ = writeln!(
        svg,
        "<polyline points=\"{PLOT_L},{PLOT_T} {PLOT_L},{PLOT_B} {PLOT_R},{PLOT_B}\" \
         fill=\"none\" stroke=\"#333\" stroke-width=\"1\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\">step</text>",
        (PLOT_L + PLOT_R) / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"18\" y=\"{0:.1}\" text-anchor=\"middle\" font-size=\"13\" \
         transform=\"rotate(-90 18 {0:.1})\">loss</text>",
        (PLOT_T + PLOT_B) / 2.0
    );

    // series: train as a line, val as a line with points
    if !train.is_empty() {
        let pts = decimate(&to_px(&train));
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{TRAIN_COLOUR}\" stroke-width=\"1.5\" \
             stroke-linejoin=\"round\"/>",
            points_attr(&pts)
        );
        if train.len() == 1 {
            let (x, y) = pts[0];
            let _ = writeln!(
                svg,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{TRAIN_COLOUR}\"/>"
            );
        }
    }
    if !val.is_empty() {
        let pts = to_px(&val);
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{VAL_COLOUR}\" stroke-width=\"1.5\" \
             stroke-dasharray=\"5 3\"/>",
            points_attr(&decimate(&pts))
        );
        svg.push_str(&format!("<g fill=\"{VAL_COLOUR}\">\n"));
        // one marker per val point unless there are too many to see
        if pts.len() <= 400 {
            for (x, y) in &pts {
                let _ = writeln!(svg, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\"/>");
            }
        }
        svg.push_str("</g>\n");
    }
    if train.is_empty() && val.is_empty() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#888\">no finite losses yet</text>",
            (PLOT_L + PLOT_R) / 2.0,
            (PLOT_T + PLOT_B) / 2.0
        );
    }

    // legend, top right inside the plot
    let (lx, ly) = (PLOT_R - 110.0, PLOT_T + 10.0);
    let _ = writeln!(
        svg,
        "<g>\n<rect x=\"{lx}\" y=\"{ly}\" width=\"100\" height=\"44\" fill=\"white\" \
         fill-opacity=\"0.85\" stroke=\"#ccc\"/>"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{TRAIN_COLOUR}\" stroke-width=\"2\"/>",
        lx + 8.0,
        ly + 14.0,
        lx + 32.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\">train loss</text>",
        lx + 38.0,
        ly + 18.0
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{VAL_COLOUR}\" stroke-width=\"2\" \
         stroke-dasharray=\"5 3\"/>",
        lx + 8.0,
        ly + 32.0,
        lx + 32.0
    );
    let _ = writeln!(
        svg,
        "<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"{VAL_COLOUR}\"/>",
        lx + 20.0,
        ly + 32.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\">val loss</text>\n</g>",
        lx + 38.0,
        ly + 36.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// Write a train/val loss plot to `path` as SVG, atomically. Non-finite
/// losses are skipped; empty, single-point and constant series still give a
/// valid plot.
pub fn write_loss_plot(
    path: &Path,
    title: &str,
    train: &[(usize, f64)],
    val: &[(usize, f64)],
) -> Result<()> {
    write_atomic(path, loss_plot_svg(title, train, val).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgtune-plot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A small well-formedness check: the document is one `<svg>` element,
    /// every tag is closed in order, and attribute quotes balance.
    fn assert_xmlish(svg: &str) {
        assert!(svg.starts_with("<svg "), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            let j = rest[i..].find('>').expect("unclosed tag") + i;
            let tag = &rest[i + 1..j];
            assert_eq!(tag.matches('"').count() % 2, 0, "quotes in <{tag}>");
            assert!(!tag.contains('<'), "nested < in {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.trim()), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap());
            }
            rest = &rest[j + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    #[test]
    fn test_loss_plot_is_wellformed_svg() {
        let d = scratch("plot");
        let p = d.join("loss.svg");
        let train: Vec<(usize, f64)> = (1..=50).map(|s| (s, 4.0 / (s as f64).sqrt())).collect();
        let val = [(10, 1.6), (20, 1.1), (30, 0.9), (40, 0.8), (50, 0.75)];
        write_loss_plot(&p, "tiny-llama <lora> & \"friends\"", &train, &val).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert_xmlish(&svg);
        assert_eq!(svg.matches("<polyline").count(), 3, "axes + train + val");
        for needle in [
            ">step</text>",
            ">loss</text>",
            "train loss",
            "val loss",
            "&lt;lora&gt;",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        // round ticks: steps 0..50 by 10, losses 0..5 by 1
        for tick in [
            ">0</text>",
            ">10</text>",
            ">50</text>",
            ">1</text>",
            ">5</text>",
        ] {
            assert!(svg.contains(tick), "missing tick {tick}: {svg}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_loss_plot_edge_cases() {
        let nan_inf = [(1, f64::NAN), (2, 3.0), (3, f64::INFINITY), (4, 2.0)];
        type Series<'a> = &'a [(usize, f64)];
        let cases: [(Series, Series); 6] = [
            (&[], &[]),
            (&[(0, 2.5)], &[]),
            (&[], &[(7, 1.0)]),
            (&[(1, 2.0), (2, 2.0), (3, 2.0)], &[(3, 2.0)]),
            (&nan_inf, &[(4, f64::NEG_INFINITY)]),
            (&[(1, 0.0), (2, 0.0)], &[]),
        ];
        for (train, val) in cases {
            let svg = loss_plot_svg("t", train, val);
            assert_xmlish(&svg);
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
        assert!(loss_plot_svg("t", &[], &[]).contains("no finite losses"));
    }

    #[test]
    fn test_loss_plot_decimates_long_runs_but_keeps_spikes() {
        let mut train: Vec<(usize, f64)> = (0..100_000).map(|s| (s, 2.0)).collect();
        train[54_321].1 = 9.0;
        let svg = loss_plot_svg("long", &train, &[]);
        assert_xmlish(&svg);
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
        // the spike at 9.0 survives: y axis 2..10, so it is drawn near the top
        let train_line = svg.split("<polyline points=\"").nth(2).unwrap();
        let top = train_line
            .split('"')
            .next()
            .unwrap()
            .split(' ')
            .map(|p| p.split(',').nth(1).unwrap().parse::<f64>().unwrap())
            .fold(f64::INFINITY, f64::min);
        assert!(
            top < PLOT_T + 0.2 * (PLOT_B - PLOT_T),
            "spike lost: top y {top}"
        );
    }

    #[test]
    fn test_nice_ticks() {
        assert_eq!(nice_ticks(0.0, 47.0, 8, 1.0), (0.0, 50.0, 5.0));
        assert_eq!(nice_ticks(1.0, 50.0, 8, 1.0), (0.0, 50.0, 10.0));
        assert_eq!(nice_ticks(0.0, 3.0, 8, 1.0).2, 1.0);
        let (lo, hi, s) = nice_ticks(1.83, 4.41, 6, 0.0);
        assert_eq!(s, 0.5);
        assert!((lo - 1.5).abs() < 1e-12 && (hi - 4.5).abs() < 1e-12);
        assert_eq!(tick_decimals(0.05), 2);
        assert_eq!(tick_decimals(0.5), 1);
        assert_eq!(tick_decimals(20.0), 0);
    }
}
