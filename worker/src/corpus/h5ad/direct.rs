//! Reading AnnData `.h5ad` files through HDF5, in every layout real files use. This runs in the reader
//! child process (`super::H5ad` is what the rest of the program uses), so HDF5 failing on a damaged file
//! cannot take the caller down.
//!
//! * legacy (anndata < 0.7): `obs`/`var` are compound datasets, categorical codes live in the compound and
//!   their names in `uns/<col>_categories`; `raw` is either a group or the flat `raw.X` / `raw.var` pair;
//!   sparse matrices are marked by `h5sparse_format` / `h5sparse_shape` attributes.
//! * anndata 0.7: dataframes are groups with an `_index` attribute; categorical columns hold codes and
//!   their categories sit in `__categories/<col>`.
//! * modern (anndata >= 0.8): `encoding-type` attributes; categoricals are groups of `categories` + `codes`.
//!
//! Matrices are read by row ranges, so a pass over the cells never holds the whole matrix (CSC input is the
//! exception: it is transposed to CSR in memory once, which `Matrix::open` says in its description).

use std::ffi::{CStr, CString};
use std::ops::Range;
use std::path::{Path, PathBuf};

use hdf5::{Dataset, File, Group, Location};
use hdf5_sys::h5::H5free_memory;
use hdf5_sys::h5a::{H5Aget_space, H5Aread};
use hdf5_sys::h5d::{H5Dget_space, H5Dread};
use hdf5_sys::h5i::hid_t;
use hdf5_sys::h5p::H5P_DEFAULT;
use hdf5_sys::h5s::{
    H5S_seloper_t, H5Sclose, H5Screate_simple, H5Sget_simple_extent_npoints, H5Sselect_hyperslab,
    H5S_ALL,
};
use hdf5_sys::h5t::{
    H5T_class_t, H5T_str_t, H5Tclose, H5Tcopy, H5Tcreate, H5Tget_class, H5Tget_cset,
    H5Tget_member_index, H5Tget_member_name, H5Tget_member_type, H5Tget_nmembers, H5Tget_size,
    H5Tinsert, H5Tis_variable_str, H5Tset_cset, H5Tset_size, H5Tset_strpad, H5T_VARIABLE,
};

use super::{err, Column, CsrChunk, InputError, InputResult};

const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// The most one read of an h5ad object may allocate, unless `CELLFLEET_H5AD_MAX_READ_GIB` says more: a
/// damaged size field (or a hostile file) is refused before the allocation, not by the OOM killer.
fn max_read_bytes() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("CELLFLEET_H5AD_MAX_READ_GIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(4)
            << 30
    })
}

/// Refuses reading `elements` of `element_bytes` each when that exceeds [`max_read_bytes`].
fn check_read_size(what: &str, elements: u64, element_bytes: u64) -> Result<(), String> {
    let bytes = elements.saturating_mul(element_bytes);
    let limit = max_read_bytes();
    if bytes > limit {
        return Err(format!(
            "{what} claims {elements} elements of {element_bytes} bytes ({:.1} GiB), more than the {} GiB one read may take (a damaged size field?; CELLFLEET_H5AD_MAX_READ_GIB raises the limit)",
            bytes as f64 / (1u64 << 30) as f64,
            limit >> 30
        ));
    }
    Ok(())
}

/// Most genes a matrix may have: beyond every genome's gene and transcript count.
const MAX_GENES: usize = 1 << 22;

enum Storage {
    Dense(Dataset),
    Csr {
        data: Dataset,
        indices: Dataset,
        indptr: Vec<u64>,
    },
    /// CSC matrices are transposed to CSR in memory on open.
    InMemory(CsrChunk),
}

/// One expression matrix of a file (X, raw/X or a layer).
pub struct Matrix {
    pub name: String,
    pub n_obs: usize,
    pub n_vars: usize,
    storage: Storage,
}

/// An open h5ad file.
pub struct H5ad {
    pub path: PathBuf,
    file: File,
}

