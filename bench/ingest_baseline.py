"""Python baseline for `cellfleet bench ingest`: the same HVG selection and per-cell binning as
cellfleet (rules in docs/corpus.md), written the way a Python user would, with anndata + numpy, streaming
the matrix in row chunks (backed mode) so memory stays bounded. It does not compress or write shards.

usage: ingest_baseline.py H5AD MATRIX N_HVG N_BINS [MAX_CELLS]
prints JSON {"cells": N, "seconds": S, "genes": [selected gene names]}
"""
import json
import sys
import time
import warnings

import anndata
import numpy as np
import scipy.sparse as sp

warnings.filterwarnings("ignore")
path, matrix, n_hvg, n_bins, *rest = sys.argv[1:]
n_hvg, n_bins = int(n_hvg), int(n_bins)
started = time.perf_counter()
adata = anndata.read_h5ad(path, backed="r")
if matrix == "X":
    X, names = adata.X, adata.var_names
elif matrix in ("raw/X", "raw.X"):
    X, names = adata.raw.X, adata.raw.var_names
else:
    X, names = adata.layers[matrix.split("/", 1)[1]], adata.var_names
n = adata.n_obs if not rest else min(adata.n_obs, int(rest[0]))
chunk = 4096


def rows(lo, hi):
    block = X[lo:hi]
    return sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()


# Pass 1: Seurat-flavour statistics (counts -> per-cell normalization to 1e4; log-normalized -> expm1).
first = rows(0, min(chunk, n))
counts = first.nnz > 0 and np.all(np.mod(first.data, 1) == 0)
s = np.zeros(X.shape[1])
ss = np.zeros(X.shape[1])
for lo in range(0, n, chunk):
    block = rows(lo, min(lo + chunk, n)).astype(np.float64)
    if counts:
        totals = np.asarray(block.sum(axis=1)).ravel()
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        block = sp.diags(scale) @ block
    else:
        block.data = np.expm1(block.data)
    s += np.asarray(block.sum(axis=0)).ravel()
    ss += np.asarray(block.multiply(block).sum(axis=0)).ravel()
mean = s / n
var = np.maximum(ss - n * mean * mean, 0) / (n - 1)
with np.errstate(divide="ignore", invalid="ignore"):
    log_disp = np.where((mean > 0) & (var > 0), np.log(var / mean), np.nan)
log_mean = np.log1p(mean)
lo_m, hi_m = log_mean.min(), log_mean.max()
width = (hi_m - lo_m) / 20
bins_of = np.minimum(((log_mean - lo_m) / width).astype(int), 19) if width > 0 else np.zeros(len(mean), int)
score = np.full(len(mean), np.nan)
for b in range(20):
    members = (bins_of == b) & np.isfinite(log_disp)
    k = members.sum()
    if k == 1:
        score[members] = 1.0
    elif k > 1:
        d = log_disp[members]
        sd = d.std(ddof=1)
        score[members] = (d - d.mean()) / sd if sd > 0 else 0.0
if X.shape[1] <= n_hvg:
    vocab = np.arange(X.shape[1])
else:
    order = sorted(range(len(score)), key=lambda g: (np.isnan(score[g]), -np.nan_to_num(score[g]), g))
    vocab = np.sort(np.array(order[:n_hvg]))

# Pass 2: per-cell quantile binning over the vocabulary.
position = np.full(X.shape[1], -1)
position[vocab] = np.arange(len(vocab))
out = np.zeros((chunk, len(vocab)), dtype=np.uint8)
for lo in range(0, n, chunk):
    block = rows(lo, min(lo + chunk, n))
    out[:] = 0
    for i in range(block.shape[0]):
        idx = block.indices[block.indptr[i]:block.indptr[i + 1]]
        val = block.data[block.indptr[i]:block.indptr[i + 1]]
        keep = (position[idx] >= 0) & (val != 0)
        idx, val = position[idx[keep]], val[keep]
        m = len(val)
        if m:
            rank = np.searchsorted(np.sort(val), val, side="left")
            out[i, idx] = 1 + (rank * (n_bins - 1)) // m
seconds = time.perf_counter() - started
print(json.dumps({"cells": n, "seconds": seconds, "genes": [str(names[g]) for g in vocab]}))
