//! Typed uniform blocks.
//!
//! Every kernel family reads binding 0 as a WGSL `struct`; its Rust twin is a
//! `#[repr(C)]` Pod struct with the same field names in the same order,
//! padding included. [`uniform!`] declares one and records its layout, so
//! `tests/shaders.rs` can check it against naga's reflection of the shader.

/// WGSL scalar type of one uniform field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    U32,
    I32,
    F32,
}

/// Rust types allowed in a uniform block.
pub trait Scalar {
    const KIND: Kind;
}
impl Scalar for u32 {
    const KIND: Kind = Kind::U32;
}
impl Scalar for i32 {
    const KIND: Kind = Kind::I32;
}
impl Scalar for f32 {
    const KIND: Kind = Kind::F32;
}

/// One field: name, byte offset, scalar type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub kind: Kind,
}

/// A uniform block and where its WGSL twin lives.
pub trait Uniform: bytemuck::Pod {
    /// Shader module (op family) declaring the struct.
    const FAMILY: &'static str;
    /// Name of the WGSL struct.
    const WGSL: &'static str;
    /// Fields in declaration order.
    const FIELDS: &'static [Field];
}

/// Layout of one uniform type, for the reflection test.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub family: &'static str,
    pub wgsl: &'static str,
    pub rust: &'static str,
    pub size: usize,
    pub fields: &'static [Field],
}

fn layout<U: Uniform>() -> Layout {
    Layout {
        family: U::FAMILY,
        wgsl: U::WGSL,
        rust: std::any::type_name::<U>(),
        size: std::mem::size_of::<U>(),
        fields: U::FIELDS,
    }
}

/// Every uniform block the kernels use.
pub fn all() -> Vec<Layout> {
    use crate::gpu::ops::*;
    vec![
        layout::<activation::ActivationParams>(),
        layout::<adamw::AdamwParams>(),
        layout::<attention::AttentionParams>(),
        layout::<copy::CopyParams>(),
        layout::<copy::ScatterParams>(),
        layout::<embedding::EmbeddingParams>(),
        layout::<lora::LoraParams>(),
        layout::<loss::LossParams>(),
        layout::<matmul::MatmulParams>(),
        layout::<norm::NormParams>(),
        layout::<rope::RopeParams>(),
    ]
}

/// Declare a uniform block: `uniform! { "family" "WgslName" pub struct X { a: u32, .. } }`.
/// Fields are public; all are 4-byte scalars, so `repr(C)` has no hidden padding.
macro_rules! uniform {
    ($family:literal $wgsl:literal $(#[$m:meta])* pub struct $name:ident {
        $($(#[$fm:meta])* $f:ident: $t:ty),* $(,)?
    }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name {
            $($(#[$fm])* pub $f: $t),*
        }
        impl $crate::gpu::uniform::Uniform for $name {
            const FAMILY: &'static str = $family;
            const WGSL: &'static str = $wgsl;
            const FIELDS: &'static [$crate::gpu::uniform::Field] = &[$(
                $crate::gpu::uniform::Field {
                    name: stringify!($f),
                    offset: std::mem::offset_of!($name, $f),
                    kind: <$t as $crate::gpu::uniform::Scalar>::KIND,
                }
            ),*];
        }
    };
}
pub(crate) use uniform;
