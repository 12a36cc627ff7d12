//! Studio's quantized kernels against candle's `QMatMul::forward`, in the same run, on the
//! Qwen2-0.5B shapes (K → N): 896 → 4864 (gate/up), 4864 → 896 (down), 896 → 896 (q/o) and
//! the 151936 × 896 LM head, at M = 1 (decode) and M = 128 (prefill).
//!
//! `cargo bench -p studio-inference --bench quant_matmul [-- FORMAT… SHAPE… --m M… --threads N…
//! --path PATH]` (formats as `Q4_0`, `Q4_K`…; shapes by the names below: `gate/up`, `down`,
//! `q/o`, `lm_head`; `PATH` one of `avx512-vnni`, `avx2`, `scalar`, default the fastest the CPU
//! offers: a slower path can be measured on a CPU that has a faster one; the children run with
//! `STUDIO_CPU_PATH` set to it, so the weights are stored as that path reads them)
//!
//! Both sides use rayon's global pool, which reads `RAYON_NUM_THREADS` once, so each thread
//! count runs in a child process of this binary with that variable set (default: 1 and 2).
//! Weights are random bytes with sane scales (the speed does not depend on the values).

use std::borrow::Cow;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use studio_inference::quant::{CPU_PATH_ENV, KernelPath, QWeight, QuantFormat};

const SHAPES: [(usize, usize, &str); 4] = [
    (896, 4864, "gate/up"),
    (4864, 896, "down"),
    (896, 896, "q/o"),
    (896, 151_936, "lm_head"),
];
const MS: [usize; 2] = [1, 128];

