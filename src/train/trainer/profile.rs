//! `--profile_steps N`: where a step's time goes, averaged over N steps after the warm-up and the
//! capture (the first four steps, or up to the capturing step when that comes later). Wall
//! time between phase boundaries, with the device synchronised at each boundary (tch has no
//! CUDA events), so only profiled steps pay for the synchronisations and the figures include
//! the host's share of each phase.

use std::path::PathBuf;
use std::time::Instant;

use tch::Device;

use crate::Result;
use crate::train::torch_profiler::Recording;

use super::graph::WARMUP_STEPS;

/// The phases of a step.
#[derive(Debug, Clone, Copy)]
pub(super) enum Phase {
    /// Host-side draws, the cached latents' gather and the copies onto the device (and into a
    /// graph's static inputs).
    Data,
    /// Eager: forward and backward.
    ForwardBackward,
    /// Eager: clipping, AdamW.
    Optimizer,
    /// A replay of the captured step (forward, backward and optimizer in one).
    Replay,
    /// Reading the loss and gradient norm on the host, the CSV/TensorBoard logs, the event.
    Log,
}

/// Mean milliseconds per profiled step in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PhaseTimes {
    pub steps: usize,
    /// How many of them were graph replays.
    pub replays: usize,
    pub data_ms: f64,
    pub forward_backward_ms: f64,
    pub optimizer_ms: f64,
    pub replay_ms: f64,
    pub log_ms: f64,
}

impl std::fmt::Display for PhaseTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.data_ms
            + self.forward_backward_ms
            + self.optimizer_ms
            + self.replay_ms
            + self.log_ms;
        write!(
            f,
            "phases over {} steps ({} graph replays), ms per step (device synchronised at each boundary): data {:.3}, forward+backward {:.3}, optimizer {:.3}, graph replay {:.3}, logging {:.3}; total {:.3}",
            self.steps,
            self.replays,
            self.data_ms,
            self.forward_backward_ms,
            self.optimizer_ms,
            self.replay_ms,
            self.log_ms,
            total
        )
    }
}

/// The clock of `--profile_steps`: inactive outside the profiled steps.
pub(super) struct PhaseClock {
    /// Steps to profile, and steps of this run to skip first: the warm-up and the capture.
    limit: usize,
    skip: usize,
    seen: usize,
    cuda: Option<i64>,
    active: bool,
    last: Instant,
    /// The current step's phases, added to `sums` when the step counts.
    current: [f64; 5],
    sums: [f64; 5],
    steps: usize,
    replays: usize,
    /// `--torch_profile`: where the profiled steps' trace goes, the recording while they run,
    /// and the trace once written.
    trace: Option<PathBuf>,
    recording: Option<Recording>,
    written: Option<PathBuf>,
}

impl PhaseClock {
    pub(super) fn new(
        profile_steps: Option<usize>,
        trace: Option<PathBuf>,
        device: Device,
    ) -> Self {
        Self {
            limit: profile_steps.unwrap_or(0),
            skip: WARMUP_STEPS + 1,
            seen: 0,
            cuda: match device {
                Device::Cuda(i) => Some(i as i64),
                _ => None,
            },
            active: false,
            last: Instant::now(),
            current: [0.0; 5],
            sums: [0.0; 5],
            steps: 0,
            replays: 0,
            trace,
            recording: None,
            written: None,
        }
    }

    fn sync(&self) {
        if let Some(i) = self.cuda {
            tch::Cuda::synchronize(i);
        }
    }

    /// The start of a step of this run (and of the torch profiler's recording at the first
    /// profiled step).
    pub(super) fn begin_step(&mut self) -> Result<()> {
        self.seen += 1;
        self.active = self.seen > self.skip && self.steps < self.limit;
        if self.active {
            self.current = [0.0; 5];
            self.sync();
            if let (Some(path), None) = (&self.trace, &self.recording) {
                self.recording = Some(Recording::start(path, self.cuda.is_some())?);
            }
            self.last = Instant::now();
        }
        Ok(())
    }

    /// The end of `phase`, which began at the previous mark.
    pub(super) fn mark(&mut self, phase: Phase) {
        if !self.active {
            return;
        }
        self.sync();
        let now = Instant::now();
        self.current[phase as usize] += (now - self.last).as_secs_f64() * 1e3;
        self.last = now;
    }

    /// The end of the step (after [`Phase::Log`]). A step that captured the graph is not
    /// counted (the capture is a one-off), nor is any step up to it.
    pub(super) fn end_step(&mut self, replayed: bool, captured: bool) -> Result<()> {
        if captured {
            self.sums = [0.0; 5];
            self.steps = 0;
            self.replays = 0;
            // a recording that saw the capture starts again at the next profiled step
            self.recording = None;
        } else if self.active {
            for (s, c) in self.sums.iter_mut().zip(self.current) {
                *s += c;
            }
            self.steps += 1;
            self.replays += usize::from(replayed);
            if self.steps == self.limit {
                self.finish_recording()?;
            }
        }
        self.active = false;
        Ok(())
    }

    /// Write the torch profiler's trace if it is recording (the last profiled step, or the end
    /// of a run that stopped earlier).
    pub(super) fn finish_recording(&mut self) -> Result<()> {
        if let Some(r) = self.recording.take() {
            self.sync();
            self.written = Some(r.finish()?);
        }
        Ok(())
    }

    /// The trace `--torch_profile` wrote, once written.
    pub(super) fn trace_written(&self) -> Option<&std::path::Path> {
        self.written.as_deref()
    }

    /// The means, once a step was profiled.
    pub(super) fn report(&self) -> Option<PhaseTimes> {
        if self.steps == 0 {
            return None;
        }
        let n = self.steps as f64;
        let s = self.sums;
        Some(PhaseTimes {
            steps: self.steps,
            replays: self.replays,
            data_ms: s[Phase::Data as usize] / n,
            forward_backward_ms: s[Phase::ForwardBackward as usize] / n,
            optimizer_ms: s[Phase::Optimizer as usize] / n,
            replay_ms: s[Phase::Replay as usize] / n,
            log_ms: s[Phase::Log as usize] / n,
        })
    }
}
