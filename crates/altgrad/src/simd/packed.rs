//! A packed, cache-blocked f32 matrix product for operands larger than the caches (the models'
//! projections and LM head): the GotoBLAS/BLIS scheme around the register tile of
//! [`super::Vector`]. Blocks of `KC` rows of `B` (`NC` columns at a time) are packed once into
//! `NR`-wide panels and shared by the threads; each thread packs blocks of `MC` rows of `A` into
//! `MR`-tall panels and runs the micro-kernel over its part of the block, so every register
//! tile reads two contiguous streams (an `A` panel from L2, a `B` panel kept in L1) whatever the
//! operands' strides (transposed weights, transposed activations).
//!
//! Threads: the rows are split evenly over the threads (each share in blocks of at most `MC`
//! rows), with column groups when there are fewer blocks than threads; the tasks of one
//! `KC × NC` block run in rayon's pool (`parallel`); without it everything runs on the calling
//! thread. [`crate::linalg::matmul`] sends it every large parallel f32 product (projections,
//! their weight gradients, the LM head).

#[cfg(target_arch = "x86_64")]
use super::{Avx2, Avx512};
use super::{Level, Strided, Vector};
use rayon::prelude::*;
use std::cell::RefCell;

/// The register tile and cache blocks of one instruction set, and its compiled entry.
pub(crate) trait Packed: Vector {
    /// Rows of the register tile.
    const MR: usize;
    /// Registers of columns of the register tile (`NR = NV · LANES`).
    const NV: usize;
    /// Depth of a packed block (rows of `B`, columns of `A`) on every CPU but AMD family 19h:
    /// `KC × NR` floats of `B` stay in L1 (AVX-512: 128 × 64 floats = 32 KB of the Xeon's 48 KB;
    /// 256 measured 15–20% slower there).
    const KC: usize;
    /// Depth of a packed block on AMD family 19h (Zen 3 and Zen 4; [`depth`]): Zen 4's L1 holds
    /// 32 KB, so no useful `B` panel stays in it, and its AVX-512 (two 256-bit halves per
    /// instruction) does half the Xeon's FMAs per cycle, so the panel streams from L2 fast enough;
    /// a deeper block loads and stores each `C` tile fewer times (AVX-512: 384 measured 1–14%
    /// faster than 128 on Zen 4, docs/BENCHMARKS.md). Zen 5 (family 1Ah: 48 KB L1, full-width
    /// AVX-512) is not measured and keeps `KC`.
    const KC_AMD: usize;
    /// Rows of `A` packed per task: `MC × KC` floats stay in L2.
    const MC: usize;
    /// Columns of `B` packed per block: `KC × NC` floats in L2/L3, shared by the threads.
    const NC: usize;

    /// The micro-kernel over one `A` panel and one `B` panel (see [`micro`]).
    ///
    /// # Safety
    /// As [`micro`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    );
}

