//! Polynomial attention, forward and backward in O(n·r·d_v) per head (MATH §3–4; AS23 Lemma 3.4;
//! LSSSZ Lemma C.13, I.1, I.3): the one polynomial kernel, whose forward is also ALTGrad's
//! ([`super::altgrad`] keeps only its Kronecker backward).
//!
//! The model: `a_ij = T_g(s̃_ij)` with the shifted score `s̃_ij = τ q_i·(k_j − k̄_i)` (masked `j ≤ i`
//! when causal; `k̄_i = 0` without centering), `O_i = Σ_j a_ij v_j / Σ_j a_ij`. The kernels form
//! `s̃_ij = τ q_i·(k_j − c) − m_i` with a reference point `c` and the row shift
//! `m_i = τ q_i·(k̄_i − c)` (MATH §3 "Reference point"): no term of size `|c|` enters, so keys that
//! share a large vector lose no precision. With `q' = √τ q`, `k' = √τ (k − c)` and the feature map
//! φ of [`super::features`], `T_g(s − m) = Σ_t T_{g−t}(−m) sᵗ/t!`, so row `i` uses
//! `Ψ_i = w(i) ∘ φ(q'_i)` blockwise with `w_t(i) = T_{g−t}(−m_i)` and `a_ij = Ψ_i·φ(k'_j)`.
//! Values are augmented by a ones column, `V' = [V 1]` (`e = d_v + 1` columns), so the numerator
//! and the denominator come out of one product: `[num_i, den_i] = Σ_j a_ij V'_j`.
//!
//! - Non-causal: `c` is the key mean, so `m_i = 0` and `Ψ = Φ_Q`. Stream key chunks into
//!   `H' = Φ_Kᵀ V'` (`r × e`, i.e. `H` and `z` of MATH §4), then query chunks `Y = Ψ_Q H'`.
//!   Backward: `dY_i = [G_i/den_i, −δ_i/den_i]` (`δ_i = G_i·O_i`), `dΨ = dY H'ᵀ`, `dH' = Ψᵀ dY`,
//!   `dΦ_K = V' dH'ᵀ`, `dV = Φ_K dH'[:, :d_v]`.
//! - Causal: chunks of `C` rows. Inter-chunk through the running state `S' = Σ_{earlier} φ(k'_j) V'_jᵀ`,
//!   intra-chunk directly `a_ij = T_g(s̃_ij)` from one `C×C` product. Backward: a forward scan for
//!   `dQ` (and the intra-chunk terms), a reverse scan with `dS' = Σ_{later i} Ψ_i dY_iᵀ` for `dK`, `dV`.
//! - Row shift (`center`): the gradient flows through `m_i` (`c` is a constant: the function does
//!   not depend on it): `dm_i = Σ_{t<g} −T_{g−t−1}(−m_i) ⟨φ_t(q'_i), dΨ_{i,t}⟩ − Σ_{j in chunk} dA_ij T_{g−1}(s̃_ij)`,
//!   `dq_i += τ (k̄_i − c) dm_i`, and `τ q_i dm_i` flows to the keys through `k̄_i` (every key gets
//!   `1/n` of the sum without a mask; key `j` gets `Σ_{i≥j} τ q_i dm_i/(i+1)` under the causal mask).
//!
//! Every hot loop is a GEMM of a `C×r` feature chunk with an `r×e` state. Working memory is
//! O(C·r + r·d_v) ([`super::cost::poly_state_bytes`]); no `n×r` matrix is ever formed. The causal
//! forward also keeps one `r×e` state per scan block of `16·C` rows ([`PolySaved::block_states`])
//! when that is no more than the block's keys and values (`r·e ≤ 16·C·(d + d_v)`, e.g. d = 16,
//! 32): O(n·r·e/(16·C)) saved values, at most the size of `K` and `V`. Inputs are
//! strided [`Rows`] views of the caller's tensors; outputs are written into [`RowsMut`] views.

use super::features::{taylor, FeatureMap};
use super::view::{Rows, RowsMut};
use super::workspace::{fit, Pooled, Workspace};
use super::{query_head_grads, sum_groups, AttnGrads, AttnGradsMut, AttnOptions, AttnShape, Mask, Qkv};
use crate::linalg::{matmul_small, rm, rm_mut, rm_strided, rm_strided_mut, Scalar};
use crate::simd::dispatch;
use crate::{Error, Result};
use rayon::prelude::*;

/// Default chunk (rows per streamed block; the causal intra-chunk block size).
pub const DEFAULT_CHUNK: usize = 64;

/// Chunks per block of the causal scans ([`Head::scan_block`]): the forward computes each block's
/// row shifts and log-normalizers while its queries are in cache and keeps the state `S'` at
/// every block start ([`PolySaved::block_states`]), from which the backward runs its two scans
/// block by block, last block first, so that a block's rows stay in cache between them (16 chunks
/// of 64 rows of `q, k, v, do, o` and the three gradients at d = 16 are ≈ 0.6 MB, in a 1 MB L2).
pub const SCAN_BLOCK_CHUNKS: usize = 16;

/// Values of [`PolySaved::block_states`] for a causal call of `shape` with chunk `chunk` and
/// feature dimension `r`: `batch · num_kv_heads · (blocks − 1) · r · (head_dim_v + 1)`, `blocks =
/// ⌈seq_len / (16·C)⌉`, `C = min(chunk, seq_len)`; 0 when the forward does not keep them (one
/// block, or `r·(d_v + 1) > 16·C·(d + d_v)`: states larger than the block's keys and values).
pub fn block_states_len(shape: &AttnShape, chunk: usize, r: usize) -> usize {
    let n = shape.seq_len.max(1);
    let c = chunk.max(1).min(n);
    let e = shape.head_dim_v + 1;
    if r.saturating_mul(e) > SCAN_BLOCK_CHUNKS * c * (shape.head_dim + shape.head_dim_v) {
        return 0;
    }
    shape.kv_heads() * (n.div_ceil(c * SCAN_BLOCK_CHUNKS) - 1) * r * e
}

/// Options of polynomial attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolyOptions {
    /// Degree `g` of the truncated exponential `T_g`; must be even and ≥ 2 (MATH §3 "Positivity").
    pub degree: usize,
    /// Row shift `m_i = τ q_i·k̄_i` (MATH §3); `false` is the CLI's `--no-center` (`m_i = 0`).
    pub center: bool,
    /// Rows per chunk `C` (≥ 1): the streaming block, and under the causal mask the block whose
    /// interactions are computed directly. Memory is O(C·r); causal FLOPs grow by `O(n·C·d)`.
    pub chunk: usize,
}

impl Default for PolyOptions {
    /// Degree 2, centered, chunk [`DEFAULT_CHUNK`].
    fn default() -> Self {
        PolyOptions { degree: 2, center: true, chunk: DEFAULT_CHUNK }
    }
}

impl PolyOptions {
    /// Degree `g`, centered, chunk [`DEFAULT_CHUNK`].
    pub fn new(degree: usize) -> Self {
        PolyOptions { degree, ..Default::default() }
    }

    /// Errors: [`Error::BadInput`] for an odd or zero degree ([`super::bound::validate_degree`]) or
    /// a zero chunk.
    pub fn validate(&self) -> Result<()> {
        super::bound::validate_degree(self.degree)?;
        if self.chunk == 0 {
            return Err(Error::bad("chunk", "must be at least 1"));
        }
        Ok(())
    }
}

/// What a polynomial forward keeps besides its tensors `o`, `lse`, `den` (which
/// [`forward_poly_into`] writes into caller-owned buffers): the key/value states, the reference
/// points, the initial and final states, and the shape and options of the call. With those
/// tensors it is all [`backward_poly_into`] and [`super::backward_altgrad_into`] need.
#[derive(Clone, Debug)]
pub struct PolySaved<T> {
    /// Non-causal: every key/value head's `H' = Φ_Kᵀ [V 1]`, `[batch, num_kv_heads, r,
    /// head_dim_v + 1]` (reused by the backward); empty under the causal mask (the backward
    /// rescans).
    pub kv_state: Vec<T>,
    /// The reference point `c` of every key/value head, `[batch, num_kv_heads, head_dim]` (MATH §3
    /// "Reference point"; zeros without centering).
    pub reference: Vec<T>,
    /// Causal: the state the call started from ([`forward_poly_state`]'s `initial`; the backward
    /// rescans from it). `None` for a sequence's first piece and without a mask.
    pub initial: Option<PolyState<T>>,
    /// Causal: the state after this piece, to continue the sequence ([`forward_poly_state`]);
    /// `None` without a mask.
    pub final_state: Option<PolyState<T>>,
    /// Causal: `S'` at the start of every scan block after the first,
    /// `[batch, num_kv_heads, blocks − 1, r, head_dim_v + 1]` with `blocks = ⌈seq_len / (16·C)⌉`,
    /// `C = min(chunk, seq_len)` ([`block_states_len`]), from which the backward scans block by
    /// block (fla's per-chunk states `h`, one per block). Kept by the causal forward when
    /// `r·(d_v + 1) ≤ 16·C·(d + d_v)` (no more than the block's keys and values); empty without a
    /// mask, for one block, or when not kept: the backward then scans the whole sequence twice,
    /// which gives the same gradients, more slowly at long `seq_len`. Like `o` and `den`, they
    /// must come from the forward of the same inputs (the backward trusts them).
    pub block_states: Vec<T>,
    /// The shape of the inputs.
    pub shape: AttnShape,
    /// The options of the call.
    pub opts: AttnOptions,
    /// The polynomial options of the call.
    pub popts: PolyOptions,
}

/// Output of [`forward_poly`] / [`forward_poly_state`]: the tensors and what the backward needs
/// ([`PolySaved`], whose fields read through this type: `out.final_state`, `out.popts`, …).
#[derive(Clone, Debug)]
pub struct PolyOutput<T> {
    /// Attention output `o [batch, seq_len, num_heads, head_dim_v]`.
    pub o: Vec<T>,
    /// `lse_i = τ q_i·k̄_i + ln den_i` per head and row, `[batch, num_heads, seq_len]`: the
    /// polynomial model's approximation of the exact log-sum-exp `ln Σ_j exp(s_ij)` (`k̄_i = 0`
    /// without centering).
    pub lse: Vec<T>,
    /// Denominators `den_i = Σ_j T_g(s̃_ij) > 0`, `[batch, num_heads, seq_len]`.
    pub den: Vec<T>,
    /// States, reference points, shape and options.
    pub saved: PolySaved<T>,
}

impl<T> std::ops::Deref for PolyOutput<T> {
    type Target = PolySaved<T>;
    fn deref(&self) -> &PolySaved<T> {
        &self.saved
    }
}

impl<T> std::ops::DerefMut for PolyOutput<T> {
    fn deref_mut(&mut self) -> &mut PolySaved<T> {
        &mut self.saved
    }
}

/// Caller-owned output buffers of [`forward_poly_into`] (overwritten): `o [batch, seq_len,
/// num_heads, head_dim_v]`, `lse` and `den` `[batch, num_heads, seq_len]`.
#[derive(Debug)]
pub struct PolyBuffers<'a, T> {
    /// Attention output.
    pub o: &'a mut [T],
    /// Log-sum-exps.
    pub lse: &'a mut [T],
    /// Denominators.
    pub den: &'a mut [T],
}

/// The state of the causal polynomial scan after the keys of one piece of a sequence (MATH §4
/// "Causal"; fla's `initial_state` / `final_state`), from which another call continues the
/// sequence ([`forward_poly_state`]). Flat row-major buffers, one block per (sequence, key/value
/// head), with `r = C(head_dim + g, g)` ([`super::features::feature_dim`]):
///
/// - `s [batch, num_kv_heads, r, head_dim_v + 1]`: `S' = Σ_j φ(√τ (k_j − c)) [v_j, 1]ᵀ` over every
///   key so far (the numerator and denominator state, relative to the reference point `c`);
/// - `key_sum [batch, num_kv_heads, head_dim]`: `Σ_j k_j` (for the prefix means `k̄_i` of the row
///   shift);
/// - `reference [batch, num_kv_heads, head_dim]`: `c` (MATH §3 "Reference point"; zeros without
///   centering), a constant: no gradient flows to it, as the function does not depend on it;
/// - `count`: keys so far in every sequence, so the next piece's row `i` is position `count + i`.
///
/// A state belongs to one degree, scale, value width and centering: continue it with the same
/// [`PolyOptions`] and [`AttnOptions`].
#[derive(Clone, Debug, PartialEq)]
pub struct PolyState<T> {
    /// `S'`, `[batch, num_kv_heads, r, head_dim_v + 1]`.
    pub s: Vec<T>,
    /// `Σ_j k_j`, `[batch, num_kv_heads, head_dim]`.
    pub key_sum: Vec<T>,
    /// `c`, `[batch, num_kv_heads, head_dim]`.
    pub reference: Vec<T>,
    /// Keys so far (per sequence).
    pub count: usize,
}

/// The gradient of a loss with respect to a [`PolyState`] (fla's `dht` / `dh0`): `ds` in the
/// layout of [`PolyState::s`], `dkey_sum` in that of [`PolyState::key_sum`] (the reference point
/// and the count have none).
#[derive(Clone, Debug, PartialEq)]
pub struct PolyStateGrad<T> {
    /// `dL/dS'`, `[batch, num_kv_heads, r, head_dim_v + 1]`.
    pub ds: Vec<T>,
    /// `dL/d(Σ_j k_j)`, `[batch, num_kv_heads, head_dim]`.
    pub dkey_sum: Vec<T>,
}

