//! Token embedding lookup and its backward (standard definition; MATH §6: differentiated
//! exactly).

use crate::linalg::Scalar;

/// Token embedding lookup (standard definition): `out[i, :] = table[ids[i], :]`.
///
/// Shapes: `ids [n]` (already validated `< vocab`), `table [vocab, hidden]`; returns `[n, hidden]`.
pub fn embedding_forward<T: Scalar>(ids: &[u32], table: &[T], hidden: usize) -> Vec<T> {
    debug_assert_eq!(table.len() % hidden.max(1), 0);
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        let r = id as usize * hidden;
        out.extend_from_slice(&table[r..r + hidden]);
    }
    out
}

/// Backward of [`embedding_forward`]: accumulates `dtable[ids[i], :] += dx[i, :]` for every `i`
/// (repeated ids add up).
///
/// Shapes: `ids [n]`, `dx [n, hidden]`, `dtable [vocab, hidden]`.
pub fn embedding_backward<T: Scalar>(ids: &[u32], dx: &[T], hidden: usize, dtable: &mut [T]) {
    assert_eq!(dx.len(), ids.len() * hidden, "embedding_backward: dx must be [n, hidden]");
    for (&id, g) in ids.iter().zip(dx.chunks_exact(hidden.max(1))) {
        let r = id as usize * hidden;
        for (d, &v) in dtable[r..r + hidden].iter_mut().zip(g) {
            *d += v;
        }
    }
}