/// `C[rows, cols] (+)= α · Ap · Bp` for a packed `A` panel (`kc × MR`, row `p` = the `MR`
/// values of column `p`) and a packed `B` panel (`kc × NR`, zero past the matrix): the
/// accumulators stay in registers over `kc`; only the `rows × cols` corner of the tile is stored.
///
/// # Safety
/// The CPU must have `S`'s instruction set (caller compiled for it); the panels must hold
/// `kc·MR` and `kc·NR` floats; `C` must be valid for `rows × cols` elements at row stride `rsc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<S: Vector, const MR: usize, const NV: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    acc: bool,
) {
    let l = S::LANES;
    let mut ab = [[S::splat(0.0); NV]; MR];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let mut bv = [S::splat(0.0); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = S::load(bp.add(v * l));
        }
        for (i, row) in ab.iter_mut().enumerate() {
            let ai = S::splat(*ap.add(i));
            for (x, bx) in row.iter_mut().zip(&bv) {
                *x = S::fma(ai, *bx, *x);
            }
        }
        ap = ap.add(MR);
        bp = bp.add(NV * l);
    }
    let al = S::splat(alpha);
    if rows == MR && cols == NV * l {
        for (i, row) in ab.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                let p = c.add(i * rsc + v * l);
                let old = if acc { S::load(p) } else { S::splat(0.0) };
                S::store(p, S::fma(al, *x, old));
            }
        }
    } else {
        for (i, row) in ab.iter().enumerate().take(rows) {
            for (v, x) in row.iter().enumerate() {
                if v * l >= cols {
                    break;
                }
                let m = S::mask(cols - v * l);
                let p = c.add(i * rsc + v * l);
                let old = if acc { S::load_m(p, m) } else { S::splat(0.0) };
                S::store_m(p, S::fma(al, *x, old), m);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    acc: bool,
) {
    micro::<Avx512, { <Avx512 as Packed>::MR }, { <Avx512 as Packed>::NV }>(kc, a, b, c, rsc, rows, cols, alpha, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    acc: bool,
) {
    micro::<Avx2, { <Avx2 as Packed>::MR }, { <Avx2 as Packed>::NV }>(kc, a, b, c, rsc, rows, cols, alpha, acc)
}

#[cfg(target_arch = "x86_64")]
impl Packed for Avx512 {
    // 32 registers: 6 × 4 accumulators, 4 of B, 1 broadcast
    const MR: usize = 6;
    const NV: usize = 4;
    const KC: usize = 128;
    const KC_AMD: usize = 384;
    const MC: usize = 240;
    const NC: usize = 2048;
    #[inline(always)]
    unsafe fn micro(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        micro_avx512(kc, a, b, c, rsc, rows, cols, alpha, acc)
    }
}

#[cfg(target_arch = "x86_64")]
impl Packed for Avx2 {
    // 16 registers: 6 × 2 accumulators, 2 of B, 1 broadcast
    const MR: usize = 6;
    const NV: usize = 2;
    const KC: usize = 256;
    const KC_AMD: usize = 256;
    const MC: usize = 240;
    const NC: usize = 2048;
    #[inline(always)]
    unsafe fn micro(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        acc: bool,
    ) {
        micro_avx2(kc, a, b, c, rsc, rows, cols, alpha, acc)
    }
}

/// This CPU's vendor and family: `(true, family)` on AMD, `(false, family)` otherwise (CPUID
/// leaf 0's vendor string "AuthenticAMD"; leaf 1's family, base plus extended when the base is
/// 0xF, as `/proc/cpuinfo`'s "cpu family"); detected once.
fn vendor_family() -> (bool, u32) {
    use std::sync::OnceLock;
    static VF: OnceLock<(bool, u32)> = OnceLock::new();
    *VF.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: CPUID leaves 0 and 1 exist on every x86-64 CPU (the intrinsic became a safe
            // fn in later Rust releases, hence the allow)
            #[allow(unused_unsafe)]
            let (r0, r1) = unsafe { (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1)) };
            // the vendor string is EBX, EDX, ECX: "Auth" "enti" "cAMD"
            let amd = (r0.ebx, r0.edx, r0.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
            let base = (r1.eax >> 8) & 0xF;
            let family = if base == 0xF { base + ((r1.eax >> 20) & 0xFF) } else { base };
            (amd, family)
        }
        #[cfg(not(target_arch = "x86_64"))]
        (false, 0)
    })
}

/// Depth of the packed blocks for `S` on this CPU: `S::KC_AMD` on AMD family 19h (Zen 3, Zen 4),
/// else `S::KC`.
fn depth<S: Packed>() -> usize {
    if vendor_family() == (true, 0x19) {
        S::KC_AMD
    } else {
        S::KC
    }
}

/// Packs `B[0..kc, 0..nc]` (element `(p, j)` at `b.ptr + p·rs + j·cs`) into `nr`-wide panels:
/// panel `q` is `[kc][nr]` for columns `q·nr..`, zero past `nc`.
unsafe fn pack_b(b: Strided, kc: usize, nc: usize, nr: usize, dst: &mut [f32]) {
    for (q, out) in dst.chunks_exact_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
        pack_b_panel(b, kc, nc, nr, q, out);
    }
}