impl<T> PolyOutput<T> {
    /// The output and `lse` as an [`super::AttnOutput`] (drops `den` and the states).
    pub fn into_attn_output(self) -> super::AttnOutput<T> {
        super::AttnOutput { o: self.o, lse: self.lse, shape: self.saved.shape, opts: self.saved.opts }
    }
}

/// One key/value head as the polynomial kernels see it (MATH §3 "Reference point"): the raw keys
/// and values (strided views of the caller's tensors), the reference point `c [d]` (zeros without
/// centering) and the key means relative to it, `kbar` = `k̄_i − c`: `[d]` without a mask (zero
/// when `c` is the key mean), `[n, d]` under the causal mask (prefix means, counting the `offset`
/// keys of an initial state). Built by [`kv_head`].
#[derive(Clone, Debug)]
pub struct KvHead<'a, T> {
    /// Keys `[n, d]`.
    pub k: Rows<'a, T>,
    /// Values `[n, d_v]`.
    pub v: Rows<'a, T>,
    /// Reference point `c [d]`.
    pub c: Vec<T>,
    /// `k̄_i − c`: `[d]` (non-causal) or `[n, d]` (causal).
    pub kbar: Vec<T>,
    /// Keys before these (an initial state's count): row `i` is position `offset + i`.
    pub offset: usize,
}

/// Builds the [`KvHead`] of keys `k [n, d]` and values `v`: with `center`, the reference point is
/// `reference` if given, else the mean of the first `min(chunk, n)` keys (causal: no look-ahead
/// past the first chunk) or of all keys (non-causal, where `k̄ − c` is then exactly 0, also when
/// `reference` is that mean). Causal
/// prefix means count an initial state: `k̄_i = (key_sum + Σ_{j≤i} k_j)/(offset + i + 1)` with
/// `key_sum [d]` (zeros if `None`). Sums in f64. Without `center`, `c = k̄ − c = 0`. The causal
/// prefix means are written into `buf` (grown as needed, contents ignored; `Vec::new()` for a
/// fresh one): a buffer recycled from an earlier call (`kv_heads`' workspace) does not take fresh
/// pages, and their page faults, on every call.
#[allow(clippy::too_many_arguments)]
pub fn kv_head<'a, T: Scalar>(
    k: Rows<'a, T>,
    v: Rows<'a, T>,
    causal: bool,
    center: bool,
    chunk: usize,
    reference: Option<&[T]>,
    key_sum: Option<&[T]>,
    offset: usize,
    mut buf: Vec<T>,
) -> KvHead<'a, T> {
    let (n, d) = (k.rows(), k.cols());
    let zeros = vec![T::zero(); d];
    if !center {
        let kbar = if causal {
            buf.clear();
            buf.resize(n * d, T::zero());
            buf
        } else {
            zeros.clone()
        };
        return KvHead { k, v, c: zeros, kbar, offset };
    }
    let mean = |rows: usize| -> Vec<f64> {
        let mut acc = vec![0.0f64; d];
        add_rows_f64(k.sub(0, rows), &mut acc);
        acc.iter().map(|a| a / rows.max(1) as f64).collect()
    };
    // the mean of the first chunk (causal) or of every key (non-causal, reused below)
    let first = mean(if causal { chunk.clamp(1, n.max(1)).min(n) } else { n });
    let default: Vec<T> = first.iter().map(|a| T::from_f64(*a)).collect();
    let c: Vec<T> = reference.map_or_else(|| default.clone(), <[T]>::to_vec);
    let cf: Vec<f64> = c.iter().map(|x| x.as_f64()).collect();
    let kbar = if causal {
        // Σ_{j<offset} (k_j − c) = key_sum − offset·c, then the local keys relative to c
        let mut acc: Vec<f64> = match key_sum {
            Some(ks) => ks.iter().zip(&cf).map(|(s, cv)| s.as_f64() - offset as f64 * cv).collect(),
            None => vec![0.0; d],
        };
        // every value is written below: grow without clearing
        let mut out = buf;
        fit(&mut out, n * d);
        out.truncate(n * d);
        dispatch(
            #[inline(always)]
            || {
                for i in 0..n {
                    k.prefetch_ahead(i);
                    let inv = 1.0 / (offset + i + 1) as f64;
                    let row = k.row(i).iter().zip(&cf);
                    for ((a, (x, cv)), o) in acc.iter_mut().zip(row).zip(&mut out[i * d..(i + 1) * d]) {
                        *a += x.as_f64() - cv;
                        *o = T::from_f64(*a * inv);
                    }
                }
            },
        );
        out
    } else if c != default {
        // non-causal: `first` is the mean of all n keys (one pass over them, not two)
        first.iter().zip(&cf).map(|(a, b)| T::from_f64(a - b)).collect()
    } else {
        zeros // c is the key mean: k̄ − c = 0 by definition (no rounding residue)
    };
    KvHead { k, v, c, kbar, offset }
}

impl<T: Scalar> KvHead<'_, T> {
    /// The reference point to subtract from keys, `None` when it is zero (no centering).
    pub(crate) fn shift(&self) -> Option<&[T]> {
        if self.c.iter().all(|x| *x == T::zero()) {
            None
        } else {
            Some(&self.c)
        }
    }
}

/// One query head in a backward (views of the caller's tensors): `q [n, d]`, its row shifts
/// `m [n]` ([`row_shifts`]), the forward's `o [n, dv]` and `den [n]`, and `g = dL/do [n, dv]`.
#[derive(Clone, Copy, Debug)]
pub struct QueryBack<'a, T> {
    /// Queries.
    pub q: Rows<'a, T>,
    /// Row shifts `m_i = τ q_i·(k̄_i − c)` (zeros without centering).
    pub m: &'a [T],
    /// The forward's output.
    pub o: Rows<'a, T>,
    /// The forward's denominators.
    pub den: &'a [T],
    /// `dL/do`.
    pub g: Rows<'a, T>,
}

/// What [`Head::fused_setup`] prepares for the fused degree-2 passes (backward and forward): the feature
/// coefficients `a [r]`, `Ms = diag(a) M` (`[r, e]`, [`Head::fused_load`]), the degree-2 group
/// starts, and scratch for the kernels (`3·d·16` values, grown to `2·16·rows` by the state
/// products).
#[derive(Debug)]
pub(crate) struct Fused<'a> {
    a: Vec<f32>,
    ms: Vec<f32>,
    starts: &'a [usize],
    scratch: Vec<f32>,
    /// Whether the state products apply too ([`crate::simd::fused::features_state`]: `d = 16`).
    state: bool,
}

/// `x` as f32 values, for the fused paths (which [`Head::fused_setup`] enables only when `T` is f32).
fn f32s<T: Scalar>(x: &[T]) -> &[f32] {
    crate::linalg::as_f32(x).expect("fused_setup checked that T is f32")
}

/// `x` as mutable f32 values (see [`f32s`]).
fn f32s_mut<T: Scalar>(x: &mut [T]) -> &mut [f32] {
    crate::linalg::as_f32_mut(x).expect("fused_setup checked that T is f32")
}

/// One head of a polynomial-attention call: the feature map and sizes (the sequence length comes
/// from the views).
#[derive(Clone, Copy, Debug)]
pub struct Head<'a, T> {
    /// Feature map of degree `g` on `d` coordinates.
    pub fm: &'a FeatureMap<T>,
    /// Value width `d_v`.
    pub dv: usize,
    /// Score scale τ.
    pub scale: f64,
    /// Row shift on (the `m` arguments are then used; otherwise they must be zeros).
    pub center: bool,
    /// Chunk rows `C ≥ 1`.
    pub chunk: usize,
    /// Where per-chunk scratch comes from (and returns to).
    pub ws: &'a Workspace<T>,
}

/// Per-chunk scratch buffers, sized for each use ([`Head::bufs`]). Features are feature-major: `phit [r, rows]`
/// (column `i` = `φ` of the chunk's row `i`), inputs `xt`, `xtk [d, rows]` (queries, keys);
/// value chunks are row-major, `yt`, `vt [e, rows]` value-side chunks transposed (`Yᵀ`, `dYᵀ`,
/// `V'ᵀ`, so that products over the features keep the chunk's rows in the vector lanes); `s`, `da`
/// are `C × C` tiles.
#[derive(Debug, Default)]
pub(crate) struct Bufs<T> {
    pub(crate) xt: Vec<T>,
    pub(crate) xtk: Vec<T>,
    pub(crate) dxt: Vec<T>,
    pub(crate) phit: Vec<T>,
    pub(crate) psit: Vec<T>,
    pub(crate) dphit: Vec<T>,
    pub(crate) w: Vec<T>,
    pub(crate) acc: Vec<T>,
    pub(crate) ve: Vec<T>,
    pub(crate) y: Vec<T>,
    pub(crate) yt: Vec<T>,
    pub(crate) vt: Vec<T>,
    pub(crate) s: Vec<T>,
    pub(crate) da: Vec<T>,
    pub(crate) tmp: Vec<T>,
    pub(crate) tmp2: Vec<T>,
}

