//! The canvas as data, without any drawing: the image layer, the mask layer and the control
//! layer (a map drawn for ControlNet: white lines on black, or a preprocessor's map copied
//! there to edit), brush strokes, outpainting by growing the canvas, undo/redo with bounded memory, and the staging
//! area where a batch's results wait to be accepted or discarded.
//!
//! Every change that a person makes (a stroke, invert, clear, extend, open, accept) can be
//! undone. The undo stack keeps at most [`UNDO_ENTRIES`] entries and about [`UNDO_BYTES`] of
//! pixels; the oldest entries go first. Images are shared (`Arc`) between entries, so a
//! stroke costs one mask, not one image.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use studio_inference::diffusion::imaging::{Mask, RgbImage};
use studio_inference::diffusion::pipeline::GeneratedImage;

/// Most undo steps kept.
pub const UNDO_ENTRIES: usize = 50;
/// About how many bytes of pixels the undo stack may hold (images counted once).
pub const UNDO_BYTES: usize = 512 << 20;

/// Which side of the canvas to grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    Left,
    Right,
    Up,
    Down,
}

impl Side {
    pub const ALL: [Side; 4] = [Side::Left, Side::Right, Side::Up, Side::Down];

    pub fn label(self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
            Side::Up => "up",
            Side::Down => "down",
        }
    }
}

/// What the brush does: to the mask, or colour on the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Tool {
    /// Paints the area to repaint.
    #[default]
    Brush,
    /// Takes it away again.
    Eraser,
    /// Paints colour on the image layer (a rough sketch for img2img).
    Colour([u8; 3]),
    /// Draws white on the control layer (a scribble or edge map for ControlNet).
    ControlPen,
    /// Draws black on the control layer, taking lines away.
    ControlEraser,
}

/// What Generate will do with this canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeKind {
    /// The canvas is empty: a new image.
    Txt2Img,
    /// An image and no mask: the whole image is redrawn.
    Img2Img,
    /// A painted mask: only the masked area is redrawn.
    Inpaint,
}

impl ModeKind {
    pub fn label(self) -> &'static str {
        match self {
            ModeKind::Txt2Img => "txt2img",
            ModeKind::Img2Img => "img2img",
            ModeKind::Inpaint => "inpaint",
        }
    }
}

#[derive(Debug, Clone)]
struct Snapshot {
    image: Option<Arc<RgbImage>>,
    mask: Arc<Mask>,
    control: Option<Arc<RgbImage>>,
}

/// A result waiting in the staging area.
#[derive(Debug, Clone)]
pub struct Staged {
    pub image: Arc<GeneratedImage>,
    /// Where it was saved in the history, if it was.
    pub path: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Document {
    image: Option<Arc<RgbImage>>,
    /// Same size as the image (0×0 without one); 255 = repaint.
    mask: Arc<Mask>,
    /// The control layer, the image's size; `None` until something is drawn or put there.
    control: Option<Arc<RgbImage>>,
    undo: Vec<Snapshot>,
    redo: Vec<Snapshot>,
    max_entries: usize,
    max_bytes: usize,
    /// Bumped whenever the image (or the mask) changes: textures and the autosave follow it.
    image_rev: u64,
    mask_rev: u64,
    control_rev: u64,
    stroke_open: bool,
    staged: Vec<Staged>,
    selected: usize,
}

impl Default for Document {
    fn default() -> Self {
        Self::with_limits(UNDO_ENTRIES, UNDO_BYTES)
    }
}

fn empty_mask() -> Arc<Mask> {
    Arc::new(Mask::new_filled(0, 0, 0))
}

impl Document {
    /// An empty canvas whose undo stack keeps at most `entries` steps and about `bytes`.
    pub fn with_limits(entries: usize, bytes: usize) -> Self {
        Self {
            image: None,
            mask: empty_mask(),
            control: None,
            undo: Vec::new(),
            redo: Vec::new(),
            max_entries: entries.max(1),
            max_bytes: bytes,
            image_rev: 0,
            mask_rev: 0,
            control_rev: 0,
            stroke_open: false,
            staged: Vec::new(),
            selected: 0,
        }
    }

    // ---- reading ----------------------------------------------------------------------------

