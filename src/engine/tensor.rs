//! Host-side tensors and the casts between sessions.
//!
//! Graph variants disagree on float width (fp16 graphs take and return float16; q4/int8/fp32 graphs use
//! float32). Values are kept as ORT values wherever they flow unchanged from one session to the next;
//! when a session declares another float type than the value has, [`cast_value`] converts it on the host.

use half::f16;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::session::ElemType;
use super::EngineError;

/// A float tensor on the host in whichever width a graph produced.
#[derive(Debug, Clone)]
pub enum FloatData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl FloatData {
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn elem_type(&self) -> ElemType {
        match self {
            Self::F32(_) => ElemType::F32,
            Self::F16(_) => ElemType::F16,
        }
    }

    /// Converts to the requested float width (a no-op move when it already matches).
    pub fn into_type(self, want: ElemType) -> Result<Self, EngineError> {
        Ok(match (self, want) {
            (Self::F32(v), ElemType::F16) => Self::F16(v.into_iter().map(f16::from_f32).collect()),
            (Self::F16(v), ElemType::F32) => Self::F32(v.into_iter().map(f16::to_f32).collect()),
            (s @ Self::F32(_), ElemType::F32) | (s @ Self::F16(_), ElemType::F16) => s,
            (_, other) => {
                return Err(EngineError::Tensor(format!(
                    "cannot convert floats to {other}"
                )))
            }
        })
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Self::F32(v) => v.clone(),
            Self::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Rows `lo..hi` (each `width` long) as a new tensor.
    pub fn rows(&self, width: usize, lo: usize, hi: usize) -> Result<FloatData, EngineError> {
        if lo > hi || hi * width > self.len() {
            return Err(EngineError::Tensor(format!(
                "rows {lo}..{hi} of width {width} from {} values",
                self.len()
            )));
        }
        Ok(match self {
            Self::F32(v) => Self::F32(v[lo * width..hi * width].to_vec()),
            Self::F16(v) => Self::F16(v[lo * width..hi * width].to_vec()),
        })
    }

    /// Copies `rows` (each `width` long) from `src` into rows `positions` of self.
    pub fn scatter_rows(
        &mut self,
        width: usize,
        positions: &[usize],
        src: &FloatData,
    ) -> Result<(), EngineError> {
        if src.len() != positions.len() * width {
            return Err(EngineError::Tensor(format!(
                "{} feature rows of width {width} for {} positions",
                src.len() / width.max(1),
                positions.len()
            )));
        }
        let src = src.clone().into_type(self.elem_type())?;
        match (self, &src) {
            (Self::F32(dst), Self::F32(s)) => {
                for (r, &p) in positions.iter().enumerate() {
                    dst[p * width..(p + 1) * width].copy_from_slice(&s[r * width..(r + 1) * width]);
                }
            }
            (Self::F16(dst), Self::F16(s)) => {
                for (r, &p) in positions.iter().enumerate() {
                    dst[p * width..(p + 1) * width].copy_from_slice(&s[r * width..(r + 1) * width]);
                }
            }
            _ => unreachable!("converted above"),
        }
        Ok(())
    }

    pub fn into_value(self, shape: &[i64]) -> Result<DynValue, EngineError> {
        let shape = shape.to_vec();
        Ok(match self {
            Self::F32(v) => Tensor::from_array((shape, v))
                .map_err(tensor_err)?
                .into_dyn(),
            Self::F16(v) => Tensor::from_array((shape, v))
                .map_err(tensor_err)?
                .into_dyn(),
        })
    }
}

pub(crate) fn tensor_err(e: ort::Error) -> EngineError {
    EngineError::Tensor(e.to_string())
}

/// Element type and shape of a value.
/// Bytes a tensor value's elements take (0 for what is not a tensor).
pub fn value_bytes(v: &DynValue) -> usize {
    value_info(v)
        .map(|(ty, shape)| {
            let n: i64 = shape.iter().product();
            n.max(0) as usize * ty.byte_size()
        })
        .unwrap_or(0)
}

pub fn value_info(v: &DynValue) -> Result<(ElemType, Vec<i64>), EngineError> {
    match v.dtype() {
        ValueType::Tensor { ty, shape, .. } => Ok((elem_of(*ty), shape.iter().copied().collect())),
        other => Err(EngineError::Tensor(format!(
            "expected a tensor, got {other}"
        ))),
    }
}

fn elem_of(t: TensorElementType) -> ElemType {
    match t {
        TensorElementType::Float32 => ElemType::F32,
        TensorElementType::Float16 => ElemType::F16,
        TensorElementType::Int64 => ElemType::I64,
        TensorElementType::Int32 => ElemType::I32,
        TensorElementType::Bool => ElemType::Bool,
        other => ElemType::Other(other),
    }
}

/// Copies a float value (f32 or f16) to the host.
pub fn extract_floats(v: &DynValue) -> Result<(FloatData, Vec<i64>), EngineError> {
    let (ty, shape) = value_info(v)?;
    let data = match ty {
        ElemType::F32 => FloatData::F32(
            v.try_extract_tensor::<f32>()
                .map_err(tensor_err)?
                .1
                .to_vec(),
        ),
        ElemType::F16 => FloatData::F16(
            v.try_extract_tensor::<f16>()
                .map_err(tensor_err)?
                .1
                .to_vec(),
        ),
        other => {
            return Err(EngineError::Tensor(format!(
                "expected a float tensor, got {other}"
            )))
        }
    };
    Ok((data, shape))
}

/// The last position's row of each batch row of a `[rows, positions, width]` value, as f32.
pub fn last_rows_f32(
    v: &DynValue,
    rows: usize,
    width: usize,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let (data, _) = extract_floats(v)?;
    let all = data.to_f32_vec();
    if rows == 0 || width == 0 || all.len() % (rows * width) != 0 {
        return Err(EngineError::Tensor(format!(
            "{} values do not split into {rows} rows of width {width}",
            all.len()
        )));
    }
    let per_row = all.len() / rows;
    Ok((0..rows)
        .map(|r| all[(r + 1) * per_row - width..(r + 1) * per_row].to_vec())
        .collect())
}

/// The last `width` floats of a value as f32 (e.g. the last position's logits), without copying the rest.
pub fn last_row_f32(v: &DynValue, width: usize) -> Result<Vec<f32>, EngineError> {
    let (ty, _) = value_info(v)?;
    match ty {
        ElemType::F32 => {
            let (_, d) = v.try_extract_tensor::<f32>().map_err(tensor_err)?;
            check_len(d.len(), width)?;
            Ok(d[d.len() - width..].to_vec())
        }
        ElemType::F16 => {
            let (_, d) = v.try_extract_tensor::<f16>().map_err(tensor_err)?;
            check_len(d.len(), width)?;
            Ok(d[d.len() - width..].iter().map(|x| x.to_f32()).collect())
        }
        other => Err(EngineError::Tensor(format!(
            "expected float logits, got {other}"
        ))),
    }
}

fn check_len(len: usize, width: usize) -> Result<(), EngineError> {
    if width == 0 || len < width || !len.is_multiple_of(width) {
        return Err(EngineError::Tensor(format!(
            "a tensor of {len} values has no rows of width {width}"
        )));
    }
    Ok(())
}

/// Returns `v` unchanged when it already has element type `want`, else a host-side converted copy.
pub fn cast_value(v: DynValue, want: ElemType) -> Result<DynValue, EngineError> {
    let (ty, shape) = value_info(&v)?;
    if ty == want {
        return Ok(v);
    }
    if !(ty.is_float() && want.is_float()) {
        return Err(EngineError::Tensor(format!(
            "cannot cast a {ty} tensor to {want}"
        )));
    }
    let (data, _) = extract_floats(&v)?;
    data.into_type(want)?.into_value(&shape)
}

/// An int64 tensor.
pub fn i64_value(shape: &[i64], data: Vec<i64>) -> Result<DynValue, EngineError> {
    Ok(Tensor::from_array((shape.to_vec(), data))
        .map_err(tensor_err)?
        .into_dyn())
}

/// A bool tensor.
pub fn bool_value(shape: &[i64], data: Vec<bool>) -> Result<DynValue, EngineError> {
    Ok(Tensor::from_array((shape.to_vec(), data))
        .map_err(tensor_err)?
        .into_dyn())
}

/// A zero-filled float tensor of the given type (used for empty KV caches, where one dim is 0).
pub fn zeros(ty: ElemType, shape: &[i64]) -> Result<DynValue, EngineError> {
    let n: i64 = shape.iter().product();
    let n = n.max(0) as usize;
    match ty {
        ElemType::F32 => FloatData::F32(vec![0.0; n]).into_value(shape),
        ElemType::F16 => FloatData::F16(vec![f16::ZERO; n]).into_value(shape),
        other => Err(EngineError::Tensor(format!(
            "cannot create a {other} cache tensor"
        ))),
    }
}

/// A zeroed float tensor from ONNX Runtime's CPU allocator. Unlike a value built from a host vector,
/// it can be bound as a run's pre-allocated output (the in-place KV buffers of [`super::kv`]).
pub fn alloc(ty: ElemType, shape: &[i64]) -> Result<DynValue, EngineError> {
    let et = match ty {
        ElemType::F32 => TensorElementType::Float32,
        ElemType::F16 => TensorElementType::Float16,
        other => {
            return Err(EngineError::Tensor(format!(
                "cannot allocate a {other} cache tensor"
            )))
        }
    };
    let t = ort::value::DynTensor::new(&ort::memory::Allocator::default(), et, shape.to_vec())
        .map_err(tensor_err)?;
    Ok(t.into_dyn())
}

/// The bytes of a float (f32 or f16) tensor.
pub fn raw(v: &DynValue) -> Result<&[u8], EngineError> {
    Ok(match value_info(v)?.0 {
        ElemType::F32 => {
            let (_, d) = v.try_extract_tensor::<f32>().map_err(tensor_err)?;
            // SAFETY: f32 has no padding; the byte view covers exactly the same memory.
            unsafe { std::slice::from_raw_parts(d.as_ptr().cast::<u8>(), std::mem::size_of_val(d)) }
        }
        ElemType::F16 => {
            let (_, d) = v.try_extract_tensor::<f16>().map_err(tensor_err)?;
            // SAFETY: as above (f16 is a plain u16).
            unsafe { std::slice::from_raw_parts(d.as_ptr().cast::<u8>(), std::mem::size_of_val(d)) }
        }
        other => return Err(EngineError::Tensor(format!("not a float tensor: {other}"))),
    })
}

/// The bytes of a float (f32 or f16) tensor, writable.
pub fn raw_mut(v: &mut DynValue) -> Result<&mut [u8], EngineError> {
    Ok(match value_info(v)?.0 {
        ElemType::F32 => {
            let (_, d) = v.try_extract_tensor_mut::<f32>().map_err(tensor_err)?;
            let n = std::mem::size_of_val(d);
            // SAFETY: f32 has no padding and every byte pattern is a valid f32.
            unsafe { std::slice::from_raw_parts_mut(d.as_mut_ptr().cast::<u8>(), n) }
        }
        ElemType::F16 => {
            let (_, d) = v.try_extract_tensor_mut::<f16>().map_err(tensor_err)?;
            let n = std::mem::size_of_val(d);
            // SAFETY: as above (f16 is a plain u16).
            unsafe { std::slice::from_raw_parts_mut(d.as_mut_ptr().cast::<u8>(), n) }
        }
        other => return Err(EngineError::Tensor(format!("not a float tensor: {other}"))),
    })
}

/// An int32 tensor.
pub fn i32_value(shape: &[i64], data: Vec<i32>) -> Result<DynValue, EngineError> {
    Ok(Tensor::from_array((shape.to_vec(), data))
        .map_err(tensor_err)?
        .into_dyn())
}

/// Floats given as f32 converted to a value of type `want` (f32 or f16).
pub fn float_value(want: ElemType, shape: &[i64], data: Vec<f32>) -> Result<DynValue, EngineError> {
    FloatData::F32(data).into_type(want)?.into_value(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_rows_converts_width() {
        let mut dst = FloatData::F16(vec![f16::ZERO; 6]);
        dst.scatter_rows(2, &[2, 0], &FloatData::F32(vec![1.0, 2.0, 3.0, 4.0]))
            .unwrap();
        assert_eq!(dst.to_f32_vec(), vec![3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
        let err = dst
            .scatter_rows(2, &[1], &FloatData::F32(vec![1.0; 4]))
            .unwrap_err();
        assert!(err.to_string().contains("2 feature rows"), "{err}");
    }
}
