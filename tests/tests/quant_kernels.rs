//! Studio's quantized CPU kernels (`studio_inference::quant`): every format on every path this
//! CPU offers equals a plain reference (dequantized weight × the activations after the same
//! 8-bit quantization, f64 matmul), stays close to the product with unquantized activations,
//! and matches candle's `QMatMul` on the same `QTensor`.
//!
//! Tolerances, per output element, with `S = Σₖ |wₖ|·|aₖ|` over the reference operands:
//! - against the reference: `1e-5·S + 1e-6` (only f32 rounding differs: the integer dot
//!   products are exact);
//! - against the unquantized-activation product: the activation-rounding bound
//!   `B = Σₖ |wₖ|·dₖ/2` (`dₖ` the 8-bit step of xₖ's block), `1.01·B + 1e-5·S + 1e-5`;
//! - against candle's `QMatMul`: `2.02·B + 1e-5·S + 1e-5` (candle rounds the activations its
//!   own way; F16/BF16 are exact products in both, so `B = 0` there).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use studio_inference::quant::{
    KernelPath, QWeight, QuantFormat, QuantizedInput, WeightLayout, has_kernel,
    quantize_dequantize_activations,
};
use studio_tests::iq4;

const LAYOUTS: [WeightLayout; 2] = [WeightLayout::Natural, WeightLayout::Tiles4];

/// The formats the AVX-512 path runs on the AVX2 kernels, in file order (never `Tiles4`).
const UNTILED: [QuantFormat; 7] = [
    QuantFormat::Q4_1,
    QuantFormat::Q5_0,
    QuantFormat::Q5_1,
    QuantFormat::Q2K,
    QuantFormat::Q3K,
    QuantFormat::IQ4NL,
    QuantFormat::IQ4XS,
];

fn random(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            // Roughly normal values, with an occasional outlier so block scales vary.
            let s: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum();
            let outlier = if i % 97 == 13 { 6.0 } else { 1.0 };
            s * scale * outlier
        })
        .collect()
}

/// A random weight quantized to `format`: by candle where candle has the format (the
/// `QTensor` is returned to compare with candle's kernels), else (IQ4_NL, IQ4_XS) by the test
/// quantizers of `studio_tests::iq4`.
fn weight(format: QuantFormat, n: usize, k: usize, seed: u64) -> (Option<QTensor>, QWeight) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = random(&mut rng, n * k, 0.5);
    let Some(dtype) = format.to_ggml() else {
        let bytes = match format {
            QuantFormat::IQ4NL => iq4::quantize_iq4_nl(&w),
            _ => iq4::quantize_iq4_xs(&w),
        };
        let qw = QWeight::from_bytes("test.weight", format, n, k, bytes).expect("QWeight");
        return (None, qw);
    };
    let t = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
    let qt = QTensor::quantize(&t, dtype).expect("quantize");
    let qw = QWeight::from_qtensor("test.weight", &qt).expect("QWeight");
    (Some(qt), qw)
}

/// The weight block: 32 or 256, none (0) for F16/BF16.
fn block_of(format: QuantFormat) -> usize {
    match format {
        QuantFormat::F16 | QuantFormat::BF16 => 0,
        _ => format.block_size(),
    }
}

/// `(S, B)` per output element (see the module docs).
fn bounds(
    format: QuantFormat,
    wd: &[f32],
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<(f64, f64)> {
    let bs = format.activation_block();
    let mut steps = vec![0f64; m * k];
    if bs > 0 {
        for (row, st) in x.chunks_exact(k).zip(steps.chunks_exact_mut(k)) {
            for (xb, sb) in row.chunks_exact(bs).zip(st.chunks_exact_mut(bs)) {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                sb.fill(f64::from(amax) / 127.0);
            }
        }
    }
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut b) = (0f64, 0f64);
            for kk in 0..k {
                let w = f64::from(wd[j * k + kk]).abs();
                s += w * f64::from(x[i * k + kk]).abs();
                b += w * steps[i * k + kk] / 2.0;
            }
            out.push((s, b));
        }
    }
    out
}

fn matmul_f64(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|kk| f64::from(a[i * k + kk]) * f64::from(w[j * k + kk]))
                .sum();
        }
    }
    y
}

