"""The N genes with the highest mean expression over all cells of an h5ad (condition-agnostic, so a
vocabulary chosen this way knows nothing of any differential expression), one per line.

usage: scripts/top_expressed.py FILE.h5ad N
"""
import sys

import anndata
import numpy as np

adata = anndata.read_h5ad(sys.argv[1])
mean = np.asarray(adata.X.mean(axis=0)).ravel()
order = np.argsort(-mean, kind="stable")[: int(sys.argv[2])]
print("\n".join(str(g) for g in np.asarray(adata.var_names)[order]))
