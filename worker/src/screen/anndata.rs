//! Writing an AnnData `.h5ad` file that `anndata.read_h5ad` (anndata >= 0.8) and so scanpy open: a dense
//! float32 X, written in row chunks in any order so memory stays bounded by one chunk, then obs (index and
//! columns), var (index only) and uns string entries.
//!
//! The layout follows the on-disk spec (<https://anndata.readthedocs.io/en/latest/fileformat-prose.html>)
//! and matches what anndata itself writes, including the empty `layers`/`obsm`/`varm`/`obsp`/`varp`
//! groups: anndata 0.12 tolerates their absence (and that of `var`), but not a missing `obs`.
//!
//! The file is built as `<path>.partial` and renamed onto `path` by [`H5adWriter::finish`], so a writer
//! that fails or is dropped midway never leaves a file at `path` whose unwritten rows read as zeros.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, File, Group, H5Type, Location};
use hdf5_sys::h5::hsize_t;
use hdf5_sys::h5d::{H5Dget_space, H5Dwrite};
use hdf5_sys::h5p::H5P_DEFAULT;
use hdf5_sys::h5s::{H5S_seloper_t, H5Sclose, H5Screate_simple, H5Sselect_hyperslab};

/// One obs column.
#[derive(Debug, Clone, PartialEq)]
pub enum ObsColumn {
    /// Written as an anndata categorical: the distinct values sorted as categories, codes as integers.
    Categorical(Vec<String>),
    /// Written as a string array (pandas `object` column).
    Str(Vec<String>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl ObsColumn {
    fn len(&self) -> usize {
        match self {
            ObsColumn::Categorical(v) | ObsColumn::Str(v) => v.len(),
            ObsColumn::F32(v) => v.len(),
            ObsColumn::F64(v) => v.len(),
            ObsColumn::I64(v) => v.len(),
            ObsColumn::Bool(v) => v.len(),
        }
    }
}

/// The member of a dataframe group that holds its index, named by the group's `_index` attribute.
const INDEX_KEY: &str = "_index";

/// Target bytes of one X chunk. Well under HDF5's default 1 MiB per-dataset chunk cache, so a chunk that
/// several `write_rows` calls fill piecewise stays cached until complete instead of being flushed and read
/// back on every call.
const X_CHUNK_BYTES: usize = 512 * 1024;

struct OpenFile {
    file: File,
    x: Dataset,
}

/// Writes one `.h5ad` file: [`create`](Self::create), [`write_rows`](Self::write_rows) until every row
/// of X is written, then [`finish`](Self::finish).
pub struct H5adWriter {
    path: PathBuf,
    partial_path: PathBuf,
    n_obs: usize,
    n_vars: usize,
    row_written: Vec<bool>,
    /// `None` once `finish` has taken the file over.
    open: Option<OpenFile>,
}

impl H5adWriter {
    /// Creates `path` for `n_obs` observations over the variables `var_names` (X is float32,
    /// n_obs x n_vars, dense).
    pub fn create(path: &Path, n_obs: usize, var_names: &[String]) -> Result<Self> {
        let n_vars = var_names.len();
        let mut partial_name = OsString::from(
            path.file_name()
                .with_context(|| format!("{}: not a file path", path.display()))?,
        );
        partial_name.push(".partial");
        let partial_path = path.with_file_name(partial_name);
        let file = File::create(&partial_path)
            .with_context(|| format!("{}: cannot create the file", partial_path.display()))?;
        // From here on the writer owns the partial file, so an error below removes it on drop.
        let mut writer = Self {
            path: path.to_path_buf(),
            partial_path,
            n_obs,
            n_vars,
            // A matrix without columns holds no values, so its rows need no writing.
            row_written: vec![n_vars == 0; n_obs],
            open: None,
        };
        let x = writer.write_skeleton(&file, var_names)?;
        writer.open = Some(OpenFile { file, x });
        Ok(writer)
    }

    fn fail(&self, message: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: {message}", self.path.display())
    }

    /// Writes everything known at creation: root attributes, an unwritten X, var and the empty groups.
    fn write_skeleton(&self, file: &File, var_names: &[String]) -> Result<Dataset> {
        let context = |what: &str| format!("{}: cannot write {what}", self.path.display());
        set_encoding(file, "anndata", "0.1.0").with_context(|| context("the root attributes"))?;
        let var_names = to_h5_strings(var_names).map_err(|i| {
            self.fail(format_args!(
                "variable name {i} contains a NUL character, which HDF5 strings cannot hold"
            ))
        })?;

        let shape = (self.n_obs, self.n_vars);
        // Uncompressed: X holds model outputs, noisy float32 that gzip shrinks little for far more CPU than
        // the write itself, and every reader (h5py, R, Julia) handles it without filter plugins; anndata
        // writes X uncompressed by default too. Chunks hold whole rows, so a row-range write or read
        // touches only its own chunks. HDF5 refuses chunks larger than an empty extent, and an empty X
        // has nothing to chunk.
        let x = if self.n_obs == 0 || self.n_vars == 0 {
            file.new_dataset::<f32>().shape(shape).create("X")
        } else {
            let chunk_rows =
                (X_CHUNK_BYTES / (self.n_vars * size_of::<f32>())).clamp(1, self.n_obs);
            file.new_dataset::<f32>()
                .shape(shape)
                .chunk((chunk_rows, self.n_vars))
                .create("X")
        }
        .with_context(|| context("X"))?;
        set_encoding(&x, "array", "0.2.0").with_context(|| context("X"))?;

        write_dataframe(file, "var", &var_names, &[]).with_context(|| context("var"))?;
        for name in ["layers", "obsm", "varm", "obsp", "varp"] {
            write_dict(file, name).with_context(|| context(name))?;
        }
        Ok(x)
    }

    /// Writes rows `start..start + rows.len() / n_vars` of X (row-major); rows may come in any chunking,
    /// each row exactly once, so memory stays bounded.
    pub fn write_rows(&mut self, start: usize, rows: &[f32]) -> Result<()> {
        let (n_obs, n_vars) = (self.n_obs, self.n_vars);
        if n_vars == 0 {
            if !rows.is_empty() {
                bail!(self.fail(format_args!(
                    "write_rows got {} values for an X without variables",
                    rows.len()
                )));
            }
            return Ok(());
        }
        if !rows.len().is_multiple_of(n_vars) {
            bail!(self.fail(format_args!(
                "write_rows at row {start} got {} values, not whole rows of {n_vars} variables",
                rows.len()
            )));
        }
        let count = rows.len() / n_vars;
        let end = start.saturating_add(count);
        if end > n_obs {
            bail!(self.fail(format_args!(
                "write_rows got rows {start}..{end}, past the {n_obs} rows of X"
            )));
        }
        if let Some(row) = (start..end).find(|&row| self.row_written[row]) {
            bail!(self.fail(format_args!(
                "row {row} of X is written twice (again by write_rows at rows {start}..{end})"
            )));
        }
        if count == 0 {
            return Ok(());
        }
        let open = self
            .open
            .as_ref()
            .expect("an unfinished writer holds its file");
        write_row_block(&open.x, start, count, n_vars, rows)
            .map_err(|message| self.fail(format_args!("rows {start}..{end} of X: {message}")))?;
        self.row_written[start..end].fill(true);
        Ok(())
    }

    /// Writes obs (index `obs_names`, then the columns in order) and uns string entries, checks every row
    /// of X was written, and closes the file.
    pub fn finish(
        mut self,
        obs_names: &[String],
        columns: &[(String, ObsColumn)],
        uns: &[(String, String)],
    ) -> Result<()> {
        let open = self
            .open
            .take()
            .expect("an unfinished writer holds its file");
        self.check_finish_inputs(obs_names, columns, uns)?;
        let context = |what: &str| format!("{}: cannot write {what}", self.path.display());

        let obs_names = to_h5_strings(obs_names).map_err(|i| {
            self.fail(format_args!(
                "obs name {i} contains a NUL character, which HDF5 strings cannot hold"
            ))
        })?;
        let column_names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
        let obs = write_dataframe(&open.file, "obs", &obs_names, &column_names)
            .with_context(|| context("obs"))?;
        for (name, column) in columns {
            self.write_obs_column(&obs, name, column)
                .with_context(|| context(&format!("obs column '{name}'")))?;
        }

        let uns_group = write_dict(&open.file, "uns").with_context(|| context("uns"))?;
        for (key, value) in uns {
            let value = value.parse::<VarLenUnicode>().map_err(|_| {
                self.fail(format_args!(
                    "uns entry '{key}' contains a NUL character, which HDF5 strings cannot hold"
                ))
            })?;
            write_scalar_string(&uns_group, key, &value)
                .with_context(|| context(&format!("uns entry '{key}'")))?;
        }

        // The file closes only once no object in it is open.
        drop((obs, uns_group));
        let OpenFile { file, x } = open;
        drop(x);
        file.close()
            .with_context(|| format!("{}: cannot close the file", self.partial_path.display()))?;
        std::fs::rename(&self.partial_path, &self.path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.partial_path.display(),
                self.path.display()
            )
        })
    }

