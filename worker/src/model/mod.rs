//! The CellxPert-style transformer on libtorch: gene-id + bin + position embeddings, pre-LayerNorm blocks
//! with exact scaled-dot-product attention, sparse mixture-of-experts (noisy top-k) or dense feed-forward
//! layers, a masked-bin head, an optional `[CLS]` classifier and LoRA adapters on the attention
//! projections. The routing and loss rules are written out in `docs/model.md`.
//!
//! Parameters live in one `nn::VarStore` under stable dotted names (`blocks.0.attn.q.weight`), which are
//! also the tensor names of the safetensors weight files, so a PyTorch user can load them by name.

use std::collections::BTreeMap;
use std::path::Path;

use cellfleet_shared::stream::batch::SequenceLayout;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

/// Errors of the model layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Weights { path: String, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// The feed-forward layer of every block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FfnConfig {
    /// One GELU MLP (the ablation baseline).
    Dense { hidden: usize },
    /// Sparse mixture of `experts` GELU MLPs; each token goes to its `top_k` experts.
    Moe {
        experts: usize,
        hidden: usize,
        top_k: usize,
        /// Learned Gaussian noise on the router logits while training (Shazeer et al. 2017).
        noisy_gating: bool,
    },
}

/// LoRA adapters on the q, k, v and output projections of every attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f64,
}

/// Shape of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary genes; the gene-id table has one more row for `[CLS]`.
    pub n_genes: usize,
    /// Expression bins predicted by the masked-bin head; the bin table adds the mask and `[CLS]` bins.
    pub n_bins: usize,
    /// Rows of the learned position table (at least `n_genes + 1`).
    pub max_seq_len: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub ffn: FfnConfig,
    /// Classes of the `[CLS]` classifier; 0 = no classifier.
    #[serde(default)]
    pub n_classes: usize,
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Which gene tokens a cell's sequence holds (models from before layouts read the full layout).
    #[serde(default)]
    pub layout: SequenceLayout,
}

/// Named architecture sizes; `n_genes`, `n_bins` and `max_seq_len` come from the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// 2 layers, d=64, 4 experts: tests and smoke runs.
    Tiny,
    /// 4 layers, d=128, 4 experts.
    Small,
    /// About 25M parameters at 4,096 genes: 4 layers, d=512, 8 heads, 4 experts of 1,024.
    Cellxpert,
}

