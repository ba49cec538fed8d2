//! Plots for BENCHMARKS.md: line charts as SVG text (no fonts or system libraries needed;
//! the viewer renders the labels).

use plotters::coord::combinators::IntoLogRange;
use plotters::prelude::*;

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart and the file it goes to, next to BENCHMARKS.md.
pub struct Plot {
    pub file: String,
    pub caption: String,
    pub svg: String,
}

pub struct Axes<'a> {
    pub x: &'a str,
    pub y: &'a str,
    /// Logarithmic axes, for costs that grow with orders of magnitude of data.
    pub log: bool,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Renders a line chart with markers and a legend.
pub fn line_chart(title: &str, axes: Axes, series: &[Series]) -> anyhow::Result<String> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x_min, x_max) = (x_min.min(x), x_max.max(x));
        (y_min, y_max) = (y_min.min(y), y_max.max(y));
    }
    anyhow::ensure!(x_min <= x_max, "nothing to plot for {title}");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(70);
        if axes.log {
            let x = (x_min * 0.8)..(x_max * 1.25);
            let y = (y_min.max(1e-3) * 0.5)..(y_max * 2.0);
            let mut chart = builder.build_cartesian_2d(x.log_scale(), y.log_scale())?;
            chart
                .configure_mesh()
                .x_desc(axes.x)
                .y_desc(axes.y)
                .draw()?;
            draw_series(&mut chart, series)?;
        } else {
            let pad = ((y_max - y_min) * 0.1).max(1.0);
            let x = x_min..x_max.max(x_min + 1.0);
            let y = (y_min - pad).max(0.0)..(y_max + pad);
            let mut chart = builder.build_cartesian_2d(x, y)?;
            chart
                .configure_mesh()
                .x_desc(axes.x)
                .y_desc(axes.y)
                .draw()?;
            draw_series(&mut chart, series)?;
        }
        root.present()?;
    }
    Ok(svg)
}

fn draw_series<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &[Series],
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, line) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(line.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            line.points
                .iter()
                .map(|&point| Circle::new(point, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_labelled_lines() {
        let series = [
            Series {
                name: "refresh".into(),
                points: vec![(1e5, 100.0), (1e6, 1_000.0), (1e7, 10_000.0)],
            },
            Series {
                name: "incremental".into(),
                points: vec![(1e5, 50.0), (1e6, 52.0), (1e7, 55.0)],
            },
        ];
        let axes = Axes {
            x: "CRM rows",
            y: "ms",
            log: true,
        };
        let svg = line_chart("cost", axes, &series).expect("chart");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for text in ["refresh", "incremental", "CRM rows", "cost"] {
            assert!(svg.contains(text), "{text} missing");
        }
    }
}