    pub fn image(&self) -> Option<&RgbImage> {
        self.image.as_deref()
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    /// The control layer, once something was drawn or put there.
    pub fn control(&self) -> Option<&RgbImage> {
        self.control.as_deref()
    }

    /// The canvas size, when it holds an image.
    pub fn size(&self) -> Option<(u32, u32)> {
        self.image.as_ref().map(|i| (i.width, i.height))
    }

    /// The size of the layers: the image's, or on an empty canvas the control layer's.
    pub fn layer_size(&self) -> Option<(u32, u32)> {
        self.size()
            .or_else(|| self.control.as_ref().map(|c| (c.width, c.height)))
    }

    pub fn is_empty(&self) -> bool {
        self.image.is_none()
    }

    pub fn image_rev(&self) -> u64 {
        self.image_rev
    }

    pub fn mask_rev(&self) -> u64 {
        self.mask_rev
    }

    pub fn control_rev(&self) -> u64 {
        self.control_rev
    }

    /// txt2img on an empty canvas, img2img with an image and no mask, inpaint with a mask.
    pub fn mode(&self) -> ModeKind {
        if self.image.is_none() {
            ModeKind::Txt2Img
        } else if self.mask.is_empty() {
            ModeKind::Img2Img
        } else {
            ModeKind::Inpaint
        }
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    pub fn undo_len(&self) -> usize {
        self.undo.len()
    }

    /// Bytes of pixels the undo and redo stacks hold (each image counted once).
    pub fn history_bytes(&self) -> usize {
        stack_bytes(self.undo.iter().chain(self.redo.iter()))
    }

    // ---- changes ----------------------------------------------------------------------------

    /// Puts the canvas back as saved (no undo step): `mask` and `control` are used when they
    /// fit the image (a control layer is kept on an empty canvas).
    pub fn restore(
        &mut self,
        image: Option<RgbImage>,
        mask: Option<Mask>,
        control: Option<RgbImage>,
    ) {
        self.mask = match (&image, mask) {
            (Some(img), Some(m)) if (m.width, m.height) == (img.width, img.height) => Arc::new(m),
            (Some(img), _) => Arc::new(Mask::new_filled(img.width, img.height, 0)),
            (None, _) => empty_mask(),
        };
        self.control = match (&image, control) {
            (Some(img), Some(c)) if (c.width, c.height) != (img.width, img.height) => None,
            (_, c) => c.map(Arc::new),
        };
        self.image = image.map(Arc::new);
        self.undo.clear();
        self.redo.clear();
        self.touch_image();
    }

    /// Opens `image` as the image layer, with an empty mask (undoable). A drawn control layer
    /// is kept, resized to the new image.
    pub fn set_image(&mut self, image: RgbImage) {
        self.push_undo();
        self.mask = Arc::new(Mask::new_filled(image.width, image.height, 0));
        if let Some(c) = &self.control
            && (c.width, c.height) != (image.width, image.height)
        {
            self.control = Some(Arc::new(c.resized(image.width, image.height)));
        }
        self.image = Some(Arc::new(image));
        self.touch_image();
    }

    /// Empties the canvas (undoable). Returns whether there was anything to clear.
    pub fn clear(&mut self) -> bool {
        if self.image.is_none() {
            return false;
        }
        self.push_undo();
        self.image = None;
        self.mask = empty_mask();
        self.control = None;
        self.touch_image();
        true
    }

    /// Puts `map` on the control layer, to edit it there (undoable): resized to the canvas,
    /// or to `size` on an empty canvas.
    pub fn set_control(&mut self, map: &RgbImage, size: (u32, u32)) {
        let (w, h) = self.size().unwrap_or(size);
        self.push_undo();
        self.control = Some(Arc::new(map.resized(w, h)));
        self.control_rev += 1;
    }

    /// Starts a stroke on a new, empty `w`×`h` control layer of an empty canvas (the undo step
    /// takes the layer away again). Does nothing when the canvas has a size already.
    pub fn begin_control_layer(&mut self, w: u32, h: u32) {
        if self.layer_size().is_some() || w == 0 || h == 0 {
            return;
        }
        self.end_stroke();
        self.push_undo();
        self.control = Some(Arc::new(RgbImage::new_filled(w, h, [0, 0, 0])));
        self.control_rev += 1;
        self.stroke_open = true;
    }

    /// Empties the control layer (undoable). Returns whether it held anything.
    pub fn clear_control(&mut self) -> bool {
        if self.control.is_none() {
            return false;
        }
        self.push_undo();
        self.control = None;
        self.control_rev += 1;
        true
    }

    /// Starts a stroke: the state before it becomes one undo step.
    pub fn begin_stroke(&mut self) {
        if self.layer_size().is_none() {
            return;
        }
        self.end_stroke();
        self.push_undo();
        self.stroke_open = true;
    }

    pub fn end_stroke(&mut self) {
        self.stroke_open = false;
    }

    /// Paints the segment `from`–`to` (image pixels) with a round brush of diameter `size`
    /// and `hardness` in `0..=1` (1 = a hard edge, 0 = soft all the way from the centre).
    /// Starts a stroke if none is open. Returns whether the mask changed.
    pub fn paint(
        &mut self,
        from: (f32, f32),
        to: (f32, f32),
        tool: Tool,
        size: f32,
        hardness: f32,
    ) -> bool {
        let on_control = matches!(tool, Tool::ControlPen | Tool::ControlEraser);
        let Some((w, h)) = (if on_control {
            self.layer_size()
        } else {
            self.size()
        }) else {
            return false;
        };
        if !self.stroke_open {
            self.begin_stroke();
        }
        let radius = (size / 2.0).max(0.5);
        let hardness = hardness.clamp(0.0, 1.0);
        let colour_stroke = |layer: &mut RgbImage, rgb: [u8; 3]| {
            let (dx, dy) = (to.0 - from.0, to.1 - from.1);
            let spacing = (radius / 4.0).max(0.5);
            let dabs = (dx.hypot(dy) / spacing).ceil().max(1.0) as usize;
            let mut changed = false;
            for i in 0..=dabs {
                let t = i as f32 / dabs as f32;
                let centre = (from.0 + dx * t, from.1 + dy * t);
                changed |= colour_dab(layer, centre, radius, hardness, rgb);
            }
            changed
        };
        match tool {
            Tool::Colour(rgb) => {
                let Some(image) = self.image.as_mut() else {
                    return false;
                };
                let changed = colour_stroke(Arc::make_mut(image), rgb);
                if changed {
                    self.image_rev += 1;
                }
                return changed;
            }
            Tool::ControlPen | Tool::ControlEraser => {
                let control = self
                    .control
                    .get_or_insert_with(|| Arc::new(RgbImage::new_filled(w, h, [0, 0, 0])));
                let rgb = if tool == Tool::ControlPen {
                    [255; 3]
                } else {
                    [0; 3]
                };
                let changed = colour_stroke(Arc::make_mut(control), rgb);
                if changed {
                    self.control_rev += 1;
                }
                return changed;
            }
            Tool::Brush | Tool::Eraser => {}
        }
        let mask = Arc::make_mut(&mut self.mask);
        let (dx, dy) = (to.0 - from.0, to.1 - from.1);
        let length = dx.hypot(dy);
        // Dabs a quarter of the radius apart make a smooth line.
        let spacing = (radius / 4.0).max(0.5);
        let dabs = (length / spacing).ceil().max(1.0) as usize;
        let mut changed = false;
        for i in 0..=dabs {
            let t = i as f32 / dabs as f32;
            let (cx, cy) = (from.0 + dx * t, from.1 + dy * t);
            changed |= dab(mask, w, h, (cx, cy), radius, hardness, tool);
        }
        if changed {
            self.mask_rev += 1;
        }
        changed
    }

    /// Inverts the mask (undoable).
    pub fn invert_mask(&mut self) -> bool {
        if self.image.is_none() {
            return false;
        }
        self.push_undo();
        self.mask = Arc::new(self.mask.inverted());
        self.mask_rev += 1;
        true
    }

    /// Clears the mask (undoable). Returns whether it had anything painted.
    pub fn clear_mask(&mut self) -> bool {
        if self.mask.is_empty() {
            return false;
        }
        self.push_undo();
        self.mask = Arc::new(Mask::new_filled(self.mask.width, self.mask.height, 0));
        self.mask_rev += 1;
        true
    }

    /// Grows the canvas by `px` on `side` for outpainting: the new strip repeats the edge
    /// pixels of the image, and the mask becomes exactly the new strip, so Generate inpaints
    /// it. Undoable. Returns whether it grew (it needs an image and `px > 0`).
    pub fn extend(&mut self, side: Side, px: u32) -> bool {
        let Some(old) = self.image.clone() else {
            return false;
        };
        if px == 0 {
            return false;
        }
        self.push_undo();
        let (image, mask) = extended(&old, side, px);
        if let Some(control) = &self.control {
            // The new strip of the control layer is empty (black), not repeated edges.
            let (mut grown, _) = extended(control, side, px);
            for (px, &m) in grown.pixels.chunks_exact_mut(3).zip(&mask.values) {
                if m != 0 {
                    px.fill(0);
                }
            }
            self.control = Some(Arc::new(grown));
        }
        self.image = Some(Arc::new(image));
        self.mask = Arc::new(mask);
        self.touch_image();
        true
    }

    /// Puts a generated image on the canvas (undoable): on an empty canvas it becomes the
    /// canvas; otherwise it replaces the image at the canvas's size (resized if the model
    /// needed another size) and the mask is kept.
    pub fn put_result(&mut self, result: &RgbImage) {
        self.push_undo();
        if let Some((w, h)) = self.size() {
            self.image = Some(Arc::new(result.resized(w, h)));
        } else {
            self.mask = Arc::new(Mask::new_filled(result.width, result.height, 0));
            if let Some(c) = &self.control
                && (c.width, c.height) != (result.width, result.height)
            {
                self.control = Some(Arc::new(c.resized(result.width, result.height)));
            }
            self.image = Some(Arc::new(result.clone()));
        }
        self.touch_image();
    }

    /// Steps back. Returns whether there was a step to undo.
    pub fn undo(&mut self) -> bool {
        self.end_stroke();
        let Some(prev) = self.undo.pop() else {
            return false;
        };
        let current = self.snapshot();
        self.redo.push(current);
        self.apply(prev);
        true
    }

    pub fn redo(&mut self) -> bool {
        self.end_stroke();
        let Some(next) = self.redo.pop() else {
            return false;
        };
        let current = self.snapshot();
        self.undo.push(current);
        self.apply(next);
        true
    }

    // ---- staging ----------------------------------------------------------------------------

    pub fn staged(&self) -> &[Staged] {
        &self.staged
    }

    /// The selected staged result, shown in place of the canvas.
    pub fn selected_staged(&self) -> Option<&Staged> {
        self.staged.get(self.selected)
    }

    pub fn selected_index(&self) -> usize {
        self.selected
    }

    /// Adds a result to the staging area and selects it.
    pub fn stage(&mut self, image: Arc<GeneratedImage>, path: Option<PathBuf>) {
        self.staged.push(Staged { image, path });
        self.selected = self.staged.len() - 1;
    }

    pub fn select_staged(&mut self, index: usize) {
        if index < self.staged.len() {
            self.selected = index;
        }
    }

    /// Puts the selected result on the canvas (undoable) and empties the staging area.
    /// Returns whether there was one.
    pub fn accept_staged(&mut self) -> bool {
        let Some(staged) = self.staged.get(self.selected).cloned() else {
            return false;
        };
        self.put_result(&staged.image.image);
        self.staged.clear();
        self.selected = 0;
        true
    }

    /// Drops the selected result (it stays in the history).
    pub fn discard_staged(&mut self) -> bool {
        if self.selected >= self.staged.len() {
            return false;
        }
        self.staged.remove(self.selected);
        self.selected = self.selected.min(self.staged.len().saturating_sub(1));
        true
    }

    pub fn discard_all_staged(&mut self) {
        self.staged.clear();
        self.selected = 0;
    }

    // ---- internals --------------------------------------------------------------------------

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            image: self.image.clone(),
            mask: self.mask.clone(),
            control: self.control.clone(),
        }
    }

