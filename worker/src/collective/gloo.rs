//! Gloo collectives over TCP for CPU tensors, through the C++ shim in `worker/cpp/gloo_shim.cc`.
//!
//! `build.rs` compiles the shim into a shared object that this binary embeds; the first use writes it
//! to an anonymous file (memfd) and loads it with `RTLD_LOCAL | RTLD_DEEPBIND`, so the shim binds to
//! Debian's libgloo and never to the different Gloo that libtorch_cpu.so exports under the same symbol
//! names. Only plain C types cross the boundary: the shim catches every C++ exception, and the store
//! callbacks below catch every Rust panic.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{
    check_rank, check_root, check_tensor, Collective, CollectiveError, RendezvousStore, Result,
};

/// The shim's return codes (`kOk` ... in gloo_shim.cc).
const CODE_OK: c_int = 0;
const CODE_PEER_LOST: c_int = 1;
const CODE_RENDEZVOUS: c_int = 3;

static SHIM_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libcellfleet_gloo.so"));

type StoreSetFn = unsafe extern "C" fn(
    user: *mut c_void,
    key: *const c_char,
    key_len: usize,
    value: *const c_char,
    value_len: usize,
    err: *mut c_char,
    err_cap: usize,
) -> c_int;
type StoreGetFn = unsafe extern "C" fn(
    user: *mut c_void,
    key: *const c_char,
    key_len: usize,
    timeout_ms: i64,
    out: *mut *mut c_char,
    out_len: *mut usize,
    err: *mut c_char,
    err_cap: usize,
) -> c_int;
type CreateFn = unsafe extern "C" fn(
    rank: c_int,
    size: c_int,
    hostname: *const c_char,
    timeout_ms: i64,
    store_user: *mut c_void,
    store_set: StoreSetFn,
    store_get: StoreGetFn,
    out_handle: *mut *mut c_void,
    err: *mut c_char,
    err_cap: usize,
) -> c_int;
type DestroyFn = unsafe extern "C" fn(handle: *mut c_void);
type AllreduceFn = unsafe extern "C" fn(
    handle: *mut c_void,
    data: *mut f32,
    count: usize,
    err: *mut c_char,
    err_cap: usize,
) -> c_int;
type BroadcastFn = unsafe extern "C" fn(
    handle: *mut c_void,
    data: *mut c_void,
    bytes: usize,
    root: c_int,
    err: *mut c_char,
    err_cap: usize,
) -> c_int;
type BarrierFn =
    unsafe extern "C" fn(handle: *mut c_void, err: *mut c_char, err_cap: usize) -> c_int;
type BenchAllreduceFn = unsafe extern "C" fn(
    handle: *mut c_void,
    data: *mut f32,
    count: usize,
    iters: c_int,
    seconds: *mut f64,
    err: *mut c_char,
    err_cap: usize,
) -> c_int;

/// The shim's entry points. The shared object stays loaded for the life of the process.
struct Shim {
    create: CreateFn,
    destroy: DestroyFn,
    allreduce_sum_f32: AllreduceFn,
    broadcast: BroadcastFn,
    barrier: BarrierFn,
    bench_allreduce: BenchAllreduceFn,
}

