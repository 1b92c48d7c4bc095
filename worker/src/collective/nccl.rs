//! NCCL collectives for CUDA tensors (feature `cuda`), through cudarc's raw bindings, loaded at run time
//! so the binary builds and starts without CUDA.
//!
//! Finding NCCL: cudarc 0.19 looks for `libnccl.so`, `libnccl.so.<cuda major>`, `.12`, `.11`, ... but
//! not `libnccl.so.2`, the only name pip's `nvidia-nccl-cu13` (and `-cu12`) ships. Point it there with a
//! symlink on the loader path, e.g.
//! `ln -s $(python -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))')/lib/libnccl.so.2 ~/.local/lib/libnccl.so`
//! and `export LD_LIBRARY_PATH=~/.local/lib:$LD_LIBRARY_PATH`. We check first and say so, because
//! cudarc panics when the library is missing.
//!
//! Hang safety: the communicator is non-blocking, and every operation waits with a deadline, polling
//! `ncclCommGetAsyncError` and `cuStreamQuery`. Past the deadline the communicator is aborted with the
//! raw `ncclCommAbort` (cudarc's safe `Comm` cannot abort, cudarc issue #584) and the call returns
//! `PeerLost`.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{sys as cu, CudaContext};
use cudarc::nccl::sys as nccl;
use tch::{Device, Kind, Tensor};

use super::{
    check_rank, check_root, check_tensor, Collective, CollectiveError, RendezvousStore, Result,
};

const NCCL_MISSING: &str = "cannot load NCCL: cudarc looks for libnccl.so (or libnccl.so.<cuda major>), \
     but pip's nvidia-nccl wheels ship only libnccl.so.2; symlink it as libnccl.so in a directory on \
     LD_LIBRARY_PATH (e.g. `ln -s .../site-packages/nvidia/nccl/lib/libnccl.so.2 ~/.local/lib/libnccl.so`)";

/// The prefix of `ncclConfig_t` that NCCL 2.17 defined. NCCL reads `size` bytes of it and takes the
/// defaults for later fields, so this works with any NCCL from 2.17 on, whatever version cudarc's
/// bindings describe.
#[repr(C)]
struct NcclConfigV21700 {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

impl NcclConfigV21700 {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
    fn non_blocking() -> Self {
        const UNDEF: c_int = c_int::MIN;
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: 2 * 10000 + 17 * 100,
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
        }
    }
}

/// How a communicator runs. Training uses the default: non-blocking, on the null stream.
/// `bench nccl-check` also tries the others, to tell an NCCL or driver problem from one of ours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NcclMode {
    /// NCCL's blocking mode: every call returns once done. An init whose peer never comes cannot be
    /// aborted in this mode, so it is for diagnosis only.
    pub blocking: bool,
    /// Operations run on a stream of our own instead of the null stream. It is created blocking, so
    /// it still orders with the legacy default stream where libtorch computes.
    pub own_stream: bool,
}

impl std::fmt::Display for NcclMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let blocking = if self.blocking {
            "blocking"
        } else {
            "non-blocking"
        };
        let stream = if self.own_stream {
            "own stream"
        } else {
            "null stream"
        };
        write!(f, "{blocking}, {stream}")
    }
}

/// Refuses a process holding two NCCL libraries. libtorch's CUDA library links one (PyTorch's wheels:
/// `nvidia/nccl/lib/libnccl.so.2`), and cudarc opens `libnccl.so` by name, which can find another copy
/// (a system NCCL, say). Each copy then sees the other's communicators as foreign: the first GPU run
/// formed a communicator and failed its first all-reduce with `ncclInvalidArgument`, and passed once
/// `libnccl.so` pointed at PyTorch's own copy.
fn check_one_nccl() -> Result<()> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut files: Vec<&str> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| {
            std::path::Path::new(path)
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("libnccl.so"))
        })
        .collect();
    files.sort_unstable();
    files.dedup();
    if files.len() > 1 {
        return Err(CollectiveError::Backend(format!(
            "two NCCL libraries are loaded in this process ({}): libtorch links one and cellfleet opened \
             the other as libnccl.so, and communicators of one fail in the other. Link libtorch's as \
             libnccl.so in a directory early on LD_LIBRARY_PATH",
            files.join(" and ")
        )));
    }
    Ok(())
}

