//! The h5ad reader child and the caller's end of it.
//!
//! Requests go to the child's stdin as one JSON line each. Answers come back on its stdout as frames:
//! a kind byte, a u64 LE payload length, the payload. Kind 0 is a JSON `Result<Reply, String>`; kind 1
//! is a chunk of CSR rows in binary (rows u64, nnz u64, then `rows + 1` u64 offsets, `nnz` u32 column
//! indices and `nnz` f32 values, all LE), the bulk of the traffic. The child reads nothing but its one
//! file and writes nothing but frames; its stderr is kept (the last 4 KiB) to explain a death.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{direct, err, Column, CsrChunk, InputResult};

const JSON_FRAME: u8 = 0;
const ROWS_FRAME: u8 = 1;
/// The child's stderr kept to explain its death.
const STDERR_TAIL: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Request {
    MatrixNames,
    MatrixPath(String),
    OpenMatrix(String),
    ReadRows {
        matrix: u32,
        start: usize,
        end: usize,
    },
    VarNames(bool),
    ObsNames,
    ObsColumns,
    ObsColumn(String),
}

impl Request {
    /// What the request reads, for an error that says where the reading stopped.
    fn object(&self, matrix_name: &str) -> String {
        match self {
            Request::MatrixNames => "the list of its matrices".into(),
            Request::MatrixPath(which) | Request::OpenMatrix(which) => format!("matrix {which}"),
            Request::ReadRows { start, end, .. } => format!("rows {start}..{end} of {matrix_name}"),
            Request::VarNames(true) => "raw/var (gene names)".into(),
            Request::VarNames(false) => "var (gene names)".into(),
            Request::ObsNames => "obs (cell names)".into(),
            Request::ObsColumns => "the obs column names".into(),
            Request::ObsColumn(name) => format!("obs column '{name}'"),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Reply {
    Opened,
    Names(Vec<String>),
    Path(String),
    Matrix {
        id: u32,
        name: String,
        n_obs: usize,
        n_vars: usize,
    },
    Column(Column),
}

/// `cellfleet h5ad-reader FILE`: opens FILE and answers requests on stdin until it closes.
pub fn serve(path: &Path) -> anyhow::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let h5 = match direct::H5ad::open(path) {
        Ok(h5) => {
            send_json(&mut out, &Ok(Reply::Opened))?;
            h5
        }
        Err(e) => return send_json(&mut out, &Err(e.message)),
    };
    let mut matrices: Vec<direct::Matrix> = Vec::new();
    let mut chunk = CsrChunk::default();
    for line in std::io::stdin().lock().lines() {
        let request: Request = serde_json::from_str(&line?)?;
        if let Request::ReadRows { matrix, start, end } = request {
            let read = matrices
                .get(matrix as usize)
                .ok_or_else(|| format!("no open matrix {matrix}"))
                .and_then(|m| m.read_rows(start..end, &mut chunk));
            match read {
                Ok(()) => send_rows(&mut out, &chunk)?,
                Err(e) => send_json(&mut out, &Err(e))?,
            }
            continue;
        }
        let answer = answer(&h5, &mut matrices, request).map_err(|e| e.message);
        send_json(&mut out, &answer)?;
    }
    Ok(())
}

fn answer(
    h5: &direct::H5ad,
    matrices: &mut Vec<direct::Matrix>,
    request: Request,
) -> InputResult<Reply> {
    Ok(match request {
        Request::MatrixNames => Reply::Names(h5.matrix_names()),
        Request::MatrixPath(which) => Reply::Path(h5.matrix_path(&which)?),
        Request::OpenMatrix(which) => {
            let matrix = h5.matrix(&which)?;
            let reply = Reply::Matrix {
                id: matrices.len() as u32,
                name: matrix.name.clone(),
                n_obs: matrix.n_obs,
                n_vars: matrix.n_vars,
            };
            matrices.push(matrix);
            reply
        }
        Request::VarNames(raw) => Reply::Names(h5.var_names(raw)?),
        Request::ObsNames => Reply::Names(h5.obs_names()?),
        Request::ObsColumns => Reply::Names(h5.obs_columns()?),
        Request::ObsColumn(name) => Reply::Column(h5.obs_column(&name)?),
        Request::ReadRows { .. } => unreachable!("rows are answered in binary"),
    })
}

fn send_json(out: &mut impl Write, answer: &Result<Reply, String>) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(answer)?;
    out.write_all(&[JSON_FRAME])?;
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(&payload)?;
    out.flush()?;
    Ok(())
}

fn send_rows(out: &mut impl Write, chunk: &CsrChunk) -> anyhow::Result<()> {
    let (rows, nnz) = (chunk.rows() as u64, chunk.values.len() as u64);
    let len = 16 + 8 * (rows + 1) + 8 * nnz;
    out.write_all(&[ROWS_FRAME])?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&rows.to_le_bytes())?;
    out.write_all(&nnz.to_le_bytes())?;
    for &p in &chunk.indptr {
        out.write_all(&(p as u64).to_le_bytes())?;
    }
    for &j in &chunk.indices {
        out.write_all(&j.to_le_bytes())?;
    }
    for &v in &chunk.values {
        out.write_all(&v.to_le_bytes())?;
    }
    out.flush()?;
    Ok(())
}