fn shim() -> Result<&'static Shim> {
    static SHIM: OnceLock<std::result::Result<Shim, String>> = OnceLock::new();
    SHIM.get_or_init(load_shim)
        .as_ref()
        .map_err(|e| CollectiveError::Backend(format!("cannot load the Gloo shim: {e}")))
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dynamic loader error".into()
    } else {
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

fn load_shim() -> std::result::Result<Shim, String> {
    let handle = open_embedded_shim()?;
    let symbol = |name: &str| -> std::result::Result<*mut c_void, String> {
        let cname = CString::new(name).expect("symbol names have no NUL");
        // SAFETY: handle is a live dlopen handle.
        let ptr = unsafe { libc::dlsym(handle, cname.as_ptr()) };
        if ptr.is_null() {
            Err(format!("symbol {name} missing: {}", dlerror()))
        } else {
            Ok(ptr)
        }
    };
    // SAFETY: each symbol is the extern "C" function of gloo_shim.cc with exactly this signature.
    unsafe {
        Ok(Shim {
            create: std::mem::transmute::<*mut c_void, CreateFn>(symbol("cf_gloo_create")?),
            destroy: std::mem::transmute::<*mut c_void, DestroyFn>(symbol("cf_gloo_destroy")?),
            allreduce_sum_f32: std::mem::transmute::<*mut c_void, AllreduceFn>(symbol(
                "cf_gloo_allreduce_sum_f32",
            )?),
            broadcast: std::mem::transmute::<*mut c_void, BroadcastFn>(symbol(
                "cf_gloo_broadcast",
            )?),
            barrier: std::mem::transmute::<*mut c_void, BarrierFn>(symbol("cf_gloo_barrier")?),
            bench_allreduce: std::mem::transmute::<*mut c_void, BenchAllreduceFn>(symbol(
                "cf_gloo_bench_allreduce",
            )?),
        })
    }
}

/// Writes the embedded shim to an anonymous memory file (or, where memfd is unavailable, a temporary
/// file) and loads it.
fn open_embedded_shim() -> std::result::Result<*mut c_void, String> {
    use std::io::Write;
    use std::os::fd::FromRawFd;

    let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_DEEPBIND;
    let open = |path: &str| -> std::result::Result<*mut c_void, String> {
        let cpath = CString::new(path).map_err(|e| e.to_string())?;
        // SAFETY: cpath is NUL-terminated; the shim's initialisers only set up libgloo and libstdc++.
        let handle = unsafe { libc::dlopen(cpath.as_ptr(), flags) };
        if handle.is_null() {
            Err(format!(
                "{} (the shim needs libgloo.so, e.g. Debian's libgloo-dev)",
                dlerror()
            ))
        } else {
            Ok(handle)
        }
    };

    let name = c"cellfleet_gloo_shim";
    // SAFETY: name is NUL-terminated; a non-negative result is a new fd that we own.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: fd is ours alone; File closes it (after dlopen has mapped the object).
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        let loaded = file
            .write_all(SHIM_OBJECT)
            .map_err(|e| format!("cannot write the shim to a memfd: {e}"))
            .and_then(|()| open(&format!("/proc/self/fd/{fd}")));
        if let Ok(handle) = loaded {
            return Ok(handle);
        }
        // Without /proc (or with a noexec memfd policy) the temporary file below still works.
    }
    let path = std::env::temp_dir().join(format!(
        "cellfleet-gloo-shim-{}-{}.so",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::write(&path, SHIM_OBJECT)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let handle = open(&path.to_string_lossy());
    let _ = std::fs::remove_file(&path);
    handle
}

/// What the store callbacks see through their `user` pointer while a context connects.
struct StoreBridge {
    store: Arc<dyn RendezvousStore>,
    prefix: String,
}

impl StoreBridge {
    /// SAFETY: `user` is the `StoreBridge` that `GlooCollective::connect` keeps alive during the call;
    /// `key` points at `key_len` bytes.
    unsafe fn from_raw<'a>(
        user: *mut c_void,
        key: *const c_char,
        key_len: usize,
    ) -> (&'a Self, String) {
        let bridge = unsafe { &*(user as *const StoreBridge) };
        let key = unsafe { std::slice::from_raw_parts(key as *const u8, key_len) };
        let key = format!("{}/gloo/{}", bridge.prefix, String::from_utf8_lossy(key));
        (bridge, key)
    }
}

fn write_message(msg: &str, err: *mut c_char, err_cap: usize) {
    if err.is_null() || err_cap == 0 {
        return;
    }
    let n = msg.len().min(err_cap - 1);
    // SAFETY: the caller's buffer holds err_cap bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr() as *const c_char, err, n);
        *err.add(n) = 0;
    }
}

