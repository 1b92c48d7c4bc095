//! The safetensors format in memory (8-byte little-endian header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the raw data), so checkpoints can serialize tensors without
//! a temporary file and read them back from bytes fetched from an object store.
//!
//! Reading is the `safetensors` crate's (it checks every shape x dtype against its byte range with checked
//! arithmetic, refuses gaps, overlaps and bytes no tensor covers, and caps the header), with errors that
//! name the tensor at fault. Writing is [`layout`], which hands out each tensor's place in the file image so
//! the caller fills it straight from tensor memory: the crate's `serialize` needs every tensor as a byte
//! slice first, which for a tensor means one more copy of it (`writer_speed` below measures both). Files
//! written here load with the `safetensors` Python package.

use std::collections::BTreeMap;

use ::safetensors::tensor::TensorInfo as Entry;
use ::safetensors::{SafeTensorError, SafeTensors};
use serde::Serialize;

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

#[derive(Serialize)]
struct HeaderEntry<'a> {
    dtype: &'a str,
    shape: &'a [usize],
    data_offsets: [usize; 2],
}

/// Bytes of one element of a safetensors dtype, `None` for dtypes this crate does not write.
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
    let bad = |why: String| Error::SafetensorsLayout(why);
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
        let size = dtype_size(t.dtype)
            .ok_or_else(|| bad(format!("tensor {}: unknown dtype {}", t.name, t.dtype)))?;
        let bytes = t
            .shape
            .iter()
            .try_fold(size, |bytes, &d| bytes.checked_mul(d))
            .filter(|bytes| offset.checked_add(*bytes).is_some())
            .ok_or_else(|| {
                bad(format!(
                    "tensor {}: shape {:?} of {} does not fit in memory",
                    t.name, t.shape, t.dtype
                ))
            })?;
        let entry = HeaderEntry {
            dtype: t.dtype,
            shape: t.shape,
            data_offsets: [offset, offset + bytes],
        };
        if header
            .insert(
                t.name.to_string(),
                serde_json::to_value(entry).expect("plain"),
            )
            .is_some()
        {
            return Err(bad(format!("tensor name {} appears twice", t.name)));
        }
        ranges.push(offset..offset + bytes);
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).expect("plain");
    // The data start is kept 8-byte aligned, as the reference writer does.
    json.resize(json.len().next_multiple_of(8), b' ');
    let start = 8 + json.len();
    // Zeroed by the allocator (fresh pages for a large image), not by a pass over it: the caller's fill
    // is the only pass over the data.
    let mut out = vec![0u8; start + offset];
    out[..8].copy_from_slice(&(json.len() as u64).to_le_bytes());
    out[8..start].copy_from_slice(&json);
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
            return Err(Error::SafetensorsLayout(format!(
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
    let (header_len, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::BadSafetensors {
            what: what.to_string(),
            why: explain(&e, bytes),
        })?;
    let data_start = 8 + header_len;
    let tensors = header
        .offset_keys()
        .into_iter()
        .map(|name| {
            let entry = header.info(&name).expect("a name the header lists");
            let (begin, end) = entry.data_offsets;
            TensorInfo {
                dtype: entry.dtype.to_string(),
                shape: entry.shape.clone(),
                data: data_start + begin..data_start + end,
                name,
            }
        })
        .collect();
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((tensors, metadata.into_iter().collect()))
}

/// What is wrong with a buffer the crate refused, naming the tensor at fault where there is one (the
/// crate's own messages do not always).
fn explain(error: &SafeTensorError, bytes: &[u8]) -> String {
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match (error, header_len) {
        (SafeTensorError::HeaderTooSmall, _) => format!(
            "{} bytes, shorter than the 8-byte header length",
            bytes.len()
        ),
        (SafeTensorError::HeaderTooLarge, Some(n)) => {
            format!("its header claims {n} bytes, more than the format's 100 MB limit")
        }
        (SafeTensorError::InvalidHeaderLength, Some(n)) => format!(
            "its header of {n} bytes runs past the end of its {} bytes",
            bytes.len()
        ),
        (SafeTensorError::InvalidHeader(e), _) => format!("header is not UTF-8: {e}"),
        (SafeTensorError::InvalidHeaderDeserialization(e), _) => format!("header: {e}"),
        (
            SafeTensorError::InvalidOffset(_)
            | SafeTensorError::TensorInvalidInfo
            | SafeTensorError::ValidationOverflow
            | SafeTensorError::MisalignedSlice
            | SafeTensorError::MetadataIncompleteBuffer,
            Some(n),
        ) => header_entries(bytes, n as usize)
            .and_then(|entries| {
                let data_len = bytes.len().saturating_sub(8 + n as usize);
                misplaced_tensor(&entries, data_len)
            })
            .unwrap_or_else(|| error.to_string()),
        _ => error.to_string(),
    }
}

/// The tensor entries of a header that parsed as JSON, in data order.
fn header_entries(bytes: &[u8], header_len: usize) -> Option<Vec<(String, Entry)>> {
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..header_len.checked_add(8)?)?).ok()?;
    let mut entries = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, value)| Some((name, serde_json::from_value::<Entry>(value).ok()?)))
        .collect::<Option<Vec<_>>>()?;
    entries.sort_by_key(|(_, e)| e.data_offsets);
    Some(entries)
}

