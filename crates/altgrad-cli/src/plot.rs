//! Plots for reports (plotters): log-log line charts and heatmaps, each written as PNG and SVG
//! with the bundled DejaVu Sans font (`assets/fonts/`, Bitstream Vera / DejaVu licence).
//! Files are written to a temporary name and renamed.

use altgrad::{Error, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};
use std::sync::Once;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
        // Registration can only fail on a malformed font; the bundled one is valid.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad(path.display().to_string(), format!("cannot draw plot: {e}"))
}

/// `dir/name.tmp-<pid>.ext`: the image encoder picks the format from the extension. Registered
/// with the library's temporary-file registry, so an interrupted run removes it.
fn tmp_path(path: &Path) -> PathBuf {
    let ext = path.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_extension(format!("tmp-{}.{ext}", std::process::id()));
    altgrad::io::register_temporary_file(&tmp);
    tmp
}

pub use altgrad::chart::{ChartSpec, LineChart, Series};

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn range(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-12);
        (lo - pad, hi + pad)
    }
}

/// `v` rounded to 10 significant digits (tick values carry float noise: 9.999999999999998e-5).
fn round_sig(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    format!("{v:.9e}").parse().unwrap_or(v)
}

/// A number as a reader writes it: integers as integers (`10`, not `10.0`), small and large
/// values in short scientific form (`1e-4`, `2.5e-4`, `3e5`), others with at most 3 decimals.
pub fn fmt_number(v: f64) -> String {
    let v = round_sig(v);
    let a = v.abs();
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return format!("{v}");
    }
    if !(1e-2..1e5).contains(&a) {
        let e = a.log10().floor() as i32;
        let m = round_sig(v / 10f64.powi(e));
        let (m, e) = if m.abs() >= 10.0 { (m / 10.0, e + 1) } else { (m, e) };
        let ms = format!("{m:.2}");
        let ms = ms.trim_end_matches('0').trim_end_matches('.');
        return format!("{ms}e{e}");
    }
    if (v - v.round()).abs() < 1e-9 * a.max(1.0) {
        return format!("{}", v.round() as i64);
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Whether `v` is a power of ten (after rounding away float noise).
fn is_pow10(v: f64) -> bool {
    v > 0.0 && (v.log10() - v.log10().round()).abs() < 1e-9
}

/// The label of tick `v`: on a log axis spanning two decades or more only the powers of ten are
/// labelled (`1e-4`, `1e-3`, `0.01`, `1`, `10`), so labels never run together.
pub fn tick_label(v: f64, log: bool, lo: f64, hi: f64) -> String {
    if log && hi / lo >= 100.0 {
        if !is_pow10(round_sig(v)) {
            return String::new();
        }
        let e = round_sig(v).log10().round() as i32;
        return match e {
            -2..=4 => fmt_number(10f64.powi(e)),
            _ => format!("1e{e}"),
        };
    }
    fmt_number(v)
}

/// Width in pixels of the legend column for these labels (13 px font).
fn legend_width(series: &[Series]) -> u32 {
    let chars = series.iter().map(|s| s.label.chars().count()).max().unwrap_or(0) as u32;
    (chars * 8 + 56).clamp(140, 340)
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &LineChart,
    series: &[Series],
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let ok = |x: f64, y: f64| x.is_finite() && y.is_finite() && (!c.log_x || x > 0.0) && (!c.log_y || y > 0.0);
    let pts: Vec<(f64, f64)> =
        series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| ok(*x, *y)).collect();
    let (x0, x1) = range(pts.iter().map(|p| p.0), c.log_x);
    let (y0, y1) = range(pts.iter().map(|p| p.1), c.log_y);
    // Title on top; the legend in its own column to the right, off the data.
    let body = root.titled(c.title, ("sans-serif", 20)).map_err(|e| e.to_string())?;
    let (w, _) = body.dim_in_pixel();
    let (plot_area, legend_area) = body.split_horizontally(w.saturating_sub(legend_width(series)));
    let xf = |v: &f64| tick_label(*v, c.log_x, x0, x1);
    let yf = |v: &f64| tick_label(*v, c.log_y, y0, y1);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(c.x_label)
                .y_desc(c.y_label)
                .x_labels(8)
                .y_labels(10)
                .x_label_formatter(&xf)
                .y_label_formatter(&yf)
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 15))
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, s) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let p: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| ok(*x, *y)).collect();
                chart.draw_series(LineSeries::new(p.clone(), color.stroke_width(2))).map_err(|e| e.to_string())?;
                chart
                    .draw_series(p.into_iter().map(|q| Circle::new(q, 3, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
        }};
    }
    let mut b = ChartBuilder::on(&plot_area);
    b.margin(12).margin_right(20).x_label_area_size(50).y_label_area_size(86);
    match (c.log_x, c.log_y) {
        (true, true) => {
            body!(b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()).map_err(|e| e.to_string())?)
        }
        (true, false) => body!(b.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(|e| e.to_string())?),
        (false, true) => body!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(|e| e.to_string())?),
        (false, false) => body!(b.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| e.to_string())?),
    }
    let font = ("sans-serif", 13).into_font();
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let y = 24 + 22 * i as i32;
        legend_area.draw(&PathElement::new(vec![(4, y), (28, y)], color.stroke_width(2))).map_err(|e| e.to_string())?;
        legend_area.draw(&Circle::new((16, y), 3, color.filled())).map_err(|e| e.to_string())?;
        let style = TextStyle::from(font.clone()).pos(Pos::new(HPos::Left, VPos::Center));
        legend_area.draw(&Text::new(s.label.clone(), (34, y), style)).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Draws `series` as a line chart to `stem.png` and `stem.svg` (900×600).