/// Turns a callback's outcome (or its panic) into the shim's convention: 0, or non-zero and a message.
fn callback_code(
    outcome: std::thread::Result<anyhow::Result<()>>,
    err: *mut c_char,
    err_cap: usize,
) -> c_int {
    match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            write_message(&format!("{e:#}"), err, err_cap);
            1
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            write_message(&format!("rendezvous store panicked: {what}"), err, err_cap);
            1
        }
    }
}

unsafe extern "C" fn store_set(
    user: *mut c_void,
    key: *const c_char,
    key_len: usize,
    value: *const c_char,
    value_len: usize,
    err: *mut c_char,
    err_cap: usize,
) -> c_int {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the shim passes its live key and value buffers.
        let (bridge, key) = unsafe { StoreBridge::from_raw(user, key, key_len) };
        let value: &[u8] = if value_len == 0 {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(value as *const u8, value_len) }
        };
        bridge.store.set(&key, value)
    }));
    callback_code(outcome, err, err_cap)
}

unsafe extern "C" fn store_get(
    user: *mut c_void,
    key: *const c_char,
    key_len: usize,
    timeout_ms: i64,
    out: *mut *mut c_char,
    out_len: *mut usize,
    err: *mut c_char,
    err_cap: usize,
) -> c_int {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the shim passes its live key buffer and out-pointers.
        let (bridge, key) = unsafe { StoreBridge::from_raw(user, key, key_len) };
        let timeout = Duration::from_millis(timeout_ms.max(0) as u64);
        let value = bridge.store.get(&key, timeout)?;
        // The shim frees this with free(3).
        let buffer = if value.is_empty() {
            std::ptr::null_mut()
        } else {
            let buffer = unsafe { libc::malloc(value.len()) } as *mut c_char;
            anyhow::ensure!(
                !buffer.is_null(),
                "out of memory for a {}-byte value",
                value.len()
            );
            unsafe {
                std::ptr::copy_nonoverlapping(value.as_ptr() as *const c_char, buffer, value.len())
            };
            buffer
        };
        unsafe {
            *out = buffer;
            *out_len = value.len();
        }
        Ok(())
    }));
    callback_code(outcome, err, err_cap)
}

#[derive(Debug, Clone)]
pub struct GlooOptions {
    /// Address this rank listens on and advertises to its peers.
    pub hostname: String,
    /// Bound on connecting and on every operation: a peer silent for longer is lost.
    pub timeout: Duration,
}

