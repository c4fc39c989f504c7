//! Non-causal polynomial attention split into its key side and its query side (MATH §4
//! "Non-causal", "Split across pieces"), for a sequence whose keys are spread over several places
//! (sequence parallelism: every process holds a slice of the rows).
//!
//! Without a mask, every query row reads the same key/value state `H' = Σ_j φ(√τ (k_j − c)) [v_j, 1]ᵀ`
//! (`[r, d_v + 1]` per key/value head) and the row shift `m_i = τ q_i·(k̄ − c)` with the key mean
//! `k̄` of the whole sequence. Both are sums over keys, so a sequence cut into pieces `p` is
//!
//! 1. [`poly_key_state`] of each piece's keys at one reference point `c` shared by all pieces;
//! 2. `H' = Σ_p H'_p` and `k̄ = Σ_p Σ_{j∈p} k_j / n` (the caller's all-reduce);
//! 3. [`poly_queries`] of each piece's queries against `H'` and `k̄ − c`.
//!
//! The backward reverses it: [`poly_queries_backward`] gives each piece `dq` and its queries'
//! share of `dH'` and `d(k̄ − c)`; the caller sums both over the pieces; [`poly_key_state_backward`]
//! gives each piece `dk`, `dv` from the summed `dH'`; the key-mean gradient reaches every key as
//! `d(k̄ − c)/n` through the caller's mean (`c` is a constant, as in [`super::poly`]). With one
//! piece and `c` the key mean this is [`super::forward_poly`] / [`super::backward_poly`] without a
//! mask, to rounding.

use super::features::FeatureMap;
use super::poly::{kv_heads, row_shifts, Head, KvHead, PolyOptions, QueryBack};
use super::workspace::Workspace;
use super::{sum_groups, AttnOptions, AttnShape, Mask, Qkv};
use crate::linalg::Scalar;
use crate::{Error, Result};
use rayon::prelude::*;

/// The gradients of [`poly_queries`]: `dq [batch, seq_len, num_heads, head_dim]`, this piece's
/// share of `dL/dH'` (`ds [batch, num_kv_heads, r, head_dim_v + 1]`, summed over each GQA group)
/// and of `dL/d(k̄ − c)` (`dkbar [batch, num_kv_heads, head_dim]`).
#[derive(Clone, Debug, PartialEq)]
pub struct SplitQueryGrads<T> {
    /// `dL/dq`.
    pub dq: Vec<T>,
    /// `dL/dH'` from these queries.
    pub ds: Vec<T>,
    /// `dL/d(k̄ − c)` from these queries (zeros without centering).
    pub dkbar: Vec<T>,
}

/// Checks the options of a split call, then runs `f` with its [`Head`] (feature map and scratch).
///
/// Errors: [`Error::BadInput`] (input `mask`) for a mask other than [`Mask::Full`], the options'
/// own errors, and `f`'s.
fn with_head<T: Scalar, R>(
    s: &AttnShape,
    opts: &AttnOptions,
    popts: &PolyOptions,
    f: impl FnOnce(&Head<'_, T>) -> Result<R>,
) -> Result<R> {
    opts.validate()?;
    popts.validate()?;
    s.check_self("attention shape")?;
    if opts.mask != Mask::Full {
        return Err(Error::bad(
            "mask",
            "split polynomial attention is non-causal (Mask::Full); causal pieces continue a state \
             (forward_poly_state)",
        ));
    }
    let fm = FeatureMap::<T>::new(s.head_dim, popts.degree)?;
    let ws = Workspace::new();
    f(&Head { fm: &fm, dv: s.head_dim_v, scale: opts.scale, center: popts.center, chunk: popts.chunk, ws: &ws })
}

/// Checks that `x` has `want` values ([`Error::BadInput`] naming `name` and `layout`).
fn check_len<T>(name: &str, x: &[T], want: usize, layout: &str) -> Result<()> {
    if x.len() != want {
        return Err(Error::bad(name, format!("expected {want} values ({layout}), got {}", x.len())));
    }
    Ok(())
}

/// The key/value heads of `x` at the reference points `reference` (`[batch, num_kv_heads,
/// head_dim]`; required with centering, which it must come with, else `None`).
fn split_kvs<'a, T: Scalar>(
    x: &Qkv<'a, T>,
    popts: &PolyOptions,
    reference: Option<&[T]>,
) -> Result<Vec<KvHead<'a, T>>> {
    let s = x.shape();
    match (popts.center, reference) {
        (true, None) => {
            return Err(Error::bad(
                "reference",
                "centered split calls need the reference point every piece shares ([batch, num_kv_heads, head_dim])",
            ))
        }
        (false, Some(_)) => return Err(Error::bad("reference", "a reference point needs centering")),
        (_, Some(r)) => check_len("reference", r, s.kv_heads() * s.head_dim, "[batch, num_kv_heads, head_dim]")?,
        _ => {}
    }
    Ok(kv_heads(x, false, popts, reference, None, None))
}

