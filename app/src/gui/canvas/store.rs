//! The canvas on disk, under `STUDIO_HOME/canvas/`: `image.png`, `mask.png` (grey, white =
//! repaint), `control.png` (the control layer, when it holds anything) and `canvas.json` (the form's values and what the files hold). Written atomically
//! a second after the last change (and on exit), read at startup. A file that cannot be read
//! gives a notice and an empty canvas, never a crash; it is kept aside as `*.bad-<timestamp>`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use studio_inference::diffusion::imaging::{
    Mask, RgbImage, decode_image_bytes, encode_png, mask_from_image,
};

use super::document::Document;
use super::form::FormValues;
use crate::files::FileWorker;
use crate::home::load_json;

/// Bumped when the saved layout changes meaning.
pub const CANVAS_VERSION: u32 = 1;

/// How long after the last change the canvas is written.
pub const SAVE_DEBOUNCE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SavedCanvas {
    pub version: u32,
    pub form: FormValues,
    /// Whether `image.png` (and `mask.png`) belong to this save.
    pub has_image: bool,
    /// Whether `control.png` belongs to this save.
    pub has_control: bool,
    pub width: u32,
    pub height: u32,
}

impl Default for SavedCanvas {
    fn default() -> Self {
        Self {
            version: CANVAS_VERSION,
            form: FormValues::default(),
            has_image: false,
            has_control: false,
            width: 0,
            height: 0,
        }
    }
}

/// What was read at startup.
#[derive(Debug, Default)]
pub struct Loaded {
    pub form: Option<FormValues>,
    pub image: Option<RgbImage>,
    pub mask: Option<Mask>,
    pub control: Option<RgbImage>,
    /// Problems to show as notices.
    pub notes: Vec<String>,
}

#[derive(Debug)]
pub struct CanvasStore {
    dir: PathBuf,
    saved_image_rev: Option<u64>,
    saved_mask_rev: Option<u64>,
    saved_control_rev: Option<u64>,
    saved_form: Option<FormValues>,
    changed_at: Option<Instant>,
}

impl CanvasStore {
    pub fn dir(home: &Path) -> PathBuf {
        home.join("canvas")
    }

    pub fn new(home: &Path) -> Self {
        Self {
            dir: Self::dir(home),
            saved_image_rev: None,
            saved_mask_rev: None,
            saved_control_rev: None,
            saved_form: None,
            changed_at: None,
        }
    }

    /// Reads the saved canvas. Unreadable files are renamed `*.bad-<timestamp>` and reported.
    pub fn load(&self) -> Loaded {
        let mut out = Loaded::default();
        let json = self.dir.join("canvas.json");
        let saved = match load_json::<SavedCanvas>(&json) {
            Ok(s) => s,
            Err(e) => {
                out.notes.push(format!(
                    "The saved canvas could not be read ({e:#}); starting with an empty canvas.{}",
                    crate::home::keep_corrupt(&json)
                ));
                return out;
            }
        };
        let Some(saved) = saved else {
            return out;
        };
        out.form = Some(saved.form);
        let control_path = self.dir.join("control.png");
        if saved.has_control {
            match read_png(&control_path) {
                Ok(c) => out.control = Some(c),
                Err(e) => out.notes.push(format!(
                    "The saved control layer could not be read ({e:#}); it is empty.{}",
                    crate::home::keep_corrupt(&control_path)
                )),
            }
        }
        if !saved.has_image {
            return out;
        }
        let image_path = self.dir.join("image.png");
        match read_png(&image_path) {
            Ok(img) => out.image = Some(img),
            Err(e) => {
                out.notes.push(format!(
                    "The saved canvas image could not be read ({e:#}); starting with an empty \
                     canvas.{}",
                    crate::home::keep_corrupt(&image_path)
                ));
                return out;
            }
        }
        let mask_path = self.dir.join("mask.png");
        if mask_path.exists() {
            match read_png(&mask_path) {
                Ok(m) => out.mask = Some(mask_from_image(&m)),
                Err(e) => out.notes.push(format!(
                    "The saved mask could not be read ({e:#}); the mask is empty.{}",
                    crate::home::keep_corrupt(&mask_path)
                )),
            }
        }
        out
    }

    /// Marks what was just loaded as saved.
    pub fn mark_saved(&mut self, doc: &Document, form: &FormValues) {
        self.saved_image_rev = Some(doc.image_rev());
        self.saved_mask_rev = Some(doc.mask_rev());
        self.saved_control_rev = Some(doc.control_rev());
        self.saved_form = Some(form.clone());
    }

    fn dirty(&self, doc: &Document, form: &FormValues) -> bool {
        self.saved_image_rev != Some(doc.image_rev())
            || self.saved_mask_rev != Some(doc.mask_rev())
            || self.saved_control_rev != Some(doc.control_rev())
            || self.saved_form.as_ref() != Some(form)
    }

    /// Call once per frame: queues the writes a second after the last change. Returns when to
    /// look again.
    pub fn tick(
        &mut self,
        doc: &Document,
        form: &FormValues,
        files: &FileWorker,
    ) -> Option<Duration> {
        if !self.dirty(doc, form) {
            self.changed_at = None;
            return None;
        }
        let changed_at = *self.changed_at.get_or_insert_with(Instant::now);
        // Another change restarts the wait.
        let waited = changed_at.elapsed();
        if waited < SAVE_DEBOUNCE {
            return Some(SAVE_DEBOUNCE.saturating_sub(waited));
        }
        self.flush(doc, form, files);
        None
    }

