// activation.wgsl: the elementwise ops of a transformer block, forward and
// backward: the gated MLP middle act(gate) * up (SwiGLU for Llama, GeGLU
// with the tanh GELU for Gemma: the GATE override), GELU in its tanh form
// (GPT-2 "gelu_new"),
// tanh (the prefix-tuning projection MLP) and the residual add. Backward entries accumulate (+=) into their gradients, so
// residual fan-in and a gradient shared by several consumers need no extra code.
//
// Every tensor is a flat array of p.n floats; shapes matter only to the Rust
// wrapper. Each op has two entry points with the same math:
//   <op>_forward, <op>_backward        one vec4 per invocation; used when
//                                      n % 4 == 0 (every real model width);
//   <op>_forward_x1, <op>_backward_x1  scalar bindings, 4 consecutive elements
//                                      per invocation with a guarded tail; any n.
// Two are needed because a binding covers exactly n floats, so an
// array<vec4<f32>> view cannot reach the last n % 4 of them. The vec4 form is
// the fast one: lavapipe turns every storage load into a loop over the SIMD
// lanes, so one vec4 load costs about what one scalar load does.
// Geometry of every entry: a 1-D grid of ceil(ceil(n/4) / WG) workgroups,
// folded into x*y by plan::grid_1d when it exceeds the per-dimension cap.

struct Params {
    n: u32,   // elements per tensor
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;
override GATE: u32 = 0u; // swiglu_* entries: 0 silu (SwiGLU), 1 tanh-GELU (GeGLU)

// This invocation's group of 4 elements (its vec4 slot).
fn slot(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_wg(wg, nwg) * WG + lid;
}

// --- math shared by the vec4 and x1 entries --------------------------------

const GELU_K0: f32 = 0.7978845608028654; // sqrt(2/pi)
const GELU_K1: f32 = 0.044715;

// Lane-wise common.wgsl helpers: the overflow-free sigmoid (exp(-g) overflows
// for g < -88 in the textbook form) and the clamped tanh (NaN on Metal).
fn sigmoid4(x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(sigmoid(x.x), sigmoid(x.y), sigmoid(x.z), sigmoid(x.w));
}
fn tanh_safe4(x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(tanh_safe(x.x), tanh_safe(x.y), tanh_safe(x.z), tanh_safe(x.w));
}

// out = act(gate) * up: silu(gate) = gate * sigmoid(gate), or gelu4(gate).
fn swiglu4(g: vec4<f32>, u: vec4<f32>) -> vec4<f32> {
    if (GATE == 1u) { return gelu4(g) * u; }
    return g * sigmoid4(g) * u;
}

struct Grad2 {
    dgate: vec4<f32>,
    dup: vec4<f32>,
}

// Differentiates out = g * s(g) * u with s = sigmoid:
// d/dg = u * (s + g*s*(1-s)) = u * s * (1 + g*(1-s)); d/du = g * s;
// GeGLU: d/dg = u * gelu'(g), d/du = gelu(g).
fn swiglu_grad4(dout: vec4<f32>, g: vec4<f32>, u: vec4<f32>) -> Grad2 {
    if (GATE == 1u) { return Grad2(dout * u * gelu_grad4(g), dout * gelu4(g)); }
    let s = sigmoid4(g);
    return Grad2(dout * u * s * (1.0 + g * (1.0 - s)), dout * g * s);
}

// out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
fn gelu4(x: vec4<f32>) -> vec4<f32> {
    let t = tanh_safe4(GELU_K0 * x * (1.0 + GELU_K1 * x * x));
    return 0.5 * x * (1.0 + t);
}

// Differentiates gelu4: with u = K0*(x + K1*x^3) and t = tanh(u),
// d/dx = 0.5*(1+t) + 0.5*x*(1-t^2) * K0*(1 + 3*K1*x^2).
fn gelu_grad4(x: vec4<f32>) -> vec4<f32> {
    let x2 = x * x;
    let t = tanh_safe4(GELU_K0 * x * (1.0 + GELU_K1 * x2));
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * x2);
}