impl H5ad {
    pub fn open(path: &Path) -> InputResult<Self> {
        let mut head = [0u8; 8];
        let read = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .map_err(|e| err(path, format!("cannot read the file: {e}")))?;
        if read < 8 || &head != HDF5_SIGNATURE {
            return Err(err(
                path,
                "not an HDF5 file (no HDF5 signature at the start); expected an AnnData .h5ad",
            ));
        }
        let file = File::open(path).map_err(|e| {
            let text = e.to_string();
            if text.contains("truncated") || text.contains("eof") || text.contains("EOF") {
                err(
                    path,
                    format!("the HDF5 file is truncated (incomplete download or copy?): {text}"),
                )
            } else {
                err(
                    path,
                    format!("HDF5 cannot open the file (damaged?): {text}"),
                )
            }
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn fail(&self, message: impl Into<String>) -> InputError {
        err(&self.path, message)
    }

    fn exists(&self, name: &str) -> bool {
        // link_exists does not accept nested paths whose parents are missing.
        let mut group: Group = (*self.file).clone();
        let parts: Vec<&str> = name.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            if !group.link_exists(part) {
                return false;
            }
            if i + 1 < parts.len() {
                match group.group(part) {
                    Ok(g) => group = g,
                    Err(_) => return false,
                }
            }
        }
        true
    }

    fn is_group(&self, name: &str) -> bool {
        self.exists(name) && self.file.group(name).is_ok()
    }

    /// Matrices that exist: `X`, `raw` and `layers/<name>`.
    pub fn matrix_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.exists("X") {
            names.push("X".to_string());
        }
        if self.exists("raw/X") || self.exists("raw.X") {
            names.push("raw".to_string());
        }
        if self.is_group("layers") {
            if let Ok(members) = self.file.group("layers").and_then(|g| g.member_names()) {
                names.extend(members.into_iter().map(|m| format!("layers/{m}")));
            }
        }
        names
    }

    /// The HDF5 path of matrix `which` (`X`, `raw` or a layer), or why there is none.
    pub fn matrix_path(&self, which: &str) -> InputResult<String> {
        match which {
            "X" if self.exists("X") => Ok("X".into()),
            "X" => {
                Err(self
                    .fail("has no X matrix (expected /X as a dataset or a sparse-matrix group)"))
            }
            "raw" | "raw/X" | "raw.X" => {
                if self.exists("raw/X") {
                    Ok("raw/X".into())
                } else if self.exists("raw.X") {
                    Ok("raw.X".into())
                } else {
                    Err(self.fail(format!(
                        "has no raw matrix (raw/X); matrices present: {}",
                        self.matrix_names().join(", ")
                    )))
                }
            }
            layer => {
                let path = if layer.starts_with("layers/") {
                    layer.to_string()
                } else {
                    format!("layers/{layer}")
                };
                if self.exists(&path) {
                    Ok(path)
                } else {
                    Err(self.fail(format!(
                        "has no matrix '{which}'; matrices present: {}",
                        self.matrix_names().join(", ")
                    )))
                }
            }
        }
    }

    /// Opens `X`, `raw` or a layer name.
    pub fn matrix(&self, which: &str) -> InputResult<Matrix> {
        let path = self.matrix_path(which)?;
        let ctx = |e: hdf5::Error| self.fail(format!("{path}: {e}"));
        if let Ok(ds) = self.file.dataset(&path) {
            let shape = ds.shape();
            if shape.len() != 2 {
                return Err(self.fail(format!(
                    "{path} has {} dimensions, expected a 2-D cells x genes matrix",
                    shape.len()
                )));
            }
            if shape[1] > MAX_GENES {
                return Err(self.fail(format!(
                    "{path} claims {} genes, more than the {MAX_GENES} a matrix may have (damaged?)",
                    shape[1]
                )));
            }
            return Ok(Matrix {
                name: path,
                n_obs: shape[0],
                n_vars: shape[1],
                storage: Storage::Dense(ds),
            });
        }
        let group = self.file.group(&path).map_err(ctx)?;
        let format = read_string_attr(&group, "encoding-type")
            .or_else(|| read_string_attr(&group, "h5sparse_format"))
            .unwrap_or_default();
        let shape: Vec<u64> = ["shape", "h5sparse_shape"]
            .iter()
            .find_map(|a| group.attr(a).ok().and_then(|a| a.read_raw::<u64>().ok()))
            .ok_or_else(|| {
                self.fail(format!(
                    "{path} is a group without a shape attribute; not a sparse matrix"
                ))
            })?;
        if shape.len() != 2 {
            return Err(self.fail(format!("{path} has shape {shape:?}, expected 2 dimensions")));
        }
        let (n_obs, n_vars) = (shape[0] as usize, shape[1] as usize);
        if n_vars > MAX_GENES {
            return Err(self.fail(format!(
                "{path} claims {n_vars} genes, more than the {MAX_GENES} a matrix may have (damaged?)"
            )));
        }
        let data = group.dataset("data").map_err(ctx)?;
        let indices = group.dataset("indices").map_err(ctx)?;
        let indptr_ds = group.dataset("indptr").map_err(ctx)?;
        check_read_size(&format!("{path}/indptr"), indptr_ds.size() as u64, 8)
            .map_err(|e| self.fail(e))?;
        let indptr: Vec<u64> = indptr_ds
            .read_raw::<i64>()
            .map_err(ctx)?
            .into_iter()
            .map(|v| v.max(0) as u64)
            .collect();
        let csc = match format.as_str() {
            "csr" | "csr_matrix" => false,
            "csc" | "csc_matrix" => true,
            other => {
                return Err(self.fail(format!(
                    "{path} has sparse format '{other}', expected csr or csc"
                )))
            }
        };
        let expected_ptr = if csc { n_vars + 1 } else { n_obs + 1 };
        if indptr.len() != expected_ptr || indptr.windows(2).any(|w| w[0] > w[1]) {
            return Err(self.fail(format!(
                "{path}/indptr has {} entries or decreases; expected {expected_ptr} non-decreasing offsets",
                indptr.len()
            )));
        }
        let nnz = *indptr.last().unwrap_or(&0) as usize;
        if data.size() < nnz || indices.size() < nnz {
            return Err(self.fail(format!(
                "{path}: indptr promises {nnz} values but data/indices hold fewer (truncated?)"
            )));
        }
        if !csc {
            return Ok(Matrix {
                name: path,
                n_obs,
                n_vars,
                storage: Storage::Csr {
                    data,
                    indices,
                    indptr,
                },
            });
        }
        // Transpose CSC -> CSR with a counting sort over rows.
        check_read_size(
            &format!("{path} (CSC, transposed in memory)"),
            nnz as u64,
            24,
        )
        .map_err(|e| self.fail(e))?;
        let values: Vec<f32> = data.read_slice_1d::<f32, _>(0..nnz).map_err(ctx)?.to_vec();
        let rows: Vec<i64> = indices
            .read_slice_1d::<i64, _>(0..nnz)
            .map_err(ctx)?
            .to_vec();
        let mut counts = vec![0usize; n_obs + 1];
        for &r in &rows {
            let r = usize::try_from(r)
                .ok()
                .filter(|&r| r < n_obs)
                .ok_or_else(|| {
                    self.fail(format!("{path}/indices holds row {r}, outside 0..{n_obs}"))
                })?;
            counts[r + 1] += 1;
        }
        for i in 0..n_obs {
            counts[i + 1] += counts[i];
        }
        let mut fill = counts.clone();
        let mut out_idx = vec![0u32; nnz];
        let mut out_val = vec![0f32; nnz];
        for col in 0..n_vars {
            for k in indptr[col] as usize..indptr[col + 1] as usize {
                let r = rows[k] as usize;
                out_idx[fill[r]] = col as u32;
                out_val[fill[r]] = values[k];
                fill[r] += 1;
            }
        }
        Ok(Matrix {
            name: format!("{path} (CSC, transposed in memory)"),
            n_obs,
            n_vars,
            storage: Storage::InMemory(CsrChunk {
                indptr: counts,
                indices: out_idx,
                values: out_val,
            }),
        })
    }

    /// Gene names of `X` (or of `raw` when `raw` is true).
    pub fn var_names(&self, raw: bool) -> InputResult<Vec<String>> {
        let candidates: &[&str] = if raw {
            &["raw/var", "raw.var"]
        } else {
            &["var"]
        };
        let path = candidates
            .iter()
            .find(|p| self.exists(p))
            .ok_or_else(|| self.fail(format!("has no {} table (gene names)", candidates[0])))?;
        self.dataframe_index(path)
    }

    pub fn obs_names(&self) -> InputResult<Vec<String>> {
        if !self.exists("obs") {
            return Err(self.fail("has no obs table (cell names)"));
        }
        self.dataframe_index("obs")
    }

    fn dataframe_index(&self, path: &str) -> InputResult<Vec<String>> {
        let ctx = |e: String| self.fail(format!("{path}: {e}"));
        if let Ok(ds) = self.file.dataset(path) {
            return read_compound_strings(&ds, "index").map_err(ctx);
        }
        let group = self.file.group(path).map_err(|e| ctx(e.to_string()))?;
        let index = read_string_attr(&group, "_index").unwrap_or_else(|| "_index".to_string());
        let ds = group
            .dataset(&index)
            .map_err(|e| ctx(format!("index column '{index}': {e}")))?;
        read_strings(&ds).map_err(ctx)
    }

    /// Names of obs columns.
    pub fn obs_columns(&self) -> InputResult<Vec<String>> {
        if let Ok(ds) = self.file.dataset("obs") {
            return compound_fields(&ds)
                .map(|f| f.into_iter().filter(|n| n != "index").collect())
                .map_err(|e| self.fail(e));
        }
        let group = self
            .file
            .group("obs")
            .map_err(|e| self.fail(format!("obs: {e}")))?;
        let index = read_string_attr(&group, "_index").unwrap_or_default();
        Ok(group
            .member_names()
            .map_err(|e| self.fail(format!("obs: {e}")))?
            .into_iter()
            .filter(|n| *n != index && n != "__categories")
            .collect())
    }

    /// Reads obs column `name`.
    pub fn obs_column(&self, name: &str) -> InputResult<Column> {
        let missing = || {
            let available = self.obs_columns().map(|c| c.join(", ")).unwrap_or_default();
            self.fail(format!(
                "has no obs column '{name}'; available: {available}"
            ))
        };
        let ctx = |e: String| self.fail(format!("obs column '{name}': {e}"));
        if let Ok(ds) = self.file.dataset("obs") {
            if !compound_fields(&ds).map_err(ctx)?.iter().any(|f| f == name) {
                return Err(missing());
            }
            let uns_categories = format!("uns/{name}_categories");
            if self.exists(&uns_categories) {
                let categories = read_strings(
                    &self
                        .file
                        .dataset(&uns_categories)
                        .map_err(|e| ctx(e.to_string()))?,
                )
                .map_err(ctx)?;
                let codes = read_compound_numbers(&ds, name)
                    .map_err(ctx)?
                    .into_iter()
                    .map(|c| c as i64)
                    .collect();
                return Ok(Column::Categorical { categories, codes });
            }
            return match read_compound_strings(&ds, name) {
                Ok(strings) => Ok(Column::Strings(strings)),
                Err(_) => read_compound_numbers(&ds, name)
                    .map(Column::Numeric)
                    .map_err(ctx),
            };
        }
        let group = self.file.group("obs").map_err(|e| ctx(e.to_string()))?;
        if !group.link_exists(name) {
            return Err(missing());
        }
        if let Ok(sub) = group.group(name) {
            // Modern categorical: a group of categories + codes.
            let categories =
                read_strings(&sub.dataset("categories").map_err(|e| ctx(e.to_string()))?)
                    .map_err(ctx)?;
            let codes = read_whole::<i64>(&sub.dataset("codes").map_err(|e| ctx(e.to_string()))?)
                .map_err(ctx)?;
            return Ok(Column::Categorical { categories, codes });
        }
        let ds = group.dataset(name).map_err(|e| ctx(e.to_string()))?;
        let legacy_categories = format!("__categories/{name}");
        if group.link_exists("__categories") && self.exists(&format!("obs/{legacy_categories}")) {
            let categories = read_strings(
                &group
                    .dataset(&legacy_categories)
                    .map_err(|e| ctx(e.to_string()))?,
            )
            .map_err(ctx)?;
            let codes = read_whole::<i64>(&ds).map_err(ctx)?;
            return Ok(Column::Categorical { categories, codes });
        }
        if is_string_type(&ds) {
            return read_strings(&ds).map(Column::Strings).map_err(ctx);
        }
        read_whole::<f64>(&ds).map(Column::Numeric).map_err(ctx)
    }
}

impl Matrix {
    /// Reads rows `rows` into `out` (replacing its contents). Column indices are validated.
    pub fn read_rows(&self, rows: Range<usize>, out: &mut CsrChunk) -> Result<(), String> {
        out.indptr.clear();
        out.indices.clear();
        out.values.clear();
        out.indptr.push(0);
        match &self.storage {
            Storage::Dense(ds) => {
                check_read_size(
                    &format!("rows {rows:?} of the dense matrix"),
                    rows.len() as u64,
                    4 * self.n_vars as u64,
                )?;
                let block = ds
                    .read_slice_2d::<f32, _>((rows.clone(), ..))
                    .map_err(|e| e.to_string())?;
                for row in block.rows() {
                    for (j, &v) in row.iter().enumerate() {
                        if v != 0.0 {
                            out.indices.push(j as u32);
                            out.values.push(v);
                        }
                    }
                    out.indptr.push(out.values.len());
                }
            }
            Storage::Csr {
                data,
                indices,
                indptr,
            } => {
                let (lo, hi) = (indptr[rows.start] as usize, indptr[rows.end] as usize);
                read_range_into(data, lo..hi, &mut out.values)?;
                let n_vars = self.n_vars;
                let check = |j: i64| -> Result<u32, String> {
                    u32::try_from(j)
                        .ok()
                        .filter(|&j| (j as usize) < n_vars)
                        .ok_or_else(|| format!("indices holds column {j}, outside 0..{n_vars}"))
                };
                if indices.dtype().map(|t| t.size() <= 4).unwrap_or(false) {
                    // 32-bit indices land in the u32 buffer as stored (a negative one reads as a huge
                    // value and fails the range check), sparing HDF5 a conversion pass.
                    read_range_as::<i32, u32>(indices, lo..hi, &mut out.indices)?;
                    if let Some(&bad) = out.indices.iter().find(|&&j| j as usize >= n_vars) {
                        check(i64::from(bad as i32))?;
                    }
                } else {
                    let mut raw: Vec<i64> = Vec::new();
                    read_range_into(indices, lo..hi, &mut raw)?;
                    out.indices.clear();
                    for j in raw {
                        out.indices.push(check(j)?);
                    }
                }
                out.indptr.extend(
                    indptr[rows.start + 1..=rows.end]
                        .iter()
                        .map(|&p| p as usize - lo),
                );
            }
            Storage::InMemory(csr) => {
                let (lo, hi) = (csr.indptr[rows.start], csr.indptr[rows.end]);
                out.indices.extend_from_slice(&csr.indices[lo..hi]);
                out.values.extend_from_slice(&csr.values[lo..hi]);
                out.indptr.extend(
                    csr.indptr[rows.start + 1..=rows.end]
                        .iter()
                        .map(|&p| p - lo),
                );
            }
        }
        Ok(())
    }
}

/// Reads elements `range` of a 1-D dataset into `out` (replacing its contents) as memory type `T`,
/// straight into the reused buffer: no intermediate array, no copy.
fn read_range_into<T: hdf5::H5Type + Copy>(
    ds: &Dataset,
    range: Range<usize>,
    out: &mut Vec<T>,
) -> Result<(), String> {
    read_range_as::<T, T>(ds, range, out)
}

/// [`read_range_into`] with HDF5 memory type `M` stored in a buffer of the same-sized plain type `T`.
fn read_range_as<M: hdf5::H5Type, T: Copy>(
    ds: &Dataset,
    range: Range<usize>,
    out: &mut Vec<T>,
) -> Result<(), String> {
    assert_eq!(
        std::mem::size_of::<M>(),
        std::mem::size_of::<T>(),
        "memory type and buffer element differ in size"
    );
    out.clear();
    let n = range.len();
    if n == 0 {
        return Ok(());
    }
    check_read_size(
        &format!("elements {range:?} of {}", ds.name()),
        n as u64,
        std::mem::size_of::<T>() as u64,
    )?;
    out.reserve(n);
    let mem_type = hdf5::Datatype::from_type::<M>().map_err(|e| e.to_string())?;
    let status = hdf5::sync::sync(|| unsafe {
        let file_space = H5Dget_space(ds.id());
        let start = [range.start as hdf5_sys::h5::hsize_t];
        let count = [n as hdf5_sys::h5::hsize_t];
        let selected = H5Sselect_hyperslab(
            file_space,
            H5S_seloper_t::H5S_SELECT_SET,
            start.as_ptr(),
            std::ptr::null(),
            count.as_ptr(),
            std::ptr::null(),
        );
        let mem_space = H5Screate_simple(1, count.as_ptr(), std::ptr::null());
        let status = if selected < 0 {
            selected
        } else {
            H5Dread(
                ds.id(),
                mem_type.id(),
                mem_space,
                file_space,
                H5P_DEFAULT,
                out.as_mut_ptr().cast(),
            )
        };
        H5Sclose(mem_space);
        H5Sclose(file_space);
        status
    });
    if status < 0 {
        return Err(format!(
            "HDF5 could not read elements {range:?} of {}",
            ds.name()
        ));
    }
    // SAFETY: H5Dread filled all n elements of the reserved buffer.
    unsafe { out.set_len(n) };
    Ok(())
}

/// Reads a whole dataset as `T`, after checking its claimed size against the read limit.
fn read_whole<T: hdf5::H5Type>(ds: &Dataset) -> Result<Vec<T>, String> {
    check_read_size(
        &ds.name(),
        ds.size() as u64,
        std::mem::size_of::<T>() as u64,
    )?;
    ds.read_raw::<T>().map_err(|e| e.to_string())
}

fn read_string_attr(loc: &Location, name: &str) -> Option<String> {
    let attr = loc.attr(name).ok()?;
    let id = attr.id();
    read_strings_raw(id, true).ok()?.into_iter().next()
}

fn is_string_type(ds: &Dataset) -> bool {
    hdf5::sync::sync(|| unsafe {
        let t = hdf5_sys::h5d::H5Dget_type(ds.id());
        let class = H5Tget_class(t);
        H5Tclose(t);
        class == H5T_class_t::H5T_STRING
    })
}

/// Reads a 1-D string dataset, fixed-length or variable-length.
pub fn read_strings(ds: &Dataset) -> Result<Vec<String>, String> {
    read_strings_raw(ds.id(), false)
}

/// Memory type for reading strings of file type `ftype`: same cset, variable or fixed length.
unsafe fn string_memory_type(ftype: hid_t) -> hid_t {
    unsafe {
        let mem = H5Tcopy(*hdf5::globals::H5T_C_S1);
        if H5Tis_variable_str(ftype) > 0 {
            H5Tset_size(mem, H5T_VARIABLE);
        } else {
            H5Tset_size(mem, H5Tget_size(ftype));
            H5Tset_strpad(mem, H5T_str_t::H5T_STR_NULLPAD);
        }
        H5Tset_cset(mem, H5Tget_cset(ftype));
        mem
    }
}

/// Decodes `n` strings from a read buffer of memory type `mem`, freeing variable-length strings.
unsafe fn decode_strings(mem: hid_t, buf: &[u8], n: usize) -> Vec<String> {
    unsafe {
        if H5Tis_variable_str(mem) > 0 {
            let ptrs =
                std::slice::from_raw_parts(buf.as_ptr() as *const *mut std::os::raw::c_char, n);
            ptrs.iter()
                .map(|&p| {
                    if p.is_null() {
                        String::new()
                    } else {
                        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
                        H5free_memory(p as *mut _);
                        s
                    }
                })
                .collect()
        } else {
            let size = H5Tget_size(mem);
            buf.chunks(size)
                .take(n)
                .map(|c| {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                })
                .collect()
        }
    }
}

fn read_strings_raw(id: hid_t, is_attr: bool) -> Result<Vec<String>, String> {
    hdf5::sync::sync(|| unsafe {
        let ftype = if is_attr {
            hdf5_sys::h5a::H5Aget_type(id)
        } else {
            hdf5_sys::h5d::H5Dget_type(id)
        };
        if H5Tget_class(ftype) != H5T_class_t::H5T_STRING {
            H5Tclose(ftype);
            return Err("expected strings".to_string());
        }
        let space = if is_attr {
            H5Aget_space(id)
        } else {
            H5Dget_space(id)
        };
        let n = H5Sget_simple_extent_npoints(space).max(0) as usize;
        H5Sclose(space);
        let mem = string_memory_type(ftype);
        H5Tclose(ftype);
        if let Err(e) = check_read_size("the strings", n as u64, H5Tget_size(mem) as u64) {
            H5Tclose(mem);
            return Err(e);
        }
        let mut buf = vec![0u8; n * H5Tget_size(mem) + 1];
        let status = if is_attr {
            H5Aread(id, mem, buf.as_mut_ptr().cast())
        } else {
            H5Dread(
                id,
                mem,
                H5S_ALL,
                H5S_ALL,
                H5P_DEFAULT,
                buf.as_mut_ptr().cast(),
            )
        };
        let out = if status < 0 {
            Err("HDF5 could not read the strings".to_string())
        } else {
            Ok(decode_strings(mem, &buf, n))
        };
        H5Tclose(mem);
        out
    })
}

fn compound_fields(ds: &Dataset) -> Result<Vec<String>, String> {
    hdf5::sync::sync(|| unsafe {
        let ftype = hdf5_sys::h5d::H5Dget_type(ds.id());
        if H5Tget_class(ftype) != H5T_class_t::H5T_COMPOUND {
            H5Tclose(ftype);
            return Err("expected a compound (table) dataset".into());
        }
        let n = H5Tget_nmembers(ftype).max(0) as u32;
        let names = (0..n)
            .map(|i| {
                let p = H5Tget_member_name(ftype, i);
                let s = CStr::from_ptr(p).to_string_lossy().into_owned();
                H5free_memory(p.cast());
                s
            })
            .collect();
        H5Tclose(ftype);
        Ok(names)
    })
}

/// Reads one member of a compound dataset through a one-member memory type (HDF5 converts by name).
fn read_compound_member(
    ds: &Dataset,
    field: &str,
    make_mem: impl FnOnce(hid_t) -> Option<hid_t>,
) -> Result<(Vec<u8>, hid_t, usize), String> {
    let cname = CString::new(field).map_err(|e| e.to_string())?;
    hdf5::sync::sync(|| unsafe {
        let ftype = hdf5_sys::h5d::H5Dget_type(ds.id());
        let idx = H5Tget_member_index(ftype, cname.as_ptr());
        if idx < 0 {
            H5Tclose(ftype);
            return Err(format!("no field '{field}' in the table"));
        }
        let member = H5Tget_member_type(ftype, idx as u32);
        H5Tclose(ftype);
        let mem_member = make_mem(member);
        H5Tclose(member);
        let Some(mem_member) = mem_member else {
            return Err(format!("field '{field}' has an unsupported type"));
        };
        let size = H5Tget_size(mem_member);
        let compound = H5Tcreate(H5T_class_t::H5T_COMPOUND, size);
        H5Tinsert(compound, cname.as_ptr(), 0, mem_member);
        let n = ds.size();
        if let Err(e) = check_read_size(&format!("field '{field}'"), n as u64, size as u64) {
            H5Tclose(compound);
            H5Tclose(mem_member);
            return Err(e);
        }
        let mut buf = vec![0u8; n * size + 1];
        let status = H5Dread(
            ds.id(),
            compound,
            H5S_ALL,
            H5S_ALL,
            H5P_DEFAULT,
            buf.as_mut_ptr().cast(),
        );
        H5Tclose(compound);
        if status < 0 {
            H5Tclose(mem_member);
            return Err(format!("HDF5 could not read field '{field}'"));
        }
        Ok((buf, mem_member, n))
    })
}

fn read_compound_strings(ds: &Dataset, field: &str) -> Result<Vec<String>, String> {
    let (buf, mem, n) = read_compound_member(ds, field, |member| unsafe {
        (H5Tget_class(member) == H5T_class_t::H5T_STRING).then(|| string_memory_type(member))
    })?;
    Ok(hdf5::sync::sync(|| unsafe {
        let out = decode_strings(mem, &buf, n);
        H5Tclose(mem);
        out
    }))
}

fn read_compound_numbers(ds: &Dataset, field: &str) -> Result<Vec<f64>, String> {
    let (buf, mem, n) = read_compound_member(ds, field, |member| unsafe {
        matches!(
            H5Tget_class(member),
            H5T_class_t::H5T_INTEGER | H5T_class_t::H5T_FLOAT
        )
        .then(|| H5Tcopy(*hdf5::globals::H5T_NATIVE_DOUBLE))
    })?;
    hdf5::sync::sync(|| unsafe { H5Tclose(mem) });
    Ok(buf
        .chunks_exact(8)
        .take(n)
        .map(|c| f64::from_ne_bytes(c.try_into().unwrap()))
        .collect())
}