fn shapes(format: QuantFormat) -> Vec<(usize, usize, usize)> {
    let (k1, k2, k3) = match block_of(format) {
        32 => (32, 160, 352),
        256 => (256, 512, 768),
        _ => (1, 40, 100),
    };
    vec![
        (1, 1, k1),
        (3, 5, k1),
        (7, 67, k2),
        (1, 67, k3),
        (128, 5, k2),
        (128, 67, k1),
        // Rows that are whole tile units (Q4_0: 4 blocks), so `Tiles4` interleaves them.
        (1, 67, 4 * k2),
        (20, 70, 4 * k2),
    ]
}

/// Every format × every available path × every shape: reference, unquantized product and
/// candle, with the tolerances of the module docs.
fn check_format(format: QuantFormat) {
    check_shapes(format, &shapes(format));
}

fn check_shapes(format: QuantFormat, shapes: &[(usize, usize, usize)]) {
    for (si, &(m, n, k)) in shapes.iter().enumerate() {
        let (qt, qw) = weight(format, n, k, 100 + si as u64);
        let wd = qw.dequantize();
        let mut rng = StdRng::seed_from_u64(7 + si as u64);
        let x = random(&mut rng, m * k, 1.0);
        let xq = quantize_dequantize_activations(format, &x, k);
        let reference = matmul_f64(&xq, &wd, m, n, k);
        let exact = matmul_f64(&x, &wd, m, n, k);
        let tol = bounds(format, &wd, &x, m, n, k);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("x");
        // candle's Q4_1/Q5_0/Q5_1 products panic on an odd number of blocks per row ("nb is
        // not divisible by 2"); Studio's run them, compared with the reference only.
        // candle has no IQ4_NL / IQ4_XS.
        let qt = qt.filter(|_| {
            !(matches!(
                format,
                QuantFormat::Q4_1 | QuantFormat::Q5_0 | QuantFormat::Q5_1
            ) && (k / 32) % 2 == 1)
        });
        let candle_runs = qt.is_some();
        let candle: Vec<f32> = if let Some(qt) = qt {
            QMatMul::from_qtensor(qt)
                .expect("qmatmul")
                .forward(&xt)
                .expect("candle forward")
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("candle values")
        } else {
            Vec::new()
        };
        for (path, layout) in KernelPath::available_paths()
            .into_iter()
            .flat_map(|p| LAYOUTS.map(|l| (p, l)))
        {
            let qw = qw.clone().with_layout(layout);
            let mut y = vec![f32::NAN; m * n];
            qw.matmul_with(&x, m, &mut y, path).expect("matmul");
            for e in 0..m * n {
                let (s, b) = tol[e];
                let what = format!(
                    "{format} on {path} (own kernel: {}), {:?}, m={m} n={n} k={k}, element {e}",
                    has_kernel(format, path),
                    qw.layout()
                );
                let got = f64::from(y[e]);
                let d_ref = (got - reference[e]).abs();
                assert!(
                    d_ref <= 1e-5 * s + 1e-6,
                    "{what}: {got} vs reference {} (|Δ| {d_ref}, S {s})",
                    reference[e]
                );
                let d_exact = (got - exact[e]).abs();
                assert!(
                    d_exact <= 1.01 * b + 1e-5 * s + 1e-5,
                    "{what}: {got} vs unquantized {} (|Δ| {d_exact}, bound {b})",
                    exact[e]
                );
                if !candle_runs {
                    continue;
                }
                let d_candle = (got - f64::from(candle[e])).abs();
                assert!(
                    d_candle <= 2.02 * b + 1e-5 * s + 1e-5,
                    "{what}: {got} vs candle {} (|Δ| {d_candle}, bound {b})",
                    candle[e]
                );
            }
        }
    }
}

#[test]
fn q4_0_matches_reference_on_every_path() {
    check_format(QuantFormat::Q4_0);
}

#[test]
fn q4_1_matches_reference_on_every_path() {
    check_format(QuantFormat::Q4_1);
}

#[test]
fn q5_0_matches_reference_on_every_path() {
    check_format(QuantFormat::Q5_0);
}

