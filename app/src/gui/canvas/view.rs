//! The canvas widget: the image layer with the control layer over it (its lines in cyan, or
//! their own colour) and the mask over both as translucent red, zoom
//! (wheel or pinch, about the pointer) and pan (space-drag or middle-drag), brush and eraser
//! strokes (sent as commands), the selected staged result shown in place, and the live
//! denoising preview stretched over the area being generated.

use std::sync::Arc;

use egui::{Color32, Pos2, Rect, Sense, Stroke, Vec2};
use studio_inference::diffusion::imaging::{Mask, RgbImage};
use studio_inference::diffusion::pipeline::GeneratedImage;

use super::CanvasCommand;
use super::document::{Document, Tool};
use super::history::texture;
use crate::gui::command::Command;

/// The accessible name of the canvas area (tests find it by this).
pub const CANVAS_LABEL: &str = "Image canvas";

const MIN_ZOOM: f32 = 0.05;
const MAX_ZOOM: f32 = 32.0;

/// What the view draws this frame.
pub struct ViewContext<'a> {
    pub doc: &'a Document,
    /// The size of a new image, shown on an empty canvas.
    pub target: (u32, u32),
    pub preview: Option<&'a egui::TextureHandle>,
    pub show_mask: bool,
    pub show_control: bool,
    pub tool: Tool,
    pub brush_size: f32,
}

#[derive(Default)]
pub struct CanvasView {
    zoom: f32,
    /// Offset of the canvas centre from the widget's centre, in points.
    pan: Vec2,
    /// The size the view was last fitted to (a new size fits again).
    fitted: Option<(u32, u32)>,
    image_tex: Option<(u64, egui::TextureHandle)>,
    mask_tex: Option<(u64, egui::TextureHandle)>,
    control_tex: Option<(u64, egui::TextureHandle)>,
    staged_tex: Vec<(usize, egui::TextureHandle)>,
    /// The last brush position of the stroke being drawn (image pixels).
    last_paint: Option<[i32; 2]>,
    refit: bool,
}

impl CanvasView {
    /// Fit the canvas to the view on the next frame.
    pub fn fit(&mut self) {
        self.refit = true;
    }

    /// The texture of a staged result (cached by identity).
    pub fn staged_texture(
        &mut self,
        ctx: &egui::Context,
        image: &Arc<GeneratedImage>,
    ) -> egui::TextureHandle {
        let key = Arc::as_ptr(image) as usize;
        if let Some((_, t)) = self.staged_tex.iter().find(|(k, _)| *k == key) {
            return t.clone();
        }
        let t = texture(ctx, &format!("staged:{key}"), &image.image);
        self.staged_tex.push((key, t.clone()));
        if self.staged_tex.len() > 32 {
            drop(self.staged_tex.remove(0));
        }
        t
    }