    fn apply(&mut self, s: Snapshot) {
        let image_changed = match (&self.image, &s.image) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        let control_changed = match (&self.control, &s.control) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        self.image = s.image;
        self.mask = s.mask;
        self.control = s.control;
        if control_changed {
            self.control_rev += 1;
        }
        if image_changed {
            self.touch_image();
        } else {
            self.mask_rev += 1;
        }
    }

    fn push_undo(&mut self) {
        let s = self.snapshot();
        self.undo.push(s);
        self.redo.clear();
        while self.undo.len() > self.max_entries
            || (self.undo.len() > 1 && stack_bytes(self.undo.iter()) > self.max_bytes)
        {
            self.undo.remove(0);
        }
    }

    fn touch_image(&mut self) {
        self.image_rev += 1;
        self.mask_rev += 1;
        self.control_rev += 1;
    }
}

/// Pixel bytes of `snapshots`, each distinct image counted once.
fn stack_bytes<'a>(snapshots: impl Iterator<Item = &'a Snapshot>) -> usize {
    let mut seen: Vec<*const RgbImage> = Vec::new();
    let mut total = 0;
    for s in snapshots {
        total += s.mask.values.len();
        for img in s.image.iter().chain(&s.control) {
            let p = Arc::as_ptr(img);
            if !seen.contains(&p) {
                seen.push(p);
                total += img.pixels.len();
            }
        }
    }
    total
}