impl<T: Scalar> Head<'_, T> {
    pub(crate) fn d(&self) -> usize {
        self.fm.input_dim()
    }
    pub(crate) fn r(&self) -> usize {
        self.fm.dim()
    }
    pub(crate) fn e(&self) -> usize {
        self.dv + 1
    }
    /// Chunk rows for a sequence of `n`: `min(C, n)` (at least 1).
    pub(crate) fn c(&self, n: usize) -> usize {
        self.chunk.max(1).min(n.max(1))
    }
    fn g(&self) -> usize {
        self.fm.degree()
    }
    fn tau(&self) -> T {
        T::from_f64(self.scale)
    }
    fn sqrt_tau(&self) -> T {
        T::from_f64(self.scale.sqrt())
    }

    /// Values of scratch a head of `n` rows uses ([`bufs`](Self::bufs)): `C·(3d + 3r + g + 4e + 2C + 4)`
    /// (`2r` without centering), `C = min(chunk, n)`.
    pub fn scratch_len(&self, n: usize) -> usize {
        let (c, d, r, e, g) = (self.c(n), self.d(), self.r(), self.e(), self.g());
        let psi = if self.center { r } else { 0 };
        c * (3 * d + 2 * r + psi + (g + 1) + 1 + 4 * e + 2 * c + 2)
    }

    /// Scratch for sequences of `n` rows, from the workspace.
    pub(crate) fn bufs(&self, n: usize) -> Pooled<'_, Bufs<T>> {
        Pooled::get(Some(&self.ws.poly), |b: &mut Bufs<T>| self.fit_bufs(b, n))
    }

    /// Grows `b` for sequences of `n` rows.
    pub(crate) fn fit_bufs(&self, b: &mut Bufs<T>, n: usize) {
        let (c, d, r, e, g) = (self.c(n), self.d(), self.r(), self.e(), self.g());
        {
            for (v, len) in [
                (&mut b.xt, c * d),
                (&mut b.xtk, c * d),
                (&mut b.dxt, c * d),
                (&mut b.phit, c * r),
                (&mut b.psit, if self.center { c * r } else { 0 }),
                (&mut b.dphit, c * r),
                (&mut b.w, c * (g + 1)),
                (&mut b.acc, c),
                (&mut b.ve, c * e),
                (&mut b.y, c * e),
                (&mut b.yt, c * e),
                (&mut b.vt, c * e),
                (&mut b.s, c * c),
                (&mut b.da, c * c),
                (&mut b.tmp, c),
                (&mut b.tmp2, c),
            ] {
                fit(v, len);
            }
        }
    }

    /// Rows per block of the causal scans of a sequence of `n`: [`SCAN_BLOCK_CHUNKS`] chunks.
    pub(crate) fn scan_block(&self, n: usize) -> usize {
        self.c(n) * SCAN_BLOCK_CHUNKS
    }

    /// Chunk starts and lengths `(0, C), (C, C), …` covering `0..n`.
    pub(crate) fn chunks(&self, n: usize) -> impl DoubleEndedIterator<Item = (usize, usize)> {
        let c = self.c(n);
        (0..n.div_ceil(c)).map(move |k| (k * c, c.min(n - k * c)))
    }

    /// `xt [d, rows] = √τ (x_i − c)ᵀ` for the rows of `x` (no shift when `c` is `None`).
    pub(crate) fn transpose_scaled(&self, x: Rows<'_, T>, c: Option<&[T]>, xt: &mut [T]) {
        transpose(x, c, self.sqrt_tau(), xt);
    }
    /// `xt = √τ (x − c)ᵀ` (`[d, rows]`), `phit = φ(xt)` (`[r, rows]`) for the rows of `x`.
    pub(crate) fn features(&self, x: Rows<'_, T>, c: Option<&[T]>, xt: &mut [T], phit: &mut [T]) {
        let (d, r, rows) = (self.d(), self.r(), x.rows());
        self.transpose_scaled(x, c, xt);
        self.fm.apply_cols(&xt[..rows * d], rows, &mut phit[..rows * r]);
    }

    /// Key features of `kv`'s rows `i0..i0 + rows`: `xt = √τ (k − c)ᵀ`, `phit = φ(xt)`.
    pub(crate) fn key_features(&self, kv: &KvHead<'_, T>, i0: usize, rows: usize, b: &mut Bufs<T>) {
        self.features(kv.k.sub(i0, rows), kv.shift(), &mut b.xt, &mut b.phit);
    }

    /// Query features: `phit = φ(√τ q)ᵀ`; with `weighted`, `w[t, i] = T_{g−t}(−m_i)` and
    /// `psit = w ∘ phit` blockwise (`Ψᵀ`). Unweighted (`m = 0`), `Ψ = Φ_Q` is `phit` itself.
    pub(crate) fn query_features(&self, q: Rows<'_, T>, m: &[T], weighted: bool, b: &mut Bufs<T>) {
        let rows = q.rows();
        self.features(q, None, &mut b.xt, &mut b.phit);
        if !weighted {
            return;
        }
        let g = self.g();
        self.degree_weights(&m[..rows], &mut b.w);
        dispatch(
            #[inline(always)]
            || {
                for t in 0..=g {
                    let w = &b.w[t * rows..(t + 1) * rows];
                    let blk = self.fm.block(t);
                    let phi = &b.phit[blk.start * rows..blk.end * rows];
                    let psi = &mut b.psit[blk.start * rows..blk.end * rows];
                    for (pr, fr) in psi.chunks_exact_mut(rows).zip(phi.chunks_exact(rows)) {
                        for ((p, f), wi) in pr.iter_mut().zip(fr).zip(w) {
                            *p = *f * *wi;
                        }
                    }
                }
            },
        );
    }

    /// `w[t, i] = T_{g−t}(−m_i)` for the rows of `m` (`w [g + 1, rows]`).
    fn degree_weights(&self, m: &[T], w: &mut [T]) {
        let (g, rows) = (self.g(), m.len());
        for t in 0..=g {
            for (wi, mi) in w[t * rows..(t + 1) * rows].iter_mut().zip(m) {
                *wi = taylor(g - t, -*mi);
            }
        }
    }

    /// `Ψᵀ` of the chunk (`[r, rows]`): `psit` when weighted, else `phit`.
    pub(crate) fn psi<'b>(&self, b: &'b Bufs<T>, rows: usize, weighted: bool) -> &'b [T] {
        let len = self.r() * rows;
        if weighted {
            &b.psit[..len]
        } else {
            &b.phit[..len]
        }
    }

    /// `Ψᵀ` of the chunk, mutable (see [`psi`](Self::psi)).
    pub(crate) fn psi_mut<'b>(&self, b: &'b mut Bufs<T>, rows: usize, weighted: bool) -> &'b mut [T] {
        let len = self.r() * rows;
        if weighted {
            &mut b.psit[..len]
        } else {
            &mut b.phit[..len]
        }
    }

    /// `ve = [v, 1]` for the rows of `v`.
    pub(crate) fn aug_v(&self, v: Rows<'_, T>, ve: &mut [T]) {
        let (dv, e) = (self.dv, self.e());
        for (i, dst) in ve[..v.rows() * e].chunks_exact_mut(e).enumerate() {
            dst[..dv].copy_from_slice(v.row(i));
            dst[dv] = T::one();
        }
    }

    /// `vt = V'ᵀ [e, rows]` for the rows of `v`: the values transposed and a row of ones.
    pub(crate) fn values_t(&self, v: Rows<'_, T>, vt: &mut [T]) {
        let (e, rows) = (self.e(), v.rows());
        transpose(v, None, T::one(), &mut vt[..e * rows]);
        vt[self.dv * rows..e * rows].fill(T::one());
    }

    /// `dy_i = [G_i/den_i, −(G_i·O_i)/den_i]` for the rows of `g`.
    fn dy(&self, g: Rows<'_, T>, o: Rows<'_, T>, den: &[T], dy: &mut [T]) {
        let (dv, e) = (self.dv, self.e());
        // G_i·O_i in f64 partial sums (an in-order T sum was a chain of dv additions per row)
        dispatch(
            #[inline(always)]
            || {
                for i in 0..g.rows() {
                    let (gi, oi) = (g.row(i), o.row(i));
                    let inv = T::one() / den[i];
                    let delta = T::from_f64(super::bound::dot_f64(gi, oi));
                    let row = &mut dy[i * e..(i + 1) * e];
                    for (x, gv) in row[..dv].iter_mut().zip(gi) {
                        *x = *gv * inv;
                    }
                    row[dv] = -delta * inv;
                }
            },
        );
    }

    /// `o_i = y_i[..dv] / y_i[dv]`, `den_i = y_i[dv]` for the rows of `o`.
    fn finish(&self, y: &[T], o: &mut RowsMut<'_, T>, den: &mut [T]) {
        let (dv, e) = (self.dv, self.e());
        for i in 0..o.rows() {
            let dn = y[i * e + dv];
            debug_assert!(
                dn > T::zero(),
                "polynomial attention denominator {dn:?} ≤ 0 (even degree keeps it positive)"
            );
            den[i] = dn;
            let inv = T::one() / dn;
            for (x, yv) in o.row_mut(i).iter_mut().zip(&y[i * e..i * e + dv]) {
                *x = *yv * inv;
            }
        }
    }

    /// `o_i = y_i[..dv] / y_i[dv]`, `den_i = y_i[dv]` for the rows of `o`, from `yt = Yᵀ [e, rows]`
    /// (`inv`: scratch of `rows` values, gets `1/den_i`).
    /// Panics if `o` is not `rows × dv`.
    fn finish_t(&self, yt: &[T], rows: usize, inv: &mut [T], o: &mut RowsMut<'_, T>, den: &mut [T]) {
        let dv = self.dv;
        assert!(o.rows() == rows && o.cols() == dv, "polynomial forward: output chunk is not rows × head_dim_v");
        for ((dn, iv), y) in den[..rows].iter_mut().zip(inv[..rows].iter_mut()).zip(&yt[dv * rows..(dv + 1) * rows]) {
            debug_assert!(*y > T::zero(), "polynomial attention denominator {y:?} ≤ 0 (even degree keeps it positive)");
            *dn = *y;
            *iv = T::one() / *y;
        }
        if let (Some(src), Some(w)) = (crate::linalg::as_f32(&yt[..dv * rows]), crate::linalg::as_f32(&inv[..rows])) {
            let (ptr, stride) = o.raw_mut();
            // SAFETY: T is f32; raw_mut's pointer is valid for rows × dv elements `stride` apart
            // while o is borrowed, and the scratch yt does not overlap the caller's output.
            let done = unsafe {
                crate::simd::transpose::store_transposed(
                    crate::simd::Level::detect(),
                    src,
                    rows,
                    rows,
                    dv,
                    w,
                    ptr as *mut f32,
                    stride,
                )
            };
            if done {
                return;
            }
        }
        for (i, iv) in inv[..rows].iter().enumerate() {
            for (c, x) in o.row_mut(i).iter_mut().enumerate() {
                *x = yt[c * rows + i] * *iv;
            }
        }
    }

    /// `dS' += Ψᵀ dY` for a chunk's `psi [r, rows]`, `dy [rows, e]` and `dyt = dYᵀ [e, rows]`:
    /// the dv value columns as a product (dv in the lanes), the denominator's as dot products with
    /// `dyt`'s last row.
    fn add_dstate(&self, psi: &[T], dy: &[T], dyt: &[T], dstate: &mut [T]) {
        let (r, e, dv) = (self.r(), self.e(), self.dv);
        let rows = dy.len() / e;
        let dy_v = rm_strided(dy, rows, dv, e);
        matmul_small(rm_strided_mut(dstate, r, dv, e), true, rm(psi, r, rows), dy_v, T::one());
        add_row_dots(psi, rows, Some(&dyt[dv * rows..e * rows]), &mut dstate[dv..], e);
    }

    /// Adds `√τ dxt` (`[d, rows]`) to the rows of `dx`.
    /// Panics if `dx` is not `d` wide.
    fn add_transposed(&self, dxt: &[T], dx: &mut RowsMut<'_, T>) {
        let rows = dx.rows();
        assert_eq!(dx.cols(), self.d(), "polynomial backward: gradient rows are not head_dim wide");
        let st = self.sqrt_tau();
        if let Some(src) = crate::linalg::as_f32(dxt) {
            // f32: 8×8 register transposes (bit-identical to the loop below; st is an f32 already)
            let (ptr, stride) = dx.raw_mut();
            let (level, st) = (crate::simd::Level::detect(), st.as_f64() as f32);
            // SAFETY: T is f32; raw_mut's pointer is valid for rows × d elements `stride` apart
            // while dx is borrowed, and the scratch dxt does not overlap the caller's output.
            let done = unsafe {
                crate::simd::transpose::add_transposed(level, src, rows, rows, self.d(), st, ptr as *mut f32, stride)
            };
            if done {
                return;
            }
        }
        dispatch(
            #[inline(always)]
            || {
                for i in 0..rows {
                    for (c, x) in dx.row_mut(i).iter_mut().enumerate() {
                        *x += dxt[c * rows + i] * st;
                    }
                }
            },
        );
    }

    /// Query-side chain rule once `b.dphit = dΨᵀ` is known for `rows` rows: adds the inter-chunk
    /// `dm_i` (when centering), turns `dΨ` into `dφ = w ∘ dΨ`, and adds `√τ J_φᵀ dφ_i` to `dq_i`.
    fn query_vjp(&self, rows: usize, weighted: bool, b: &mut Bufs<T>, dm: &mut [T], dq: &mut RowsMut<'_, T>) {
        if self.center {
            dispatch(
                #[inline(always)]
                || self.unweigh(rows, weighted, b, dm),
            );
        }
        self.feature_vjp(b, dq);
    }

    /// `dm_i −= Σ_{t<g} w_{t+1}(i) ⟨φ_t(q'_i), dΨ_{i,t}⟩` (since `∂w_t/∂m = −T_{g−t−1}(−m) = −w_{t+1}`;
    /// `w = 1` unweighted), then `dΨ ← w ∘ dΨ` blockwise (which is `dφ`).
    #[inline(always)]
    fn unweigh(&self, rows: usize, weighted: bool, b: &mut Bufs<T>, dm: &mut [T]) {
        let g = self.g();
        for t in 0..=g {
            let blk = self.fm.block(t);
            let phi = &b.phit[blk.start * rows..blk.end * rows];
            let dpsi = &mut b.dphit[blk.start * rows..blk.end * rows];
            if t < g {
                let acc = &mut b.acc[..rows];
                acc.fill(T::zero());
                for (fr, dr) in phi.chunks_exact(rows).zip(dpsi.chunks_exact(rows)) {
                    for ((a, f), dp) in acc.iter_mut().zip(fr).zip(dr) {
                        *a += *f * *dp;
                    }
                }
                if weighted {
                    let wn = &b.w[(t + 1) * rows..(t + 2) * rows];
                    for ((x, a), wv) in dm[..rows].iter_mut().zip(acc.iter()).zip(wn) {
                        *x -= *wv * *a;
                    }
                } else {
                    for (x, a) in dm[..rows].iter_mut().zip(acc.iter()) {
                        *x -= *a;
                    }
                }
            }
            if weighted {
                let w = &b.w[t * rows..(t + 1) * rows];
                for dr in dpsi.chunks_exact_mut(rows) {
                    for (x, wi) in dr.iter_mut().zip(w) {
                        *x *= *wi;
                    }
                }
            }
        }
    }

    /// The fused degree-2 feature gradient ([`crate::simd::fused`]), when it applies (f32,
    /// AVX-512, degree 2, `e = 17`): the feature coefficients, the degree-2 group starts and the
    /// kernel's buffers; [`fused_load`](Self::fused_load) gives it a state. `state` is set when the
    /// state products fuse too (`d = 16`, [`fused_state`](Self::fused_state)).
    fn fused_setup(&self) -> Option<Fused<'_>> {
        use crate::simd::{fused, Level};
        if self.e() != fused::E || Level::detect() != Level::Avx512 || !crate::linalg::is_f32::<T>() {
            return None;
        }
        let (a, starts) = self.fm.quadratic()?;
        let a: Vec<f32> = a.iter().map(|x| x.as_f64() as f32).collect();
        let ms = vec![0.0f32; a.len() * fused::E];
        let state = self.d() == fused::D && fused::state_applies(starts);
        Some(Fused { a, ms, starts, scratch: vec![0.0; 3 * self.d() * 16], state })
    }

    /// `st [r, e] += (w ∘ φ(√τ (x − shift)))ᵀ Y` for a chunk of `rows = x.rows()` input rows, with
    /// `Y`'s rows `ys` apart in `y` (`[V 1]` when not `last`: `y` then holds the `dv` value columns
    /// only), degree weights `w` (`None`: all 1): the fused form of the features and the state
    /// products `H' += Φ_Kᵀ [V 1]`, `dH' += Ψᵀ dY` (`fz.state` must be set).
    #[allow(clippy::too_many_arguments)]
    fn fused_state(
        &self,
        fz: &mut Fused<'_>,
        x: Rows<'_, T>,
        shift: Option<&[T]>,
        y: &[T],
        ys: usize,
        last: bool,
        w: Option<&[T]>,
        st: &mut [T],
    ) {
        use crate::simd::{fused, Level};
        debug_assert!(fz.state && x.cols() == fused::D && self.dv == fused::E - 1, "fused_state: d, d_v ≠ 16");
        let rows = x.rows();
        if fz.scratch.len() < 2 * fused::D * rows {
            fz.scratch.resize(2 * fused::D * rows, 0.0); // once per call: the first chunk is the largest
        }
        let (xd, xs) = x.parts();
        let v = fused::StateAdd {
            x: f32s(xd),
            xs,
            shift: shift.map(f32s),
            scale: self.sqrt_tau().as_f64() as f32,
            y: f32s(y),
            ys,
            last,
            w: w.map(|w| f32s(&w[..(self.g() + 1) * rows])),
            a: &fz.a,
            rows,
        };
        let done = fused::features_state(Level::detect(), &v, f32s_mut(st), &mut fz.scratch);
        assert!(done, "fused_setup checked the level");
    }

    /// Loads the state `m [r, e]` into `fz`, with the feature coefficients folded into its rows.
    fn fused_load(&self, fz: &mut Fused<'_>, m: &[T]) {
        crate::simd::fused::scale_rows(f32s(m), &fz.a, &mut fz.ms);
    }

    /// `dx += √τ J_φᵀ (w ∘ M y)` for a chunk of `rows` rows with scaled inputs `xt [d, rows]`,
    /// `y [e, rows]` and degree weights `w` (`None`: all 1), and `dm −= Σ_{t<g} w_{t+1} ⟨φ_t, dψ_t⟩`
    /// when given (`dxt`: scratch): the fused form of the product into `b.dphit` followed by
    /// [`unweigh`](Self::unweigh) and [`feature_vjp`](Self::feature_vjp).
    #[allow(clippy::too_many_arguments)]
    fn fused_vjp(
        &self,
        fz: &mut Fused<'_>,
        xt: &[T],
        y: &[T],
        w: Option<&[T]>,
        dxt: &mut [T],
        dm: Option<&mut [T]>,
        dx: &mut RowsMut<'_, T>,
    ) {
        use crate::simd::{fused, Level};
        let (d, e, rows) = (self.d(), self.e(), dx.rows());
        let v = fused::Vjp {
            ms: &fz.ms,
            y: f32s(&y[..e * rows]),
            xt: f32s(&xt[..d * rows]),
            starts: fz.starts,
            w: w.map(|w| f32s(&w[..(self.g() + 1) * rows])),
            rows,
        };
        let dxt32 = f32s_mut(&mut dxt[..d * rows]);
        let dm = dm.map(f32s_mut);
        let done = fused::feature_vjp(Level::detect(), &v, dxt32, dm, &mut fz.scratch);
        assert!(done, "fused_setup checked the level");
        self.add_transposed(&dxt[..d * rows], dx);
    }

    /// `yt [e, rows] = H'ᵀ (w ∘ φ(xt))` for a chunk's scaled inputs `xt [d, rows]` and degree weights
    /// `w` (`None`: all 1), with `H'` loaded in `fz`: the fused form of the query features and the
    /// product `Yᵀ = H'ᵀ Ψᵀ`.
    fn fused_product(&self, fz: &mut Fused<'_>, xt: &[T], w: Option<&[T]>, rows: usize, yt: &mut [T]) {
        use crate::simd::{fused, Level};
        let (d, e) = (self.d(), self.e());
        let xt = f32s(&xt[..d * rows]);
        let w = w.map(|w| f32s(&w[..(self.g() + 1) * rows]));
        let v = fused::Product { ms: &fz.ms, xt, starts: fz.starts, w, rows };
        let yt = f32s_mut(&mut yt[..e * rows]);
        let done = fused::features_product(Level::detect(), &v, yt, &mut fz.scratch);
        assert!(done, "fused_setup checked the level");
    }

    /// The key side of a state's gradient `dM` (`dH'` or `dS'`, `[r, e]`) for `kv`'s chunk
    /// `i0..i0 + rows`: `dv += Φ_K dM[:, :dv]` and, with `dΦ_Kᵀ = dM V'ᵀ` (the chunk's rows in the
    /// lanes), `dk += √τ J_φᵀ dΦ_K`. Fused when `fz` is given (its state loaded with `dM`); at
    /// d = 16 `dVᵀ = dMᵀ Φ_Kᵀ` is fused too (the features made in registers, `dMᵀ`'s last row
    /// unused), else it goes through `b.phit`. `b.vt` receives `V'ᵀ`, `b.xt` the scaled keys.
    #[allow(clippy::too_many_arguments)]
    fn add_key_grads(
        &self,
        fz: Option<&mut Fused<'_>>,
        kv: &KvHead<'_, T>,
        i0: usize,
        rows: usize,
        dm: &[T],
        b: &mut Bufs<T>,
        dk: &mut RowsMut<'_, T>,
        dv: &mut RowsMut<'_, T>,
    ) {
        let (r, e) = (self.r(), self.e());
        self.values_t(kv.v.sub(i0, rows), &mut b.vt);
        match fz {
            Some(fz) if fz.state => {
                self.transpose_scaled(kv.k.sub(i0, rows), kv.shift(), &mut b.xt);
                self.fused_product(fz, &b.xt, None, rows, &mut b.ve);
                add_rows_t(&b.ve[..self.dv * rows], rows, dv);
                self.fused_vjp(fz, &b.xt, &b.vt, None, &mut b.dxt, None, dk);
            }
            fz => {
                self.key_features(kv, i0, rows, b);
                let phi = rm(&b.phit[..r * rows], r, rows).transpose();
                matmul_small(dv.mat_mut(), true, phi, rm_strided(dm, r, self.dv, e), T::one());
                match fz {
                    Some(fz) => self.fused_vjp(fz, &b.xt, &b.vt, None, &mut b.dxt, None, dk),
                    None => {
                        let vt = rm(&b.vt[..e * rows], e, rows);
                        matmul_small(rm_mut(&mut b.dphit[..r * rows], r, rows), false, rm(dm, r, e), vt, T::one());
                        self.feature_vjp(b, dk);
                    }
                }
            }
        }
    }

    /// Feature chain rule: adds `√τ J_φ(x'_i)ᵀ dφ_i` to `dx_i` for the rows of `dx` (`b.xt`,
    /// `b.phit` hold the inputs' features, `b.dphit` their gradients).
    fn feature_vjp(&self, b: &mut Bufs<T>, dx: &mut RowsMut<'_, T>) {
        let (d, r, rows) = (self.d(), self.r(), dx.rows());
        self.fm.vjp_cols(
            &b.xt[..rows * d],
            &b.phit[..rows * r],
            &mut b.dphit[..rows * r],
            rows,
            &mut b.dxt[..rows * d],
        );
        self.add_transposed(&b.dxt, dx);
    }

    /// Intra-chunk scores `s = τ q_i·(k_j − c)` (`rows × rows`) from the queries and
    /// `xtk = √τ (K_c − c)ᵀ`.
    pub(crate) fn intra_scores(&self, qc: Rows<'_, T>, xtk: &[T], s: &mut [T]) {
        let (d, rows) = (self.d(), qc.rows());
        let kt = rm(&xtk[..d * rows], d, rows);
        matmul_small(rm_mut(&mut s[..rows * rows], rows, rows), false, qc.mat(), kt, self.sqrt_tau());
    }

    /// Masked intra-chunk weights in place: `s_ij ← T_g(s_ij − m_i)` for `j ≤ i`, 0 above
    /// (`coef` from [`taylor_coefs`]). With `grad = (da, dm)`: also `da_ij ← da_ij T_{g−1}(s_ij − m_i)`
    /// (0 above) and `dm_i −= Σ_j da_ij`.
    pub(crate) fn intra_weights(
        &self,
        coef: &[T],
        m: &[T],
        rows: usize,
        b: &mut Bufs<T>,
        mut grad: Option<(&mut [T], &mut [T])>,
    ) {
        let deg = self.g();
        let (s, tmp, tmp2) = (&mut b.s, &mut b.tmp, &mut b.tmp2);
        dispatch(
            #[inline(always)]
            || {
                for il in 0..rows {
                    let srow = &mut s[il * rows..(il + 1) * rows];
                    let sh = &mut tmp[..=il];
                    for (a, x) in sh.iter_mut().zip(&srow[..=il]) {
                        *a = *x - m[il];
                    }
                    horner_into(coef, sh, &mut srow[..=il]);
                    srow[il + 1..].fill(T::zero());
                    if let Some((da, dm)) = grad.as_mut() {
                        let t1 = &mut tmp2[..=il];
                        horner_into(&coef[..deg], sh, t1); // T_{g−1}(s̃)
                        let drow = &mut da[il * rows..(il + 1) * rows];
                        let mut dmi = T::zero();
                        for (dx, t) in drow[..=il].iter_mut().zip(t1.iter()) {
                            *dx *= *t;
                            dmi += *dx;
                        }
                        drow[il + 1..].fill(T::zero());
                        dm[il] -= dmi;
                    }
                }
            },
        );
    }

    /// Non-causal key/value state `H' = Φ_Kᵀ [V 1]`, `[r, dv + 1]` row-major, into `h` (one pass
    /// over key chunks).
    pub fn kv_state(&self, kv: &KvHead<'_, T>, h: &mut [T]) {
        let (r, e, n) = (self.r(), self.e(), kv.k.rows());
        let mut pooled = self.bufs(n);
        let b = &mut *pooled;
        let dv = self.dv;
        h.fill(T::zero());
        if let Some(fz) = &mut self.fused_setup().filter(|f| f.state) {
            // the key features made in registers, never stored
            for (j0, cn) in self.chunks(n) {
                kv.k.prefetch(j0 + cn, cn);
                kv.v.prefetch(j0 + cn, cn);
                let (vc, vs) = kv.v.sub(j0, cn).parts();
                self.fused_state(fz, kv.k.sub(j0, cn), kv.shift(), vc, vs, false, None, h);
            }
            return;
        }
        for (j0, cn) in self.chunks(n) {
            kv.k.prefetch(j0 + cn, cn);
            kv.v.prefetch(j0 + cn, cn);
            self.key_features(kv, j0, cn, b);
            // H'[:, :dv] += Φ_Kᵀ V (the values read in place, dv wide: no column of ones in the
            // product's lanes), H'[:, dv] += Φ_Kᵀ 1 (row sums)
            let phit = &b.phit[..r * cn];
            matmul_small(rm_strided_mut(h, r, dv, e), true, rm(phit, r, cn), kv.v.sub(j0, cn).mat(), T::one());
            add_row_dots(phit, cn, None, &mut h[dv..], e);
        }
    }

    /// Non-causal forward of one query head `q [n, d]` with row shifts `m [n]` and the state of
    /// [`kv_state`](Self::kv_state): writes `o [n, dv]` and `den [n]`.
    pub fn forward_queries(&self, q: Rows<'_, T>, m: &[T], state: &[T], o: &mut RowsMut<'_, T>, den: &mut [T]) {
        let (n, r, e) = (q.rows(), self.r(), self.e());
        let weighted = self.weighted(m);
        let mut pooled = self.bufs(n);
        let b = &mut *pooled;
        let mut yt = std::mem::take(&mut b.yt);
        let mut fused = self.fused_setup();
        if let Some(fz) = &mut fused {
            self.fused_load(fz, state);
        }
        for (i0, cn) in self.chunks(n) {
            q.prefetch(i0 + cn, cn);
            if let Some(fz) = &mut fused {
                // Yᵀ = H'ᵀ Ψᵀ with the query features made in registers (never stored)
                self.transpose_scaled(q.sub(i0, cn), None, &mut b.xt);
                if weighted {
                    self.degree_weights(&m[i0..i0 + cn], &mut b.w);
                }
                self.fused_product(fz, &b.xt, weighted.then_some(&b.w[..]), cn, &mut yt);
            } else {
                self.query_features(q.sub(i0, cn), &m[i0..], weighted, b);
                // Yᵀ [e, cn] = H'ᵀ Ψᵀ: the chunk's rows in the vector lanes
                let psi = rm(self.psi(b, cn, weighted), r, cn);
                matmul_small(rm_mut(&mut yt[..e * cn], e, cn), false, rm(state, r, e).transpose(), psi, T::one());
            }
            self.finish_t(&yt, cn, &mut b.tmp, &mut o.sub_mut(i0, cn), &mut den[i0..i0 + cn]);
        }
        b.yt = yt;
    }

    /// Whether the row shifts need the degree weights (some `m_i ≠ 0`).
    pub(crate) fn weighted(&self, m: &[T]) -> bool {
        self.center && m.iter().any(|x| *x != T::zero())
    }

    /// Non-causal backward, query side, of one query head `x`, with `kbar = k̄ − c [d]` and
    /// `state` from [`kv_state`](Self::kv_state).
    /// Adds into `dq [n, d]`, `dstate [r, dv+1]` (`Ψᵀ dY`, which feeds
    /// [`backward_keys`](Self::backward_keys)) and `dkbar [d]` (`τ Σ_i dm_i q_i`, in f64, the
    /// gradient reaching the key mean; untouched without centering).
    pub fn backward_queries(
        &self,
        x: &QueryBack<'_, T>,
        kbar: &[T],
        state: &[T],
        dq: &mut RowsMut<'_, T>,
        dstate: &mut [T],
        dkbar: &mut [f64],
    ) {
        let QueryBack { q, m, o, den, g } = *x;
        let (n, r, e) = (q.rows(), self.r(), self.e());
        let weighted = self.weighted(m);
        let mut pooled = self.bufs(n);
        let b = &mut *pooled;
        let mut dm = vec![T::zero(); n];
        // the fused degree-2 pass, when it applies (with the degree weights when weighted)
        let mut fused = self.fused_setup();
        if let Some(fz) = &mut fused {
            self.fused_load(fz, state);
        }
        let fstate = fused.as_ref().is_some_and(|f| f.state);
        for (i0, cn) in self.chunks(n) {
            for x in [q, g, o] {
                x.prefetch(i0 + cn, cn);
            }
            if fstate {
                // the features are made in registers by the fused passes: only the scaled inputs
                self.transpose_scaled(q.sub(i0, cn), None, &mut b.xt);
                if weighted {
                    self.degree_weights(&m[i0..i0 + cn], &mut b.w);
                }
            } else {
                self.query_features(q.sub(i0, cn), &m[i0..], weighted, b);
            }
            self.dy(g.sub(i0, cn), o.sub(i0, cn), &den[i0..], &mut b.y);
            transpose(Rows::contiguous(&b.y[..cn * e], cn, e), None, T::one(), &mut b.yt[..e * cn]);
            // dΨᵀ = H' dYᵀ (the chunk's rows in the lanes) ;  dH' += Ψᵀ dY: the dv value columns
            // as a product, the denominator's as dot products (or both fused)
            match &mut fused {
                Some(fz) if fstate => {
                    let w = weighted.then_some(&b.w[..]);
                    self.fused_state(fz, q.sub(i0, cn), None, &b.y[..cn * e], e, true, w, dstate);
                }
                _ => self.add_dstate(self.psi(b, cn, weighted), &b.y[..cn * e], &b.yt[..e * cn], dstate),
            }
            if let Some(fz) = &mut fused {
                // dΨ and its chain rule in one pass, dΨ never stored
                let dmc = if self.center { Some(&mut dm[i0..i0 + cn]) } else { None };
                let w = weighted.then_some(&b.w[..]);
                self.fused_vjp(fz, &b.xt, &b.yt, w, &mut b.dxt, dmc, &mut dq.sub_mut(i0, cn));
            } else {
                let dyt = rm(&b.yt[..e * cn], e, cn);
                matmul_small(rm_mut(&mut b.dphit[..r * cn], r, cn), false, rm(state, r, e), dyt, T::one());
                self.query_vjp(cn, weighted, b, &mut dm[i0..i0 + cn], &mut dq.sub_mut(i0, cn));
            }
            if self.center {
                // the chunk's dm is complete: its rows of q and dq are still in cache
                let tau = self.tau();
                for (i, dmi) in dm.iter().enumerate().skip(i0).take(cn) {
                    let s = tau * *dmi;
                    for ((x, qv), (kb, dkb)) in
                        dq.row_mut(i).iter_mut().zip(q.row(i)).zip(kbar.iter().zip(dkbar.iter_mut()))
                    {
                        *x += s * *kb;
                        *dkb += (s * *qv).as_f64();
                    }
                }
            }
        }
    }

    /// Non-causal backward, key side, of one key/value head: `dstate` and `dkbar` are the sums over
    /// the query heads sharing these keys of [`backward_queries`](Self::backward_queries)' outputs.
    /// Adds into `dk [n, d]` and `dv [n, dv]`.
    pub fn backward_keys(
        &self,
        kv: &KvHead<'_, T>,
        dstate: &[T],
        dkbar: &[f64],
        dk: &mut RowsMut<'_, T>,
        dv: &mut RowsMut<'_, T>,
    ) {
        let n = kv.k.rows();
        let mut pooled = self.bufs(n);
        let b = &mut *pooled;
        let share: Vec<T> =
            if self.center { dkbar.iter().map(|x| T::from_f64(x / n as f64)).collect() } else { vec![] };
        let mut fused = self.fused_setup();
        if let Some(fz) = &mut fused {
            self.fused_load(fz, dstate);
        }
        for (j0, cn) in self.chunks(n) {
            kv.k.prefetch(j0 + cn, cn);
            kv.v.prefetch(j0 + cn, cn);
            self.add_key_grads(fused.as_mut(), kv, j0, cn, dstate, b, &mut dk.sub_mut(j0, cn), &mut dv.sub_mut(j0, cn));
            if self.center {
                // every key's 1/n share of the row shifts' key-mean gradient, while the rows are in cache
                for i in j0..j0 + cn {
                    for (x, s) in dk.row_mut(i).iter_mut().zip(&share) {
                        *x += *s;
                    }
                }
            }
        }
    }

    /// Causal forward of one query head (MATH §4, chunked): `q [n, d]`, row shifts `m [n]`,
    /// `state` = `S'` of the keys before these (`[r, dv+1]`, zeros for none; `kv.offset` of them),
    /// which holds `S'` after them on return. Writes `o [n, dv]` and `den [n]`. Reads `kv.k`,
    /// `kv.v` and `kv.c` only (not `kbar` or `offset`: `forward_one` calls it block by block with
    /// block views that carry neither).
    pub fn forward_causal(
        &self,
        q: Rows<'_, T>,
        kv: &KvHead<'_, T>,
        m: &[T],
        state: &mut [T],
        o: &mut RowsMut<'_, T>,
        den: &mut [T],
    ) {
        let (n, r, e, dv) = (q.rows(), self.r(), self.e(), self.dv);
        let weighted = self.weighted(m);
        let coef = taylor_coefs::<T>(self.g());
        let mut pooled = self.bufs(n);
        let b = &mut *pooled;
        let mut y = std::mem::take(&mut b.y);
        // the denominator column's scratch (`ve` is free here: the values are read in place)
        let mut col = std::mem::take(&mut b.ve);
        let mut fused = self.fused_setup().filter(|f| f.state);
        for (i0, cn) in self.chunks(n) {
            // the next chunk's rows, fetched while this one computes
            q.prefetch(i0 + cn, cn);
            kv.k.prefetch(i0 + cn, cn);
            kv.v.prefetch(i0 + cn, cn);
            let qc = q.sub(i0, cn);
            // inter-chunk: Y = Ψ S'. Fused (d = d_v = 16): Yᵀ = S'ᵀ Ψᵀ, transposed. Otherwise the dv
            // value columns as a product with dv in the lanes, and the denominator column
            // (Ψ S'[:, dv]) as a one-row product with the chunk's rows in the lanes (a 17th column
            // would fill a second register to one lane in 16).
            if let Some(fz) = &mut fused {
                // Yᵀ = S'ᵀ Ψᵀ with the query features made in registers, then transposed
                self.transpose_scaled(qc, None, &mut b.xt);
                if weighted {
                    self.degree_weights(&m[i0..i0 + cn], &mut b.w);
                }
                self.fused_load(fz, state);
                self.fused_product(fz, &b.xt, weighted.then_some(&b.w[..]), cn, &mut b.yt);
                transpose(Rows::contiguous(&b.yt[..e * cn], e, cn), None, T::one(), &mut y[..cn * e]);
            } else {
                self.query_features(qc, &m[i0..], weighted, b);
                let psit = rm(self.psi(b, cn, weighted), r, cn);
                let yv = rm_strided_mut(&mut y[..cn * e], cn, dv, e);
                matmul_small(yv, false, psit.transpose(), rm_strided(state, r, dv, e), T::one());
                let s_den = rm_strided(&state[dv..], r, 1, e).transpose();
                matmul_small(rm_mut(&mut col[..cn], 1, cn), false, s_den, psit, T::one());
                for (i, t) in col[..cn].iter().enumerate() {
                    y[i * e + dv] = *t;
                }
            }
            // intra-chunk: Y += A [V 1], a_ij = T_g(τ q_i·(k_j − c) − m_i) for j ≤ i: A V with the
            // values read in place, A 1 as row sums
            self.transpose_scaled(kv.k.sub(i0, cn), kv.shift(), &mut b.xtk);
            self.intra_scores(qc, &b.xtk, &mut b.s);
            self.intra_weights(&coef, &m[i0..i0 + cn], cn, b, None);
            let (a, vc) = (&b.s[..cn * cn], kv.v.sub(i0, cn));
            matmul_small(rm_strided_mut(&mut y[..cn * e], cn, dv, e), true, rm(a, cn, cn), vc.mat(), T::one());
            add_row_dots(a, cn, None, &mut y[dv..], e);
            self.finish(&y, &mut o.sub_mut(i0, cn), &mut den[i0..i0 + cn]);
            // S' += Φ_K,cᵀ V'_c
            self.update_state(fused.as_mut(), kv, i0, cn, b, state);
        }
        b.y = y;
        b.ve = col;
    }

    /// `S' += Φ_K,cᵀ [V_c 1]` for `kv`'s chunk `i0..i0 + rows`: fused (the features made in
    /// registers from the key rows) when `fz` is given, else through `b.phit` from `b.xtk`, which
    /// must then hold the chunk's scaled keys `xtk [d, rows]`.
    fn update_state(
        &self,
        fz: Option<&mut Fused<'_>>,
        kv: &KvHead<'_, T>,
        i0: usize,
        rows: usize,
        b: &mut Bufs<T>,
        state: &mut [T],
    ) {
        let vc = kv.v.sub(i0, rows);
        match fz {
            Some(fz) => {
                let (vd, vs) = vc.parts();
                self.fused_state(fz, kv.k.sub(i0, rows), kv.shift(), vd, vs, false, None, state);
            }
            None => {
                let (d, r) = (self.d(), self.r());
                self.fm.apply_cols(&b.xtk[..rows * d], rows, &mut b.phit[..rows * r]);
                self.add_state(&b.phit[..r * rows], vc, state);
            }
        }
    }

    /// `S' += Φᵀ [V 1]` for a chunk's features `phit [r, rows]` and values `v [rows, dv]`: the dv
    /// value columns as a product (the values read in place, dv in the lanes), the ones column as
    /// row sums.
    fn add_state(&self, phit: &[T], v: Rows<'_, T>, state: &mut [T]) {
        let (r, e, dv, rows) = (self.r(), self.e(), self.dv, v.rows());
        matmul_small(rm_strided_mut(state, r, dv, e), true, rm(phit, r, rows), v.mat(), T::one());
        add_row_dots(phit, rows, None, &mut state[dv..], e);
    }

    /// Causal backward of one query head `x` (MATH §4) against `kv`; `state` = the initial `S'` of
    /// [`forward_causal`](Self::forward_causal), used as scratch; `starts` = `S'` at the start of
    /// every later scan block (`[blocks − 1, r, e]`, [`PolySaved::block_states`]): with them
    /// the two scans run block by block, last block first, each block's rows in cache between
    /// its scans; without (`None`, one block, or `starts` of another length, which is ignored)
    /// over the whole sequence. The gradients are the same either way. `dstate` holds `dL/dS'` of
    /// the final state on entry (zeros for none) and `dL/dS'` of the initial state on return. Adds into
    /// `dq [n, d]`, `dk [n, d]`, `dv [n, dv]` and `dkey_sum [d]` (the gradient of the initial key
    /// sum through the prefix means, `Σ_i τ dm_i q_i/(offset + i + 1)`, f64).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_causal(
        &self,
        x: &QueryBack<'_, T>,
        kv: &KvHead<'_, T>,
        state: &mut [T],
        starts: Option<&[T]>,
        dstate: &mut [T],
        dq: &mut RowsMut<'_, T>,
        dk: &mut RowsMut<'_, T>,
        dv: &mut RowsMut<'_, T>,
        dkey_sum: &mut [f64],
    ) {
        let QueryBack { q, m, o, den, g } = *x;
        let (n, d, r, e, dvw) = (q.rows(), self.d(), self.r(), self.e(), self.dv);
        let weighted = self.weighted(m);
        let tau = self.tau();
        let coef = taylor_coefs::<T>(self.g());
        let mut pooled = self.bufs(n);
        let b = &mut *pooled;
        let mut da = std::mem::take(&mut b.da);
        let mut dm = vec![T::zero(); n];
        let mut fused = self.fused_setup();
        let fstate = fused.as_ref().is_some_and(|f| f.state);
        // the rows of every input of chunk i0..i0 + cn, fetched while the one before computes
        let prefetch = |i0: usize, cn: usize| {
            for x in [q, g, o, kv.k, kv.v] {
                x.prefetch(i0, cn);
            }
        };
        // Blocks of whole chunks, last first, each block's forward then reverse scan (one block, the
        // whole sequence, without the forward's block states).
        let (c, len) = (self.c(n), state.len());
        let block = self.scan_block(n);
        let starts = starts.filter(|st| n > block && st.len() == (n - 1) / block * len);
        let block = if starts.is_some() { block } else { n.max(1) };
        let initial = starts.map(|_| state.to_vec());
        let mut acc = vec![0.0f64; d];
        for (bi, b0) in (0..n).step_by(block).enumerate().rev() {
            let b1 = (b0 + block).min(n);
            if let (Some(st), Some(init)) = (starts, &initial) {
                state.copy_from_slice(if bi == 0 { init } else { &st[(bi - 1) * len..bi * len] });
            }
            // Forward scan: dQ through the prefix state, and every intra-chunk term.
            for i0 in (b0..b1).step_by(c) {
                let cn = c.min(b1 - i0);
                if i0 + cn < b1 {
                    prefetch(i0 + cn, cn);
                }
                let qc = q.sub(i0, cn);
                if fused.is_some() {
                    // the fused pass makes the features in registers: only the scaled inputs and weights
                    self.transpose_scaled(qc, None, &mut b.xt);
                    if weighted {
                        self.degree_weights(&m[i0..i0 + cn], &mut b.w);
                    }
                } else {
                    self.query_features(qc, &m[i0..], weighted, b);
                }
                self.dy(g.sub(i0, cn), o.sub(i0, cn), &den[i0..], &mut b.y);
                // dYᵀ and V'ᵀ, so that dΨᵀ and dA have the chunk's rows in the lanes
                transpose(Rows::contiguous(&b.y[..cn * e], cn, e), None, T::one(), &mut b.yt[..e * cn]);
                self.values_t(kv.v.sub(i0, cn), &mut b.vt);
                // dΨᵀ = S' dYᵀ and its chain rule (fused when it applies)
                let mut dqc = dq.sub_mut(i0, cn);
                if let Some(fz) = &mut fused {
                    self.fused_load(fz, state);
                    let dmc = if self.center { Some(&mut dm[i0..i0 + cn]) } else { None };
                    let w = weighted.then_some(&b.w[..]);
                    self.fused_vjp(fz, &b.xt, &b.yt, w, &mut b.dxt, dmc, &mut dqc);
                } else {
                    let dyt = rm(&b.yt[..e * cn], e, cn);
                    matmul_small(rm_mut(&mut b.dphit[..r * cn], r, cn), false, rm(state, r, e), dyt, T::one());
                    self.query_vjp(cn, weighted, b, &mut dm[i0..i0 + cn], &mut dqc);
                }
                // intra: dA = dY V'ᵀ, A = T_g(s̃), dS̃ = dA ∘ T_{g−1}(s̃) (masked)
                self.transpose_scaled(kv.k.sub(i0, cn), kv.shift(), &mut b.xtk);
                self.intra_scores(qc, &b.xtk, &mut b.s);
                let (dy, vt) = (rm(&b.y[..cn * e], cn, e), rm(&b.vt[..e * cn], e, cn));
                matmul_small(rm_mut(&mut da[..cn * cn], cn, cn), false, dy, vt, T::one());
                self.intra_weights(&coef, &m[i0..i0 + cn], cn, b, Some((&mut da, &mut dm[i0..i0 + cn])));
                let (sa, dsa) = (rm(&b.s[..cn * cn], cn, cn), rm(&da[..cn * cn], cn, cn));
                // dq_i += τ Σ_j dS̃_ij (k_j − c) = √τ dS̃ xtkᵀ ;  dk_j += τ Σ_i dS̃_ij q_i
                let kt = rm(&b.xtk[..d * cn], d, cn).transpose();
                matmul_small(dqc.mat_mut(), true, dsa, kt, self.sqrt_tau());
                matmul_small(dk.sub_mut(i0, cn).mat_mut(), true, dsa.transpose(), qc.mat(), tau);
                let dy_v = rm_strided(&b.y[..cn * e], cn, dvw, e);
                matmul_small(dv.sub_mut(i0, cn).mat_mut(), true, sa.transpose(), dy_v, T::one());
                // S' += Φ_K,cᵀ V'_c (the block's last chunk: the next block starts from a kept state)
                if i0 + cn < b1 {
                    self.update_state(fused.as_mut().filter(|f| f.state), kv, i0, cn, b, state);
                }
            }
            // Reverse scan: dK, dV through the suffix state dS' = dS'_final + Σ_{later i} Ψ_i dY_iᵀ;
            // and, rows descending while the chunk is in cache, through the shift: dq_i += τ dm_i (k̄_i − c),
            // key j (and the initial key sum) gets Σ_{i≥j} τ dm_i q_i/(offset + i + 1) (a suffix sum in acc).
            for i0 in (b0..b1).step_by(c).rev() {
                let cn = c.min(b1 - i0);
                // the chunk before, or the first chunk of the block before (where the next scan starts)
                if i0 > b0 {
                    prefetch(i0 - c, c);
                } else if b0 > 0 {
                    prefetch(b0 - block, c);
                }
                // dK, dV through the suffix state dS' (which changes from chunk to chunk)
                if let Some(fz) = &mut fused {
                    self.fused_load(fz, dstate);
                }
                self.add_key_grads(
                    fused.as_mut(),
                    kv,
                    i0,
                    cn,
                    dstate,
                    b,
                    &mut dk.sub_mut(i0, cn),
                    &mut dv.sub_mut(i0, cn),
                );
                // dS' += Ψᵀ dY
                self.dy(g.sub(i0, cn), o.sub(i0, cn), &den[i0..], &mut b.y);
                match &mut fused {
                    Some(fz) if fstate => {
                        if weighted {
                            self.degree_weights(&m[i0..i0 + cn], &mut b.w);
                        }
                        let w = weighted.then_some(&b.w[..]);
                        self.fused_state(fz, q.sub(i0, cn), None, &b.y[..cn * e], e, true, w, dstate);
                    }
                    _ => {
                        self.query_features(q.sub(i0, cn), &m[i0..], weighted, b);
                        transpose(Rows::contiguous(&b.y[..cn * e], cn, e), None, T::one(), &mut b.yt[..e * cn]);
                        self.add_dstate(self.psi(b, cn, weighted), &b.y[..cn * e], &b.yt[..e * cn], dstate);
                    }
                }
                if self.center {
                    dispatch(
                        #[inline(always)]
                        || {
                            for i in (i0..i0 + cn).rev() {
                                let s = tau * dm[i];
                                let inv = 1.0 / (kv.offset + i + 1) as f64;
                                let kb = &kv.kbar[i * d..(i + 1) * d];
                                let rows = dq.row_mut(i).iter_mut().zip(kb).zip(acc.iter_mut().zip(q.row(i)));
                                for ((x, kbv), (a, qv)) in rows {
                                    *x += s * *kbv;
                                    *a += (s * *qv).as_f64() * inv;
                                }
                                for (x, a) in dk.row_mut(i).iter_mut().zip(&acc) {
                                    *x += T::from_f64(*a);
                                }
                            }
                        },
                    );
                }
            }
        }
        b.da = da;
        if self.center {
            for (x, a) in dkey_sum.iter_mut().zip(&acc) {
                *x += a;
            }
        }
    }
}