    fn check_finish_inputs(
        &self,
        obs_names: &[String],
        columns: &[(String, ObsColumn)],
        uns: &[(String, String)],
    ) -> Result<()> {
        let n_obs = self.n_obs;
        if let Some(row) = self.row_written.iter().position(|&w| !w) {
            let missing = self.row_written.iter().filter(|&&w| !w).count();
            bail!(self.fail(format_args!(
                "row {row} of X was never written ({missing} of {n_obs} rows missing)"
            )));
        }
        if obs_names.len() != n_obs {
            bail!(self.fail(format_args!(
                "{} obs names for {n_obs} observations",
                obs_names.len()
            )));
        }
        let mut seen = HashSet::new();
        for (name, column) in columns {
            check_member_name(name)
                .map_err(|why| self.fail(format_args!("obs column name '{name}' {why}")))?;
            if name == INDEX_KEY {
                bail!(self.fail(format_args!(
                    "obs column '{name}' is named like the obs index, which anndata stores under that name"
                )));
            }
            if !seen.insert(name.as_str()) {
                bail!(self.fail(format_args!("obs column '{name}' is given twice")));
            }
            if column.len() != n_obs {
                bail!(self.fail(format_args!(
                    "obs column '{name}' has {} values for {n_obs} observations",
                    column.len()
                )));
            }
        }
        let mut seen = HashSet::new();
        for (key, _) in uns {
            check_member_name(key)
                .map_err(|why| self.fail(format_args!("uns key '{key}' {why}")))?;
            if !seen.insert(key.as_str()) {
                bail!(self.fail(format_args!("uns key '{key}' is given twice")));
            }
        }
        Ok(())
    }