/// The first tensor whose byte range does not follow the previous one's or does not hold its shape x
/// dtype, or the bytes no tensor covers.
fn misplaced_tensor(entries: &[(String, Entry)], data_len: usize) -> Option<String> {
    let mut end = 0usize;
    for (name, entry) in entries {
        let (begin, stop) = entry.data_offsets;
        let place = format!(
            "tensor {name}: byte range {begin}..{stop} for {:?} of {}",
            entry.shape, entry.dtype
        );
        if begin != end {
            let how = if begin < end {
                "overlaps"
            } else {
                "leaves a gap after"
            };
            return Some(format!(
                "{place} {how} the previous tensor's, which ends at {end}"
            ));
        }
        let bits = entry
            .shape
            .iter()
            .try_fold(entry.dtype.bitsize(), |bits, &d| bits.checked_mul(d));
        match bits {
            None => return Some(format!("{place}: the shape's size overflows")),
            Some(bits) if stop < begin || !bits.is_multiple_of(8) || stop - begin != bits / 8 => {
                return Some(format!("{place}: the range does not hold that shape"))
            }
            Some(_) => {}
        }
        end = stop;
    }
    (end != data_len).then(|| {
        format!("its tensors cover {end} data bytes but it holds {data_len} (truncated or padded)")
    })
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

    /// A file image with this JSON header (padded to 8 bytes) and `data` zero bytes.
    fn image(header: &str, data: usize) -> Vec<u8> {
        let mut json = header.as_bytes().to_vec();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.resize(out.len() + data, 0);
        out
    }

    fn refusal(bytes: &[u8]) -> String {
        parse(bytes, "ckpt/x").unwrap_err().to_string()
    }

    #[test]
    fn refuses_malformed_files_naming_what_is_wrong() {
        let ok = image(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}}"#,
            16,
        );
        let (tensors, _) = parse(&ok, "ok").unwrap();
        assert_eq!(tensors.len(), 2);
        let cases: [(&str, Vec<u8>, &[&str]); 9] = [
            ("short", vec![1, 2, 3], &["3 bytes", "header length"]),
            (
                "huge header",
                [u64::MAX.to_le_bytes().as_slice(), b"{}"].concat(),
                &["header claims 18446744073709551615 bytes"],
            ),
            (
                "header past the end",
                [64u64.to_le_bytes().as_slice(), b"{}      "].concat(),
                &["header of 64 bytes runs past the end"],
            ),
            ("not JSON", image("{\"a\":", 0), &["header:"]),
            (
                "overlap",
                image(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    12,
                ),
                &["tensor b", "4..12", "overlaps"],
            ),
            (
                "gap",
                image(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#,
                    16,
                ),
                &["tensor b", "gap"],
            ),
            (
                "shape x dtype",
                image(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
                &["tensor a", "[3]", "F32", "does not hold"],
            ),
            (
                "huge shape",
                image(
                    r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                    8,
                ),
                &["tensor a", "overflows"],
            ),
            (
                "truncated",
                ok[..ok.len() - 1].to_vec(),
                &["cover 16", "holds 15"],
            ),
        ];
        for (case, bytes, expected) in cases {
            let err = refusal(&bytes);
            assert!(
                err.starts_with("ckpt/x is not a valid safetensors file"),
                "{case}: {err}"
            );
            for part in expected {
                assert!(err.contains(part), "{case}: {err:?} does not say {part:?}");
            }
        }
    }

    /// Writer speed on a checkpoint-sized set of tensors (200 f32 tensors, 256 MiB in all): the layout
    /// writer here against the `safetensors` crate's `serialize`, in alternating rounds. A benchmark, not
    /// a check: it runs only under CELLFLEET_BENCH=1 (`CELLFLEET_BENCH=1 cargo nextest run --release -p
    /// cellfleet-shared --no-capture writer_speed`) and prints the medians.
    #[test]
    fn writer_speed() {
        if std::env::var_os("CELLFLEET_BENCH").is_none() {
            return;
        }
        const TOTAL: usize = 256 << 20;
        const TENSORS: usize = 200;
        // Sizes like a model's: a few large matrices, many small vectors (weights 1..=10 units each).
        let weights: Vec<usize> = (0..TENSORS)
            .map(|i| if i % 4 == 0 { 10 } else { 1 + i % 3 })
            .collect();
        let unit = TOTAL / 4 / weights.iter().sum::<usize>();
        let data: Vec<(String, Vec<u8>)> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let values: Vec<u8> = (0..w * unit)
                    .flat_map(|v| ((v ^ i) as f32).to_le_bytes())
                    .collect();
                (format!("layer.{i}.weight"), values)
            })
            .collect();
        let shapes: Vec<[usize; 1]> = data.iter().map(|(_, d)| [d.len() / 4]).collect();
        let bytes: usize = data.iter().map(|(_, d)| d.len()).sum();
        let ours = || {
            let refs: Vec<TensorRef<'_>> = data
                .iter()
                .zip(&shapes)
                .map(|((name, d), shape)| TensorRef {
                    name,
                    dtype: "F32",
                    shape,
                    data: d,
                })
                .collect();
            serialize(&refs, &BTreeMap::new()).unwrap()
        };
        // From borrowed byte slices (the crate's best case) and from tensors that must be copied out to
        // byte slices first (the worker's case: tensor memory is not a `&[u8]`).
        let crate_writer = |copy_out: bool| {
            let copies: Vec<Vec<u8>> = if copy_out {
                data.iter().map(|(_, d)| d.to_vec()).collect()
            } else {
                Vec::new()
            };
            let views: Vec<(&str, ::safetensors::tensor::TensorView<'_>)> = data
                .iter()
                .enumerate()
                .map(|(i, (name, d))| {
                    let bytes = if copy_out { &copies[i] } else { d };
                    let view = ::safetensors::tensor::TensorView::new(
                        ::safetensors::Dtype::F32,
                        vec![d.len() / 4],
                        bytes,
                    )
                    .unwrap();
                    (name.as_str(), view)
                })
                .collect();
            ::safetensors::serialize(views, None).unwrap()
        };
        let writers: [(&str, &dyn Fn() -> Vec<u8>); 3] = [
            ("layout, filled in place", &ours),
            ("safetensors::serialize of byte slices", &|| {
                crate_writer(false)
            }),
            ("safetensors::serialize of copied-out tensors", &|| {
                crate_writer(true)
            }),
        ];
        const ROUNDS: usize = 9;
        let mut seconds = vec![Vec::new(); writers.len()];
        for _ in 0..ROUNDS {
            for ((_, writer), times) in writers.iter().zip(&mut seconds) {
                let t = std::time::Instant::now();
                let image = writer();
                times.push(t.elapsed().as_secs_f64());
                assert!(image.len() > bytes);
            }
        }
        let mib = bytes as f64 / (1 << 20) as f64;
        println!("{TENSORS} f32 tensors, {mib:.0} MiB; median of {ROUNDS} alternating rounds:");
        let mut base = None;
        for ((name, _), mut times) in writers.iter().zip(seconds) {
            times.sort_by(f64::total_cmp);
            let median = times[ROUNDS / 2];
            let base = *base.get_or_insert(median);
            println!(
                "  {name:<46} {:>7.1} ms {:>6.0} MiB/s  {:.2}x the layout's time",
                median * 1e3,
                mib / median,
                median / base
            );
        }
    }
}