/// `xt [cols, rows] = st·(x_i − c)ᵀ` for the rows of `x` (no shift when `c` is `None`); f32 on an
/// AVX CPU by 8×8 register transposes, bit-identical to the loop.
pub(crate) fn transpose<T: Scalar>(x: Rows<'_, T>, c: Option<&[T]>, st: T, xt: &mut [T]) {
    let rows = x.rows();
    let (data, stride) = x.parts();
    if let (Some(src), Some(dst)) = (crate::linalg::as_f32(data), crate::linalg::as_f32_mut(xt)) {
        // f32: 8×8 register transposes (bit-identical to the loop below; st is an f32 already)
        let shift = c.and_then(crate::linalg::as_f32);
        let level = crate::simd::Level::detect();
        let st = st.as_f64() as f32;
        if crate::simd::transpose::transpose_scaled(level, src, stride, rows, x.cols(), shift, st, dst, rows) {
            return;
        }
    }
    dispatch(
        #[inline(always)]
        || {
            for i in 0..rows {
                let xr = x.row(i);
                match c {
                    Some(c) => {
                        for (col, (v, cv)) in xr.iter().zip(c).enumerate() {
                            xt[col * rows + i] = (*v - *cv) * st;
                        }
                    }
                    None => {
                        for (col, v) in xr.iter().enumerate() {
                            xt[col * rows + i] = *v * st;
                        }
                    }
                }
            }
        },
    );
}

