//! Panels that are planned but not built yet. Each says so plainly and what it will do; none
//! shows controls that do nothing.

use egui::RichText;

use super::settings_store::Panel;
use super::style::weak;

/// What the panel will do, in one paragraph.
pub fn not_built_text(panel: Panel) -> &'static str {
    match panel {
        Panel::Code => {
            "Code Assist is not built yet: it will complete code where your cursor is with \
             fill-in-the-middle models (Qwen2.5-Coder, StarCoder2, CodeLlama, DeepSeek-Coder), \
             and explain, fix or document a selection, streaming the change as a diff you \
             accept or reject."
        }
        Panel::Chat | Panel::Canvas | Panel::LatentExplorer | Panel::Models | Panel::Settings => "",
    }
}

pub fn placeholder_ui(ui: &mut egui::Ui, panel: Panel) {
    ui.add_space(24.0);
    ui.vertical_centered(|ui| {
        ui.set_max_width(560.0);
        ui.heading(panel.label());
        ui.add_space(12.0);
        ui.add(egui::Label::new(RichText::new(not_built_text(panel)).size(15.0)).wrap());
        ui.add_space(12.0);
        ui.label(weak(
            ui,
            "Chat, Canvas, Latent Explorer and Models work today.",
        ));
    });
}
