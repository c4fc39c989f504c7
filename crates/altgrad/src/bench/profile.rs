//! Stage breakdowns for the roofline: one head on one thread, the kernel timed whole and its
//! stages (feature map, its VJP, the GEMMs at the kernel's shapes, `exp`) re-timed separately;
//! "elementwise and other" is the remainder. The stage GEMMs run on buffers of the kernel's
//! shapes that stay in cache between calls, so their times are a slight underestimate (the
//! remainder absorbs the difference).

use super::median_time;
use crate::attention::cost::poly_flops;
use crate::attention::exact::{self, BLOCK_K, BLOCK_Q};
use crate::attention::features::FeatureMap;
use crate::attention::poly::{kv_head, row_shifts, Head, QueryBack, State};
use crate::attention::view::{Rows, RowsMut};
use crate::attention::Method;
use crate::attention::{AttnOptions, Workspace};
use crate::linalg::{matmul, rm, rm_mut, Scalar};
use crate::Result;
use faer::Par;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One stage of a kernel.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Stage {
    /// What the stage is.
    pub name: String,
    /// Seconds (median) for the whole forward + backward of one head.
    pub seconds: f64,
    /// FLOPs the stage does (0 where not counted, e.g. `exp` or the remainder).
    pub flops: f64,
    /// `flops / seconds / 1e9` (0 when not counted).
    pub gflops: f64,
    /// `seconds / total`.
    pub share: f64,
}

/// Stage breakdown of one configuration (one head, one thread).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageProfile {
    /// `exact` or `poly`.
    pub method: String,
    /// Sequence length.
    pub n: usize,
    /// Head width.
    pub head_dim: usize,
    /// Degree (poly).
    pub degree: Option<usize>,
    /// Feature width (poly).
    pub rank: Option<usize>,
    /// Causal mask.
    pub causal: bool,
    /// Chunk (poly).
    pub chunk: Option<usize>,
    /// Median seconds of forward + backward of one head (the kernel itself).
    pub total_s: f64,
    /// FLOPs of the cost model (MATH §7) for one head.
    pub flops: f64,
    /// Achieved GFLOP/s of one head.
    pub gflops: f64,
    /// `gflops / gemm_peak_1thread`.
    pub frac_of_peak_1thread: f64,
    /// The 1-thread f32 GEMM peak used.
    pub gemm_peak_1thread: f64,
    /// The multi-head run of the sweep at the same point, if any: its fraction of the all-thread peak.
    pub sweep_frac_of_peak: Option<f64>,
    /// Stages, largest first.
    pub stages: Vec<Stage>,
    /// What limits the kernel, from the breakdown.
    pub limiter: String,
}

impl StageProfile {
    /// A markdown section: header line, stage table, limiter.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let cfg = match (self.degree, self.rank) {
            (Some(g), Some(r)) => format!("d={} g={} r={} chunk={}", self.head_dim, g, r, self.chunk.unwrap_or(0)),
            _ => format!("d={}", self.head_dim),
        };
        let _ = writeln!(
            s,
            "**{} {cfg} causal={} n={}**: {:.3} s per head, {:.1} GFLOP/s = {}{}.\n",
            self.method,
            self.causal,
            self.n,
            self.total_s,
            self.gflops,
            super::of_1thread_peak(self.gflops, self.gemm_peak_1thread),
            self.sweep_frac_of_peak.map_or(String::new(), |f| format!(
                "; the 4-head sweep point reached {:.0}% of the all-thread peak",
                100.0 * f
            ))
        );
        let _ = writeln!(s, "| stage | s | share | GFLOP/s |");
        let _ = writeln!(s, "|---|---|---|---|");
        for st in &self.stages {
            let _ = writeln!(
                s,
                "| {} | {:.4} | {:.0}% | {} |",
                st.name,
                st.seconds,
                100.0 * st.share,
                if st.flops > 0.0 { format!("{:.1}", st.gflops) } else { "—".into() }
            );
        }
        let _ = writeln!(s, "\nLimiter: {}", self.limiter);
        s
    }
}

fn gen(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
        })
        .collect()
}

