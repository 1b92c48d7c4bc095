//! Reading AnnData `.h5ad` files, with HDF5 kept in a reader child process.
//!
//! HDF5 is a C library, and a damaged file can make it crash (system HDF5 1.10 dereferences damaged
//! global-heap entries while converting variable-length strings) or loop. So every file is read by
//! its own child, `cellfleet h5ad-reader FILE` (this same executable, see [`serve`]), which answers
//! requests over its stdin and stdout. A crash, a hang past the read timeout or a failed allocation
//! ends only the child; the caller gets one error naming the file and the object being read. HDF5 reads
//! are serialized inside one process anyway, so a child per file costs the caller no parallelism.
//!
//! * [`direct`]: the HDF5 code itself (every encoding real files use), run inside the child;
//! * [`reader`]: the protocol, the child's loop and the caller's end.

mod direct;
mod reader;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[cfg(test)]
pub(crate) use direct::read_strings;
pub use reader::serve;

use reader::{Reader, Reply, Request};

/// An error about one input file; the message says what is wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct InputError {
    pub file: PathBuf,
    pub message: String,
}

pub type InputResult<T> = Result<T, InputError>;

fn err(path: &Path, message: impl Into<String>) -> InputError {
    InputError {
        file: path.to_path_buf(),
        message: message.into(),
    }
}

/// An obs column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Column {
    /// Codes index `categories`; negative codes are missing values.
    Categorical {
        categories: Vec<String>,
        codes: Vec<i64>,
    },
    Strings(Vec<String>),
    Numeric(Vec<f64>),
}

impl Column {
    /// The column as one category name per cell (`None` for missing), or why it cannot be a label.
    pub fn as_labels(&self) -> Result<Vec<Option<String>>, String> {
        match self {
            Column::Categorical { categories, codes } => codes
                .iter()
                .map(|&c| match usize::try_from(c) {
                    Ok(i) if i < categories.len() => Ok(Some(categories[i].clone())),
                    Ok(i) => Err(format!(
                        "category code {i} is outside its {} categories",
                        categories.len()
                    )),
                    Err(_) => Ok(None),
                })
                .collect(),
            Column::Strings(values) => Ok(values.iter().map(|v| Some(v.clone())).collect()),
            Column::Numeric(values) => {
                if values.iter().all(|v| v.fract() == 0.0) {
                    Ok(values.iter().map(|v| Some(format!("{v}"))).collect())
                } else {
                    Err("it holds continuous numbers; a label column must be categorical, text or integer".into())
                }
            }
        }
    }
}

/// CSR rows read from a matrix: `values[indptr[i]..indptr[i + 1]]` are row i's non-zeros.
#[derive(Debug, Default, Clone)]
pub struct CsrChunk {
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl CsrChunk {
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let r = self.indptr[i]..self.indptr[i + 1];
        (&self.indices[r.clone()], &self.values[r])
    }
}

/// An open h5ad file (its reader child).
pub struct H5ad {
    pub path: PathBuf,
    reader: Arc<Reader>,
}

/// One expression matrix of a file (X, raw/X or a layer).
pub struct Matrix {
    pub name: String,
    pub n_obs: usize,
    pub n_vars: usize,
    id: u32,
    reader: Arc<Reader>,
}

impl H5ad {
    /// Starts the file's reader child, which checks that it is an HDF5 file HDF5 can open.
    pub fn open(path: &Path) -> InputResult<Self> {
        let reader = Reader::start(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: Arc::new(reader),
        })
    }

    fn ask(&self, request: Request) -> InputResult<Reply> {
        self.reader.ask(request).map_err(|e| err(&self.path, e))
    }

    fn names(&self, request: Request) -> InputResult<Vec<String>> {
        match self.ask(request)? {
            Reply::Names(names) => Ok(names),
            other => Err(err(&self.path, format!("h5ad reader answered {other:?}"))),
        }
    }

    /// Matrices that exist: `X`, `raw` and `layers/<name>`.
    pub fn matrix_names(&self) -> InputResult<Vec<String>> {
        self.names(Request::MatrixNames)
    }

    /// The HDF5 path of matrix `which` (`X`, `raw` or a layer), or why there is none.
    pub fn matrix_path(&self, which: &str) -> InputResult<String> {
        match self.ask(Request::MatrixPath(which.to_string()))? {
            Reply::Path(path) => Ok(path),
            other => Err(err(&self.path, format!("h5ad reader answered {other:?}"))),
        }
    }

    /// Opens `X`, `raw` or a layer name.
    pub fn matrix(&self, which: &str) -> InputResult<Matrix> {
        match self.ask(Request::OpenMatrix(which.to_string()))? {
            Reply::Matrix {
                id,
                name,
                n_obs,
                n_vars,
            } => Ok(Matrix {
                name,
                n_obs,
                n_vars,
                id,
                reader: Arc::clone(&self.reader),
            }),
            other => Err(err(&self.path, format!("h5ad reader answered {other:?}"))),
        }
    }

    /// Gene names of `X` (or of `raw` when `raw` is true).
    pub fn var_names(&self, raw: bool) -> InputResult<Vec<String>> {
        self.names(Request::VarNames(raw))
    }

    pub fn obs_names(&self) -> InputResult<Vec<String>> {
        self.names(Request::ObsNames)
    }

    /// Names of obs columns.
    pub fn obs_columns(&self) -> InputResult<Vec<String>> {
        self.names(Request::ObsColumns)
    }

    /// Reads obs column `name`.
    pub fn obs_column(&self, name: &str) -> InputResult<Column> {
        match self.ask(Request::ObsColumn(name.to_string()))? {
            Reply::Column(column) => Ok(column),
            other => Err(err(&self.path, format!("h5ad reader answered {other:?}"))),
        }
    }
}

impl Matrix {
    /// Reads rows `rows` into `out` (replacing its contents). Column indices are validated.
    pub fn read_rows(&self, rows: Range<usize>, out: &mut CsrChunk) -> Result<(), String> {
        if rows.start > rows.end || rows.end > self.n_obs {
            return Err(format!(
                "rows {rows:?} are outside the matrix's {} rows",
                self.n_obs
            ));
        }
        self.reader
            .read_rows(self.id, &self.name, rows, self.n_vars, out)
    }
}
