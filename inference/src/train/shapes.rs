//! The captioned shape scenes the demo text-to-image model learns from, and the deterministic
//! checker that grades a generated image against its caption.
//!
//! A [`Scene`] is a plain background and one or two shapes, each with a kind (circle, square,
//! triangle), a colour, a size (small, large) and a place (left, centre, right), no two in the
//! same place. [`Scene::caption`] says it in words ("a small red circle on the left, a large
//! blue square on the right, white background"); [`Scene::parse`] reads such a caption back,
//! so held-out captions become prompts; [`Scene::render`] draws it; [`check`] reads an image and
//! says whether the caption's background, colours, shapes, sizes and places are there.
//!
//! The checker knows nothing of how the image was made: it classifies the border's colour as
//! the background, finds the connected regions of other pixels, and grades each by its mean
//! colour (the nearest palette colour), its area (small or large), its centre (which third)
//! and how much of its bounding box it fills (a circle fills π/4, a square all of it, a
//! triangle half).

use rand::Rng;

use crate::diffusion::imaging::RgbImage;

/// The colours shapes and backgrounds take, with their names.
pub const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [245, 140, 30]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];

/// A shape's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// A triangle, apex up.
    Triangle,
}

/// Where a shape is: the left, centre or right third.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The left third.
    Left,
    /// The middle third.
    Centre,
    /// The right third.
    Right,
}

/// One shape of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// What it is.
    pub kind: Kind,
    /// An index into [`PALETTE`].
    pub colour: usize,
    /// Large (0.30 of the side across) or small (0.18).
    pub large: bool,
    /// Where it is.
    pub place: Place,
}

/// A background and one or two shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    /// An index into [`PALETTE`].
    pub background: usize,
    /// Its shapes, left to right.
    pub shapes: Vec<Shape>,
}

const KINDS: [(Kind, &str); 3] = [
    (Kind::Circle, "circle"),
    (Kind::Square, "square"),
    (Kind::Triangle, "triangle"),
];
const PLACES: [(Place, &str); 3] = [
    (Place::Left, "on the left"),
    (Place::Centre, "in the centre"),
    (Place::Right, "on the right"),
];

fn kind_name(k: Kind) -> &'static str {
    KINDS.iter().find(|(x, _)| *x == k).map_or("", |(_, n)| n)
}

fn place_name(p: Place) -> &'static str {
    PLACES.iter().find(|(x, _)| *x == p).map_or("", |(_, n)| n)
}

impl Scene {
    /// A random scene: a background, then one or two shapes in different places, each in a
    /// colour other than the background's.
    pub fn random(rng: &mut impl Rng) -> Self {
        let background = rng.random_range(0..PALETTE.len());
        let count = rng.random_range(1..=2);
        let mut places = vec![Place::Left, Place::Centre, Place::Right];
        let mut shapes = Vec::with_capacity(count);
        for _ in 0..count {
            let place = places.remove(rng.random_range(0..places.len()));
            let colour = loop {
                let c = rng.random_range(0..PALETTE.len());
                if c != background {
                    break c;
                }
            };
            shapes.push(Shape {
                kind: KINDS[rng.random_range(0..KINDS.len())].0,
                colour,
                large: rng.random_bool(0.5),
                place,
            });
        }
        shapes.sort_by_key(|s| s.place as u8);
        Self { background, shapes }
    }

    /// The scene in words: "a small red circle on the left, a large blue square on the right,
    /// white background".
    pub fn caption(&self) -> String {
        let mut parts: Vec<String> = self
            .shapes
            .iter()
            .map(|s| {
                format!(
                    "a {} {} {} {}",
                    if s.large { "large" } else { "small" },
                    PALETTE[s.colour].0,
                    kind_name(s.kind),
                    place_name(s.place)
                )
            })
            .collect();
        parts.push(format!("{} background", PALETTE[self.background].0));
        parts.join(", ")
    }

