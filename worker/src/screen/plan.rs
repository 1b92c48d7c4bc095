//! Resolving a screen specification into a plan against the checkpoint and the corpus: every check that
//! can fail happens here, before any work is submitted; the plan is stored as `plan.json` beside the
//! results and read back by every worker against its blake3.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use cellfleet_shared::checkpoint::CheckpointManifest;
use cellfleet_shared::corpus::manifest::MISSING_LABEL;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::screen::{
    AttributionSpec, CheckpointId, ClassifierId, GeneSelection, GoalSpec, GuidedGenes,
    PerturbationKind, RankingFile, ScreenPlan, ScreenSpec, StateCells, Target, TargetKind,
    DEFAULT_QUERY_GENES, PLAN_FILE, PLAN_FORMAT, RANKING_FILE, RANKING_FORMAT,
};
use cellfleet_shared::storage::{S3Options, Store};
use cellfleet_shared::stream::batch::SequenceLayout;

use crate::train::checkpoint_state::{read_state, resolve, ResumeTarget, TrainState};
use crate::train::saved_model::{vocabulary_hash, ModelInfo, INFO_FILE, WEIGHTS_FILE};

/// Reads a screen specification: TOML, or JSON for a `.json` file.
pub fn read_spec(path: &Path) -> anyhow::Result<ScreenSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the screen specification {}", path.display()))?;
    let spec: ScreenSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not a valid screen specification: {e}", path.display()))?
    } else {
        toml::from_str(&text)
            .map_err(|e| anyhow!("{}: not a valid screen specification: {e}", path.display()))?
    };
    spec.validate()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(spec)
}

/// blake3 of a checkpoint manifest as the coordinator records it.
pub fn manifest_blake3(manifest: &CheckpointManifest) -> anyhow::Result<String> {
    Ok(blake3::hash(&serde_json::to_vec_pretty(manifest)?)
        .to_hex()
        .to_string())
}

/// A deterministic generator for sampling cells and genes (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn new(seed: u64, domain: &str) -> Self {
        let salt = u64::from_le_bytes(
            blake3::hash(domain.as_bytes()).as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
        Self(seed ^ salt)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `k` of `items` (all when `k >= len`), returned in ascending order.
    fn sample<T: Copy + Ord>(&mut self, mut items: Vec<T>, k: usize) -> Vec<T> {
        let k = k.min(items.len());
        for i in 0..k {
            let j = i + (self.next() % (items.len() - i) as u64) as usize;
            items.swap(i, j);
        }
        items.truncate(k);
        items.sort_unstable();
        items
    }
}

/// Every cell's label codes and name.
struct CorpusIndex {
    labels: Vec<u32>,
    columns: usize,
    names: Vec<String>,
}

fn index_corpus(corpus: &Corpus) -> anyhow::Result<CorpusIndex> {
    let columns = corpus.manifest.label_columns.len();
    let mut index = CorpusIndex {
        labels: Vec::with_capacity(corpus.total_cells() as usize * columns),
        columns,
        names: Vec::with_capacity(corpus.total_cells() as usize),
    };
    for s in 0..corpus.manifest.shards.len() {
        let shard = corpus.fetch_shard(s)?;
        for b in 0..shard.n_blocks() {
            index.labels.extend(shard.read_block(b)?.labels);
        }
        index
            .names
            .extend(shard.origins()?.into_iter().map(|o| o.name));
    }
    Ok(index)
}

/// Every label column of the corpus with each of `cells`' values (`""` where a cell has none).
pub fn cell_labels(corpus: &Corpus, cells: &[u64]) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    Ok(labels_of(corpus, &index_corpus(corpus)?, cells))
}

/// Every cell's name (corpus order) and, like [`cell_labels`], the label columns with `cells`' values:
/// one pass over the corpus for both.
#[allow(clippy::type_complexity)]
pub fn cell_names_and_labels(
    corpus: &Corpus,
    cells: &[u64],
) -> anyhow::Result<(Vec<String>, Vec<(String, Vec<String>)>)> {
    let index = index_corpus(corpus)?;
    let labels = labels_of(corpus, &index, cells);
    Ok((index.names, labels))
}

fn labels_of(corpus: &Corpus, index: &CorpusIndex, cells: &[u64]) -> Vec<(String, Vec<String>)> {
    corpus
        .manifest
        .label_columns
        .iter()
        .enumerate()
        .map(|(col, column)| {
            let values = cells
                .iter()
                .map(|&c| {
                    let code = index.labels[c as usize * index.columns + col];
                    if code == MISSING_LABEL {
                        String::new()
                    } else {
                        column.categories[code as usize].clone()
                    }
                })
                .collect();
            (column.name.clone(), values)
        })
        .collect()
}

/// The bins of `cells` (corpus positions), read block by block.
pub fn read_cells(corpus: &Corpus, cells: &[u64]) -> anyhow::Result<HashMap<u64, Vec<u8>>> {
    let offsets = corpus.manifest.shard_offsets();
    let block_cells = corpus.manifest.block_cells as usize;
    let mut sorted = cells.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = HashMap::with_capacity(sorted.len());
    let mut i = 0;
    while i < sorted.len() {
        if sorted[i] >= corpus.total_cells() {
            bail!(
                "cell {} is beyond the corpus's {} cells",
                sorted[i],
                corpus.total_cells()
            );
        }
        let s = offsets.partition_point(|&o| o <= sorted[i]) - 1;
        let shard = corpus.fetch_shard(s)?;
        let mut block: Option<(usize, cellfleet_shared::corpus::shard::Block)> = None;
        while i < sorted.len() && sorted[i] < offsets[s + 1] {
            let local = (sorted[i] - offsets[s]) as usize;
            let b = local / block_cells;
            if block.as_ref().map(|(k, _)| *k) != Some(b) {
                block = Some((b, shard.read_block(b)?));
            }
            let (_, data) = block.as_ref().expect("just read");
            out.insert(sorted[i], data.bins_of(local % block_cells).to_vec());
            i += 1;
        }
    }
    Ok(out)
}