/// Panel `q` of [`pack_b`].
unsafe fn pack_b_panel(b: Strided, kc: usize, nc: usize, nr: usize, q: usize, out: &mut [f32]) {
    let j0 = q * nr;
    let w = nr.min(nc - j0);
    if b.cs == 1 {
        for (p, row) in out.chunks_exact_mut(nr).take(kc).enumerate() {
            std::ptr::copy_nonoverlapping(b.ptr.add(p * b.rs + j0), row.as_mut_ptr(), w);
            row[w..].fill(0.0);
        }
    } else {
        // a transposed operand: column j of the panel is contiguous in memory (when rs = 1)
        for j in 0..w {
            let src = b.ptr.add((j0 + j) * b.cs);
            for p in 0..kc {
                *out.get_unchecked_mut(p * nr + j) = *src.add(p * b.rs);
            }
        }
        if w < nr {
            for row in out.chunks_exact_mut(nr).take(kc) {
                row[w..].fill(0.0);
            }
        }
    }
}

/// Packs `A[0..mc, 0..kc]` (element `(i, p)` at `a.ptr + i·rs + p·cs`) into `mr`-tall panels:
/// panel `t` is `[kc][mr]` for rows `t·mr..`, zero past `mc`.
unsafe fn pack_a(a: Strided, mc: usize, kc: usize, mr: usize, dst: &mut [f32]) {
    for (t, out) in dst.chunks_exact_mut(kc * mr).take(mc.div_ceil(mr)).enumerate() {
        let i0 = t * mr;
        let h = mr.min(mc - i0);
        if a.rs == 1 {
            // a transposed operand: the panel's rows at one depth are contiguous
            for (p, col) in out.chunks_exact_mut(mr).take(kc).enumerate() {
                std::ptr::copy_nonoverlapping(a.ptr.add(p * a.cs + i0), col.as_mut_ptr(), h);
                col[h..].fill(0.0);
            }
        } else {
            for i in 0..h {
                let src = a.ptr.add((i0 + i) * a.rs);
                for p in 0..kc {
                    *out.get_unchecked_mut(p * mr + i) = *src.add(p * a.cs);
                }
            }
            if h < mr {
                for col in out.chunks_exact_mut(mr).take(kc) {
                    col[h..].fill(0.0);
                }
            }
        }
    }
}

thread_local! {
    /// Each thread's packed `A` block (grown on demand, reused across calls).
    static A_PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's packed `B` block.
    static B_PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a thread-local scratch of at least `len` floats starting on a 64-byte boundary
/// (so no register load of a panel splits a cache line); a fresh one if this thread's is in use by
/// an outer call on the same thread.
fn with_scratch<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
        if v.len() < len + 16 {
            v.resize(len + 16, 0.0);
        }
        let off = v.as_ptr().align_offset(64).min(15);
        &mut v[off..off + len]
    }
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(aligned(&mut v, len)),
        Err(_) => f(aligned(&mut Vec::new(), len)),
    })
}

/// A pointer that may cross threads: the tasks write disjoint parts of `C`.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task writes a disjoint block of C (distinct rows × columns); the caller keeps C
// alive and unaliased for the whole call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[derive(Clone, Copy)]
struct SendStrided(Strided);

impl SendStrided {
    /// The operand (a method, so closures capture the whole Send wrapper, not its field).
    fn get(self) -> Strided {
        self.0
    }
}
// SAFETY: A and B are only read, and the caller keeps them alive for the whole call.
unsafe impl Send for SendStrided {}
unsafe impl Sync for SendStrided {}

