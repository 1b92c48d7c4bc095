"""Baseline for `cellfleet bench train`: the same MoE transformer and training step in plain eager PyTorch.

Mirrors worker/src/model/mod.rs and worker/src/train/training_loop.rs operation for operation (embeddings, pre-LayerNorm
blocks with separate q/k/v/out projections and scaled_dot_product_attention, noisy top-k experts grouped by
expert, masked-bin cross-entropy on masked rows only, load-balancing loss, gradient clipping, AdamW) so
that the ratio measures the framework around the kernels, not a different model.

Usage: train_baseline.py CONFIG_JSON   (printed by `cellfleet bench train`; prints one JSON line)
"""
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.02)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Experts(nn.Module):
    def __init__(self, d, experts, hidden, top_k, noisy):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, d) * 0.02)
        self.noise = nn.Parameter(torch.zeros(experts, d)) if noisy else None
        self.w1 = nn.Parameter(torch.randn(experts, d, hidden) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.randn(experts, hidden, d) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(experts, d))
        self.experts, self.top_k = experts, top_k

    def forward(self, x):
        n, d = x.shape
        logits = F.linear(x, self.router)
        routed = logits
        if self.noise is not None and self.training:
            routed = logits + torch.randn_like(logits) * F.softplus(F.linear(x, self.noise))
        top_logits, top_experts = routed.topk(self.top_k, dim=-1)
        gates = top_logits.softmax(-1)
        flat = top_experts.flatten()
        counts = torch.bincount(flat, minlength=self.experts)
        fraction = counts.float() / (n * self.top_k)
        aux = (fraction * logits.softmax(-1).mean(0)).sum() * self.experts
        order = flat.argsort()
        rows = torch.div(order, self.top_k, rounding_mode="floor")
        inputs = x.index_select(0, rows)
        outputs = []
        for e, chunk in enumerate(inputs.split(counts.tolist(), 0)):
            if chunk.shape[0] == 0:
                outputs.append(chunk)
                continue
            h = F.gelu(chunk @ self.w1[e] + self.b1[e])
            outputs.append(h @ self.w2[e] + self.b2[e])
        mixed = torch.cat(outputs, 0) * gates.flatten().index_select(0, order).unsqueeze(1)
        return torch.zeros(n, d, device=x.device, dtype=mixed.dtype).index_add(0, rows, mixed), aux


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (Linear(d, d) for _ in range(4))

    def forward(self, h, mask):
        b, l, d = h.shape
        split = lambda t: t.view(b, l, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                           attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, l, d))


class Dense(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.up, self.down = Linear(d, hidden), Linear(hidden, d)

    def forward(self, h):
        return self.down(F.gelu(self.up(h)))


class Block(nn.Module):
    """Parameter names match cellfleet's weight files (blocks.N.attn.q.weight, blocks.N.moe.w1, ...)."""

    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.ln_attn = nn.LayerNorm(d)
        self.attn = Attention(d, c["n_heads"])
        self.ln_ffn = nn.LayerNorm(d)
        ffn = c["ffn"]
        if ffn["kind"] == "moe":
            self.moe = Experts(d, ffn["experts"], ffn["hidden"], ffn["top_k"], ffn["noisy_gating"])
        else:
            self.ffn = Dense(d, ffn["hidden"])

    def forward(self, x, mask):
        b, l, d = x.shape
        x = x + self.attn(self.ln_attn(x), mask)
        h = self.ln_ffn(x)
        if not hasattr(self, "moe"):
            return x + self.ffn(h), torch.zeros((), device=x.device)
        out, aux = self.moe(h.view(b * l, d))
        return x + out.view(b, l, d), aux


class CellModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.gene_embedding = nn.Parameter(torch.randn(c["n_genes"] + 1, d) * 0.02)
        self.bin_embedding = nn.Parameter(torch.randn(c["n_bins"] + 2, d) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(c["max_seq_len"], d) * 0.02)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
        self.ln_final = nn.LayerNorm(d)
        self.bin_head = Linear(d, c["n_bins"])

    def forward(self, genes, bins, valid=None):
        l = genes.shape[1]
        x = (F.embedding(genes, self.gene_embedding) + F.embedding(bins, self.bin_embedding)
             + self.position_embedding[:l].unsqueeze(0))
        # Padding keys are never attended to: SDPA's boolean mask, [batch, 1, 1, keys].
        mask = None if valid is None else valid[:, None, None, :]
        aux = torch.zeros((), device=x.device)
        for block in self.blocks:
            x, a = block(x, mask)
            aux = aux + a
        return self.ln_final(x), aux


def main():
    spec = json.load(open(sys.argv[1]))
    c, torch_threads = spec["model"], spec["threads"]
    torch.set_num_threads(torch_threads)
    torch.manual_seed(spec["seed"])
    device = torch.device(spec.get("device", "cpu"))
    model = CellModel(c).to(device)
    params = sum(p.numel() for p in model.parameters())
    # The decay rule of worker/src/train/optim.rs: matrices decay; biases, LayerNorm and embeddings do not.
    def decays(name, p):
        bias = name.endswith("bias") or name.endswith(".b1") or name.endswith(".b2")
        return p.dim() >= 2 and not bias and "embedding" not in name
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": 0.01},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    batches = []
    if spec.get("batches"):
        # The loader's batches, written by `cellfleet bench train`: the same tokens cellfleet trains on.
        for batch in json.load(open(spec["batches"]))["batches"]:
            shape = (batch["samples"], batch["seq_len"])
            tensor = lambda key: torch.tensor(batch[key], dtype=torch.int64).view(shape).to(device)
            lengths = torch.tensor(batch["lengths"], dtype=torch.int64, device=device)
            valid = torch.arange(shape[1], device=device)[None, :] < lengths[:, None]
            targets = tensor("target_bins")
            batches.append((tensor("gene_ids"), tensor("input_bins"), targets, targets != 255,
                            None if bool(valid.all()) else valid, shape[0], int(lengths.sum())))
    else:
        b, l = spec["batch_size"], c["n_genes"] + 1
        g = torch.Generator().manual_seed(spec["seed"])
        genes = torch.arange(l).repeat(b, 1)
        bins = torch.randint(0, c["n_bins"], (b, l), generator=g)
        masked = torch.rand(b, l, generator=g) < spec["mask_ratio"]
        masked[:, 0] = False
        inputs = bins.masked_fill(masked, c["n_bins"])
        inputs[:, 0] = c["n_bins"] + 1
        batches.append((genes.to(device), inputs.to(device), bins.to(device), masked.to(device), None,
                        b, b * l))
    # On CUDA, matrix products in bf16 as cellfleet does (its casts are explicit; autocast here).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, cells, tokens = [], 0, 0
    for step in range(spec["warmup_steps"] + spec["steps"]):
        genes, inputs, targets, masked, valid, samples, real = batches[step % len(batches)]
        t0 = time.perf_counter()
        with autocast:
            hidden, aux = model(genes, inputs, valid)
            logits = model.bin_head(hidden[masked]).float()
        loss = F.cross_entropy(logits, targets[masked]) + 0.01 * aux.float()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        if step >= spec["warmup_steps"]:
            times.append(time.perf_counter() - t0)
            cells += samples
            tokens += real
    total = sum(times)
    print(json.dumps({"parameters": params, "step_seconds": total / len(times),
                      "cells_per_s": cells / total, "tokens_per_s": tokens / total,
                      "final_loss": float(loss)}))


if __name__ == "__main__":
    main()
