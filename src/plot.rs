//! `kiln jobs plot`: a job's loss and accuracy curves, drawn with `plotters` (axes with
//! ticks, labels and a legend) in DejaVu Sans, embedded so the CLI needs no system fonts.
//! Written as PNG (compressed with the `png` crate) or, for a `.svg` path, as SVG.

use std::sync::Once;

use kiln_proto::kiln::v1::EpochMetrics;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Colours of the series (the train curve blue, the validation curve orange).
pub const TRAIN: RGBColor = RGBColor(31, 119, 180);
/// The validation curve's colour.
pub const VALIDATION: RGBColor = RGBColor(255, 127, 14);

/// The picture's size in pixels: two panels side by side.
pub const SIZE: (u32, u32) = (1200, 520);

const FONT: &str = "sans-serif";

/// Register the embedded font once: plotters finds fonts by family name.
fn font() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        // The font is compiled in and known to parse; a failure would leave text out of
        // the picture, not stop the plot.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// One curve: its legend label, its colour and its points (epoch, value).
struct Series {
    label: &'static str,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

/// A titled chart of `series` over epochs in `area`.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[Series],
    legend: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(title, (FONT, 26))
        .margin(18)
        .x_label_area_size(48)
        .y_label_area_size(72);
    if points.is_empty() {
        area.draw(&Text::new(
            format!("{title}: no data for this job"),
            (80, 200),
            (FONT, 20),
        ))?;
        return Ok(());
    }
    let last = points.iter().map(|p| p.0).fold(1.0, f64::max).max(2.0);
    let (mut lo, mut hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    let pad = ((hi - lo) * 0.05).max(1e-6);
    if (hi - lo).abs() < 1e-12 {
        lo -= 0.5;
        hi += 0.5;
    }
    let mut chart = chart.build_cartesian_2d(1.0..last, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(title.to_lowercase())
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .x_label_formatter(&|e| format!("{}", e.round() as i64))
        .bold_line_style(RGBColor(225, 225, 225))
        .max_light_lines(0)
        .draw()?;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let colour = s.colour;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                colour.stroke_width(3),
            ))?
            .label(s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        if let [only] = s.points.as_slice() {
            chart.draw_series(std::iter::once(Circle::new(*only, 4, colour.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(legend)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Draw both panels of `history` on `root`.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    history: &[EpochMetrics],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    font();
    root.fill(&WHITE)?;
    let collect = |f: &dyn Fn(&EpochMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|m| f(m).map(|v| (f64::from(m.epoch), v)))
            .collect()
    };
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    panel(
        &left,
        "Loss",
        &[
            Series {
                label: "train",
                colour: TRAIN,
                points: collect(&|m| Some(m.train_loss)),
            },
            Series {
                label: "validation",
                colour: VALIDATION,
                points: collect(&|m| m.validation_loss),
            },
        ],
        // Losses fall: the legend goes where the curves are not.
        SeriesLabelPosition::UpperRight,
    )?;
    panel(
        &right,
        "Accuracy",
        &[
            Series {
                label: "train",
                colour: TRAIN,
                points: collect(&|m| m.train_accuracy),
            },
            Series {
                label: "validation",
                colour: VALIDATION,
                points: collect(&|m| m.validation_accuracy),
            },
        ],
        // Accuracies rise.
        SeriesLabelPosition::LowerRight,
    )?;
    root.present()
}

/// The curves of `history` as RGB pixels, row by row ([`SIZE`]).
pub fn pixels(history: &[EpochMetrics]) -> Result<Vec<u8>, String> {
    let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    draw(
        BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(),
        history,
    )
    .map_err(|e| format!("cannot draw the plot: {e}"))?;
    Ok(rgb)
}

/// The curves of `history` as a PNG file's bytes.
pub fn png(history: &[EpochMetrics]) -> Result<Vec<u8>, String> {
    let rgb = pixels(history)?;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder
        .write_header()
        .map_err(|e| format!("cannot encode the PNG: {e}"))?;
    writer
        .write_image_data(&rgb)
        .map_err(|e| format!("cannot encode the PNG: {e}"))?;
    writer
        .finish()
        .map_err(|e| format!("cannot encode the PNG: {e}"))?;
    Ok(out)
}

/// The curves of `history` as an SVG document (text stays text: searchable, scalable).
pub fn svg(history: &[EpochMetrics]) -> Result<String, String> {
    let mut out = String::new();
    draw(
        SVGBackend::with_string(&mut out, SIZE).into_drawing_area(),
        history,
    )
    .map_err(|e| format!("cannot draw the plot: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> Vec<EpochMetrics> {
        (1..=10)
            .map(|e| EpochMetrics {
                epoch: e,
                train_loss: 1.0 / f64::from(e),
                train_accuracy: Some(0.5 + f64::from(e) / 25.0),
                validation_loss: Some(1.1 / f64::from(e)),
                validation_accuracy: Some(0.5 + f64::from(e) / 30.0),
                ..Default::default()
            })
            .collect()
    }

    /// The text elements of an SVG document, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                Some(
                    t.split_once('>')?
                        .1
                        .split_once("</text>")?
                        .0
                        .trim()
                        .to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn a_curve_is_drawn_into_a_valid_png() {
        let rgb = pixels(&history()).unwrap();
        let coloured = |c: RGBColor| rgb.chunks(3).filter(|p| *p == [c.0, c.1, c.2]).count();
        assert!(coloured(TRAIN) > 500 && coloured(VALIDATION) > 500);
        let png = png(&history()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1200);
        assert!(png.len() < 300 * 1024, "a small file: {} bytes", png.len());
    }

    #[test]
    fn the_svg_carries_titles_axes_and_legend_as_text() {
        let svg = svg(&history()).unwrap();
        let texts = texts(&svg);
        for text in [
            "Loss",
            "Accuracy",
            "epoch",
            "loss",
            "accuracy",
            "train",
            "validation",
            "10",
        ] {
            assert!(texts.iter().any(|t| t == text), "{text} in {texts:?}");
        }
    }

    #[test]
    fn a_regression_job_without_accuracy_says_so() {
        let mut h = history();
        for m in &mut h {
            m.train_accuracy = None;
            m.validation_accuracy = None;
        }
        let texts = texts(&svg(&h).unwrap());
        assert!(
            texts.iter().any(|t| t == "Accuracy: no data for this job"),
            "{texts:?}"
        );
    }
}
