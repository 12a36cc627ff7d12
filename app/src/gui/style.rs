//! Shared look: text styles and section frames, taken from the theme's visuals (no colour
//! literals), so panels look alike in light and dark mode; and the one widget several panels
//! show, *Save as safetensors…* for a model read from a pickle.

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

/// *Save as safetensors…* for a model read from the pickle at `path` (the button shows only
/// when `path` is one): asks where, then converts it, read as data.
pub fn save_as_safetensors_ui(
    ui: &mut egui::Ui,
    path: &std::path::Path,
    commands: &mut Vec<super::command::Command>,
) {
    let Some(checkpoint) = studio_inference::pickle::checkpoint_at(path) else {
        return;
    };
    if ui
        .button("Save as safetensors…")
        .on_hover_text(
            "Write the weights as a .safetensors file, which opens faster and is never code \
             (the pickle is read as data: nothing in it runs)",
        )
        .clicked()
    {
        commands.push(super::command::Command::SaveAsSafetensors(checkpoint));
    }
}