// ---------------------------------------------------------------------------
// swiglu_forward: out = silu(gate) * up, the Llama MLP's
// down(silu(gate_proj(x)) * up_proj(x)) middle. One vec4 per invocation.
@group(0) @binding(1) var<storage, read_write> sw_out: array<vec4<f32>>; // (N, F) as N*F/4 vec4
@group(0) @binding(2) var<storage, read> sw_gate: array<vec4<f32>>;      // (N, F) as N*F/4 vec4
@group(0) @binding(3) var<storage, read> sw_up: array<vec4<f32>>;        // (N, F) as N*F/4 vec4

@compute @workgroup_size(WG)
fn swiglu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    // The last workgroup is ragged. No entry here uses barriers, so its idle
    // invocations may return early.
    if (i >= p.n / 4u) { return; }
    sw_out[i] = swiglu4(sw_gate[i], sw_up[i]);
}

// swiglu_forward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> swx_out: array<f32>; // (N, F)
@group(0) @binding(2) var<storage, read> swx_gate: array<f32>;      // (N, F)
@group(0) @binding(3) var<storage, read> swx_up: array<f32>;        // (N, F)

@compute @workgroup_size(WG)
fn swiglu_forward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    if (i0 >= p.n) { return; }
    // Lanes past n stay 0 and are never stored.
    var g = vec4<f32>(0.0);
    var u = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) {
            g[k] = swx_gate[i0 + k];
            u[k] = swx_up[i0 + k];
        }
    }
    let o = swiglu4(g, u);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) { swx_out[i0 + k] = o[k]; }
    }
}

// ---------------------------------------------------------------------------
// swiglu_backward: differentiates out = silu(gate) * up;
// dgate += dout * up * s * (1 + gate*(1-s)), dup += dout * gate * s,
// s = sigmoid(gate). One vec4 per invocation.
@group(0) @binding(1) var<storage, read_write> swb_dgate: array<vec4<f32>>; // (N, F) as N*F/4 vec4
@group(0) @binding(2) var<storage, read_write> swb_dup: array<vec4<f32>>;   // (N, F) as N*F/4 vec4
@group(0) @binding(3) var<storage, read> swb_dout: array<vec4<f32>>;        // (N, F) as N*F/4 vec4
@group(0) @binding(4) var<storage, read> swb_gate: array<vec4<f32>>;        // (N, F) as N*F/4 vec4
@group(0) @binding(5) var<storage, read> swb_up: array<vec4<f32>>;          // (N, F) as N*F/4 vec4

@compute @workgroup_size(WG)
fn swiglu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    if (i >= p.n / 4u) { return; }
    let gr = swiglu_grad4(swb_dout[i], swb_gate[i], swb_up[i]);
    // Accumulate: the caller zeroes gradients once per step.
    swb_dgate[i] += gr.dgate;
    swb_dup[i] += gr.dup;
}

// swiglu_backward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> swbx_dgate: array<f32>; // (N, F)
@group(0) @binding(2) var<storage, read_write> swbx_dup: array<f32>;   // (N, F)
@group(0) @binding(3) var<storage, read> swbx_dout: array<f32>;        // (N, F)
@group(0) @binding(4) var<storage, read> swbx_gate: array<f32>;        // (N, F)
@group(0) @binding(5) var<storage, read> swbx_up: array<f32>;          // (N, F)

@compute @workgroup_size(WG)
fn swiglu_backward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    if (i0 >= p.n) { return; }
    var d = vec4<f32>(0.0);
    var g = vec4<f32>(0.0);
    var u = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) {
            d[k] = swbx_dout[i0 + k];
            g[k] = swbx_gate[i0 + k];
            u[k] = swbx_up[i0 + k];
        }
    }
    let gr = swiglu_grad4(d, g, u);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) {
            swbx_dgate[i0 + k] += gr.dgate[k];
            swbx_dup[i0 + k] += gr.dup[k];
        }
    }
}