/// `dst[i, c] += src[c·rows + i]` for the rows of `dst` (`src [cols, rows]`, `rows = dst.rows()`):
/// an f32 chunk's transposed product added to its rows.
fn add_rows_t<T: Scalar>(src: &[T], rows: usize, dst: &mut RowsMut<'_, T>) {
    assert_eq!(rows, dst.rows(), "add_rows_t: rows ≠ the destination's rows");
    let cols = dst.cols();
    let (ptr, stride) = dst.raw_mut();
    // SAFETY: raw_mut's pointer is valid for rows × cols elements `stride` apart while dst is
    // borrowed; src is scratch that does not overlap it. T is f32 (fused paths only).
    let done = unsafe {
        crate::simd::transpose::add_transposed(
            crate::simd::Level::detect(),
            f32s(src),
            rows,
            rows,
            cols,
            1.0,
            ptr as *mut f32,
            stride,
        )
    };
    assert!(done, "fused_setup checked the level");
}

/// `out[k·os] += Σ_i a[k·cols + i]·v[i]` for every row `k` of `a [rows, cols]` (`v = 1` when
/// `None`: row sums): dot products along the contiguous side in 16 partial sums, so that they
/// vectorize (the denominator column of `H'` and `dH'`, kept out of the products' lanes).
fn add_row_dots<T: Scalar>(a: &[T], cols: usize, v: Option<&[T]>, out: &mut [T], os: usize) {
    if cols == 0 {
        return;
    }
    const L: usize = 16;
    let split = cols / L * L;
    dispatch(
        #[inline(always)]
        || {
            for (k, row) in a.chunks_exact(cols).enumerate() {
                let mut acc = [T::zero(); L];
                let mut rest = T::zero();
                let (body, tail) = row.split_at(split);
                match v {
                    Some(v) => {
                        let (vb, vt) = v[..cols].split_at(split);
                        for (x, y) in body.chunks_exact(L).zip(vb.chunks_exact(L)) {
                            for l in 0..L {
                                acc[l] += x[l] * y[l];
                            }
                        }
                        for (x, y) in tail.iter().zip(vt) {
                            rest += *x * *y;
                        }
                    }
                    None => {
                        for x in body.chunks_exact(L) {
                            for l in 0..L {
                                acc[l] += x[l];
                            }
                        }
                        for x in tail {
                            rest += *x;
                        }
                    }
                }
                // pairwise: halves added as vectors (8, 4, 2, 1 lanes)
                let mut w = L / 2;
                while w > 0 {
                    for l in 0..w {
                        acc[l] += acc[l + w];
                    }
                    w /= 2;
                }
                out[k * os] += acc[0] + rest;
            }
        },
    );
}

