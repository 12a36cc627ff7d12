//! ControlNet annotators against OpenCV, as the SD web UI's ControlNet extension runs them
//! (fixture `tests/fixtures/annotators`, made by `tools/make_annotator_fixture.py`): Canny at
//! two threshold pairs equal to `cv2.Canny` on every pixel, `scribble_xdog` equal to the
//! extension's on all but `f32`-rounding pixels, `invert` exact, a uniform image without
//! edges or lines, and the preprocessor names.

use std::path::{Path, PathBuf};

use studio_inference::diffusion::annotators::{Preprocessor, canny, invert, scribble_xdog};
use studio_inference::diffusion::imaging::{RgbImage, decode_image_file};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/annotators")
}

fn load(name: &str) -> RgbImage {
    let path = fixtures().join(name);
    decode_image_file(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .image
}

/// Compares `got`'s channels with the reference's first channel (a grey PNG decodes to three
/// equal channels); returns how many pixels differ, after checking `got`'s channels agree.
fn differing(what: &str, got: &RgbImage, want: &RgbImage) -> usize {
    assert_eq!(
        (got.width, got.height),
        (want.width, want.height),
        "{what}: size"
    );
    let mut diff = 0;
    for (i, (g, w)) in got
        .pixels
        .chunks_exact(3)
        .zip(want.pixels.chunks_exact(3))
        .enumerate()
    {
        assert!(
            g[0] == g[1] && g[1] == g[2] && (g[0] == 0 || g[0] == 255),
            "{what}: pixel {i} is {g:?}, not black or white"
        );
        if g[0] != w[0] {
            if diff < 10 {
                let x = i % got.width as usize;
                let y = i / got.width as usize;
                println!("{what}: ({x}, {y}) is {} where OpenCV has {}", g[0], w[0]);
            }
            diff += 1;
        }
    }
    let on = want.pixels.chunks_exact(3).filter(|p| p[0] == 255).count();
    println!(
        "{what}: {diff} of {} pixels differ ({on} white in the reference)",
        got.pixels.len() / 3
    );
    assert!(on > 50, "{what}: degenerate reference");
    diff
}

#[test]
fn canny_matches_opencv_exactly() {
    let input = load("input.png");
    for (low, high, file) in [
        (100.0, 200.0, "canny_100_200.png"),
        (50.0, 120.0, "canny_50_120.png"),
    ] {
        let got = canny(&input, low, high);
        let want = load(file);
        assert_eq!(differing(file, &got, &want), 0, "{file}: every pixel");
        // Swapped thresholds are the same thresholds, as in OpenCV.
        assert_eq!(canny(&input, high, low), got, "{file}: swapped thresholds");
    }
}

#[test]
fn scribble_xdog_matches_the_extension() {
    let input = load("input.png");
    let got = scribble_xdog(&input, 32.0);
    let want = load("scribble_xdog_32.png");
    let diff = differing("scribble_xdog_32", &got, &want);
    // The blurs are f32 sums whose order is OpenCV's SIMD code's (or IPP's): a pixel whose
    // difference of Gaussians lands within rounding of a threshold may flip.
    let total = (got.width * got.height) as usize;
    assert!(diff * 200 <= total, "{diff} of {total} pixels differ");
}

#[test]
fn invert_is_exact() {
    let input = load("input.png");
    let got = invert(&input);
    assert_eq!((got.width, got.height), (input.width, input.height));
    assert!(
        got.pixels
            .iter()
            .zip(&input.pixels)
            .all(|(&g, &v)| u16::from(g) + u16::from(v) == 255)
    );
    assert_eq!(invert(&got), input, "inverting twice gives the image back");
    assert_eq!(Preprocessor::Invert.apply(&input), got);
}

#[test]
fn uniform_image_has_no_edges_or_lines() {
    for rgb in [[0, 0, 0], [128, 64, 200], [255, 255, 255]] {
        let img = RgbImage::new_filled(37, 23, rgb);
        let black = RgbImage::new_filled(37, 23, [0, 0, 0]);
        assert_eq!(canny(&img, 0.0, 0.0), black, "canny of {rgb:?}");
        assert_eq!(canny(&img, 100.0, 200.0), black, "canny of {rgb:?}");
        assert_eq!(scribble_xdog(&img, 32.0), black, "xdog of {rgb:?}");
    }
    // Degenerate sizes and a malformed buffer do not panic.
    let tiny = RgbImage::new_filled(1, 1, [9, 9, 9]);
    assert_eq!(canny(&tiny, 1.0, 2.0).pixels, vec![0, 0, 0]);
    assert_eq!(scribble_xdog(&tiny, 32.0).pixels, vec![0, 0, 0]);
    let empty = RgbImage::new_filled(0, 5, [0, 0, 0]);
    assert!(canny(&empty, 1.0, 2.0).pixels.is_empty());
    assert!(scribble_xdog(&empty, 32.0).pixels.is_empty());
    let bad = RgbImage {
        width: 4,
        height: 4,
        pixels: vec![0; 5],
    };
    assert_eq!(canny(&bad, 1.0, 2.0).width, 0);
    assert_eq!(scribble_xdog(&bad, 32.0).width, 0);
    assert_eq!(invert(&bad).width, 0);
}

#[test]
fn preprocessor_names_round_trip() {
    let all = [
        Preprocessor::None,
        Preprocessor::Canny {
            low: 100.0,
            high: 200.0,
        },
        Preprocessor::ScribbleXdog { threshold: 32.0 },
        Preprocessor::Invert,
    ];
    let names: Vec<&str> = all.iter().map(Preprocessor::name).collect();
    assert_eq!(names, ["none", "canny", "scribble_xdog", "invert"]);
    for p in all {
        assert_eq!(Preprocessor::parse(p.name()), Some(p), "{}", p.name());
    }
    assert_eq!(
        Preprocessor::parse(" Canny "),
        Some(Preprocessor::Canny {
            low: 100.0,
            high: 200.0
        })
    );
    assert_eq!(Preprocessor::parse("depth_midas"), None);
    assert_eq!(Preprocessor::parse(""), None);

    let input = load("input.png");
    assert_eq!(Preprocessor::None.apply(&input), input);
    assert_eq!(
        Preprocessor::Canny {
            low: 50.0,
            high: 120.0
        }
        .apply(&input),
        canny(&input, 50.0, 120.0)
    );
    assert_eq!(
        Preprocessor::ScribbleXdog { threshold: 32.0 }.apply(&input),
        scribble_xdog(&input, 32.0)
    );
}
