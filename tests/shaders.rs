//! Tier 0: every WGSL module parses and validates with naga. No adapter needed.

use naga::valid::{Capabilities, ValidationFlags, Validator};

fn validate(name: &str, src: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(src)));
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
