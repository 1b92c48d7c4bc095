//! AdamW with state in tensors this crate owns (so a checkpoint can store and restore it exactly), the
//! learning-rate schedule (linear warm-up, cosine decay) and gradient-norm clipping.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay; not applied to biases, LayerNorm parameters and embedding tables.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// First and second moments of one parameter.
pub struct Moments {
    pub name: String,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    decay: bool,
}

/// AdamW (Loshchilov & Hutter): `p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`.
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    pub moments: Vec<Moments>,
    /// Updates applied so far.
    pub step: u64,
}

/// Matrices decay; biases (including the stacked expert biases `b1`, `b2`), LayerNorm parameters and
/// embedding tables do not.
fn decays(name: &str, param: &Tensor) -> bool {
    let bias = name.ends_with("bias") || name.ends_with(".b1") || name.ends_with(".b2");
    param.dim() >= 2 && !bias && !name.contains("embedding")
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let moments = params
            .iter()
            .map(|(name, p)| Moments {
                name: name.clone(),
                exp_avg: p.zeros_like().detach(),
                exp_avg_sq: p.zeros_like().detach(),
                decay: decays(name, p),
            })
            .collect();
        Self {
            config,
            params,
            moments,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Scales the gradients so that their global L2 norm is at most `max_norm`; returns the norm before
    /// clipping. `max_norm <= 0` only measures.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if max_norm > 0.0 && total > max_norm {
            let scale = max_norm / (total + 1e-6);
            tch::no_grad(|| {
                for (_, p) in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(scale);
                    }
                }
            });
        }
        total
    }

    /// Applies one update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        tch::no_grad(|| {
            for ((_, p), m) in self.params.iter().zip(&mut self.moments) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if m.decay && c.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = m.exp_avg.lerp_(&g, 1.0 - c.beta1);
                let _ = m.exp_avg_sq.g_mul_scalar_(c.beta2);
                let _ = m.exp_avg_sq.addcmul_(&(&g * (1.0 - c.beta2)), &g);
                let denom = (m.exp_avg_sq.sqrt() / bias2.sqrt()).g_add_scalar_(c.eps);
                let _ = p.addcdiv_(&(&m.exp_avg * (-lr / bias1)), &denom);
            }
        });
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio` at `total`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning rate of update number `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        // The last update (step total - 1) lands exactly on the floor.
        let span = self.total.saturating_sub(self.warmup + 1).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            peak: 1.0,
            warmup: 10,
            total: 111,
            min_ratio: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
    }

    /// Two steps checked against the closed form of AdamW.
    #[test]
    fn adamw_matches_the_formula() {
        let p = Tensor::from_slice(&[1.0f32, -2.0])
            .view([1, 2])
            .set_requires_grad(true);
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], config);
        let grads = [[0.5f64, -1.0], [0.25, 2.0]];
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            opt.zero_grad();
            let gt = Tensor::from_slice(&[g[0] as f32, g[1] as f32]).view([1, 2]);
            (&p * &gt).sum(Kind::Float).backward();
            opt.step(0.1);
            for i in 0..2 {
                expect[i] *= 1.0 - 0.1 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t as i32 + 1));
                let vh = v[i] / (1.0 - 0.999f64.powi(t as i32 + 1));
                expect[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = Vec::<f32>::try_from(p.flatten(0, -1)).unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(got[i]) - expect[i]).abs() < 1e-5,
                "{got:?} vs {expect:?}"
            );
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("b".into(), p.shallow_clone())],
            AdamWConfig::default(),
        );
        (&p * Tensor::from_slice(&[3.0f32, 0.0, 4.0]))
            .sum(Kind::Float)
            .backward();
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let after = p.grad().norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-4);
    }
}
