//! What was pasted this frame, for the panels' Ctrl+V.

use studio_inference::diffusion::imaging::RgbImage;

/// This frame's pasted texts and images (composited over white).
pub(crate) fn pasted(ctx: &egui::Context) -> (Vec<String>, Vec<RgbImage>) {
    ctx.input(|i| {
        let mut texts = Vec::new();
        let mut images = Vec::new();
        for e in &i.events {
            match e {
                egui::Event::Paste(text) => texts.push(text.clone()),
                egui::Event::PasteImage(image) => images.push(rgb_over_white(image)),
                _ => {}
            }
        }
        (texts, images)
    })
}

/// A pasted image (egui's premultiplied RGBA) composited over white, as the canvas holds RGB.
fn rgb_over_white(image: &egui::ColorImage) -> RgbImage {
    let mut pixels = Vec::with_capacity(image.pixels.len() * 3);
    for c in &image.pixels {
        let white = 255 - c.a();
        pixels.extend([
            c.r().saturating_add(white),
            c.g().saturating_add(white),
            c.b().saturating_add(white),
        ]);
    }
    RgbImage {
        width: image.size[0] as u32,
        height: image.size[1] as u32,
        pixels,
    }
}
