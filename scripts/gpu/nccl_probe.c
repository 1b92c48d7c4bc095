// NCCL alone, without cellfleet, Rust or libtorch: a single-rank communicator in each of the four modes
// `cellfleet bench nccl-check` tries (blocking or not, null stream or a created one), on a cudaMalloc'd
// buffer. If this passes where nccl-check fails, the fault is in how cellfleet calls NCCL; if it fails
// too, it is NCCL or the driver on this host. Built and run by `scripts/gpu-check.sh run` with nvcc.
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>

static ncclResult_t settle(ncclComm_t comm) {
  ncclResult_t state = ncclInProgress;
  for (long spins = 0; state == ncclInProgress && spins < 100000000L; spins++) {
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
  }
  return state;
}

static int trial(int blocking, int own_stream, size_t count) {
  ncclUniqueId id;
  ncclComm_t comm = NULL;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = blocking;
  cudaStream_t stream = 0;
  float* buffer = NULL;
  const char* stage = "ncclGetUniqueId";
  ncclResult_t r = ncclGetUniqueId(&id);
  if (r == ncclSuccess) {
    stage = "ncclCommInitRankConfig";
    r = ncclCommInitRankConfig(&comm, 1, id, 0, &config);
    if (r == ncclInProgress || r == ncclSuccess) r = settle(comm);
  }
  if (r == ncclSuccess) {
    if (own_stream && cudaStreamCreate(&stream) != cudaSuccess) return printf("cudaStreamCreate failed\n"), 1;
    if (cudaMalloc((void**)&buffer, count * sizeof(float)) != cudaSuccess) return printf("cudaMalloc failed\n"), 1;
    cudaMemset(buffer, 0, count * sizeof(float));
    stage = "ncclAllReduce";
    r = ncclAllReduce(buffer, buffer, count, ncclFloat32, ncclSum, comm, stream);
    if (r == ncclInProgress || r == ncclSuccess) r = settle(comm);
    if (r == ncclSuccess) {
      stage = "cudaStreamSynchronize";
      r = cudaStreamSynchronize(stream) == cudaSuccess ? settle(comm) : ncclUnhandledCudaError;
    }
  }
  const char* modes[2][2] = {{"non-blocking, null stream", "non-blocking, own stream"},
                             {"blocking, null stream", "blocking, own stream"}};
  if (r == ncclSuccess)
    printf("probe [%s]: ok, all-reduce of %zu MiB done\n", modes[blocking][own_stream], count * 4 >> 20);
  else
    printf("probe [%s]: FAILED at %s: %s; NCCL's last warning: %s\n", modes[blocking][own_stream], stage,
           ncclGetErrorString(r), ncclGetLastError(comm));
  if (comm) ncclCommDestroy(comm);
  if (buffer) cudaFree(buffer);
  if (stream) cudaStreamDestroy(stream);
  return r != ncclSuccess;
}

int main(void) {
  int version = 0;
  ncclGetVersion(&version);
  printf("probe: NCCL %d\n", version);
  int failures = 0;
  for (int blocking = 0; blocking <= 1; blocking++)
    for (int own_stream = 0; own_stream <= 1; own_stream++)
      failures += trial(blocking, own_stream, (size_t)64 << 20);
  return failures != 0;
}
