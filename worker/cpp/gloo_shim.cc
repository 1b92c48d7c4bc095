// C ABI over Gloo (Debian's libgloo) for `worker/src/collective/gloo.rs`.
//
// Built by `worker/build.rs` into its own shared object, which the Rust side loads with
// RTLD_LOCAL | RTLD_DEEPBIND: libtorch_cpu.so exports its own (newer, ABI-incompatible) copy of Gloo's
// symbols, and this shim and libgloo must bind to each other, never to libtorch's copy.
//
// Rules every entry point keeps:
// * no C++ exception crosses into Rust: each one catches `std::exception` and `...` and returns a code,
//   with the message copied into the caller's buffer;
// * the rendezvous store calls back into Rust through plain function pointers; a callback's failure
//   comes back as a non-zero code and is rethrown here as `StoreError`.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <gloo/allreduce.h>
#include <gloo/allreduce_ring.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#define CF_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// Return codes shared with gloo.rs.
constexpr int kOk = 0;
constexpr int kPeerLost = 1;
constexpr int kBackend = 2;
constexpr int kRendezvous = 3;

using StoreSetFn = int (*)(void* user, const char* key, size_t key_len, const char* value,
                           size_t value_len, char* err, size_t err_cap);
// On success `*out` is a malloc'd buffer (or null when `*out_len` is 0) that the shim frees.
using StoreGetFn = int (*)(void* user, const char* key, size_t key_len, int64_t timeout_ms,
                           char** out, size_t* out_len, char* err, size_t err_cap);

struct StoreError : std::runtime_error {
  explicit StoreError(const std::string& msg) : std::runtime_error(msg) {}
};

class CallbackStore : public gloo::rendezvous::Store {
 public:
  CallbackStore(void* user, StoreSetFn set_fn, StoreGetFn get_fn, std::chrono::milliseconds timeout)
      : user_(user), set_fn_(set_fn), get_fn_(get_fn), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    char err[1024] = {0};
    if (set_fn_(user_, key.data(), key.size(), data.data(), data.size(), err, sizeof(err)) != 0) {
      throw StoreError("store set '" + key + "': " + err);
    }
  }

  std::vector<char> get(const std::string& key) override { return get_with_timeout(key, timeout_); }

  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }

  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    for (const auto& key : keys) {
      get_with_timeout(key, timeout);
    }
  }

 private:
  std::vector<char> get_with_timeout(const std::string& key, std::chrono::milliseconds timeout) {
    char err[1024] = {0};
    char* out = nullptr;
    size_t out_len = 0;
    if (get_fn_(user_, key.data(), key.size(), static_cast<int64_t>(timeout.count()), &out, &out_len,
                err, sizeof(err)) != 0) {
      throw StoreError("store get '" + key + "': " + err);
    }
    std::vector<char> value(out, out + out_len);
    std::free(out);
    return value;
  }

  void* user_;
  StoreSetFn set_fn_;
  StoreGetFn get_fn_;
  std::chrono::milliseconds timeout_;
};

struct RingOptions {
  float* data;
  size_t count;
  gloo::AllreduceOptions options;
};

// How many buffers keep their ring options.
constexpr size_t kRingOptionsKept = 8;

struct Handle {
  std::shared_ptr<gloo::Context> context;
  std::chrono::milliseconds timeout;
  // Receive space of the direct-exchange all-reduce, kept between calls.
  std::vector<float> scratch;
  // Ring all-reduce options of the buffers reduced last, newest first. Options built afresh for every
  // call made a 1 MiB all-reduce of three ranks 1.7x slower than reusing them (`bench allreduce`), and
  // training reduces the same gradient buckets every step.
  std::vector<std::unique_ptr<RingOptions>> ring_options;
};

void copy_message(const std::string& msg, char* err, size_t err_cap) {
  if (err == nullptr || err_cap == 0) {
    return;
  }
  size_t n = msg.size() < err_cap - 1 ? msg.size() : err_cap - 1;
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

double elapsed_ms(std::chrono::steady_clock::time_point started) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
}