/// Resolves `spec` into a plan: checks that the corpus fits the checkpoint, selects the cells, the genes
/// and the null genes, the goal states' cells (per stratum of `goal.match_column`), and counts each unit's
/// applicable pairs. Every refusal names the field and the value, and what exists instead.
pub fn resolve_plan(
    spec: &ScreenSpec,
    spec_dir: &Path,
    s3: &S3Options,
) -> anyhow::Result<ScreenPlan> {
    spec.validate()?;
    let (checkpoints, manifest) = resolve(&ResumeTarget::Url(spec.checkpoint.clone()), None, s3)
        .with_context(|| format!("checkpoint = {:?}", spec.checkpoint))?;
    let state = read_state(&checkpoints, &manifest)?;
    let corpus =
        Corpus::open(&spec.corpus, s3).with_context(|| format!("corpus = {:?}", spec.corpus))?;
    check_corpus_fits(spec, &corpus, &state)?;
    let vocabulary = state.genes.clone();
    let labels = Labels {
        corpus: &corpus,
        index: index_corpus(&corpus)?,
    };
    let classifier = match (&spec.transitions, &spec.attribution) {
        (Some(t), _) => Some(read_classifier(
            "transitions",
            &t.classifier,
            t.start.as_deref(),
            &state,
            s3,
        )?),
        (None, Some(a)) => {
            let mut states = vec![a.class.clone()];
            states.extend(a.contrast.clone());
            Some(read_classifier(
                "attribution",
                &a.classifier,
                Some(&states),
                &state,
                s3,
            )?)
        }
        _ => None,
    };
    let guided = match &spec.genes {
        GeneSelection::Guided(guided) => Some(read_ranking(guided, &corpus, &vocabulary, s3)?),
        _ => None,
    };
    let mut cells = match (&classifier, &spec.transitions, &spec.attribution) {
        (Some((id, _)), Some(t), _) => select_start_cells(
            spec,
            "transitions.start",
            &id.start_names(),
            t.start.is_some(),
            id,
            &labels,
        )?,
        (Some((id, _)), None, Some(a)) => select_start_cells(
            spec,
            "attribution.class",
            std::slice::from_ref(&a.class),
            true,
            id,
            &labels,
        )?,
        _ => select_cells(spec, &labels)?,
    };
    if let Some(ranking) = &guided {
        cells.retain(|c| ranking.cells.contains_key(c));
        if cells.is_empty() {
            bail!(
                "genes.attribution: no selected cell was attributed in {} (select cells it ranked)",
                ranking.location
            );
        }
    }
    let cell_names = cells
        .iter()
        .map(|&c| labels.index.names[c as usize].clone())
        .collect();
    let guided_bins = match &guided {
        Some(_) => read_cells(&corpus, &cells)?,
        None => HashMap::new(),
    };
    let guided_genes: Vec<Vec<u32>> = match (&guided, &spec.genes) {
        (Some(ranking), GeneSelection::Guided(g)) => cells
            .iter()
            .map(|c| ranking.chosen(*c, g, spec.perturbation.kind, &guided_bins[c]))
            .collect(),
        _ => Vec::new(),
    };
    let selected = match &spec.genes {
        GeneSelection::Guided(_) => {
            // The union of the cells' genes, screened like a list (with the null beside it).
            let mut union: Vec<u32> = guided_genes.iter().flatten().copied().collect();
            union.sort_unstable();
            union.dedup();
            if union.is_empty() {
                bail!("genes.attribution: no selected cell expresses any of its ranked genes");
            }
            let mut listed = spec.clone();
            listed.genes = GeneSelection::List(
                union
                    .iter()
                    .map(|&g| vocabulary[g as usize].clone())
                    .collect(),
            );
            select_genes(&listed, spec_dir, &vocabulary)?
        }
        _ if spec.attributes() => SelectedGenes::default(),
        _ => select_genes(spec, spec_dir, &vocabulary)?,
    };
    let readout_layer = resolve_layer(spec.layer, state.model.n_layers)?;
    let (genes, null_genes) = (selected.singles.clone(), selected.null.clone());
    let targets = if spec.attributes() {
        // One record per cell: a target that perturbs nothing.
        vec![Target {
            name: "attribution".into(),
            kind: TargetKind::Gene,
            genes: Vec::new(),
            screened: false,
            null: false,
        }]
    } else {
        build_targets(&vocabulary, selected)
    };
    if spec.perturbation.kind == PerturbationKind::Delete && vocabulary.len() < 2 {
        bail!("perturbation.kind = \"delete\" needs a vocabulary of at least 2 genes (a cell without genes has no embedding)");
    }
    let strata = match_strata(spec, &labels, &cells)?;
    let states = match &spec.goal {
        Some(goal) => goal_states(spec.seed, goal, &labels, strata.as_ref())?,
        None => Vec::new(),
    };
    let (strata, cell_strata) = strata.map_or((Vec::new(), Vec::new()), |s| (s.names, s.cells));
    let mut spec = spec.clone();
    // Written into the plan, so that a plan made before the field existed reads as 0 (it ran without).
    spec.query_genes.get_or_insert(DEFAULT_QUERY_GENES);
    let mut plan = ScreenPlan {
        format: PLAN_FORMAT.into(),
        corpus_url: spec.corpus.clone(),
        spec,
        checkpoint: CheckpointId {
            url: checkpoints.url().trim_end_matches('/').to_string(),
            step: manifest.step,
            manifest_blake3: manifest_blake3(&manifest)?,
        },
        corpus_manifest_blake3: corpus.manifest.content_hash(),
        vocabulary,
        n_bins: corpus.manifest.bins.n_bins,
        genes,
        null_genes,
        targets,
        readout_layer,
        cells,
        cell_names,
        states,
        strata,
        cell_strata,
        unit_records: Vec::new(),
        anchor_cells: Vec::new(),
        classifier: None,
        references: Vec::new(),
        guided_genes,
    };
    if let Some((mut id, column)) = classifier {
        let (col, categories) = labels.column("transitions.classifier", &column)?;
        id.cell_start = plan
            .cells
            .iter()
            .map(|&c| {
                let name = &categories[labels.label(c, col) as usize];
                let class = id.classes.iter().position(|k| k == name);
                class
                    .and_then(|k| id.starts.iter().position(|&s| s as usize == k))
                    .map(|s| s as u32)
                    .expect("the cells were selected among the start states")
            })
            .collect();
        plan.classifier = Some(id);
    }
    if let Some(attribution) = &plan.spec.attribution {
        if state.model.layout != SequenceLayout::Full {
            bail!(
                "[attribution]: checkpoint {:?} was pretrained in the expressed-gene layout; attribution compares a cell with its reference gene by gene at the same positions, which needs a model pretrained with `train --layout full`",
                plan.spec.checkpoint
            );
        }
        if let Some(contrast) = &attribution.contrast {
            plan.references = contrast_references(attribution, contrast, &plan, &labels)?;
        }
    }
    if let Some(steer) = &plan.spec.steer {
        check_steer(steer, &plan, &state)?;
        if let Some(anchor) = &steer.anchor {
            let (col, categories) = labels.column("steer.anchor.column", &anchor.column)?;
            let code = Labels::code(
                "steer.anchor.value",
                &anchor.column,
                &categories,
                &anchor.value,
            )?;
            let members = labels.cells_matching(&[(col, vec![code])]);
            if members.is_empty() {
                bail!(
                    "steer.anchor.value: no cell has {} = {:?}",
                    anchor.column,
                    anchor.value
                );
            }
            plan.anchor_cells = SplitMix::new(plan.spec.seed, "steer-anchor")
                .sample(members, anchor.max_cells as usize);
        }
    }
    // A guided plan read its cells' bins to choose their genes.
    let bins = if guided_bins.is_empty() {
        read_cells(&corpus, &plan.cells)?
    } else {
        guided_bins
    };
    plan.unit_records = (0..plan.unit_count())
        .map(|u| applicable_records(&plan, &bins, u).len() as u64)
        .collect();
    if plan.total_records() == 0 {
        bail!(
            "no gene of the screen is expressed in any selected cell: a {} changes nothing",
            plan.spec.perturbation.kind.name()
        );
    }
    Ok(plan)
}

