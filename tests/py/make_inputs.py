"""Writes h5ad variants of the real datasets for the end-to-end tests (every file is derived from a real
file in ../shared/data; nothing is synthetic).

usage: make_inputs.py DATA_DIR OUT_DIR
"""
import os
import shutil
import sys
import warnings

import anndata
import h5py
import numpy as np
import scipy.sparse as sp

warnings.filterwarnings("ignore")
data, out = sys.argv[1:]
os.makedirs(out, exist_ok=True)
kang = anndata.read_h5ad(os.path.join(data, "kang_ifnb_pbmc.h5ad"))
norman = anndata.read_h5ad(os.path.join(data, "norman_subset.h5ad"))

# Same cells in other layouts: CSC, dense with gzip, modern encoding.
csc = kang.copy()
csc.X = sp.csc_matrix(csc.X)
csc.write_h5ad(os.path.join(out, "kang_csc.h5ad"))
dense = kang.copy()
dense.X = np.asarray(dense.X.todense())
dense.write_h5ad(os.path.join(out, "kang_dense_gzip.h5ad"), compression="gzip")

# Bad inputs.
with open(os.path.join(out, "not_hdf5.h5ad"), "w") as f:
    f.write("cell,gene,count\nAAAC,CD3E,4\n")
raw = open(os.path.join(data, "kang_ifnb_pbmc.h5ad"), "rb").read()
with open(os.path.join(out, "truncated.h5ad"), "wb") as f:
    f.write(raw[: len(raw) // 2])

shutil.copy(os.path.join(data, "norman_subset.h5ad"), os.path.join(out, "missing_x.h5ad"))
os.chmod(os.path.join(out, "missing_x.h5ad"), 0o644)
with h5py.File(os.path.join(out, "missing_x.h5ad"), "r+") as h:
    del h["X"]

nan = norman.copy()
nan.X = nan.X.toarray()
nan.X[3, 7] = np.nan
nan.layers = {}
nan.write_h5ad(os.path.join(out, "nan.h5ad"))
inf = nan.copy()
inf.X[3, 7] = np.inf
inf.write_h5ad(os.path.join(out, "inf.h5ad"))

neg = norman.copy()
neg.layers["counts"] = neg.layers["counts"].copy()
neg.layers["counts"][5, 2] = -3.0
neg.write_h5ad(os.path.join(out, "negative_counts.h5ad"))

dup = norman.copy()
names = list(dup.var_names)
names[9] = names[4]
dup.var_names = names
dup.write_h5ad(os.path.join(out, "duplicate_genes.h5ad"))

empty = norman[:0].copy()
empty.write_h5ad(os.path.join(out, "zero_cells.h5ad"))

with open(os.path.join(out, "unknown_genes.txt"), "w") as f:
    f.write("NOT_A_GENE_1\nNOT_A_GENE_2\n")
