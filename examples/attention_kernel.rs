//! One attention node timed alone: ONNX Runtime's `GroupQueryAttention` against onnx-chat's
//! `onnx_chat.CachedAttention`, with Gemma-3n E2B's shapes (8 query heads over 2 KV heads of 256), the
//! cache bound in place as the server binds it, one row. Run by `tools/bench/attention_kernel.py`,
//! which writes the two one-node graphs: `attention_kernel DIR NEW_POSITIONS [THREADS]`.

use std::time::Instant;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::Tensor;

const KV_HEADS: usize = 2;
const HEAD: usize = 256;
const HEADS: usize = 8;
const CAPACITY: usize = 9216;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or("usage: attention_kernel DIR NEW_POSITIONS [THREADS]")?;
    let seq: usize = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(1);
    let threads: usize = args.get(3).map(|a| a.parse()).transpose()?.unwrap_or(2);
    let runs = if seq > 1 { 7 } else { 61 };
    let env = onnx_chat::engine::runtime::init(None)?;
    println!("new_positions\tpast\tkernel\tmedian_ms\tmin_ms");
    for past in [32usize, 512, 2000, 8000] {
        // Alternating, twice each.
        for kernel in ["gqa", "onnx-chat", "gqa", "onnx-chat"] {
            let mut builder = Session::builder(env)?.with_intra_threads(threads)?;
            if kernel == "onnx-chat" {
                builder = builder.with_operators(onnx_chat::engine::attention::domain()?)?;
            }
            let mut session = builder.commit_from_file(format!("{dir}/{kernel}.onnx"))?;
            let alloc = Allocator::default();
            let mut pk = Tensor::<f32>::new(&alloc, [1, KV_HEADS, CAPACITY, HEAD])?;
            pk.extract_tensor_mut().1.fill(0.01);
            let mut pv = Tensor::<f32>::new(&alloc, [1, KV_HEADS, CAPACITY, HEAD])?;
            pv.extract_tensor_mut().1.fill(0.02);
            let q =
                Tensor::<f32>::from_array(([1, seq, HEADS * HEAD], vec![0.1; seq * HEADS * HEAD]))?;
            let k = Tensor::<f32>::from_array((
                [1, seq, KV_HEADS * HEAD],
                vec![0.1; seq * KV_HEADS * HEAD],
            ))?;
            let v = Tensor::<f32>::from_array((
                [1, seq, KV_HEADS * HEAD],
                vec![0.1; seq * KV_HEADS * HEAD],
            ))?;
            let seqlens = Tensor::<i32>::from_array(([1], vec![(past + seq - 1) as i32]))?;
            let total =
                Tensor::<i32>::from_array((Vec::<usize>::new(), vec![(past + seq) as i32]))?;
            let cpu = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?;
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs {
                let mut bind = session.create_binding()?;
                for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                    bind.bind_input(name, t)?;
                }
                bind.bind_input("pk", &pk)?;
                bind.bind_input("pv", &pv)?;
                bind.bind_input("sl", &seqlens)?;
                bind.bind_input("tot", &total)?;
                bind.bind_output("prk", &mut pk)?;
                bind.bind_output("prv", &mut pv)?;
                bind.bind_output_to_device("o", &cpu)?;
                let t = Instant::now();
                drop(session.run_binding(&bind)?);
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{seq}\t{past}\t{kernel}\t{:.3}\t{:.3}",
                times[runs / 2],
                times[0]
            );
        }
    }
    Ok(())
}
