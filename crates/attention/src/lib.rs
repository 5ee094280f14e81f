//! The attention kernel behind onnx-chat's `onnx_chat.CachedAttention` operator (the server's
//! `src/engine/attention.rs` registers it with ONNX Runtime): attention over a KV cache held in
//! per-row buffers `[rows, kv_heads, capacity, head_size]`, appending the new positions in place,
//! with all the query heads of a KV head computed together so each cached key and value is read once
//! per run.
//!
//! A crate of its own so that it is compiled optimised in every profile (the workspace's
//! `Cargo.toml` sets its `opt-level` for `dev`): its AVX2 intrinsics unoptimised made the debug
//! test suite's attention ~17× slower than ONNX Runtime's release-built kernels.
//!
//! **Exactness**: every output row (one query head at one position) goes through the same arithmetic
//! whatever else is computed beside it — how many positions the run holds (a prefill chunk or a
//! decode step), which rows decode with it in a batch, which thread takes it, what the buffer holds
//! outside the row's own keys: a score is one dot product with a fixed accumulation order, the
//! softmax runs over that row's own keys in order, and each output lane sums its row's weighted
//! values in position order.
//!
//! **Semantics** are ONNX Runtime 1.31's `GroupQueryAttention`'s for what onnx-chat uses: row `b`
//! holds `seqlens[b] + 1 − S` positions before the run, new position `s` sees every position up to
//! itself, or with a window `w` the last `w` of them, itself included.

use std::cell::RefCell;

/// Positions of keys and values processed together (per query row group) to keep them in cache.
const KEY_BLOCK: usize = 32;
/// Multiply-adds (query rows × keys × head size) under which a run stays on one thread.
pub const PARALLEL_MIN_WORK: usize = 1 << 19;
/// Query positions one task takes in a prefill chunk (each with all the query heads of one KV head).
const TILE: usize = 8;

/// How [`run`] runs its tasks: `par(n, f)` calls `f(0..n)`, in any order and on any threads.
pub type Parallel<'a> = &'a dyn Fn(usize, &(dyn Fn(usize) + Sync));

/// The shapes of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Rows (sequences).
    pub batch: usize,
    /// New positions per row.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
    /// Positions the past buffers hold (their axis 2).
    pub past_cap: usize,
    /// Positions the present buffers hold.
    pub cap: usize,
}

/// The operator's attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub scale: f32,
    /// Positions a query sees, itself included (`local_window_size`); `None` = all.
    pub window: Option<usize>,
}

/// The buffers of one run. `present_*` may be the same memory as `past_*`.
pub struct Buffers {
    pub query: *const f32,
    pub key: *const f32,
    pub value: *const f32,
    pub past_key: *const f32,
    pub past_value: *const f32,
    pub present_key: *mut f32,
    pub present_value: *mut f32,
    pub output: *mut f32,
}

// SAFETY: the pointers are only dereferenced inside `run`, whose tasks write disjoint parts of the
// outputs and read what no task writes.
unsafe impl Send for Buffers {}
unsafe impl Sync for Buffers {}

/// Each row's positions before the run (`seqlens_k + 1 − S`), checked against the buffers.
pub fn past_lengths(d: &Dims, seqlens: &[i32]) -> Result<Vec<usize>, String> {
    if seqlens.len() != d.batch {
        return Err(format!(
            "seqlens_k has {} rows, the query {}",
            seqlens.len(),
            d.batch
        ));
    }
    seqlens
        .iter()
        .enumerate()
        .map(|(b, &l)| {
            let total = l as i64 + 1;
            if total < d.seq as i64 {
                return Err(format!(
                    "row {b}: seqlens_k {l} leaves fewer positions than the {} new ones",
                    d.seq
                ));
            }
            if total as usize > d.cap {
                return Err(format!(
                    "row {b}: {total} positions do not fit the present buffer's {}",
                    d.cap
                ));
            }
            let past = total as usize - d.seq;
            if past > d.past_cap {
                return Err(format!(
                    "row {b}: {past} past positions, the past buffer holds {}",
                    d.past_cap
                ));
            }
            Ok(past)
        })
        .collect()
}

