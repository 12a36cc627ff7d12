//! Images for the Canvas and the pipeline: decoding PNG/JPEG/WebP (alpha over white, very
//! large images downscaled, the `parameters` chunk), masks, compositing and image ↔ tensor.

use candle_core::{DType, Device, Tensor};
use studio_inference::diffusion::imaging::*;
use studio_inference::error::Error;
use studio_inference::image_meta::{self, GenerationParameters};

/// A 16×8 JPEG (quality 95), left half red, right half blue; made with Pillow:
/// `Image.new("RGB", (16, 8))`, pixels `(255, 0, 0)` for x < 8 else `(0, 0, 255)`,
/// `save(..., "JPEG", quality=95)`.
const JPEG_RED_BLUE: &[u8] = &[
    0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46, 0x49, 0x46, 0x00, 0x01, 0x01, 0x00, 0x00, 0x01,
    0x00, 0x01, 0x00, 0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x02, 0x01, 0x01, 0x01, 0x01, 0x01, 0x02,
    0x01, 0x01, 0x01, 0x02, 0x02, 0x02, 0x02, 0x02, 0x04, 0x03, 0x02, 0x02, 0x02, 0x02, 0x05, 0x04,
    0x04, 0x03, 0x04, 0x06, 0x05, 0x06, 0x06, 0x06, 0x05, 0x06, 0x06, 0x06, 0x07, 0x09, 0x08, 0x06,
    0x07, 0x09, 0x07, 0x06, 0x06, 0x08, 0x0b, 0x08, 0x09, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x06, 0x08,
    0x0b, 0x0c, 0x0b, 0x0a, 0x0c, 0x09, 0x0a, 0x0a, 0x0a, 0xff, 0xdb, 0x00, 0x43, 0x01, 0x02, 0x02,
    0x02, 0x02, 0x02, 0x02, 0x05, 0x03, 0x03, 0x05, 0x0a, 0x07, 0x06, 0x07, 0x0a, 0x0a, 0x0a, 0x0a,
    0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a,
    0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a,
    0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a, 0xff, 0xc0,
    0x00, 0x11, 0x08, 0x00, 0x08, 0x00, 0x10, 0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11,
    0x01, 0xff, 0xc4, 0x00, 0x1f, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09,
    0x0a, 0x0b, 0xff, 0xc4, 0x00, 0xb5, 0x10, 0x00, 0x02, 0x01, 0x03, 0x03, 0x02, 0x04, 0x03, 0x05,
    0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7d, 0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21,
    0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23,
    0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17,
    0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a,
    0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a,
    0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
    0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
    0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7,
    0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5,
    0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1,
    0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xff, 0xc4, 0x00, 0x1f, 0x01, 0x00, 0x03,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xff, 0xc4, 0x00, 0xb5, 0x11, 0x00,
    0x02, 0x01, 0x02, 0x04, 0x04, 0x03, 0x04, 0x07, 0x05, 0x04, 0x04, 0x00, 0x01, 0x02, 0x77, 0x00,
    0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71, 0x13,
    0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0, 0x15,
    0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26, 0x27,
    0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88,
    0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6,
    0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4,
    0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe2,
    0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9,
    0xfa, 0xff, 0xda, 0x00, 0x0c, 0x03, 0x01, 0x00, 0x02, 0x11, 0x03, 0x11, 0x00, 0x3f, 0x00, 0xf8,
    0xbe, 0xbe, 0x43, 0xa2, 0x8a, 0xfe, 0xa8, 0xfd, 0x99, 0x7f, 0xf3, 0x55, 0xff, 0x00, 0xdc, 0x8f,
    0xfe, 0xee, 0x1f, 0xda, 0x9f, 0xb4, 0x33, 0xfe, 0x69, 0x9f, 0xfb, 0x9d, 0xff, 0x00, 0xdd, 0x43,
    0xff, 0xd9,
];

