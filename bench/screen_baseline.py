"""Baseline for `cellfleet bench screen`: an in-silico knockout screen the way Geneformer's
InSilicoPerturber runs one, in plain eager PyTorch on the same weights, cells, genes and batch size.

For each cell: one forward pass of the unperturbed cell, then the knockouts of the cell's expressed screen
genes (bin > 0), `batch` perturbed copies of the cell per forward pass; each embedding is the mean of the
final hidden states over the gene tokens (the `[CLS]` token left out) and is compared with the original by
cosine similarity, and nothing else is computed. The model is bench/train_baseline.py's `CellModel`
loaded strictly from the exported cellfleet safetensors file. The token layout is cellfleet's screen
layout: `[CLS]` (gene 0, bin n_bins + 1) then every vocabulary gene in vocabulary order (gene id =
position + 1); a knockout sets the gene's bin to 0 and keeps its token. For a model of the expressed
layout (job "layout": "expressed") a cell's sequence is the genes of job "sequences" (its expressed genes
and its drawn unexpressed ones, ascending), and a knockout removes the gene's token, as Geneformer does.

usage: screen_baseline.py JOB_JSON [--max-seconds S] [--shard I/N]

With --shard I/N this process screens only the cells at rows I, I + N, I + 2N, ... (N such processes
together screen every cell once, the way one would parallelise the loop over processes).

JOB_JSON (written by `cellfleet bench screen`): model_dir (model.safetensors + model.json), cells_file
(uint8 bins, n_cells x n_genes, row-major, in the order of cell_ids), cell_ids, work_genes (vocabulary
positions), batch, threads, max_seconds, keep (how many (gene, cell, cosine) results to record) and
sample_out (where to write them, with the cells finished and the first cell's original embedding). Prints one JSON line: {pairs, seconds, pairs_per_second, forwards,
cells_started, cells_done, stopped_by_time}.
"""
import argparse
import importlib.util
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = pathlib.Path(__file__).resolve().parent


def load_baseline_model(model_dir):
    spec = importlib.util.spec_from_file_location("train_baseline", HERE / "train_baseline.py")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    config = json.loads((model_dir / "model.json").read_text())["config"]
    model = baseline.CellModel(config)
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    model.eval()
    return model, config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=pathlib.Path)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop after this many seconds of screening (default: the job's max_seconds)")
    parser.add_argument("--shard", default="0/1", help="I/N: screen rows I, I + N, ... only")
    args = parser.parse_args()
    shard, shards = (int(v) for v in args.shard.split("/"))
    if not 0 <= shard < shards:
        sys.exit(f"--shard {args.shard}: expected I/N with 0 <= I < N")
    job = json.loads(args.job.read_text())
    max_seconds = args.max_seconds if args.max_seconds is not None else job.get("max_seconds")
    torch.set_num_threads(int(job["threads"]))

    model, config = load_baseline_model(pathlib.Path(job["model_dir"]))
    n_genes, n_bins = config["n_genes"], config["n_bins"]
    cell_ids = job["cell_ids"]
    raw = pathlib.Path(job["cells_file"]).read_bytes()
    if len(raw) != len(cell_ids) * n_genes:
        sys.exit(f"{job['cells_file']}: {len(raw)} bytes, expected {len(cell_ids)} cells x {n_genes} genes")
    bins = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(len(cell_ids), n_genes).long()
    work = torch.tensor(job["work_genes"], dtype=torch.long)
    batch, keep = int(job["batch"]), int(job.get("keep", 0))
    ids = torch.arange(n_genes + 1)
    cls = torch.tensor([n_bins + 1])

    def gene_states(token_bins, token_ids=None):
        token_ids = ids if token_ids is None else token_ids
        hidden, _ = model(token_ids.expand(token_bins.shape[0], -1), token_bins)
        return hidden[:, 1:]

    expressed_layout = job.get("layout", "full") == "expressed"
    sequences = job.get("sequences")

    pairs = forwards = cells_started = 0
    sample, cells_done, first = [], [], None
    stopped = False
    start = time.perf_counter()
    with torch.no_grad():
        for row in range(shard, len(cell_ids), shards):
            cell = cell_ids[row]
            genes = work[bins[row, work] > 0]
            if genes.numel() == 0:
                cells_done.append([cell, 0])
                continue
            cells_started += 1
            if expressed_layout:
                sequence = torch.tensor(sequences[row], dtype=torch.long)
                token_ids = torch.cat([torch.tensor([0]), sequence + 1])
                original = torch.cat([cls, bins[row, sequence]])
                position = {g: i for i, g in enumerate(sequences[row])}
            else:
                token_ids, original = ids, torch.cat([cls, bins[row]])
            reference_states = gene_states(original.unsqueeze(0), token_ids)[0]
            reference_sum = reference_states.sum(0)
            n = reference_states.shape[0]
            forwards += 1
            if first is None:
                first = {"cell": cell, "embedding": (reference_sum / n).tolist()}
            for chunk in genes.split(batch):
                # The knocked-out gene's own state is left out of both means, as cellfleet does.
                if expressed_layout:
                    # Each perturbed copy drops one gene token (position at + 1 after [CLS]).
                    at = torch.tensor([position[g] for g in chunk.tolist()])
                    index = torch.stack([torch.cat([torch.arange(0, p + 1), torch.arange(p + 2, n + 1)])
                                         for p in at.tolist()])
                    hidden, _ = model(token_ids[index], original[index])
                    embedding = hidden[:, 1:].sum(1) / (n - 1)
                else:
                    at = chunk
                    perturbed = original.repeat(chunk.numel(), 1)
                    rows = torch.arange(chunk.numel())
                    perturbed[rows, chunk + 1] = 0
                    states = gene_states(perturbed)
                    embedding = (states.sum(1) - states[rows, chunk]) / (n - 1)
                reference = (reference_sum - reference_states[at]) / (n - 1)
                cosine = F.cosine_similarity(embedding, reference, dim=1)
                pairs += chunk.numel()
                forwards += chunk.numel()
                if len(sample) < keep:
                    for g, c in zip(chunk.tolist(), cosine.tolist()):
                        sample.append([g, cell, c])
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    stopped = True
                    break
            if stopped:
                break
            cells_done.append([cell, genes.numel()])
    seconds = time.perf_counter() - start

    if job.get("sample_out") and shards == 1:
        pathlib.Path(job["sample_out"]).write_text(
            json.dumps({"sample": sample[:keep], "cells_done": cells_done, "first": first}))
    print(json.dumps({
        "pairs": pairs,
        "seconds": seconds,
        "pairs_per_second": pairs / seconds if seconds > 0 else 0.0,
        "forwards": forwards,
        "cells_started": cells_started,
        "cells_done": len(cells_done),
        "stopped_by_time": stopped,
    }))


if __name__ == "__main__":
    main()