/// The attention of one run: appends the new keys and values to the present buffers, then computes
/// every query row. `par(n, f)` runs `f(0..n)`, in any order and on any threads.
///
/// # Safety
/// The buffers hold what `d` says (`query`/`output` `B·S·Nq·H`, `key`/`value` `B·S·Nkv·H`, pasts
/// `B·Nkv·past_cap·H`, presents `B·Nkv·cap·H`), and `past` comes from [`past_lengths`].
pub unsafe fn run(d: Dims, p: Params, buf: &Buffers, past: &[usize], par: Parallel<'_>) {
    let h = d.head_size;
    for (present, past_buf, new) in [
        (buf.present_key, buf.past_key, buf.key),
        (buf.present_value, buf.past_value, buf.value),
    ] {
        for (b, &len) in past.iter().enumerate() {
            for g in 0..d.kv_heads {
                let dst = present.add((b * d.kv_heads + g) * d.cap * h);
                if present.cast_const() != past_buf && len > 0 {
                    let src = past_buf.add((b * d.kv_heads + g) * d.past_cap * h);
                    std::ptr::copy_nonoverlapping(src, dst, len * h);
                }
                for s in 0..d.seq {
                    let src = new.add(((b * d.seq + s) * d.kv_heads + g) * h);
                    std::ptr::copy_nonoverlapping(src, dst.add((len + s) * h), h);
                }
            }
        }
    }
    let tiles = d.seq.div_ceil(TILE);
    let simd = Simd::detect(h);
    par(d.batch * d.kv_heads * tiles, &|task| {
        let tile = task % tiles;
        let g = (task / tiles) % d.kv_heads;
        let b = task / tiles / d.kv_heads;
        let s0 = tile * TILE;
        let s1 = (s0 + TILE).min(d.seq);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            attend_tile(&d, &p, buf, past[b], b, g, s0..s1, simd, &mut scratch);
        });
    });
}

#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The query positions `positions` of row `b`, with all the query heads of KV head `g`.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_tile(
    d: &Dims,
    p: &Params,
    buf: &Buffers,
    past: usize,
    b: usize,
    g: usize,
    positions: std::ops::Range<usize>,
    simd: Simd,
    scratch: &mut Scratch,
) {
    let h = d.head_size;
    let group = d.heads / d.kv_heads;
    let range = |s: usize| {
        let end = past + s + 1;
        let start = match p.window {
            Some(w) if end > w => end - w,
            _ => 0,
        };
        (start, end)
    };
    let lo = range(positions.start).0;
    let hi = range(positions.end - 1).1;
    let width = hi - lo;
    let rows = positions.len() * group;
    scratch.scores.clear();
    scratch.scores.resize(rows * width, 0.0);
    scratch.acc.clear();
    scratch.acc.resize(rows * h, 0.0);
    let keys = buf
        .present_key
        .cast_const()
        .add((b * d.kv_heads + g) * d.cap * h);
    let values = buf
        .present_value
        .cast_const()
        .add((b * d.kv_heads + g) * d.cap * h);
    let query = |s: usize, j: usize| {
        buf.query
            .add(((b * d.seq + s) * d.heads + g * group + j) * h)
    };
    let mut qs = Vec::with_capacity(group);
    // Scores, a block of keys at a time for all rows of the tile.
    for block in (lo..hi).step_by(KEY_BLOCK) {
        let block_end = (block + KEY_BLOCK).min(hi);
        for (i, s) in positions.clone().enumerate() {
            let (start, end) = range(s);
            let (t0, t1) = (block.max(start), block_end.min(end));
            if t0 >= t1 {
                continue;
            }
            qs.clear();
            qs.extend((0..group).map(|j| query(s, j)));
            for t in t0..t1 {
                let k = keys.add(t * h);
                for (jj, chunk) in qs.chunks(4).enumerate() {
                    let mut out = [0f32; 4];
                    simd.dots(chunk, k, h, &mut out);
                    for (c, &x) in out[..chunk.len()].iter().enumerate() {
                        let row = i * group + jj * 4 + c;
                        scratch.scores[row * width + t - lo] = x * p.scale;
                    }
                }
            }
        }
    }
    // Softmax of each row over its own keys.
    for (i, s) in positions.clone().enumerate() {
        let (start, end) = range(s);
        for j in 0..group {
            let row = i * group + j;
            let x = &mut scratch.scores[row * width + start - lo..row * width + end - lo];
            simd.softmax(x);
        }
    }
    // Weighted values, a block of positions at a time, each lane summed in position order.
    for block in (lo..hi).step_by(KEY_BLOCK) {
        let block_end = (block + KEY_BLOCK).min(hi);
        for (i, s) in positions.clone().enumerate() {
            let (start, end) = range(s);
            let (t0, t1) = (block.max(start), block_end.min(end));
            for j in 0..group {
                let row = i * group + j;
                if t0 < t1 {
                    let acc = scratch.acc.as_mut_ptr().add(row * h);
                    let w = &scratch.scores[row * width + t0 - lo..row * width + t1 - lo];
                    simd.weighted_sum(acc, w, values.add(t0 * h), h);
                }
            }
        }
    }
    for (i, s) in positions.enumerate() {
        for j in 0..group {
            let row = i * group + j;
            let out = buf
                .output
                .add(((b * d.seq + s) * d.heads + g * group + j) * h);
            std::ptr::copy_nonoverlapping(scratch.acc.as_ptr().add(row * h), out, h);
        }
    }
}