#[test]
fn q5_1_matches_reference_on_every_path() {
    check_format(QuantFormat::Q5_1);
}

#[test]
fn q8_0_matches_reference_on_every_path() {
    check_format(QuantFormat::Q8_0);
}

#[test]
fn q2k_matches_reference_on_every_path() {
    check_format(QuantFormat::Q2K);
}

#[test]
fn q3k_matches_reference_on_every_path() {
    check_format(QuantFormat::Q3K);
}

#[test]
fn q4k_matches_reference_on_every_path() {
    check_format(QuantFormat::Q4K);
}

#[test]
fn q5k_matches_reference_on_every_path() {
    check_format(QuantFormat::Q5K);
}

#[test]
fn q6k_matches_reference_on_every_path() {
    check_format(QuantFormat::Q6K);
}

#[test]
fn iq4_nl_matches_reference_on_every_path() {
    check_format(QuantFormat::IQ4NL);
}

#[test]
fn iq4_xs_matches_reference_on_every_path() {
    check_format(QuantFormat::IQ4XS);
}

#[test]
fn f16_matches_reference_on_every_path() {
    check_format(QuantFormat::F16);
}

#[test]
fn bf16_matches_reference_on_every_path() {
    check_format(QuantFormat::BF16);
}

/// A weight of random bytes with small finite scales (quick to make at any size).
fn random_bytes_weight(format: QuantFormat, n: usize, k: usize, rng: &mut StdRng) -> QWeight {
    let bb = format.block_bytes();
    let mut data = vec![0u8; n * k / format.block_size() * bb];
    rng.fill(&mut data[..]);
    let scale = 0x1C00u16.to_le_bytes();
    let at: &[usize] = match format {
        QuantFormat::Q4_0
        | QuantFormat::Q5_0
        | QuantFormat::Q8_0
        | QuantFormat::IQ4NL
        | QuantFormat::IQ4XS => &[0],
        QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4K | QuantFormat::Q5K => &[0, 2],
        QuantFormat::Q2K => &[80, 82],
        QuantFormat::Q3K => &[108],
        QuantFormat::Q6K => &[208],
        QuantFormat::F16 | QuantFormat::BF16 => &[],
    };
    for blk in data.chunks_exact_mut(bb) {
        for &a in at {
            blk[a..a + 2].copy_from_slice(&scale);
        }
        if matches!(format, QuantFormat::F16 | QuantFormat::BF16) {
            blk[1] &= 0x83; // small exponents: finite values
            blk[1] |= 0x20;
        }
    }
    QWeight::from_bytes("random", format, n, k, data).expect("weight")
}

/// Shapes big enough that the output columns are split across the thread pool (uneven last
/// chunk), for the decode tiles and the prefill panels: every column equals the same product
/// computed on one thread from a weight made of a slice of the rows (bit for bit: each output
/// is computed the same way whatever the split).
#[test]
fn thread_split_equals_single_thread() {
    let path = KernelPath::detect();
    for format in QuantFormat::ALL {
        let k = if block_of(format) == 256 { 1024 } else { 992 };
        for (m, n) in [(1, 2100), (20, 130)] {
            let mut rng = StdRng::seed_from_u64(4);
            let qw = random_bytes_weight(format, n, k, &mut rng);
            let x = random(&mut rng, m * k, 1.0);
            let mut y = vec![0f32; m * n];
            qw.matmul_with(&x, m, &mut y, path).expect("big");
            let rb = qw.file_bytes().len() / n;
            let step = 48;
            for j0 in (0..n).step_by(step) {
                let rows = step.min(n - j0);
                let part = QWeight::from_bytes(
                    "part",
                    format,
                    rows,
                    k,
                    qw.file_bytes()[j0 * rb..(j0 + rows) * rb].to_vec(),
                )
                .expect("slice");
                let mut yp = vec![0f32; m * rows];
                part.matmul_with(&x, m, &mut yp, path).expect("part");
                for i in 0..m {
                    assert_eq!(
                        yp[i * rows..(i + 1) * rows],
                        y[i * n + j0..i * n + j0 + rows],
                        "{format} on {path}, m={m}, rows {j0}.."
                    );
                }
            }
        }
    }
}

