"""How well steered screens predict Kang's stimulated cells from control cells, on held-out genes.

usage: steer_eval.py REAL_BINS.h5ad FOLDS.json OUTDIR NAME=CELLS.h5ad [NAME=CELLS.h5ad ...]
         [--cell-eval PATH_TO_cell-eval]

NAME=CELLS.h5ad@PERTURBATION evaluates only that perturbation's predictions (e.g. a null set's).
REAL_BINS.h5ad: every cell of the corpus in bins (`cellfleet corpus export`), with `condition` and
`cell_type`. FOLDS.json: {"train": [...clamped genes...], "held": [...held-out up genes...]}. Each
CELLS.h5ad is a steered screen's `cells.h5ad` (control rows: the screened control cells as observed;
other rows: their predictions). Per cell type, the predicted change from control is the mean prediction
minus the mean of the screened control cells, and the real change the mean of the real stimulated cells
of that type minus the same control mean. Computed independently of cellfleet (numpy), on every gene but
the clamped ones ("held-out genes") and on the held-out up genes alone; the no-change baseline predicts
the control cells themselves. With --cell-eval, cell-eval runs on AnnData files in its layout (a
`perturbation` column, control label `control`, one perturbation `ifn`) restricted to the
held-out genes, split by cell type (`--celltype-col`), so each type is compared with its own control
cells, as above. Prints one JSON object.
"""
import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd

args = [a for a in sys.argv[1:]]
cell_eval = None
if "--cell-eval" in args:
    i = args.index("--cell-eval")
    cell_eval = args[i + 1]
    del args[i : i + 2]
real_path, folds_path, outdir = args[:3]
methods = dict(a.split("=", 1) for a in args[3:])
folds = json.load(open(folds_path))
real = anndata.read_h5ad(real_path)
genes = np.asarray(real.var_names, dtype=str)
train = set(folds["train"])
held_all = np.array([g not in train for g in genes])
held_up = np.isin(genes, folds["held"])
x_real = np.asarray(real.X, dtype=np.float64)
cond = np.asarray(real.obs["condition"], dtype=str)
ctype = np.asarray(real.obs["cell_type"], dtype=str)


def pearson(a, b):
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


report = {"held_out_genes": int(held_all.sum()), "held_out_up_genes": int(held_up.sum()), "methods": {}}
control_rows = None
for name, path in methods.items():
    path, _, only = path.partition("@")
    pred = anndata.read_h5ad(path)
    assert list(pred.var_names) == list(genes), f"{path}: genes differ from {real_path}"
    pert = np.asarray(pred.obs["perturbation"], dtype=str)
    if only:
        assert only in set(pert), f"{path}: no perturbation {only!r} (has {sorted(set(pert))})"
        pred = pred[(pert == "control") | (pert == only)]
        pert = np.asarray(pred.obs["perturbation"], dtype=str)
    is_control = pert == "control"
    types = np.asarray(pred.obs["cell_type"], dtype=str)
    x_pred = np.asarray(pred.X, dtype=np.float64)
    converged = (
        np.asarray(pred.obs["converged"], dtype=str) if "converged" in pred.obs else np.full(len(pert), "true")
    )
    rows = {"pearson_all": [], "mse_all": [], "pearson_up": [], "mse_up": [], "types": []}
    baseline = {"pearson_all": [], "mse_all": [], "pearson_up": [], "mse_up": []}
    for t in sorted(set(types[is_control])):
        ctrl = x_pred[is_control & (types == t)].mean(0)
        stim = x_real[(cond == "stimulated") & (ctype == t)]
        if len(stim) == 0:
            continue
        real_delta = stim.mean(0) - ctrl
        predicted = x_pred[~is_control & (types == t)]
        if len(predicted) == 0:
            continue
        pred_delta = predicted.mean(0) - ctrl
        rows["types"].append(t)
        for key, mask in (("all", held_all), ("up", held_up)):
            rows[f"pearson_{key}"].append(pearson(pred_delta[mask], real_delta[mask]))
            rows[f"mse_{key}"].append(float(np.mean((pred_delta[mask] - real_delta[mask]) ** 2)))
            baseline[f"pearson_{key}"].append(0.0)
            baseline[f"mse_{key}"].append(float(np.mean(real_delta[mask] ** 2)))
    summary = {k: float(np.mean(v)) for k, v in rows.items() if k != "types"}
    summary["cell_types"] = rows["types"]
    summary["per_type_pearson_all"] = rows["pearson_all"]
    summary["converged_fraction"] = float(np.mean(converged[~is_control] == "true"))
    summary["predicted_cells"] = int((~is_control).sum())
    report["methods"][name] = summary
    report["methods"]["no_change"] = {k: float(np.mean(v)) for k, v in baseline.items()}

    if cell_eval:
        # cell-eval's layout: a perturbation column (one perturbation, "ifn") with the control label
        # "control", and a cell-type column, so that cell-eval compares each type with its own controls.
        keep = held_all
        types_pred = np.concatenate([types[is_control], types[~is_control]])
        pred_x = np.vstack([x_pred[is_control][:, keep], x_pred[~is_control][:, keep]])
        pred_obs = pd.DataFrame({
            "perturbation": ["control"] * int(is_control.sum()) + ["ifn"] * int((~is_control).sum()),
            "cell_type": types_pred,
        })
        real_mask = (cond == "stimulated") & np.isin(ctype, list(set(types[~is_control])))
        real_x = np.vstack([x_pred[is_control][:, keep], x_real[real_mask][:, keep]])
        real_obs = pd.DataFrame({
            "perturbation": ["control"] * int(is_control.sum()) + ["ifn"] * int(real_mask.sum()),
            "cell_type": np.concatenate([types[is_control], ctype[real_mask]]),
        })
        var = pd.DataFrame(index=genes[keep])
        d = os.path.join(outdir, name)
        os.makedirs(d, exist_ok=True)
        for which, x, obs in (("pred", pred_x, pred_obs), ("real", real_x, real_obs)):
            obs.index = [f"{which}{i}" for i in range(len(obs))]
            anndata.AnnData(X=x.astype(np.float32), obs=obs, var=var).write_h5ad(os.path.join(d, f"{which}.h5ad"))
        run = subprocess.run(
            [cell_eval, "run", "-ap", os.path.join(d, "pred.h5ad"), "-ar", os.path.join(d, "real.h5ad"),
             "--pert-col", "perturbation", "--control-pert", "control", "--celltype-col", "cell_type",
             "--allow-discrete", "--profile", "full", "-o", os.path.join(d, "cell-eval")],
            capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"cell-eval failed on {name}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        # One results.csv per cell type (its own controls): the mean of each metric over the types.
        per_type = []
        for root, _, files in os.walk(os.path.join(d, "cell-eval")):
            for f in files:
                if f.endswith("results.csv") and not f.endswith("agg_results.csv"):
                    per_type.append(pd.read_csv(os.path.join(root, f)))
        if not per_type:
            sys.exit(f"cell-eval wrote no results.csv under {d}/cell-eval")
        frame = pd.concat(per_type)
        metrics = {}
        for column in frame.columns:
            values = pd.to_numeric(frame[column], errors="coerce")
            if values.notna().any():
                metrics[column] = float(values.mean())
        metrics["cell_types_evaluated"] = len(per_type)
        summary["cell_eval"] = metrics
print(json.dumps(report))
