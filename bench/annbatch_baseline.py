"""Reference data path for `cellfleet ingest` and the sample stream: scverse annbatch (`pip install
"annbatch[zarrs]"`, Python >= 3.12), on the same .h5ad file, with the zarrs (Rust) codec pipeline as its docs
require for local disks.

usage: annbatch_baseline.py convert H5AD OUT_DIR          -> DatasetCollection.add_adatas (preshuffled, sharded zarr)
       annbatch_baseline.py stream OUT_DIR SECONDS [BATCH] -> shuffled mini-batches from annbatch.Loader

Prints one JSON line: cells, wall seconds, CPU seconds (user + system of this process), peak RSS in MiB,
and for `stream` rows delivered and what one batch is. What it delivers: a scipy.sparse CSR matrix of BATCH
rows (X as stored, not densified), no obs columns (X-only load function), no tokens or masks.

Held to one core: the process pins itself to CPU 0 (sched_setaffinity) before any library starts its threads,
and every thread knob that exists is set to 1: RAYON_NUM_THREADS (zarrs), zarr `threading.max_workers`
(also zarrs' num_threads), zarr `async.concurrency`, zarrs `codec_pipeline.chunk_concurrent_maximum`,
dask's synchronous scheduler (conversion), OMP/OPENBLAS/MKL/NUMBA/BLOSC thread counts. Override the pin with
ANNBATCH_CORES=all. Loader sampling knobs: ANNBATCH_CHUNK_SIZE (default 32), ANNBATCH_PRELOAD_NCHUNKS (256),
the values in annbatch's README.
"""
import os
import sys

SINGLE = os.environ.get("ANNBATCH_CORES", "1") != "all"
if SINGLE:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for knob in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "NUMBA_NUM_THREADS", "BLOSC_NTHREADS", "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(knob, "1")

import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import anndata as ad  # noqa: E402
import dask  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402

from annbatch import DatasetCollection, Loader  # noqa: E402

zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
if SINGLE:
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1,
                     "codec_pipeline.chunk_concurrent_maximum": 1})
    dask.config.set(scheduler="synchronous")
warnings.simplefilter("ignore")


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def x_only(group):
    # README: without a custom load function all obs columns are loaded and yielded.
    x = group["X"]
    return ad.AnnData(X=ad.io.sparse_dataset(x) if isinstance(x, zarr.Group) else x)


def read_in_memory(path):
    adata = ad.read_h5ad(path)
    return ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "convert":
        h5ad, out = sys.argv[2], sys.argv[3]
        wall, cpu = time.perf_counter(), cpu_seconds()
        # The default loader (anndata.experimental.read_lazy) cannot read legacy (pre-0.8) h5ad such as Kang's
        # compound obs table, so read the file with anndata.read_h5ad (X, obs, var) as annbatch's load_adata
        # hook allows. An integer dataset_size skips the on-disk bytes-per-row estimate, which also needs the
        # modern encoding; 10M rows >= any file here, so one dataset_0 holds every cell, as the 20GB default would.
        collection = DatasetCollection(out).add_adatas(
            [h5ad], load_adata=read_in_memory, dataset_size=10_000_000, shuffle=True, rng=np.random.default_rng(0))
        cells = sum(int(ad.io.read_elem(g["obs"]).shape[0]) for g in collection)
        print(json.dumps({"cells": cells, "seconds": time.perf_counter() - wall,
                          "cpu_seconds": cpu_seconds() - cpu, "peak_mib": peak_mib()}))
    elif mode == "stream":
        out, seconds = sys.argv[2], float(sys.argv[3])
        batch = int(sys.argv[4]) if len(sys.argv) > 4 else 256
        loader = Loader(batch_size=batch, shuffle=True, preload_to_gpu=False, rng=np.random.default_rng(0),
                        chunk_size=int(os.environ.get("ANNBATCH_CHUNK_SIZE", 32)),
                        preload_nchunks=int(os.environ.get("ANNBATCH_PRELOAD_NCHUNKS", 256)))
        with ad.settings.override(remove_unused_categories=False):
            loader = loader.use_collection(DatasetCollection(out, mode="r"), load_adata=x_only)
        rows, batches, epochs, first = 0, 0, 0, None
        wall, cpu = time.perf_counter(), cpu_seconds()
        while time.perf_counter() - wall < seconds:
            for item in loader:
                x = item["X"]
                if first is None:
                    first = {"type": f"{type(x).__module__}.{type(x).__name__}",
                             "sparse": bool(getattr(x, "format", None)), "dtype": str(x.dtype),
                             "shape": list(x.shape)}
                rows += x.shape[0]
                batches += 1
                if time.perf_counter() - wall >= seconds:
                    break
            else:
                epochs += 1
        elapsed = time.perf_counter() - wall
        print(json.dumps({"cells": loader.n_obs, "rows": rows, "batches": batches, "epochs": epochs,
                          "seconds": elapsed, "cpu_seconds": cpu_seconds() - cpu, "peak_mib": peak_mib(),
                          "rows_per_second": rows / elapsed, "batch": first}))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