#[test]
fn dequantize_equals_candles() {
    for format in QuantFormat::ALL {
        let k = block_of(format).max(16) * 2;
        let (qt, qw) = weight(format, 3, k, 42);
        // IQ4_NL / IQ4_XS: against ggml itself (`iq4_dequantize_equals_ggml`).
        let Some(qt) = qt else { continue };
        let ours = qw.dequantize();
        let theirs: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("candle dequantize");
        assert_eq!(ours, theirs, "{format}");
        let mut row = vec![0f32; k];
        qw.row_to_f32(2, &mut row).expect("row");
        assert_eq!(row, ours[2 * k..], "{format} row 2");
        assert!(qw.row_to_f32(3, &mut row).is_err(), "{format}: row 3 of 3");
    }
}

/// IQ4_NL and IQ4_XS (which candle lacks) dequantize bit for bit as ggml's own
/// `dequantize_row_iq4_nl` / `dequantize_row_iq4_xs` do, on blocks with negative, subnormal,
/// zero and the largest f16 scales (fixtures written by `tests/fixtures/iq4/make_fixture.c`).
#[test]
fn iq4_dequantize_equals_ggml() {
    let cases: [(QuantFormat, &[u8], usize); 2] = [
        (
            QuantFormat::IQ4NL,
            include_bytes!("../fixtures/iq4/iq4_nl.bin"),
            256,
        ),
        (
            QuantFormat::IQ4XS,
            include_bytes!("../fixtures/iq4/iq4_xs.bin"),
            1024,
        ),
    ];
    for (format, fixture, n) in cases {
        let nbytes = n / format.block_size() * format.block_bytes();
        assert_eq!(fixture.len(), nbytes + 4 * n, "{format} fixture size");
        let (blocks, values) = fixture.split_at(nbytes);
        let ggml: Vec<u32> = values
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let w = QWeight::from_bytes("fixture", format, 1, n, blocks.to_vec()).expect("weight");
        let ours: Vec<u32> = w.dequantize().iter().map(|v| v.to_bits()).collect();
        for (i, (a, b)) in ours.iter().zip(&ggml).enumerate() {
            assert_eq!(
                a,
                b,
                "{format} value {i}: {} vs ggml {}",
                f32::from_bits(*a),
                f32::from_bits(*b)
            );
        }
    }
}

/// The decode path (one row) and the batched tiles give bit-identical rows, on every path.
#[test]
fn decode_rows_equal_batched_rows() {
    let (m, n, k) = (9, 37, 256);
    for format in QuantFormat::ALL {
        let (_, qw) = weight(format, n, k, 5);
        let mut rng = StdRng::seed_from_u64(11);
        let x = random(&mut rng, m * k, 1.0);
        for path in KernelPath::available_paths() {
            let mut all = vec![0f32; m * n];
            qw.matmul_with(&x, m, &mut all, path).expect("batched");
            for i in 0..m {
                let mut one = vec![0f32; n];
                qw.matmul_with(&x[i * k..(i + 1) * k], 1, &mut one, path)
                    .expect("decode");
                assert_eq!(one, all[i * n..(i + 1) * n], "{format} on {path}, row {i}");
            }
        }
    }
}

