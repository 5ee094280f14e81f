//! The protobuf wire format, as far as the rewrites need it: a field iterator over one message's
//! bytes, writers for tags, varints and length-delimited records, and the ONNX field numbers used.

use super::{err, RewriteError};

// ModelProto / GraphProto / NodeProto / AttributeProto / TensorProto field numbers (onnx.proto3).
pub(super) const MODEL_GRAPH: u32 = 7;
pub(super) const GRAPH_NODE: u32 = 1;
pub(super) const GRAPH_INPUT: u32 = 11;
pub(super) const GRAPH_INITIALIZER: u32 = 5;
pub(super) const GRAPH_OUTPUT: u32 = 12;
pub(super) const MODEL_OPSET_IMPORT: u32 = 8;
pub(super) const OPSET_DOMAIN: u32 = 1;
pub(super) const OPSET_VERSION: u32 = 2;
pub(super) const GRAPH_SPARSE_INITIALIZER: u32 = 15;
pub(super) const VALUE_INFO_NAME: u32 = 1;
pub(super) const VALUE_INFO_TYPE: u32 = 2;
pub(super) const TYPE_TENSOR: u32 = 1;
pub(super) const TYPE_TENSOR_ELEM: u32 = 1;
pub(super) const TYPE_TENSOR_SHAPE: u32 = 2;
pub(super) const SHAPE_DIM: u32 = 1;
pub(super) const DIM_VALUE: u32 = 1;
pub(super) const DIM_PARAM: u32 = 2;
pub(super) const TENSOR_BOOL: u64 = 9;
pub(super) const TENSOR_INT32: u64 = 6;
pub(super) const NODE_INPUT: u32 = 1;
pub(super) const NODE_OUTPUT: u32 = 2;
pub(super) const NODE_NAME: u32 = 3;
pub(super) const NODE_OP_TYPE: u32 = 4;
pub(super) const NODE_ATTRIBUTE: u32 = 5;
pub(super) const NODE_DOMAIN: u32 = 7;
pub(super) const ATTR_NAME: u32 = 1;
pub(super) const ATTR_F: u32 = 2;
pub(super) const ATTR_I: u32 = 3;
pub(super) const ATTR_INTS: u32 = 8;
pub(super) const ATTR_T: u32 = 5;
pub(super) const ATTR_G: u32 = 6;
pub(super) const ATTR_GRAPHS: u32 = 11;
pub(super) const ATTR_TENSORS: u32 = 10;
pub(super) const ATTR_SPARSE_TENSOR: u32 = 22;
pub(super) const ATTR_SPARSE_TENSORS: u32 = 23;
pub(super) const ATTR_TYPE: u32 = 20;
pub(super) const ATTR_TYPE_FLOAT: u64 = 1;
pub(super) const ATTR_TYPE_INT: u64 = 2;
pub(super) const ATTR_TYPE_INTS: u64 = 7;
pub(super) const ATTR_TYPE_TENSOR: u64 = 4;
pub(super) const TENSOR_DIMS: u32 = 1;
pub(super) const TENSOR_DATA_TYPE: u32 = 2;
pub(super) const TENSOR_INT64_DATA: u32 = 7;
pub(super) const TENSOR_FLOAT_DATA: u32 = 4;
pub(super) const TENSOR_NAME: u32 = 8;
pub(super) const TENSOR_RAW_DATA: u32 = 9;
pub(super) const TENSOR_FLOAT: u64 = 1;
pub(super) const TENSOR_INT64: u64 = 7;
pub(super) const TENSOR_EXTERNAL_DATA: u32 = 13;
pub(super) const TENSOR_DATA_LOCATION: u32 = 14;
pub(super) const TENSOR_LOCATION_EXTERNAL: u64 = 1;
pub(super) const ENTRY_KEY: u32 = 1;
pub(super) const ENTRY_VALUE: u32 = 2;
pub(super) const SPARSE_VALUES: u32 = 1;
pub(super) const SPARSE_INDICES: u32 = 2;

pub(super) const WIRE_VARINT: u8 = 0;
pub(super) const WIRE_I64: u8 = 1;
pub(super) const WIRE_LEN: u8 = 2;
pub(super) const WIRE_I32: u8 = 5;

/// One field of a message: its number, wire type, the whole record (tag included) and its payload.
pub(super) struct Field<'a> {
    pub num: u32,
    pub wire: u8,
    pub raw: &'a [u8],
    /// Length-delimited payload (empty for other wire types).
    pub body: &'a [u8],
}

pub(super) fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, RewriteError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let Some(&b) = buf.get(*pos) else {
            return err("truncated varint");
        };
        *pos += 1;
        if shift == 63 && b > 1 {
            return err("varint overflow");
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    err("varint too long")
}

pub(super) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

pub(super) fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf, pos: 0 }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, RewriteError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let start = self.pos;
        let r = (|| {
            let tag = read_varint(self.buf, &mut self.pos)?;
            let (num, wire) = ((tag >> 3) as u32, (tag & 7) as u8);
            if num == 0 {
                return err("field number 0");
            }
            let mut body: &[u8] = &[];
            match wire {
                WIRE_VARINT => {
                    read_varint(self.buf, &mut self.pos)?;
                }
                WIRE_I64 | WIRE_I32 => {
                    let n = if wire == WIRE_I64 { 8 } else { 4 };
                    if self.pos + n > self.buf.len() {
                        return err("truncated fixed-width field");
                    }
                    self.pos += n;
                }
                WIRE_LEN => {
                    let len = read_varint(self.buf, &mut self.pos)? as usize;
                    let end = self.pos.checked_add(len).filter(|&e| e <= self.buf.len());
                    let Some(end) = end else {
                        return err("length-delimited field runs past its message");
                    };
                    body = &self.buf[self.pos..end];
                    self.pos = end;
                }
                w => return err(format!("unsupported wire type {w}")),
            }
            Ok(Field {
                num,
                wire,
                raw: &self.buf[start..self.pos],
                body,
            })
        })();
        if r.is_err() {
            self.pos = self.buf.len();
        }
        Some(r)
    }
}

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) fn put_tag(out: &mut Vec<u8>, num: u32, wire: u8) {
    put_varint(out, (u64::from(num) << 3) | u64::from(wire));
}

pub(super) fn put_bytes(out: &mut Vec<u8>, num: u32, bytes: &[u8]) {
    put_tag(out, num, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub(super) fn put_uint(out: &mut Vec<u8>, num: u32, v: u64) {
    put_tag(out, num, WIRE_VARINT);
    put_varint(out, v);
}

/// The value of a varint field.
pub(super) fn varint_value(f: &Field) -> Result<u64, RewriteError> {
    let mut p = 0;
    read_varint(f.raw, &mut p)?; // the tag
    read_varint(f.raw, &mut p)
}

pub(super) fn text(b: &[u8]) -> Result<&str, RewriteError> {
    std::str::from_utf8(b).map_err(|_| RewriteError("a name is not UTF-8".into()))
}
