//! LoRA (low-rank adaptation), as PEFT computes it: a frozen base projection plus a trainable
//! low-rank update, `y = x Wᵀ + b + (x Aᵀ) Bᵀ · alpha / r`, with `A` `(r, in)` and `B` `(out, r)`.
//!
//! [`LoraConfig`] says which projections get an adapter ([`Target`]), their rank and alpha, and
//! the seed of `A`'s initialisation. A fresh adapter starts as PEFT's does: `A` Kaiming-uniform
//! (`kaiming_uniform_(a = √5)`, i.e. uniform in ±1/√in), `B` zero, so the adapted model starts
//! exactly at the base model. No dropout (PEFT's `lora_dropout: 0`).
//!
//! The weights are requested from the [`VarBuilder`] under PEFT's module names without the
//! `base_model.model.` prefix (`model.layers.N.self_attn.q_proj.lora_A.weight`); the loader
//! ([`crate::loader::load_lora`]) makes only these trainable and hands the model its base weights
//! as constants, so they get no gradient. [`crate::adapter`] reads and writes PEFT adapter
//! directories.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::config::Config;
use crate::error::Error;
use crate::nn::linear;

/// A projection that can carry an adapter: PEFT's `target_modules` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl Target {
    /// Every target, in the order of a decoder layer.
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    /// The module name (`q_proj`, ...), as in the checkpoint and in `target_modules`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The target called `name`.
    ///
    /// # Errors
    /// [`Error::Data`] naming the unknown module and listing the known ones.
    pub fn parse(name: &str) -> crate::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                Error::Data(format!(
                    "unknown LoRA target `{name}`: a Qwen2 layer's projections are {}",
                    Self::ALL.map(Target::name).join(", ")
                ))
            })
    }

    /// A comma-separated list (`q_proj,v_proj`), sorted, without duplicates.
    ///
    /// # Errors
    /// An unknown name (see [`Target::parse`]), or an empty list.
    pub fn parse_list(list: &str) -> crate::Result<Vec<Self>> {
        let mut targets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Self::parse)
            .collect::<crate::Result<Vec<_>>>()?;
        targets.sort_unstable();
        targets.dedup();
        if targets.is_empty() {
            return Err(Error::Data(format!(
                "--lora-targets `{list}` names no projection: give some of {}",
                Self::ALL.map(Target::name).join(",")
            )));
        }
        Ok(targets)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which projections get an adapter, and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank of the update (rows of `A`, columns of `B`).
    pub r: usize,
    /// The update is scaled by `alpha / r`.
    pub alpha: f64,
    /// The adapted projections, sorted, without duplicates.
    pub targets: Vec<Target>,
    /// Seed of `A`'s initialisation (a fresh adapter only).
    pub seed: u64,
}

impl LoraConfig {
    /// A validated configuration; `targets` is sorted and deduplicated.
    ///
    /// # Errors
    /// [`Error::Data`] for `r = 0`, a non-finite or non-positive `alpha`, or no targets.
    pub fn new(r: usize, alpha: f64, mut targets: Vec<Target>, seed: u64) -> crate::Result<Self> {
        if r == 0 {
            return Err(Error::Data(
                "--lora-r 0: the rank of a LoRA update is at least 1 (8 or 16 are usual)".into(),
            ));
        }
        if !alpha.is_finite() || alpha <= 0.0 {
            return Err(Error::Data(format!(
                "--lora-alpha {alpha}: the scale alpha / r must be positive (alpha = 2·r is usual)"
            )));
        }
        targets.sort_unstable();
        targets.dedup();
        if targets.is_empty() {
            return Err(Error::Data(
                "LoRA without targets: give --lora-targets, e.g. q_proj,v_proj".into(),
            ));
        }
        Ok(Self {
            r,
            alpha,
            targets,
            seed,
        })
    }

    /// `alpha / r`, the factor of the update.
    #[must_use]
    pub fn scale(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let r = self.r as f64;
        self.alpha / r
    }

    /// Whether `target` gets an adapter.
    #[must_use]
    pub fn adapts(&self, target: Target) -> bool {
        self.targets.contains(&target)
    }
}

/// Whether `name` (a parameter name) is a LoRA matrix rather than a base weight.
#[must_use]
pub fn is_lora_name(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// The low-rank update of one projection.
#[derive(Debug, Clone)]
struct Update {
    a: Linear,
    b: Linear,
    scale: f64,
}

/// A linear projection with an optional LoRA update; without one it is exactly the base
/// `Linear`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    update: Option<Update>,
}

impl LoraLinear {
    /// `vb.weight` `(out, in)` (and `vb.bias` when `bias`); when `lora` adapts `target`, also
    /// `vb.lora_A.weight` `(r, in)` (Kaiming-uniform when created) and `vb.lora_B.weight`
    /// `(out, r)` (zeros when created).
    ///
    /// # Errors
    /// If the builder lacks a tensor or one is misshapen.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        target: Target,
        cfg: &Config,
        lora: Option<&LoraConfig>,
        vb: &VarBuilder<'_>,
    ) -> Result<Self> {
        let base = linear(in_dim, out_dim, bias, cfg, vb)?;
        let update = match lora {
            Some(lora) if lora.adapts(target) => {
                // PEFT: kaiming_uniform_(A, a=√5): gain √(2/(1+5)), bound gain·√(3/in) = 1/√in.
                #[allow(clippy::cast_precision_loss)]
                let bound = 1.0 / (in_dim as f64).sqrt();
                let a = vb.pp("lora_A").get_with_hints(
                    (lora.r, in_dim),
                    "weight",
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )?;
                let b = vb.pp("lora_B").get_with_hints(
                    (out_dim, lora.r),
                    "weight",
                    Init::Const(0.0),
                )?;
                Some(Update {
                    a: Linear::new(a, None),
                    b: Linear::new(b, None),
                    scale: lora.scale(),
                })
            }
            _ => None,
        };
        Ok(Self { base, update })
    }
}

impl Module for LoraLinear {
    /// `(…, in)` → `(…, out)`: `base(x) + B(A(x)) · scale`, PEFT's order of operations.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.base.forward(xs)?; // (…, out)
        match &self.update {
            None => Ok(ys),
            Some(u) => {
                let low = u.a.forward(xs)?; // (…, r)
                ys + (u.b.forward(&low)? * u.scale)? // (…, out)
            }
        }
    }
}
