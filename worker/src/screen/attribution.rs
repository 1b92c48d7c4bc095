//! Gradient gene attribution (the gene-selection paper's DeepLIFT, in Ancona et al.'s gradient
//! formulation): how much each gene token's total input embedding (gene + bin + position) contributes
//! to a state logit, relative to a reference input. `docs/attribution.md` states exactly what is
//! computed; in short, for a cell `X` attributed for class `c` against a reference `R` (same genes at
//! the same positions, full token layout):
//!
//! `f(X, R)_g = sum_d  d z_c / d x_{g,d} |_{x = X}  *  (X_{g,d} - R_{g,d})`
//!
//! the ordinary gradient at the input times the difference of the embeddings, summed over the embedding
//! dimension. For a model linear in its input embeddings `sum_g f(X, R)_g = z_c(X) - z_c(R)` exactly
//! (completeness, tested); for the transformer it is a first-order approximation, and each record
//! carries both sides so the gap can be read. A contrast reference averages both directions,
//! `(f(I, B) + f(B, I)) / 2`, each cell attributed for its own class; the padding reference (every gene
//! token's embedding zero, `[CLS]` kept) has one direction.

use tch::{Kind, Tensor};

use crate::model::{CellModel, Mode, Tokens};

/// `f(input, reference)` per token for a scalar function `logit` of `[rows, seq, d]` embeddings returning
/// `[rows]` (each row's value depends only on its own row): the gradient of `logit` times
/// `input - reference`, summed over `d` (`[rows, seq]`), and `logit(input)` (`[rows]`). With `steps = 1`
/// the gradient is taken at the input (the plain gradient formulation); with `steps = m` it is the mean
/// of the gradients at `reference + k/m (input - reference)`, `k = 1..m` (a Riemann sum of the path
/// integral, which DeepLIFT's rescale rule approximates and whose total tends to `logit(input) -
/// logit(reference)` as `m` grows).
pub fn gradient_times_difference(
    logit: impl Fn(&Tensor) -> Tensor,
    input: &Tensor,
    reference: &Tensor,
    steps: u32,
) -> (Tensor, Tensor) {
    let steps = steps.max(1);
    let difference = input - reference;
    let mut grad_sum = Tensor::zeros_like(input);
    let mut at_input = None;
    for k in (1..=steps).rev() {
        let point = reference + &difference * (f64::from(k) / f64::from(steps));
        let x = point.detach().set_requires_grad(true);
        let value = logit(&x);
        // Rows do not interact, so the gradient of the sum is each row's own gradient.
        let grad = Tensor::run_backward(&[value.sum(Kind::Float)], &[&x], false, false)
            .pop()
            .expect("one gradient per input");
        grad_sum += grad;
        if k == steps {
            at_input = Some(value.detach());
        }
    }
    let attribution =
        (grad_sum / f64::from(steps) * difference).sum_dim_intlist(-1, false, Kind::Float);
    (attribution, at_input.expect("at least one step"))
}

/// What one attributed cell gives: per gene token its importance, and the two sides of completeness
/// for the first direction (the attributed cell against its reference).
pub struct CellAttribution {
    /// `[rows, genes]`: `f(I, B)` (padding) or `(f(I, B) + f(B, I)) / 2` (contrast), per vocabulary gene.
    pub importance: Tensor,
    /// `[rows]`: `z_c(I) - z_c(B)`, the logit difference `f(I, B)` distributes over the genes.
    pub logit_gap: Tensor,
    /// `[rows]`: `sum_g f(I, B)_g`.
    pub attribution_sum: Tensor,
}

/// The reference an attributed cell is compared with.
pub enum Reference<'a> {
    /// A contrast cell per attributed cell (full-layout bins) and the class whose logit it is
    /// attributed for in the second direction.
    Contrast { cells: &'a [&'a [u8]], class: i64 },
    /// Every gene token's total embedding zero.
    Padding,
}

