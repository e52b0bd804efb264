//! Tier 0: every WGSL module parses and validates with naga, and every
//! uniform block matches its Rust twin. No adapter needed.

use naga::valid::{Capabilities, ValidationFlags, Validator};
use wgtune::gpu::kernels::Source;
use wgtune::gpu::uniform::{self, Kind};

fn parse(name: &str, src: &str) -> naga::Module {
    naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(src)))
}

fn validate(name: &str, src: &str) {
    let module = parse(name, src);
    let mut v = Validator::new(ValidationFlags::all(), Capabilities::all());
    v.validate(&module)
        .unwrap_or_else(|e| panic!("{name}: validation error:\n{}", e.emit_to_string(src)));
    assert!(
        !module.entry_points.is_empty() || name == "common",
        "{name}: no entry points"
    );
    eprintln!("{name}: {} entry points ok", module.entry_points.len());
}

#[test]
fn every_family_validates() {
    for (name, _) in wgtune::gpu::kernels::FAMILIES {
        let src = wgtune::gpu::kernels::family_source(name).expect("family");
        validate(name, &src);
    }
}

#[test]
fn generated_matmul_variants_validate() {
    for (name, src) in wgtune::gpu::ops::matmul::all_variant_sources() {
        validate(&name, &src);
    }
}

#[test]
fn attention_subgroup_variant_validates() {
    let src = wgtune::gpu::ops::attention::subgroup_source().expect("subgroup source");
    validate("attention (subgroup build)", &src);
}

#[test]
fn attention_sources_validate() {
    for src in [Source::Storage, Source::Texture] {
        for sg in [1, 8, 32] {
            let text = wgtune::gpu::ops::attention::source(src, sg).expect("attention source");
            validate(&format!("attention {src:?} sg{sg}"), &text);
        }
        // The segmented build (packed rows).
        let text = wgtune::gpu::ops::attention::segmented_source(src, 8).expect("segmented");
        validate(&format!("attention {src:?} segmented"), &text);
    }
}

/// One module of every family, templates included.
fn all_modules() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = wgtune::gpu::kernels::FAMILIES
        .iter()
        .map(|(n, _)| {
            (
                n.to_string(),
                wgtune::gpu::kernels::family_source(n).unwrap(),
            )
        })
        .collect();
    let (_, mm) = wgtune::gpu::ops::matmul::all_variant_sources().remove(0);
    out.push(("matmul".into(), mm));
    let at = wgtune::gpu::ops::attention::source(Source::Storage, 1).unwrap();
    out.push(("attention".into(), at));
    out
}

/// The (name, offset, kind) rows and size of WGSL struct `ty`.
fn wgsl_layout(m: &naga::Module, ty: naga::Handle<naga::Type>) -> (Vec<(String, u32, Kind)>, u32) {
    let naga::TypeInner::Struct { members, span } = &m.types[ty].inner else {
        panic!("uniform is not a struct");
    };
    let rows = members
        .iter()
        .map(|mb| {
            let kind = match m.types[mb.ty].inner {
                naga::TypeInner::Scalar(naga::Scalar {
                    kind: naga::ScalarKind::Uint,
                    width: 4,
                }) => Kind::U32,
                naga::TypeInner::Scalar(naga::Scalar {
                    kind: naga::ScalarKind::Sint,
                    width: 4,
                }) => Kind::I32,
                naga::TypeInner::Scalar(naga::Scalar {
                    kind: naga::ScalarKind::Float,
                    width: 4,
                }) => Kind::F32,
                ref other => panic!("unsupported uniform member type {other:?}"),
            };
            (mb.name.clone().unwrap_or_default(), mb.offset, kind)
        })
        .collect();
    (rows, *span)
}

/// Every `var<uniform>` of every shader has a Rust struct with the same
/// size and the same (name, offset, type) fields in the same order, and
/// every Rust struct has a shader struct.
#[test]
fn uniform_structs_match_wgsl() {
    let rust = uniform::all();
    let mut matched = vec![false; rust.len()];
    let mut errors = Vec::new();
    for (family, src) in all_modules() {
        let m = parse(&family, &src);
        for (_, var) in m.global_variables.iter() {
            if var.space != naga::AddressSpace::Uniform {
                continue;
            }
            let wgsl_name = m.types[var.ty].name.clone().unwrap_or_default();
            let Some(i) = rust
                .iter()
                .position(|l| l.family == family && l.wgsl == wgsl_name)
            else {
                errors.push(format!("{family}: struct {wgsl_name} has no Rust twin"));
                continue;
            };
            matched[i] = true;
            let l = &rust[i];
            let (wgsl, span) = wgsl_layout(&m, var.ty);
            let ours: Vec<(String, u32, Kind)> = l
                .fields
                .iter()
                .map(|f| (f.name.to_string(), f.offset as u32, f.kind))
                .collect();
            if ours != wgsl || l.size as u32 != span {
                errors.push(format!(
                    "{family}: {} (size {}) does not match WGSL {wgsl_name} (size {span})\n  rust: {ours:?}\n  wgsl: {wgsl:?}",
                    l.rust, l.size
                ));
            }
        }
    }
    for (l, ok) in rust.iter().zip(matched) {
        if !ok {
            errors.push(format!("{}: no uniform {} in {}", l.rust, l.wgsl, l.family));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