    pub fn canvas_ui(
        &mut self,
        ui: &mut egui::Ui,
        cx: &ViewContext<'_>,
        commands: &mut Vec<Command>,
    ) {
        let rect = ui.available_rect_before_wrap();
        let response = ui.allocate_rect(rect, Sense::click_and_drag());
        response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Canvas, true, CANVAS_LABEL));
        let painter = ui.painter_at(rect);
        painter.rect_filled(rect, 0.0, ui.visuals().extreme_bg_color);

        let staged = cx.doc.selected_staged().cloned();
        let size = cx
            .doc
            .layer_size()
            .or_else(|| {
                staged
                    .as_ref()
                    .map(|s| (s.image.image.width, s.image.image.height))
            })
            .unwrap_or(cx.target);
        if self.refit || self.fitted != Some(size) || self.zoom <= 0.0 {
            let (w, h) = (size.0.max(1) as f32, size.1.max(1) as f32);
            self.zoom = ((rect.width() - 24.0) / w)
                .min((rect.height() - 24.0) / h)
                .clamp(MIN_ZOOM, 8.0);
            self.pan = Vec2::ZERO;
            self.fitted = Some(size);
            self.refit = false;
        }
        self.navigate(ui, &response, rect, size);
        let canvas_rect = self.canvas_rect(rect, size);

        // Layers.
        if let Some(image) = cx.doc.image() {
            let tex = cached(&mut self.image_tex, cx.doc.image_rev(), || {
                texture(ui.ctx(), "canvas:image", image)
            });
            draw_texture(&painter, &tex, canvas_rect);
        } else if staged.is_none() {
            let stroke = Stroke::new(1.0, ui.visuals().weak_text_color());
            painter.rect_stroke(canvas_rect, 0.0, stroke, egui::StrokeKind::Inside);
        }
        // The empty canvas says what it is, unless a control layer is drawn there.
        if cx.doc.layer_size().is_none() && staged.is_none() {
            painter.text(
                canvas_rect.center(),
                egui::Align2::CENTER_CENTER,
                format!(
                    "Empty canvas ({}x{})\nGenerate makes a new image here;\ndrop or open an \
                     image to edit one",
                    cx.target.0, cx.target.1
                ),
                egui::TextStyle::Body.resolve(ui.style()),
                ui.visuals().weak_text_color(),
            );
        }
        if let Some(s) = &staged {
            let tex = self.staged_texture(ui.ctx(), &s.image);
            draw_texture(&painter, &tex, canvas_rect);
            painter.rect_stroke(
                canvas_rect,
                0.0,
                Stroke::new(2.0, ui.visuals().selection.stroke.color),
                egui::StrokeKind::Outside,
            );
        }
        if let Some(control) = cx.doc.control()
            && (cx.show_control || matches!(cx.tool, Tool::ControlPen | Tool::ControlEraser))
            && staged.is_none()
        {
            let tex = cached(&mut self.control_tex, cx.doc.control_rev(), || {
                ui.ctx().load_texture(
                    "canvas:control",
                    control_overlay(control),
                    egui::TextureOptions::LINEAR,
                )
            });
            draw_texture(&painter, &tex, canvas_rect);
        }
        if cx.show_mask && cx.doc.image().is_some() && staged.is_none() && !cx.doc.mask().is_empty()
        {
            let mask = cx.doc.mask();
            let tex = cached(&mut self.mask_tex, cx.doc.mask_rev(), || {
                ui.ctx().load_texture(
                    "canvas:mask",
                    mask_overlay(mask),
                    egui::TextureOptions::NEAREST,
                )
            });
            draw_texture(&painter, &tex, canvas_rect);
        }
        if let Some(preview) = cx.preview {
            // latent2rgb previews are 1/8 of the size: stretch over the area being generated.
            draw_texture(&painter, preview, canvas_rect);
        }

        painter.text(
            rect.left_bottom() + egui::vec2(8.0, -6.0),
            egui::Align2::LEFT_BOTTOM,
            hover_help(cx),
            egui::TextStyle::Small.resolve(ui.style()),
            ui.visuals().weak_text_color(),
        );

        // Painting.
        let on_control = matches!(cx.tool, Tool::ControlPen | Tool::ControlEraser);
        // The control pen also draws on an empty canvas (a map for a new image).
        let can_paint =
            (cx.doc.image().is_some() || on_control) && staged.is_none() && !Self::panning(ui);
        let down = response.is_pointer_button_down_on()
            && ui.input(|i| i.pointer.primary_down())
            && can_paint;
        let pointer = response.interact_pointer_pos().or(response.hover_pos());
        if down && let Some(pos) = pointer {
            let p = self.to_image(canvas_rect, pos);
            let from = self.last_paint.unwrap_or(p);
            if self.last_paint != Some(p) {
                commands.push(Command::from(CanvasCommand::Paint { from, to: p }));
            }
            self.last_paint = Some(p);
        } else if self.last_paint.take().is_some() {
            commands.push(Command::from(CanvasCommand::EndStroke));
        }
        if can_paint && let Some(pos) = response.hover_pos() {
            let r = cx.brush_size / 2.0 * self.zoom;
            let color = match cx.tool {
                Tool::Brush => Color32::from_rgb(255, 80, 80),
                Tool::Eraser => ui.visuals().strong_text_color(),
                Tool::Colour([r, g, b]) => Color32::from_rgb(r, g, b),
                Tool::ControlPen => CONTROL_TINT,
                Tool::ControlEraser => ui.visuals().weak_text_color(),
            };
            painter.circle_stroke(pos, r.max(2.0), Stroke::new(1.0, color));
        }
    }

    fn panning(ui: &egui::Ui) -> bool {
        ui.input(|i| i.key_down(egui::Key::Space)) && !ui.ctx().egui_wants_keyboard_input()
    }

    fn navigate(&mut self, ui: &egui::Ui, response: &egui::Response, rect: Rect, size: (u32, u32)) {
        if response.dragged_by(egui::PointerButton::Middle)
            || (response.dragged_by(egui::PointerButton::Primary) && Self::panning(ui))
        {
            self.pan += response.drag_delta();
        }
        if !response.hovered() {
            return;
        }
        let (scroll, pinch) = ui.input(|i| (i.smooth_scroll_delta.y, i.zoom_delta()));
        let factor = (scroll * 0.0025).exp() * pinch;
        if (factor - 1.0).abs() > 1e-4 {
            let new_zoom = (self.zoom * factor).clamp(MIN_ZOOM, MAX_ZOOM);
            if let Some(pointer) = response.hover_pos() {
                // Keep the point under the pointer where it is.
                let centre = rect.center() + self.pan;
                let offset = pointer - centre;
                let scaled = offset * (new_zoom / self.zoom);
                self.pan += offset - scaled;
            }
            self.zoom = new_zoom;
            let _ = size;
        }
    }

    fn canvas_rect(&self, rect: Rect, size: (u32, u32)) -> Rect {
        let extent = Vec2::new(size.0 as f32, size.1 as f32) * self.zoom;
        Rect::from_center_size(rect.center() + self.pan, extent)
    }

    fn to_image(&self, canvas_rect: Rect, pos: Pos2) -> [i32; 2] {
        let p = (pos - canvas_rect.min) / self.zoom;
        [p.x.floor() as i32, p.y.floor() as i32]
    }
}