impl Default for GlooOptions {
    fn default() -> Self {
        Self {
            hostname: "127.0.0.1".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// One rank of a Gloo group: a full TCP mesh, ring all-reduce.
pub struct GlooCollective {
    shim: &'static Shim,
    handle: *mut c_void,
    rank: usize,
    world: usize,
    /// Set by the first lost peer; the context is not used again.
    failed: Option<String>,
}

// SAFETY: the Gloo context is used by one thread at a time (every use takes `&mut self`) and does not
// depend on the thread that created it.
unsafe impl Send for GlooCollective {}

impl GlooCollective {
    /// Connects rank `rank` of `world` (full mesh over TCP on `options.hostname`), rendezvous through
    /// `store` under keys that start with `prefix` (so generations don't collide).
    pub fn connect(
        store: Arc<dyn RendezvousStore>,
        prefix: &str,
        rank: usize,
        world: usize,
        options: &GlooOptions,
    ) -> Result<Self> {
        check_rank(rank, world)?;
        let shim = shim()?;
        let hostname = CString::new(options.hostname.as_str())
            .map_err(|_| CollectiveError::Backend("hostname contains a NUL byte".into()))?;
        let bridge = StoreBridge {
            store,
            prefix: prefix.to_owned(),
        };
        let mut handle = std::ptr::null_mut();
        let mut err = [0 as c_char; 2048];
        // SAFETY: `bridge` outlives the call and Gloo keeps no reference to the store after connecting;
        // the callbacks match the shim's types.
        let code = unsafe {
            (shim.create)(
                rank as c_int,
                world as c_int,
                hostname.as_ptr(),
                options.timeout.as_millis().min(i64::MAX as u128) as i64,
                &bridge as *const StoreBridge as *mut c_void,
                store_set,
                store_get,
                &mut handle,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        check_code(code, &err)?;
        Ok(Self {
            shim,
            handle,
            rank,
            world,
            failed: None,
        })
    }

    /// Benchmark baseline: Gloo's own `gloo::allreduce` (ring algorithm) run `iters` times on `tensor`, timed inside
    /// the shim around that loop alone. Returns the seconds of all iterations.
    pub fn baseline_allreduce(&mut self, tensor: &mut Tensor, iters: usize) -> Result<f64> {
        check_tensor(tensor, Some(Kind::Float), Device::Cpu, "all-reduce")?;
        let (data, count) = (tensor.data_ptr() as *mut f32, tensor.numel());
        let shim = self.shim;
        let mut seconds = 0.0;
        self.call(|handle, err, cap| unsafe {
            (shim.bench_allreduce)(handle, data, count, iters as c_int, &mut seconds, err, cap)
        })?;
        Ok(seconds)
    }

    /// Runs one shim operation; a lost peer fails this and every later call.
    fn call(&mut self, op: impl FnOnce(*mut c_void, *mut c_char, usize) -> c_int) -> Result<()> {
        if let Some(cause) = &self.failed {
            return Err(CollectiveError::PeerLost(format!(
                "gloo rank {} of {}: the group already failed ({cause})",
                self.rank, self.world
            )));
        }
        let mut err = [0 as c_char; 2048];
        let code = op(self.handle, err.as_mut_ptr(), err.len());
        let result = check_code(code, &err);
        if let Err(CollectiveError::PeerLost(msg)) = &result {
            self.failed = Some(msg.clone());
        }
        result
    }
}

fn check_code(code: c_int, err: &[c_char]) -> Result<()> {
    if code == CODE_OK {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates the message within the buffer (which starts zeroed).
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Err(match code {
        CODE_PEER_LOST => CollectiveError::PeerLost(msg),
        CODE_RENDEZVOUS => CollectiveError::Rendezvous(msg),
        _ => CollectiveError::Backend(msg),
    })
}

impl Collective for GlooCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "gloo"
    }

    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<()> {
        check_tensor(tensor, Some(Kind::Float), Device::Cpu, "gloo all-reduce")?;
        let (data, count) = (tensor.data_ptr() as *mut f32, tensor.numel());
        if count == 0 {
            return Ok(());
        }
        let shim = self.shim;
        // SAFETY: data points at `count` contiguous f32 owned by `tensor`, borrowed mutably for the call.
        self.call(|handle, err, cap| unsafe {
            (shim.allreduce_sum_f32)(handle, data, count, err, cap)
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check_root(root, self.world)?;
        check_tensor(tensor, None, Device::Cpu, "gloo broadcast")?;
        let (data, bytes) = (tensor.data_ptr(), super::byte_size(tensor));
        if bytes == 0 {
            return Ok(());
        }
        let shim = self.shim;
        // SAFETY: data points at `bytes` contiguous bytes owned by `tensor`, borrowed mutably for the call.
        self.call(|handle, err, cap| unsafe {
            (shim.broadcast)(handle, data, bytes, root as c_int, err, cap)
        })
    }

    fn barrier(&mut self) -> Result<()> {
        let shim = self.shim;
        self.call(|handle, err, cap| unsafe { (shim.barrier)(handle, err, cap) })
    }
}

impl Drop for GlooCollective {
    fn drop(&mut self) {
        let started = Instant::now();
        // SAFETY: handle came from cf_gloo_create and is destroyed once.
        unsafe { (self.shim.destroy)(self.handle) };
        tracing::debug!(
            rank = self.rank,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "gloo context closed"
        );
    }
}