impl Preset {
    pub fn config(self, n_genes: usize, n_bins: usize) -> ModelConfig {
        let (d_model, n_layers, n_heads, experts, hidden) = match self {
            Preset::Tiny => (64, 2, 4, 4, 128),
            Preset::Small => (128, 4, 4, 4, 256),
            Preset::Cellxpert => (512, 4, 8, 4, 1024),
        };
        ModelConfig {
            n_genes,
            n_bins,
            max_seq_len: n_genes + 1,
            d_model,
            n_layers,
            n_heads,
            ffn: FfnConfig::Moe {
                experts,
                hidden,
                top_k: 2,
                noisy_gating: true,
            },
            n_classes: 0,
            lora: None,
            layout: SequenceLayout::Full,
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        if self.n_genes == 0 || self.n_bins < 2 {
            return fail(format!(
                "n_genes must be positive and n_bins at least 2, got {} and {}",
                self.n_genes, self.n_bins
            ));
        }
        if self.max_seq_len < self.n_genes + 1 {
            return fail(format!(
                "max_seq_len {} is shorter than [CLS] + {} genes",
                self.max_seq_len, self.n_genes
            ));
        }
        if self.n_heads == 0 || self.d_model == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return fail(format!(
                "d_model {} must be a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if self.n_layers == 0 {
            return fail("n_layers must be at least 1".into());
        }
        match self.ffn {
            FfnConfig::Dense { hidden: 0 } => fail("ffn.hidden must be positive".into()),
            FfnConfig::Moe {
                experts,
                hidden,
                top_k,
                ..
            } if experts < 2 || hidden == 0 || top_k == 0 || top_k > experts => fail(format!(
                "moe needs at least 2 experts, 1 <= top_k <= experts and hidden > 0 (got experts={experts}, top_k={top_k}, hidden={hidden})"
            )),
            _ => match self.lora {
                Some(l) if l.rank == 0 => fail("lora.rank must be at least 1".into()),
                _ => Ok(()),
            },
        }
    }

    /// Model FLOPs of one forward over a sequence of `len` real tokens (a multiply-add counts 2): per
    /// layer the four `d x d` projections (8 d^2 per token), the attention scores and their use of the
    /// values (4 L^2 d), and the feed-forward (4 d h per expert a token visits, plus the router's 2 d E),
    /// and the bin head (2 d bins per token). Padding is not counted: this is useful work, what MFU is
    /// measured in.
    pub fn forward_flops(&self, len: usize) -> f64 {
        let (d, l) = (self.d_model as f64, len as f64);
        let ffn = match self.ffn {
            FfnConfig::Dense { hidden } => 4.0 * d * hidden as f64,
            FfnConfig::Moe {
                experts,
                hidden,
                top_k,
                ..
            } => top_k as f64 * 4.0 * d * hidden as f64 + 2.0 * d * experts as f64,
        };
        self.n_layers as f64 * (l * (8.0 * d * d + ffn) + 4.0 * l * l * d)
            + 2.0 * l * d * self.n_bins as f64
    }

    /// Forward and backward: three forwards' FLOPs.
    pub fn training_flops(&self, len: usize) -> f64 {
        3.0 * self.forward_flops(len)
    }

    pub fn experts(&self) -> usize {
        match self.ffn {
            FfnConfig::Dense { .. } => 0,
            FfnConfig::Moe { experts, .. } => experts,
        }
    }

    /// Input bin of masked positions (the row after the expression bins).
    pub fn mask_bin(&self) -> i64 {
        self.n_bins as i64
    }
}

/// Forward-pass settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Router noise on; the caller also decides whether gradients are recorded.
    pub train: bool,
    /// bf16 matrix products with f32 master weights, LayerNorm and losses (what CUDA autocast does for
    /// these ops; tch's autocast switch cannot select bf16).
    pub bf16: bool,
}

impl Mode {
    /// Inference in f32 with router noise off.
    pub const EVAL: Mode = Mode {
        train: false,
        bf16: false,
    };
}

/// How a cell embedding is pooled from the final hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    Cls,
    Mean,
}

/// Token inputs on the model's device: `[batch, seq]` int64 gene ids and input bins, and an optional
/// `[batch, seq]` bool mask that is true at real (non-padding) tokens.
pub struct Tokens {
    pub gene_ids: Tensor,
    pub bins: Tensor,
    pub valid: Option<Tensor>,
}

/// What a forward pass returns besides the hidden states.
pub struct Forward {
    /// `[batch, seq, d_model]` after the final LayerNorm (f32).
    pub hidden: Tensor,
    /// Load-balancing loss summed over MoE layers (0 for dense).
    pub aux_loss: Tensor,
    /// Per MoE layer, `[experts]` counts of token slots routed to each expert.
    pub expert_load: Vec<Tensor>,
    /// Per MoE layer, `[experts]` mean router probability over this batch's tokens (with grad): with the
    /// loads, what a data-parallel step needs to build the balance loss from the global routing fractions.
    pub router_probs: Vec<Tensor>,
}

fn cast(x: &Tensor, bf16: bool) -> Tensor {
    if bf16 {
        x.to_kind(Kind::BFloat16)
    } else {
        x.shallow_clone()
    }
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
    /// `(A [rank, in], B [out, rank], scale)`.
    lora: Option<(Tensor, Tensor, f64)>,
}

impl Linear {
    fn new(p: &nn::Path, d_in: usize, d_out: usize, lora: Option<LoraConfig>) -> Self {
        let (i, o) = (d_in as i64, d_out as i64);
        let weight = p.var(
            "weight",
            &[o, i],
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let bias = p.var("bias", &[o], Init::Const(0.0));
        let lora = lora.map(|l| {
            let r = l.rank as i64;
            let a = p.var(
                "lora_a",
                &[r, i],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / (d_in as f64).sqrt(),
                },
            );
            // B starts at zero so that an adapted model starts equal to its base.
            let b = p.var("lora_b", &[o, r], Init::Const(0.0));
            (a, b, l.alpha / l.rank as f64)
        });
        Self { weight, bias, lora }
    }

