//! Collectives for data parallelism (filled in by the collective work: Gloo on CPU, NCCL on CUDA).