/// The vector primitives: AVX2 with FMA where the CPU has them and the head size is a multiple of
/// 16, plain loops otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    fn detect(head_size: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if head_size.is_multiple_of(16)
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2;
            }
        }
        let _ = head_size;
        Self::Scalar
    }

    /// `out[r] = q[r] · k` for up to 4 rows; each row's sum in the same order whatever the others.
    #[inline]
    unsafe fn dots(self, q: &[*const f32], k: *const f32, n: usize, out: &mut [f32; 4]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => match q.len() {
                4 => *out = avx2::dots::<4>([q[0], q[1], q[2], q[3]], k, n),
                3 => {
                    let r = avx2::dots::<3>([q[0], q[1], q[2]], k, n);
                    out[..3].copy_from_slice(&r);
                }
                2 => {
                    let r = avx2::dots::<2>([q[0], q[1]], k, n);
                    out[..2].copy_from_slice(&r);
                }
                _ => out[0] = avx2::dots::<1>([q[0]], k, n)[0],
            },
            Self::Scalar => {
                for (o, &q) in out.iter_mut().zip(q) {
                    let mut s = 0f32;
                    for i in 0..n {
                        s += *q.add(i) * *k.add(i);
                    }
                    *o = s;
                }
            }
        }
    }

    /// `y += Σₜ w[t]·x[t]` over `n` elements, `x[t]` the `n` elements at `x + t·n`; each element
    /// of `y` adds its terms in `t` order (so splitting `w` into consecutive runs changes nothing).
    #[inline]
    unsafe fn weighted_sum(self, y: *mut f32, w: &[f32], x: *const f32, n: usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::weighted_sum(y, w, x, n),
            Self::Scalar => {
                for (t, &a) in w.iter().enumerate() {
                    for i in 0..n {
                        *y.add(i) += a * *x.add(t * n + i);
                    }
                }
            }
        }
    }

    /// `x = softmax(x)` in place.
    fn softmax(self, x: &mut [f32]) {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = match self {
            // SAFETY: only selected where the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::exp_sum(x, max) },
            Self::Scalar => {
                let mut sum = 0f32;
                for v in x.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                sum
            }
        };
        let inv = 1.0 / sum;
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Dot products of `N` rows with one key; `n` a multiple of 16. Each row: two 8-lane
    /// accumulators over alternating halves of each 16, added, then summed across lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots<const N: usize>(q: [*const f32; N], k: *const f32, n: usize) -> [f32; N] {
        let mut a0 = [_mm256_setzero_ps(); N];
        let mut a1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i < n {
            let k0 = _mm256_loadu_ps(k.add(i));
            let k1 = _mm256_loadu_ps(k.add(i + 8));
            for r in 0..N {
                a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r].add(i)), k0, a0[r]);
                a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r].add(i + 8)), k1, a1[r]);
            }
            i += 16;
        }
        let mut out = [0f32; N];
        for r in 0..N {
            out[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
        }
        out
    }

    /// `y += Σₜ w[t]·x[t]` (rows of `n`, a multiple of 16): `L` vectors of `y` stay in registers
    /// while the rows go by; each lane is one chain of FMAs in `t` order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_sum_lanes<const L: usize>(y: *mut f32, w: &[f32], x: *const f32, n: usize) {
        let mut acc = [_mm256_setzero_ps(); L];
        for (l, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(y.add(8 * l));
        }
        for (t, &wt) in w.iter().enumerate() {
            let p = _mm256_set1_ps(wt);
            let row = x.add(t * n);
            for (l, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(row.add(8 * l)), *a);
            }
        }
        for (l, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(8 * l), *a);
        }
    }

    /// See [`super::Simd::weighted_sum`]; `n` a multiple of 16.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(y: *mut f32, w: &[f32], x: *const f32, n: usize) {
        let mut i = 0;
        while i + 64 <= n {
            weighted_sum_lanes::<8>(y.add(i), w, x.add(i), n);
            i += 64;
        }
        while i < n {
            weighted_sum_lanes::<2>(y.add(i), w, x.add(i), n);
            i += 16;
        }
    }

    /// `exp(x − max)` over 8 lanes (Cephes' single-precision polynomial; inputs at or below max).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_55));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// `x = exp(x − max)`; returns the sum (8 lanes in position order, then across lanes, then the
    /// tail).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let full = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i < full {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = hsum(acc);
        if full < x.len() {
            let mut tail = [f32::NEG_INFINITY; 8];
            tail[..x.len() - full].copy_from_slice(&x[full..]);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m));
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), e);
            for (v, &e) in x[full..].iter_mut().zip(&out) {
                *v = e;
                sum += e;
            }
        }
        sum
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    /// The attention as written in the exported graphs: scores, window and causal mask, softmax in
    /// f64, weighted sum.
    fn reference(
        d: &Dims,
        p: &Params,
        q: &[f32],
        kv: (&[f32], &[f32]),
        past: &[usize],
    ) -> Vec<f32> {
        let h = d.head_size;
        let group = d.heads / d.kv_heads;
        let mut out = vec![0f32; d.batch * d.seq * d.heads * h];
        for b in 0..d.batch {
            for s in 0..d.seq {
                for head in 0..d.heads {
                    let g = head / group;
                    let qv = &q[((b * d.seq + s) * d.heads + head) * h..][..h];
                    let end = past[b] + s + 1;
                    let start = match p.window {
                        Some(w) if end > w => end - w,
                        _ => 0,
                    };
                    let base = (b * d.kv_heads + g) * d.cap * h;
                    let scores: Vec<f64> = (start..end)
                        .map(|t| {
                            let kt = &kv.0[base + t * h..][..h];
                            qv.iter().zip(kt).map(|(a, b)| (a * b) as f64).sum::<f64>()
                                * p.scale as f64
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let o = &mut out[((b * d.seq + s) * d.heads + head) * h..][..h];
                    for (i, t) in (start..end).enumerate() {
                        let vt = &kv.1[base + t * h..][..h];
                        for (x, y) in o.iter_mut().zip(vt) {
                            *x += (e[i] / sum) as f32 * y;
                        }
                    }
                }
            }
        }
        out
    }

    fn random(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn serial(n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f);
    }

    /// Runs the kernel on random data with the given row lengths; returns (output, presents).
    fn run_case(
        d: Dims,
        p: Params,
        past: &[usize],
        shared: bool,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut seed = seed;
        let h = d.head_size;
        let q = random(d.batch * d.seq * d.heads * h, &mut seed);
        let k = random(d.batch * d.seq * d.kv_heads * h, &mut seed);
        let v = random(d.batch * d.seq * d.kv_heads * h, &mut seed);
        let mut pk = random(d.batch * d.kv_heads * d.past_cap * h, &mut seed);
        let mut pv = random(d.batch * d.kv_heads * d.past_cap * h, &mut seed);
        let mut sep_k = vec![0f32; d.batch * d.kv_heads * d.cap * h];
        let mut sep_v = sep_k.clone();
        let mut out = vec![0f32; d.batch * d.seq * d.heads * h];
        let (present_key, present_value) = if shared {
            (pk.as_mut_ptr(), pv.as_mut_ptr())
        } else {
            (sep_k.as_mut_ptr(), sep_v.as_mut_ptr())
        };
        let past_copy = (pk.clone(), pv.clone());
        let buf = Buffers {
            query: q.as_ptr(),
            key: k.as_ptr(),
            value: v.as_ptr(),
            past_key: past_copy.0.as_ptr(),
            past_value: past_copy.1.as_ptr(),
            present_key,
            present_value,
            output: out.as_mut_ptr(),
        };
        let buf = if shared {
            Buffers {
                past_key: present_key,
                past_value: present_value,
                ..buf
            }
        } else {
            buf
        };
        unsafe { run(d, p, &buf, past, &serial) };
        let (pk, pv) = if shared { (pk, pv) } else { (sep_k, sep_v) };
        // What the presents must hold: the past rows, then the new ones.
        for b in 0..d.batch {
            for g in 0..d.kv_heads {
                for s in 0..d.seq {
                    let at = ((b * d.kv_heads + g) * d.cap + past[b] + s) * h;
                    let new = ((b * d.seq + s) * d.kv_heads + g) * h;
                    assert_eq!(pk[at..at + h], k[new..new + h]);
                    assert_eq!(pv[at..at + h], v[new..new + h]);
                }
                for t in 0..past[b] {
                    let at = ((b * d.kv_heads + g) * d.cap + t) * h;
                    let old = ((b * d.kv_heads + g) * d.past_cap + t) * h;
                    assert_eq!(pk[at..at + h], past_copy.0[old..old + h]);
                }
            }
        }
        (out, q, pk, pv)
    }

    fn close(got: &[f32], want: &[f32]) {
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-5, "max difference {worst}");
    }

    #[test]
    fn matches_the_exported_attention_in_place_and_copied_windowed_and_batched() {
        for (seq, window, lens, heads, kv) in [
            (1, None, vec![37usize, 0, 5], 8, 2),
            (1, Some(7), vec![37, 3], 8, 2),
            (19, None, vec![0], 8, 2),
            (19, Some(5), vec![21], 6, 2),
            (3, Some(16), vec![30, 2], 9, 3),
            (12, None, vec![100], 4, 4),
        ] {
            for shared in [true, false] {
                for h in [32, 24] {
                    let d = Dims {
                        batch: lens.len(),
                        seq,
                        heads,
                        kv_heads: kv,
                        head_size: h,
                        past_cap: if shared { 160 } else { 101 },
                        cap: 160,
                    };
                    let p = Params { scale: 0.3, window };
                    let (out, q, pk, pv) = run_case(d, p, &lens, shared, 7);
                    close(&out, &reference(&d, &p, &q, (&pk, &pv), &lens));
                }
            }
        }
    }

    #[test]
    fn a_position_gets_the_same_bits_decoded_alone_in_a_chunk_and_batched() {
        // One row of 40 positions: prefilled as one chunk of 40, as 38 + 2, and decoded one at a
        // time beside another row; the last position's output must be bit-identical each way.
        let h = 32;
        let (heads, kv) = (8, 2);
        let mut seed = 11;
        let n = 40;
        let q = random(n * heads * h, &mut seed);
        let k = random(n * kv * h, &mut seed);
        let v = random(n * kv * h, &mut seed);
        let cap = 64;
        let run_chunks = |chunks: &[usize], other_row: bool| -> Vec<f32> {
            let rows = 1 + usize::from(other_row);
            let mut pk = vec![0f32; rows * kv * cap * h];
            let mut pv = pk.clone();
            let mut pos = 0;
            let mut last = Vec::new();
            for &c in chunks {
                let d = Dims {
                    batch: rows,
                    seq: c,
                    heads,
                    kv_heads: kv,
                    head_size: h,
                    past_cap: cap,
                    cap,
                };
                let mut qq = q[pos * heads * h..(pos + c) * heads * h].to_vec();
                let mut kk = k[pos * kv * h..(pos + c) * kv * h].to_vec();
                let mut vv = v[pos * kv * h..(pos + c) * kv * h].to_vec();
                if other_row {
                    qq.extend(random(c * heads * h, &mut 5));
                    kk.extend(random(c * kv * h, &mut 6));
                    vv.extend(random(c * kv * h, &mut 8));
                }
                let mut out = vec![0f32; rows * c * heads * h];
                let buf = Buffers {
                    query: qq.as_ptr(),
                    key: kk.as_ptr(),
                    value: vv.as_ptr(),
                    past_key: pk.as_ptr(),
                    past_value: pv.as_ptr(),
                    present_key: pk.as_mut_ptr(),
                    present_value: pv.as_mut_ptr(),
                    output: out.as_mut_ptr(),
                };
                let past: Vec<usize> = (0..rows)
                    .map(|r| if r == 0 { pos } else { 3 + pos })
                    .collect();
                unsafe {
                    run(
                        d,
                        Params {
                            scale: 1.0,
                            window: None,
                        },
                        &buf,
                        &past,
                        &serial,
                    )
                };
                last = out[(c - 1) * heads * h..c * heads * h].to_vec();
                pos += c;
            }
            last
        };
        let whole = run_chunks(&[40], false);
        assert_eq!(whole, run_chunks(&[38, 2], false));
        let mut steps = vec![30];
        steps.extend([1; 10]);
        assert_eq!(whole, run_chunks(&steps, true));
    }

    #[test]
    fn refuses_lengths_the_buffers_cannot_hold() {
        let d = Dims {
            batch: 1,
            seq: 4,
            heads: 2,
            kv_heads: 1,
            head_size: 16,
            past_cap: 8,
            cap: 8,
        };
        assert!(past_lengths(&d, &[2])
            .unwrap_err()
            .contains("fewer positions"));
        assert!(past_lengths(&d, &[8]).unwrap_err().contains("do not fit"));
        assert!(past_lengths(&d, &[1, 2]).unwrap_err().contains("rows"));
        assert_eq!(past_lengths(&d, &[7]).unwrap(), vec![4]);
    }
}