    fn write_obs_column(&self, obs: &Group, name: &str, column: &ObsColumn) -> Result<()> {
        let nul = |i: usize| {
            self.fail(format_args!(
                "obs column '{name}' value {i} contains a NUL character, which HDF5 strings cannot hold"
            ))
        };
        match column {
            ObsColumn::Categorical(values) => {
                let categories: Vec<&str> = values
                    .iter()
                    .map(String::as_str)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let codes: Vec<usize> = values
                    .iter()
                    .map(|v| {
                        categories
                            .binary_search(&v.as_str())
                            .expect("every value is a category")
                    })
                    .collect();
                let categories = to_h5_strings(&categories).map_err(nul)?;
                let group = obs.create_group(name)?;
                set_encoding(&group, "categorical", "0.2.0")?;
                group
                    .new_attr::<bool>()
                    .shape(())
                    .create("ordered")?
                    .write_scalar(&false)?;
                write_string_array(&group, "categories", &categories)?;
                write_codes(&group, &codes, categories.len())?;
            }
            ObsColumn::Str(values) => {
                write_string_array(obs, name, &to_h5_strings(values).map_err(nul)?)?;
            }
            ObsColumn::F32(values) => write_numeric_array(obs, name, values)?,
            ObsColumn::F64(values) => write_numeric_array(obs, name, values)?,
            ObsColumn::I64(values) => write_numeric_array(obs, name, values)?,
            // hdf5's bool is the enum {FALSE = 0, TRUE = 1} over int8 that h5py, and so anndata, reads as
            // numpy bool.
            ObsColumn::Bool(values) => write_numeric_array(obs, name, values)?,
        }
        Ok(())
    }
}

impl Drop for H5adWriter {
    fn drop(&mut self) {
        // After a successful finish the partial file was renamed away and this finds nothing to remove.
        drop(self.open.take());
        let _ = std::fs::remove_file(&self.partial_path);
    }
}

/// Why `name` cannot be a member of an HDF5 group, if it cannot.
fn check_member_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." {
        Err("is not a valid HDF5 name")
    } else if name.contains('/') {
        Err("contains '/', which HDF5 reads as a path separator")
    } else if name.contains('\0') {
        Err("contains a NUL character")
    } else {
        Ok(())
    }
}

/// The values as HDF5 variable-length UTF-8 strings, or the index of the first that holds a NUL.
fn to_h5_strings<S: AsRef<str>>(values: &[S]) -> Result<Vec<VarLenUnicode>, usize> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| v.as_ref().parse().map_err(|_| i))
        .collect()
}

fn set_str_attr(loc: &Location, name: &str, value: &str) -> hdf5::Result<()> {
    let value: VarLenUnicode = value.parse().map_err(|_| "NUL in an attribute value")?;
    loc.new_attr::<VarLenUnicode>()
        .shape(())
        .create(name)?
        .write_scalar(&value)
}

