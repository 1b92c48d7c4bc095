"""Opens a screen's cells.h5ad with anndata (as a scanpy user would) and compares it with cells.parquet:
every (perturbation, cell) row of the table must be one observation with the same shift values, and the
control group must hold every screened cell once. Prints JSON: the counts, the largest difference, the
obs columns, and the control group's X with its cells (corpus positions).

usage: read_anndata.py RESULTS_DIR
"""
import json
import os
import sys

import anndata
import numpy as np
import pandas as pd

out_dir = sys.argv[1]
adata = anndata.read_h5ad(os.path.join(out_dir, "cells.h5ad"))
cells = pd.read_parquet(os.path.join(out_dir, "cells.parquet"))
obs = adata.obs
assert adata.X.dtype == np.float32, adata.X.dtype
assert obs["perturbation"].dtype == "category", obs["perturbation"].dtype
control = obs["perturbation"] == "control"
perturbed = obs[~control]
assert len(perturbed) == len(cells), (len(perturbed), len(cells))
keyed = perturbed.reset_index().set_index(["perturbation", "cell"])
table = cells.set_index(["gene", "cell"])
assert keyed.index.is_unique and table.index.is_unique
keyed = keyed.loc[table.index]
largest = 0.0
compared = []
for column in cells.columns:
    if column in ("gene", "cell", "kind", "gene_id", "cell_name"):
        continue
    a = table[column].to_numpy(dtype=np.float64)
    b = keyed[column].to_numpy(dtype=np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), column
    both = ~np.isnan(a)
    largest = max(largest, float(np.max(np.abs(a[both] - b[both]), initial=0.0)))
    compared.append(column)
assert (keyed["cell_name"].astype(str).to_numpy() == table["cell_name"].astype(str).to_numpy()).all()
assert (keyed["kind"].astype(str).to_numpy() == table["kind"].astype(str).to_numpy()).all()
controls = obs[control]
assert controls["cell"].is_unique
assert np.all(np.isnan(controls["cosine_shift"].to_numpy()))
json.dump({
    "n_obs": int(adata.n_obs),
    "n_vars": int(adata.n_vars),
    "n_control": int(control.sum()),
    "records": int(len(cells)),
    "compared_columns": compared,
    "largest_difference": largest,
    "obs_columns": list(obs.columns),
    "var_names": [str(v) for v in adata.var_names[:5]],
    "uns": {k: str(v) for k, v in adata.uns.items()},
    "control_cells": [int(c) for c in controls["cell"]],
    "control_x": np.asarray(adata[control.to_numpy()].X).tolist(),
    "perturbed_x_finite": bool(np.isfinite(np.asarray(adata.X)).all()),
}, sys.stdout)