///
/// Errors: [`Error::BadInput`] naming the file when it cannot be written.
pub fn line_chart(stem: &Path, chart: &LineChart, series: &[Series]) -> Result<()> {
    register_font();
    for ext in ["png", "svg"] {
        let path = stem.with_extension(ext);
        let tmp = tmp_path(&path);
        let res = if ext == "png" {
            draw_lines(BitMapBackend::new(&tmp, (900, 600)).into_drawing_area(), chart, series)
        } else {
            draw_lines(SVGBackend::new(&tmp, (900, 600)).into_drawing_area(), chart, series)
        };
        finish(&tmp, &path, res)?;
    }
    Ok(())
}

fn finish(tmp: &Path, path: &Path, res: std::result::Result<(), String>) -> Result<()> {
    if let Err(e) = res {
        let _ = std::fs::remove_file(tmp);
        altgrad::io::forget_temporary(tmp);
        return Err(plot_err(path, e));
    }
    let renamed = std::fs::rename(tmp, path).map_err(|e| Error::io(path.display().to_string(), e));
    altgrad::io::forget_temporary(tmp);
    if renamed.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    renamed
}

/// A heatmap: `values[row][col]` (`None` = no value, drawn grey), with row/column labels.
#[derive(Clone, Debug)]
pub struct Heatmap<'a> {
    /// Title.
    pub title: &'a str,
    /// Label of the vertical axis (rows), e.g. `layer`.
    pub row_label: &'a str,
    /// Label of the horizontal axis (columns), e.g. `head`.
    pub col_label: &'a str,
    /// Cell values, row-major.
    pub values: Vec<Vec<Option<f64>>>,
    /// Text drawn in each cell (same shape as `values`), e.g. the degree or `exact`.
    pub cell_text: Vec<Vec<String>>,
}