/// Attributes class `class`'s logit of each of `cells` (full-layout bins over the vocabulary) against
/// `reference`, with the classifier of `model`.
pub fn attribute_cells(
    model: &CellModel,
    cells: &[&[u8]],
    class: i64,
    reference: Reference<'_>,
    steps: u32,
) -> anyhow::Result<CellAttribution> {
    let tokens = super::steer::full_layout_tokens(model, cells, |_, _| false);
    let input = tch::no_grad(|| model.input_embeddings(&tokens));
    let logit = |class: i64| {
        move |x: &Tensor| -> Tensor {
            let (forward, _) = model.forward_embedded(x.shallow_clone(), None, Mode::EVAL, None);
            model
                .class_logits(&forward.hidden, false)
                .expect("a classifier (checked when the screen was planned)")
                .select(1, class)
        }
    };
    let genes = |t: &Tensor| t.narrow(1, 1, t.size()[1] - 1);
    match reference {
        Reference::Contrast {
            cells: references,
            class: reference_class,
        } => {
            anyhow::ensure!(
                references.len() == cells.len(),
                "{} reference cells for {} cells",
                references.len(),
                cells.len()
            );
            let reference_tokens: Tokens =
                super::steer::full_layout_tokens(model, references, |_, _| false);
            let reference = tch::no_grad(|| model.input_embeddings(&reference_tokens));
            let (forward_attr, at_input) =
                gradient_times_difference(logit(class), &input, &reference, steps);
            let (backward_attr, _) =
                gradient_times_difference(logit(reference_class), &reference, &input, steps);
            let at_reference = tch::no_grad(|| logit(class)(&reference));
            Ok(CellAttribution {
                attribution_sum: forward_attr.sum_dim_intlist(1, false, Kind::Float),
                importance: genes(&((&forward_attr + &backward_attr) / 2.0)),
                logit_gap: at_input - at_reference,
            })
        }
        Reference::Padding => {
            // Zero every gene token's embedding; `[CLS]` (token 0) is the same in both.
            let seq = input.size()[1];
            let cls_only = Tensor::cat(
                &[
                    Tensor::ones([1, 1, 1], (Kind::Float, input.device())),
                    Tensor::zeros([1, seq - 1, 1], (Kind::Float, input.device())),
                ],
                1,
            );
            let reference = &input * cls_only;
            let (attr, at_input) =
                gradient_times_difference(logit(class), &input, &reference, steps);
            let at_reference = tch::no_grad(|| logit(class)(&reference));
            Ok(CellAttribution {
                attribution_sum: attr.sum_dim_intlist(1, false, Kind::Float),
                importance: genes(&attr),
                logit_gap: at_input - at_reference,
            })
        }
    }
}

