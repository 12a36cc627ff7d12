//! Latent-space helpers (`gan::latent`) and `.npy` latents (`gan::npy`) on a tiny
//! random-weight StyleGAN2 written in NVIDIA's naming and loaded through the real loader.

use candle_core::{DType, Device, Tensor};
use studio_inference::gan::latent::{
    self, GifWriter, Keyframe, LatentText, RandomGanConfig, Space,
};
use studio_inference::gan::npy::{self, NpyArray};
use studio_inference::gan::{NoiseMode, StyleGan2};
use studio_tests::gan::{TinyStyleGan2, write_stylegan2};

fn tiny(dir: &std::path::Path) -> StyleGan2 {
    let path = dir.join("g.safetensors");
    write_stylegan2(&path, TinyStyleGan2::default(), 7, false);
    StyleGan2::load(&path, &Device::Cpu).expect("load tiny generator")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .expect("flatten")
        .to_dtype(DType::F32)
        .expect("f32")
        .to_vec1()
        .expect("vec")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn norm(t: &Tensor) -> f64 {
    values(t)
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

fn vec_tensor(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, (1, v.len()), &Device::Cpu).expect("tensor")
}

#[test]
fn lerp_and_slerp_endpoints_and_norms() {
    let a = vec_tensor(&[3.0, 0.0, 0.0, 0.0]);
    let b = vec_tensor(&[0.0, 3.0, 0.0, 0.0]);
    for f in [latent::lerp, latent::slerp] {
        assert_eq!(values(&f(&a, &b, 0.0).expect("t=0")), values(&a));
        assert_eq!(values(&f(&a, &b, 1.0).expect("t=1")), values(&b));
    }
    // Equal-norm vectors: slerp stays on the sphere, lerp cuts through it.
    for t in [0.1, 0.25, 0.5, 0.9] {
        let s = latent::slerp(&a, &b, t).expect("slerp");
        assert!(
            (norm(&s) - 3.0).abs() < 1e-5,
            "slerp norm {} at {t}",
            norm(&s)
        );
    }
    let mid = latent::lerp(&a, &b, 0.5).expect("lerp");
    assert!((norm(&mid) - 3.0 / 2f64.sqrt()).abs() < 1e-5);
    // The slerp midpoint is the normalized bisector.
    let s = values(&latent::slerp(&a, &b, 0.5).expect("slerp"));
    let k = 3.0 / 2f32.sqrt();
    assert!((s[0] - k).abs() < 1e-5 && (s[1] - k).abs() < 1e-5, "{s:?}");

    // Near-parallel vectors fall back to lerp instead of dividing by ~0.
    let c = vec_tensor(&[3.0, 1e-9, 0.0, 0.0]);
    let p = latent::slerp(&a, &c, 0.5).expect("parallel slerp");
    assert!(values(&p).iter().all(|v| v.is_finite()));
    assert!(max_diff(&p, &latent::lerp(&a, &c, 0.5).expect("lerp")) < 1e-6);
    // Zero vectors too.
    let z = vec_tensor(&[0.0; 4]);
    assert!(
        values(&latent::slerp(&z, &a, 0.5).expect("zero"))
            .iter()
            .all(|v| v.is_finite())
    );
    // Shapes must agree; 3-D tensors work like flat vectors.
    assert!(latent::slerp(&a, &vec_tensor(&[1.0, 2.0]), 0.5).is_err());
    let a3 = a.reshape((1, 2, 2)).expect("reshape");
    let b3 = b.reshape((1, 2, 2)).expect("reshape");
    let s3 = latent::slerp(&a3, &b3, 0.3).expect("3-D slerp");
    assert_eq!(s3.dims(), &[1, 2, 2]);
    assert!((norm(&s3) - 3.0).abs() < 1e-5);
}

#[test]
fn fractional_seeds_blend_neighbours() {
    let dir = tempfile::tempdir().expect("tmp");
    let gan = tiny(dir.path());
    let z5 = gan.z_from_seed(5).expect("z5");
    let z6 = gan.z_from_seed(6).expect("z6");
    assert_eq!(
        values(&latent::seed_blend(&gan, 5, 0.0).expect("blend")),
        values(&z5)
    );
    assert_eq!(
        values(&latent::seed_blend(&gan, 4, 1.0).expect("blend")),
        values(&z5)
    );
    let quarter = latent::seed_blend(&gan, 5, 0.25).expect("blend");
    let expected = ((&z5 * 0.75).expect("mul") + (&z6 * 0.25).expect("mul")).expect("add");
    assert!(max_diff(&quarter, &expected) < 1e-6);
    // Negative offsets step down.
    assert_eq!(
        latent::seed_neighbours(5, -0.25).expect("neighbours"),
        (4, 5, 0.75)
    );
    // Wrapping at numpy's limit, refusing larger seeds.
    assert_eq!(
        latent::seed_neighbours(u64::from(u32::MAX), 0.5).expect("wrap"),
        (u64::from(u32::MAX), 0, 0.5)
    );
    assert!(latent::seed_blend(&gan, 1 << 32, 0.0).is_err());

    // The visualizer's W blend: integer offsets give the mapped ws exactly.
    let w5 = gan.map(&z5, None, 0.7, None).expect("map");
    let w6 = gan.map(&z6, None, 0.7, None).expect("map");
    let wb = latent::seed_blend_ws(&gan, 5, 0.0, None, 0.7, None).expect("blend ws");
    assert_eq!(values(&wb), values(&w5));
    let wq = latent::seed_blend_ws(&gan, 5, 0.5, None, 0.7, None).expect("blend ws");
    let mid = latent::lerp(&w5, &w6, 0.5).expect("lerp");
    assert!(max_diff(&wq, &mid) < 1e-5);
}

#[test]
fn interpolation_endpoints_equal_the_keyframes() {
    let dir = tempfile::tempdir().expect("tmp");
    let gan = tiny(dir.path());
    let keys: Vec<Keyframe> = [1u64, 7, 42]
        .iter()
        .map(|&s| Keyframe::from_seed(&gan, s, None, 0.8, None).expect("keyframe"))
        .collect();
    for space in [Space::W, Space::Z] {
        for (k, t) in [(0, 0.0), (1, 0.5), (2, 1.0)] {
            let w = latent::interpolate(&gan, &keys, t, space).expect("interpolate");
            assert_eq!(values(&w), values(&keys[k].w), "{space:?} at t={t}");
        }
        let mid = latent::interpolate(&gan, &keys, 0.25, space).expect("interpolate");
        assert_eq!(mid.dims(), keys[0].w.dims());
        assert!(max_diff(&mid, &keys[0].w) > 1e-4, "{space:?} moved");
        // Out-of-range positions clamp to the ends.
        let past = latent::interpolate(&gan, &keys, 2.0, space).expect("interpolate");
        assert_eq!(values(&past), values(&keys[2].w));
    }
    // W: the midpoint of a segment is the average of its keyframes.
    let w = latent::interpolate(&gan, &keys, 0.25, Space::W).expect("interpolate");
    let avg = latent::lerp(&keys[0].w, &keys[1].w, 0.5).expect("lerp");
    assert!(max_diff(&w, &avg) < 1e-6);
    // Z: the mapped slerp of the keyframes' z.
    let z = latent::slerp(
        keys[0].z.as_ref().expect("z"),
        keys[1].z.as_ref().expect("z"),
        0.5,
    )
    .expect("slerp");
    let expected = gan.map(&z, None, 0.8, None).expect("map");
    let w = latent::interpolate(&gan, &keys, 0.25, Space::Z).expect("interpolate");
    assert!(max_diff(&w, &expected) < 1e-5);

    // W-only keyframes cannot be slerped in Z, and no keyframes is an error.
    let wonly = [Keyframe::from_w(keys[0].w.clone()), keys[1].clone()];
    assert!(latent::interpolate(&gan, &wonly, 0.5, Space::Z).is_err());
    assert!(latent::interpolate(&gan, &wonly, 0.5, Space::W).is_ok());
    assert!(latent::interpolate(&gan, &[], 0.5, Space::W).is_err());
    assert_eq!(Space::parse("Z").expect("z"), Space::Z);
    assert!(Space::parse("q").is_err());
}

#[test]
fn style_mixing_picks_rows() {
    let dir = tempfile::tempdir().expect("tmp");
    let gan = tiny(dir.path());
    let num_ws = gan.info().num_ws;
    let a = gan
        .map(&gan.z_from_seed(1).expect("z"), None, 1.0, None)
        .expect("map");
    let b = gan
        .map(&gan.z_from_seed(2).expect("z"), None, 1.0, None)
        .expect("map");
    let layers: Vec<bool> = (0..num_ws).map(|i| i % 3 == 1 || i >= num_ws - 2).collect();
    let mixed = latent::style_mix(&a, &b, &layers).expect("mix");
    assert_eq!(mixed.dims(), a.dims());
    for (i, &from_b) in layers.iter().enumerate() {
        let row = mixed.narrow(1, i, 1).expect("row");
        let src = if from_b { &b } else { &a };
        assert_eq!(
            values(&row),
            values(&src.narrow(1, i, 1).expect("row")),
            "row {i}"
        );
    }
    let all_a = latent::style_mix(&a, &b, &vec![false; num_ws]).expect("mix");
    assert_eq!(values(&all_a), values(&a));
    assert!(latent::style_mix(&a, &b, &[true]).is_err());
    // The mixed latent renders.
    let img = latent::render(&gan, &mixed, NoiseMode::Const).expect("render");
    assert_eq!((img.width, img.height), (32, 32));
}

#[test]
fn npy_round_trips_and_refuses_what_it_cannot_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let gan = tiny(dir.path());
    let ws = gan
        .map(&gan.z_from_seed(3).expect("z"), None, 0.5, None)
        .expect("map");
    let path = dir.path().join("w.npy");
    npy::write_tensor(&path, &ws).expect("write");
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    assert_eq!((10 + header_len) % 64, 0, "data starts 64-aligned");
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("text");
    assert!(
        header.contains("'descr': '<f4'") && header.contains("(1, 8, 16)"),
        "{header}"
    );
    let back = npy::read_ws(&path, &gan).expect("read ws");
    assert_eq!(values(&back), values(&ws));

    // A single w row is repeated for every layer; z in either shape.
    let row = ws
        .narrow(1, 0, 1)
        .expect("row")
        .squeeze(0)
        .expect("squeeze");
    let p = dir.path().join("row.npy");
    npy::write_tensor(&p, &row).expect("write");
    let rep = npy::read_ws(&p, &gan).expect("row ws");
    assert_eq!(
        values(&rep),
        values(&row.unsqueeze(0).expect("u").repeat((1, 8, 1)).expect("r"))
    );
    let z = gan.z_from_seed(9).expect("z");
    let p = dir.path().join("z.npy");
    npy::write_tensor(&p, &z.squeeze(0).expect("squeeze")).expect("write");
    assert_eq!(values(&npy::read_z(&p, &gan).expect("z")), values(&z));
    assert!(
        npy::read_ws(&p, &gan).is_ok(),
        "z_dim == w_dim: a single w row"
    );
    let wrong = dir.path().join("wrong.npy");
    npy::write_tensor(&wrong, &vec_tensor(&[1.0, 2.0, 3.0])).expect("write");
    let e = npy::read_z(&wrong, &gan)
        .expect_err("wrong shape")
        .to_string();
    assert!(e.contains("[1, 3]") && e.contains("(16,)"), "{e}");

    // Hand-made headers: float64, version 2, 1-D shapes with a trailing comma.
    let make = |major: u8, dict: &str, data: &[u8]| {
        let mut b = b"\x93NUMPY".to_vec();
        b.extend_from_slice(&[major, 0]);
        let mut h = dict.to_owned();
        h.push('\n');
        if major == 1 {
            b.extend_from_slice(&u16::try_from(h.len()).expect("len").to_le_bytes());
        } else {
            b.extend_from_slice(&u32::try_from(h.len()).expect("len").to_le_bytes());
        }
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(data);
        b
    };
    let f64s: Vec<u8> = [1.5f64, -2.0, 0.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let a = npy::parse(&make(
        2,
        "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }",
        &f64s,
    ))
    .expect("f64 v2");
    assert_eq!(
        a,
        NpyArray {
            shape: vec![3],
            data: vec![1.5, -2.0, 0.25]
        }
    );
    let a = npy::parse(&make(
        1,
        "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
        &7f32.to_le_bytes(),
    ))
    .expect("scalar");
    assert_eq!((a.shape.len(), a.data.as_slice()), (0, &[7f32][..]));

    let err = |b: Vec<u8>| npy::parse(&b).expect_err("must fail").to_string();
    let e = err(make(
        1,
        "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
        &f64s,
    ));
    assert!(e.contains("<i8") && e.contains("float32"), "{e}");
    let e = err(make(
        1,
        "{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }",
        &f64s[..12],
    ));
    assert!(e.contains("big-endian"), "{e}");
    let e = err(make(
        1,
        "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 1), }",
        &f64s[..12],
    ));
    assert!(e.contains("Fortran"), "{e}");
    let e = err(make(
        1,
        "{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }",
        &f64s,
    ));
    assert!(e.contains("truncated"), "{e}");
    let e = err(bytes[..20].to_vec());
    assert!(e.contains("truncated"), "{e}");
    let e = err(b"PK\x03\x04 this is an npz".to_vec());
    assert!(e.contains("magic"), "{e}");
    let e = npy::read(&dir.path().join("missing.npy"))
        .expect_err("missing")
        .to_string();
    assert!(e.contains("missing.npy"), "{e}");
}

#[test]
fn latent_text_round_trips() {
    let t = LatentText {
        source: "seed 42+0.25".into(),
        psi: 0.7,
        cutoff: Some(8),
        noise: NoiseMode::Random { seed: 3 },
        class: Some(2),
        model: "my model; v2.safetensors".into(),
    };
    let text = t.to_text();
    assert!(
        text.starts_with("StyleGAN2 latent: seed 42+0.25; psi 0.7;"),
        "{text}"
    );
    assert_eq!(LatentText::parse(&text), Some(t));
    let t = LatentText {
        source: "w-file w.npy".into(),
        psi: 1.0,
        cutoff: None,
        noise: NoiseMode::None,
        class: None,
        model: "g.safetensors".into(),
    };
    assert_eq!(LatentText::parse(&t.to_text()), Some(t));
    assert_eq!(LatentText::parse("a photo of a cat"), None);
}

#[test]
fn gif_writer_and_random_generator() {
    let cfg = RandomGanConfig {
        resolution: 16,
        z_dim: 8,
        w_dim: 8,
        mapping_layers: 2,
        channel_base: 64,
        channel_max: 8,
    };
    let gan = latent::random_generator(cfg, &Device::Cpu).expect("random generator");
    assert_eq!(gan.info().resolution, 16);
    assert_eq!(gan.info().channels, vec![(4, 8), (8, 8), (16, 4)]);
    let f = RandomGanConfig::stylegan2_f(1024);
    assert_eq!(
        (f.channels(4), f.channels(128), f.channels(1024)),
        (512, 256, 32)
    );

    let mut buf = Vec::new();
    {
        let mut gif = GifWriter::new(&mut buf, 10.0).expect("gif");
        for seed in 0..3 {
            let ws = gan
                .map(&gan.z_from_seed(seed).expect("z"), None, 1.0, None)
                .expect("map");
            let img = latent::render(&gan, &ws, NoiseMode::Const).expect("render");
            gif.add_frame(&img).expect("frame");
        }
        assert_eq!(gif.frames(), 3);
    }
    assert!(buf.starts_with(b"GIF89a"));
    assert!(GifWriter::new(Vec::new(), 0.0).is_err());
}

/// A latent with NaN or ∞ in it is refused with the index named, not rendered black.
#[test]
fn npy_latents_with_nan_or_infinity_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let gan = tiny(dir.path());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut z = vec![0.5f32; gan.info().z_dim];
        z[3] = bad;
        let t = candle_core::Tensor::from_vec(z, (1, gan.info().z_dim), &candle_core::Device::Cpu)
            .expect("tensor");
        let path = dir.path().join("z.npy");
        npy::write_tensor(&path, &t).expect("write");
        let e = npy::read_z(&path, &gan).expect_err("refused").to_string();
        assert!(e.contains("value 3") && e.contains("finite"), "{bad}: {e}");
    }
}