fn set_encoding(loc: &Location, encoding_type: &str, encoding_version: &str) -> hdf5::Result<()> {
    set_str_attr(loc, "encoding-type", encoding_type)?;
    set_str_attr(loc, "encoding-version", encoding_version)
}

fn write_dict(file: &File, name: &str) -> hdf5::Result<Group> {
    let group = file.create_group(name)?;
    set_encoding(&group, "dict", "0.1.0")?;
    Ok(group)
}

fn write_scalar_string(group: &Group, name: &str, value: &VarLenUnicode) -> hdf5::Result<()> {
    let dataset = group
        .new_dataset::<VarLenUnicode>()
        .shape(())
        .create(name)?;
    dataset.write_scalar(value)?;
    set_encoding(&dataset, "string", "0.2.0")
}

/// Writes a dataframe group with its index; the caller adds the columns named in `column_order`.
fn write_dataframe(
    file: &File,
    name: &str,
    index: &[VarLenUnicode],
    column_order: &[&str],
) -> hdf5::Result<Group> {
    let group = file.create_group(name)?;
    set_encoding(&group, "dataframe", "0.2.0")?;
    set_str_attr(&group, "_index", INDEX_KEY)?;
    let column_order = to_h5_strings(column_order).map_err(|_| "NUL in a column name")?;
    // Written as a string array even when empty (anndata writes an empty float array then); anndata
    // reads either through `list(...)`.
    group
        .new_attr_builder()
        .with_data(column_order.as_slice())
        .create("column-order")?;
    write_string_array(&group, INDEX_KEY, index)?;
    Ok(group)
}

fn write_string_array(group: &Group, name: &str, values: &[VarLenUnicode]) -> hdf5::Result<()> {
    let dataset = group.new_dataset_builder().with_data(values).create(name)?;
    set_encoding(&dataset, "string-array", "0.2.0")
}

fn write_numeric_array<T: H5Type>(group: &Group, name: &str, values: &[T]) -> hdf5::Result<()> {
    let dataset = group.new_dataset_builder().with_data(values).create(name)?;
    set_encoding(&dataset, "array", "0.2.0")
}

/// Writes categorical codes in the smallest signed integer that holds them, as pandas does.
fn write_codes(group: &Group, codes: &[usize], n_categories: usize) -> hdf5::Result<()> {
    fn narrowed<T: TryFrom<usize>>(codes: &[usize]) -> Vec<T> {
        codes
            .iter()
            .map(|&c| {
                T::try_from(c).unwrap_or_else(|_| unreachable!("the caller checked the width"))
            })
            .collect()
    }
    let max_code = n_categories.saturating_sub(1);
    if i8::try_from(max_code).is_ok() {
        write_numeric_array(group, "codes", &narrowed::<i8>(codes))
    } else if i16::try_from(max_code).is_ok() {
        write_numeric_array(group, "codes", &narrowed::<i16>(codes))
    } else if i32::try_from(max_code).is_ok() {
        write_numeric_array(group, "codes", &narrowed::<i32>(codes))
    } else {
        write_numeric_array(group, "codes", &narrowed::<i64>(codes))
    }
}