fn hover_help(cx: &ViewContext<'_>) -> String {
    if cx.doc.selected_staged().is_some() {
        "A staged result: Accept puts it on the canvas, Discard drops it".to_owned()
    } else if cx.doc.image().is_some() || matches!(cx.tool, Tool::ControlPen) {
        match cx.tool {
            Tool::ControlPen | Tool::ControlEraser => {
                "Drag to draw on the control layer (a ControlNet unit set to Layer reads it). \
                 Wheel: zoom. Space-drag: pan"
            }
            Tool::Colour(_) => {
                "Drag to paint colour on the image. Wheel: zoom. Space-drag or middle-drag: pan"
            }
            Tool::Brush | Tool::Eraser => {
                "Drag to paint the mask (the area to redraw). Wheel: zoom. Space-drag or \
                 middle-drag: pan"
            }
        }
        .to_owned()
    } else {
        "Wheel: zoom. Space-drag or middle-drag: pan".to_owned()
    }
}

fn cached(
    slot: &mut Option<(u64, egui::TextureHandle)>,
    rev: u64,
    make: impl FnOnce() -> egui::TextureHandle,
) -> egui::TextureHandle {
    match slot {
        Some((r, t)) if *r == rev => t.clone(),
        _ => {
            let t = make();
            *slot = Some((rev, t.clone()));
            t
        }
    }
}

fn draw_texture(painter: &egui::Painter, tex: &egui::TextureHandle, rect: Rect) {
    painter.image(
        tex.id(),
        rect,
        Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
        Color32::WHITE,
    );
}

/// The mask as translucent red.
fn mask_overlay(mask: &Mask) -> egui::ColorImage {
    let mut rgba = Vec::with_capacity(mask.values.len() * 4);
    for &v in &mask.values {
        rgba.extend_from_slice(&[255, 40, 40, (u16::from(v) * 140 / 255) as u8]);
    }
    egui::ColorImage::from_rgba_unmultiplied([mask.width as usize, mask.height as usize], &rgba)
}

/// How the control layer's grey lines are shown over the image.
const CONTROL_TINT: Color32 = Color32::from_rgb(40, 230, 255);

/// The control layer as an overlay: black is clear; grey lines (scribbles, edges, depth) are
/// cyan, as strong as they are bright; coloured ones (a pose) keep their colour.
fn control_overlay(control: &RgbImage) -> egui::ColorImage {
    let mut rgba = Vec::with_capacity(control.pixels.len() / 3 * 4);
    for px in control.pixels.chunks_exact(3) {
        let (max, min) = (px.iter().max(), px.iter().min());
        let (max, min) = (max.copied().unwrap_or(0), min.copied().unwrap_or(0));
        let [r, g, b] = if max - min < 24 {
            [CONTROL_TINT.r(), CONTROL_TINT.g(), CONTROL_TINT.b()]
        } else {
            [px[0], px[1], px[2]]
        };
        rgba.extend_from_slice(&[r, g, b, (u16::from(max) * 220 / 255) as u8]);
    }
    egui::ColorImage::from_rgba_unmultiplied(
        [control.width as usize, control.height as usize],
        &rgba,
    )
}

/// A preview frame as a texture.
pub fn preview_texture(ctx: &egui::Context, img: &RgbImage) -> egui::TextureHandle {
    texture(ctx, "canvas:preview", img)
}
