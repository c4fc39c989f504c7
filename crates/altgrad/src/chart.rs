//! Chart data for reports: what a line chart shows, without drawing it. The library describes
//! its charts (bench time/speed-up/error curves, training loss curves) with these types; the CLI
//! (`altgrad-cli`'s `plot.rs`) draws them as PNG and SVG. No plotting dependency here.

use serde::Serialize;

/// One named series of `(x, y)` points.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, in drawing order. Non-finite or (on log axes) non-positive points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Axes and title of a line chart.
#[derive(Clone, Debug, PartialEq)]
pub struct LineChart<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// X-axis label.
    pub x_label: &'a str,
    /// Y-axis label.
    pub y_label: &'a str,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
}

/// A whole chart to be written as `<stem>.png` and `<stem>.svg`: file stem (relative to the
/// caller's output directory, or a full path stem), axes and series.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChartSpec {
    /// File stem: `<stem>.png`, `<stem>.svg`.
    pub stem: String,
    /// Title above the chart.
    pub title: String,
    /// X-axis label.
    pub x_label: String,
    /// Y-axis label.
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// The series, in legend order.
    pub series: Vec<Series>,
}

impl ChartSpec {
    /// The axes as a [`LineChart`] borrowing this spec.
    pub fn axes(&self) -> LineChart<'_> {
        LineChart {
            title: &self.title,
            x_label: &self.x_label,
            y_label: &self.y_label,
            log_x: self.log_x,
            log_y: self.log_y,
        }
    }
    /// True when no series has a point (nothing to draw).
    pub fn is_empty(&self) -> bool {
        self.series.iter().all(|s| s.points.is_empty())
    }
}