/// Writes `count` whole rows of the 2-D float32 dataset `x` from row `start`, from row-major `values`.
/// Raw HDF5 because the high-level `write_slice` needs a 2-D ndarray view and the worker does not depend on
/// ndarray otherwise.
fn write_row_block(
    x: &Dataset,
    start: usize,
    count: usize,
    n_vars: usize,
    values: &[f32],
) -> Result<(), String> {
    assert_eq!(values.len(), count * n_vars, "values hold exactly the rows");
    let mem_type = hdf5::Datatype::from_type::<f32>().map_err(|e| e.to_string())?;
    let status = hdf5::sync::sync(|| unsafe {
        let file_space = H5Dget_space(x.id());
        if file_space < 0 {
            return file_space as i32;
        }
        let offset = [start as hsize_t, 0];
        let block = [count as hsize_t, n_vars as hsize_t];
        let selected = H5Sselect_hyperslab(
            file_space,
            H5S_seloper_t::H5S_SELECT_SET,
            offset.as_ptr(),
            std::ptr::null(),
            block.as_ptr(),
            std::ptr::null(),
        );
        let mem_space = H5Screate_simple(2, block.as_ptr(), std::ptr::null());
        let status = if selected < 0 || mem_space < 0 {
            -1
        } else {
            // SAFETY: `values` holds count * n_vars floats, exactly the memory space's extent.
            H5Dwrite(
                x.id(),
                mem_type.id(),
                mem_space,
                file_space,
                H5P_DEFAULT,
                values.as_ptr().cast(),
            )
        };
        if mem_space >= 0 {
            H5Sclose(mem_space);
        }
        H5Sclose(file_space);
        status
    });
    if status < 0 {
        return Err("HDF5 could not write them".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::h5ad::read_strings;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    const N_OBS: usize = 5;
    const N_VARS: usize = 3;

    fn x_values() -> Vec<f32> {
        (0..N_OBS * N_VARS).map(|i| i as f32 * 0.5 - 1.0).collect()
    }

    fn obs_names() -> Vec<String> {
        strings(&["cell0", "cell1", "cell2", "cell3", "cell4"])
    }

    fn var_names() -> Vec<String> {
        strings(&["GENE_A", "GENE_B", "GENE_C"])
    }

    fn columns() -> Vec<(String, ObsColumn)> {
        vec![
            (
                "perturbation".into(),
                ObsColumn::Categorical(strings(&["KO_b", "control", "KO_b", "KO_a", "control"])),
            ),
            (
                "note".into(),
                ObsColumn::Str(strings(&["x", "ü ünïcode", "", "y", "z"])),
            ),
            (
                "score32".into(),
                ObsColumn::F32(vec![0.5, -1.5, 2.25, 0.0, 1e-3]),
            ),
            (
                "score64".into(),
                ObsColumn::F64(vec![1.0, f64::NAN, -2.5, 1e300, 0.125]),
            ),
            ("count".into(), ObsColumn::I64(vec![1, -2, 3, i64::MAX, 0])),
            (
                "flag".into(),
                ObsColumn::Bool(vec![true, false, false, true, true]),
            ),
        ]
    }

    fn uns() -> Vec<(String, String)> {
        vec![
            ("screen".into(), "demo screen".into()),
            ("model".into(), "checkpoint-7".into()),
        ]
    }

    /// Writes the test file with X in two chunks, the later rows first.
    fn write_sample(path: &Path) {
        let x = x_values();
        let mut writer = H5adWriter::create(path, N_OBS, &var_names()).unwrap();
        writer.write_rows(2, &x[2 * N_VARS..]).unwrap();
        writer.write_rows(0, &x[..2 * N_VARS]).unwrap();
        writer.finish(&obs_names(), &columns(), &uns()).unwrap();
    }

    fn string_attr(loc: &Location, name: &str) -> String {
        loc.attr(name)
            .unwrap()
            .read_scalar::<VarLenUnicode>()
            .unwrap()
            .to_string()
    }

    fn encoding(loc: &Location) -> (String, String) {
        (
            string_attr(loc, "encoding-type"),
            string_attr(loc, "encoding-version"),
        )
    }

    fn enc(encoding_type: &str, version: &str) -> (String, String) {
        (encoding_type.to_string(), version.to_string())
    }

    #[test]
    fn writes_the_anndata_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.h5ad");
        write_sample(&path);
        let partial = dir.path().join("sample.h5ad.partial");
        assert!(!partial.exists(), "the partial file is renamed away");

        let file = File::open(&path).unwrap();
        assert_eq!(encoding(&file), enc("anndata", "0.1.0"));

        let x = file.dataset("X").unwrap();
        assert_eq!(encoding(&x), enc("array", "0.2.0"));
        assert_eq!(x.shape(), vec![N_OBS, N_VARS]);
        assert_eq!(x.chunk(), Some(vec![N_OBS, N_VARS]));
        assert_eq!(x.read_raw::<f32>().unwrap(), x_values());

        for (frame, index) in [("obs", obs_names()), ("var", var_names())] {
            let group = file.group(frame).unwrap();
            assert_eq!(encoding(&group), enc("dataframe", "0.2.0"), "{frame}");
            assert_eq!(string_attr(&group, "_index"), "_index");
            let index_ds = group.dataset("_index").unwrap();
            assert_eq!(encoding(&index_ds), enc("string-array", "0.2.0"));
            assert_eq!(read_strings(&index_ds).unwrap(), index);
        }
        let column_order = |frame: &str| -> Vec<String> {
            file.group(frame)
                .unwrap()
                .attr("column-order")
                .unwrap()
                .read_raw::<VarLenUnicode>()
                .unwrap()
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        let names: Vec<String> = columns().into_iter().map(|(name, _)| name).collect();
        assert_eq!(column_order("obs"), names);
        assert!(column_order("var").is_empty());

        let obs = file.group("obs").unwrap();
        let perturbation = obs.group("perturbation").unwrap();
        assert_eq!(encoding(&perturbation), enc("categorical", "0.2.0"));
        assert!(!perturbation
            .attr("ordered")
            .unwrap()
            .read_scalar::<bool>()
            .unwrap());
        let categories = perturbation.dataset("categories").unwrap();
        assert_eq!(encoding(&categories), enc("string-array", "0.2.0"));
        assert_eq!(
            read_strings(&categories).unwrap(),
            strings(&["KO_a", "KO_b", "control"])
        );
        let codes = perturbation.dataset("codes").unwrap();
        assert_eq!(encoding(&codes), enc("array", "0.2.0"));
        assert_eq!(codes.dtype().unwrap().size(), 1, "codes fit in int8");
        assert_eq!(codes.read_raw::<i8>().unwrap(), vec![1, 2, 1, 0, 2]);

        let note = obs.dataset("note").unwrap();
        assert_eq!(encoding(&note), enc("string-array", "0.2.0"));
        assert_eq!(
            read_strings(&note).unwrap(),
            strings(&["x", "ü ünïcode", "", "y", "z"])
        );
        for name in ["score32", "score64", "count", "flag"] {
            assert_eq!(
                encoding(&obs.dataset(name).unwrap()),
                enc("array", "0.2.0"),
                "{name}"
            );
        }
        assert_eq!(
            obs.dataset("score32").unwrap().read_raw::<f32>().unwrap(),
            vec![0.5, -1.5, 2.25, 0.0, 1e-3]
        );
        assert_eq!(
            obs.dataset("count").unwrap().read_raw::<i64>().unwrap(),
            vec![1, -2, 3, i64::MAX, 0]
        );
        assert_eq!(
            obs.dataset("flag").unwrap().read_raw::<bool>().unwrap(),
            vec![true, false, false, true, true]
        );

        for name in ["layers", "obsm", "varm", "obsp", "varp"] {
            let group = file.group(name).unwrap();
            assert_eq!(encoding(&group), enc("dict", "0.1.0"), "{name}");
            assert!(group.member_names().unwrap().is_empty(), "{name}");
        }
        let uns_group = file.group("uns").unwrap();
        assert_eq!(encoding(&uns_group), enc("dict", "0.1.0"));
        let entry = uns_group.dataset("screen").unwrap();
        assert_eq!(encoding(&entry), enc("string", "0.2.0"));
        assert_eq!(
            entry.read_scalar::<VarLenUnicode>().unwrap().as_str(),
            "demo screen"
        );
    }

    /// What anndata reads back, printed by Python as JSON (NaN as null).
    const READ_BACK: &str = r#"
import json, math, sys
import anndata
adata = anndata.read_h5ad(sys.argv[1])
def plain(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and math.isnan(v) else v
obs = {}
for name in adata.obs.columns:
    column = adata.obs[name]
    entry = {"dtype": str(column.dtype), "values": [plain(v) for v in column.tolist()]}
    if str(column.dtype) == "category":
        entry["categories"] = list(column.cat.categories)
        entry["ordered"] = bool(column.cat.ordered)
        entry["codes_dtype"] = str(column.cat.codes.dtype)
    obs[name] = entry
print(json.dumps({
    "shape": list(adata.shape),
    "x_dtype": str(adata.X.dtype),
    "x": adata.X.tolist(),
    "obs_names": list(adata.obs_names),
    "var_names": list(adata.var_names),
    "obs_columns": list(adata.obs.columns),
    "var_columns": list(adata.var.columns),
    "obs": obs,
    "uns": {k: str(v) for k, v in adata.uns.items()},
}))
"#;

    fn read_with_anndata(path: &Path) -> serde_json::Value {
        // HDF5 opens files without close-on-exec, so a python3 spawned here inherits the descriptors of
        // files that tests running in parallel hold, and with them those files' locks: python3 would then
        // find another test's finished file still locked.
        let output = std::process::Command::new("python3")
            .env("HDF5_USE_FILE_LOCKING", "FALSE")
            .arg("-c")
            .arg(READ_BACK)
            .arg(path)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run python3 ({e}); this test needs python3 with anndata >= 0.8 installed")
            });
        assert!(
            output.status.success(),
            "python3 could not read the file with anndata (this test needs python3 with anndata >= 0.8 \
             installed: pip install anndata):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "python3 printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    #[test]
    fn anndata_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sample.h5ad");
        write_sample(&path);
        let read = read_with_anndata(&path);

        assert_eq!(read["shape"], serde_json::json!([N_OBS, N_VARS]));
        assert_eq!(read["x_dtype"], "float32");
        let x: Vec<f32> = read["x"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().clone())
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(x, x_values());
        assert_eq!(read["obs_names"], serde_json::json!(obs_names()));
        assert_eq!(read["var_names"], serde_json::json!(var_names()));
        assert_eq!(read["var_columns"], serde_json::json!([]));
        let names: Vec<String> = columns().into_iter().map(|(name, _)| name).collect();
        assert_eq!(read["obs_columns"], serde_json::json!(names));

        let obs = &read["obs"];
        assert_eq!(obs["perturbation"]["dtype"], "category");
        assert_eq!(
            obs["perturbation"]["categories"],
            serde_json::json!(["KO_a", "KO_b", "control"])
        );
        assert_eq!(obs["perturbation"]["ordered"], false);
        assert_eq!(obs["perturbation"]["codes_dtype"], "int8");
        assert_eq!(
            obs["perturbation"]["values"],
            serde_json::json!(["KO_b", "control", "KO_b", "KO_a", "control"])
        );
        // pandas 3 reads string arrays as its `str` dtype, earlier versions as `object`.
        assert!(
            ["object", "str", "string"].contains(&obs["note"]["dtype"].as_str().unwrap()),
            "note dtype {}",
            obs["note"]["dtype"]
        );
        assert_eq!(
            obs["note"]["values"],
            serde_json::json!(["x", "ü ünïcode", "", "y", "z"])
        );
        assert_eq!(obs["score32"]["dtype"], "float32");
        let score32: Vec<f32> = obs["score32"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(score32, vec![0.5, -1.5, 2.25, 0.0, 1e-3]);
        assert_eq!(obs["score64"]["dtype"], "float64");
        assert_eq!(
            obs["score64"]["values"],
            serde_json::json!([1.0, null, -2.5, 1e300, 0.125])
        );
        assert_eq!(obs["count"]["dtype"], "int64");
        assert_eq!(
            obs["count"]["values"],
            serde_json::json!([1, -2, 3, i64::MAX, 0])
        );
        assert_eq!(obs["flag"]["dtype"], "bool");
        assert_eq!(
            obs["flag"]["values"],
            serde_json::json!([true, false, false, true, true])
        );
        assert_eq!(
            read["uns"],
            serde_json::json!({"screen": "demo screen", "model": "checkpoint-7"})
        );
    }

    #[test]
    fn anndata_reads_empty_matrices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no_obs.h5ad");
        let writer = H5adWriter::create(&path, 0, &var_names()).unwrap();
        let column = ("c".to_string(), ObsColumn::Categorical(vec![]));
        writer.finish(&[], &[column], &[]).unwrap();
        let read = read_with_anndata(&path);
        assert_eq!(read["shape"], serde_json::json!([0, N_VARS]));
        assert_eq!(read["var_names"], serde_json::json!(var_names()));
        assert_eq!(read["obs"]["c"]["dtype"], "category");

        let path = dir.path().join("no_vars.h5ad");
        let mut writer = H5adWriter::create(&path, 2, &[]).unwrap();
        writer.write_rows(0, &[]).unwrap();
        writer.finish(&strings(&["a", "b"]), &[], &[]).unwrap();
        let read = read_with_anndata(&path);
        assert_eq!(read["shape"], serde_json::json!([2, 0]));
        assert_eq!(read["obs_names"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn rows_written_across_chunk_boundaries_in_any_order_read_back() {
        let (n_obs, n_vars) = (1000, 300);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large.h5ad");
        let names: Vec<String> = (0..n_vars).map(|j| format!("g{j}")).collect();
        let x: Vec<f32> = (0..n_obs * n_vars).map(|i| i as f32).collect();
        let mut writer = H5adWriter::create(&path, n_obs, &names).unwrap();
        // Ranges that straddle X's chunks of 436 rows, written out of order.
        for rows in [700..1000, 0..1, 1..437, 437..700] {
            writer
                .write_rows(rows.start, &x[rows.start * n_vars..rows.end * n_vars])
                .unwrap();
        }
        let obs: Vec<String> = (0..n_obs).map(|i| format!("c{i}")).collect();
        let many_categories =
            ObsColumn::Categorical((0..n_obs).map(|i| format!("{:03}", i % 200)).collect());
        writer
            .finish(&obs, &[("group".into(), many_categories)], &[])
            .unwrap();

        let file = File::open(&path).unwrap();
        let x_read = file.dataset("X").unwrap();
        assert_eq!(x_read.chunk(), Some(vec![436, n_vars]));
        assert_eq!(x_read.read_raw::<f32>().unwrap(), x);
        let codes = file.dataset("obs/group/codes").unwrap();
        assert_eq!(
            codes.dtype().unwrap().size(),
            2,
            "200 categories need int16 codes"
        );
        let codes = codes.read_raw::<i16>().unwrap();
        assert!(codes
            .iter()
            .enumerate()
            .all(|(i, &c)| c as usize == i % 200));
    }

    /// Runs `finish` on a fully written sample writer with the given obs and uns, returning its error.
    fn finish_error(
        dir: &Path,
        obs_names: &[String],
        columns: &[(String, ObsColumn)],
        uns: &[(String, String)],
    ) -> String {
        let path = dir.join("bad.h5ad");
        let mut writer = H5adWriter::create(&path, N_OBS, &var_names()).unwrap();
        writer.write_rows(0, &x_values()).unwrap();
        let error = writer.finish(obs_names, columns, uns).unwrap_err();
        assert!(!path.exists(), "a failed finish leaves no file at the path");
        assert!(
            !dir.join("bad.h5ad.partial").exists(),
            "a failed finish removes its partial file"
        );
        format!("{error:#}")
    }

    #[test]
    fn write_rows_rejects_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.h5ad");
        let mut writer = H5adWriter::create(&path, N_OBS, &var_names()).unwrap();
        let error = writer
            .write_rows(0, &[1.0; N_VARS + 1])
            .unwrap_err()
            .to_string();
        assert!(error.contains("rows.h5ad"), "{error}");
        assert!(error.contains("not whole rows of 3 variables"), "{error}");
        let error = writer
            .write_rows(4, &[1.0; 2 * N_VARS])
            .unwrap_err()
            .to_string();
        assert!(error.contains("rows 4..6, past the 5 rows"), "{error}");
        writer.write_rows(1, &[1.0; 2 * N_VARS]).unwrap();
        let error = writer
            .write_rows(0, &[1.0; 2 * N_VARS])
            .unwrap_err()
            .to_string();
        assert!(error.contains("row 1 of X is written twice"), "{error}");
        let error = writer
            .finish(&obs_names(), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("rows.h5ad"), "{error}");
        assert!(
            error.contains("row 0 of X was never written (3 of 5 rows missing)"),
            "{error}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn dropping_an_unfinished_writer_removes_its_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped.h5ad");
        let writer = H5adWriter::create(&path, N_OBS, &var_names()).unwrap();
        assert!(dir.path().join("dropped.h5ad.partial").exists());
        drop(writer);
        assert!(!dir.path().join("dropped.h5ad.partial").exists());
        assert!(!path.exists());
    }

    #[test]
    fn finish_rejects_bad_obs_and_uns() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let one_column = |name: &str, column: ObsColumn| vec![(name.to_string(), column)];

        let error = finish_error(dir, &obs_names()[..4], &[], &[]);
        assert!(
            error.contains("bad.h5ad: 4 obs names for 5 observations"),
            "{error}"
        );

        let error = finish_error(
            dir,
            &obs_names(),
            &one_column("short", ObsColumn::F64(vec![1.0; 4])),
            &[],
        );
        assert!(
            error.contains("obs column 'short' has 4 values for 5 observations"),
            "{error}"
        );

        let twice = [
            ("a".to_string(), ObsColumn::I64(vec![0; N_OBS])),
            ("a".to_string(), ObsColumn::Bool(vec![false; N_OBS])),
        ];
        let error = finish_error(dir, &obs_names(), &twice, &[]);
        assert!(error.contains("obs column 'a' is given twice"), "{error}");

        let error = finish_error(
            dir,
            &obs_names(),
            &one_column("_index", ObsColumn::Str(obs_names())),
            &[],
        );
        assert!(error.contains("is named like the obs index"), "{error}");

        let error = finish_error(
            dir,
            &obs_names(),
            &one_column("a/b", ObsColumn::I64(vec![0; N_OBS])),
            &[],
        );
        assert!(
            error.contains("obs column name 'a/b' contains '/'"),
            "{error}"
        );

        let mut names = obs_names();
        names[3] = "nul\0name".into();
        let error = finish_error(dir, &names, &[], &[]);
        assert!(
            error.contains("obs name 3 contains a NUL character"),
            "{error}"
        );

        let uns_twice = [
            ("k".to_string(), "1".to_string()),
            ("k".to_string(), "2".to_string()),
        ];
        let error = finish_error(dir, &obs_names(), &[], &uns_twice);
        assert!(error.contains("uns key 'k' is given twice"), "{error}");
    }
}