    fn forward(&self, x: &Tensor, bf16: bool) -> Tensor {
        let xc = cast(x, bf16);
        let mut y = xc.linear(&cast(&self.weight, bf16), Some(cast(&self.bias, bf16)));
        if let Some((a, b, scale)) = &self.lora {
            y += xc
                .linear::<Tensor>(&cast(a, bf16), None)
                .linear::<Tensor>(&cast(b, bf16), None)
                * *scale;
        }
        y
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    fn new(p: &nn::Path, dim: usize) -> Self {
        Self {
            weight: p.var("weight", &[dim as i64], Init::Const(1.0)),
            bias: p.var("bias", &[dim as i64], Init::Const(0.0)),
            dim: dim as i64,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float).layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            1e-5,
            true,
        )
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: i64,
}

impl Attention {
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, bf16: bool) -> Tensor {
        let (b, l, d) = x.size3().expect("[batch, seq, d_model]");
        let split = |t: Tensor| t.view([b, l, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(self.q.forward(x, bf16));
        let k = split(self.k.forward(x, bf16));
        let v = split(self.v.forward(x, bf16));
        let attended =
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        self.out
            .forward(&attended.transpose(1, 2).reshape([b, l, d]), bf16)
    }
}

struct Experts {
    router: Tensor,
    noise: Option<Tensor>,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    experts: i64,
    top_k: i64,
}

enum FeedForward {
    Dense { up: Linear, down: Linear },
    Moe(Experts),
}

impl Experts {
    fn new(
        p: &nn::Path,
        d: usize,
        experts: usize,
        hidden: usize,
        top_k: usize,
        noisy: bool,
    ) -> Self {
        let (d, e, h) = (d as i64, experts as i64, hidden as i64);
        let small = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Self {
            router: p.var("router", &[e, d], small),
            // Zero noise weights start the noise scale at softplus(0) = ln 2 for every token.
            noise: noisy.then(|| p.var("noise", &[e, d], Init::Const(0.0))),
            w1: p.var("w1", &[e, d, h], small),
            b1: p.var("b1", &[e, h], Init::Const(0.0)),
            w2: p.var("w2", &[e, h, d], small),
            b2: p.var("b2", &[e, d], Init::Const(0.0)),
            experts: e,
            top_k: top_k as i64,
        }
    }

    /// Routes the `[tokens, d]` rows of `x`; returns the mixed expert outputs, the Switch-style
    /// load-balancing loss `E * sum_e f_e * P_e` and the per-expert slot counts.
    fn forward(&self, x: &Tensor, mode: Mode) -> (Tensor, Tensor, Tensor, Tensor) {
        let (n, d) = x.size2().expect("[tokens, d_model]");
        let logits = x.linear::<Tensor>(&self.router, None);
        let routed = match (&self.noise, mode.train) {
            (Some(noise), true) => {
                let scale = x.linear::<Tensor>(noise, None).softplus();
                &logits + logits.randn_like() * scale
            }
            _ => logits.shallow_clone(),
        };
        let (top_logits, top_experts) = routed.topk(self.top_k, -1, true, true);
        let gates = top_logits.softmax(-1, Kind::Float);
        let flat_experts = top_experts.flatten(0, -1);
        let counts = flat_experts.bincount::<Tensor>(None, self.experts);
        let fraction = counts.to_kind(Kind::Float) / (n * self.top_k) as f64;
        let mean_prob = logits
            .softmax(-1, Kind::Float)
            .mean_dim(0, false, Kind::Float);
        let aux = (fraction * &mean_prob).sum(Kind::Float) * self.experts as f64;

        // Group the (token, slot) pairs by expert so each expert runs one dense matmul over its rows.
        let order = flat_experts.argsort(0, false);
        let rows = order.divide_scalar_mode(self.top_k, "floor");
        let sizes: Vec<i64> = Vec::<i64>::try_from(&counts).expect("int64 counts");
        let inputs = cast(&x.index_select(0, &rows), mode.bf16);
        let mut outputs = Vec::with_capacity(sizes.len());
        for (e, chunk) in inputs.split_with_sizes(&sizes, 0).iter().enumerate() {
            let e = e as i64;
            if sizes[e as usize] == 0 {
                outputs.push(chunk.shallow_clone());
                continue;
            }
            let hidden = chunk
                .matmul(&cast(&self.w1.get(e), mode.bf16))
                .f_add(&cast(&self.b1.get(e), mode.bf16))
                .expect("bias shape")
                .gelu("none");
            outputs.push(
                hidden.matmul(&cast(&self.w2.get(e), mode.bf16)) + cast(&self.b2.get(e), mode.bf16),
            );
        }
        let weights = gates.flatten(0, -1).index_select(0, &order).unsqueeze(1);
        let mixed = Tensor::cat(&outputs, 0).to_kind(Kind::Float) * weights;
        let out = Tensor::zeros([n, d], (Kind::Float, x.device())).index_add(0, &rows, &mixed);
        (out, aux, counts, mean_prob)
    }
}

struct Block {
    ln_attn: LayerNorm,
    attn: Attention,
    ln_ffn: LayerNorm,
    ffn: FeedForward,
}

/// The network and its parameters.
pub struct CellModel {
    pub config: ModelConfig,
    pub vs: nn::VarStore,
    gene_embedding: Tensor,
    bin_embedding: Tensor,
    position_embedding: Tensor,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    bin_head: Linear,
    classifier: Option<Linear>,
}

impl CellModel {
    /// A freshly initialised model on `device` (initialisation draws from libtorch's generator: call
    /// `tch::manual_seed` first for a reproducible model).
    pub fn new(config: ModelConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let d = config.d_model;
        let emb = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let gene_embedding = root.var(
            "gene_embedding",
            &[config.n_genes as i64 + 1, d as i64],
            emb,
        );
        let bin_embedding = root.var("bin_embedding", &[config.n_bins as i64 + 2, d as i64], emb);
        let position_embedding = root.var(
            "position_embedding",
            &[config.max_seq_len as i64, d as i64],
            emb,
        );
        let blocks = (0..config.n_layers)
            .map(|i| {
                let p = root.sub("blocks").sub(i.to_string());
                let a = p.sub("attn");
                let linear = |name: &str| Linear::new(&a.sub(name), d, d, config.lora);
                let ffn = match config.ffn {
                    FfnConfig::Dense { hidden } => FeedForward::Dense {
                        up: Linear::new(&p.sub("ffn").sub("up"), d, hidden, None),
                        down: Linear::new(&p.sub("ffn").sub("down"), hidden, d, None),
                    },
                    FfnConfig::Moe {
                        experts,
                        hidden,
                        top_k,
                        noisy_gating,
                    } => FeedForward::Moe(Experts::new(
                        &p.sub("moe"),
                        d,
                        experts,
                        hidden,
                        top_k,
                        noisy_gating,
                    )),
                };
                Block {
                    ln_attn: LayerNorm::new(&p.sub("ln_attn"), d),
                    attn: Attention {
                        q: linear("q"),
                        k: linear("k"),
                        v: linear("v"),
                        out: linear("out"),
                        heads: config.n_heads as i64,
                    },
                    ln_ffn: LayerNorm::new(&p.sub("ln_ffn"), d),
                    ffn,
                }
            })
            .collect();
        let ln_final = LayerNorm::new(&root.sub("ln_final"), d);
        let bin_head = Linear::new(&root.sub("bin_head"), d, config.n_bins, None);
        let classifier = (config.n_classes > 0)
            .then(|| Linear::new(&root.sub("classifier"), d, config.n_classes, None));
        Ok(Self {
            config,
            vs,
            gene_embedding,
            bin_embedding,
            position_embedding,
            blocks,
            ln_final,
            bin_head,
            classifier,
        })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Parameters by name, sorted (a stable order for the optimizer and for weight files).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let map: BTreeMap<String, Tensor> = self.vs.variables().into_iter().collect();
        map.into_iter().collect()
    }

    pub fn parameter_count(&self) -> i64 {
        self.named_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    /// Freezes everything but the LoRA adapters and the classifier (fine-tuning with a frozen base).
    pub fn freeze_base(&self) {
        for (name, tensor) in self.named_parameters() {
            let trainable = name.contains("lora_") || name.starts_with("classifier.");
            let _ = tensor.set_requires_grad(trainable);
        }
    }

    /// Parameters that receive gradients.
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_parameters()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    pub fn forward(&self, tokens: &Tokens, mode: Mode) -> Forward {
        self.forward_reading(tokens, mode, None).0
    }

    /// The forward pass, also returning the states at `layer` (0 = the token embeddings, `k` = the
    /// residual stream after block `k`, the layer count = the final states after the last norm).
    pub fn forward_reading(
        &self,
        tokens: &Tokens,
        mode: Mode,
        layer: Option<usize>,
    ) -> (Forward, Option<Tensor>) {
        let x = self.input_embeddings(tokens);
        self.forward_embedded(x, tokens.valid.as_ref(), mode, layer)
    }

    /// The total input embedding of every token, `[batch, seq, d_model]`: its gene's, its bin's and its
    /// position's embeddings summed (what gradient attribution differentiates with respect to).
    pub fn input_embeddings(&self, tokens: &Tokens) -> Tensor {
        let (_, l) = tokens.gene_ids.size2().expect("[batch, seq] gene ids");
        let positions = Tensor::arange(l, (Kind::Int64, self.device()));
        let lookup = |table: &Tensor, ids: &Tensor| Tensor::embedding(table, ids, -1, false, false);
        lookup(&self.gene_embedding, &tokens.gene_ids)
            + lookup(&self.bin_embedding, &tokens.bins)
            + lookup(&self.position_embedding, &positions).unsqueeze(0)
    }

    /// The forward pass from total input embeddings `x` (see [`CellModel::input_embeddings`]).
    pub fn forward_embedded(
        &self,
        x: Tensor,
        valid: Option<&Tensor>,
        mode: Mode,
        layer: Option<usize>,
    ) -> (Forward, Option<Tensor>) {
        let mut x = x;
        // SDPA's boolean mask is true where attention is allowed: [batch, 1, 1, keys].
        let mask = valid.map(|v| v.unsqueeze(1).unsqueeze(1));
        let mut aux_loss = Tensor::zeros([], (Kind::Float, self.device()));
        let mut expert_load = Vec::new();
        let mut router_probs = Vec::new();
        let mut read = (layer == Some(0)).then(|| x.shallow_clone());
        for (index, block) in self.blocks.iter().enumerate() {
            x = &x
                + block
                    .attn
                    .forward(&block.ln_attn.forward(&x), mask.as_ref(), mode.bf16);
            let h = block.ln_ffn.forward(&x);
            let update = match &block.ffn {
                FeedForward::Dense { up, down } => {
                    down.forward(&up.forward(&h, mode.bf16).gelu("none"), mode.bf16)
                }
                FeedForward::Moe(experts) => {
                    let (b, l, d) = h.size3().expect("[batch, seq, d_model]");
                    let (out, aux, counts, probs) = experts.forward(&h.view([b * l, d]), mode);
                    aux_loss += aux;
                    expert_load.push(counts);
                    router_probs.push(probs);
                    out.view([b, l, d])
                }
            };
            x = &x + update;
            if layer == Some(index + 1) && index + 1 < self.blocks.len() {
                read = Some(x.shallow_clone());
            }
        }
        let hidden = self.ln_final.forward(&x);
        if layer == Some(self.blocks.len()) {
            read = Some(hidden.shallow_clone());
        }
        (
            Forward {
                hidden,
                aux_loss,
                expert_load,
                router_probs,
            },
            read,
        )
    }

    /// Bin logits `[rows, n_bins]` of hidden states `[rows, d_model]`.
    pub fn bin_logits(&self, hidden: &Tensor, bf16: bool) -> Tensor {
        self.bin_head.forward(hidden, bf16).to_kind(Kind::Float)
    }

    /// Class logits `[batch, n_classes]` from the `[CLS]` state.
    pub fn class_logits(&self, hidden: &Tensor, bf16: bool) -> Result<Tensor> {
        let head = self.classifier.as_ref().ok_or_else(|| {
            ModelError::Config(
                "this model has no classifier (fine-tune it with a label column)".into(),
            )
        })?;
        Ok(head
            .forward(&hidden.select(1, 0), bf16)
            .to_kind(Kind::Float))
    }

    /// Cell embeddings `[batch, d_model]`: the `[CLS]` state, or the mean over real gene tokens.
    pub fn embed(&self, tokens: &Tokens, pooling: Pooling) -> Tensor {
        let hidden = tch::no_grad(|| self.forward(tokens, Mode::EVAL).hidden);
        match pooling {
            Pooling::Cls => hidden.select(1, 0),
            Pooling::Mean => {
                let genes = hidden.narrow(1, 1, hidden.size()[1] - 1);
                let weight = match &tokens.valid {
                    Some(v) => v.narrow(1, 1, v.size()[1] - 1).to_kind(Kind::Float),
                    None => genes.ones_like().select(2, 0),
                }
                .unsqueeze(2);
                (genes * &weight).sum_dim_intlist(1, false, Kind::Float)
                    / weight.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0)
            }
        }
    }

    /// The masked conditionals behind the perturbation sampler: the bins at `positions` (`[batch, seq]`
    /// bool) are replaced by the mask bin, and the model's distribution over bins at each of those
    /// positions is returned as `[positions, n_bins]` probabilities, row-major over (sample, position),
    /// tempered by `temperature` (softmax(logits / temperature)).
    pub fn masked_conditional(
        &self,
        tokens: &Tokens,
        positions: &Tensor,
        temperature: f64,
    ) -> Result<Tensor> {
        if temperature <= 0.0 {
            return Err(ModelError::Config(format!(
                "temperature must be positive, got {temperature}"
            )));
        }
        let masked = Tokens {
            gene_ids: tokens.gene_ids.shallow_clone(),
            bins: tokens.bins.masked_fill(positions, self.config.mask_bin()),
            valid: tokens.valid.as_ref().map(|v| v.shallow_clone()),
        };
        Ok(tch::no_grad(|| {
            let hidden = self.forward(&masked, Mode::EVAL).hidden;
            let rows = hidden.index(&[Some(positions.shallow_clone())]);
            (self.bin_logits(&rows, false) / temperature).softmax(-1, Kind::Float)
        }))
    }

    /// Writes every parameter to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let named = self.named_parameters();
        let cpu: Vec<(String, Tensor)> = named
            .iter()
            .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&cpu, path).map_err(|e| ModelError::Weights {
            path: path.display().to_string(),
            message: format!("cannot write weights: {e}"),
        })
    }

