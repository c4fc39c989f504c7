//! Training data: windows of tokenized text with a held-out split, and the multi-query
//! associative recall task (MQAR, Arora et al. 2023, "Zoology") generated on the fly.
//!
//! Every sequence is a pure function of `(seed, stream, step, index)` through [`Rng`]
//! (SplitMix64), so no RNG state has to be saved in a checkpoint: the data position *is* the step.

use crate::{Error, Result};

/// A small portable PRNG (SplitMix64, Steele–Lea–Flood 2014): the same numbers on every platform
/// and every version of this crate's dependencies.
#[derive(Clone, Debug)]
pub struct Rng(u64);

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator for one sequence: a hash of `(seed, stream, step, index)`.
    pub fn derive(seed: u64, stream: u64, step: u64, index: u64) -> Self {
        let mut h = mix64(seed ^ GOLDEN);
        for x in [stream, step, index] {
            h = mix64(h ^ x.wrapping_mul(GOLDEN).wrapping_add(0x632b_e59b_d9b4_e019));
        }
        Rng(h)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }
    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform integer in `[0, n)` (`n ≥ 1`; multiply-shift, bias below 2⁻⁶⁴·n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// RNG streams: training batches and the fixed evaluation set never share numbers.
pub(crate) const STREAM_TRAIN: u64 = 1;
pub(crate) const STREAM_EVAL: u64 = 2;

/// One training or evaluation sequence: token ids and the positions whose next-token prediction
/// is scored (`targets[j]` is the token row `positions[j]` must predict).
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    /// Input token ids `[seq_len]`.
    pub ids: Vec<u32>,
    /// Scored rows, increasing.
    pub positions: Vec<usize>,
    /// The token each scored row must predict.
    pub targets: Vec<u32>,
}

impl Sequence {
    /// Plain language modelling: every row but the last predicts the next id.
    pub fn next_token(ids: Vec<u32>) -> Self {
        let n = ids.len();
        Sequence { positions: (0..n.saturating_sub(1)).collect(), targets: ids[1.min(n)..].to_vec(), ids }
    }
}

/// Multi-query associative recall (Zoology's `multiquery_ar`): `pairs` key–value pairs, then a
/// query region in which each key appears once more; the model must output the key's value at
/// the query position. Keys come from `[1, vocab/2)`, values from `[vocab/2, vocab)`, both
/// without repetition inside a sequence; query offsets follow Zoology's power law
/// (`p(gap) ∝ gap^(α−1)`, α = 0.01, sampled without replacement); every other position holds a
/// uniformly random token from `[0, vocab)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mqar {
    /// Vocabulary size (≥ 4; keys and values each take half).
    pub vocab: usize,
    /// Sequence length (≥ 4·pairs).
    pub seq_len: usize,
    /// Key–value pairs per sequence.
    pub pairs: usize,
}

impl Mqar {
    /// Zoology's power-law exponent for query offsets.
    pub const POWER_A: f64 = 0.01;

    /// Checks the sizes; `input` names the flag in errors.
    pub fn new(vocab: usize, seq_len: usize, pairs: usize) -> Result<Self> {
        if pairs == 0 {
            return Err(Error::bad("--mqar-pairs", "must be at least 1"));
        }
        if 4 * pairs > seq_len {
            return Err(Error::bad(
                "--mqar-pairs",
                format!(
                    "{pairs} pairs need a sequence of at least {} tokens (4 per pair), got --seq-len {seq_len}",
                    4 * pairs
                ),
            ));
        }
        if vocab / 2 < pairs + 1 {
            return Err(Error::bad(
                "--vocab",
                format!("MQAR with {pairs} pairs needs a vocabulary of at least {} (distinct keys in [1, vocab/2) and values in [vocab/2, vocab)), got {vocab}", 2 * pairs + 2),
            ));
        }
        Ok(Mqar { vocab, seq_len, pairs })
    }

    /// One sequence drawn from `rng`.
    pub fn sample(&self, rng: &mut Rng) -> Sequence {
        let (v, n, p) = (self.vocab, self.seq_len, self.pairs);
        let half = v / 2;
        let keys = distinct(rng, 1, half, p);
        let values = distinct(rng, half, v, p);
        let mut ids: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
        for j in 0..p {
            ids[2 * j] = keys[j];
            ids[2 * j + 1] = values[j];
        }
        let ctx = 2 * p;
        let space = (n - ctx) / 2;
        // Power-law weights over gaps 1..=space, drawn without replacement.
        let mut w: Vec<f64> = (1..=space).map(|i| Self::POWER_A * (i as f64).powf(Self::POWER_A - 1.0)).collect();
        let mut total: f64 = w.iter().sum();
        let mut slots = Vec::with_capacity(p);
        for _ in 0..p {
            let mut u = rng.uniform() * total;
            let mut pick = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
            for (i, &x) in w.iter().enumerate() {
                if x > 0.0 && u < x {
                    pick = i;
                    break;
                }
                u -= x;
            }
            total -= w[pick];
            w[pick] = 0.0;
            slots.push(pick);
        }
        let mut qa: Vec<(usize, u32)> = Vec::with_capacity(p);
        for (j, &g) in slots.iter().enumerate() {
            let pos = ctx + 2 * g;
            ids[pos] = keys[j];
            qa.push((pos, values[j]));
        }
        qa.sort_unstable();
        Sequence { ids, positions: qa.iter().map(|x| x.0).collect(), targets: qa.iter().map(|x| x.1).collect() }
    }
}