/// A 2×2 lossless WebP with alpha; made with Pillow: RGBA pixels red, green, blue (opaque) and
/// a fully transparent one, `save(..., "WEBP", lossless=True)`.
const WEBP_RGBA: &[u8] = &[
    0x52, 0x49, 0x46, 0x46, 0x2a, 0x00, 0x00, 0x00, 0x57, 0x45, 0x42, 0x50, 0x56, 0x50, 0x38, 0x4c,
    0x1e, 0x00, 0x00, 0x00, 0x2f, 0x01, 0x40, 0x00, 0x10, 0x1f, 0x20, 0x10, 0x48, 0xda, 0x1f, 0x7a,
    0x8d, 0xf9, 0x17, 0x10, 0x14, 0xf9, 0x3f, 0xda, 0xfc, 0x07, 0xf0, 0xa5, 0x60, 0x17, 0x22, 0xfa,
    0x1f, 0x01,
];

/// A deterministic "random" image (xorshift), so tests need no RNG crate state.
fn noise_image(width: u32, height: u32, seed: u32) -> RgbImage {
    let mut s = seed.max(1);
    let pixels = (0..width * height * 3)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 24) as u8
        })
        .collect();
    RgbImage {
        width,
        height,
        pixels,
    }
}

fn pixel(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    let i = ((y * img.width + x) * 3) as usize;
    [img.pixels[i], img.pixels[i + 1], img.pixels[i + 2]]
}

