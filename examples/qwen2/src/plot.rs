//! The end-of-run loss curve: `loss.svg` next to the saved model, the training loss of every
//! step and the evaluation loss where it was measured.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// The file [`loss_curve`] writes into the save directory.
pub const FILE: &str = "loss.svg";

/// Draws `train` (the loss of steps 1, 2, ...) and `eval` (`(step, loss)` pairs) into the SVG
/// file `path`.
///
/// # Errors
/// [`Error::Data`] without any loss; [`Error::Write`] naming `path` when it cannot be written.
pub fn loss_curve(path: &Path, train: &[f32], eval: &[(usize, f64)]) -> Result<()> {
    if train.is_empty() {
        return Err(Error::Data(format!(
            "{}: no training loss to draw",
            path.display()
        )));
    }
    let finite = |x: f64| x.is_finite().then_some(x);
    let values = train
        .iter()
        .map(|&l| f64::from(l))
        .chain(eval.iter().map(|&(_, l)| l))
        .filter_map(finite);
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    #[allow(clippy::cast_precision_loss)]
    let last = train
        .len()
        .max(eval.iter().map(|&(s, _)| s).max().unwrap_or(0)) as f64;
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..last.max(1.0), (lo - pad)..(hi + pad))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy")
            .draw()?;
        #[allow(clippy::cast_precision_loss)]
        let points = train
            .iter()
            .enumerate()
            .map(|(i, &l)| ((i + 1) as f64, f64::from(l)));
        chart
            .draw_series(LineSeries::new(points, &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        if !eval.is_empty() {
            #[allow(clippy::cast_precision_loss)]
            let points = eval.iter().map(|&(s, l)| (s as f64, l));
            chart
                .draw_series(LineSeries::new(points, &RED))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::write(path, std::io::Error::other(e.to_string())))
}