    /// Loads parameters by name from a safetensors file. With `allow_missing`, parameters the file does
    /// not have (a new classifier, fresh LoRA adapters) keep their initial values and are returned;
    /// otherwise every parameter must be present. Shape mismatches and unknown tensors are errors.
    pub fn load(&mut self, path: &Path, allow_missing: bool) -> Result<Vec<String>> {
        let fail = |message: String| ModelError::Weights {
            path: path.display().to_string(),
            message,
        };
        let stored: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| fail(format!("not a readable safetensors file ({e})")))?
            .into_iter()
            .collect();
        let params: BTreeMap<String, Tensor> = self.named_parameters().into_iter().collect();
        let unknown: Vec<&String> = stored.keys().filter(|k| !params.contains_key(*k)).collect();
        if !unknown.is_empty() {
            return Err(fail(format!(
                "tensors {unknown:?} are not parameters of this model (was it trained with another architecture?)"
            )));
        }
        let mut missing = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, param) in &params {
                match stored.get(name) {
                    Some(value) => {
                        if value.size() != param.size() {
                            return Err(fail(format!(
                                "tensor {name} has shape {:?}, the model expects {:?}",
                                value.size(),
                                param.size()
                            )));
                        }
                        param.shallow_clone().copy_(value);
                    }
                    None => missing.push(name.clone()),
                }
            }
            Ok(())
        })?;
        if !allow_missing && !missing.is_empty() {
            return Err(fail(format!("parameters {missing:?} are missing")));
        }
        Ok(missing)
    }
}

