use checkpoint_runtime::checkpointable;

#[checkpointable]
union Bits {
    f: f32,
    u: u32,
}

fn main() {}
