//! Wall-clock time of a model's forward and backward by layer kind (issue 13): where the seconds of
//! `altgrad grad` go. Off by default (one relaxed atomic load per timed call); [`enable`] turns it
//! on for the process, [`take`] reads and clears the totals. The model's layers run one after the
//! other (each parallel inside), so per-kind wall-clock times add up to the pass.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What a timed piece of a model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Token embedding lookup (backward: scatter-add into the table).
    Embedding,
    /// RMSNorm / LayerNorm (the backward includes the recomputed normalized inputs).
    Norm,
    /// q, k, v projections.
    QkvProj,
    /// Rotary position embedding of q and k (backward: its inverse on dq, dk).
    Rope,
    /// Attention proper (every head's kernel, mask, policy bookkeeping).
    Attention,
    /// Attention output projection.
    OProj,
    /// MLP gate and up projections.
    GateUp,
    /// SwiGLU / GELU (the backward includes the recomputed activation).
    Activation,
    /// MLP down projection.
    DownProj,
    /// Residual additions.
    Residual,
    /// LM head and cross-entropy: the loss, its gradient and the head's weight gradient run as one
    /// chunked pass, counted in the forward (as `grad` times it).
    LmHeadLoss,
}

impl Kind {
    /// Every kind, in the order of a forward pass.
    pub const ALL: [Kind; 11] = [
        Kind::Embedding,
        Kind::Norm,
        Kind::QkvProj,
        Kind::Rope,
        Kind::Attention,
        Kind::OProj,
        Kind::GateUp,
        Kind::Activation,
        Kind::DownProj,
        Kind::Residual,
        Kind::LmHeadLoss,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Embedding => "embedding",
            Kind::Norm => "norms",
            Kind::QkvProj => "q/k/v projections",
            Kind::Rope => "RoPE",
            Kind::Attention => "attention",
            Kind::OProj => "o projection",
            Kind::GateUp => "gate/up projections",
            Kind::Activation => "SwiGLU",
            Kind::DownProj => "down projection",
            Kind::Residual => "residual adds",
            Kind::LmHeadLoss => "LM head + cross-entropy",
        }
    }
}

/// Forward or backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The forward pass.
    Forward,
    /// The backward pass.
    Backward,
}

const KINDS: usize = Kind::ALL.len();
static ENABLED: AtomicBool = AtomicBool::new(false);
#[allow(clippy::declare_interior_mutable_const)] // only the array initializer
const ZERO: AtomicU64 = AtomicU64::new(0);
static NANOS: [AtomicU64; 2 * KINDS] = [ZERO; 2 * KINDS];

/// Turns the profiler on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the profiler is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Where `(pass, kind)` adds up: `Kind::ALL` lists the kinds in declaration order, so the
/// discriminant is the index.
fn slot(pass: Pass, kind: Kind) -> usize {
    let k = kind as usize;
    match pass {
        Pass::Forward => k,
        Pass::Backward => KINDS + k,
    }
}

/// Runs `f`, adding its wall-clock time to `(pass, kind)` when the profiler is on.
#[inline]
pub fn timed<R>(pass: Pass, kind: Kind, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    NANOS[slot(pass, kind)].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// One kind's totals in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KindTime {
    /// The kind.
    pub kind: Kind,
    /// Seconds in forward passes.
    pub forward_s: f64,
    /// Seconds in backward passes.
    pub backward_s: f64,
}

/// The totals since the last call (every kind, in [`Kind::ALL`] order), and clears them.
pub fn take() -> Vec<KindTime> {
    Kind::ALL
        .iter()
        .map(|&kind| {
            let f = NANOS[slot(Pass::Forward, kind)].swap(0, Ordering::Relaxed);
            let b = NANOS[slot(Pass::Backward, kind)].swap(0, Ordering::Relaxed);
            KindTime { kind, forward_s: f as f64 * 1e-9, backward_s: b as f64 * 1e-9 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_slot() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
            assert_eq!(slot(Pass::Backward, *k), KINDS + i);
        }
    }
}