/// The dense matrix-product rate of `device` in TFLOP/s, measured (f32 on the CPU with `threads`
/// threads, bf16 on CUDA): the peak MFU figures are stated against.
pub fn measured_peak_tflops(device: &str, threads: usize) -> Result<f64> {
    let device = parse_device(device)?;
    tch::set_num_threads(threads.max(1) as i32);
    let (n, kind) = if device == Device::Cpu {
        (1024i64, Kind::Float)
    } else {
        (8192i64, Kind::BFloat16)
    };
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let mut sink = a.matmul(&b);
    let _ = sink.sum(Kind::Float).double_value(&[]);
    let started = std::time::Instant::now();
    let mut products = 0u32;
    while started.elapsed().as_secs_f64() < 1.0 || products < 3 {
        sink = a.matmul(&b);
        products += 1;
    }
    let _ = sink.sum(Kind::Float).double_value(&[]);
    let seconds = started.elapsed().as_secs_f64();
    Ok(f64::from(products) * 2.0 * (n as f64).powi(3) / seconds / 1e12)
}

/// Parses `cpu`, `cuda` or `cuda:N`, checking that libtorch can see the GPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let device = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => {
                return Err(ModelError::Config(format!(
                    "device `{spec}` is not one of cpu, cuda, cuda:N"
                )))
            }
        },
    };
    let available = tch::Cuda::device_count() as usize;
    match device {
        Device::Cuda(n) if n >= available => Err(ModelError::Config(format!(
            "device `{spec}` requested but libtorch sees {available} CUDA device(s)"
        ))),
        _ => Ok(device),
    }
}