/// `count` distinct integers from `[lo, hi)` (partial Fisher–Yates).
fn distinct(rng: &mut Rng, lo: usize, hi: usize, count: usize) -> Vec<u32> {
    let mut pool: Vec<u32> = (lo as u32..hi as u32).collect();
    for i in 0..count {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(count);
    pool
}

/// Tokenized text split into a training part and a held-out part (the last 10% of each file).
#[derive(Clone, Debug)]
pub struct TextData {
    /// Training tokens (the first 90% of every file, concatenated).
    pub train: Vec<u32>,
    /// Held-out tokens (the last 10% of every file, concatenated).
    pub val: Vec<u32>,
}

impl TextData {
    /// Splits each file's tokens 90/10 (`files`: `(name, ids)`) and checks there is enough of
    /// both parts for windows of `seq_len` tokens (validation windows may be shorter, ≥ 2).
    pub fn split(files: Vec<(String, Vec<u32>)>, seq_len: usize) -> Result<Self> {
        let (mut train, mut val) = (Vec::new(), Vec::new());
        let names: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
        for (_, ids) in files {
            let cut = ids.len() - ids.len() / 10;
            train.extend_from_slice(&ids[..cut]);
            val.extend_from_slice(&ids[cut..]);
        }
        let shown = names.join(", ");
        if train.len() < seq_len {
            return Err(Error::bad(
                &shown,
                format!(
                    "{} training tokens (90% of {}) are fewer than --seq-len {seq_len}",
                    train.len(),
                    train.len() + val.len()
                ),
            ));
        }
        if val.len() < 2 {
            return Err(Error::bad(
                &shown,
                format!("the held-out 10% has {} tokens; at least 2 are needed", val.len()),
            ));
        }
        Ok(TextData { train, val })
    }

    /// A training window of `seq_len` tokens starting at a uniformly random offset.
    pub fn sample(&self, rng: &mut Rng, seq_len: usize) -> Sequence {
        let start = rng.below(self.train.len() - seq_len + 1);
        Sequence::next_token(self.train[start..start + seq_len].to_vec())
    }

    /// The evaluation set: up to `count` consecutive non-overlapping held-out windows of
    /// `min(seq_len, held-out length)` tokens.
    pub fn eval_set(&self, seq_len: usize, count: usize) -> Vec<Sequence> {
        let len = seq_len.min(self.val.len());
        self.val.chunks_exact(len).take(count.max(1)).map(|w| Sequence::next_token(w.to_vec())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_a_pure_function_of_its_coordinates() {
        let a: Vec<u64> = (0..4).map(|_| Rng::derive(1, 2, 3, 4).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(Rng::derive(1, 2, 3, 4).next_u64(), Rng::derive(1, 2, 3, 5).next_u64());
        assert_ne!(Rng::derive(1, 2, 3, 4).next_u64(), Rng::derive(1, 2, 4, 4).next_u64());
        assert_ne!(Rng::derive(1, 1, 3, 4).next_u64(), Rng::derive(1, 2, 3, 4).next_u64());
        let mut r = Rng::derive(0, 0, 0, 0);
        let mut hist = [0usize; 4];
        for _ in 0..4000 {
            hist[r.below(4)] += 1;
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
        }
        assert!(hist.iter().all(|&h| (850..1150).contains(&h)), "{hist:?}");
    }

    #[test]
    fn mqar_structure() {
        let task = Mqar::new(64, 64, 8).unwrap();
        for i in 0..50 {
            let s = task.sample(&mut Rng::derive(7, STREAM_TRAIN, 0, i));
            assert_eq!(s.ids.len(), 64);
            assert_eq!(s.positions.len(), 8);
            let kv: Vec<(u32, u32)> = (0..8).map(|j| (s.ids[2 * j], s.ids[2 * j + 1])).collect();
            for &(k, v) in &kv {
                assert!((1..32).contains(&k) && (32..64).contains(&v));
            }
            let mut keys: Vec<u32> = kv.iter().map(|x| x.0).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), 8);
            for (&p, &t) in s.positions.iter().zip(&s.targets) {
                assert!((16..63).contains(&p) && (p - 16) % 2 == 0);
                let key = s.ids[p];
                assert_eq!(kv.iter().find(|x| x.0 == key).unwrap().1, t, "query answers its key's value");
            }
            assert!(s.positions.windows(2).all(|w| w[0] < w[1]));
        }
        assert!(Mqar::new(64, 31, 8).is_err());
        assert!(Mqar::new(16, 64, 8).is_err());
        assert!(Mqar::new(64, 64, 0).is_err());
    }

    #[test]
    fn text_split_and_windows() {
        let ids: Vec<u32> = (0..100).collect();
        let d = TextData::split(vec![("a".into(), ids.clone()), ("b".into(), ids)], 20).unwrap();
        assert_eq!(d.train.len(), 180);
        assert_eq!(&d.val[..10], &(90..100).collect::<Vec<u32>>()[..]);
        let ev = d.eval_set(8, 100);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].targets, (91..98).collect::<Vec<u32>>());
        let s = d.sample(&mut Rng::derive(0, 1, 2, 3), 20);
        assert_eq!(s.ids.len(), 20);
        assert_eq!(s.positions, (0..19).collect::<Vec<_>>());
        assert!(TextData::split(vec![("a".into(), (0..10).collect())], 20).is_err());
    }
}