// ---------------------------------------------------------------------------
// gelu_forward: out = 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))), the
// tanh approximation of HF GPT-2 ("gelu_new"). One vec4 per invocation.
@group(0) @binding(1) var<storage, read_write> ge_out: array<vec4<f32>>; // (N, C) as N*C/4 vec4
@group(0) @binding(2) var<storage, read> ge_inp: array<vec4<f32>>;       // (N, C) as N*C/4 vec4

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    if (i >= p.n / 4u) { return; }
    ge_out[i] = gelu4(ge_inp[i]);
}

// gelu_forward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> gex_out: array<f32>; // (N, C)
@group(0) @binding(2) var<storage, read> gex_inp: array<f32>;       // (N, C)

@compute @workgroup_size(WG)
fn gelu_forward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    if (i0 >= p.n) { return; }
    var x = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) { x[k] = gex_inp[i0 + k]; }
    }
    let o = gelu4(x);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) { gex_out[i0 + k] = o[k]; }
    }
}

// ---------------------------------------------------------------------------
// gelu_backward: differentiates out = 0.5*x*(1 + tanh(u)),
// u = sqrt(2/pi)*(x + 0.044715*x^3); dinp += dout * gelu'(x). One vec4 per
// invocation. The input is re-read rather than saving tanh(u) in forward:
// one load here is cheaper than a stored activation.
@group(0) @binding(1) var<storage, read_write> geb_dinp: array<vec4<f32>>; // (N, C) as N*C/4 vec4
@group(0) @binding(2) var<storage, read> geb_dout: array<vec4<f32>>;       // (N, C) as N*C/4 vec4
@group(0) @binding(3) var<storage, read> geb_inp: array<vec4<f32>>;        // (N, C) as N*C/4 vec4

@compute @workgroup_size(WG)
fn gelu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    if (i >= p.n / 4u) { return; }
    geb_dinp[i] += geb_dout[i] * gelu_grad4(geb_inp[i]);
}

// gelu_backward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> gebx_dinp: array<f32>; // (N, C)
@group(0) @binding(2) var<storage, read> gebx_dout: array<f32>;       // (N, C)
@group(0) @binding(3) var<storage, read> gebx_inp: array<f32>;        // (N, C)

@compute @workgroup_size(WG)
fn gelu_backward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    if (i0 >= p.n) { return; }
    var x = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) { x[k] = gebx_inp[i0 + k]; }
    }
    let dx = gelu_grad4(x);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) { gebx_dinp[i0 + k] += gebx_dout[i0 + k] * dx[k]; }
    }
}

// ---------------------------------------------------------------------------
// residual_forward: out = inp1 + inp2 (the skip connection). One vec4 per
// invocation.
@group(0) @binding(1) var<storage, read_write> res_out: array<vec4<f32>>; // (N, C) as N*C/4 vec4
@group(0) @binding(2) var<storage, read> res_inp1: array<vec4<f32>>;      // (N, C) as N*C/4 vec4
@group(0) @binding(3) var<storage, read> res_inp2: array<vec4<f32>>;      // (N, C) as N*C/4 vec4

@compute @workgroup_size(WG)
fn residual_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    if (i >= p.n / 4u) { return; }
    res_out[i] = res_inp1[i] + res_inp2[i];
}

// residual_forward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> resx_out: array<f32>; // (N, C)
@group(0) @binding(2) var<storage, read> resx_inp1: array<f32>;      // (N, C)
@group(0) @binding(3) var<storage, read> resx_inp2: array<f32>;      // (N, C)

@compute @workgroup_size(WG)
fn residual_forward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    // Nothing to share between lanes here, so no vec4 is assembled.
    for (var k = 0u; k < 4u; k++) {
        let i = i0 + k;
        if (i < p.n) { resx_out[i] = resx_inp1[i] + resx_inp2[i]; }
    }
}