/// Every path the machine offers gives the same answer within the reference tolerance (the
/// paths differ only in f32 rounding order).
#[test]
fn paths_agree() {
    let (m, n, k) = (5, 70, 512);
    for format in QuantFormat::ALL {
        let (_, qw) = weight(format, n, k, 9);
        let mut rng = StdRng::seed_from_u64(3);
        let x = random(&mut rng, m * k, 1.0);
        let mut scalar = vec![0f32; m * n];
        qw.matmul_with(&x, m, &mut scalar, KernelPath::Scalar)
            .expect("scalar");
        for path in KernelPath::available_paths() {
            let mut y = vec![0f32; m * n];
            qw.matmul_with(&x, m, &mut y, path).expect("path");
            for (a, b) in y.iter().zip(&scalar) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{format} on {path}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn this_machine_runs_the_fast_paths() {
    // The development machines and CI have AVX2; say which paths were exercised.
    let paths = KernelPath::available_paths();
    eprintln!(
        "kernel paths on this CPU: {paths:?}; chosen: {}",
        KernelPath::detect()
    );
    assert!(paths.contains(&KernelPath::Scalar));
    assert_eq!(paths[0], KernelPath::detect());
}

#[test]
fn bad_shapes_name_the_tensor() {
    let err = QWeight::from_bytes(
        "blk.3.ffn_down.weight",
        QuantFormat::Q4_0,
        4,
        48,
        vec![0; 4 * 27],
    )
    .expect_err("48 is not a multiple of 32");
    let msg = err.to_string();
    assert!(
        msg.contains("blk.3.ffn_down.weight") && msg.contains("32") && msg.contains("48"),
        "{msg}"
    );

    let err = QWeight::from_bytes(
        "blk.0.attn_q.weight",
        QuantFormat::Q6K,
        2,
        384,
        vec![0; 2 * 210],
    )
    .expect_err("384 is not a multiple of 256");
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("256"),
        "{msg}"
    );

    let err = QWeight::from_bytes("output.weight", QuantFormat::Q8_0, 2, 64, vec![0; 10])
        .expect_err("wrong byte count");
    assert!(err.to_string().contains("output.weight"), "{err}");

    let t = Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    let f32s = QTensor::quantize(&t, GgmlDType::F32).expect("f32");
    let err = QWeight::from_qtensor("token_embd.weight", &f32s).expect_err("no F32 kernel");
    assert!(err.to_string().contains("token_embd.weight"), "{err}");

    let (_, qw) = weight(QuantFormat::Q8_0, 4, 64, 1);
    let mut y = vec![0f32; 4];
    let err = qw
        .matmul(&[0.0; 63], 1, &mut y)
        .expect_err("wrong input length");
    assert!(err.to_string().contains("test.weight"), "{err}");
}

#[test]
fn forward_keeps_leading_dims() {
    let (qt, qw) = weight(QuantFormat::Q4_0, 6, 64, 2);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).expect("x");
    let y = qw.forward(&x).expect("forward");
    assert_eq!(y.dims(), &[2, 3, 6]);
    let candle = QMatMul::from_qtensor(qt.expect("candle has Q4_0"))
        .expect("qmatmul")
        .forward(&x)
        .expect("candle");
    let diff: f32 = (y - candle)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar())
        .expect("diff");
    assert!(diff < 0.1, "max |Δ| vs candle {diff}");
}

#[test]
fn row_ranges_with_a_reused_input_equal_the_whole_product() {
    // What each thread of the decode team runs: row ranges of several products of one input,
    // its quantized activations kept in a `QuantizedInput` across weights of different
    // formats, and cleared when the input changes.
    for path in KernelPath::available_paths() {
        let mut rng = StdRng::seed_from_u64(9);
        let k = 512;
        let weights: Vec<QWeight> = QuantFormat::ALL
            .into_iter()
            .map(|f| random_bytes_weight(f, 70, k, &mut rng))
            .collect();
        let mut input = QuantizedInput::default();
        let mut x = random(&mut rng, k, 1.0);
        for round in 0..2 {
            for w in weights.iter().chain(weights.iter().rev()) {
                let mut whole = vec![0f32; w.rows()];
                w.matmul_with(&x, 1, &mut whole, path).expect("whole");
                for rows in [0..16, 16..64, 64..70, 3..3] {
                    let mut part = vec![0f32; rows.len()];
                    w.matmul_rows(&mut input, &x, 1, rows.clone(), &mut part, path)
                        .expect("rows");
                    assert_eq!(
                        part,
                        whole[rows.clone()],
                        "{} on {path}, round {round}, rows {rows:?}",
                        w.format()
                    );
                }
            }
            for v in &mut x {
                *v = -*v * 0.5;
            }
            input.clear();
        }
        let mut y = vec![0f32; 4];
        assert!(
            weights[0]
                .matmul_rows(&mut input, &x, 1, 68..72, &mut y, path)
                .is_err()
        );
    }
}