/// One round dab of colour `rgb` on `image`, blended by the brush's coverage (full inside
/// `radius · hardness`, fading to nothing at `radius`).
fn colour_dab(
    image: &mut RgbImage,
    (cx, cy): (f32, f32),
    radius: f32,
    hardness: f32,
    rgb: [u8; 3],
) -> bool {
    let (w, h) = (image.width, image.height);
    let x0 = (cx - radius).floor().max(0.0) as i64;
    let y0 = (cy - radius).floor().max(0.0) as i64;
    let x1 = ((cx + radius).ceil() as i64).min(i64::from(w) - 1);
    let y1 = ((cy + radius).ceil() as i64).min(i64::from(h) - 1);
    let inner = radius * hardness;
    let mut changed = false;
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = (x as f32 + 0.5 - cx).hypot(y as f32 + 0.5 - cy);
            if d > radius {
                continue;
            }
            let coverage = if d <= inner || radius <= inner {
                1.0
            } else {
                1.0 - (d - inner) / (radius - inner)
            };
            let i = (y as usize * w as usize + x as usize) * 3;
            for (px, &target) in image.pixels[i..i + 3].iter_mut().zip(&rgb) {
                let old = f32::from(*px);
                let new = (old + (f32::from(target) - old) * coverage).round() as u8;
                if new != *px {
                    *px = new;
                    changed = true;
                }
            }
        }
    }
    changed
}