impl super::compute::Screener {
    /// Computes attribution unit `unit`: every cell of its block attributed once, a batch at a time
    /// (`execution.batch` cells; the same batches whichever worker runs the unit); `stop` is checked
    /// between batches.
    pub(super) fn compute_attribution_unit(
        &self,
        unit: usize,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<cellfleet_shared::screen::UnitResult, super::compute::UnitError> {
        use super::compute::UnitError;
        use cellfleet_shared::screen::{UnitAttribution, UnitResult};
        let plan = &self.plan;
        let span = plan.unit(unit);
        let classifier = plan
            .classifier
            .as_ref()
            .expect("an attribution plan has its classifier");
        let class = i64::from(classifier.starts[0]);
        let contrast = classifier.starts.get(1).map(|&c| i64::from(c));
        let n = plan.vocabulary.len();
        let cells: Vec<usize> = span.cells.clone().collect();
        let mut attribution = UnitAttribution {
            importance: Vec::with_capacity(cells.len() * n),
            logit_gap: Vec::with_capacity(cells.len()),
            attribution_sum: Vec::with_capacity(cells.len()),
        };
        let floats = |t: Tensor| -> Result<Vec<f32>, UnitError> {
            Ok(Vec::<f32>::try_from(
                t.to_device(tch::Device::Cpu).flatten(0, -1),
            )?)
        };
        for chunk in cells.chunks(plan.spec.execution.batch as usize) {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(UnitError::Interrupted);
            }
            let states: Vec<&[u8]> = chunk
                .iter()
                .map(|&i| self.bins[&plan.cells[i]].as_slice())
                .collect();
            let references: Vec<&[u8]> = match contrast {
                Some(_) => chunk
                    .iter()
                    .map(|&i| self.bins[&plan.references[i]].as_slice())
                    .collect(),
                None => Vec::new(),
            };
            let reference = match contrast {
                Some(class) => Reference::Contrast {
                    cells: &references,
                    class,
                },
                None => Reference::Padding,
            };
            let steps = plan.spec.attribution.as_ref().map_or(1, |a| a.steps);
            let out = attribute_cells(&self.model, &states, class, reference, steps)?;
            attribution.importance.extend(floats(out.importance)?);
            attribution.logit_gap.extend(floats(out.logit_gap)?);
            attribution
                .attribution_sum
                .extend(floats(out.attribution_sum)?);
        }
        let records = cells.len();
        Ok(UnitResult {
            unit: unit as u32,
            plan_blake3: self.plan_blake3.clone(),
            targets: span.targets.clone().map(|t| t as u32).collect(),
            n_vocabulary: n as u32,
            n_states: plan.states.len() as u32,
            record_target: vec![span.targets.start as u32; records],
            record_cell: cells.iter().map(|&i| plan.cells[i]).collect(),
            cosine_shift: vec![0.0; records],
            state_shift: Vec::new(),
            state_progress: Vec::new(),
            alone: Vec::new(),
            delta_bin_sum: vec![0.0; span.targets.len() * n],
            expression: None,
            steer: None,
            classes: None,
            attribution: Some(attribution),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Completeness: for a function linear in the embeddings, `f(x) = sum W * x + b`, every token's
    /// attribution is its exact contribution `sum_d W_{t,d} (x - r)_{t,d}`, and they sum to
    /// `f(x) - f(r)`, whatever the reference.
    #[test]
    fn attributions_of_a_linear_model_are_its_exact_contributions() {
        tch::manual_seed(3);
        let (rows, seq, d) = (3, 5, 4);
        let w = Tensor::randn([seq, d], (Kind::Float, Device::Cpu));
        let linear =
            |x: &Tensor| (x * &w).sum_dim_intlist([1, 2].as_slice(), false, Kind::Float) + 0.7;
        let x = Tensor::randn([rows, seq, d], (Kind::Float, Device::Cpu));
        let r = Tensor::randn([rows, seq, d], (Kind::Float, Device::Cpu));
        let (attr, value) = gradient_times_difference(linear, &x, &r, 1);
        assert_eq!(attr.size(), vec![rows, seq]);
        let exact = ((&x - &r) * &w).sum_dim_intlist(-1, false, Kind::Float);
        let worst = f64::try_from((&attr - &exact).abs().max()).unwrap();
        assert!(worst < 1e-5, "per-token contributions off by {worst}");
        let gap = &value - linear(&r);
        let completeness = f64::try_from(
            (attr.sum_dim_intlist(1, false, Kind::Float) - gap)
                .abs()
                .max(),
        )
        .unwrap();
        assert!(
            completeness < 1e-4,
            "attributions miss f(x) - f(r) by {completeness}"
        );
        // A reference equal to the input attributes nothing; the attributions moved otherwise.
        let (none, _) = gradient_times_difference(linear, &x, &x, 1);
        assert_eq!(f64::try_from(none.abs().max()).unwrap(), 0.0);
        assert!(f64::try_from(attr.abs().max()).unwrap() > 0.1);
    }

    /// A nonlinear function's attributions are not complete: the check above can fail.
    #[test]
    fn a_nonlinear_function_breaks_completeness() {
        let square = |x: &Tensor| {
            x.square()
                .sum_dim_intlist([1, 2].as_slice(), false, Kind::Float)
        };
        let x = Tensor::from_slice(&[2.0f32]).view([1, 1, 1]);
        let r = Tensor::zeros([1, 1, 1], (Kind::Float, Device::Cpu));
        let (attr, value) = gradient_times_difference(square, &x, &r, 1);
        // Gradient 4 times difference 2 = 8, against f(x) - f(r) = 4.
        assert_eq!(f64::try_from(attr.sum(Kind::Float)).unwrap(), 8.0);
        assert_eq!(f64::try_from(value.sum(Kind::Float)).unwrap(), 4.0);
        // Along the path, gradients 2 * 2k/m averaged over k = 1..m, times 2: 4 (m + 1) / m -> 4.
        let (path, _) = gradient_times_difference(square, &x, &r, 8);
        assert!((f64::try_from(path.sum(Kind::Float)).unwrap() - 4.5).abs() < 1e-5);
    }
}
