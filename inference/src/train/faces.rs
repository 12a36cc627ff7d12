//! Cartoon faces with known factors, for the demo GAN: a plain background, a face of one skin
//! colour, two eyes (small or large), a mouth (smiling, flat or frowning) and hair (none, or
//! one of a few colours) on top. [`Face::render`] draws one; [`read`] reads the factors back
//! out of an image, deterministically, so generated faces can be graded: how many read as a
//! face at all, and how the factors spread against the real set's.
//!
//! The reader samples where each feature must be: the cheeks for the skin, the crown for the
//! hair, the eye boxes for the dark pixels (their count gives the eye size), the mouth box for
//! the dark pixels' rows (a smile is lower at the centre than at the corners).

use rand::Rng;

use crate::diffusion::imaging::RgbImage;

/// Skin colours.
pub const SKINS: [(&str, [u8; 3]); 4] = [
    ("pale", [250, 220, 190]),
    ("tan", [225, 170, 120]),
    ("brown", [150, 95, 60]),
    ("green", [140, 200, 120]),
];

/// Hair colours.
pub const HAIRS: [(&str, [u8; 3]); 3] = [
    ("black", [30, 25, 25]),
    ("blond", [240, 210, 90]),
    ("red", [190, 60, 30]),
];

/// The background.
const BACKGROUND: [u8; 3] = [90, 150, 210];
/// Eyes and mouth.
const INK: [u8; 3] = [20, 20, 30];

/// The mouth's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mouth {
    /// Corners up.
    Smile,
    /// A straight line.
    Flat,
    /// Corners down.
    Frown,
}

/// One face's factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Face {
    /// An index into [`SKINS`].
    pub skin: usize,
    /// Large eyes (else small).
    pub large_eyes: bool,
    /// The mouth.
    pub mouth: Mouth,
    /// An index into [`HAIRS`], or none (bald).
    pub hair: Option<usize>,
}

impl Face {
    /// A face with random factors, each uniform.
    pub fn random(rng: &mut impl Rng) -> Self {
        Self {
            skin: rng.random_range(0..SKINS.len()),
            large_eyes: rng.random_bool(0.5),
            mouth: [Mouth::Smile, Mouth::Flat, Mouth::Frown][rng.random_range(0..3)],
            hair: rng
                .random_bool(0.75)
                .then(|| rng.random_range(0..HAIRS.len())),
        }
    }

    /// The factors in words: "tan face, large eyes, smile, black hair".
    pub fn describe(&self) -> String {
        format!(
            "{} face, {} eyes, {}, {}",
            SKINS[self.skin].0,
            if self.large_eyes { "large" } else { "small" },
            match self.mouth {
                Mouth::Smile => "smile",
                Mouth::Flat => "flat mouth",
                Mouth::Frown => "frown",
            },
            self.hair
                .map_or("no hair".to_owned(), |h| format!("{} hair", HAIRS[h].0))
        )
    }

    /// Draws the face at `side`×`side` pixels (64 and up), anti-aliased.
    pub fn render(&self, side: u32) -> RgbImage {
        let n = side as usize;
        let s = side as f32;
        let mut pixels = Vec::with_capacity(n * n * 3);
        for y in 0..n {
            for x in 0..n {
                let mut c = BACKGROUND.map(f32::from);
                let mut paint = |colour: [u8; 3], cover: f32| {
                    for k in 0..3 {
                        c[k] += (f32::from(colour[k]) - c[k]) * cover;
                    }
                };
                let sample = |f: &dyn Fn(f32, f32) -> bool| {
                    let mut hits = 0;
                    for sy in 0..4 {
                        for sx in 0..4 {
                            let u = (x as f32 + (sx as f32 + 0.5) / 4.0) / s;
                            let v = (y as f32 + (sy as f32 + 0.5) / 4.0) / s;
                            hits += i32::from(f(u, v));
                        }
                    }
                    hits as f32 / 16.0
                };
                paint(SKINS[self.skin].1, sample(&|u, v| in_face(u, v)));
                if let Some(h) = self.hair {
                    paint(HAIRS[h].1, sample(&|u, v| in_hair(u, v)));
                }
                let eye = if self.large_eyes { 0.07 } else { 0.035 };
                paint(
                    INK,
                    sample(&|u, v| {
                        let d = |cx: f32| (u - cx).powi(2) + (v - 0.45).powi(2) <= eye * eye;
                        d(0.38) || d(0.62)
                    }),
                );
                let bend = match self.mouth {
                    Mouth::Smile => 0.08,
                    Mouth::Flat => 0.0,
                    Mouth::Frown => -0.08,
                };
                paint(
                    INK,
                    sample(&|u, v| {
                        let t = (u - 0.5) / 0.14;
                        t.abs() <= 1.0 && (v - (0.66 + bend * (1.0 - t * t))).abs() <= 0.022
                    }),
                );
                pixels.extend(c.map(|v| v.round().clamp(0.0, 255.0) as u8));
            }
        }
        RgbImage {
            width: side,
            height: side,
            pixels,
        }
    }
}

/// The face's ellipse, in unit coordinates.
fn in_face(u: f32, v: f32) -> bool {
    ((u - 0.5) / 0.32).powi(2) + ((v - 0.55) / 0.38).powi(2) <= 1.0
}

/// The hair: the top of the head, above the forehead.
fn in_hair(u: f32, v: f32) -> bool {
    v < 0.3 && (in_face(u, v) || ((u - 0.5) / 0.34).powi(2) + ((v - 0.3) / 0.16).powi(2) <= 1.0)
}