/// One round dab of the mask brush (or eraser); returns whether a value changed.
fn dab(
    mask: &mut Mask,
    w: u32,
    h: u32,
    (cx, cy): (f32, f32),
    radius: f32,
    hardness: f32,
    tool: Tool,
) -> bool {
    let x0 = (cx - radius).floor().max(0.0) as i64;
    let y0 = (cy - radius).floor().max(0.0) as i64;
    let x1 = ((cx + radius).ceil() as i64).min(i64::from(w) - 1);
    let y1 = ((cy + radius).ceil() as i64).min(i64::from(h) - 1);
    let inner = radius * hardness;
    let mut changed = false;
    for y in y0..=y1 {
        for x in x0..=x1 {
            // Distance from the pixel's centre.
            let d = (x as f32 + 0.5 - cx).hypot(y as f32 + 0.5 - cy);
            if d > radius {
                continue;
            }
            let coverage = if d <= inner || radius <= inner {
                1.0
            } else {
                1.0 - (d - inner) / (radius - inner)
            };
            let v = (coverage * 255.0).round() as u8;
            let i = y as usize * w as usize + x as usize;
            let old = mask.values[i];
            let new = match tool {
                Tool::Brush => old.max(v),
                Tool::Eraser => old.min(255 - v),
                Tool::Colour(_) | Tool::ControlPen | Tool::ControlEraser => old,
            };
            if new != old {
                mask.values[i] = new;
                changed = true;
            }
        }
    }
    changed
}