/// Loads NCCL (cudarc panics on a missing library, so this asks first) and checks it is the only copy.
fn load_nccl() -> Result<()> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { nccl::is_culib_present() } {
        return Err(CollectiveError::Backend(NCCL_MISSING.into()));
    }
    check_one_nccl()
}

/// The NCCL library's version, e.g. `2.28.9`.
pub fn nccl_version() -> Result<String> {
    load_nccl()?;
    let mut code: c_int = 0;
    // SAFETY: code is a valid out-pointer.
    let r = unsafe { nccl::ncclGetVersion(&mut code) };
    if r != nccl::ncclResult_t::ncclSuccess {
        return Err(CollectiveError::Backend(format!(
            "ncclGetVersion: {}",
            nccl_error(r)
        )));
    }
    // NCCL_VERSION(X, Y, Z) = X * 10000 + Y * 100 + Z from 2.9 on.
    Ok(format!(
        "{}.{}.{}",
        code / 10000,
        code % 10000 / 100,
        code % 100
    ))
}

/// One rank of an NCCL group on one CUDA device.
pub struct NcclCollective {
    /// Null once aborted.
    comm: nccl::ncclComm_t,
    /// Where operations run: null (the legacy default stream) or one created for `NcclMode::own_stream`.
    stream: cu::CUstream,
    context: Arc<CudaContext>,
    device_index: usize,
    rank: usize,
    world: usize,
    timeout: Duration,
    failed: Option<String>,
}

// SAFETY: the communicator is used by one thread at a time (every use takes `&mut self`), and each use
// first binds the device's context to the calling thread.
unsafe impl Send for NcclCollective {}

/// The result's name and text, with NCCL's last warning, which it keeps whatever `NCCL_DEBUG` says
/// (the text of `ncclInvalidArgument` alone only says to set `NCCL_DEBUG=WARN`).
fn nccl_error(result: nccl::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static string.
    let text = unsafe { CStr::from_ptr(nccl::ncclGetErrorString(result)) };
    let mut message = format!("{result:?}: {}", text.to_string_lossy());
    // SAFETY: ncclGetLastError ignores its argument and returns a NUL-terminated buffer it owns.
    let last = unsafe { nccl::ncclGetLastError(std::ptr::null_mut()) };
    if !last.is_null() {
        // SAFETY: checked non-null above; NUL-terminated by NCCL.
        let last = unsafe { CStr::from_ptr(last) }.to_string_lossy();
        let last = last.trim();
        if !last.is_empty() {
            message.push_str(&format!(" (NCCL's last warning: {last})"));
        }
    }
    message
}

