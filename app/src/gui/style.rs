//! Shared look: text styles and section frames, taken from the theme's visuals (no colour
//! literals), so panels look alike in light and dark mode.

use egui::RichText;

/// Secondary text (hints, units, metadata).
pub fn weak(ui: &egui::Ui, text: &str) -> RichText {
    RichText::new(text).color(ui.visuals().weak_text_color())
}

/// A titled group with the panels' standard margins and spacing.
pub fn section_ui(ui: &mut egui::Ui, title: &str, add_contents: impl FnOnce(&mut egui::Ui)) {
    egui::Frame::group(ui.style())
        .inner_margin(egui::Margin::same(10))
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            ui.label(RichText::new(title).strong().size(15.0));
            ui.add_space(4.0);
            add_contents(ui);
        });
    ui.add_space(8.0);
}