// ---------------------------------------------------------------------------
// residual_backward: differentiates out = inp1 + inp2;
// dinp1 += dout, dinp2 += dout. One vec4 per invocation.
@group(0) @binding(1) var<storage, read_write> resb_dinp1: array<vec4<f32>>; // (N, C) as N*C/4 vec4
@group(0) @binding(2) var<storage, read_write> resb_dinp2: array<vec4<f32>>; // (N, C) as N*C/4 vec4
@group(0) @binding(3) var<storage, read> resb_dout: array<vec4<f32>>;        // (N, C) as N*C/4 vec4

@compute @workgroup_size(WG)
fn residual_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    if (i >= p.n / 4u) { return; }
    let d = resb_dout[i];
    resb_dinp1[i] += d;
    resb_dinp2[i] += d;
}

// residual_backward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> resbx_dinp1: array<f32>; // (N, C)
@group(0) @binding(2) var<storage, read_write> resbx_dinp2: array<f32>; // (N, C)
@group(0) @binding(3) var<storage, read> resbx_dout: array<f32>;        // (N, C)

@compute @workgroup_size(WG)
fn residual_backward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    for (var k = 0u; k < 4u; k++) {
        let i = i0 + k;
        if (i < p.n) {
            let d = resbx_dout[i];
            resbx_dinp1[i] += d;
            resbx_dinp2[i] += d;
        }
    }
}

// ---------------------------------------------------------------------------
// tanh_forward: out = tanh(inp) (prefix-tuning reparameterization MLP).
@group(0) @binding(1) var<storage, read_write> th_out: array<vec4<f32>>; // (N, H) as N*H/4 vec4
@group(0) @binding(2) var<storage, read> th_inp: array<vec4<f32>>;       // (N, H) as N*H/4 vec4

fn tanh4(x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(tanh_safe(x.x), tanh_safe(x.y), tanh_safe(x.z), tanh_safe(x.w));
}

@compute @workgroup_size(WG)
fn tanh_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    if (i >= p.n / 4u) { return; }
    th_out[i] = tanh4(th_inp[i]);
}

// tanh_forward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> thx_out: array<f32>; // (N, H)
@group(0) @binding(2) var<storage, read> thx_inp: array<f32>;       // (N, H)

@compute @workgroup_size(WG)
fn tanh_forward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) { thx_out[i0 + k] = tanh_safe(thx_inp[i0 + k]); }
    }
}

// tanh_backward: dinp += dout * (1 - out^2), from the saved output.
@group(0) @binding(1) var<storage, read_write> thb_dinp: array<vec4<f32>>; // (N, H) as N*H/4 vec4
@group(0) @binding(2) var<storage, read> thb_dout: array<vec4<f32>>;       // (N, H) as N*H/4 vec4
@group(0) @binding(3) var<storage, read> thb_out: array<vec4<f32>>;        // (N, H) as N*H/4 vec4

@compute @workgroup_size(WG)
fn tanh_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = slot(wg, nwg, lid);
    if (i >= p.n / 4u) { return; }
    let y = thb_out[i];
    thb_dinp[i] += thb_dout[i] * (vec4<f32>(1.0) - y * y);
}

// tanh_backward_x1: the same for any n; 4 scalars per invocation.
@group(0) @binding(1) var<storage, read_write> thbx_dinp: array<f32>; // (N, H)
@group(0) @binding(2) var<storage, read> thbx_dout: array<f32>;       // (N, H)
@group(0) @binding(3) var<storage, read> thbx_out: array<f32>;        // (N, H)

@compute @workgroup_size(WG)
fn tanh_backward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i0 = 4u * slot(wg, nwg, lid);
    for (var k = 0u; k < 4u; k++) {
        if (i0 + k < p.n) {
            let y = thbx_out[i0 + k];
            thbx_dinp[i0 + k] += thbx_dout[i0 + k] * (1.0 - y * y);
        }
    }
}