impl NcclCollective {
    /// Rank `rank` of `world` on `cuda:device_index`; training uses `NcclMode::default()`.
    pub fn connect(
        store: Arc<dyn RendezvousStore>,
        prefix: &str,
        rank: usize,
        world: usize,
        device_index: usize,
        timeout: Duration,
        mode: NcclMode,
    ) -> Result<Self> {
        check_rank(rank, world)?;
        // SAFETY: only probes whether the libraries can be opened.
        if !unsafe { cu::is_culib_present() } {
            return Err(CollectiveError::Backend(
                "cannot load the CUDA driver library (libcuda.so)".into(),
            ));
        }
        load_nccl()?;
        let context = CudaContext::new(device_index).map_err(|e| {
            CollectiveError::Backend(format!("cannot open cuda:{device_index}: {e:?}"))
        })?;

        let key = format!("{prefix}/nccl/unique_id");
        let id = if rank == 0 {
            let mut id = nccl::ncclUniqueId { internal: [0; 128] };
            // SAFETY: id is a valid out-pointer.
            let r = unsafe { nccl::ncclGetUniqueId(&mut id) };
            if r != nccl::ncclResult_t::ncclSuccess {
                return Err(CollectiveError::Backend(format!(
                    "ncclGetUniqueId: {}",
                    nccl_error(r)
                )));
            }
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            store
                .set(&key, &bytes)
                .map_err(|e| CollectiveError::Rendezvous(format!("{e:#}")))?;
            id
        } else {
            let bytes = store
                .get(&key, timeout)
                .map_err(|e| CollectiveError::Rendezvous(format!("{e:#}")))?;
            let mut id = nccl::ncclUniqueId { internal: [0; 128] };
            if bytes.len() != id.internal.len() {
                return Err(CollectiveError::Rendezvous(format!(
                    "NCCL unique id under {key} has {} bytes, expected {}",
                    bytes.len(),
                    id.internal.len()
                )));
            }
            for (dst, src) in id.internal.iter_mut().zip(bytes) {
                *dst = src as c_char;
            }
            id
        };

        let stream = if mode.own_stream {
            let mut stream: cu::CUstream = std::ptr::null_mut();
            // SAFETY: the device's context is bound to this thread (CudaContext::new binds it) and
            // stream is an out-pointer; flags 0 make a blocking stream.
            let r = unsafe { cu::cuStreamCreate(&mut stream, 0) };
            if r != cu::CUresult::CUDA_SUCCESS {
                return Err(CollectiveError::Backend(format!(
                    "cuStreamCreate on cuda:{device_index}: {r:?}"
                )));
            }
            stream
        } else {
            std::ptr::null_mut()
        };

        let mut config = NcclConfigV21700::non_blocking();
        config.blocking = c_int::from(mode.blocking);
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        let started = Instant::now();
        // SAFETY: config is a valid ncclConfig_t prefix (see NcclConfigV21700) and comm an out-pointer.
        let r = unsafe {
            nccl::ncclCommInitRankConfig(
                &mut comm,
                world as c_int,
                id,
                rank as c_int,
                &mut config as *mut NcclConfigV21700 as *mut nccl::ncclConfig_t,
            )
        };
        let mut this = Self {
            comm,
            stream,
            context,
            device_index,
            rank,
            world,
            timeout,
            failed: None,
        };
        if r != nccl::ncclResult_t::ncclSuccess && r != nccl::ncclResult_t::ncclInProgress {
            this.abort();
            return Err(CollectiveError::Rendezvous(format!(
                "ncclCommInitRankConfig on rank {rank}: {}",
                nccl_error(r)
            )));
        }
        this.wait_enqueued("init", started).map_err(|e| match e {
            CollectiveError::PeerLost(msg) => CollectiveError::Rendezvous(msg),
            other => other,
        })?;
        Ok(this)
    }

    fn abort(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: comm is a live communicator, never used again after this.
            unsafe {
                nccl::ncclCommAbort(self.comm);
            }
            self.comm = std::ptr::null_mut();
        }
    }

    /// Aborts the communicator and records why; a lost peer fails every later call as well.
    fn fail(
        &mut self,
        op: &str,
        started: Instant,
        cause: String,
        peer_lost: bool,
    ) -> CollectiveError {
        self.abort();
        let msg = format!(
            "nccl {op} on rank {} of {} (cuda:{}) failed after {} ms: {cause}",
            self.rank,
            self.world,
            self.device_index,
            started.elapsed().as_millis()
        );
        if peer_lost {
            self.failed = Some(msg.clone());
            CollectiveError::PeerLost(msg)
        } else {
            CollectiveError::Backend(msg)
        }
    }

    /// Polls until the (non-blocking) communicator has finished the call in flight: init, or enqueuing
    /// an operation.
    fn wait_enqueued(&mut self, op: &str, started: Instant) -> Result<()> {
        while self.poll_async(op, started)? {
            self.check_deadline(op, started)?;
            pause(started);
        }
        Ok(())
    }

    /// Polls until our stream (by default the null stream, where tch computes) has drained.
    fn wait_stream(&mut self, op: &str, started: Instant) -> Result<()> {
        loop {
            // SAFETY: the null stream of the context bound to this thread, or a stream created in it.
            match unsafe { cu::cuStreamQuery(self.stream) } {
                cu::CUresult::CUDA_SUCCESS => return self.poll_async(op, started).map(|_| ()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(self.fail(op, started, format!("cuStreamQuery: {other:?}"), false))
                }
            }
            self.poll_async(op, started)?;
            self.check_deadline(op, started)?;
            pause(started);
        }
    }

    /// The communicator's asynchronous state: `Ok(true)` while a call is still in progress, an error
    /// (and an aborted communicator) once it failed.
    fn poll_async(&mut self, op: &str, started: Instant) -> Result<bool> {
        if self.comm.is_null() {
            return Err(CollectiveError::PeerLost(format!(
                "nccl rank {}: the communicator was aborted",
                self.rank
            )));
        }
        let mut state = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: comm is live.
        let r = unsafe { nccl::ncclCommGetAsyncError(self.comm, &mut state) };
        let state = if r != nccl::ncclResult_t::ncclSuccess {
            r
        } else {
            state
        };
        match state {
            nccl::ncclResult_t::ncclSuccess => Ok(false),
            nccl::ncclResult_t::ncclInProgress => Ok(true),
            nccl::ncclResult_t::ncclRemoteError | nccl::ncclResult_t::ncclSystemError => {
                Err(self.fail(op, started, nccl_error(state), true))
            }
            other => Err(self.fail(op, started, nccl_error(other), false)),
        }
    }

    fn check_deadline(&mut self, op: &str, started: Instant) -> Result<()> {
        if started.elapsed() > self.timeout {
            let cause = format!(
                "no completion within {:?}; communicator aborted",
                self.timeout
            );
            return Err(self.fail(op, started, cause, true));
        }
        Ok(())
    }

    /// Launches one operation and waits for it with the deadline.
    fn run(
        &mut self,
        op: &str,
        launch: impl FnOnce(nccl::ncclComm_t) -> nccl::ncclResult_t,
    ) -> Result<()> {
        if let Some(cause) = &self.failed {
            return Err(CollectiveError::PeerLost(format!(
                "nccl rank {} of {}: the group already failed ({cause})",
                self.rank, self.world
            )));
        }
        self.context.bind_to_thread().map_err(|e| {
            CollectiveError::Backend(format!("cannot bind cuda:{}: {e:?}", self.device_index))
        })?;
        let started = Instant::now();
        let r = launch(self.comm);
        if r != nccl::ncclResult_t::ncclSuccess && r != nccl::ncclResult_t::ncclInProgress {
            let peer_lost = matches!(
                r,
                nccl::ncclResult_t::ncclRemoteError | nccl::ncclResult_t::ncclSystemError
            );
            return Err(self.fail(op, started, nccl_error(r), peer_lost));
        }
        self.wait_enqueued(op, started)?;
        self.wait_stream(op, started)
    }
}