/// One answer as it arrived.
enum Frame {
    Json(Vec<u8>),
    Rows(Vec<u8>),
}

/// The caller's end: the child, the frames its stdout yields, and the tail of its stderr.
pub(super) struct Reader {
    path: PathBuf,
    timeout: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    child: Child,
    stdin: Option<ChildStdin>,
    frames: Receiver<std::io::Result<Frame>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Set once the child is gone: every later request gets the same error.
    gone: Option<String>,
}

/// How long one request may take before the child is taken for hung (`CELLFLEET_H5AD_TIMEOUT_SECS`).
fn request_timeout() -> Duration {
    let secs = std::env::var("CELLFLEET_H5AD_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// The program that serves as the reader: this executable unless `CELLFLEET_H5AD_READER` names another
/// `cellfleet` (for test harnesses that are not `cellfleet` themselves).
fn reader_program() -> std::io::Result<PathBuf> {
    match std::env::var_os("CELLFLEET_H5AD_READER") {
        Some(program) => Ok(program.into()),
        None => std::env::current_exe(),
    }
}

impl Reader {
    /// Starts the child for `path` and waits for it to open the file.
    pub(super) fn start(path: &Path) -> InputResult<Self> {
        let program = reader_program()
            .map_err(|e| err(path, format!("cannot find the h5ad reader program: {e}")))?;
        let mut child = Command::new(&program)
            .arg("h5ad-reader")
            .arg(path)
            .env("CELLFLEET_QUIET", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                err(
                    path,
                    format!("cannot start the h5ad reader {}: {e}", program.display()),
                )
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, frames) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mut stdout = BufReader::with_capacity(1 << 20, stdout);
            loop {
                let frame = read_frame(&mut stdout);
                let end = frame.is_err();
                if sender.send(frame).is_err() || end {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut child_stderr = child.stderr.take().expect("piped stderr");
        let tail = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = child_stderr.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut tail = tail.lock().unwrap();
                tail.extend_from_slice(&buf[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
        });
        let reader = Self {
            path: path.to_path_buf(),
            timeout: request_timeout(),
            inner: Mutex::new(Inner {
                stdin: child.stdin.take(),
                child,
                frames,
                stderr,
                gone: None,
            }),
        };
        let mut inner = reader.inner.lock().unwrap();
        match reader.receive(&mut inner, "the file's superblock (opening it)")? {
            Frame::Json(payload) => match parse_answer(&payload) {
                Ok(Reply::Opened) => {}
                Ok(other) => return Err(err(path, format!("h5ad reader answered {other:?}"))),
                Err(message) => return Err(err(path, message)),
            },
            Frame::Rows(_) => return Err(err(path, "h5ad reader answered rows to opening")),
        }
        drop(inner);
        Ok(reader)
    }

    /// Sends `request` and returns its answer, or the error that ends this file.
    pub(super) fn ask(&self, request: Request) -> Result<Reply, String> {
        let mut inner = self.inner.lock().unwrap();
        let object = request.object("");
        match self.exchange(&mut inner, &request, &object)? {
            Frame::Json(payload) => parse_answer(&payload),
            Frame::Rows(_) => Err(format!("h5ad reader answered rows when asked for {object}")),
        }
    }

    /// Reads rows `rows` of open matrix `id` into `out`.
    pub(super) fn read_rows(
        &self,
        id: u32,
        name: &str,
        rows: Range<usize>,
        n_vars: usize,
        out: &mut CsrChunk,
    ) -> Result<(), String> {
        let request = Request::ReadRows {
            matrix: id,
            start: rows.start,
            end: rows.end,
        };
        let object = request.object(name);
        let mut inner = self.inner.lock().unwrap();
        let payload = match self.exchange(&mut inner, &request, &object)? {
            Frame::Rows(payload) => payload,
            Frame::Json(payload) => {
                return Err(match parse_answer(&payload) {
                    Err(message) => message,
                    Ok(other) => format!("h5ad reader answered {other:?} when asked for {object}"),
                })
            }
        };
        decode_rows(&payload, rows.len(), n_vars, out)
            .map_err(|why| format!("h5ad reader sent a damaged chunk of {object}: {why}"))
    }

    fn exchange(
        &self,
        inner: &mut Inner,
        request: &Request,
        object: &str,
    ) -> Result<Frame, String> {
        if let Some(gone) = &inner.gone {
            return Err(gone.clone());
        }
        let mut line = serde_json::to_vec(request).expect("requests serialize");
        line.push(b'\n');
        let sent = match inner.stdin.as_mut() {
            Some(stdin) => stdin.write_all(&line).and_then(|()| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if sent.is_err() {
            // The child is gone; its exit status says how.
            return Err(self.gone(inner, object, None));
        }
        self.receive(inner, object).map_err(|e| e.message)
    }

    fn receive(&self, inner: &mut Inner, object: &str) -> InputResult<Frame> {
        match inner.frames.recv_timeout(self.timeout) {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => {
                Err(err(&self.path, self.gone(inner, object, None)))
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = inner.child.kill();
                Err(err(
                    &self.path,
                    self.gone(inner, object, Some(self.timeout)),
                ))
            }
        }
    }

    /// Waits for the child's end and says what happened while it read `object`; remembers it.
    fn gone(&self, inner: &mut Inner, object: &str, timed_out: Option<Duration>) -> String {
        let status = inner.child.wait();
        let last_words = {
            let tail = inner.stderr.lock().unwrap();
            String::from_utf8_lossy(&tail)
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
                .unwrap_or_default()
        };
        let message = match (timed_out, status) {
            (Some(limit), _) => format!(
                "HDF5 did not finish reading {object} within {} s, so its reader was stopped: the file is damaged (or, if it is huge and on slow storage, raise CELLFLEET_H5AD_TIMEOUT_SECS)",
                limit.as_secs()
            ),
            (None, Ok(status)) if status.signal().is_some() => format!(
                "the HDF5 library crashed ({}) reading {object}: the file is damaged",
                signal_name(status.signal().unwrap_or_default())
            ),
            (None, Ok(status)) => format!(
                "the h5ad reader stopped ({status}) reading {object}{}: the file is damaged",
                if last_words.is_empty() {
                    String::new()
                } else {
                    format!(" ({last_words})")
                }
            ),
            (None, Err(e)) => format!("the h5ad reader was lost reading {object}: {e}"),
        };
        inner.stdin = None;
        inner.gone = Some(message.clone());
        message
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        // Closing stdin ends the child's loop; a child that does not end promptly is killed.
        inner.stdin = None;
        for _ in 0..200 {
            if let Ok(Some(_)) = inner.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = inner.child.kill();
        let _ = inner.child.wait();
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV, a segmentation fault",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT, an abort",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL, killed (out of memory?)",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

fn read_frame(input: &mut impl Read) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    input.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes")) as usize;
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload)?;
    match head[0] {
        JSON_FRAME => Ok(Frame::Json(payload)),
        ROWS_FRAME => Ok(Frame::Rows(payload)),
        kind => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown frame kind {kind}"),
        )),
    }
}

fn parse_answer(payload: &[u8]) -> Result<Reply, String> {
    serde_json::from_slice::<Result<Reply, String>>(payload)
        .map_err(|e| format!("h5ad reader sent an unreadable answer: {e}"))?
}

/// Fills `out` from a rows frame, checking its lengths and offsets.
fn decode_rows(
    payload: &[u8],
    rows: usize,
    n_vars: usize,
    out: &mut CsrChunk,
) -> Result<(), String> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            payload.get(8 * i..8 * i + 8)?.try_into().ok()?,
        ))
    };
    let (got_rows, nnz) = match (word(0), word(1)) {
        (Some(r), Some(n)) => (r as usize, n as usize),
        _ => return Err("too short".into()),
    };
    if got_rows != rows || payload.len() != 16 + 8 * (rows + 1) + 8 * nnz {
        return Err(format!(
            "{got_rows} rows of {nnz} values in {} bytes",
            payload.len()
        ));
    }
    let (offsets, rest) = payload[16..].split_at(8 * (rows + 1));
    let (indices, values) = rest.split_at(4 * nnz);
    out.indptr.clear();
    out.indptr.extend(
        offsets
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize),
    );
    if out.indptr.first() != Some(&0)
        || out.indptr.last() != Some(&nnz)
        || out.indptr.windows(2).any(|w| w[0] > w[1])
    {
        return Err("its row offsets are not increasing from 0 to its value count".into());
    }
    out.indices.clear();
    out.indices.extend(
        indices
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
    );
    if out.indices.iter().any(|&j| j as usize >= n_vars) {
        return Err(format!("a column index is outside 0..{n_vars}"));
    }
    out.values.clear();
    out.values.extend(
        values
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))),
    );
    Ok(())
}