/// Key side, forward: `H'_p = Σ_j φ(√τ (k_j − c)) [v_j, 1]ᵀ` over the keys of `x` (its queries are
/// not read), `[batch, num_kv_heads, r, head_dim_v + 1]` with `r = C(head_dim + g, g)`, at the
/// reference points `reference` (`[batch, num_kv_heads, head_dim]`, the same on every piece;
/// `None` exactly when `popts.center` is off). O(n·r·d_v) per key/value head.
///
/// Errors: [`Error::BadInput`] for a mask other than [`Mask::Full`], `kv_len ≠ seq_len`, a missing,
/// superfluous or wrong-sized `reference`, and the options' errors ([`super::forward_poly`]).
pub fn poly_key_state<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    popts: &PolyOptions,
    reference: Option<&[T]>,
) -> Result<Vec<T>> {
    let s = *x.shape();
    with_head(&s, opts, popts, |head: &Head<'_, T>| {
        let kvs = split_kvs(x, popts, reference)?;
        let len = head.r() * head.e();
        let mut out = vec![T::zero(); kvs.len() * len];
        out.par_chunks_mut(len).zip(kvs.par_iter()).for_each(|(h, kv)| head.kv_state(kv, h));
        Ok(out)
    })
}

/// Key side, backward: `dk [batch, seq_len, num_kv_heads, head_dim]` and `dv [batch, seq_len,
/// num_kv_heads, head_dim_v]` of the keys of `x` from `ds = dL/dH'` (`[batch, num_kv_heads, r,
/// head_dim_v + 1]`, summed over every piece's queries). The key mean's gradient is not included:
/// it reaches the keys through the caller's mean.
///
/// Errors: as [`poly_key_state`], or [`Error::BadInput`] (input `ds`) for a wrong length.
pub fn poly_key_state_backward<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    popts: &PolyOptions,
    reference: Option<&[T]>,
    ds: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    let s = *x.shape();
    with_head(&s, opts, popts, |head: &Head<'_, T>| {
        let len = head.r() * head.e();
        check_len("ds", ds, s.kv_heads() * len, "[batch, num_kv_heads, r, head_dim_v + 1]")?;
        let kvs = split_kvs(x, popts, reference)?;
        let (mut dk, mut dv) = (
            vec![T::zero(); s.batch * s.kv_len * s.num_kv_heads * s.head_dim],
            vec![T::zero(); s.batch * s.kv_len * s.num_kv_heads * s.head_dim_v],
        );
        let zero = vec![0.0f64; s.head_dim];
        let dks = s.kv_views(&mut dk, s.head_dim);
        let dvs = s.kv_views(&mut dv, s.head_dim_v);
        dks.into_par_iter()
            .zip(dvs)
            .zip(kvs.par_iter().zip(ds.par_chunks(len)))
            .for_each(|((mut dkh, mut dvh), (kv, dsh))| head.backward_keys(kv, dsh, &zero, &mut dkh, &mut dvh));
        Ok((dk, dv))
    })
}

/// Checks the query side's `state` and `kbar` against the shape and feature width.
fn check_query_inputs<T>(s: &AttnShape, len: usize, state: &[T], kbar: &[T]) -> Result<()> {
    check_len("state", state, s.kv_heads() * len, "[batch, num_kv_heads, r, head_dim_v + 1]")?;
    check_len("kbar", kbar, s.kv_heads() * s.head_dim, "[batch, num_kv_heads, head_dim]")
}