/// The image grown by `px` on `side` (edge pixels repeated) and a mask of just the new strip.
pub fn extended(old: &RgbImage, side: Side, px: u32) -> (RgbImage, Mask) {
    let (ow, oh) = (old.width, old.height);
    let (nw, nh, ox, oy) = match side {
        Side::Left => (ow + px, oh, px, 0),
        Side::Right => (ow + px, oh, 0, 0),
        Side::Up => (ow, oh + px, 0, px),
        Side::Down => (ow, oh + px, 0, 0),
    };
    let mut pixels = Vec::with_capacity(nw as usize * nh as usize * 3);
    let mut values = Vec::with_capacity(nw as usize * nh as usize);
    for y in 0..nh {
        for x in 0..nw {
            let inside = x >= ox && x < ox + ow && y >= oy && y < oy + oh;
            let sx = (i64::from(x) - i64::from(ox)).clamp(0, i64::from(ow) - 1) as usize;
            let sy = (i64::from(y) - i64::from(oy)).clamp(0, i64::from(oh) - 1) as usize;
            let i = (sy * ow as usize + sx) * 3;
            pixels.extend_from_slice(&old.pixels[i..i + 3]);
            values.push(if inside { 0 } else { 255 });
        }
    }
    (
        RgbImage {
            width: nw,
            height: nh,
            pixels,
        },
        Mask {
            width: nw,
            height: nh,
            values,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use studio_inference::image_meta::GenerationParameters;

    fn image(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage::new_filled(w, h, rgb)
    }

    fn generated(w: u32, h: u32, rgb: [u8; 3]) -> Arc<GeneratedImage> {
        Arc::new(GeneratedImage {
            image: image(w, h, rgb),
            seed: 1,
            parameters: GenerationParameters::default(),
        })
    }

    #[test]
    fn modes_follow_the_canvas() {
        let mut d = Document::default();
        assert_eq!(d.mode(), ModeKind::Txt2Img);
        d.set_image(image(16, 16, [10, 20, 30]));
        assert_eq!(d.mode(), ModeKind::Img2Img);
        assert!(d.paint((8.0, 8.0), (8.0, 8.0), Tool::Brush, 4.0, 1.0));
        assert_eq!(d.mode(), ModeKind::Inpaint);
        d.end_stroke();
        // Erasing everything painted brings img2img back.
        d.paint((8.0, 8.0), (8.0, 8.0), Tool::Eraser, 10.0, 1.0);
        assert_eq!(d.mode(), ModeKind::Img2Img);
    }

    #[test]
    fn the_colour_brush_paints_the_image_not_the_mask_and_undoes() {
        let mut d = Document::default();
        d.set_image(image(32, 32, [255, 255, 255]));
        let before = d.image().expect("image").pixels.clone();
        assert!(d.paint((4.0, 16.0), (28.0, 16.0), Tool::Colour([200, 30, 40]), 6.0, 1.0));
        d.end_stroke();
        let img = d.image().expect("image");
        let px = |x: usize, y: usize| &img.pixels[(y * 32 + x) * 3..(y * 32 + x) * 3 + 3];
        assert_eq!(px(16, 16), [200, 30, 40], "on the stroke");
        assert_eq!(px(16, 2), [255, 255, 255], "away from it");
        assert!(d.mask().is_empty(), "the mask is untouched");
        assert_eq!(d.mode(), ModeKind::Img2Img, "a sketch is img2img'd");
        assert!(d.undo());
        assert_eq!(d.image().expect("image").pixels, before);
        // Soft edges blend towards the colour.
        d.paint((16.0, 16.0), (16.0, 16.0), Tool::Colour([0, 0, 0]), 10.0, 0.0);
        let img = d.image().expect("image");
        let edge = img.pixels[(16 * 32 + 19) * 3];
        assert!(edge > 0 && edge < 255, "a soft edge: {edge}");
    }

    #[test]
    fn the_control_pen_draws_on_its_own_layer_which_undoes_grows_and_follows_the_image() {
        let mut d = Document::default();
        d.set_image(image(32, 32, [90, 90, 90]));
        let before = d.image().expect("image").clone();
        assert!(d.control().is_none());
        assert!(d.paint((4.0, 16.0), (28.0, 16.0), Tool::ControlPen, 4.0, 1.0));
        d.end_stroke();
        let layer = d.control().expect("a control layer").clone();
        assert_eq!((layer.width, layer.height), (32, 32));
        let at = |l: &RgbImage, x: usize, y: usize| l.pixels[(y * 32 + x) * 3];
        assert_eq!(at(&layer, 16, 16), 255, "white on the line");
        assert_eq!(at(&layer, 16, 4), 0, "black away from it");
        assert_eq!(d.image(), Some(&before), "the image is untouched");
        assert!(d.mask().is_empty(), "the mask is untouched");
        assert_eq!(d.mode(), ModeKind::Img2Img);
        // The eraser takes a piece of the line away.
        assert!(d.paint((16.0, 16.0), (16.0, 16.0), Tool::ControlEraser, 6.0, 1.0));
        d.end_stroke();
        assert_eq!(at(d.control().expect("layer"), 16, 16), 0);
        assert_eq!(at(d.control().expect("layer"), 6, 16), 255);
        assert!(d.undo());
        assert_eq!(d.control(), Some(&layer));
        assert!(d.undo());
        assert!(d.control().is_none(), "the first stroke made the layer");
        assert!(d.redo());
        assert_eq!(d.control(), Some(&layer));

        // Growing the canvas grows the layer with an empty strip.
        assert!(d.extend(Side::Left, 8));
        let grown = d.control().expect("layer");
        assert_eq!((grown.width, grown.height), (40, 32));
        assert!(grown.pixels[..8 * 3].iter().all(|&v| v == 0), "new strip empty");
        assert_eq!(grown.pixels[(16 * 40 + 8 + 16) * 3], 255, "the line moved over");
        // A new image of another size keeps the drawing, resized.
        d.set_image(image(16, 16, [0, 0, 0]));
        assert_eq!(d.control().map(|c| (c.width, c.height)), Some((16, 16)));
        assert!(d.clear_control());
        assert!(d.control().is_none());
        assert!(!d.clear_control(), "nothing left to clear");
        assert!(d.undo());
        assert!(d.control().is_some());
        // Clearing the canvas takes the layer too.
        assert!(d.clear());
        assert!(d.control().is_none());
    }

    #[test]
    fn on_an_empty_canvas_the_control_layer_is_a_map_for_a_new_image() {
        let mut d = Document::default();
        assert!(
            !d.paint((1.0, 1.0), (5.0, 5.0), Tool::ControlPen, 2.0, 1.0),
            "no size to draw at yet"
        );
        d.begin_control_layer(24, 16);
        assert!(d.paint((2.0, 8.0), (20.0, 8.0), Tool::ControlPen, 2.0, 1.0));
        d.end_stroke();
        assert_eq!(d.layer_size(), Some((24, 16)));
        assert!(d.image().is_none());
        assert_eq!(d.mode(), ModeKind::Txt2Img, "still a new image");
        assert_eq!(d.undo_len(), 1, "creating and drawing is one step");
        // A result of another size fits the layer to it.
        d.put_result(&image(48, 32, [1, 2, 3]));
        assert_eq!(d.control().map(|c| (c.width, c.height)), Some((48, 32)));
        assert!(d.undo());
        assert!(d.image().is_none());
        assert_eq!(d.layer_size(), Some((24, 16)));
        assert!(d.undo());
        assert!(d.control().is_none() && d.layer_size().is_none());
        // A map put there (an edge map to edit) takes the given size on an empty canvas.
        d.set_control(&image(8, 8, [255, 255, 255]), (32, 32));
        assert_eq!(d.layer_size(), Some((32, 32)));
        // The layer is counted in the history's bytes.
        d.set_image(image(32, 32, [0, 0, 0]));
        assert!(d.history_bytes() >= 32 * 32 * 3);
    }

    #[test]
    fn strokes_are_one_undo_step_each_and_redo_brings_them_back() {
        let mut d = Document::default();
        d.set_image(image(32, 32, [0, 0, 0]));
        let base = d.undo_len();
        d.begin_stroke();
        d.paint((2.0, 2.0), (20.0, 2.0), Tool::Brush, 4.0, 0.5);
        d.paint((20.0, 2.0), (20.0, 20.0), Tool::Brush, 4.0, 0.5);
        d.end_stroke();
        assert_eq!(d.undo_len(), base + 1, "one stroke, one step");
        let painted = d.mask().clone();
        assert!(!painted.is_empty());
        assert!(d.undo());
        assert!(d.mask().is_empty());
        assert!(d.can_redo());
        assert!(d.redo());
        assert_eq!(*d.mask(), painted);
        // A new change after undo drops the redo branch.
        assert!(d.undo());
        d.invert_mask();
        assert!(!d.can_redo());
    }

    #[test]
    fn undo_is_bounded_by_count_and_by_bytes() {
        let mut d = Document::with_limits(5, usize::MAX);
        d.set_image(image(8, 8, [0, 0, 0]));
        for i in 0..20 {
            d.paint((i as f32 % 8.0, 1.0), (1.0, 1.0), Tool::Brush, 2.0, 1.0);
            d.end_stroke();
        }
        assert_eq!(d.undo_len(), 5);
        let mut undone = 0;
        while d.undo() {
            undone += 1;
        }
        assert_eq!(undone, 5);

        // 64×64 image = 12 KiB, mask = 4 KiB. Each extend makes a new image.
        let mut d = Document::with_limits(1000, 100_000);
        d.set_image(image(64, 64, [1, 2, 3]));
        for _ in 0..30 {
            d.extend(Side::Right, 8);
        }
        assert!(
            d.history_bytes() <= 100_000 + 64 * 400 * 4,
            "{}",
            d.history_bytes()
        );
        assert!(
            d.undo_len() < 30,
            "old steps were dropped: {}",
            d.undo_len()
        );
        assert!(d.undo_len() >= 1, "the newest step stays");

        // Strokes share the image: fifty strokes on a big image stay cheap.
        let mut d = Document::default();
        d.set_image(image(512, 512, [0, 0, 0]));
        for i in 0..60 {
            d.paint((i as f32, 10.0), (i as f32, 20.0), Tool::Brush, 3.0, 1.0);
            d.end_stroke();
        }
        assert_eq!(d.undo_len(), UNDO_ENTRIES);
        assert!(d.history_bytes() < 512 * 512 * 3 * 2 + 512 * 512 * (UNDO_ENTRIES + 1));
    }

    #[test]
    fn extend_grows_the_canvas_repeats_edges_and_masks_the_new_strip() {
        let mut img = image(4, 2, [0, 0, 0]);
        // Left column red, right column blue.
        for y in 0..2 {
            let l = (y * 4) * 3;
            img.pixels[l..l + 3].copy_from_slice(&[255, 0, 0]);
            let r = (y * 4 + 3) * 3;
            img.pixels[r..r + 3].copy_from_slice(&[0, 0, 255]);
        }
        let (left, mask) = extended(&img, Side::Left, 3);
        assert_eq!((left.width, left.height), (7, 2));
        assert_eq!(
            &left.pixels[0..3],
            &[255, 0, 0],
            "edge repeated to the left"
        );
        assert_eq!(
            &left.pixels[3 * 3..3 * 3 + 3],
            &[255, 0, 0],
            "original starts at x=3"
        );
        assert_eq!(mask.values[..7], [255, 255, 255, 0, 0, 0, 0]);

        let (right, mask) = extended(&img, Side::Right, 2);
        assert_eq!((right.width, right.height), (6, 2));
        assert_eq!(&right.pixels[5 * 3..5 * 3 + 3], &[0, 0, 255]);
        assert_eq!(mask.values[..6], [0, 0, 0, 0, 255, 255]);

        let (up, mask) = extended(&img, Side::Up, 1);
        assert_eq!((up.width, up.height), (4, 3));
        assert_eq!(mask.values, [255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&up.pixels[0..3], &[255, 0, 0]);

        let (down, mask) = extended(&img, Side::Down, 2);
        assert_eq!((down.width, down.height), (4, 4));
        assert_eq!(mask.values[8..], [255; 8]);
        assert_eq!(mask.values[..8], [0; 8]);

        let mut d = Document::default();
        d.set_image(img);
        assert!(d.extend(Side::Right, 64));
        assert_eq!(d.size(), Some((68, 2)));
        assert_eq!(d.mode(), ModeKind::Inpaint);
        assert!(d.undo());
        assert_eq!(d.size(), Some((4, 2)));
        assert_eq!(d.mode(), ModeKind::Img2Img);
        assert!(
            !Document::default().extend(Side::Left, 64),
            "nothing to extend"
        );
    }

    #[test]
    fn invert_and_clear_mask() {
        let mut d = Document::default();
        d.set_image(image(10, 10, [0, 0, 0]));
        assert!(!d.clear_mask(), "nothing to clear");
        assert!(d.invert_mask());
        assert!(d.mask().values.iter().all(|&v| v == 255));
        assert!(d.clear_mask());
        assert!(d.mask().is_empty());
        assert!(d.undo());
        assert!(d.mask().values.iter().all(|&v| v == 255));
        assert!(d.undo());
        assert!(d.mask().is_empty());
    }

    #[test]
    fn soft_brush_falls_off_and_hard_brush_does_not() {
        let mut d = Document::default();
        d.set_image(image(40, 40, [0, 0, 0]));
        d.paint((20.0, 20.0), (20.0, 20.0), Tool::Brush, 20.0, 1.0);
        let hard = d.mask().clone();
        assert_eq!(
            hard.values[20 * 40 + 28],
            255,
            "inside a hard brush is full"
        );
        d.clear_mask();
        d.paint((20.0, 20.0), (20.0, 20.0), Tool::Brush, 20.0, 0.0);
        let soft = &d.mask().values;
        assert!(
            soft[20 * 40 + 20] > 230,
            "near the centre: {}",
            soft[20 * 40 + 20]
        );
        let edge = soft[20 * 40 + 28];
        assert!(edge > 0 && edge < 128, "soft edge: {edge}");
    }

    #[test]
    fn staging_accept_is_undoable_and_discard_keeps_the_canvas() {
        let mut d = Document::default();
        d.set_image(image(8, 8, [0, 0, 0]));
        d.stage(generated(8, 8, [200, 0, 0]), None);
        d.stage(generated(8, 8, [0, 200, 0]), None);
        assert_eq!(d.selected_index(), 1);
        d.select_staged(0);
        assert!(d.discard_staged());
        assert_eq!(d.staged().len(), 1);
        assert_eq!(
            d.image().map(|i| i.pixels[0]),
            Some(0),
            "discard leaves the canvas"
        );
        assert!(d.accept_staged());
        assert!(d.staged().is_empty());
        assert_eq!(d.image().map(|i| i.pixels[1]), Some(200));
        assert!(d.undo());
        assert_eq!(d.image().map(|i| i.pixels[1]), Some(0));
        // A result of another size is fitted to the canvas.
        d.stage(generated(16, 16, [9, 9, 9]), None);
        d.accept_staged();
        assert_eq!(d.size(), Some((8, 8)));
        // On an empty canvas the result sets the size.
        let mut e = Document::default();
        e.stage(generated(24, 16, [1, 1, 1]), None);
        e.accept_staged();
        assert_eq!(e.size(), Some((24, 16)));
        assert_eq!((e.mask().width, e.mask().height), (24, 16));
        assert!(e.undo());
        assert!(e.is_empty());
    }
}
