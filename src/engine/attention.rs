//! The decoder's attention kernel: `onnx_chat.CachedAttention`, an ONNX Runtime custom operator
//! that the attention fusion ([`super::rewrite`]) puts where each layer's attention was, in place of
//! `com.microsoft.GroupQueryAttention`, when the KV cache is 32-bit float.
//!
//! **Interface**: `GroupQueryAttention`'s, for the subset the fusion emits: inputs `query (B,S,Nq·H)`,
//! `key`/`value (B,S,Nkv·H)` (the new positions), `past_key`/`past_value (B,Nkv,C,H)`, `seqlens_k (B)`
//! (each row's last position after the run) and `total_sequence_length`; outputs the attention
//! `(B,S,Nq·H)` and `present_key`/`present_value`; attributes `num_heads`, `kv_num_heads`, `scale`,
//! `local_window_size` (a query sees the last `local_window_size` positions, itself included, as
//! ONNX Runtime 1.31's `GroupQueryAttention` does). When a
//! present is bound to the same buffer as its past, the new positions are written after each row's own
//! and nothing is copied; otherwise the past is copied into the present first.
//!
//! **Why not `GroupQueryAttention`**: ONNX Runtime 1.31's CPU kernel runs one matrix product per
//! *query* head, so at decode every key and value of a KV head is read from memory once per query head
//! that shares it (4× for Gemma-3n's 8 over 2); at 8 000 positions of context that is 3–7 ms per
//! full-attention layer per step on two AVX2 cores. This kernel computes all the query heads of a KV
//! head together: each key and value is read once per step.
//!
//! **Exactness** and the kernel itself: the `onnx-chat-attention` crate (`crates/attention`).

use ort::operator::{
    BoxedKernel, ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput,
    OperatorOutput,
};
use ort::value::TensorElementType;

pub use onnx_chat_attention::{past_lengths, run, Buffers, Dims, Params, PARALLEL_MIN_WORK};

/// The custom operators' domain (an opset import of the rewritten graph).
pub const DOMAIN: &str = "onnx_chat";
/// The operator's type.
pub const OP: &str = "CachedAttention";

/// The operator registered with ONNX Runtime (f32 tensors).
pub struct CachedAttention;

/// A domain holding [`CachedAttention`], for a session's builder.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?.add(CachedAttention)
}

impl Operator for CachedAttention {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let f = || OperatorInput::required(TensorElementType::Float32);
        let i = || OperatorInput::required(TensorElementType::Int32);
        [f(), f(), f(), f(), f(), i(), i()]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        let f = || OperatorOutput::required(TensorElementType::Float32);
        [f(), f(), f()]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let heads = ctx
            .get::<i64>("num_heads")
            .filter(|&n| n > 0)
            .ok_or_else(|| ort::Error::new("CachedAttention: num_heads must be > 0"))?;
        let kv_heads = ctx
            .get::<i64>("kv_num_heads")
            .filter(|&n| n > 0 && heads % n == 0)
            .ok_or_else(|| {
                ort::Error::new("CachedAttention: kv_num_heads must be > 0 and divide num_heads")
            })?;
        let scale = ctx.get::<f32>("scale").unwrap_or(0.0);
        let window = ctx
            .get::<i64>("local_window_size")
            .filter(|&w| w > 0)
            .map(|w| w as usize);
        Ok(Box::new(AttentionKernel {
            heads: heads as usize,
            kv_heads: kv_heads as usize,
            scale,
            window,
        }))
    }
}

struct AttentionKernel {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    window: Option<usize>,
}

