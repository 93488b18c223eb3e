//! What the engines run: a layer, its differentiable carry and its keyword arguments.

use candle_core::Tensor;

/// The keyword arguments of one checkpointable method, owned so that an engine can keep them
/// until the backward pass re-runs the layer.
///
/// `#[checkpointable]` generates one record per annotated method. `()` serves layers whose only
/// argument is the carry.
///
/// A keyword tensor may itself depend on trainable parameters (a learned attention bias): its
/// gradient reaches them through recomputation. The contributions are then summed segment by
/// segment instead of once, so that those parameters' gradients equal the plain graph's up to
/// rounding, while every other gradient stays exact.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be kept as the keyword arguments of a checkpointed layer",
    label = "not a keyword-argument record",
    note = "pass the record that `#[checkpointable]` generated for the method (`<Layer>Kwargs`), \
            or implement `checkpoint_runtime::Kwargs` for an owned, `Send + Sync + 'static` type"
)]
pub trait Kwargs: Send + Sync + 'static {
    /// The method these arguments belong to, for error messages.
    const METHOD: &'static str = "forward";
}

impl Kwargs for () {}

/// A layer that an engine can run now and re-run during backward.
///
/// The one entry point: the layer (`self`, resolved at compile time), the carry (the tensor that
/// flows from layer to layer and receives a gradient) and the keyword record. Implementations must
/// be deterministic functions of those three, since recomputation must reproduce the forward.
///
/// The engine keeps a clone of each layer until backward; candle tensors are reference-counted,
/// so a clone shares the weights (and their gradients) with the original.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a checkpointable layer",
    label = "the engine cannot resolve this to a layer it can re-run in backward",
    note = "annotate the layer's struct and its impl with `#[checkpointable]`; closures and \
            function pointers cannot be checkpointed, because recomputation needs the layer \
            itself (`self`), known at compile time"
)]
pub trait Layer<K: Kwargs = ()>: Clone + Send + Sync + 'static {
    /// Runs the layer on `carry` with keyword arguments `kwargs`.
    fn forward_checkpointed(&self, carry: &Tensor, kwargs: &K) -> candle_core::Result<Tensor>;
}

/// A human-readable name for layer `index` of a stack, used in errors.
pub(crate) fn describe<L, K: Kwargs>(index: usize) -> String {
    let name = short_type_name(std::any::type_name::<L>());
    // A layer with several carries or outputs runs wrapped (`outputs::Packed<L>`): name `L`.
    let name = name
        .strip_prefix("Packed<")
        .and_then(|inner| inner.strip_suffix('>'))
        .map_or(name, short_type_name);
    format!("layer {index} (`{name}::{}`)", K::METHOD)
}

/// `my_crate::model::DecoderLayer` → `DecoderLayer`, keeping generic arguments readable.
fn short_type_name(full: &str) -> &str {
    let head = full.split('<').next().unwrap_or(full);
    let start = head.rfind("::").map_or(0, |i| i + 2);
    &full[start..]
}

#[cfg(test)]
mod tests {
    use super::short_type_name;

    #[test]
    fn short_type_name_strips_the_module_path_only() {
        assert_eq!(short_type_name("a::b::Decoder"), "Decoder");
        assert_eq!(short_type_name("a::Wrap<b::C>"), "Wrap<b::C>");
        assert_eq!(short_type_name("Plain"), "Plain");
    }
}
