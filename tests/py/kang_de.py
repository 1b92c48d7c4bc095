"""Genes differentially expressed between two groups of cells, computed from the h5ad itself
(independently of cellfleet): Welch's t statistic on the stored log1p-normalized values.

usage: kang_de.py FILE.h5ad COLUMN UP_VALUE OTHER_VALUE N [--genes FILE]
prints a JSON list of the N genes most up in UP_VALUE cells (restricted to --genes, one name per line).
"""
import json
import sys

import anndata
import numpy as np
import scipy.sparse as sp

path, column, up, other, n = sys.argv[1:6]
adata = anndata.read_h5ad(path)
names = np.asarray(adata.var_names, dtype=str)
keep = np.ones(len(names), dtype=bool)
if "--genes" in sys.argv:
    wanted = set(open(sys.argv[sys.argv.index("--genes") + 1]).read().split())
    keep = np.isin(names, list(wanted))
labels = np.asarray(adata.obs[column], dtype=str)
x = adata.X
x = x.toarray() if sp.issparse(x) else np.asarray(x)
a, b = x[labels == up], x[labels == other]
if len(a) == 0 or len(b) == 0:
    sys.exit(f"no cells with {column} = {up!r} or {other!r}")
mean_a, mean_b = a.mean(0), b.mean(0)
var_a, var_b = a.var(0, ddof=1), b.var(0, ddof=1)
t = (mean_a - mean_b) / np.sqrt(var_a / len(a) + var_b / len(b) + 1e-12)
t[~keep] = -np.inf
order = np.argsort(-t, kind="stable")[: int(n)]
json.dump([str(names[i]) for i in order], sys.stdout)