/// `C = α·A·B` (`acc == false`) or `C += α·A·B` for `A [m, k]`, `B [k, n]` with any
/// non-negative strides and `C [m, n]` row-major (row stride `rsc`), packed and cache-blocked;
/// `parallel` spreads each block over rayon's pool; `depth_of` is the depth of the packed blocks
/// (`None`: [`depth`]).
///
/// # Safety
/// The CPU must have `S`'s instruction set (the caller is compiled for it or calls through
/// [`gemm`]); every addressed element of `A`, `B`, `C` must be valid and `C` must not overlap
/// `A` or `B`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_impl<S: Packed>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
    parallel: bool,
    depth_of: Option<usize>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * rsc), 0, n);
            }
        }
        return;
    }
    let (mr, nr) = (S::MR, S::NV * S::LANES);
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let (kc_max, mc_max, nc_max) = (depth_of.unwrap_or_else(depth::<S>).max(1), S::MC, S::NC);
    // row blocks: the rows split evenly over the threads, each share in blocks of ≤ MC rows
    let per_thread = m.div_ceil(threads);
    let mc = per_thread.div_ceil(per_thread.div_ceil(mc_max)).div_ceil(mr) * mr;
    let mblocks = m.div_ceil(mc);
    let (cp, ap) = (SendPtr(c), SendStrided(a));
    let mut jc = 0;
    while jc < n {
        let nc = nc_max.min(n - jc);
        let panels = nc.div_ceil(nr);
        // column groups when there are fewer row blocks than threads
        let groups = threads.div_ceil(mblocks).clamp(1, panels);
        let mut pc = 0;
        while pc < k {
            let kc = kc_max.min(k - pc);
            let first = pc == 0;
            let bblock = Strided { ptr: b.ptr.add(pc * b.rs + jc * b.cs), ..b };
            with_scratch(&B_PACK, panels * kc * nr, |bpack| {
                if threads > 1 && panels > 1 {
                    let bb = SendStrided(bblock);
                    bpack
                        .par_chunks_exact_mut(kc * nr)
                        .enumerate()
                        .for_each(|(q, out)| pack_b_panel(bb.get(), kc, nc, nr, q, out));
                } else {
                    pack_b(bblock, kc, nc, nr, bpack);
                }
                let bpack: &[f32] = bpack;
                let task = |t: usize| {
                    let (a, cp) = (ap.get(), cp);
                    let (ib, g) = (t / groups, t % groups);
                    let i0 = ib * mc;
                    let mcb = mc.min(m - i0);
                    let (q0, q1) = (g * panels / groups, (g + 1) * panels / groups);
                    if q0 == q1 {
                        return;
                    }
                    let ablock = Strided { ptr: a.ptr.add(i0 * a.rs + pc * a.cs), ..a };
                    with_scratch(&A_PACK, mcb.div_ceil(mr) * mr * kc, |apack| {
                        pack_a(ablock, mcb, kc, mr, apack);
                        let beta = acc || !first;
                        // B panel in L1 across the A panels (BLIS order)
                        for q in q0..q1 {
                            let j0 = q * nr;
                            let cols = nr.min(nc - j0);
                            let bpanel = bpack.as_ptr().add(q * kc * nr);
                            for (t, apanel) in apack.chunks_exact(kc * mr).take(mcb.div_ceil(mr)).enumerate() {
                                let r0 = t * mr;
                                let rows = mr.min(mcb - r0);
                                let cij = cp.0.add((i0 + r0) * rsc + jc + j0);
                                S::micro(kc, apanel.as_ptr(), bpanel, cij, rsc, rows, cols, alpha, beta);
                            }
                        }
                    });
                };
                let tasks = mblocks * groups;
                if threads > 1 && tasks > 1 {
                    (0..tasks).into_par_iter().for_each(task);
                } else {
                    (0..tasks).for_each(task);
                }
            });
            pc += kc;
        }
        jc += nc;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx512(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
    par: bool,
    kc: Option<usize>,
) {
    gemm_impl::<Avx512>(m, n, k, a, b, c, rsc, alpha, acc, par, kc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
    par: bool,
    kc: Option<usize>,
) {
    gemm_impl::<Avx2>(m, n, k, a, b, c, rsc, alpha, acc, par, kc)
}

/// `C = α·A·B` (`acc == false`) or `C += α·A·B` on this CPU's widest level: `A [m, k]` and
/// `B [k, n]` with any non-negative strides (element `(i, p)` of `A` at `a.ptr + i·a.rs + p·a.cs`),
/// `C [m, n]` row-major with row stride `rsc`; `parallel` uses rayon's pool; `kc` is the depth of
/// the packed blocks (`None`: this CPU's, [`depth`]; tests pass each). Returns `false`, touching
/// nothing, when the CPU has no SIMD level (the caller then uses its fallback).
///
/// # Safety
/// Every addressed element of `A`, `B`, `C` must be valid, and `C` must not overlap `A` or `B`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    level: Level,
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: Strided,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    acc: bool,
    parallel: bool,
    kc: Option<usize>,
) -> bool {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => gemm_avx512(m, n, k, a, b, c, rsc, alpha, acc, parallel, kc),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => gemm_avx2(m, n, k, a, b, c, rsc, alpha, acc, parallel, kc),
        _ => return false,
    }
    true
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The CPUID vendor and family agree with the kernel's `/proc/cpuinfo` (where there is one).
    #[test]
    fn vendor_matches_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return };
        let field = |name: &str| {
            let line = info.lines().find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))?;
            Some(line.split_once(':')?.1.trim().to_string())
        };
        let (Some(vendor), Some(family)) = (field("vendor_id"), field("cpu family")) else { return };
        let family: u32 = family.parse().expect("cpu family is a number");
        assert_eq!(vendor_family(), (vendor == "AuthenticAMD", family), "vendor_id {vendor:?}, family {family}");
        let zen34 = vendor == "AuthenticAMD" && family == 25;
        assert_eq!(depth::<Avx512>(), if zen34 { 384 } else { 128 });
    }

    /// Every level this CPU has and both block depths (Intel's and AMD's, whichever this CPU is),
    /// against an f64 triple loop: shapes that leave partial register tiles and partial cache
    /// blocks in every dimension, transposed operands, accumulation, one and several threads; C's
    /// padding must stay untouched.
    #[test]
    fn packed_gemm_matches_the_triple_loop() {
        let val = |i: usize| (((i * 2654435761) % 1000) as f32 / 500.0) - 1.0;
        let levels = Level::available().into_iter().filter(|l| *l != Level::Generic);
        let depths = [None, Some(<Avx512 as Packed>::KC), Some(<Avx512 as Packed>::KC_AMD), Some(<Avx2 as Packed>::KC)];
        for (level, kc) in levels.flat_map(|l| depths.map(|kc| (l, kc))) {
            for &(m, n, k) in &[(1, 1, 1), (7, 70, 300), (130, 65, 257), (61, 2100, 33), (300, 9, 520)] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    for (acc, par) in [(false, true), (true, false)] {
                        let (lda, ldb) = (if ta { m + 1 } else { k + 2 }, if tb { k + 3 } else { n + 1 });
                        let a: Vec<f32> = (0..if ta { k * lda } else { m * lda }).map(val).collect();
                        let b: Vec<f32> = (0..if tb { n * ldb } else { k * ldb }).map(|i| val(i + 5)).collect();
                        let sa = if ta {
                            Strided { ptr: a.as_ptr(), rs: 1, cs: lda }
                        } else {
                            Strided { ptr: a.as_ptr(), rs: lda, cs: 1 }
                        };
                        let sb = if tb {
                            Strided { ptr: b.as_ptr(), rs: 1, cs: ldb }
                        } else {
                            Strided { ptr: b.as_ptr(), rs: ldb, cs: 1 }
                        };
                        let rsc = n + 2;
                        let mut c: Vec<f32> = (0..m * rsc).map(|i| val(i + 9)).collect();
                        let c0 = c.clone();
                        // SAFETY: the buffers hold every element the strides address.
                        assert!(unsafe { gemm(level, m, n, k, sa, sb, c.as_mut_ptr(), rsc, 0.5, acc, par, kc) });
                        for i in 0..m {
                            for j in 0..rsc {
                                if j >= n {
                                    assert_eq!(c[i * rsc + j], c0[i * rsc + j], "padding touched");
                                    continue;
                                }
                                let want: f64 = (0..k)
                                    .map(|p| unsafe {
                                        *sa.ptr.add(i * sa.rs + p * sa.cs) as f64
                                            * *sb.ptr.add(p * sb.rs + j * sb.cs) as f64
                                    })
                                    .sum::<f64>()
                                    * 0.5
                                    + if acc { c0[i * rsc + j] as f64 } else { 0.0 };
                                let got = c[i * rsc + j] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                    "{level:?} kc {kc:?} {m}x{n}x{k} ta={ta} tb={tb}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