/// `Tiles4` (the AVX-512 decode layout, chosen on load where it applies) against the file
/// order: the same bytes back, the same rows and products bit for bit on every path, and
/// row ranges that start inside a run of 4 interleaved rows.
#[test]
fn tiled_layout_equals_file_order() {
    for format in QuantFormat::ALL {
        if UNTILED.contains(&format) {
            let mut rng = StdRng::seed_from_u64(20);
            let w =
                random_bytes_weight(format, 8, 1024, &mut rng).with_layout(WeightLayout::Tiles4);
            assert_eq!(
                w.layout(),
                WeightLayout::Natural,
                "{format} has no AVX-512 tiles"
            );
            continue;
        }
        let k = if block_of(format) == 256 { 512 } else { 256 };
        let n = 70;
        let mut rng = StdRng::seed_from_u64(21);
        let qw = random_bytes_weight(format, n, k, &mut rng);
        let natural = qw.clone().with_layout(WeightLayout::Natural);
        let tiled = qw.clone().with_layout(WeightLayout::Tiles4);
        assert_eq!(natural.layout(), WeightLayout::Natural);
        assert_eq!(tiled.layout(), WeightLayout::Tiles4, "{format}");
        assert_eq!(tiled.file_bytes(), natural.file_bytes(), "{format}");
        assert_ne!(
            tiled.rows_bytes(0..n),
            natural.rows_bytes(0..n),
            "{format}: the tiled bytes are reordered"
        );
        assert_eq!(
            tiled
                .clone()
                .with_layout(WeightLayout::Natural)
                .rows_bytes(0..n),
            natural.rows_bytes(0..n),
            "{format}: back to file order"
        );
        assert_eq!(tiled.dequantize(), natural.dequantize(), "{format}");
        let mut a = vec![0f32; k];
        let mut b = vec![0f32; k];
        for r in [0, 5, 67, 69] {
            tiled.row_to_f32(r, &mut a).expect("row");
            natural.row_to_f32(r, &mut b).expect("row");
            assert_eq!(a, b, "{format} row {r}");
        }
        for path in KernelPath::available_paths() {
            for m in [1, 5, 20] {
                let x = random(&mut rng, m * k, 1.0);
                let mut yt = vec![0f32; m * n];
                let mut yn = vec![0f32; m * n];
                tiled.matmul_with(&x, m, &mut yt, path).expect("tiled");
                natural.matmul_with(&x, m, &mut yn, path).expect("natural");
                assert_eq!(yt, yn, "{format} on {path}, m={m}");
            }
            let x = random(&mut rng, k, 1.0);
            let mut whole = vec![0f32; n];
            natural.matmul_with(&x, 1, &mut whole, path).expect("whole");
            let mut input = QuantizedInput::default();
            for rows in [3..17, 6..7, 64..70, 66..69] {
                let mut part = vec![0f32; rows.len()];
                tiled
                    .matmul_rows(&mut input, &x, 1, rows.clone(), &mut part, path)
                    .expect("rows");
                assert_eq!(part, whole[rows.clone()], "{format} on {path}, {rows:?}");
            }
            // Prompt-sized products (the AVX-512 prefill panels) over row ranges that start
            // and end inside runs of 4 interleaved rows.
            let m = 20;
            let x = random(&mut rng, m * k, 1.0);
            let mut whole = vec![0f32; m * n];
            natural.matmul_with(&x, m, &mut whole, path).expect("whole");
            let mut input = QuantizedInput::default();
            for rows in [3..17, 6..7, 62..69, 0..70] {
                let mut part = vec![0f32; m * rows.len()];
                tiled
                    .matmul_rows(&mut input, &x, m, rows.clone(), &mut part, path)
                    .expect("rows");
                for i in 0..m {
                    assert_eq!(
                        part[i * rows.len()..(i + 1) * rows.len()],
                        whole[i * n + rows.start..i * n + rows.end],
                        "{format} on {path}, m={m}, {rows:?}, row {i}"
                    );
                }
            }
        }
    }
    // Rows that are not whole units, or fewer than 4 rows, stay in file order.
    let mut rng = StdRng::seed_from_u64(22);
    for (format, n, k) in [(QuantFormat::Q4_0, 8, 96), (QuantFormat::Q8_0, 3, 64)] {
        let w = random_bytes_weight(format, n, k, &mut rng).with_layout(WeightLayout::Tiles4);
        assert_eq!(w.layout(), WeightLayout::Natural, "{format} [{n}, {k}]");
    }
}