// Runs `body`, turning every exception into a code and a message naming the rank, the operation and
// how long it ran before failing.
template <typename F>
int guarded(const char* op, int rank, char* err, size_t err_cap, F&& body) {
  auto started = std::chrono::steady_clock::now();
  auto fail = [&](int code, const char* kind, const char* what) {
    std::ostringstream msg;
    msg << "gloo " << op << " on rank " << rank << " failed after " << static_cast<long>(elapsed_ms(started))
        << " ms (" << kind << "): " << what;
    copy_message(msg.str(), err, err_cap);
    return code;
  };
  try {
    body();
    return kOk;
  } catch (const StoreError& e) {
    return fail(kRendezvous, "rendezvous", e.what());
  } catch (const gloo::IoException& e) {
    return fail(kPeerLost, "peer lost or timed out", e.what());
  } catch (const std::exception& e) {
    return fail(kBackend, "error", e.what());
  } catch (...) {
    return fail(kBackend, "error", "unknown C++ exception");
  }
}

// Slot prefix of the direct exchange (Gloo's own collectives use 0x01-0x08).
constexpr uint8_t kExchangeSlotPrefix = 0x70;
// Largest message the direct exchange serves; above it the ring's pipelined segments win (`bench
// allreduce`: with its options reused, the ring was 1.3-1.7x faster than the exchange at 1-4 MiB in two
// ranks, and in more ranks the exchange sends n - 1 copies of the buffer against the ring's 2(n - 1)/n).
constexpr size_t kExchangeMaxBytes = 256 * 1024;

void wait_or_throw(bool completed, const char* what) {
  if (!completed) {
    throw gloo::IoException(std::string("aborted waiting for ") + what);
  }
}

// All-reduce by direct exchange: every rank sends its buffer to every peer and sums what it receives in
// rank order (so every rank computes bit-identical sums). One message step instead of the ring's
// 2(n - 1): the choice for latency-bound sizes, up to `kExchangeMaxBytes`.
void exchange_allreduce(Handle* h, float* data, size_t count) {
  auto& context = h->context;
  const int size = context->size;
  const int rank = context->rank;
  const int peers = size - 1;
  const size_t bytes = count * sizeof(float);
  h->scratch.resize(static_cast<size_t>(peers) * count);
  float* received = h->scratch.data();
  auto recv = context->createUnboundBuffer(received, peers * bytes);
  auto send = context->createUnboundBuffer(data, bytes);
  const auto slot = gloo::Slot::build(kExchangeSlotPrefix, 0);
  auto peer_index = [&](int peer) { return peer < rank ? peer : peer - 1; };
  for (int peer = 0; peer < size; peer++) {
    if (peer == rank) continue;
    recv->recv(peer, slot, peer_index(peer) * bytes, bytes);
    send->send(peer, slot, 0, bytes);
  }
  for (int i = 0; i < peers; i++) {
    wait_or_throw(recv->waitRecv(nullptr, h->timeout), "a receive");
  }
  // The sends read `data`, which is overwritten below.
  for (int i = 0; i < peers; i++) {
    wait_or_throw(send->waitSend(nullptr, h->timeout), "a send");
  }
  if (size == 2) {
    // a + b == b + a in IEEE arithmetic: both ranks get the same bits.
    for (size_t i = 0; i < count; i++) data[i] += received[i];
    return;
  }
  auto source = [&](int r) -> const float* { return r == rank ? data : received + peer_index(r) * count; };
  std::vector<float> sum(source(0), source(0) + count);
  for (int r = 1; r < size; r++) {
    const float* src = source(r);
    for (size_t i = 0; i < count; i++) sum[i] += src[i];
  }
  std::copy(sum.begin(), sum.end(), data);
}

// `gloo::sum<float>` is overloaded; this picks the (out, in1, in2, n) form the options expect.
void sum_floats(void* c, const void* a, const void* b, size_t n) {
  void (*fn)(void*, const void*, const void*, size_t) = &gloo::sum<float>;
  fn(c, a, b, n);
}

// Sets `opts` up for Gloo's ring: the f32 sum of `count` floats at `data`, in place.
void configure_ring(gloo::AllreduceOptions& opts, Handle* h, float* data, size_t count) {
  opts.setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
  opts.setOutput(data, count);
  opts.setReduceFunction(&sum_floats);
  opts.setTimeout(h->timeout);
}