/// Row shifts `m_i = τ q_i·kbar_i` of one query head (MATH §3; `kbar` = `k̄ − c` of a [`KvHead`]:
/// `[d]` for every row or `[n, d]` row by row; dot products in f64); zeros without `center` or
/// when `kbar` is zero (the non-causal default, where `c` is the key mean), without reading `q`.
pub fn row_shifts<T: Scalar>(q: Rows<'_, T>, kbar: &[T], scale: f64, center: bool) -> Vec<T> {
    if !center || kbar.iter().all(|x| *x == T::zero()) {
        return vec![T::zero(); q.rows()];
    }
    super::bound::row_shift_rows(q, kbar, scale)
}

/// `lse_i = τ q_i·c + m_i + ln den_i` (sums in f64, the logarithm in `T`: for f32 the vectorized
/// [`crate::fastmath::ln_f32_inplace`], as accurate as the f32 result) into `lse`: the log of the polynomial model's
/// normalizer of the unshifted scores `τ q_i·k_j`, since the kernels' shifted score is
/// `τ q_i·k_j − τ q_i·k̄_i = τ q_i·(k_j − c) − m_i`.
pub(crate) fn fill_lse<T: Scalar>(q: Rows<'_, T>, c: &[T], m: &[T], den: &[T], scale: f64, lse: &mut [T]) {
    lse.copy_from_slice(&den[..lse.len()]);
    match crate::linalg::as_f32_mut(lse) {
        Some(l) => crate::fastmath::ln_f32_inplace(l),
        None => lse.iter_mut().for_each(|l| *l = l.ln()),
    }
    dispatch(
        #[inline(always)]
        || {
            for (i, l) in lse.iter_mut().enumerate() {
                let qc = super::bound::dot_f64(q.row(i), c);
                *l = T::from_f64(scale * qc + m[i].as_f64() + l.as_f64());
            }
        },
    );
}

/// The key/value state a query head's kernel reads (MATH §4).
pub enum State<'s, T> {
    /// Non-causal: `H' = Φ_Kᵀ [V 1]` of [`Head::kv_state`], `[r, dv+1]`.
    Keys(&'s [T]),
    /// Causal: `S'` of the keys before these (`[r, dv+1]`, zeros for none); the forward leaves the
    /// final `S'` in it, the backward uses it as scratch.
    Scan(&'s mut [T]),
}

/// Forward of one query head `q [n, d]` against its key/value head (MATH §4): writes
/// `o [n, dv]`, `lse [n]` and `den [n]`; causal, appends `S'` at the start of every scan block
/// after the first to `starts` when given ([`PolySaved::block_states`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_one<T: Scalar>(
    head: &Head<'_, T>,
    q: Rows<'_, T>,
    kv: &KvHead<'_, T>,
    state: State<'_, T>,
    o: &mut RowsMut<'_, T>,
    lse: &mut [T],
    den: &mut [T],
    mut starts: Option<&mut Vec<T>>,
) {
    // blocks of rows, each one's shifts, outputs and lse while its queries are still in cache
    let n = q.rows();
    let block = head.scan_block(n); // c(n) ≥ 1
    match state {
        State::Scan(s) => {
            // a whole number of chunks per block (c(n) = chunk when n ≥ chunk, else one block), so
            // the chunks are the unblocked scan's and the state carries from block to block
            let d = q.cols();
            for b0 in (0..n).step_by(block) {
                let (bn, r) = (block.min(n - b0), b0..(b0 + block).min(n));
                if let (true, Some(st)) = (b0 > 0, starts.as_deref_mut()) {
                    st.extend_from_slice(s);
                }
                let (qb, kbar) = (q.sub(b0, bn), &kv.kbar[b0 * d..(b0 + bn) * d]);
                let m = row_shifts(qb, kbar, head.scale, head.center);
                // the block's keys and values (the causal forward reads neither `kbar` nor `offset`)
                let kvb = KvHead {
                    k: kv.k.sub(b0, bn),
                    v: kv.v.sub(b0, bn),
                    c: kv.c.clone(),
                    kbar: Vec::new(),
                    offset: kv.offset + b0,
                };
                head.forward_causal(qb, &kvb, &m, s, &mut o.sub_mut(b0, bn), &mut den[r.clone()]);
                fill_lse(qb, &kv.c, &m, &den[r.clone()], head.scale, &mut lse[r]);
            }
        }
        State::Keys(h) => {
            for b0 in (0..n).step_by(block) {
                let (bn, r) = (block.min(n - b0), b0..(b0 + block).min(n));
                let qb = q.sub(b0, bn);
                let m = row_shifts(qb, &kv.kbar, head.scale, head.center);
                head.forward_queries(qb, &m, h, &mut o.sub_mut(b0, bn), &mut den[r.clone()]);
                fill_lse(qb, &kv.c, &m, &den[r.clone()], head.scale, &mut lse[r]);
            }
        }
    }
}