/// What a steered screen needs of the checkpoint and the vocabulary: the full token layout (a chain
/// moves every vocabulary gene, unexpressed ones included, which only a full-layout model has learned
/// to read), and given bins that name vocabulary genes, within the bins, for every screened gene.
fn check_steer(
    steer: &cellfleet_shared::screen::SteerSpec,
    plan: &ScreenPlan,
    state: &TrainState,
) -> anyhow::Result<()> {
    if state.model.layout != SequenceLayout::Full {
        bail!(
            "[steer]: checkpoint {:?} was pretrained in the expressed-gene layout; a chain moves every vocabulary gene (unexpressed ones too), which only a model pretrained with `train --layout full` reads. Steer with a full-layout checkpoint",
            plan.spec.checkpoint
        );
    }
    for (gene, &bin) in &steer.bins {
        if !plan.vocabulary.contains(gene) {
            bail!("steer.bins: {gene:?} is not in the checkpoint's vocabulary");
        }
        if bin >= plan.n_bins {
            bail!(
                "steer.bins.{gene} = {bin}: bins run from 0 to {}",
                plan.n_bins - 1
            );
        }
    }
    if steer.clamp == cellfleet_shared::screen::ClampSource::Bins {
        for target in plan.targets.iter().filter(|t| t.screened) {
            for &g in &target.genes {
                let name = &plan.vocabulary[g as usize];
                if !steer.bins.contains_key(name) {
                    bail!(
                        "steer.bins has no bin for {name:?} (screened in {}): every screened gene needs one",
                        target.name
                    );
                }
            }
        }
    }
    Ok(())
}