    /// Queues the writes now if anything changed. Errors come back from the file thread.
    pub fn flush(&mut self, doc: &Document, form: &FormValues, files: &FileWorker) {
        if !self.dirty(doc, form) {
            return;
        }
        self.changed_at = None;
        self.write(doc, form, files);
        // Whatever happens, do not retry every frame: the next change tries again.
        self.mark_saved(doc, form);
    }

    /// Queues `image.png`, `mask.png`, `control.png` and then `canvas.json` (the file thread keeps the order,
    /// so the JSON never names files that are not written yet).
    fn write(&self, doc: &Document, form: &FormValues, files: &FileWorker) {
        const WHAT: &str = "The canvas";
        if let Some(image) = doc.image() {
            if self.saved_image_rev != Some(doc.image_rev()) {
                let image = image.clone();
                files.write(
                    WHAT,
                    &self.dir.join("image.png"),
                    Box::new(move || encode_png(&image, None).context("encoding the canvas image")),
                );
            }
            if self.saved_mask_rev != Some(doc.mask_rev())
                || self.saved_image_rev != Some(doc.image_rev())
            {
                let m = doc.mask().clone();
                files.write(
                    WHAT,
                    &self.dir.join("mask.png"),
                    Box::new(move || {
                        let grey = RgbImage {
                            width: m.width,
                            height: m.height,
                            pixels: m.values.iter().flat_map(|&v| [v, v, v]).collect(),
                        };
                        encode_png(&grey, None).context("encoding the mask")
                    }),
                );
            }
        }
        if let Some(control) = doc.control()
            && self.saved_control_rev != Some(doc.control_rev())
        {
            let control = control.clone();
            files.write(
                WHAT,
                &self.dir.join("control.png"),
                Box::new(move || encode_png(&control, None).context("encoding the control layer")),
            );
        }
        let (width, height) = doc.size().unwrap_or((0, 0));
        let saved = SavedCanvas {
            version: CANVAS_VERSION,
            form: form.clone(),
            has_image: doc.image().is_some(),
            has_control: doc.control().is_some(),
            width,
            height,
        };
        files.write(
            WHAT,
            &self.dir.join("canvas.json"),
            Box::new(move || serde_json::to_vec_pretty(&saved).context("serializing")),
        );
    }
}

fn read_png(path: &Path) -> anyhow::Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(decode_image_bytes(&bytes)
        .with_context(|| format!("reading {}", path.display()))?
        .image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gui::canvas::document::Tool;

    #[test]
    fn the_canvas_round_trips_and_a_corrupt_save_gives_an_empty_canvas() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut doc = Document::default();
        doc.set_image(RgbImage::new_filled(16, 8, [10, 200, 30]));
        doc.paint((4.0, 4.0), (10.0, 4.0), Tool::Brush, 3.0, 1.0);
        doc.end_stroke();
        doc.paint((2.0, 6.0), (12.0, 6.0), Tool::ControlPen, 2.0, 1.0);
        let form = FormValues {
            prompt: "a red fox".into(),
            steps: 9,
            ..FormValues::default()
        };
        let mut store = CanvasStore::new(tmp.path());
        let files = FileWorker::spawn(|| {});
        store.flush(&doc, &form, &files);
        let done = files.flush();
        assert!(done.is_empty(), "{done:?}");
        let loaded = CanvasStore::new(tmp.path()).load();
        assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
        assert_eq!(loaded.form.as_ref(), Some(&form));
        assert_eq!(loaded.image.as_ref(), doc.image());
        assert_eq!(loaded.mask.as_ref(), Some(doc.mask()));
        assert!(doc.control().is_some());
        assert_eq!(loaded.control.as_ref(), doc.control(), "the control layer");

        // A corrupt control layer: a notice, the rest of the canvas kept.
        std::fs::write(CanvasStore::dir(tmp.path()).join("control.png"), b"junk").expect("w");
        let loaded = CanvasStore::new(tmp.path()).load();
        assert!(loaded.control.is_none() && loaded.image.is_some());
        assert_eq!(loaded.notes.len(), 1, "{:?}", loaded.notes);
        let control = doc.control().expect("layer");
        let png = encode_png(control, None).expect("png");
        std::fs::write(CanvasStore::dir(tmp.path()).join("control.png"), png).expect("w");

        std::fs::write(CanvasStore::dir(tmp.path()).join("image.png"), b"garbage").expect("w");
        let loaded = CanvasStore::new(tmp.path()).load();
        assert!(loaded.image.is_none());
        assert_eq!(loaded.notes.len(), 1, "{:?}", loaded.notes);
        let kept = crate::home::kept_copies(&CanvasStore::dir(tmp.path()), "image.png");
        assert_eq!(kept, 1);

        std::fs::write(CanvasStore::dir(tmp.path()).join("canvas.json"), b"{ nope").expect("w");
        let loaded = CanvasStore::new(tmp.path()).load();
        assert!(loaded.form.is_none() && loaded.image.is_none());
        assert_eq!(loaded.notes.len(), 1);
    }
}