fn assert_not_an_image(result: Result<Decoded, Error>) -> String {
    match result {
        Err(Error::InvalidParameter(m)) => {
            assert!(m.contains("not an image"), "unclear message: {m}");
            m
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(d) => panic!("decoded a {}x{} image", d.image.width, d.image.height),
    }
}

#[test]
fn png_round_trips_pixels_and_parameters() {
    let img = noise_image(7, 5, 3);
    let text = "a lighthouse, (oil painting:1.2)\nNegative prompt: blurry\n\
                Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 7x5";
    let bytes = encode_png(&img, Some(text)).expect("encode");
    let d = decode_image_bytes(&bytes).expect("decode");
    assert_eq!(d.image, img);
    assert_eq!(d.downscaled_from, None);
    assert_eq!(d.parameters.as_deref(), Some(text));
    let p = GenerationParameters::parse(d.parameters.as_deref().expect("text"));
    assert_eq!(p.seed(), Some(1));

    // Non-Latin-1 text goes into iTXt and still comes back exactly.
    let text = "日本の灯台 🎨\nSteps: 4, Seed: 2, Size: 7x5";
    let d = decode_image_bytes(&encode_png(&img, Some(text)).expect("encode")).expect("decode");
    assert_eq!(d.parameters.as_deref(), Some(text));

    // Without parameters: no chunk.
    let d = decode_image_bytes(&encode_png(&img, None).expect("encode")).expect("decode");
    assert_eq!(d.image, img);
    assert_eq!(d.parameters, None);
}

#[test]
fn png_alpha_is_composited_over_white() {
    // (10, 20, 30) at alpha 255, 0 and 128, then black at alpha 51.
    let rgba = [10, 20, 30, 255, 10, 20, 30, 0, 10, 20, 30, 128, 0, 0, 0, 51];
    let bytes =
        image_meta::encode_png(4, 1, &rgba, &GenerationParameters::default()).expect("encode");
    let d = decode_image_bytes(&bytes).expect("decode");
    assert_eq!((d.image.width, d.image.height), (4, 1));
    assert_eq!(pixel(&d.image, 0, 0), [10, 20, 30]);
    assert_eq!(pixel(&d.image, 1, 0), [255, 255, 255]);
    // c·a/255 + 255·(1 − a/255), rounded: 10·128/255 + 127 = 132.0, 137.0, 142.1.
    assert_eq!(pixel(&d.image, 2, 0), [132, 137, 142]);
    assert_eq!(pixel(&d.image, 3, 0), [204, 204, 204]);
}

#[test]
fn jpeg_decodes() {
    let d = decode_image_bytes(JPEG_RED_BLUE).expect("decode");
    assert_eq!((d.image.width, d.image.height), (16, 8));
    assert_eq!(d.parameters, None);
    let close = |got: [u8; 3], want: [u8; 3]| {
        got.iter()
            .zip(want)
            .all(|(&g, w)| (i32::from(g) - i32::from(w)).abs() <= 24)
    };
    for (x, want) in [(2, [255, 0, 0]), (13, [0, 0, 255])] {
        let got = pixel(&d.image, x, 4);
        assert!(
            close(got, want),
            "pixel {x}: {got:?}, expected about {want:?}"
        );
    }
}

#[test]
fn webp_decodes_with_alpha_over_white() {
    let d = decode_image_bytes(WEBP_RGBA).expect("decode");
    assert_eq!((d.image.width, d.image.height), (2, 2));
    assert_eq!(
        d.image.pixels,
        [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]
    );
}

#[test]
fn non_images_and_truncated_files_are_refused_clearly() {
    assert_not_an_image(decode_image_bytes(b"Hello, this is a text file.\n"));
    assert_not_an_image(decode_image_bytes(&[]));
    assert_not_an_image(decode_image_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"));
    let png = encode_png(&noise_image(32, 32, 9), None).expect("encode");
    let m = assert_not_an_image(decode_image_bytes(&png[..png.len() / 2]));
    assert!(m.contains("truncated"), "{m}");
    assert_not_an_image(decode_image_bytes(&JPEG_RED_BLUE[..200]));
}

#[test]
fn files_decode_and_errors_name_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = noise_image(3, 3, 5);
    let good = dir.path().join("in.png");
    std::fs::write(&good, encode_png(&img, Some("x")).expect("encode")).expect("write");
    let d = decode_image_file(&good).expect("decode");
    assert_eq!(d.image, img);
    assert_eq!(d.parameters.as_deref(), Some("x"));

    let missing = dir.path().join("nope.png");
    match decode_image_file(&missing) {
        Err(Error::NotFound(p)) => assert_eq!(p, missing),
        other => panic!("expected NotFound, got {other:?}", other = other.err()),
    }
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not really a png").expect("write");
    let err = decode_image_file(&text).expect_err("a text file");
    let msg = err.to_string();
    assert!(
        msg.contains("notes.png") && msg.contains("not an image"),
        "{msg}"
    );
}

#[test]
fn images_over_the_maximum_side_are_downscaled_keeping_the_aspect_ratio() {
    let img = RgbImage::new_filled(9000, 10, [40, 120, 200]);
    let bytes = encode_png(&img, None).expect("encode");
    let d = decode_image_bytes(&bytes).expect("decode");
    assert_eq!(d.downscaled_from, Some((9000, 10)));
    assert_eq!((d.image.width, d.image.height), (MAX_SIDE, 9));
    assert_eq!(d.image.pixels.len(), MAX_SIDE as usize * 9 * 3);
    assert_eq!(pixel(&d.image, 4000, 4), [40, 120, 200]);

    // Exactly the maximum is left alone.
    let img = RgbImage::new_filled(MAX_SIDE, 2, [1, 2, 3]);
    let d = decode_image_bytes(&encode_png(&img, None).expect("encode")).expect("decode");
    assert_eq!(d.downscaled_from, None);
    assert_eq!(d.image, img);
}

#[test]
fn masks_from_luminance_invert_resize_and_blur() {
    let img = RgbImage {
        width: 4,
        height: 1,
        pixels: vec![0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 255, 0],
    };
    let m = mask_from_image(&img);
    assert_eq!(m.values, [0, 255, 76, 150]);
    assert_eq!(m.inverted().values, [255, 0, 179, 105]);
    assert!(!m.is_empty());
    assert!(Mask::new_filled(3, 3, 0).is_empty());
    assert!(!Mask::new_filled(3, 3, 1).is_empty());
    assert!(Mask::new_filled(3, 3, 255).inverted().is_empty());

    // Resize: a uniform mask stays uniform; sizes follow.
    let r = Mask::new_filled(10, 6, 200).resized(25, 3);
    assert_eq!((r.width, r.height, r.values.len()), (25, 3, 75));
    assert!(r.values.iter().all(|&v| v == 200), "{:?}", r.values);
    // A hard left/right split keeps its sides when upscaled.
    let mut split = Mask::new_filled(8, 8, 0);
    for y in 0..8 {
        for x in 4..8 {
            split.values[y * 8 + x] = 255;
        }
    }
    let big = split.resized(32, 32);
    assert_eq!(big.values[10 * 32 + 2], 0);
    assert_eq!(big.values[10 * 32 + 30], 255);

    // Blur: radius 0 is the identity; a hard edge becomes a monotone ramp, symmetric around
    // the edge, and far pixels are untouched.
    assert_eq!(split.blurred(0.0), split);
    let wide = {
        let mut m = Mask::new_filled(40, 3, 0);
        for y in 0..3 {
            for x in 20..40 {
                m.values[y * 40 + x] = 255;
            }
        }
        m
    };
    let b = wide.blurred(2.0);
    let row: Vec<u8> = b.values[40..80].to_vec();
    assert_eq!(row[0], 0);
    assert_eq!(row[39], 255);
    assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    assert!(row[18] > 0 && row[18] < 128, "{row:?}");
    assert!(row[21] > 128 && row[21] < 255, "{row:?}");
    for d in 0..8 {
        assert!(
            (i32::from(row[19 - d]) + i32::from(row[20 + d]) - 255).abs() <= 1,
            "not symmetric: {row:?}"
        );
    }
    // A single bright pixel spreads but keeps (about) its total.
    let mut dot = Mask::new_filled(21, 21, 0);
    dot.values[10 * 21 + 10] = 255;
    let spread = dot.blurred(1.5);
    assert!(spread.values[10 * 21 + 10] < 255);
    assert!(spread.values[10 * 21 + 12] > 0);
    let total: u32 = spread.values.iter().map(|&v| u32::from(v)).sum();
    assert!((200..=310).contains(&total), "total {total}");
}

#[test]
fn composite_keeps_unmasked_pixels_bit_exact() {
    let original = noise_image(16, 9, 1);
    let generated = noise_image(16, 9, 2);
    let mut mask = Mask::new_filled(16, 9, 0);
    for (i, v) in mask.values.iter_mut().enumerate() {
        *v = match i % 4 {
            0 | 1 => 0,
            2 => 255,
            _ => 128,
        };
    }
    let out = composite(&original, &generated, &mask).expect("composite");
    for (i, &m) in mask.values.iter().enumerate() {
        let (o, g, r) = (
            &original.pixels[i * 3..i * 3 + 3],
            &generated.pixels[i * 3..i * 3 + 3],
            &out.pixels[i * 3..i * 3 + 3],
        );
        match m {
            0 => assert_eq!(r, o),
            255 => assert_eq!(r, g),
            _ => {
                for c in 0..3 {
                    let want = (f32::from(o[c]) * 127.0 + f32::from(g[c]) * 128.0) / 255.0;
                    assert!((f32::from(r[c]) - want).abs() <= 0.5, "{r:?} {o:?} {g:?}");
                }
            }
        }
    }
    let small = Mask::new_filled(8, 9, 0);
    assert!(matches!(
        composite(&original, &generated, &small),
        Err(Error::InvalidParameter(_))
    ));
}

#[test]
fn images_and_tensors_round_trip() {
    let img = noise_image(5, 3, 11);
    let t = image_to_tensor(&img, &Device::Cpu).expect("to tensor");
    assert_eq!(t.dims(), &[1, 3, 3, 5]);
    assert_eq!(t.dtype(), DType::F32);
    let v = t
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec");
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    // Channel-first: the green value of pixel (4, 2).
    let [_, g, _] = pixel(&img, 4, 2);
    assert!((v[15 + 2 * 5 + 4] - (f32::from(g) / 127.5 - 1.0)).abs() < 1e-6);
    assert_eq!(tensor_to_image(&t).expect("to image"), img);
    // (3, H, W), f16 and out-of-range values (clamped).
    let t3 = t
        .squeeze(0)
        .expect("squeeze")
        .to_dtype(DType::F16)
        .expect("f16");
    assert_eq!(tensor_to_image(&t3).expect("to image"), img);
    let wild = Tensor::new(
        &[[[-3.0f32, 0.0]], [[2.0, 1.0]], [[-1.0, 0.5]]],
        &Device::Cpu,
    )
    .expect("tensor");
    let out = tensor_to_image(&wild).expect("to image");
    assert_eq!(out.pixels, [0, 255, 0, 128, 255, 191]);
    assert!(
        tensor_to_image(&Tensor::zeros((2, 3, 2, 2), DType::F32, &Device::Cpu).expect("z"))
            .is_err()
    );
}

#[test]
fn masks_downsample_to_latent_size_by_area() {
    let mut mask = Mask::new_filled(16, 16, 0);
    for y in 0..16 {
        for x in 0..8 {
            mask.values[y * 16 + x] = 255;
        }
    }
    // A quarter of the bottom-right cell is masked.
    for y in 8..12 {
        for x in 8..12 {
            mask.values[y * 16 + x] = 255;
        }
    }
    let t = mask_to_latent_tensor(&mask, 2, 2, &Device::Cpu).expect("latent mask");
    assert_eq!(t.dims(), &[1, 1, 2, 2]);
    let v = t
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec");
    assert_eq!(v, [1.0, 0.0, 1.0, 0.25]);
    assert!(mask_to_latent_tensor(&mask, 0, 2, &Device::Cpu).is_err());
}

#[test]
fn crop_fill_and_rgba() {
    let img = noise_image(6, 4, 7);
    let c = img.crop(2, 1, 3, 2);
    assert_eq!((c.width, c.height), (3, 2));
    assert_eq!(pixel(&c, 0, 0), pixel(&img, 2, 1));
    assert_eq!(pixel(&c, 2, 1), pixel(&img, 4, 2));
    // Cut at the edges.
    let edge = img.crop(4, 3, 10, 10);
    assert_eq!((edge.width, edge.height), (2, 1));
    assert_eq!(pixel(&edge, 1, 0), pixel(&img, 5, 3));
    let f = RgbImage::new_filled(2, 1, [1, 2, 3]);
    assert_eq!(f.pixels, [1, 2, 3, 1, 2, 3]);
    assert_eq!(f.to_rgba(), [1, 2, 3, 255, 1, 2, 3, 255]);
    let r = img.resized(12, 8);
    assert_eq!((r.width, r.height, r.pixels.len()), (12, 8, 12 * 8 * 3));
    assert_eq!(
        RgbImage::new_filled(5, 5, [9, 99, 199]).resized(3, 7),
        RgbImage::new_filled(3, 7, [9, 99, 199])
    );
}

/// A PNG whose header claims `w × h` grey pixels, with a token of (invalid) image data: what a
/// decompression bomb looks like before its pixels are read.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(b"IEND", &[]);
    out
}