fn draw_heatmap<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    h: &Heatmap,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let rows = h.values.len().max(1);
    let cols = h.values.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let (lo, hi) = h
        .values
        .iter()
        .flatten()
        .flatten()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut chart = ChartBuilder::on(&root)
        .caption(h.title, ("sans-serif", 15))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..cols as f64, rows as f64..0f64)
        .map_err(|e| e.to_string())?;
    // Ticks at cell centres, labelled with the row / column index.
    let centre = |v: &f64| {
        let f = v - v.floor();
        if (f - 0.5).abs() < 1e-6 {
            format!("{}", v.floor() as i64)
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(h.col_label)
        .y_desc(h.row_label)
        .x_labels(2 * cols + 1)
        .y_labels(2 * rows + 1)
        .x_label_formatter(&centre)
        .y_label_formatter(&centre)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    let style = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
    for (r, row) in h.values.iter().enumerate() {
        for (cidx, v) in row.iter().enumerate() {
            let color = match v {
                Some(x) => {
                    let t = (x - lo) / span;
                    // white → dark red
                    RGBColor(255 - (t * 80.0) as u8, 255 - (t * 215.0) as u8, 255 - (t * 215.0) as u8)
                }
                None => RGBColor(200, 200, 200),
            };
            let (x, y) = (cidx as f64, r as f64);
            chart
                .draw_series(std::iter::once(Rectangle::new([(x, y), (x + 1.0, y + 1.0)], color.filled())))
                .map_err(|e| e.to_string())?;
            if let Some(text) = h.cell_text.get(r).and_then(|t| t.get(cidx)) {
                chart
                    .draw_series(std::iter::once(Text::new(text.clone(), (x + 0.5, y + 0.5), style.clone())))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    root.present().map_err(|e| e.to_string())
}

/// Draws a heatmap to `stem.png` and `stem.svg`.
///
/// Errors: [`Error::BadInput`] naming the file when it cannot be written.
pub fn heatmap(stem: &Path, h: &Heatmap) -> Result<()> {
    register_font();
    let rows = h.values.len().max(1) as u32;
    let cols = h.values.iter().map(|r| r.len()).max().unwrap_or(1).max(1) as u32;
    let size = ((140 + 40 * cols).max(760), (120 + 22 * rows).max(320));
    for ext in ["png", "svg"] {
        let path = stem.with_extension(ext);
        let tmp = tmp_path(&path);
        let res = if ext == "png" {
            draw_heatmap(BitMapBackend::new(&tmp, size).into_drawing_area(), h)
        } else {
            draw_heatmap(SVGBackend::new(&tmp, size).into_drawing_area(), h)
        };
        finish(&tmp, &path, res)?;
    }
    Ok(())
}

/// Draws a [`ChartSpec`] into `dir/<stem>.png` and `dir/<stem>.svg` (nothing when it has no
/// points); returns the file names written.
///
/// Errors: as [`line_chart`].
pub fn draw_spec(dir: &Path, spec: &ChartSpec) -> Result<Vec<String>> {
    if spec.is_empty() {
        return Ok(Vec::new());
    }
    line_chart(&dir.join(&spec.stem), &spec.axes(), &spec.series)?;
    Ok(vec![format!("{}.png", spec.stem), format!("{}.svg", spec.stem)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_read_like_numbers() {
        assert_eq!(fmt_number(9.999999999999998e-5), "1e-4");
        assert_eq!(fmt_number(0.00025), "2.5e-4");
        assert_eq!(fmt_number(10.0), "10");
        assert_eq!(fmt_number(120.0), "120");
        assert_eq!(fmt_number(0.5), "0.5");
        assert_eq!(fmt_number(2.25), "2.25");
        assert_eq!(fmt_number(0.0), "0");
        assert_eq!(fmt_number(3e5), "3e5");
        assert_eq!(fmt_number(-1.5e-3), "-1.5e-3");
        // Log axes over decades: only powers of ten, short.
        assert_eq!(tick_label(9.999999999999998e-5, true, 1e-5, 1.0), "1e-4");
        assert_eq!(tick_label(1e-3, true, 1e-5, 1.0), "1e-3");
        assert_eq!(tick_label(0.01, true, 1e-5, 1.0), "0.01");
        assert_eq!(tick_label(1.0, true, 1e-5, 1.0), "1");
        assert_eq!(tick_label(3e-4, true, 1e-5, 1.0), "");
        // A log axis within one decade keeps every label.
        assert_eq!(tick_label(3.0, true, 2.0, 8.0), "3");
    }

    #[test]
    fn draws_png_and_svg() {
        let dir = std::env::temp_dir().join(format!("altgrad-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = vec![Series { label: "a".into(), points: vec![(1.0, 1.0), (10.0, 100.0), (100.0, 1e4)] }];
        let c = LineChart { title: "t", x_label: "n", y_label: "s", log_x: true, log_y: true };
        line_chart(&dir.join("lines"), &c, &s).unwrap();
        let h = Heatmap {
            title: "h",
            row_label: "layer",
            col_label: "head",
            values: vec![vec![Some(2.0), None], vec![Some(4.0), Some(6.0)]],
            cell_text: vec![vec!["2".into(), "exact".into()], vec!["4".into(), "6".into()]],
        };
        heatmap(&dir.join("heat"), &h).unwrap();
        for f in ["lines.png", "lines.svg", "heat.png", "heat.svg"] {
            let len = std::fs::metadata(dir.join(f)).unwrap().len();
            assert!(len > 1000, "{f} is {len} bytes");
        }
        let svg = std::fs::read_to_string(dir.join("heat.svg")).unwrap();
        assert!(svg.contains("exact") && svg.contains("layer"), "labels are drawn");
    }
}
