//! The run's logs under `output_dir/<logging_dir>` (the script's `Path(output_dir, logging_dir)`,
//! default `logs`): our `train_log.csv`, and with `--report_to tensorboard` (the default, as in
//! train_text_to_image_lora.py) TensorBoard events in `<logging_dir>/text2image-fine-tune/`
//! (accelerate's `TensorBoardTracker` writes a run's events to `logging_dir/<project>`, and the
//! script's project is `text2image-fine-tune`). Tags: the script's `train_loss` (each optimiser
//! step) plus `lr`, `grad_norm`, `samples_per_s`, `device_mem_gib`; validation grids as images
//! tagged `validation` (`test` for the final one, the script's `log_validation` phase names), at the
//! optimiser step (the script logs them at the epoch).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{StepLog, TrainConfig};
use crate::image::{GeneratedImage, encode_png};
use crate::train::tensorboard::EventWriter;
use crate::{Error, Result};

/// `--report_to`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum ReportTo {
    /// TensorBoard event files and the CSV log (the script's default).
    #[default]
    Tensorboard,
    /// Every tracker lorafuse has (TensorBoard and the CSV log).
    All,
    /// The CSV log only.
    Csv,
    /// No logs.
    None,
}

/// accelerate's run folder for the script's `accelerator.init_trackers("text2image-fine-tune")`.
pub const TENSORBOARD_RUN: &str = "text2image-fine-tune";

const CSV_HEADER: &str = "step,epoch,loss,lr,grad_norm,samples_per_s,elapsed_s,device_mem,skipped";

/// The open logs of a run.
pub(super) struct RunLog {
    csv: Option<(PathBuf, File)>,
    tb: Option<EventWriter>,
}

impl RunLog {
    /// Open the logs; on resume (at optimiser step `global_step`) the CSV loses the rows an
    /// interrupted run wrote after the checkpoint, and TensorBoard is told to purge them.
    pub(super) fn open(cfg: &TrainConfig, resumed: bool, global_step: i64) -> Result<Self> {
        let dir = cfg.output_dir.join(&cfg.logging_dir);
        let csv = match cfg.report_to {
            ReportTo::None => None,
            _ => Some(open_csv(&dir, resumed, global_step)?),
        };
        let tb = match cfg.report_to {
            ReportTo::Tensorboard | ReportTo::All => Some(EventWriter::create(
                &dir.join(TENSORBOARD_RUN),
                resumed.then_some(global_step + 1),
            )?),
            ReportTo::Csv | ReportTo::None => None,
        };
        Ok(RunLog { csv, tb })
    }

    /// One optimiser step.
    pub(super) fn step(&mut self, l: &StepLog) -> Result<()> {
        if let Some((path, f)) = &mut self.csv {
            writeln!(
                f,
                "{},{},{},{},{},{:.3},{:.3},{},{}",
                l.step,
                l.epoch,
                l.loss,
                l.lr,
                l.grad_norm,
                l.samples_per_s,
                l.elapsed_s,
                l.device_mem.map(|m| m.to_string()).unwrap_or_default(),
                l.skipped
            )
            .map_err(|e| Error::io(&*path, e))?;
        }
        if let Some(tb) = &mut self.tb {
            let mut values = vec![
                ("train_loss", l.loss),
                ("lr", l.lr),
                ("grad_norm", l.grad_norm),
                ("samples_per_s", l.samples_per_s),
            ];
            if let Some(m) = l.device_mem {
                values.push(("device_mem_gib", m as f64 / (1u64 << 30) as f64));
            }
            tb.scalars(l.step, &values)?;
        }
        Ok(())
    }

    /// A validation grid at optimiser step `step` (`final`: the script's `test` phase).
    pub(super) fn validation(
        &mut self,
        grid: &GeneratedImage,
        step: i64,
        last: bool,
    ) -> Result<()> {
        let Some(tb) = &mut self.tb else {
            return Ok(());
        };
        let png = encode_png(grid).map_err(|e| Error::io(tb.path(), e))?;
        let tag = if last { "test" } else { "validation" };
        tb.image(tag, step, grid.width, grid.height, png)
    }
}

/// `train_log.csv` in `dir`, opened for appending (header on a new file); on resume without the
/// rows after `global_step`.
fn open_csv(dir: &Path, resumed: bool, global_step: i64) -> Result<(PathBuf, File)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join("train_log.csv");
    if resumed && path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|s| s.parse::<i64>().ok())
                    .is_none_or(|s| s <= global_step)
            })
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").map_err(|e| Error::io(&path, e))?;
    }
    let mut f = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    if f.metadata().map(|m| m.len() == 0).unwrap_or(true) {
        writeln!(f, "{CSV_HEADER}").map_err(|e| Error::io(&path, e))?;
    }
    Ok((path, f))
}
