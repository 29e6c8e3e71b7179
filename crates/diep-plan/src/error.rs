//! The errors of plans and selection.

use std::path::PathBuf;

/// Everything that can go wrong choosing experts or reading and checking a plan.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The ratio is not strictly between 0 and 1.
    #[error("--ratio must be strictly between 0 and 1 (the fraction of routed experts removed), got {ratio}")]
    Ratio {
        /// The ratio given.
        ratio: f64,
    },
    /// An allocation name that is neither `uniform` nor `global`.
    #[error("unknown allocation `{name}`; expected `uniform` or `global`")]
    UnknownAllocation {
        /// The name given.
        name: String,
    },
    /// A uniform allocation would leave a layer below its floor.
    #[error(
        "layer {layer}: removing {remove} of {experts} experts leaves fewer than the floor of {floor} \
         (max(num_experts_per_tok, --min-experts)); lower --ratio"
    )]
    BelowFloor {
        /// The decoder layer.
        layer: usize,
        /// Experts the ratio removes from it.
        remove: usize,
        /// Experts it has.
        experts: usize,
        /// The floor.
        floor: usize,
    },
    /// A global allocation cannot remove its budget while every layer (or routing group) keeps
    /// its minimum.
    #[error(
        "removing {remove} of {total} experts is impossible while every {} keeps at least {min_per_group} \
         (top_k {top_k}{}, floor {floor}; at most {removable} can go); lower --ratio or --min-experts",
        if *n_group > 1 { "routing group" } else { "layer" },
        topk_group.map(|t| format!(", topk_group {t}, {n_group} groups")).unwrap_or_default()
    )]
    OverBudget {
        /// Experts the budget removes (a multiple of `n_group`).
        remove: usize,
        /// Routed experts in all layers.
        total: usize,
        /// Routing groups per layer (1 without groups).
        n_group: usize,
        /// The fewest experts a group (a layer, without groups) may keep.
        min_per_group: usize,
        /// The most experts that can go.
        removable: usize,
        /// `num_experts_per_tok`.
        top_k: usize,
        /// `topk_group`, for group-limited routers.
        topk_group: Option<usize>,
        /// The floor.
        floor: usize,
    },
    /// A layer's experts cannot be split into the router's groups.
    #[error("layer {layer}: {experts} experts cannot be split into the router's {n_group} groups (n_group)")]
    GroupSplit {
        /// The decoder layer.
        layer: usize,
        /// Experts it has.
        experts: usize,
        /// `n_group`.
        n_group: usize,
    },
    /// A uniform removal count is not a multiple of the router's group count.
    #[error(
        "layer {layer}: removing {remove} of {experts} experts cannot be split evenly over the router's {n_group} \
         groups (n_group); choose a ratio that removes a multiple of {n_group} experts per layer"
    )]
    UnevenGroups {
        /// The decoder layer.
        layer: usize,
        /// Experts the ratio removes from it.
        remove: usize,
        /// Experts it has.
        experts: usize,
        /// `n_group`.
        n_group: usize,
    },
    /// A uniform removal would leave a routing group below its minimum.
    #[error(
        "layer {layer}: removing {remove} of {experts} experts leaves {left} per routing group, fewer than the {min} \
         group-limited routing needs (top_k {top_k}, topk_group {topk_group}, floor {floor}); lower the ratio"
    )]
    GroupMinimum {
        /// The decoder layer.
        layer: usize,
        /// Experts the ratio removes from it.
        remove: usize,
        /// Experts it has.
        experts: usize,
        /// Experts each group would keep.
        left: usize,
        /// The per-group minimum.
        min: usize,
        /// `num_experts_per_tok`.
        top_k: usize,
        /// `topk_group`.
        topk_group: usize,
        /// The floor.
        floor: usize,
    },
    /// The plan does not fit the model (model type, layers, expert ids, groups, counts...).
    #[error("pruning plan: {0}")]
    Invalid(String),
    /// A plan file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The plan file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A plan file is not a valid plan.
    #[error("{}: invalid pruning plan: {reason}", path.display())]
    Parse {
        /// The plan file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}