    /// Reads a caption [`Scene::caption`] wrote; `None` for any other text.
    pub fn parse(caption: &str) -> Option<Self> {
        let mut parts: Vec<&str> = caption.split(", ").collect();
        let background_part = parts.pop()?;
        let background = colour_index(background_part.strip_suffix(" background")?)?;
        let shapes = parts
            .iter()
            .map(|p| {
                let rest = p.strip_prefix("a ")?;
                let (size, rest) = rest.split_once(' ')?;
                let large = match size {
                    "large" => true,
                    "small" => false,
                    _ => return None,
                };
                let (colour, rest) = rest.split_once(' ')?;
                let (kind, place) = rest.split_once(' ')?;
                Some(Shape {
                    kind: KINDS.iter().find(|(_, n)| *n == kind)?.0,
                    colour: colour_index(colour)?,
                    large,
                    place: PLACES.iter().find(|(_, n)| *n == place)?.0,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        (!shapes.is_empty() && shapes.len() <= 3).then_some(Self { background, shapes })
    }

    /// Draws the scene at `side`×`side` pixels (anti-aliased edges, so a model sees soft
    /// boundaries as in photographs). From 64 pixels up a small circle is wide enough (12
    /// pixels) to tell from a square.
    pub fn render(&self, side: u32) -> RgbImage {
        let n = side as usize;
        let mut pixels = Vec::with_capacity(n * n * 3);
        for _ in 0..n * n {
            pixels.extend(PALETTE[self.background].1);
        }
        let mut image = RgbImage {
            width: side,
            height: side,
            pixels,
        };
        for s in &self.shapes {
            draw(&mut image, s);
        }
        image
    }
}

fn colour_index(name: &str) -> Option<usize> {
    PALETTE.iter().position(|(n, _)| *n == name)
}

/// A shape's centre and half-extent, in pixels.
fn geometry(s: &Shape, side: f32) -> (f32, f32, f32) {
    let cx = match s.place {
        Place::Left => side / 6.0,
        Place::Centre => side / 2.0,
        Place::Right => side * 5.0 / 6.0,
    };
    let half = if s.large { side * 0.15 } else { side * 0.09 };
    (cx, side / 2.0, half)
}

/// How much of pixel `(x, y)` (its centre at `+0.5`) the shape covers, from 4×4 samples.
fn coverage(s: &Shape, x: f32, y: f32, side: f32) -> f32 {
    let (cx, cy, h) = geometry(s, side);
    let mut hits = 0;
    for sy in 0..4 {
        for sx in 0..4 {
            let px = x + (sx as f32 + 0.5) / 4.0 - cx;
            let py = y + (sy as f32 + 0.5) / 4.0 - cy;
            let inside = match s.kind {
                Kind::Circle => px * px + py * py <= h * h,
                Kind::Square => px.abs() <= h && py.abs() <= h,
                // Apex up: the width grows from 0 at the top to 2h at the bottom.
                Kind::Triangle => py >= -h && py <= h && px.abs() <= f32::midpoint(py, h),
            };
            hits += i32::from(inside);
        }
    }
    hits as f32 / 16.0
}

fn draw(image: &mut RgbImage, s: &Shape) {
    let side = image.width as f32;
    let colour = PALETTE[s.colour].1;
    let n = image.width as usize;
    for y in 0..n {
        for x in 0..n {
            let a = coverage(s, x as f32, y as f32, side);
            if a == 0.0 {
                continue;
            }
            let i = (y * n + x) * 3;
            for (out, &want) in image.pixels[i..i + 3].iter_mut().zip(&colour) {
                let old = f32::from(*out);
                *out = (old + (f32::from(want) - old) * a).round() as u8;
            }
        }
    }
}

/// What the checker found for one shape of the caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Every requirement of the caption holds.
    pub passed: bool,
    /// What did not match, in words (empty when it passed).
    pub problems: Vec<String>,
}

/// The palette colour nearest to `rgb`.
fn nearest(rgb: [f32; 3]) -> usize {
    PALETTE
        .iter()
        .enumerate()
        .min_by(|(_, (_, a)), (_, (_, b))| {
            let d = |p: &[u8; 3]| {
                (0..3)
                    .map(|c| (rgb[c] - f32::from(p[c])).powi(2))
                    .sum::<f32>()
            };
            d(a).total_cmp(&d(b))
        })
        .map_or(0, |(i, _)| i)
}

/// A region of non-background pixels.
struct Region {
    pixels: usize,
    /// Pixels in each row of the image.
    rows: Vec<usize>,
    sum: [f64; 3],
    min: (usize, usize),
    max: (usize, usize),
    centre_x: f64,
}

/// Grades `image` against `scene`: the background colour, then for each shape of the caption
/// a region in its place with its colour, size and kind. Regions smaller than 1 % of the
/// image are noise and ignored. Meant for images of 64 pixels and more (see
/// [`Scene::render`]).
pub fn check(image: &RgbImage, scene: &Scene) -> Verdict {
    let (w, h) = (image.width as usize, image.height as usize);
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        [
            f32::from(image.pixels[i]),
            f32::from(image.pixels[i + 1]),
            f32::from(image.pixels[i + 2]),
        ]
    };
    let mut problems = Vec::new();
    if w < 8 || h < 8 {
        return Verdict {
            passed: false,
            problems: vec!["the image is too small to grade".into()],
        };
    }
    // The background: the border pixels' most common palette colour.
    let mut votes = [0usize; PALETTE.len()];
    for x in 0..w {
        votes[nearest(px(x, 0))] += 1;
        votes[nearest(px(x, h - 1))] += 1;
    }
    for y in 0..h {
        votes[nearest(px(0, y))] += 1;
        votes[nearest(px(w - 1, y))] += 1;
    }
    let background = votes
        .iter()
        .enumerate()
        .max_by_key(|(_, v)| **v)
        .map_or(0, |(i, _)| i);
    if background != scene.background {
        problems.push(format!(
            "the background is {}, not {}",
            PALETTE[background].0, PALETTE[scene.background].0
        ));
    }
    // Foreground: pixels whose nearest palette colour is not the background's, grouped
    // 4-connected.
    let far = |p: [f32; 3]| nearest(p) != background;
    let mut label = vec![usize::MAX; w * h];
    let mut regions: Vec<Region> = Vec::new();
    for start in 0..w * h {
        if label[start] != usize::MAX || !far(px(start % w, start / w)) {
            continue;
        }
        let id = regions.len();
        let mut r = Region {
            pixels: 0,
            rows: vec![0; h],
            sum: [0.0; 3],
            min: (usize::MAX, usize::MAX),
            max: (0, 0),
            centre_x: 0.0,
        };
        let mut stack = vec![start];
        label[start] = id;
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            let p = px(x, y);
            r.pixels += 1;
            r.rows[y] += 1;
            for (sum, v) in r.sum.iter_mut().zip(p) {
                *sum += f64::from(v);
            }
            r.min = (r.min.0.min(x), r.min.1.min(y));
            r.max = (r.max.0.max(x), r.max.1.max(y));
            r.centre_x += x as f64;
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for j in neighbours.into_iter().flatten() {
                if label[j] == usize::MAX && far(px(j % w, j / w)) {
                    label[j] = id;
                    stack.push(j);
                }
            }
        }
        regions.push(r);
    }
    let area = (w * h) as f64;
    regions.retain(|r| r.pixels as f64 >= area * 0.01);
    for s in &scene.shapes {
        let want = place_name(s.place);
        let here: Vec<&Region> = regions
            .iter()
            .filter(|r| {
                let cx = r.centre_x / r.pixels as f64 / w as f64;
                let place = if cx < 1.0 / 3.0 {
                    Place::Left
                } else if cx < 2.0 / 3.0 {
                    Place::Centre
                } else {
                    Place::Right
                };
                place == s.place
            })
            .collect();
        let Some(r) = here.iter().max_by_key(|r| r.pixels) else {
            problems.push(format!("no shape {want}"));
            continue;
        };
        let n = r.pixels as f64;
        let colour = nearest(r.sum.map(|v| (v / n) as f32));
        if colour != s.colour {
            problems.push(format!(
                "the shape {want} is {}, not {}",
                PALETTE[colour].0, PALETTE[s.colour].0
            ));
        }
        // Small shapes are 0.18 of the side across, large ones 0.30: split at 0.24.
        let extent = ((r.max.0 - r.min.0 + 1).max(r.max.1 - r.min.1 + 1)) as f64 / w as f64;
        if (extent > 0.24) != s.large {
            problems.push(format!(
                "the shape {want} is {}, not {}",
                if extent > 0.24 { "large" } else { "small" },
                if s.large { "large" } else { "small" }
            ));
        }
        // A triangle (apex up) is narrow at the top and wide at the bottom; a square fills its
        // box; a circle is as wide at the top as at the bottom and fills π/4 of its box.
        let boxed = ((r.max.0 - r.min.0 + 1) * (r.max.1 - r.min.1 + 1)) as f64;
        let fill = n / boxed;
        let (top, bottom) = (r.min.1, r.max.1);
        let quarter = ((bottom - top + 1) / 4).max(1);
        let mean = |rows: &[usize]| rows.iter().sum::<usize>() as f64 / rows.len().max(1) as f64;
        let upper = mean(&r.rows[top..top + quarter]);
        let lower = mean(&r.rows[bottom + 1 - quarter..=bottom]);
        let kind = if upper < 0.6 * lower {
            Kind::Triangle
        } else if fill > 0.88 {
            Kind::Square
        } else {
            Kind::Circle
        };
        if kind != s.kind {
            problems.push(format!(
                "the shape {want} is a {}, not a {}",
                kind_name(kind),
                kind_name(s.kind)
            ));
        }
    }
    Verdict {
        passed: problems.is_empty(),
        problems,
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn captions_round_trip_and_rendered_scenes_pass_their_own_check() {
        let mut rng = StdRng::seed_from_u64(1);
        for side in [64, 96] {
            for i in 0..200 {
                let scene = Scene::random(&mut rng);
                let caption = scene.caption();
                assert_eq!(Scene::parse(&caption).as_ref(), Some(&scene), "{caption}");
                let mut image = scene.render(side);
                // Half of them with noise, as a generator's images have.
                if i % 2 == 1 {
                    for p in &mut image.pixels {
                        *p = p.saturating_add_signed(rng.random_range(-25..=25));
                    }
                }
                let v = check(&image, &scene);
                assert!(v.passed, "{side}px {caption}: {:?}", v.problems);
            }
        }
        assert_eq!(Scene::parse("a photo of a cat"), None);
    }

    #[test]
    fn the_checker_catches_each_kind_of_mistake() {
        let scene =
            Scene::parse("a large red circle on the left, white background").expect("parse");
        let image = scene.render(64);
        for (wrong, needle) in [
            (
                "a large blue circle on the left, white background",
                "not blue",
            ),
            (
                "a small red circle on the left, white background",
                "not small",
            ),
            (
                "a large red square on the left, white background",
                "not a square",
            ),
            (
                "a large red circle on the right, white background",
                "no shape on the right",
            ),
            (
                "a large red circle on the left, black background",
                "not black",
            ),
        ] {
            let v = check(&image, &Scene::parse(wrong).expect("parse"));
            assert!(!v.passed, "{wrong}");
            assert!(
                v.problems.iter().any(|p| p.contains(needle)),
                "{wrong}: {:?}",
                v.problems
            );
        }
        // A blank image has none of the shapes.
        let blank = Scene {
            background: 6,
            shapes: Vec::new(),
        }
        .render(64);
        assert!(!check(&blank, &scene).passed);
    }
}