fn random_weight(format: QuantFormat, n: usize, k: usize, rng: &mut StdRng) -> Vec<u8> {
    let blocks = n * k / format.block_size();
    let bb = format.block_bytes();
    let mut data = vec![0u8; blocks * bb];
    rng.fill(&mut data[..]);
    // A small positive f16 (≈ 0.004) wherever the format keeps a scale.
    let scale = 0x1C00u16.to_le_bytes();
    let put = |blk: &mut [u8], at: usize| blk[at..at + 2].copy_from_slice(&scale);
    let scales: &[usize] = match format {
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
    match format {
        QuantFormat::Q4_0
        | QuantFormat::Q4_1
        | QuantFormat::Q5_0
        | QuantFormat::Q5_1
        | QuantFormat::Q8_0
        | QuantFormat::Q2K
        | QuantFormat::Q3K
        | QuantFormat::Q4K
        | QuantFormat::Q5K
        | QuantFormat::Q6K
        | QuantFormat::IQ4NL
        | QuantFormat::IQ4XS => data
            .chunks_exact_mut(bb)
            .for_each(|b| scales.iter().for_each(|&at| put(b, at))),
        QuantFormat::F16 => data.chunks_exact_mut(2).for_each(|b| {
            let v = 0x2000u16 | (u16::from_le_bytes([b[0], b[1]]) & 0x83FF);
            b.copy_from_slice(&v.to_le_bytes());
        }),
        QuantFormat::BF16 => data.chunks_exact_mut(2).for_each(|b| {
            let v = 0x3C00u16 | (u16::from_le_bytes([b[0], b[1]]) & 0x807F);
            b.copy_from_slice(&v.to_le_bytes());
        }),
    }
    data
}

/// Median seconds per call of `f`, over at least 3 calls and about `budget`.
fn time(mut f: impl FnMut(), budget: Duration) -> f64 {
    f();
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || (start.elapsed() < budget && samples.len() < 200) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn child(formats: &[QuantFormat], shapes: &[String], ms: &[usize], path: KernelPath) {
    let threads = rayon::current_num_threads();
    let mut rng = StdRng::seed_from_u64(1);
    let budget = Duration::from_millis(800);
    for &format in formats {
        for &(k, n, what) in &SHAPES {
            if !shapes.is_empty() && !shapes.iter().any(|s| s == what) {
                continue;
            }
            if !k.is_multiple_of(format.block_size()) {
                // Qwen2-0.5B's K = 896 is no multiple of 256: its K-quant files store these
                // tensors in a 32-block fallback format.
                println!(
                    "{format:<5} {what:<8} {k:>5}→{n:<6} skipped: K is not a multiple of {}",
                    format.block_size()
                );
                continue;
            }
            let bytes = random_weight(format, n, k, &mut rng);
            let qw = QWeight::from_bytes(what, format, n, k, bytes.clone()).expect("weight");
            // candle has no kernel for IQ4_NL / IQ4_XS: Studio's alone is timed.
            let qmm = format.to_ggml().map(|dtype| {
                let storage =
                    QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype).expect("storage");
                let qt = QTensor::new(storage, (n, k)).expect("qtensor");
                QMatMul::from_qtensor(qt).expect("qmatmul")
            });
            for &m in ms {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("x");
                let mut y = vec![0f32; m * n];
                let studio = time(
                    || qw.matmul_with(&x, m, &mut y, path).expect("studio"),
                    budget,
                );
                let candle = qmm.as_ref().map_or(f64::NAN, |qmm| {
                    time(
                        || {
                            qmm.forward(&xt).expect("candle");
                        },
                        budget,
                    )
                });
                let flop = 2.0 * (m * n * k) as f64;
                println!(
                    "{:<5} {:<8} {:>5}→{:<6} M={:<3} threads={threads}  studio {:>7.1} GFLOP/s {:>9.3} ms   candle {:>7.1} GFLOP/s {:>9.3} ms   studio/candle {:>5.2}",
                    format.to_string(),
                    what,
                    k,
                    n,
                    m,
                    flop / studio / 1e9,
                    studio * 1e3,
                    flop / candle / 1e9,
                    candle * 1e3,
                    candle / studio,
                );
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut formats = Vec::new();
    let mut threads = Vec::new();
    let mut shapes = Vec::new();
    let mut ms = Vec::new();
    let mut path = KernelPath::detect();
    let mut it = args.iter().peekable();
    // `--m` and `--threads` take every number that follows (`--m 1 128`).
    let numbers = |it: &mut std::iter::Peekable<std::slice::Iter<'_, String>>| {
        let mut v = Vec::new();
        while let Some(n) = it.peek().and_then(|t| t.parse::<usize>().ok()) {
            v.push(n);
            it.next();
        }
        v
    };
    while let Some(a) = it.next() {
        if a == "--m" {
            ms.extend(numbers(&mut it));
        } else if a == "--threads" {
            threads.extend(numbers(&mut it));
        } else if a == "--path" {
            let name = it.next().map_or("", String::as_str);
            let Some(p) = KernelPath::ALL.into_iter().find(|p| p.to_string() == name) else {
                panic!("--path {name}: expected one of avx512-vnni, avx2, scalar");
            };
            assert!(p.available(), "--path {p}: this CPU cannot run it");
            path = p;
        } else if SHAPES.iter().any(|s| s.2 == a) {
            shapes.push(a.clone());
        } else if let Some(f) = QuantFormat::ALL
            .into_iter()
            .find(|f| f.to_string().eq_ignore_ascii_case(a))
        {
            formats.push(f);
        }
    }
    if formats.is_empty() {
        formats = vec![
            QuantFormat::Q4_0,
            QuantFormat::Q8_0,
            QuantFormat::Q4K,
            QuantFormat::Q6K,
        ];
    }
    if std::env::var_os("QUANT_BENCH_CHILD").is_some() {
        if ms.is_empty() {
            ms = MS.to_vec();
        }
        child(&formats, &shapes, &ms, path);
        return;
    }
    if threads.is_empty() {
        threads = vec![1, 2];
    }
    println!(
        "kernel path: {path} (fastest on this CPU: {})",
        KernelPath::detect()
    );
    let exe = std::env::current_exe().expect("own path");
    for t in threads {
        let status = Command::new(&exe)
            .args(formats.iter().map(ToString::to_string))
            .args(&shapes)
            .args(ms.iter().flat_map(|m| ["--m".to_owned(), m.to_string()]))
            .args(["--path".to_owned(), path.to_string()])
            .env("QUANT_BENCH_CHILD", "1")
            .env("RAYON_NUM_THREADS", t.to_string())
            // The weights are then stored as that path reads them (file order below AVX-512).
            .env(CPU_PATH_ENV, path.to_string())
            .status()
            .expect("child bench");
        assert!(status.success(), "the {t}-thread run failed");
    }
}