/// Backward of one query head against its own key/value head (no GQA sharing of the key side):
/// `state` as in [`forward_one`] (its initial value), `starts` the forward's block states of this
/// head (causal, `None` if not kept), `dstate` the gradient of the final `S'` (causal; zeros for
/// none; the initial state's on return; unused non-causal). Adds into `dq`, `dk`, `dv` and
/// (causal) `dkey_sum`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_one<T: Scalar>(
    head: &Head<'_, T>,
    q: Rows<'_, T>,
    kv: &KvHead<'_, T>,
    state: State<'_, T>,
    o: Rows<'_, T>,
    den: &[T],
    g: Rows<'_, T>,
    starts: Option<&[T]>,
    dstate: &mut [T],
    dq: &mut RowsMut<'_, T>,
    dk: &mut RowsMut<'_, T>,
    dv: &mut RowsMut<'_, T>,
    dkey_sum: &mut [f64],
) {
    match state {
        State::Scan(s) => {
            let m = row_shifts(q, &kv.kbar, head.scale, head.center);
            let x = QueryBack { q, m: &m, o, den, g };
            head.backward_causal(&x, kv, s, starts, dstate, dq, dk, dv, dkey_sum)
        }
        State::Keys(h) => {
            let mut dh = vec![T::zero(); h.len()];
            let mut dkbar = vec![0.0f64; head.d()];
            backward_queries_by_block(head, (q, o, den, g), &kv.kbar, h, dq, &mut dh, &mut dkbar);
            head.backward_keys(kv, &dh, &dkbar, dk, dv);
        }
    }
}

/// [`Head::backward_queries`] of one query head `(q, o, den, g)` in blocks of
/// [`Head::scan_block`] rows, each block's row shifts computed while its queries are in cache
/// (one pass over the queries, not two); the same sums in the same order as one call.
#[allow(clippy::type_complexity)]
pub(crate) fn backward_queries_by_block<T: Scalar>(
    head: &Head<'_, T>,
    (q, o, den, g): (Rows<'_, T>, Rows<'_, T>, &[T], Rows<'_, T>),
    kbar: &[T],
    state: &[T],
    dq: &mut RowsMut<'_, T>,
    dstate: &mut [T],
    dkbar: &mut [f64],
) {
    let n = q.rows();
    let block = head.scan_block(n);
    for b0 in (0..n).step_by(block) {
        let bn = block.min(n - b0);
        let qb = q.sub(b0, bn);
        let m = row_shifts(qb, kbar, head.scale, head.center);
        let x = QueryBack { q: qb, m: &m, o: o.sub(b0, bn), den: &den[b0..b0 + bn], g: g.sub(b0, bn) };
        head.backward_queries(&x, kbar, state, &mut dq.sub_mut(b0, bn), dstate, dkbar);
    }
}

/// Whether a polynomial call is causal. Its mask must be [`Mask::Full`] or [`Mask::Causal`] whose
/// query offset is the initial state's count `count` (0 without one: the earlier keys live in the
/// state, the call's own keys are its rows, `kv_len == seq_len`).
///
/// Errors: [`Error::BadInput`] (input `mask`) for a sliding window, another query offset, or
/// `kv_len ≠ seq_len`.
pub fn poly_mask(opts: &AttnOptions, s: &AttnShape, count: usize) -> Result<bool> {
    s.check_self("mask")?;
    match opts.mask {
        Mask::Full => Ok(false),
        Mask::Causal { q_offset } if q_offset == count => Ok(true),
        Mask::Causal { q_offset } => Err(Error::bad(
            "mask",
            format!(
                "query offset {q_offset} is not the position after the initial state's {count} keys: polynomial \
                 attention keeps earlier keys in its state (forward_poly_state)"
            ),
        )),
        Mask::Window { .. } => {
            Err(Error::bad("mask", "polynomial attention supports the full and causal masks, not a sliding window"))
        }
    }
}

/// Checks a state's buffers against the shape and feature width `r`.
///
/// Errors: [`Error::BadInput`] naming `name` when a buffer has the wrong length.
fn check_state<T>(name: &str, st: &PolyState<T>, s: &AttnShape, r: usize) -> Result<()> {
    let (hkv, d, e) = (s.kv_heads(), s.head_dim, s.head_dim_v + 1);
    for (field, len, want) in [
        ("s", st.s.len(), hkv * r * e),
        ("key_sum", st.key_sum.len(), hkv * d),
        ("reference", st.reference.len(), hkv * d),
    ] {
        if len != want {
            return Err(Error::bad(
                name,
                format!(
                    "{field} has {len} values, expected {want} ([batch, num_kv_heads, …] for r = {r}): a state of \
                     another shape or degree"
                ),
            ));
        }
    }
    Ok(())
}

/// The reference point of every key/value head (`[batch, num_kv_heads, head_dim]`): `reference`
/// if given, else the initial state's, else `None` (each head's default, [`kv_head`]).
///
/// Errors: [`Error::BadInput`] (input `reference`) for a wrong length, a reference without
/// centering, or one that differs from the initial state's.
fn resolve_reference<'a, T: Scalar>(
    s: &AttnShape,
    center: bool,
    reference: Option<&'a [T]>,
    initial: Option<&'a PolyState<T>>,
) -> Result<Option<&'a [T]>> {
    let want = s.kv_heads() * s.head_dim;
    if let Some(r) = reference {
        if r.len() != want {
            return Err(Error::bad(
                "reference",
                format!("expected {want} values ([batch, num_kv_heads, head_dim]), got {}", r.len()),
            ));
        }
        if !center {
            return Err(Error::bad("reference", "a reference point needs centering (PolyOptions::center)"));
        }
    }
    let from_state = initial.map(|st| st.reference.as_slice());
    if !center {
        if from_state.is_some_and(|c| c.iter().any(|x| *x != T::zero())) {
            return Err(Error::bad("initial", "the state was computed with centering, this call has none"));
        }
        return Ok(None);
    }
    match (reference, from_state) {
        (Some(r), Some(c)) if r != c => {
            Err(Error::bad("reference", "differs from the initial state's reference point: a sequence keeps one"))
        }
        (Some(r), _) => Ok(Some(r)),
        (None, c) => Ok(c),
    }
}

/// Every key/value head's [`KvHead`] over the batch ([`AttnShape::kv_heads`]): reference points
/// `reference` (`[batch, num_kv_heads, head_dim]`, default per head when `None`) and, causal, the
/// initial state's key sums and count.
pub(crate) fn kv_heads<'a, T: Scalar>(
    x: &Qkv<'a, T>,
    causal: bool,
    popts: &PolyOptions,
    reference: Option<&[T]>,
    initial: Option<&PolyState<T>>,
    ws: Option<&Workspace<T>>,
) -> Vec<KvHead<'a, T>> {
    let d = x.shape().head_dim;
    let block = |v: &'_ [T], h: usize| -> Vec<T> { v[h * d..(h + 1) * d].to_vec() };
    (0..x.shape().kv_heads())
        .into_par_iter()
        .map(|h| {
            let (kh, vh) = x.kv(h);
            let c = reference.map(|r| block(r, h));
            let ks = initial.map(|st| block(&st.key_sum, h));
            let offset = initial.map_or(0, |st| st.count);
            let buf = if causal { ws.and_then(|w| w.vecs.take()).unwrap_or_default() } else { Vec::new() };
            kv_head(kh, vh, causal, popts.center, popts.chunk, c.as_deref(), ks.as_deref(), offset, buf)
        })
        .collect()
}

/// `acc [d] += Σ_i x_i` over the rows of `x [n, d]` in f64, row by row (each column's sum in row
/// order, vectorized across the columns), the rows prefetched ahead: key means and key sums.
fn add_rows_f64<T: Scalar>(x: Rows<'_, T>, acc: &mut [f64]) {
    dispatch(
        #[inline(always)]
        || {
            for i in 0..x.rows() {
                x.prefetch_ahead(i);
                for (a, v) in acc.iter_mut().zip(x.row(i)) {
                    *a += v.as_f64();
                }
            }
        },
    );
}

/// Returns the causal prefix-mean buffers of `kvs` to `ws` for the next [`kv_heads`], up to one
/// per key/value head of this call (the pool never holds more than the widest call needs).
pub(crate) fn recycle<T: Scalar>(kvs: Vec<KvHead<'_, T>>, ws: &Workspace<T>) {
    let most = kvs.len();
    for kv in kvs {
        if kv.kbar.capacity() > kv.c.len() && ws.vecs.len() < most {
            ws.vecs.put(kv.kbar);
        }
    }
}

/// Non-causal `H'` of every key/value head, `[kv_heads, r, dv+1]` (empty under the causal mask).
pub(crate) fn kv_states<T: Scalar>(head: &Head<'_, T>, kvs: &[KvHead<'_, T>], causal: bool) -> Vec<T> {
    if causal {
        return Vec::new();
    }
    let len = head.r() * head.e();
    let mut out = vec![T::zero(); kvs.len() * len];
    out.par_chunks_mut(len).zip(kvs.par_iter()).for_each(|(h, kv)| head.kv_state(kv, h));
    out
}

/// Polynomial attention, forward, starting a sequence (see [`forward_poly_state`], with no initial
/// state and default reference points).
///
/// Errors: as [`forward_poly_state`].
pub fn forward_poly<T: Scalar>(x: &Qkv<'_, T>, opts: &AttnOptions, popts: &PolyOptions) -> Result<PolyOutput<T>> {
    forward_poly_state(x, opts, popts, None, None)
}

/// Polynomial attention, forward (MATH §3–4; AS23 Lemma 3.4, LSSSZ Lemma I.3); also ALTGrad's
/// forward (MATH §5: the same `Õ = D̃⁻¹ Φ_Q Φ_Kᵀ V`). The softmax weights `exp(s_ij)` are replaced
/// by `T_g(s_ij − τ q_i·k̄_i)` (degree `popts.degree`, row shift when `popts.center`, formed
/// without cancellation as `τ q_i·(k_j − c) − m_i`, MATH §3 "Reference point"). O(n·r·d_v) time
/// and O(C·r + r·d_v) extra memory per head with `r = C(d+g, g)` (plus, causal, the saved
/// [`PolySaved::block_states`], at most the size of `K` and `V`); the (sequence, head) pairs in
/// parallel, each sequential.
///
/// The mask is [`Mask::Full`] or [`Mask::Causal`] ([`poly_mask`]). Causal calls can continue a
/// sequence: `initial` is the [`PolySaved::final_state`] of the previous piece (row `i` is then
/// position `initial.count + i`, the mask's query offset, and `k̄_i` counts the earlier keys), and
/// the output's `final_state` continues this one. `reference`
/// (`[batch, num_kv_heads, head_dim]`) fixes the reference points, so that separate callers
/// (processes) can agree on one; by default the initial state's, else the mean of the first
/// `min(chunk, seq_len)` keys (causal) or of all keys (non-causal) of each key/value head.
///
/// Returns a [`PolyOutput`]: `o`, `lse = τ q_i·k̄_i + ln den_i`, the denominators and the
/// [`PolySaved`] states, reference points, shape and options, which [`backward_poly`] and
/// [`super::backward_altgrad`] reuse.
///
/// Errors: [`Error::BadInput`] for a non-positive scale, an odd or zero degree ("degree must be
/// even: …"), a zero chunk, a feature width above [`super::features::MAX_FEATURE_DIM`], a mask
/// [`poly_mask`] rejects, an `initial` state without the causal mask or of the wrong size, or a
/// `reference` of the wrong size, without centering, or other than the initial state's.
pub fn forward_poly_state<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    popts: &PolyOptions,
    initial: Option<&PolyState<T>>,
    reference: Option<&[T]>,
) -> Result<PolyOutput<T>> {
    let s = *x.shape();
    let rows = s.heads() * s.seq_len;
    let (mut o, mut lse, mut den) =
        (vec![T::zero(); rows * s.head_dim_v], vec![T::zero(); rows], vec![T::zero(); rows]);
    let out = PolyBuffers { o: &mut o, lse: &mut lse, den: &mut den };
    let saved = forward_poly_into(x, opts, popts, initial, reference, out, &Workspace::new())?;
    Ok(PolyOutput { o, lse, den, saved })
}