impl Kernel for AttentionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let err = |m: String| ort::Error::new(format!("CachedAttention: {m}"));
        let input = |i: usize| {
            ctx.input(i)?
                .ok_or_else(|| err(format!("input {i} is missing")))
        };
        let (q, k, v, pk, pv, lens) = (
            input(0)?,
            input(1)?,
            input(2)?,
            input(3)?,
            input(4)?,
            input(5)?,
        );
        let (q_shape, q_data) = q.try_extract_tensor::<f32>()?;
        let (k_shape, k_data) = k.try_extract_tensor::<f32>()?;
        let (_, v_data) = v.try_extract_tensor::<f32>()?;
        let (past_shape, pk_data) = pk.try_extract_tensor::<f32>()?;
        let (_, pv_data) = pv.try_extract_tensor::<f32>()?;
        let (_, seqlens) = lens.try_extract_tensor::<i32>()?;
        if q_shape.len() != 3 || k_shape.len() != 3 || past_shape.len() != 4 {
            return Err(err(format!(
                "expected query/key of rank 3 and past of rank 4, got {q_shape:?}, {k_shape:?}, {past_shape:?}"
            )));
        }
        let (batch, seq) = (q_shape[0] as usize, q_shape[1] as usize);
        let head_size = q_shape[2] as usize / self.heads;
        let past_cap = past_shape[2] as usize;
        if q_shape[2] as usize != self.heads * head_size
            || k_shape[..2] != q_shape[..2]
            || k_shape[2] as usize != self.kv_heads * head_size
            || past_shape[0] as usize != batch
            || past_shape[1] as usize != self.kv_heads
            || past_shape[3] as usize != head_size
            || v_data.len() != k_data.len()
            || pv_data.len() != pk_data.len()
        {
            return Err(err(format!(
                "shapes do not agree: query {q_shape:?}, key {k_shape:?}, past {past_shape:?} ({} heads, {} kv heads)",
                self.heads, self.kv_heads
            )));
        }
        let total = seqlens
            .iter()
            .map(|&l| l as i64 + 1)
            .max()
            .unwrap_or(0)
            .max(0) as usize;
        let cap = past_cap.max(total);
        let out_shape = [
            batch as i64,
            self.kv_heads as i64,
            cap as i64,
            head_size as i64,
        ];
        let mut d = Dims {
            batch,
            seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_size,
            past_cap,
            cap,
        };
        let mut pres_k = ctx
            .output(1, out_shape.to_vec())?
            .ok_or_else(|| err("present_key is not wanted".into()))?;
        let mut pres_v = ctx
            .output(2, out_shape.to_vec())?
            .ok_or_else(|| err("present_value is not wanted".into()))?;
        let mut out = ctx
            .output(
                0,
                vec![batch as i64, seq as i64, (self.heads * head_size) as i64],
            )?
            .ok_or_else(|| err("output is not wanted".into()))?;
        let (pk_shape, pres_k) = pres_k.try_extract_tensor_mut::<f32>()?;
        d.cap = pk_shape[2] as usize;
        let pres_k = pres_k.as_mut_ptr();
        let pres_v = pres_v.try_extract_tensor_mut::<f32>()?.1.as_mut_ptr();
        let out = out.try_extract_tensor_mut::<f32>()?.1.as_mut_ptr();
        let past = past_lengths(&d, seqlens).map_err(err)?;
        let buf = Buffers {
            query: q_data.as_ptr(),
            key: k_data.as_ptr(),
            value: v_data.as_ptr(),
            past_key: pk_data.as_ptr(),
            past_value: pv_data.as_ptr(),
            present_key: pres_k,
            present_value: pres_v,
            output: out,
        };
        let params = Params {
            scale: if self.scale == 0.0 {
                1.0 / (head_size as f32).sqrt()
            } else {
                self.scale
            },
            window: self.window,
        };
        let failed = std::sync::Mutex::new(None);
        // Small runs stay on the calling thread: waking a pool thread costs more than they do.
        let work = past.iter().map(|&l| l + seq).sum::<usize>() * seq * self.heads * head_size;
        // SAFETY: the shapes were checked above; the tasks write disjoint output rows.
        unsafe {
            run(d, params, &buf, &past, &|n, f| {
                if work < PARALLEL_MIN_WORK {
                    (0..n).for_each(f);
                } else if let Err(e) = ctx.par_for(n, n, f) {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            });
        }
        failed
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Ok(()), Err)
    }
}
