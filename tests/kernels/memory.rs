//! The GPU memory counter that `bench train` reports: every buffer and
//! texture is counted once while any handle to it lives.

use wgtune::gpu::{Context, ContextOptions, DType, Tensor, TexMatrix};

#[test]
fn gpu_memory_counter_counts_buffers_and_textures_once() {
    let _shared = gpu!();
    // A context of its own: the shared one's counter moves with the tests
    // that run beside this one.
    let own = Context::new(&ContextOptions::default()).unwrap();
    let ctx = &own;
    let m = &ctx.memory;
    let before = m.live();
    assert_eq!(before, 0);
    let t = Tensor::zeros(ctx, &[3, 5], DType::F32, "counted").unwrap();
    // 15 floats, rounded up to 16 bytes.
    assert_eq!(m.live() - before, 64);
    let view = t.view(5, &[2, 5], "rows 1..3").unwrap();
    let reshaped = t.reshape(&[5, 3]).unwrap();
    assert_eq!(m.live() - before, 64, "views and reshapes share the buffer");
    drop(t);
    drop(reshaped);
    assert_eq!(m.live() - before, 64, "a live view keeps the buffer");
    drop(view);
    assert_eq!(m.live(), before);
    let up = Tensor::from_f32(ctx, &[1.0; 7], &[7], "uploaded").unwrap();
    assert_eq!(m.live() - before, 32);
    drop(up);
    // A 10 x 9 matrix packs into 3 rgba32 texels per row, 16 bytes each.
    let x = TexMatrix::new(ctx, 10, 9, "packed").unwrap();
    assert_eq!(m.live() - before, 10 * 3 * 16);
    assert!(m.peak() >= m.live());
    drop(x);
    assert_eq!(m.live(), before);
}