/// Reads a face's factors out of an image; `None` when it does not look like one of these
/// faces (the background is not at the corners, or the skin is not at the cheeks).
pub fn read(image: &RgbImage) -> Option<Face> {
    let (w, h) = (image.width as usize, image.height as usize);
    if w < 32 || h < 32 {
        return None;
    }
    let at = |u: f32, v: f32| {
        let x = ((u * w as f32) as usize).min(w - 1);
        let y = ((v * h as f32) as usize).min(h - 1);
        let i = (y * w + x) * 3;
        [
            f32::from(image.pixels[i]),
            f32::from(image.pixels[i + 1]),
            f32::from(image.pixels[i + 2]),
        ]
    };
    let dist = |a: [f32; 3], b: [u8; 3]| {
        (0..3)
            .map(|k| (a[k] - f32::from(b[k])).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    // Averages over a small square, to ride over noise.
    let mean = |u: f32, v: f32| {
        let mut sum = [0.0f32; 3];
        for dy in -1..=1 {
            for dx in -1..=1 {
                let p = at(u + dx as f32 / w as f32, v + dy as f32 / h as f32);
                for k in 0..3 {
                    sum[k] += p[k] / 9.0;
                }
            }
        }
        sum
    };
    let nearest = |p: [f32; 3], table: &[(&str, [u8; 3])]| {
        table
            .iter()
            .enumerate()
            .map(|(i, (_, c))| (i, dist(p, *c)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    if [(0.04, 0.04), (0.96, 0.04), (0.04, 0.96), (0.96, 0.96)]
        .iter()
        .any(|&(u, v)| dist(mean(u, v), BACKGROUND) > 60.0)
    {
        return None;
    }
    let cheeks = [mean(0.3, 0.55), mean(0.7, 0.55)];
    let (skin, d0) = nearest(cheeks[0], &SKINS)?;
    let (skin1, _) = nearest(cheeks[1], &SKINS)?;
    if skin != skin1 || d0 > 60.0 {
        return None;
    }
    let crown = mean(0.5, 0.2);
    let hair = if dist(crown, BACKGROUND) < 50.0 || dist(crown, SKINS[skin].1) < 40.0 {
        None
    } else {
        Some(nearest(crown, &HAIRS)?.0)
    };
    // Dark pixels in a box around each eye, and the mouth's dark pixels' rows.
    let dark = |p: [f32; 3]| dist(p, INK) < 90.0;
    let count = |u0: f32, u1: f32, v0: f32, v1: f32| {
        let mut n = 0usize;
        let (x0, x1) = ((u0 * w as f32) as usize, (u1 * w as f32) as usize);
        let (y0, y1) = ((v0 * h as f32) as usize, (v1 * h as f32) as usize);
        for y in y0..y1.min(h) {
            for x in x0..x1.min(w) {
                n += usize::from(dark(at(
                    (x as f32 + 0.5) / w as f32,
                    (y as f32 + 0.5) / h as f32,
                )));
            }
        }
        n as f32 / ((x1 - x0) * (y1 - y0)).max(1) as f32
    };
    let eyes = f32::midpoint(count(0.28, 0.48, 0.35, 0.55), count(0.52, 0.72, 0.35, 0.55));
    // A large eye covers π·0.07² of the 0.2×0.2 box (38 %), a small one 10 %.
    let large_eyes = eyes > 0.22;
    let row_of = |u: f32| {
        let x = ((u * w as f32) as usize).min(w - 1);
        // Below the eyes (their lowest edge is at 0.52), above the chin.
        let (y0, y1) = ((0.54 * h as f32) as usize, (0.82 * h as f32) as usize);
        let rows: Vec<usize> = (y0..y1)
            .filter(|&y| dark(at((x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32)))
            .collect();
        (!rows.is_empty()).then(|| rows.iter().sum::<usize>() as f32 / rows.len() as f32 / h as f32)
    };
    let centre = row_of(0.5)?;
    let corners = f32::midpoint(row_of(0.39)?, row_of(0.61)?);
    // The centre sits 0.08 lower than the corners... times (1 − t²) at t = ±0.79: 0.05.
    let mouth = if centre - corners > 0.02 {
        Mouth::Smile
    } else if corners - centre > 0.02 {
        Mouth::Frown
    } else {
        Mouth::Flat
    };
    Some(Face {
        skin,
        large_eyes,
        mouth,
        hair,
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn rendered_faces_read_back_as_their_factors() {
        let mut rng = StdRng::seed_from_u64(2);
        for side in [64, 96] {
            for i in 0..200 {
                let face = Face::random(&mut rng);
                let mut image = face.render(side);
                if i % 2 == 1 {
                    for p in &mut image.pixels {
                        *p = p.saturating_add_signed(rng.random_range(-20..=20));
                    }
                }
                assert_eq!(read(&image), Some(face), "{side}px {}", face.describe());
            }
        }
    }

    #[test]
    fn what_is_not_a_face_reads_as_none() {
        let flat = RgbImage {
            width: 64,
            height: 64,
            pixels: vec![128; 64 * 64 * 3],
        };
        assert_eq!(read(&flat), None);
        let background = RgbImage {
            width: 64,
            height: 64,
            pixels: BACKGROUND.repeat(64 * 64),
        };
        assert_eq!(read(&background), None);
    }
}