/// Times `count` GEMMs `[m, k]·[k, n]` on fixed buffers (`acc`, one thread); returns seconds.
fn gemm_time(m: usize, k: usize, n: usize, count: usize) -> f64 {
    if count == 0 || m == 0 || k == 0 || n == 0 {
        return 0.0;
    }
    let a = gen(m * k, 1);
    let b = gen(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    median_time(3, || {
        for _ in 0..count {
            matmul(rm_mut(&mut c, m, n), true, rm(&a, m, k), rm(&b, k, n), 1.0, Par::Seq);
        }
    })
}

fn finish_stages(total: f64, mut stages: Vec<Stage>) -> Vec<Stage> {
    let known: f64 = stages.iter().map(|s| s.seconds).sum();
    stages.push(Stage {
        name: "elementwise and other (remainder)".into(),
        seconds: (total - known).max(0.0),
        flops: 0.0,
        gflops: 0.0,
        share: 0.0,
    });
    for s in &mut stages {
        s.share = s.seconds / total;
        s.gflops = if s.flops > 0.0 && s.seconds > 0.0 { s.flops / s.seconds / 1e9 } else { 0.0 };
    }
    stages.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    stages
}

fn limiter(stages: &[Stage], peak1: f64) -> String {
    let mut s = String::new();
    for st in stages.iter().take(3) {
        let _ = write!(s, "{} {:.0}%", st.name, 100.0 * st.share);
        if st.flops > 0.0 {
            let _ = write!(s, " at {:.1} GFLOP/s ({})", st.gflops, super::of_1thread_peak(st.gflops, peak1));
        }
        s.push_str("; ");
    }
    s.trim_end_matches("; ").to_string()
}

/// Stage breakdown of polynomial attention (MATH §4) for one head of length `n`, width `d`,
/// degree `g`, centered, chunk `chunk`, f32, one thread: the kernel
/// (`poly::Head`: `kv_state` + `forward_queries` + `backward_queries` + `backward_keys`, or
/// `forward_causal` + `backward_causal`) timed whole, then the feature map passes
/// (`FeatureMap::apply_cols`), the feature VJP passes (`vjp_cols`), the GEMMs with the feature
/// width r (`C×r` chunks against `r×(d_v+1)` states) and, causal, the intra-chunk `C×C` GEMMs,
/// each re-timed at the kernel's shapes and counts. `peak1` is the 1-thread GEMM peak.
///
/// Errors: an invalid degree or a feature width over the limit.
pub fn profile_poly_stages(
    n: usize,
    d: usize,
    g: usize,
    causal: bool,
    chunk: usize,
    peak1: f64,
) -> Result<StageProfile> {
    let fm = FeatureMap::<f32>::new(d, g)?;
    let r = fm.dim();
    let dv = d;
    let e = dv + 1;
    let scale = 1.0 / (d as f64).sqrt();
    let c = chunk.max(1).min(n);
    let ws = Workspace::new();
    let head = Head { fm: &fm, dv, scale, center: true, chunk: c, ws: &ws };
    let (q, k, v, gr) = (gen(n * d, 11), gen(n * d, 12), gen(n * dv, 13), gen(n * dv, 14));
    let (qr, gv) = (Rows::contiguous(&q, n, d), Rows::contiguous(&gr, n, dv));
    let kv =
        kv_head(Rows::contiguous(&k, n, d), Rows::contiguous(&v, n, dv), causal, true, c, None, None, 0, Vec::new());
    let m = row_shifts(qr, &kv.kbar, scale, true);
    let reps = 3;
    let (mut o, mut den) = (vec![0.0f32; n * dv], vec![0.0f32; n]);
    let (mut dq, mut dk, mut dvv) = (vec![0.0f32; n * d], vec![0.0f32; n * d], vec![0.0f32; n * dv]);
    let mut st = vec![0.0f32; r * e];
    let mut dst = vec![0.0f32; r * e];
    let mut dks = vec![0.0f64; d];
    let total = median_time(reps, || {
        st.fill(0.0);
        if !causal {
            head.kv_state(&kv, &mut st);
        }
        {
            let mut om = RowsMut::contiguous(&mut o, n, dv);
            let state = if causal { State::Scan(&mut st) } else { State::Keys(&st) };
            match state {
                State::Scan(s) => head.forward_causal(qr, &kv, &m, s, &mut om, &mut den),
                State::Keys(s) => head.forward_queries(qr, &m, s, &mut om, &mut den),
            }
        }
        let or = Rows::contiguous(&o, n, dv);
        let (mut dqm, mut dkm) = (RowsMut::contiguous(&mut dq, n, d), RowsMut::contiguous(&mut dk, n, d));
        let mut dvm = RowsMut::contiguous(&mut dvv, n, dv);
        dst.fill(0.0);
        if causal {
            st.fill(0.0);
            let x = QueryBack { q: qr, m: &m, o: or, den: &den, g: gv };
            head.backward_causal(&x, &kv, &mut st, None, &mut dst, &mut dqm, &mut dkm, &mut dvm, &mut dks);
        } else {
            let x = QueryBack { q: qr, m: &m, o: or, den: &den, g: gv };
            head.backward_queries(&x, &kv.kbar, &st, &mut dqm, &mut dst, &mut dks);
            head.backward_keys(&kv, &dst, &dks, &mut dkm, &mut dvm);
        }
        std::hint::black_box(&dvv);
    });
    let chunks = n.div_ceil(c);
    // feature passes over all n rows: non-causal K, Q (fwd), Q, K (bwd); causal Q, K (fwd), Q, K (fwd scan), K, Q (reverse)
    let (apply_passes, vjp_passes) = if causal { (6, 2) } else { (4, 2) };
    let xt = gen(d * c, 21);
    let mut phit = vec![0.0f32; r * c];
    let t_apply = median_time(reps, || {
        for _ in 0..chunks * apply_passes {
            fm.apply_cols(&xt, c, &mut phit);
        }
    });
    let mut dphit = gen(r * c, 22);
    let mut dxt = vec![0.0f32; d * c];
    let t_vjp = median_time(reps, || {
        for _ in 0..chunks * vjp_passes {
            fm.vjp_cols(&xt, &phit, &mut dphit, c, &mut dxt);
        }
    });
    // GEMMs with r, shapes (m, k, n) per chunk as the kernel issues them:
    // non-causal: H' += ΦᵀV' (r,C,e); Y = ΨH' (C,r,e); dΨᵀ = H'dYᵀ (r,e,C); dH' += ΨᵀdY (r,C,e);
    //             dΦᵀ = dH'V'ᵀ (r,e,C); dV = Φ dH'_v (C,r,dv)
    // causal: Y = ΨS' (C,r,e); S' += ΦᵀV' (r,C,e) twice; dΨᵀ = S'dYᵀ (r,e,C); dΦᵀ = dS'V'ᵀ (r,e,C);
    //         dV += Φ dS'_v (C,r,dv); dS' += ΨᵀdY (r,C,e)
    let shapes: &[((usize, usize, usize), usize)] = if causal {
        &[((c, r, e), 1), ((r, c, e), 3), ((r, e, c), 2), ((c, r, dv), 1)]
    } else {
        &[((r, c, e), 2), ((c, r, e), 1), ((r, e, c), 2), ((c, r, dv), 1)]
    };
    let t_gemm_r: f64 = shapes.iter().map(|&((a, b, cc), k)| gemm_time(a, b, cc, chunks * k)).sum();
    let f_gemm_r: f64 = shapes.iter().map(|&((a, b, cc), k)| 2.0 * (a * b * cc * k * chunks) as f64).sum();
    let fa = (n * apply_passes) as f64 * 2.0 * r as f64;
    let fv = (n * vjp_passes) as f64 * 4.0 * r as f64;
    let mut stages = vec![
        Stage {
            name: format!("feature map φ ({apply_passes} passes)"),
            seconds: t_apply,
            flops: fa,
            gflops: 0.0,
            share: 0.0,
        },
        Stage {
            name: format!("feature VJP ({vjp_passes} passes)"),
            seconds: t_vjp,
            flops: fv,
            gflops: 0.0,
            share: 0.0,
        },
        Stage {
            name: format!("GEMMs with r (inner dim e = {e} or C = {c})"),
            seconds: t_gemm_r,
            flops: f_gemm_r,
            gflops: 0.0,
            share: 0.0,
        },
    ];
    if causal {
        // fwd: scores [C×d]·[d×C], A·V' [C×C]·[C×e]; bwd: scores, dA = dY V'ᵀ [C×e]·[e×C],
        // dq, dk [C×C]·[C×d], dv [C×C]·[C×dv]
        let t = gemm_time(c, d, c, 2 * chunks)
            + gemm_time(c, c, e, chunks)
            + gemm_time(c, e, c, chunks)
            + gemm_time(c, c, d, 3 * chunks);
        let f = (chunks * c * c) as f64 * 2.0 * (2.0 * d as f64 + 2.0 * e as f64 + 3.0 * d as f64);
        stages.push(Stage { name: "intra-chunk C×C GEMMs".into(), seconds: t, flops: f, gflops: 0.0, share: 0.0 });
    }
    let stages = finish_stages(total, stages);
    let flops = poly_flops(n, d, dv, r, causal, c);
    let gflops = flops / total / 1e9;
    Ok(StageProfile {
        method: Method::Poly.to_string(),
        n,
        head_dim: d,
        degree: Some(g),
        rank: Some(r),
        causal,
        chunk: Some(c),
        total_s: total,
        flops,
        gflops,
        frac_of_peak_1thread: gflops / peak1,
        gemm_peak_1thread: peak1,
        sweep_frac_of_peak: None,
        limiter: limiter(&stages, peak1),
        stages,
    })
}

/// Stage breakdown of exact attention (MATH §2, `attention::exact`) for one head of length `n`,
/// width `d`, f32, one thread: `forward_head` + `backward_head` timed whole, then the tile GEMMs
/// (forward `QKᵀ`, `PV`; backward `QKᵀ`, `PᵀG`, `GVᵀ`, `dS K`, `dSᵀQ`) and the `exp` of every tile
/// entry (forward and backward) re-timed at the kernel's tile shapes and counts.
pub fn profile_exact_stages(n: usize, d: usize, causal: bool, peak1: f64) -> StageProfile {
    let dv = d;
    let opts = AttnOptions::standard(d, causal);
    let (q, k, v, gr) = (gen(n * d, 31), gen(n * d, 32), gen(n * dv, 33), gen(n * dv, 34));
    let ws = Workspace::new();
    let total = median_time(3, || {
        let (qr, kr, vr) = (Rows::contiguous(&q, n, d), Rows::contiguous(&k, n, d), Rows::contiguous(&v, n, dv));
        let (mut o, mut lse) = (vec![0.0f32; n * dv], vec![0.0f32; n]);
        exact::forward_head(qr, kr, vr, &opts, &mut RowsMut::contiguous(&mut o, n, dv), &mut lse, &ws);
        let (mut dq, mut dk, mut dvv) = (vec![0.0f32; n * d], vec![0.0f32; n * d], vec![0.0f32; n * dv]);
        exact::backward_head(
            qr,
            kr,
            vr,
            Rows::contiguous(&o, n, dv),
            &lse,
            Rows::contiguous(&gr, n, dv),
            &opts,
            &mut RowsMut::contiguous(&mut dq, n, d),
            &mut RowsMut::contiguous(&mut dk, n, d),
            &mut RowsMut::contiguous(&mut dvv, n, dv),
            &ws,
        );
        std::hint::black_box(&dvv);
    });
    // tile counts (full tiles; partial tiles at the end counted as full: n a multiple of 128 here)
    let (mut fwd_tiles, mut bwd_tiles) = (0usize, 0usize);
    let mut i0 = 0;
    while i0 < n {
        let kend = if causal { (i0 + BLOCK_Q).min(n) } else { n };
        fwd_tiles += kend.div_ceil(BLOCK_K);
        i0 += BLOCK_Q;
    }
    let mut j0 = 0;
    while j0 < n {
        let start = if causal { (j0 / BLOCK_Q) * BLOCK_Q } else { 0 };
        bwd_tiles += (n - start).div_ceil(BLOCK_Q);
        j0 += BLOCK_K;
    }
    let (bq, bk) = (BLOCK_Q, BLOCK_K);
    let t_fwd = gemm_time(bq, d, bk, fwd_tiles) + gemm_time(bq, bk, dv, fwd_tiles);
    let t_bwd = gemm_time(bq, d, bk, bwd_tiles)
        + gemm_time(bk, bq, dv, bwd_tiles)
        + gemm_time(bq, dv, bk, bwd_tiles)
        + gemm_time(bq, bk, d, bwd_tiles)
        + gemm_time(bk, bq, d, bwd_tiles);
    let tile = (bq * bk) as f64;
    let f_fwd = fwd_tiles as f64 * tile * 2.0 * (d + dv) as f64;
    let f_bwd = bwd_tiles as f64 * tile * 2.0 * (3 * d + 2 * dv) as f64;
    let src: Vec<f32> = gen(bq * bk, 35).iter().map(|x| -x.abs() * 16.0).collect();
    let mut buf = src.clone();
    let t_exp = median_time(3, || {
        for _ in 0..fwd_tiles + bwd_tiles {
            buf.copy_from_slice(&src);
            f32::exp_inplace(&mut buf);
        }
    });
    let stages = finish_stages(
        total,
        vec![
            Stage {
                name: format!("forward tile GEMMs (QKᵀ, PV; k = {d} / {bk})"),
                seconds: t_fwd,
                flops: f_fwd,
                gflops: 0.0,
                share: 0.0,
            },
            Stage {
                name: "backward tile GEMMs (QKᵀ, PᵀG, GVᵀ, dS·K, dSᵀ·Q)".into(),
                seconds: t_bwd,
                flops: f_bwd,
                gflops: 0.0,
                share: 0.0,
            },
            Stage {
                name: format!(
                    "exp of every tile entry, fwd + bwd ({:.1} G exp/s)",
                    ((fwd_tiles + bwd_tiles) * bq * bk) as f64 / t_exp / 1e9
                ),
                seconds: t_exp,
                flops: 0.0,
                gflops: 0.0,
                share: 0.0,
            },
        ],
    );
    let flops = crate::attention::cost::exact_flops(n, d, dv, causal);
    let gflops = flops / total / 1e9;
    StageProfile {
        method: Method::Exact.to_string(),
        n,
        head_dim: d,
        degree: None,
        rank: None,
        causal,
        chunk: None,
        total_s: total,
        flops,
        gflops,
        frac_of_peak_1thread: gflops / peak1,
        gemm_peak_1thread: peak1,
        sweep_frac_of_peak: None,
        limiter: limiter(&stages, peak1),
        stages,
    }
}