#[cfg(test)]
mod tests {
    /// A checkpoint's model config records its layout; one from before layouts reads as the full
    /// layout, and a layout this build does not know is refused by name.
    #[test]
    fn a_model_config_records_its_layout_and_an_unknown_layout_is_refused_by_name() {
        let mut config = Preset::Tiny.config(50, 10);
        config.layout = SequenceLayout::Expressed { unexpressed: 8 };
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["layout"]["kind"], "expressed");
        assert_eq!(json["layout"]["unexpressed"], 8);
        let back: ModelConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, config);
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("layout");
        let old: ModelConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.layout, SequenceLayout::Full);
        let mut future = json;
        future["layout"] = serde_json::json!({ "kind": "ranked" });
        let error = serde_json::from_value::<ModelConfig>(future)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown variant `ranked`"), "{error}");
    }

    use super::*;
    use crate::train::optim::{AdamW, AdamWConfig};

    fn tiny(n_genes: usize) -> ModelConfig {
        Preset::Tiny.config(n_genes, 10)
    }

    fn tokens(batch: i64, n_genes: i64, n_bins: i64) -> Tokens {
        let genes = Tensor::arange(n_genes + 1, (Kind::Int64, Device::Cpu)).repeat([batch, 1]);
        let bins = Tensor::randint(n_bins, [batch, n_genes + 1], (Kind::Int64, Device::Cpu));
        let _ = bins.select(1, 0).fill_(n_bins + 1);
        Tokens {
            gene_ids: genes,
            bins,
            valid: None,
        }
    }

    fn eval_logits(model: &CellModel, t: &Tokens) -> Tensor {
        tch::no_grad(|| {
            let h = model.forward(t, Mode::EVAL).hidden;
            model.bin_logits(&h, false)
        })
    }

    #[test]
    fn save_then_load_gives_identical_outputs() {
        tch::manual_seed(1);
        let model = CellModel::new(tiny(12), Device::Cpu).unwrap();
        let t = tokens(3, 12, 10);
        let before = eval_logits(&model, &t);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        model.save(&path).unwrap();
        tch::manual_seed(2);
        let mut other = CellModel::new(tiny(12), Device::Cpu).unwrap();
        assert!(!eval_logits(&other, &t).equal(&before));
        other.load(&path, false).unwrap();
        assert!(eval_logits(&other, &t).equal(&before));
        // A model of another shape is refused with the tensor named.
        let mut wider = CellModel::new(
            ModelConfig {
                d_model: 32,
                ..tiny(12)
            },
            Device::Cpu,
        )
        .unwrap();
        let err = wider.load(&path, false).unwrap_err().to_string();
        assert!(err.contains("shape"), "{err}");
    }

    #[test]
    fn lora_starts_equal_to_the_base_and_freezing_leaves_only_adapters() {
        tch::manual_seed(3);
        let base = CellModel::new(tiny(8), Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        base.save(&path).unwrap();
        let config = ModelConfig {
            lora: Some(LoraConfig {
                rank: 2,
                alpha: 4.0,
            }),
            n_classes: 3,
            ..tiny(8)
        };
        let mut adapted = CellModel::new(config, Device::Cpu).unwrap();
        let missing = adapted.load(&path, true).unwrap();
        assert!(missing
            .iter()
            .all(|n| n.contains("lora_") || n.starts_with("classifier.")));
        let t = tokens(2, 8, 10);
        assert!(eval_logits(&adapted, &t).allclose(&eval_logits(&base, &t), 1e-6, 1e-6, false));
        adapted.freeze_base();
        let names: Vec<String> = adapted
            .trainable_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.contains("lora_")).count(),
            2 * 4 * 2
        );
        assert!(names
            .iter()
            .all(|n| n.contains("lora_") || n.starts_with("classifier.")));
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        tch::manual_seed(4);
        let model = CellModel::new(tiny(6), Device::Cpu).unwrap();
        let t = tokens(1, 6, 10);
        let full = eval_logits(&model, &t);
        // Append junk tokens marked invalid: the first 7 positions must not move.
        let padded = Tokens {
            gene_ids: Tensor::cat(&[&t.gene_ids, &t.gene_ids.narrow(1, 1, 3)], 1),
            bins: Tensor::cat(&[&t.bins, &t.bins.narrow(1, 1, 3)], 1),
            valid: Some(Tensor::cat(
                &[
                    Tensor::ones([1, 7], (Kind::Bool, Device::Cpu)),
                    Tensor::zeros([1, 3], (Kind::Bool, Device::Cpu)),
                ],
                1,
            )),
        };
        let mut bigger = model.config.clone();
        bigger.max_seq_len = 10;
        // Same weights in a model with a longer position table.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut long = CellModel::new(bigger, Device::Cpu).unwrap();
        tch::no_grad(|| {
            for ((name, dst), (_, src)) in long
                .named_parameters()
                .into_iter()
                .zip(model.named_parameters())
            {
                if name == "position_embedding" {
                    dst.narrow(0, 0, 7).shallow_clone().copy_(&src);
                } else {
                    dst.shallow_clone().copy_(&src);
                }
            }
        });
        long.save(&path).unwrap();
        long.load(&path, false).unwrap();
        let out = eval_logits(&long, &padded).narrow(1, 0, 7);
        assert!(out.allclose(&full, 1e-5, 1e-5, false));
    }

    #[test]
    fn masked_conditionals_are_distributions_at_the_asked_positions() {
        tch::manual_seed(5);
        let model = CellModel::new(tiny(9), Device::Cpu).unwrap();
        let t = tokens(2, 9, 10);
        let positions = Tensor::zeros([2, 10], (Kind::Bool, Device::Cpu));
        let _ = positions.get(0).get(3).fill_(1);
        let _ = positions.get(1).get(5).fill_(1);
        let _ = positions.get(1).get(7).fill_(1);
        let probs = model.masked_conditional(&t, &positions, 2.0).unwrap();
        assert_eq!(probs.size(), vec![3, 10]);
        let sums = probs.sum_dim_intlist(1, false, Kind::Float);
        assert!(sums.allclose(&sums.ones_like(), 1e-5, 1e-5, false));
        // A higher temperature flattens the distribution (higher entropy).
        let entropy = |p: &Tensor| -(p * p.log()).sum(Kind::Float).double_value(&[]);
        let sharp = model.masked_conditional(&t, &positions, 0.5).unwrap();
        assert!(entropy(&probs) > entropy(&sharp));
        assert!(model.masked_conditional(&t, &positions, 0.0).is_err());
    }

    /// A router that sends almost every token to expert 0 has a large load-balancing loss; optimizing the
    /// router on that loss alone spreads the load.
    #[test]
    fn aux_loss_falls_when_routing_is_imbalanced() {
        tch::manual_seed(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let experts = Experts::new(&vs.root(), 16, 4, 8, 2, false);
        let direction = Tensor::randn([16], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([512, 16], (Kind::Float, Device::Cpu)) * 0.3 + &direction;
        tch::no_grad(|| {
            experts
                .router
                .get(0)
                .shallow_clone()
                .copy_(&(&direction * 0.25));
        });
        let mode = Mode {
            train: true,
            bf16: false,
        };
        let (_, aux_start, load_start, _) = experts.forward(&x, mode);
        let mut opt = AdamW::new(
            vec![("router".into(), experts.router.shallow_clone())],
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        );
        for _ in 0..100 {
            let (_, aux, _, _) = experts.forward(&x, mode);
            opt.zero_grad();
            aux.backward();
            opt.step(0.05);
        }
        let (_, aux_end, load_end, _) = experts.forward(&x, mode);
        let (start, end) = (aux_start.double_value(&[]), aux_end.double_value(&[]));
        let max_share =
            |l: &Tensor| l.max().double_value(&[]) / l.sum(Kind::Float).double_value(&[]);
        assert!(start > 1.5 && end < 0.8 * start, "aux {start} -> {end}");
        assert!(max_share(&load_end) < max_share(&load_start));
    }
}
