//! A bounds-checked front end to the `gemm` crate (the same GEMM kernels burn's `flex`
//! backend uses), with strided operands, and a plain triple-loop reference for tests.

/// A read-only matrix operand: `rows × cols` elements at `data[r·row_stride + c·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// The backing slice.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix with rows `row_stride` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        MatRef { data, rows, cols, row_stride, col_stride: 1 }
    }

    /// The transpose of a row-major `cols × rows` matrix with rows `stride` apart.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        MatRef { data, rows, cols, row_stride: 1, col_stride: stride }
    }

    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        assert!(last < self.data.len(), "gemm: {what} needs {} elements, has {}", last + 1, self.data.len());
    }

    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_stride + c * self.col_stride]
    }
}

/// Work below this many multiply-adds runs on one thread.
const PARALLEL_MACS: usize = 1 << 21;

/// `out[i, j] (+)= Σ_k a[i, k]·b[k, j]` where `out` is row-major with rows `out_stride` apart;
/// with `accumulate` the product is added to what `out` holds. `parallel` lets the GEMM use
/// rayon's pool when the product is large enough to benefit.
pub fn matmul(out: &mut [f32], out_stride: usize, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions {k} and {} differ", b.rows);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                out[r * out_stride..r * out_stride + n].fill(0.0);
            }
        }
        return;
    }
    a.check("lhs");
    b.check("rhs");
    assert!(n <= out_stride, "gemm: output rows of {n} exceed their stride {out_stride}");
    assert!(
        (m - 1) * out_stride + n <= out.len(),
        "gemm: output needs {} elements, has {}",
        (m - 1) * out_stride + n,
        out.len()
    );
    let parallelism =
        if parallel && m * n * k >= PARALLEL_MACS { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: every index the GEMM touches, `(i, j) ↦ i·stride + j·col_stride` for i < rows,
    // j < cols, was checked above to lie inside its slice; `out` is borrowed mutably and does
    // not alias `a` or `b`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The reference for [`matmul`]: a triple loop with f64 accumulation.
pub fn matmul_reference(out: &mut [f32], out_stride: usize, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    for i in 0..a.rows {
        for j in 0..b.cols {
            let s: f64 = (0..a.cols).map(|k| a.at(i, k) as f64 * b.at(k, j) as f64).sum();
            let o = &mut out[i * out_stride + j];
            *o = if accumulate { *o + s as f32 } else { s as f32 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn hand_computed() {
        // [1 2; 3 4] · [5 6; 7 8] = [19 22; 43 50]
        let mut out = [0f32; 4];
        matmul(
            &mut out,
            2,
            MatRef::rows(&[1., 2., 3., 4.], 2, 2, 2),
            MatRef::rows(&[5., 6., 7., 8.], 2, 2, 2),
            false,
            false,
        );
        assert_eq!(out, [19., 22., 43., 50.]);
        // Transposed rhs: [1 2; 3 4] · [5 6; 7 8]ᵀ = [17 23; 39 53]; accumulate onto ones.
        let mut out = [1f32; 4];
        matmul(
            &mut out,
            2,
            MatRef::rows(&[1., 2., 3., 4.], 2, 2, 2),
            MatRef::transposed(&[5., 6., 7., 8.], 2, 2, 2),
            true,
            false,
        );
        assert_eq!(out, [18., 24., 40., 54.]);
    }

    #[test]
    fn matches_reference_with_strides() {
        for (m, k, n) in [(1, 1, 1), (7, 13, 5), (64, 32, 96), (300, 128, 257)] {
            let a = lcg(m * (k + 3), 1);
            let b = lcg(n * (k + 2), 2);
            // a: rows k+3 apart; b: the transpose of an n × k matrix with rows k+2 apart.
            let (a, b) = (MatRef::rows(&a, m, k, k + 3), MatRef::transposed(&b, k, n, k + 2));
            let stride = n + 4;
            let init = lcg(m * stride, 3);
            for accumulate in [false, true] {
                let (mut got, mut want) = (init.clone(), init.clone());
                matmul(&mut got, stride, a, b, accumulate, true);
                matmul_reference(&mut want, stride, a, b, accumulate);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f32).sqrt(), "{m}x{k}x{n}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "lhs needs")]
    fn refuses_short_operands() {
        let mut out = [0f32; 4];
        matmul(
            &mut out,
            2,
            MatRef::rows(&[1., 2., 3.], 2, 2, 2),
            MatRef::rows(&[1., 2., 3., 4.], 2, 2, 2),
            false,
            false,
        );
    }
}