/// Query side, forward: `o [batch, seq_len, num_heads, head_dim_v]` and the denominators
/// `den [batch, num_heads, seq_len]` of the queries of `x` (its keys are not read) against the
/// whole sequence's `state = H'` (`[batch, num_kv_heads, r, head_dim_v + 1]`, the sum of every
/// piece's [`poly_key_state`]) and `kbar = k̄ − c` (`[batch, num_kv_heads, head_dim]`: the whole
/// sequence's key mean minus the reference point; ignored without centering). Row `i` is
/// `o_i = Ψ_i H'[:, :d_v] / Ψ_i H'[:, d_v]` with `Ψ_i` the features of `√τ q_i` weighted by the
/// row shift `m_i = τ q_i·kbar` (MATH §3).
///
/// Errors: as [`poly_key_state`], or [`Error::BadInput`] (input `state` or `kbar`) for a wrong
/// length.
pub fn poly_queries<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    popts: &PolyOptions,
    state: &[T],
    kbar: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    let s = *x.shape();
    with_head(&s, opts, popts, |head: &Head<'_, T>| {
        let (len, n, d) = (head.r() * head.e(), s.seq_len, s.head_dim);
        check_query_inputs(&s, len, state, kbar)?;
        let mut o = vec![T::zero(); s.heads() * n * s.head_dim_v];
        let mut den = vec![T::zero(); s.heads() * n];
        s.query_views(&mut o, s.head_dim_v).into_par_iter().zip(den.par_chunks_mut(n)).enumerate().for_each(
            |(h, (mut oh, dh))| {
                let kvh = h / s.group();
                let qh = s.query(x.q(), h);
                let m = row_shifts(qh, &kbar[kvh * d..(kvh + 1) * d], opts.scale, popts.center);
                head.forward_queries(qh, &m, &state[kvh * len..(kvh + 1) * len], &mut oh, dh);
            },
        );
        Ok((o, den))
    })
}

/// Query side, backward: from `dout = dL/do` (`[batch, seq_len, num_heads, head_dim_v]`) and the
/// forward's `o`, `den` ([`poly_queries`] on the same `x`, `state`, `kbar`), the queries'
/// [`SplitQueryGrads`]: `dq` (including the path through the row shift), and this piece's
/// shares of `dL/dH'` and `dL/d(k̄ − c)`, each summed over the query heads of a GQA group.
///
/// Errors: as [`poly_queries`], or [`Error::BadInput`] (input `o`, `den` or `do`) for a wrong
/// length.
#[allow(clippy::too_many_arguments)]
pub fn poly_queries_backward<T: Scalar>(
    x: &Qkv<'_, T>,
    opts: &AttnOptions,
    popts: &PolyOptions,
    state: &[T],
    kbar: &[T],
    o: &[T],
    den: &[T],
    dout: &[T],
) -> Result<SplitQueryGrads<T>> {
    let s = *x.shape();
    with_head(&s, opts, popts, |head: &Head<'_, T>| {
        let (len, n, d) = (head.r() * head.e(), s.seq_len, s.head_dim);
        check_query_inputs(&s, len, state, kbar)?;
        s.check_len("o", o, s.num_heads, s.head_dim_v)?;
        s.check_len("do", dout, s.num_heads, s.head_dim_v)?;
        s.check_rowwise("den", den)?;
        let mut dq = vec![T::zero(); s.heads() * n * d];
        let per_head: Vec<(Vec<T>, Vec<f64>)> = s
            .query_views(&mut dq, d)
            .into_par_iter()
            .enumerate()
            .map(|(h, mut dqh)| {
                let kvh = h / s.group();
                let qh = s.query(x.q(), h);
                let kb = &kbar[kvh * d..(kvh + 1) * d];
                let m = row_shifts(qh, kb, opts.scale, popts.center);
                let back = QueryBack { q: qh, m: &m, o: s.out(o, h), den: &den[h * n..(h + 1) * n], g: s.out(dout, h) };
                let (mut dsh, mut dkb) = (vec![T::zero(); len], vec![0.0f64; d]);
                head.backward_queries(&back, kb, &state[kvh * len..(kvh + 1) * len], &mut dqh, &mut dsh, &mut dkb);
                (dsh, dkb)
            })
            .collect();
        let sums = sum_groups(per_head, s.group());
        let ds = sums.iter().flat_map(|(ds, _)| ds.iter().copied()).collect();
        let dkbar = sums.iter().flat_map(|(_, dk)| dk.iter().map(|x| T::from_f64(*x))).collect();
        Ok(SplitQueryGrads { dq, ds, dkbar })
    })
}
