//! The safetensors format in memory (8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the raw data), so checkpoints can serialize tensors without
//! a temporary file and read them back from bytes fetched from an object store. Files written here load
//! with the `safetensors` Python package.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A tensor to write: its name, safetensors dtype (`F32`, `I64`, ...), shape and little-endian bytes.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// A tensor read back: its bytes are `data` of the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: std::ops::Range<usize>,
}

#[derive(Serialize, Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Bytes of one element of a safetensors dtype, `None` for dtypes this crate does not know.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

/// A tensor's place in a file being laid out: name, dtype and shape (its bytes come later).
pub struct TensorSpec<'a> {
    pub name: &'a str,
    pub dtype: &'a str,
    pub shape: &'a [usize],
}

/// Lays out a file of `tensors` (in order): returns a buffer of the full file size whose header is
/// written and whose data is zero, and each tensor's byte range in it, for the caller to fill in place
/// (one copy from tensor memory into the file image, nothing in between).
pub fn layout(
    tensors: &[TensorSpec<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<std::ops::Range<usize>>)> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut offset = 0usize;
    let mut ranges = Vec::with_capacity(tensors.len());
    for t in tensors {
        let elements: usize = t.shape.iter().product();
        let size = dtype_size(t.dtype).ok_or_else(|| {
            Error::Config(format!(
                "tensor {}: unknown safetensors dtype {}",
                t.name, t.dtype
            ))
        })?;
        let bytes = size * elements;
        let entry = HeaderEntry {
            dtype: t.dtype.to_string(),
            shape: t.shape.to_vec(),
            data_offsets: [offset, offset + bytes],
        };
        if header
            .insert(
                t.name.to_string(),
                serde_json::to_value(entry).expect("plain"),
            )
            .is_some()
        {
            return Err(Error::Config(format!(
                "tensor name {} appears twice",
                t.name
            )));
        }
        ranges.push(offset..offset + bytes);
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).expect("plain");
    // The data start is kept 8-byte aligned, as the reference writer does.
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let start = 8 + json.len();
    let mut out = Vec::with_capacity(start + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(start + offset, 0);
    let ranges = ranges
        .into_iter()
        .map(|r| r.start + start..r.end + start)
        .collect();
    Ok((out, ranges))
}

/// Serializes `tensors` (in the given order) with optional string `metadata`.
pub fn serialize(
    tensors: &[TensorRef<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let specs: Vec<TensorSpec<'_>> = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
        })
        .collect();
    let (mut out, ranges) = layout(&specs, metadata)?;
    for (t, range) in tensors.iter().zip(ranges) {
        if range.len() != t.data.len() {
            return Err(Error::Config(format!(
                "tensor {}: {} bytes of dtype {} do not fill shape {:?}",
                t.name,
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
        out[range].copy_from_slice(t.data);
    }
    Ok(out)
}

/// Parses a safetensors buffer: the tensors (sorted by data offset) and the metadata. `what` names the
/// buffer in errors (a file or object URL).
pub fn parse(bytes: &[u8], what: &str) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>)> {
    let bad = |why: String| Error::Config(format!("{what} is not a valid safetensors file: {why}"));
    if bytes.len() < 8 {
        return Err(bad(format!(
            "{} bytes, shorter than the header length",
            bytes.len()
        )));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let data_start = 8usize
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad(format!("header of {header_len} bytes runs past the end")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| bad(format!("header: {e}")))?;
    let data_len = bytes.len() - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, value) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| bad(format!("metadata: {e}")))?;
            continue;
        }
        let entry: HeaderEntry =
            serde_json::from_value(value).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        let [begin, end] = entry.data_offsets;
        let elements: usize = entry.shape.iter().product();
        let size = dtype_size(&entry.dtype)
            .ok_or_else(|| bad(format!("tensor {name}: unknown dtype {}", entry.dtype)))?;
        if begin > end || end > data_len || end - begin != size * elements {
            return Err(bad(format!(
                "tensor {name}: byte range {begin}..{end} does not hold {:?} of {} in {data_len} data bytes",
                entry.shape, entry.dtype
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype: entry.dtype,
            shape: entry.shape,
            data: data_start + begin..data_start + end,
        });
    }
    tensors.sort_by_key(|t| t.data.start);
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_tensors_and_metadata_and_rejects_bad_ranges() {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = 7i64.to_le_bytes().to_vec();
        let meta = BTreeMap::from([("step".to_string(), "12".to_string())]);
        let bytes = serialize(
            &[
                TensorRef {
                    name: "w",
                    dtype: "F32",
                    shape: &[2, 3],
                    data: &a,
                },
                TensorRef {
                    name: "step",
                    dtype: "I64",
                    shape: &[],
                    data: &b,
                },
            ],
            &meta,
        )
        .unwrap();
        assert_eq!(
            (bytes.len() - 8 - (a.len() + b.len())) % 8,
            0,
            "aligned data start"
        );
        let (tensors, read_meta) = parse(&bytes, "test").unwrap();
        assert_eq!(read_meta, meta);
        assert_eq!(tensors[0].name, "w");
        assert_eq!(tensors[0].shape, [2, 3]);
        assert_eq!(&bytes[tensors[0].data.clone()], &a[..]);
        assert_eq!(&bytes[tensors[1].data.clone()], &b[..]);
        assert!(serialize(
            &[TensorRef {
                name: "x",
                dtype: "F32",
                shape: &[2],
                data: &a
            }],
            &BTreeMap::new()
        )
        .is_err());
        let err = parse(&bytes[..bytes.len() - 1], "ckpt/model")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ckpt/model") && err.contains("tensor"),
            "{err}"
        );
    }
}
