"""Independent reference for the end-to-end tests: reads an h5ad with anndata (not cellfleet's reader)
and bins cells with numpy following the rule written in docs/corpus.md:

    bin 0 for zero; a non-zero value x of a cell with m non-zero values over the vocabulary gets
    1 + floor(r * (n_bins - 1) / m), r = number of the cell's non-zero values strictly below x.

usage: reference.py H5AD MATRIX GENES_JSON N_BINS ROWS_JSON [LABEL_COL ...]
prints JSON {"bins": [[...], ...], "labels": {col: [...]}, "names": [...]}
"""
import json
import sys
import warnings

import anndata
import numpy as np
import scipy.sparse as sp

warnings.filterwarnings("ignore")
path, matrix, genes_json, n_bins, rows_json, *label_cols = sys.argv[1:]
n_bins = int(n_bins)
genes = json.loads(open(genes_json).read())
rows = json.loads(rows_json)
adata = anndata.read_h5ad(path)
if matrix in ("X",):
    X, var_names = adata.X, adata.var_names
elif matrix in ("raw/X", "raw.X"):
    X, var_names = adata.raw.X, adata.raw.var_names
elif matrix.startswith("layers/"):
    X, var_names = adata.layers[matrix[len("layers/"):]], adata.var_names
else:
    raise SystemExit(f"unknown matrix {matrix}")
position = {g: i for i, g in enumerate(var_names)}
cols = np.array([position.get(g, -1) for g in genes])
out = []
for r in rows:
    row = X[r]
    row = row.toarray().ravel() if sp.issparse(row) else np.asarray(row).ravel()
    values = np.where(cols >= 0, row[np.maximum(cols, 0)], 0.0)
    bins = np.zeros(len(genes), dtype=np.int64)
    nz = values != 0
    m = int(nz.sum())
    if m:
        nonzero = np.sort(values[nz])
        rank = np.searchsorted(nonzero, values[nz], side="left")
        bins[nz] = 1 + (rank * (n_bins - 1)) // m
    out.append(bins.tolist())
labels = {c: [None if v != v else str(v) for v in adata.obs[c].iloc[rows]] for c in label_cols}
print(json.dumps({"bins": out, "labels": labels, "names": [str(n) for n in adata.obs_names[rows]]}))
