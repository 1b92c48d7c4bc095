"""Python baseline for `cellfleet bench stream`: what a PyTorch-style Dataset.__getitem__ does per sample
with numpy for the same augmented, masked sample: a random permutation of the gene tokens, a Bernoulli mask,
and the gathered gene-id / input-bin / target arrays. Bins come from memory (no decompression, no I/O), which
favours the baseline.

usage: stream_baseline.py N_GENES N_BINS SECONDS
prints JSON {"samples": N, "seconds": S}
"""
import json
import sys
import time

import numpy as np

n_genes, n_bins, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rng = np.random.default_rng(0)
cells = rng.integers(0, n_bins, size=(1024, n_genes), dtype=np.uint8)
batch = 256
gene_ids = np.zeros((batch, n_genes + 1), dtype=np.uint16)
inputs = np.zeros((batch, n_genes + 1), dtype=np.uint8)
targets = np.zeros((batch, n_genes + 1), dtype=np.uint8)
samples = 0
started = time.perf_counter()
while time.perf_counter() - started < seconds:
    for i in range(batch):
        cell = cells[(samples + i) % len(cells)]
        order = rng.permutation(n_genes)
        masked = rng.random(n_genes) < 0.15
        bins = cell[order]
        gene_ids[i, 0] = 0
        gene_ids[i, 1:] = order + 1
        inputs[i, 0] = n_bins + 1
        inputs[i, 1:] = np.where(masked, n_bins, bins)
        targets[i, 0] = 255
        targets[i, 1:] = np.where(masked, bins, 255)
    samples += batch
print(json.dumps({"samples": samples, "seconds": time.perf_counter() - started}))
