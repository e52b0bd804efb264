// common.wgsl: helpers shared by every op family. Rust prepends this file to
// each family's module, so it holds no entry points and no bindings.

// Finite stand-in for -inf: WGSL forbids infinite constants and
// implementations may assume no Inf/NaN ever occurs.
const NEG_BIG: f32 = -1.0e30;

// Flat workgroup index of a grid folded into x*y (see plan::grid_1d).
fn flat_wg(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}

// tanh is NaN for large |x| on some backends (Metal); clamp first.
fn tanh_safe(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}

// Logistic sigmoid without exp overflow.
fn sigmoid(x: f32) -> f32 {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}