// The ring all-reduce options for `count` floats at `data`: reused when this buffer was reduced lately,
// else built, kept, and the oldest dropped.
gloo::AllreduceOptions& ring_options(Handle* h, float* data, size_t count) {
  auto& kept = h->ring_options;
  auto hit = std::find_if(kept.begin(), kept.end(),
                          [&](const auto& r) { return r->data == data && r->count == count; });
  if (hit == kept.end()) {
    auto made = std::unique_ptr<RingOptions>(new RingOptions{data, count, gloo::AllreduceOptions(h->context)});
    configure_ring(made->options, h, data, count);
    if (kept.size() == kRingOptionsKept) kept.pop_back();
    kept.insert(kept.begin(), std::move(made));
  } else if (hit != kept.begin()) {
    std::rotate(kept.begin(), hit, hit + 1);
  }
  return kept.front()->options;
}

}  // namespace

CF_EXPORT int cf_gloo_create(int rank, int size, const char* hostname, int64_t timeout_ms, void* store_user,
                             StoreSetFn store_set, StoreGetFn store_get, void** out_handle, char* err,
                             size_t err_cap) {
  *out_handle = nullptr;
  int code = guarded("connect", rank, err, err_cap, [&] {
    std::chrono::milliseconds timeout(timeout_ms);
    gloo::transport::tcp::attr attr(hostname);
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    context->setTimeout(timeout);
    CallbackStore store(store_user, store_set, store_get, timeout);
    context->connectFullMesh(store, device);
    *out_handle = new Handle{context, timeout, {}};
  });
  // A connection that broke during set-up is a rendezvous failure for the caller, not a lost peer of a
  // working group.
  return code == kPeerLost ? kRendezvous : code;
}

CF_EXPORT void cf_gloo_destroy(void* handle) {
  try {
    delete static_cast<Handle*>(handle);
  } catch (...) {
    // Tearing down a broken context must not take the process with it.
  }
}

CF_EXPORT int cf_gloo_allreduce_sum_f32(void* handle, float* data, size_t count, char* err, size_t err_cap) {
  auto* h = static_cast<Handle*>(handle);
  return guarded("all-reduce", h->context->rank, err, err_cap, [&] {
    if (count * sizeof(float) <= kExchangeMaxBytes) {
      exchange_allreduce(h, data, count);
      return;
    }
    gloo::allreduce(ring_options(h, data, count));
  });
}

CF_EXPORT int cf_gloo_broadcast(void* handle, void* data, size_t bytes, int root, char* err, size_t err_cap) {
  auto* h = static_cast<Handle*>(handle);
  return guarded("broadcast", h->context->rank, err, err_cap, [&] {
    gloo::BroadcastOptions opts(h->context);
    auto* ptr = static_cast<uint8_t*>(data);
    if (h->context->rank == root) {
      opts.setInput(ptr, bytes);
    }
    opts.setOutput(ptr, bytes);
    opts.setRoot(root);
    opts.setTimeout(h->timeout);
    gloo::broadcast(opts);
  });
}

CF_EXPORT int cf_gloo_barrier(void* handle, char* err, size_t err_cap) {
  auto* h = static_cast<Handle*>(handle);
  return guarded("barrier", h->context->rank, err, err_cap, [&] {
    gloo::BarrierOptions opts(h->context);
    opts.setTimeout(h->timeout);
    gloo::barrier(opts);
  });
}

// Benchmark baseline: Gloo's current all-reduce (`gloo::allreduce` with its ring algorithm, the call the
// shim itself makes above two ranks) run `iters` times on `data`, timed around the loop alone (after a
// barrier; the caller warms up with its own calls).
CF_EXPORT int cf_gloo_bench_allreduce(void* handle, float* data, size_t count, int iters, double* seconds,
                                      char* err, size_t err_cap) {
  auto* h = static_cast<Handle*>(handle);
  return guarded("gloo::allreduce benchmark", h->context->rank, err, err_cap, [&] {
    gloo::AllreduceOptions opts(h->context);
    configure_ring(opts, h, data, count);
    gloo::BarrierOptions barrier(h->context);
    barrier.setTimeout(h->timeout);
    gloo::barrier(barrier);
    auto started = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; i++) {
      gloo::allreduce(opts);
    }
    *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  });
}