/// The classifier of `[transitions]`: its `model.json` and the blake3 of its weights, checked to be a
/// fine-tuned model of the checkpoint's vocabulary and token layout; the start states resolved against its
/// classes. Returns the id (without the cells' start states) and the label column.
fn read_classifier(
    section: &str,
    location: &str,
    start: Option<&[String]>,
    state: &TrainState,
    s3: &S3Options,
) -> anyhow::Result<(ClassifierId, String)> {
    let location = location.trim_end_matches('/');
    let store = Store::open(location, s3)
        .with_context(|| format!("{section}.classifier = {location:?}"))?;
    let info_bytes = store.get(INFO_FILE).with_context(|| {
        format!("{section}.classifier: {location}/{INFO_FILE} cannot be read (a model `cellfleet finetune --out` wrote has one)")
    })?;
    let info: ModelInfo = serde_json::from_slice(&info_bytes).with_context(|| {
        format!("{section}.classifier: {location}/{INFO_FILE} is not a cellfleet model description")
    })?;
    let Some(column) = info
        .label_column
        .clone()
        .filter(|_| info.classes.len() >= 2)
    else {
        bail!("{section}.classifier: {location} has no classifier (fine-tune it on a label column with `cellfleet finetune --label-col COLUMN`)");
    };
    if info.vocabulary_hash != vocabulary_hash(&state.genes) {
        bail!(
            "{section}.classifier: {location} was fine-tuned on another gene vocabulary ({} genes) than the checkpoint's ({} genes); fine-tune it from this checkpoint's model",
            info.genes.len(),
            state.genes.len()
        );
    }
    if info.config.layout != state.model.layout || info.config.n_bins != state.model.n_bins {
        bail!(
            "{section}.classifier: {location} reads another token layout or bin count than the checkpoint; fine-tune it from this checkpoint's model"
        );
    }
    let weights = store.get(WEIGHTS_FILE).with_context(|| {
        format!("{section}.classifier: {location}/{WEIGHTS_FILE} cannot be read")
    })?;
    let starts = match start {
        None => (0..info.classes.len() as u32).collect(),
        Some(names) => names
            .iter()
            .map(|name| {
                info.classes
                    .iter()
                    .position(|c| c == name)
                    .map(|p| p as u32)
                    .ok_or_else(|| {
                        anyhow!(
                            "{section}: {name:?} is not a state of the classifier (its `{column}` classes: {})",
                            info.classes.join(", ")
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<u32>>>()?,
    };
    Ok((
        ClassifierId {
            url: location.to_string(),
            weights_blake3: blake3::hash(&weights).to_hex().to_string(),
            label_column: column.clone(),
            classes: info.classes,
            starts,
            cell_start: Vec::new(),
        },
        column,
    ))
}

/// The screened cells of a transitions screen: `cells.filter` and a start state in the classifier's
/// column, sampled down to `cells.max_cells`; every start state must keep cells (a transition row needs
/// them).
fn select_start_cells(
    spec: &ScreenSpec,
    field: &str,
    start_names: &[String],
    named: bool,
    id: &ClassifierId,
    labels: &Labels<'_>,
) -> anyhow::Result<Vec<u64>> {
    let column = &id.label_column;
    let (col, categories) = labels.column(field, column)?;
    let start_names = start_names.to_vec();
    let mut codes = Vec::new();
    for name in &start_names {
        codes.push(categories.iter().position(|c| c == name).ok_or_else(|| {
            anyhow!(
                "{field}: no cell of the corpus has {column} = {name:?} (its values: {}), so {name:?} has no cells",
                categories.join(", ")
            )
        })? as u32);
    }
    let mut narrowed = spec.clone();
    let filter = narrowed
        .cells
        .filter
        .entry(column.clone())
        .or_insert_with(|| cellfleet_shared::screen::OneOrMany::Many(start_names.clone()));
    let wanted: Vec<String> = filter
        .values()
        .into_iter()
        .filter(|v| start_names.contains(v))
        .collect();
    *filter = cellfleet_shared::screen::OneOrMany::Many(wanted);
    let cells = if filter.values().is_empty() {
        Vec::new()
    } else {
        select_cells(&narrowed, labels)?
    };
    for (name, &code) in start_names.iter().zip(&codes) {
        if !cells.iter().any(|&c| labels.label(c, col) == code) {
            bail!(
                "{field}: no screened cell starts in {name:?} ({column} = {name:?} with cells.filter{}); a class needs cells: list the states to screen in {field}",
                if named { "" } else { " and every class as a start state" }
            );
        }
    }
    Ok(cells)
}

/// Per attributed cell, its reference: a seeded draw among the corpus's cells of the contrast state
/// with the same `match_column` value (any contrast cell without one).
fn contrast_references(
    attribution: &AttributionSpec,
    contrast: &str,
    plan: &ScreenPlan,
    labels: &Labels<'_>,
) -> anyhow::Result<Vec<u64>> {
    let classifier_column = plan
        .classifier
        .as_ref()
        .map(|c| c.label_column.clone())
        .expect("an attribution plan has its classifier");
    let (col, categories) = labels.column("attribution.contrast", &classifier_column)?;
    let code = Labels::code(
        "attribution.contrast",
        &classifier_column,
        &categories,
        contrast,
    )?;
    let matched = attribution
        .match_column
        .as_ref()
        .map(|m| {
            labels
                .column("attribution.match_column", m)
                .map(|(c, cats)| (m, c, cats))
        })
        .transpose()?;
    let mut by_value: HashMap<u32, Vec<u64>> = HashMap::new();
    for c in labels.cells_matching(&[(col, vec![code])]) {
        let value = matched.as_ref().map_or(0, |(_, m, _)| labels.label(c, *m));
        by_value.entry(value).or_default().push(c);
    }
    let mut rng = SplitMix::new(plan.spec.seed, "attribution-reference");
    plan.cells
        .iter()
        .map(|&cell| {
            let value = matched.as_ref().map_or(0, |(_, m, _)| labels.label(cell, *m));
            let candidates = by_value.get(&value).filter(|v| !v.is_empty()).ok_or_else(|| {
                match &matched {
                    Some((name, _, cats)) => anyhow!(
                        "attribution.match_column: no {classifier_column} = {contrast:?} cell has {name} = {:?}, the value of attributed cell {cell}: no matched reference",
                        cats.get(value as usize).map_or("(none)", String::as_str)
                    ),
                    None => anyhow!("attribution.contrast: no cell has {classifier_column} = {contrast:?}"),
                }
            })?;
            Ok(candidates[(rng.next() % candidates.len() as u64) as usize])
        })
        .collect()
}

/// An attribution screen's per-cell gene rankings (`attribution_ranking.json`), read for a guided screen.
struct Ranking {
    location: String,
    /// Per attributed cell (corpus position): its genes by importance, most important first.
    cells: HashMap<u64, Vec<u32>>,
    /// Genes by mean importance, most important first.
    overall: Vec<u32>,
}

impl Ranking {
    /// The genes cell `cell` is perturbed in: its `top_k` highest-ranked genes the perturbation applies
    /// to (for knockouts, those it expresses), or the `top_k` of the overall ranking; ascending.
    fn chosen(
        &self,
        cell: u64,
        guided: &GuidedGenes,
        kind: PerturbationKind,
        bins: &[u8],
    ) -> Vec<u32> {
        let ranked = if guided.overall {
            &self.overall
        } else {
            &self.cells[&cell]
        };
        let mut genes: Vec<u32> = ranked
            .iter()
            .copied()
            .filter(|&g| guided.overall || kind.applies(bins[g as usize]))
            .take(guided.top_k as usize)
            .collect();
        genes.sort_unstable();
        genes
    }
}

/// Reads the ranking a guided screen names, checking it ranks this corpus's cells and vocabulary.
fn read_ranking(
    guided: &GuidedGenes,
    corpus: &Corpus,
    vocabulary: &[String],
    s3: &S3Options,
) -> anyhow::Result<Ranking> {
    let location = guided.attribution.trim_end_matches('/');
    let store =
        Store::open(location, s3).with_context(|| format!("genes.attribution = {location:?}"))?;
    let bytes = store.get(RANKING_FILE).with_context(|| {
        format!("genes.attribution: {location}/{RANKING_FILE} cannot be read (an attribution screen's results hold it)")
    })?;
    let file: RankingFile = serde_json::from_slice(&bytes).with_context(|| {
        format!("genes.attribution: {location}/{RANKING_FILE} is not an attribution ranking")
    })?;
    if file.format != RANKING_FORMAT {
        bail!("genes.attribution: {location}/{RANKING_FILE} is format {:?}, expected {RANKING_FORMAT:?}", file.format);
    }
    if file.corpus_manifest_blake3 != corpus.manifest.content_hash() {
        bail!("genes.attribution: {location} ranks the cells of another corpus than {} (its cells are corpus positions): attribute this corpus", corpus.store.url());
    }
    if guided.top_k as usize > vocabulary.len() {
        bail!(
            "genes.top_k = {}: larger than the vocabulary of {} genes",
            guided.top_k,
            vocabulary.len()
        );
    }
    if guided.top_k as usize > file.ranked_genes as usize {
        bail!("genes.top_k = {}: the ranking keeps {} genes per cell (attribution.ranked_genes); attribute again with more", guided.top_k, file.ranked_genes);
    }
    let position: HashMap<&str, u32> = vocabulary
        .iter()
        .enumerate()
        .map(|(i, g)| (g.as_str(), i as u32))
        .collect();
    let ids = |names: &[String]| -> anyhow::Result<Vec<u32>> {
        names
            .iter()
            .map(|n| position.get(n.as_str()).copied().ok_or_else(|| anyhow!("genes.attribution: gene {n:?} of the ranking is not in the checkpoint's vocabulary")))
            .collect()
    };
    let mut cells = HashMap::new();
    for cell in &file.cells {
        cells.insert(cell.cell, ids(&cell.genes)?);
    }
    Ok(Ranking {
        location: location.to_string(),
        cells,
        overall: ids(&file.overall)?,
    })
}

/// The corpus must be tokenized like the checkpoint's training corpus: the same vocabulary and bins.
fn check_corpus_fits(spec: &ScreenSpec, corpus: &Corpus, state: &TrainState) -> anyhow::Result<()> {
    let vocabulary = &state.genes;
    if corpus.manifest.genes != *vocabulary {
        let shared = corpus
            .manifest
            .genes
            .iter()
            .filter(|g| vocabulary.contains(g))
            .count();
        bail!(
            "corpus {} does not use the checkpoint's gene vocabulary ({} genes, {} of them shared with the checkpoint's {}); ingest the cells with `--genes {}/manifest.json` (the pretraining corpus) so they are tokenized like the model's",
            spec.corpus,
            corpus.manifest.genes.len(),
            shared,
            vocabulary.len(),
            state.corpus_url.trim_end_matches('/')
        );
    }
    if corpus.manifest.bins.n_bins != state.model.n_bins as u16 {
        bail!(
            "corpus {} has {} bins, the checkpoint's model {}",
            spec.corpus,
            corpus.manifest.bins.n_bins,
            state.model.n_bins
        );
    }
    Ok(())
}

/// The corpus's label columns and every cell's codes in them, for selecting cells by label.
struct Labels<'a> {
    corpus: &'a Corpus,
    index: CorpusIndex,
}

impl Labels<'_> {
    /// The index and categories of label column `name`; `field` names the spec field asking for it.
    fn column(&self, field: &str, name: &str) -> anyhow::Result<(usize, Vec<String>)> {
        let columns = &self.corpus.manifest.label_columns;
        let Some(i) = columns.iter().position(|c| c.name == name) else {
            let known: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            bail!(
                "{field}: the corpus has no obs column {name:?} (its label columns: {}); ingest with `--label-col {name}` to filter on it",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        };
        Ok((i, columns[i].categories.clone()))
    }

    /// The code of `value` among `categories` of column `col`.
    fn code(field: &str, col: &str, categories: &[String], value: &str) -> anyhow::Result<u32> {
        categories
            .iter()
            .position(|c| c == value)
            .map(|p| p as u32)
            .ok_or_else(|| {
                anyhow!(
                    "{field}: no cell has {col} = {value:?} (values in the corpus: {})",
                    categories.join(", ")
                )
            })
    }

    /// Cell `cell`'s code in column `col` (`MISSING_LABEL` when it has none).
    fn label(&self, cell: u64, col: usize) -> u32 {
        self.index.labels[cell as usize * self.index.columns + col]
    }

    /// The cells whose label in every condition's column is one of its codes, ascending.
    fn cells_matching(&self, conditions: &[(usize, Vec<u32>)]) -> Vec<u64> {
        (0..self.index.names.len() as u64)
            .filter(|&c| {
                conditions.iter().all(|(col, codes)| {
                    let v = self.label(c, *col);
                    v != MISSING_LABEL && codes.contains(&v)
                })
            })
            .collect()
    }
}

/// The screened cells: those matching `cells.filter`, sampled down to `cells.max_cells` by the seed.
fn select_cells(spec: &ScreenSpec, labels: &Labels<'_>) -> anyhow::Result<Vec<u64>> {
    let mut conditions = Vec::new();
    for (name, values) in &spec.cells.filter {
        let field = format!("cells.filter.{name}");
        let (col, categories) = labels.column(&field, name)?;
        let codes = values
            .values()
            .iter()
            .map(|v| Labels::code(&field, name, &categories, v))
            .collect::<anyhow::Result<Vec<u32>>>()?;
        conditions.push((col, codes));
    }
    let matching = labels.cells_matching(&conditions);
    if matching.is_empty() {
        bail!("cells.filter: no cell matches every condition");
    }
    let cap = spec.cells.max_cells.unwrap_or(u64::MAX) as usize;
    Ok(SplitMix::new(spec.seed, "cells").sample(matching, cap))
}

/// What a screen perturbs, by vocabulary id: single genes (ascending), named sets, the anchor of the
/// pairs, and the random null genes drawn by the seed.
#[derive(Default)]
struct SelectedGenes {
    singles: Vec<u32>,
    sets: Vec<(String, Vec<u32>)>,
    anchor: Option<u32>,
    null: Vec<u32>,
    /// Random sets (named `null-set-<size>-<i>`), the null of the screened sets.
    null_sets: Vec<(String, Vec<u32>)>,
}

fn select_genes(
    spec: &ScreenSpec,
    spec_dir: &Path,
    vocabulary: &[String],
) -> anyhow::Result<SelectedGenes> {
    let position: HashMap<&str, u32> = vocabulary
        .iter()
        .enumerate()
        .map(|(i, g)| (g.as_str(), i as u32))
        .collect();
    let named = |names: &[String], field: &str| -> anyhow::Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let id = position.get(name.as_str()).ok_or_else(|| {
                anyhow!(
                    "{field}: gene {name:?} is not in the checkpoint's vocabulary of {} genes",
                    vocabulary.len()
                )
            })?;
            ids.push(*id);
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    };
    let singles_of = |selection: &GeneSelection, field: &str| -> anyhow::Result<Vec<u32>> {
        match selection {
            GeneSelection::Keyword(k) if k == "all" => Ok((0..vocabulary.len() as u32).collect()),
            GeneSelection::Keyword(k) => bail!(
                "{field} = {k:?}: expected \"all\", a list of gene names, or {{ file = \"genes.txt\" }}"
            ),
            GeneSelection::List(list) if list.is_empty() => {
                bail!("{field} = []: the gene list is empty")
            }
            GeneSelection::List(list) => named(list, field),
            GeneSelection::File(file) => {
                let path = spec_dir.join(&file.file);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("{field}.file: cannot read {}", path.display()))?;
                let names: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from)
                    .collect();
                if names.is_empty() {
                    bail!("{field}.file: {} lists no genes", path.display());
                }
                named(&names, &format!("{field}.file {}", path.display()))
            }
            GeneSelection::Sets(_) => bail!("{field} cannot hold sets"),
            GeneSelection::Guided(_) => bail!("{field} cannot hold an attribution ranking"),
        }
    };
    let (mut singles, sets) = match &spec.genes {
        GeneSelection::Sets(sets) => {
            let singles = match &sets.singles {
                Some(selection) => singles_of(selection, "genes.singles")?,
                None => Vec::new(),
            };
            let mut resolved = Vec::with_capacity(sets.sets.len());
            for (name, genes) in &sets.sets {
                let field = format!("genes.sets.{name}");
                let ids = named(genes, &field)?;
                if ids.len() < 2 {
                    bail!("{field} names one gene twice: a set needs at least 2 different genes");
                }
                if name.starts_with("null-set-") {
                    bail!("{field}: names starting with \"null-set-\" are the random sets of the null");
                }
                if vocabulary.iter().any(|g| g == name) {
                    bail!("{field}: the set is named like the vocabulary gene {name:?}; give it another name");
                }
                resolved.push((name.clone(), ids));
            }
            (singles, resolved)
        }
        selection => (singles_of(selection, "genes")?, Vec::new()),
    };
    let anchor = match &spec.combinations {
        Some(c) => {
            let id = named(std::slice::from_ref(&c.anchor), "combinations.anchor")?[0];
            // The anchor alone is what its pairs are compared with, so it is screened too.
            if let Err(at) = singles.binary_search(&id) {
                singles.insert(at, id);
            }
            Some(id)
        }
        None => None,
    };
    if spec.null.genes as usize > vocabulary.len() {
        bail!(
            "null.genes = {}: the vocabulary has only {} genes",
            spec.null.genes,
            vocabulary.len()
        );
    }
    let null = SplitMix::new(spec.seed, "null genes").sample(
        (0..vocabulary.len() as u32).collect(),
        spec.null.genes as usize,
    );
    // Random sets of every screened set's size: a set of k genes is compared with k random genes
    // perturbed together, not with one.
    let mut sizes: Vec<usize> = sets.iter().map(|(_, genes)| genes.len()).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut null_sets = Vec::new();
    for size in sizes {
        if size > vocabulary.len() {
            continue;
        }
        let mut rng = SplitMix::new(spec.seed, &format!("null sets of {size}"));
        for i in 0..spec.null.sets {
            let genes = rng.sample((0..vocabulary.len() as u32).collect(), size);
            null_sets.push((format!("null-set-{size}-{i}"), genes));
        }
    }
    Ok(SelectedGenes {
        singles,
        sets,
        anchor,
        null,
        null_sets,
    })
}

/// The units' targets: single genes (screened and null, ascending, each once), then the sets, then the
/// anchor paired with every single gene but itself (null genes included: their pairs are the
/// interaction's null).
fn build_targets(vocabulary: &[String], selected: SelectedGenes) -> Vec<Target> {
    let mut singles: Vec<u32> = selected
        .singles
        .iter()
        .chain(&selected.null)
        .copied()
        .collect();
    singles.sort_unstable();
    singles.dedup();
    let screened = |g: &u32| selected.singles.binary_search(g).is_ok();
    let null = |g: &u32| selected.null.binary_search(g).is_ok();
    let mut targets: Vec<Target> = singles
        .iter()
        .map(|g| Target {
            name: vocabulary[*g as usize].clone(),
            kind: TargetKind::Gene,
            genes: vec![*g],
            screened: screened(g),
            null: null(g),
        })
        .collect();
    targets.extend(selected.sets.into_iter().map(|(name, genes)| Target {
        name,
        kind: TargetKind::Set,
        genes,
        screened: true,
        null: false,
    }));
    targets.extend(selected.null_sets.into_iter().map(|(name, genes)| Target {
        name,
        kind: TargetKind::Set,
        genes,
        screened: false,
        null: true,
    }));
    if let Some(anchor) = selected.anchor {
        targets.extend(singles.iter().filter(|&&g| g != anchor).map(|g| Target {
            name: format!(
                "{}+{}",
                vocabulary[anchor as usize], vocabulary[*g as usize]
            ),
            kind: TargetKind::Pair,
            genes: vec![anchor, *g],
            screened: screened(g),
            null: null(g),
        }));
    }
    targets
}

/// `layer` as a block count (0 = token embeddings, `n_layers` = the last layer); negative counts from
/// the end.
fn resolve_layer(layer: i32, n_layers: usize) -> anyhow::Result<u32> {
    let n = n_layers as i64;
    let resolved = if layer < 0 {
        n + 1 + i64::from(layer)
    } else {
        i64::from(layer)
    };
    if !(0..=n).contains(&resolved) {
        bail!(
            "layer = {layer}: the model has {n} layers; choose 0 (token embeddings) to {n} (the last), or -1 (the last) to -{} (token embeddings)",
            n + 1
        );
    }
    Ok(resolved as u32)
}

/// The strata of `goal.match_column`: its categories, every screened cell's stratum, and the column.
struct Strata {
    names: Vec<String>,
    cells: Vec<u32>,
    column: usize,
    column_name: String,
}

/// The screened cells' strata when the goal matches on a column (every screened cell must have a value).
fn match_strata(
    spec: &ScreenSpec,
    labels: &Labels<'_>,
    cells: &[u64],
) -> anyhow::Result<Option<Strata>> {
    let Some(name) = spec.goal.as_ref().and_then(|g| g.match_column.as_ref()) else {
        return Ok(None);
    };
    let (column, names) = labels.column("goal.match_column", name)?;
    let mut of_cells = Vec::with_capacity(cells.len());
    for &c in cells {
        let code = labels.label(c, column);
        if code == MISSING_LABEL {
            bail!(
                "goal.match_column: cell {:?} has no {name} value; filter such cells out (cells.filter) or drop match_column",
                labels.index.names[c as usize]
            );
        }
        of_cells.push(code);
    }
    Ok(Some(Strata {
        names,
        cells: of_cells,
        column,
        column_name: name.clone(),
    }))
}

/// The cells of the goal state and its alternatives: up to `max_cells` each (per stratum when matched;
/// every stratum with screened cells needs some).
fn goal_states(
    seed: u64,
    goal: &GoalSpec,
    labels: &Labels<'_>,
    strata: Option<&Strata>,
) -> anyhow::Result<Vec<StateCells>> {
    let (col, categories) = labels.column("goal.column", &goal.column)?;
    let mut states = Vec::new();
    for (i, value) in std::iter::once(&goal.value)
        .chain(&goal.alternatives)
        .enumerate()
    {
        let field = if i == 0 {
            "goal.value".to_string()
        } else {
            format!("goal.alternatives[{}]", i - 1)
        };
        let c = Labels::code(&field, &goal.column, &categories, value)?;
        let members = labels.cells_matching(&[(col, vec![c])]);
        if members.is_empty() {
            bail!(
                "{field}: no cell has {} = {value:?} (it is a category of the column, but no cell carries it)",
                goal.column
            );
        }
        let mut rng = SplitMix::new(seed, &format!("state {value}"));
        let state = match strata {
            None => StateCells {
                name: value.clone(),
                cells: rng.sample(members, goal.max_cells as usize),
                strata: Vec::new(),
            },
            Some(strata) => {
                let mut pairs = Vec::new();
                for (stratum, stratum_name) in strata.names.iter().enumerate() {
                    let of_stratum: Vec<u64> = members
                        .iter()
                        .copied()
                        .filter(|&m| labels.label(m, strata.column) == stratum as u32)
                        .collect();
                    let screened = strata
                        .cells
                        .iter()
                        .filter(|&&s| s == stratum as u32)
                        .count();
                    if screened > 0 && of_stratum.is_empty() {
                        bail!(
                            "{field}: no cell has {} = {value:?} and {} = {stratum_name:?}, but {screened} screened cells are {stratum_name:?}; leave them out (cells.filter) or drop goal.match_column",
                            goal.column,
                            strata.column_name
                        );
                    }
                    for m in rng.sample(of_stratum, goal.max_cells as usize) {
                        pairs.push((m, stratum as u32));
                    }
                }
                pairs.sort_unstable();
                StateCells {
                    name: value.clone(),
                    cells: pairs.iter().map(|p| p.0).collect(),
                    strata: pairs.iter().map(|p| p.1).collect(),
                }
            }
        };
        states.push(state);
    }
    Ok(states)
}

/// The (unit target index, unit cell index) records of `unit`: the cells each target applies to,
/// target-major.
pub fn applicable_records(
    plan: &ScreenPlan,
    bins: &HashMap<u64, Vec<u8>>,
    unit: usize,
) -> Vec<(usize, usize)> {
    let span = plan.unit(unit);
    let mut records = Vec::new();
    for (k, target) in plan.targets[span.targets].iter().enumerate() {
        for (ci, cell) in plan.cells[span.cells.clone()].iter().enumerate() {
            if plan.record_applies(target, span.cells.start + ci, &bins[cell]) {
                records.push((k, ci));
            }
        }
    }
    records
}

/// Opens the store location of a screen.
pub fn open_location(location: &str, s3: &S3Options) -> anyhow::Result<Store> {
    Store::open(location, s3).with_context(|| format!("cannot open the screen location {location}"))
}

/// Writes the plan to the screen's location; returns its blake3.
pub fn store_plan(plan: &ScreenPlan, store: &Store) -> anyhow::Result<String> {
    // Workers refuse a plan that fails this check, so one is never stored.
    plan.check()
        .map_err(|e| anyhow::anyhow!("the resolved screen plan is inconsistent (a bug): {e}"))?;
    let bytes = serde_json::to_vec_pretty(plan)?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    store.put(PLAN_FILE, bytes.into())?;
    Ok(hash)
}

/// Reads the plan at a screen's location and checks it is the one submitted.
pub fn load_plan(store: &Store, expected_blake3: &str) -> anyhow::Result<ScreenPlan> {
    let bytes = store.get(PLAN_FILE)?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    if !expected_blake3.is_empty() && hash != expected_blake3 {
        bail!(
            "{}/{PLAN_FILE} has blake3 {hash}, the screen was submitted with {expected_blake3} (replaced since)",
            store.url().trim_end_matches('/')
        );
    }
    let plan: ScreenPlan = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}/{PLAN_FILE} is not a screen plan", store.url()))?;
    if plan.format != PLAN_FORMAT {
        bail!(
            "{PLAN_FILE} is format {:?}, expected {PLAN_FORMAT:?}",
            plan.format
        );
    }
    plan.check().map_err(|e| {
        anyhow::anyhow!(
            "{}/{PLAN_FILE} is not a consistent screen plan: {e}",
            store.url().trim_end_matches('/')
        )
    })?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellfleet_shared::screen::Readout;

    #[test]
    fn the_example_screen_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configs/screen-kang.toml");
        let spec = read_spec(&path).unwrap();
        assert_eq!(spec.genes, GeneSelection::Keyword("all".into()));
        assert_eq!(spec.readout, Readout::Expected);
        let goal = spec.goal.unwrap();
        assert_eq!(goal.match_column.as_deref(), Some("cell_type"));
        assert_eq!(spec.cells.filter["condition"].values(), vec!["stimulated"]);
    }

    #[test]
    fn spec_errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "checkpoint = \"c\"\ncorpus = \"k\"\nout = \"o\"\ngenes = \"some\"\n",
        )
        .unwrap();
        let err = read_spec(&path).unwrap_err().to_string();
        assert!(
            err.contains("s.toml") && err.contains("genes = \"some\""),
            "{err}"
        );
        std::fs::write(&path, "checkpoint = \"c\"\ncorpus = \"k\"\nout = \"o\"\ngenes = \"all\"\n[execution]\nbatch = 0\n").unwrap();
        let err = read_spec(&path).unwrap_err().to_string();
        assert!(err.contains("execution.batch = 0"), "{err}");
    }

    #[test]
    fn readouts_sets_and_combinations_parse_and_old_names_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        let head = "checkpoint = \"c\"\ncorpus = \"k\"\nout = \"o\"\n";
        std::fs::write(
            &path,
            format!("{head}genes = \"all\"\nembedding = \"hidden\"\n"),
        )
        .unwrap();
        assert_eq!(read_spec(&path).unwrap().readout, Readout::Mean);
        std::fs::write(
            &path,
            format!(
                "{head}readout = \"cls\"\nlayer = 1\ngenes = {{ singles = [\"A\"], sets = {{ core = [\"B\", \"C\"] }} }}\n[combinations]\nanchor = \"A\"\n"
            ),
        )
        .unwrap();
        let spec = read_spec(&path).unwrap();
        assert_eq!((spec.readout, spec.layer), (Readout::Cls, 1));
        let GeneSelection::Sets(sets) = &spec.genes else {
            panic!("{:?}", spec.genes)
        };
        assert_eq!(sets.sets["core"], vec!["B", "C"]);
        assert_eq!(spec.combinations.unwrap().anchor, "A");
        for (body, message) in [
            (
                "genes = \"all\"\nlayer = 1\n",
                "layer = 1: the expected-expression readout",
            ),
            (
                "genes = { sets = { solo = [\"A\"] } }\n",
                "genes.sets.solo has 1 gene",
            ),
            ("genes = { sets = {} }\n", "genes.sets is empty"),
            (
                "genes = { sets = { \"a+b\" = [\"A\", \"B\"] } }\n",
                "holds '+'",
            ),
        ] {
            std::fs::write(&path, format!("{head}{body}")).unwrap();
            let err = read_spec(&path).unwrap_err().to_string();
            assert!(err.contains(message), "{body}: {err}");
        }
        assert_eq!(resolve_layer(-1, 2).unwrap(), 2);
        assert_eq!(resolve_layer(-3, 2).unwrap(), 0);
        let err = resolve_layer(3, 2).unwrap_err().to_string();
        assert!(err.contains("layer = 3: the model has 2 layers"), "{err}");
    }

    #[test]
    fn samples_are_seeded_sorted_and_capped() {
        let items: Vec<u64> = (0..1000).collect();
        let a = SplitMix::new(7, "cells").sample(items.clone(), 10);
        assert_eq!(a, SplitMix::new(7, "cells").sample(items.clone(), 10));
        assert_ne!(a, SplitMix::new(8, "cells").sample(items.clone(), 10));
        assert_ne!(a, SplitMix::new(7, "genes").sample(items.clone(), 10));
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.len() == 10);
        assert_eq!(SplitMix::new(7, "cells").sample(items.clone(), 5000), items);
    }
}
