use checkpoint_runtime::checkpointable;

#[checkpointable]
#[derive(Clone)]
enum Layer {
    Attention,
    Mlp,
}

fn main() {}