/// [`forward_poly_state`] into caller-owned buffers (overwritten), with scratch from `ws`; returns
/// the rest of the output.
///
/// Errors: as [`forward_poly_state`], or [`Error::BadInput`] (input `o`, `lse` or `den`) for a
/// buffer of the wrong length.
pub fn forward_poly_into<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    popts: &PolyOptions,
    initial: Option<&PolyState<T>>,
    reference: Option<&[T]>,
    out: PolyBuffers<'_, T>,
    ws: &Workspace<T>,
) -> Result<PolySaved<T>> {
    opts.validate()?;
    popts.validate()?;
    let s = *x.shape();
    let causal = poly_mask(opts, &s, initial.map_or(0, |st| st.count))?;
    let (n, d, dv) = (s.seq_len, s.head_dim, s.head_dim_v);
    s.check_len("o", out.o, s.num_heads, dv)?;
    s.check_rowwise("lse", out.lse)?;
    s.check_rowwise("den", out.den)?;
    let fm = FeatureMap::<T>::new(d, popts.degree)?;
    let head = Head { fm: &fm, dv, scale: opts.scale, center: popts.center, chunk: popts.chunk, ws };
    let len = head.r() * head.e();
    if let Some(st) = initial {
        if !causal {
            return Err(Error::bad("initial", "a state continues a causal sequence: the call has no causal mask"));
        }
        check_state("initial", st, &s, head.r())?;
    }
    let reference = resolve_reference(&s, popts.center, reference, initial)?;
    let kvs = kv_heads(x, causal, popts, reference, initial, Some(ws));
    let kv_state = kv_states(&head, &kvs, causal);
    let keep_blocks = causal && block_states_len(&s, popts.chunk, head.r()) > 0;
    let scans: Vec<(Vec<T>, Vec<T>)> = s
        .query_views(out.o, dv)
        .into_par_iter()
        .zip(out.lse.par_chunks_mut(n).zip(out.den.par_chunks_mut(n)))
        .enumerate()
        .map(|(h, (mut oh, (lh, dh)))| {
            let kvh = h / s.group();
            let qh = s.query(x.q(), h);
            if !causal {
                let state = State::Keys(&kv_state[kvh * len..(kvh + 1) * len]);
                forward_one(&head, qh, &kvs[kvh], state, &mut oh, lh, dh, None);
                return (Vec::new(), Vec::new());
            }
            let mut scan = initial.map_or_else(|| vec![T::zero(); len], |st| st.s[kvh * len..(kvh + 1) * len].to_vec());
            // every query head of a group scans the same keys: keep the first one's states
            let first = h % s.group() == 0;
            let mut starts = Vec::new();
            let keep = (first && keep_blocks).then_some(&mut starts);
            forward_one(&head, qh, &kvs[kvh], State::Scan(&mut scan), &mut oh, lh, dh, keep);
            if first {
                (scan, starts)
            } else {
                (Vec::new(), Vec::new())
            }
        })
        .collect();
    let (scans, block_states): (Vec<Vec<T>>, Vec<Vec<T>>) = scans.into_iter().unzip();
    let reference: Vec<T> = kvs.iter().flat_map(|kv| kv.c.iter().copied()).collect();
    let final_state = causal.then(|| {
        // Σ_j k_j per key/value head, the heads in parallel
        let sums: Vec<Vec<T>> = kvs
            .par_iter()
            .enumerate()
            .map(|(h, kv)| {
                let mut acc: Vec<f64> = match initial {
                    Some(st) => st.key_sum[h * d..(h + 1) * d].iter().map(|x| x.as_f64()).collect(),
                    None => vec![0.0; d],
                };
                add_rows_f64(kv.k, &mut acc);
                acc.into_iter().map(T::from_f64).collect()
            })
            .collect();
        let key_sum = sums.concat();
        PolyState {
            s: scans.concat(),
            key_sum,
            reference: reference.clone(),
            count: initial.map_or(0, |st| st.count) + n,
        }
    });
    recycle(kvs, ws);
    Ok(PolySaved {
        kv_state,
        reference,
        initial: initial.cloned(),
        final_state,
        block_states: block_states.concat(),
        shape: s,
        opts: *opts,
        popts: *popts,
    })
}

/// Checks a saved polynomial forward against the inputs, its `o`, `den` and `dout`, and builds
/// its feature map.
///
/// Errors: [`Error::BadInput`] when `fwd` was computed for another shape, for an `o`, `den`,
/// `dout`, reference, state or key/value state of the wrong size, or invalid saved options.
pub(crate) fn check_saved<T: Scalar>(
    x: &Qkv<'_, T>,
    fwd: &PolySaved<T>,
    o: &[T],
    den: &[T],
    dout: &[T],
) -> Result<FeatureMap<T>> {
    super::check_backward(x, &fwd.shape, o, dout)?;
    fwd.shape.check_rowwise("den", den)?;
    fwd.opts.validate()?;
    fwd.popts.validate()?;
    let s = fwd.shape;
    if fwd.reference.len() != s.kv_heads() * s.head_dim {
        return Err(Error::bad(
            "fwd",
            format!("reference has {} values, expected [batch, num_kv_heads, head_dim]", fwd.reference.len()),
        ));
    }
    let fm = FeatureMap::<T>::new(s.head_dim, fwd.popts.degree)?;
    let state_len = fm.dim() * (s.head_dim_v + 1);
    if !fwd.opts.is_causal() && fwd.kv_state.len() != s.kv_heads() * state_len {
        return Err(Error::bad(
            "fwd",
            format!("key/value state is not {} heads of [r, head_dim_v + 1] = {state_len} values", s.kv_heads()),
        ));
    }
    if let Some(st) = &fwd.initial {
        check_state("fwd", st, &s, fm.dim())?;
    }
    if !fwd.block_states.is_empty() {
        let want = if fwd.opts.is_causal() { block_states_len(&s, fwd.popts.chunk, fm.dim()) } else { 0 };
        if fwd.block_states.len() != want {
            return Err(Error::bad(
                "fwd",
                format!(
                    "block states have {} values, expected {want} or none ([batch, num_kv_heads, blocks − 1, r, \
                     head_dim_v + 1], causal only)",
                    fwd.block_states.len()
                ),
            ));
        }
    }
    Ok(fm)
}

/// Polynomial attention, backward of a call without a loss on its final state (see
/// [`backward_poly_state`]).
///
/// Errors: as [`backward_poly_state`].
pub fn backward_poly<T: Scalar>(x: &Qkv<'_, T>, fwd: &PolyOutput<T>, dout: &[T]) -> Result<AttnGrads<T>> {
    Ok(backward_poly_state(x, fwd, dout, None)?.0)
}

/// Polynomial attention, backward: the exact gradient of [`forward_poly_state`]'s function
/// (MATH §4), including the chain rule through the row shift `m_i` (which depends on `q_i` and the
/// keys; the reference point is a constant, as the function does not depend on it). `fwd` must
/// come from [`forward_poly_state`] on the same inputs (its shape, options, reference points and
/// initial state are used); `dout = dL/do [batch, seq_len, num_heads, head_dim_v]`; `dfinal`
/// (causal) is `dL/d(final state)` when the final state feeds a later piece or a loss (fla's
/// `dht`; zero when `None`).
///
/// Returns the gradients of `q`, `k`, `v` and, causal, the gradient of the initial state (fla's
/// `dh0`; `dkey_sum` collects `Σ_i τ dm_i q_i/(count + i + 1)` from the prefix means, plus
/// `dfinal`'s); chain pieces backwards by passing it as the previous piece's `dfinal`.
/// Non-causal: per query head `dΨ`, `dQ` and `dH'`; then per key/value head `dK`, `dV` from the
/// group's summed `dH'`. Causal: per query head a forward scan (`dQ`, intra-chunk terms) and a
/// reverse scan from `dS'_final` (`dK`, `dV`, `dS'_initial`), summed over each group; block by
/// block, last block first, from `fwd`'s [`PolySaved::block_states`] when it kept them (the same
/// gradients, each block's rows in cache between its two scans).
///
/// Errors: [`Error::BadInput`] when `fwd` was computed for another shape, `fwd`/`dout`/`dfinal`
/// have the wrong sizes, or `dfinal` is given without the causal mask.
pub fn backward_poly_state<T: Scalar>(
    x: &Qkv<'_, T>,
    fwd: &PolyOutput<T>,
    dout: &[T],
    dfinal: Option<&PolyStateGrad<T>>,
) -> Result<(AttnGrads<T>, Option<PolyStateGrad<T>>)> {
    let mut grads = AttnGrads::zeros(x.shape());
    let dinit = backward_poly_into(x, &fwd.saved, &fwd.o, &fwd.den, dout, dfinal, grads.as_mut(), &Workspace::new())?;
    Ok((grads, dinit))
}

/// [`backward_poly_state`] from a forward's [`PolySaved`] and its caller-owned `o` and `den`, into
/// caller-owned gradients (overwritten), with scratch from `ws`; returns the initial state's
/// gradient (causal).
///
/// Errors: as [`backward_poly_state`], or [`Error::BadInput`] naming a buffer of the wrong length.
#[allow(clippy::too_many_arguments)]
pub fn backward_poly_into<T: Scalar>(
    x: &Qkv<'_, T>,
    fwd: &PolySaved<T>,
    o: &[T],
    den: &[T],
    dout: &[T],
    dfinal: Option<&PolyStateGrad<T>>,
    mut grads: AttnGradsMut<'_, T>,
    ws: &Workspace<T>,
) -> Result<Option<PolyStateGrad<T>>> {
    let fm = check_saved(x, fwd, o, den, dout)?;
    let (s, opts, popts) = (fwd.shape, fwd.opts, fwd.popts);
    grads.check(&s)?;
    let (n, d, causal) = (s.seq_len, s.head_dim, opts.is_causal());
    let head = Head { fm: &fm, dv: s.head_dim_v, scale: opts.scale, center: popts.center, chunk: popts.chunk, ws };
    let len = head.r() * head.e();
    if let Some(df) = dfinal {
        if !causal {
            return Err(Error::bad("dfinal", "a state gradient needs the causal mask"));
        }
        let want = (s.kv_heads() * len, s.kv_heads() * d);
        if (df.ds.len(), df.dkey_sum.len()) != want {
            return Err(Error::bad("dfinal", format!("expected ds of {} and dkey_sum of {} values", want.0, want.1)));
        }
    }
    let kvs = kv_heads(x, causal, &popts, Some(&fwd.reference), fwd.initial.as_ref(), Some(ws));
    let view = |h: usize| (s.query(x.q(), h), s.out(o, h), s.out(dout, h), &den[h * n..(h + 1) * n]);
    // the forward's block states of one key/value head (check_saved checked the length)
    let per_kv = if fwd.block_states.is_empty() { 0 } else { fwd.block_states.len() / s.kv_heads() };
    if causal {
        let per_head = query_head_grads(&s, &mut grads, |h, dq, dk, dv| {
            let (qh, oh, gh, dh) = view(h);
            let kvh = h / s.group();
            let block = kvh * len..(kvh + 1) * len;
            let mut scan = fwd.initial.as_ref().map_or_else(|| vec![T::zero(); len], |st| st.s[block.clone()].to_vec());
            // the final state's gradient enters once per group, through its first query head
            let mut dscan = match dfinal {
                Some(df) if h % s.group() == 0 => df.ds[block].to_vec(),
                _ => vec![T::zero(); len],
            };
            let mut dks = vec![0.0f64; d];
            let starts = (per_kv > 0).then(|| &fwd.block_states[kvh * per_kv..(kvh + 1) * per_kv]);
            let st = State::Scan(&mut scan);
            backward_one(&head, qh, &kvs[kvh], st, oh, dh, gh, starts, &mut dscan, dq, dk, dv, &mut dks);
            Ok((dscan, dks))
        })?;
        let sums = sum_groups(per_head, s.group());
        // key_sum_final = key_sum_initial + Σ_j k_j: dfinal's dkey_sum reaches every key and the
        // initial sum
        let dsum = |h: usize| -> Vec<T> {
            dfinal.map_or_else(|| vec![T::zero(); d], |df| df.dkey_sum[h * d..(h + 1) * d].to_vec())
        };
        if dfinal.is_some() {
            s.kv_views(grads.dk, d).into_par_iter().enumerate().for_each(|(h, mut dkh)| {
                let add = dsum(h);
                for i in 0..dkh.rows() {
                    for (x, a) in dkh.row_mut(i).iter_mut().zip(&add) {
                        *x += *a;
                    }
                }
            });
        }
        let dkey_sum = sums
            .iter()
            .enumerate()
            .flat_map(|(h, (_, dks))| {
                dks.iter().zip(dsum(h)).map(|(a, b)| T::from_f64(a + b.as_f64())).collect::<Vec<_>>()
            })
            .collect();
        let ds = sums.into_iter().flat_map(|(ds, _)| ds).collect();
        recycle(kvs, ws);
        return Ok(Some(PolyStateGrad { ds, dkey_sum }));
    }
    // Non-causal: per query head dQ, dH' and dk̄; the group's sums feed one key pass per key/value head.
    grads.zero();
    let per_head: Vec<(Vec<T>, Vec<f64>)> = s
        .query_views(grads.dq, d)
        .into_par_iter()
        .enumerate()
        .map(|(h, mut dqh)| {
            let (qh, oh, gh, dh) = view(h);
            let kvh = h / s.group();
            let kv = &kvs[kvh];
            let (mut dstate, mut dkbar) = (vec![T::zero(); len], vec![0.0f64; d]);
            let state = &fwd.kv_state[kvh * len..(kvh + 1) * len];
            backward_queries_by_block(&head, (qh, oh, dh, gh), &kv.kbar, state, &mut dqh, &mut dstate, &mut dkbar);
            (dstate, dkbar)
        })
        .collect();
    let sums = sum_groups(per_head, s.group());
    let dks = s.kv_views(grads.dk, d);
    let dvs = s.kv_views(grads.dv, s.head_dim_v);
    dks.into_par_iter().zip(dvs).zip(kvs.par_iter().zip(sums.par_iter())).for_each(
        |((mut dkh, mut dvh), (kv, (dstate, dkbar)))| head.backward_keys(kv, dstate, dkbar, &mut dkh, &mut dvh),
    );
    Ok(None)
}

/// `[1/0!, 1/1!, …, 1/g!]`: the coefficients of `T_g`.
pub(crate) fn taylor_coefs<T: Scalar>(g: usize) -> Vec<T> {
    let mut c = Vec::with_capacity(g + 1);
    let mut f = 1.0f64;
    for t in 0..=g {
        if t > 0 {
            f /= t as f64;
        }
        c.push(T::from_f64(f));
    }
    c
}

/// `out[j] = Σ_t coef[t] x[j]ᵗ` by Horner's rule, one vector pass per coefficient (`coef` from
/// [`taylor_coefs`], possibly truncated: `T_{len−1}`).
#[inline(always)]
fn horner_into<T: Scalar>(coef: &[T], x: &[T], out: &mut [T]) {
    let (last, rest) = coef.split_last().expect("at least one coefficient");
    out.fill(*last);
    for c in rest.iter().rev() {
        for (o, v) in out.iter_mut().zip(x) {
            *o = *o * *v + *c;
        }
    }
}
