//! Fonts beyond egui's defaults: a fuller monochrome Noto Emoji (`assets/fonts/`, SIL OFL 1.1)
//! as the last fallback of both families, so emoji in replies and prompts (🙂, 🤖, 🥲, skin
//! tones, …) draw as glyphs rather than boxes. egui's bundled emoji font covers about 900
//! code points; this one about 1,500.

use egui::{FontData, FontFamily, FontInsert, FontPriority, InsertFontFamily};

/// Noto Emoji, weight 400 (its license: `assets/fonts/LICENSE-NotoEmoji.txt`).
const NOTO_EMOJI: &[u8] = include_bytes!("../../../assets/fonts/NotoEmoji-Regular.ttf");

/// Adds Studio's fallback fonts to `ctx` (once; later calls change nothing).
pub fn install(ctx: &egui::Context) {
    let families = [FontFamily::Proportional, FontFamily::Monospace]
        .into_iter()
        .map(|family| InsertFontFamily {
            family,
            priority: FontPriority::Lowest,
        })
        .collect();
    ctx.add_font(FontInsert::new(
        "studio-noto-emoji",
        FontData::from_static(NOTO_EMOJI),
        families,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emoji_common_in_replies_have_glyphs_in_both_families() {
        let ctx = egui::Context::default();
        install(&ctx);
        let mut out = ctx.run_ui(egui::RawInput::default(), |_| {});
        out.textures_delta.clear();
        for font in [
            egui::FontId::proportional(14.0),
            egui::FontId::monospace(14.0),
        ] {
            let missing: String = "🙂🤖🥲🫠🚀✅👍"
                .chars()
                .filter(|&c| !ctx.fonts_mut(|f| f.has_glyph(&font, c)))
                .collect();
            assert!(missing.is_empty(), "no glyph in {font:?} for {missing}");
        }
        // Without the fallback, egui's own fonts lack most of them.
        let bare = egui::Context::default();
        let mut out = bare.run_ui(egui::RawInput::default(), |_| {});
        out.textures_delta.clear();
        let font = egui::FontId::proportional(14.0);
        assert!(!bare.fonts_mut(|f| f.has_glyph(&font, '🙂')));
    }
}
