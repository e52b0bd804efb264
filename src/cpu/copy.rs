//! CPU twin of `shaders/copy.wgsl`, in f64.

/// Where row i of block n starts: `off + n * bs + i * rs` (elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub off: usize,
    pub bs: usize,
    pub rs: usize,
}

impl Layout {
    /// Row-major (NB, T, D) starting at `off`.
    pub fn dense(t: usize, d: usize) -> Layout {
        Layout {
            off: 0,
            bs: t * d,
            rs: d,
        }
    }
    /// Row `row0` onwards of blocks of `s` rows of width `d`, starting at
    /// column `col0` (e.g. K rows after a P-row prefix, or the k third of a
    /// fused qkv row).
    pub fn rows(s: usize, width: usize, row0: usize, col0: usize) -> Layout {
        Layout {
            off: row0 * width + col0,
            bs: s * width,
            rs: width,
        }
    }
    pub fn at(&self, n: usize, i: usize) -> usize {
        self.off + n * self.bs + i * self.rs
    }
}

/// dst[dl.at(n, i) + j] (+)= src[sl.at(n, i) + j] for n < nb, i < t, j < d.
#[allow(clippy::too_many_arguments)]
pub fn copy_rows(
    dst: &mut [f64],
    src: &[f64],
    nb: usize,
    t: usize,
    d: usize,
    dl: Layout,
    sl: Layout,
    acc: bool,
) {
    for n in 0..nb {
        for i in 0..t {
            for j in 0..d {
                let s = src[sl.at(n, i) + j];
                let o = &mut dst[dl.at(n, i) + j];
                *o = if acc { *o + s } else { s };
            }
        }
    }
}

/// [`copy_rows`] with the destination moved down `pos` rows of `dl`
/// (`pos` read from a buffer on the GPU: a KV cache append).
#[allow(clippy::too_many_arguments)]
pub fn copy_rows_at(
    dst: &mut [f64],
    src: &[f64],
    nb: usize,
    t: usize,
    d: usize,
    dl: Layout,
    sl: Layout,
    pos: usize,
) {
    let dl = Layout {
        off: dl.off + pos * dl.rs,
        ..dl
    };
    copy_rows(dst, src, nb, t, d, dl, sl, false);
}

/// dst[idx[i], :] += src[i, :] (rows of width d; out-of-range indices skipped).
pub fn scatter_rows(dst: &mut [f64], idx: &[i32], src: &[f64], rows: usize, d: usize) {
    for (i, &row) in idx.iter().enumerate() {
        if row >= 0 && (row as usize) < rows {
            for j in 0..d {
                dst[row as usize * d + j] += src[i * d + j];
            }
        }
    }
}
