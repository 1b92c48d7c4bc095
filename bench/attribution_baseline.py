"""Baseline for `cellfleet bench attribution`: the same gradient attribution written in plain PyTorch on
the same weights, cells and references.

The gradient is averaged over `steps` points of the straight path from the reference (1: at the input).

Per batch of `batch_rows` cells (full token layout: [CLS] = gene 0 with bin n_bins + 1, then every gene):
the total input embeddings X of the cells and B of their references; f(X, B) = grad_x z_c(X) * (X - B)
summed over the embedding dimension, and f(B, X) with the reference class's logit at B; the importance
(f(X, B) + f(B, X)) / 2 per gene, and z_c(X) - z_c(B). The model is bench/train_baseline.py's `CellModel`
loaded from the fine-tuned safetensors file, its classifier head (`classifier.weight`, `classifier.bias`)
applied to the final [CLS] state.

usage: attribution_baseline.py JOB_JSON

JOB_JSON (written by `cellfleet bench attribution`): model_dir, cells_file and references_file (uint8,
rows x genes), class, reference_class, steps, batch_rows, threads, importance_out (where the float32 importances
go). Prints one JSON line: {cells, seconds, cells_per_second}.
"""
import json
import pathlib
import sys
import time

import torch
from safetensors.torch import load_file

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from screen_baseline import load_baseline_model  # noqa: E402,F401


def main():
    job = json.loads(pathlib.Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job["threads"]))
    model_dir = pathlib.Path(job["model_dir"])
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_baseline", HERE / "train_baseline.py")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    config = json.loads((model_dir / "model.json").read_text())["config"]
    model = baseline.CellModel(config)
    weights = load_file(str(model_dir / "model.safetensors"))
    head_w, head_b = weights.pop("classifier.weight"), weights.pop("classifier.bias")
    model.load_state_dict(weights, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_genes, n_bins = config["n_genes"], config["n_bins"]
    read = lambda key: torch.frombuffer(bytearray(pathlib.Path(job[key]).read_bytes()), dtype=torch.uint8)
    cells = read("cells_file").view(-1, n_genes).long()
    references = read("references_file").view(-1, n_genes).long()
    c, rc = int(job["class"]), int(job["reference_class"])
    batch = int(job["batch_rows"])
    ids = torch.arange(n_genes + 1)
    positions = model.position_embedding[: n_genes + 1].unsqueeze(0)

    def embed(bins):
        tokens = torch.cat([torch.full((bins.shape[0], 1), n_bins + 1), bins], 1)
        return (torch.nn.functional.embedding(ids.expand(bins.shape[0], -1), model.gene_embedding)
                + torch.nn.functional.embedding(tokens, model.bin_embedding) + positions)

    def logit(x, k):
        for block in model.blocks:
            x, _ = block(x, None)
        cls = model.ln_final(x)[:, 0]
        return (cls @ head_w.T + head_b)[:, k]

    steps = int(job["steps"])

    def gradient_times_difference(x, r, k):
        # The gradient averaged over `steps` points r + j/steps (x - r), j = 1..steps (1: at x).
        difference = x - r
        grad_sum = torch.zeros_like(x)
        for j in range(steps, 0, -1):
            point = (r + difference * (j / steps)).detach().requires_grad_(True)
            value = logit(point, k)
            (grad,) = torch.autograd.grad(value.sum(), point)
            grad_sum += grad
        return (grad_sum / steps * difference).sum(-1), None

    out = []
    start = time.perf_counter()
    for i in range(0, cells.shape[0], batch):
        x, b = embed(cells[i:i + batch]), embed(references[i:i + batch])
        forward, _ = gradient_times_difference(x, b, c)
        backward, _ = gradient_times_difference(b, x, rc)
        with torch.no_grad():
            logit(b, c)
        out.append(((forward + backward) / 2)[:, 1:])
    seconds = time.perf_counter() - start
    pathlib.Path(job["importance_out"]).write_bytes(torch.cat(out).float().numpy().tobytes())
    print(json.dumps({"cells": cells.shape[0], "seconds": seconds, "cells_per_second": cells.shape[0] / seconds}))


if __name__ == "__main__":
    main()