/// Decompression bombs are refused from the header, before any pixel is decoded: the sizes
/// the issue found (32000² grey: 10.3 GB before; 16000² RGB) and one past the pixel budget.
#[test]
fn image_bombs_are_refused_from_the_header() {
    for (w, h) in [
        (32_000, 32_000),
        (16_384, 16_384),
        (20_000, 100),
        (16_000, 9_000),
    ] {
        let start = std::time::Instant::now();
        let err = decode_image_bytes(&png_header_only(w, h))
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("too large") && err.contains(&w.to_string()) || err.contains("px a side"),
            "{w}×{h}: {err}"
        );
        assert!(
            start.elapsed().as_secs() < 5,
            "{w}×{h} took {:?}",
            start.elapsed()
        );
    }
    // Within the budget, the same header reaches the decoder (and its data is corrupt).
    let err = decode_image_bytes(&png_header_only(64, 64))
        .expect_err("corrupt")
        .to_string();
    assert!(err.contains("corrupt or truncated"), "{err}");
}

/// The downscale averages each output pixel's source area.
#[test]
fn area_downscale_averages_source_areas() {
    let img = RgbImage {
        width: 4,
        height: 2,
        pixels: [
            [0, 0, 0],
            [100, 0, 0],
            [0, 10, 0],
            [0, 30, 0],
            [0, 0, 0],
            [100, 0, 0],
            [0, 10, 0],
            [0, 30, 0],
        ]
        .concat(),
    };
    let d = img.area_downscaled(2, 1);
    assert_eq!((d.width, d.height), (2, 1));
    assert_eq!(d.pixels, [50, 0, 0, 0, 20, 0]);
    // A 3 → 2 column span rounds each output's range and still covers every source column.
    let d = img.area_downscaled(3, 2);
    assert_eq!((d.width, d.height, d.pixels.len()), (3, 2, 18));
}

/// An absurd mask blur is capped at the mask's size instead of sizing a kernel from it.
#[test]
fn absurd_mask_blur_is_bounded() {
    let m = Mask::new_filled(8, 8, 255);
    for r in [1e9, f32::INFINITY, f32::MAX] {
        let b = m.blurred(r);
        assert_eq!(b.values.len(), 64);
        assert!(b.values.iter().all(|&v| v == 255), "{r}: {:?}", b.values);
    }
    assert_eq!(m.blurred(f32::NAN), m);
}