/// Spins for the first millisecond (small operations finish that fast), then sleeps briefly.
fn pause(started: Instant) {
    if started.elapsed() < Duration::from_millis(1) {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<()> {
        let device = Device::Cuda(self.device_index);
        check_tensor(tensor, Some(Kind::Float), device, "nccl all-reduce")?;
        let (data, count) = (tensor.data_ptr(), tensor.numel());
        let stream = self.stream as nccl::cudaStream_t;
        if count == 0 {
            return Ok(());
        }
        // SAFETY: data is `count` contiguous f32 on this device, owned by `tensor` for the call.
        self.run("all-reduce", |comm| unsafe {
            nccl::ncclAllReduce(
                data,
                data,
                count,
                nccl::ncclDataType_t::ncclFloat32,
                nccl::ncclRedOp_t::ncclSum,
                comm,
                stream,
            )
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check_root(root, self.world)?;
        let device = Device::Cuda(self.device_index);
        check_tensor(tensor, None, device, "nccl broadcast")?;
        let (data, bytes) = (tensor.data_ptr(), super::byte_size(tensor));
        let stream = self.stream as nccl::cudaStream_t;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: data is `bytes` contiguous bytes on this device, owned by `tensor` for the call.
        self.run("broadcast", |comm| unsafe {
            nccl::ncclBroadcast(
                data,
                data,
                bytes,
                nccl::ncclDataType_t::ncclUint8,
                root as c_int,
                comm,
                stream,
            )
        })
    }

    fn barrier(&mut self) -> Result<()> {
        // NCCL has no barrier: a one-element all-reduce is one.
        let mut token = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.device_index)));
        self.all_reduce_sum(&mut token)
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            let _ = self.context.bind_to_thread();
            // SAFETY: comm is live and used no more. Destroy waits for its operations, which have all
            // completed (every call waits for its stream), so it does not block on peers.
            unsafe {
                nccl::ncclCommDestroy(self.comm);
            }
            self.comm = std::ptr::null_mut();
        }
        if !self.stream.is_null() {
            let _ = self.context.bind_to_thread();
            // SAFETY: a stream we created, used no more (its work has completed, see above).
            unsafe {
                cu::cuStreamDestroy_v2(self.stream);
            }
            self.stream = std::ptr::null_mut();
        }
    }
}
