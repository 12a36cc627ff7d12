//! The chat panel's parameters: the system prompt with its preset gallery, the sampling
//! presets and parameters, stop strings, and structured output (JSON mode, a JSON schema or a
//! GBNF grammar the reply is kept to while sampling). They belong to the open conversation
//! (saved with it); a new conversation starts from the last ones used.

use egui::RichText;
use studio_inference::llm::grammar::StructuredOutput;
use studio_inference::llm::loader::ModelInfo;
use studio_inference::llm::sampling::SamplingParams;

use crate::gui::format;
use crate::gui::presets::Presets;
use crate::gui::settings_store::Settings;
use crate::gui::style::weak;

#[derive(Default)]
pub struct ParametersView {
    /// The stop-strings field as typed (one per line, `\n` for a line break).
    stop_text: String,
    /// The structured output last checked, and what checking it said (`None`: it compiles).
    checked: Option<(StructuredOutput, Option<String>)>,
    /// The tools field as typed, and what checking it said (`None`: a valid list).
    tools_text: String,
    tools_error: Option<String>,
    /// The tools the field's text was last made from or read into (another conversation's
    /// tools, or a reset, remake the text).
    tools_synced: Option<serde_json::Value>,
}

/// The accessible name of the tools field (an OpenAI `tools` list as JSON).
pub const TOOLS_LABEL: &str = "Tools (JSON)";

/// The accessible name of the structured-output field (the schema or grammar text).
pub const STRUCTURE_LABEL: &str = "Schema or grammar";

impl ParametersView {
    pub fn parameters_ui(
        &mut self,
        ui: &mut egui::Ui,
        presets: &mut Presets,
        settings: &mut Settings,
        model: Option<&ModelInfo>,
    ) {
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.add_space(4.0);
                ui.heading("Parameters");
                ui.add(
                    egui::Label::new(weak(
                        ui,
                        "Saved with this conversation; a new chat starts from the last ones used.",
                    ))
                    .wrap(),
                );
                ui.add_space(4.0);
                preset_ui(ui, presets, &mut settings.sampling);
                ui.add_space(6.0);
                egui::CollapsingHeader::new("System prompt")
                    .default_open(true)
                    .show(ui, |ui| {
                        ui.label(weak(ui, "Sent before the conversation, with every reply."));
                        system_preset_ui(ui, presets, &mut settings.system_prompt);
                        ui.add(
                            egui::TextEdit::multiline(&mut settings.system_prompt)
                                .hint_text("e.g. You are a concise, friendly assistant.")
                                .desired_rows(3)
                                .desired_width(f32::INFINITY),
                        )
                        .accessible_name("System prompt");
                    });
                egui::CollapsingHeader::new("Sampling")
                    .default_open(true)
                    .show(ui, |ui| {
                        sampling_grid_ui(ui, settings, model);
                    });
                egui::CollapsingHeader::new("Stop strings")
                    .default_open(false)
                    .show(ui, |ui| self.stop_strings_ui(ui, &mut settings.sampling));
                egui::CollapsingHeader::new("Tools")
                    .default_open(settings.sampling.tools.is_some())
                    .show(ui, |ui| self.tools_ui(ui, &mut settings.sampling.tools));
                egui::CollapsingHeader::new("Structured output")
                    .default_open(!settings.sampling.structured.is_off())
                    .show(ui, |ui| self.structured_ui(ui, &mut settings.sampling.structured));
                ui.add_space(6.0);
                if ui
                    .button("Reset to defaults")
                    .on_hover_text("Default sampling parameters (the system prompt is kept)")
                    .clicked()
                {
                    let defaults = Settings::default();
                    settings.sampling = defaults.sampling;
                    settings.new_seed_each_reply = defaults.new_seed_each_reply;
                }
            });
    }

    fn stop_strings_ui(&mut self, ui: &mut egui::Ui, params: &mut SamplingParams) {
        if parse_stop_strings(&self.stop_text) != params.stop {
            self.stop_text = params
                .stop
                .iter()
                .map(|s| s.replace('\n', "\\n"))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let label = ui.label(weak(
            ui,
            "One per line; \\n stands for a line break. The reply ends before any of them.",
        ));
        let response = ui.add(
            egui::TextEdit::multiline(&mut self.stop_text)
                .hint_text("e.g. ###")
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        );
        let response = response.labelled_by(label.id);
        if response.changed() {
            params.stop = parse_stop_strings(&self.stop_text);
        }
    }
}

impl ParametersView {
    /// The tools offered to the model: an OpenAI `tools` list, checked as typed; its calls are
    /// shown in the conversation with a field for each result.
    fn tools_ui(&mut self, ui: &mut egui::Ui, tools: &mut Option<serde_json::Value>) {
        if *tools != self.tools_synced {
            self.tools_text = tools
                .as_ref()
                .map(|t| serde_json::to_string_pretty(t).unwrap_or_default())
                .unwrap_or_default();
            self.tools_synced.clone_from(tools);
            self.tools_error = None;
        }
        ui.label(weak(
            ui,
            "Functions the model may call, as an OpenAI tools list (name, description, JSON \
             schema of the parameters). Its calls appear in the conversation; answer each with \
             the result.",
        ));
        let response = ui.add(
            egui::TextEdit::multiline(&mut self.tools_text)
                .hint_text(
                    r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]"#,
                )
                .font(egui::TextStyle::Monospace)
                .desired_rows(5)
                .desired_width(f32::INFINITY),
        );
        let response = response.accessible_name(TOOLS_LABEL);
        if response.changed() {
            let text = self.tools_text.trim();
            let checked = if text.is_empty() {
                Ok(None)
            } else {
                serde_json::from_str::<serde_json::Value>(text)
                    .map_err(|e| format!("not JSON: {e}"))
                    .and_then(|v| match v.as_array() {
                        Some(list) => studio_inference::llm::tools::check_tools(list).map(|_| Some(v.clone())),
                        None => Err("a list of tools: [{\"type\": \"function\", …}]".to_owned()),
                    })
            };
            match checked {
                Ok(v) => {
                    self.tools_synced.clone_from(&v);
                    *tools = v;
                    self.tools_error = None;
                }
                Err(e) => self.tools_error = Some(e),
            }
        }
        match &self.tools_error {
            Some(e) => {
                ui.colored_label(ui.visuals().error_fg_color, e);
            }
            None if tools.is_some() => {
                ui.label(weak(ui, "Offered on every reply"));
            }
            None => {}
        }
    }

    /// JSON mode, a JSON schema or a GBNF grammar, with what checking it says.
    fn structured_ui(&mut self, ui: &mut egui::Ui, s: &mut StructuredOutput) {
        ui.label(weak(
            ui,
            "The reply is kept to it while sampling: only tokens that fit can be chosen.",
        ));
        let kind = |s: &StructuredOutput| match s {
            StructuredOutput::Off => "Off",
            StructuredOutput::JsonObject => "JSON",
            StructuredOutput::JsonSchema { .. } => "JSON schema",
            StructuredOutput::Gbnf { .. } => "Grammar (GBNF)",
        };
        let mut chosen = kind(s);
        ui.horizontal(|ui| {
            let l = ui.label("Output");
            egui::ComboBox::from_id_salt("chat_structured")
                .selected_text(chosen)
                .show_ui(ui, |ui| {
                    for k in ["Off", "JSON", "JSON schema", "Grammar (GBNF)"] {
                        ui.selectable_value(&mut chosen, k, k);
                    }
                })
                .response
                .labelled_by(l.id);
        });
        if chosen != kind(s) {
            // Switching between schema and grammar keeps the text typed so far.
            let text = match s {
                StructuredOutput::JsonSchema { schema } => schema.clone(),
                StructuredOutput::Gbnf { grammar } => grammar.clone(),
                _ => String::new(),
            };
            *s = match chosen {
                "JSON" => StructuredOutput::JsonObject,
                "JSON schema" => StructuredOutput::JsonSchema { schema: text },
                "Grammar (GBNF)" => StructuredOutput::Gbnf { grammar: text },
                _ => StructuredOutput::Off,
            };
        }
        let (text, hint) = match s {
            StructuredOutput::JsonSchema { schema } => (
                schema,
                r#"{"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}"#,
            ),
            StructuredOutput::Gbnf { grammar } => (grammar, r#"root ::= "yes" | "no""#),
            StructuredOutput::Off | StructuredOutput::JsonObject => {
                if matches!(s, StructuredOutput::JsonObject) {
                    ui.label(weak(ui, "Every reply is one JSON object."));
                }
                return;
            }
        };
        ui.add(
            egui::TextEdit::multiline(text)
                .hint_text(hint)
                .font(egui::TextStyle::Monospace)
                .desired_rows(5)
                .desired_width(f32::INFINITY),
        )
        .accessible_name(STRUCTURE_LABEL);
        let empty = text.trim().is_empty();
        if self.checked.as_ref().map(|(c, _)| c) != Some(s) {
            let why = if empty {
                Some("Empty: write a schema or grammar".to_owned())
            } else {
                s.compile().err().map(|e| e.to_string())
            };
            self.checked = Some((s.clone(), why));
        }
        match self.checked.as_ref().and_then(|(_, why)| why.as_deref()) {
            Some(why) => {
                ui.colored_label(ui.visuals().error_fg_color, why);
            }
            None => {
                ui.label(weak(ui, "Enforced on every reply"));
            }
        }
    }
}

fn parse_stop_strings(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.replace("\\n", "\n"))
        .collect()
}

fn sampling_grid_ui(ui: &mut egui::Ui, settings: &mut Settings, model: Option<&ModelInfo>) {
    let p = &mut settings.sampling;
    egui::Grid::new("sampling_grid")
        .num_columns(2)
        .spacing([8.0, 6.0])
        .show(ui, |ui| {
            let l = ui.label("Temperature");
            ui.add(egui::Slider::new(&mut p.temperature, 0.0..=2.0).step_by(0.05))
                .labelled_by(l.id)
                .on_hover_text("Higher is more varied; 0 always takes the most likely token");
            ui.end_row();

            let l = ui.label("Top-k");
            ui.add(egui::DragValue::new(&mut p.top_k).range(0..=1000))
                .labelled_by(l.id)
                .on_hover_text("Keep the k most likely tokens; 0 turns it off");
            ui.end_row();

            let l = ui.label("Top-p");
            ui.add(egui::Slider::new(&mut p.top_p, 0.01..=1.0).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text(
                    "Keep the most likely tokens up to this total probability; 1 turns it off",
                );
            ui.end_row();

            let l = ui.label("Min-p");
            ui.add(egui::Slider::new(&mut p.min_p, 0.0..=1.0).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text(
                    "Drop tokens less likely than this fraction of the best one; 0 turns it off",
                );
            ui.end_row();

            let l = ui.label("Repeat penalty");
            ui.add(egui::Slider::new(&mut p.repeat_penalty, 0.5..=2.0).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text("Discourage tokens used recently; 1 turns it off");
            ui.end_row();

            let l = ui.label("Repeat window");
            ui.add(
                egui::DragValue::new(&mut p.repeat_last_n)
                    .range(0..=8192)
                    .suffix(" tokens"),
            )
            .labelled_by(l.id)
            .on_hover_text("How many recent tokens the repeat penalty looks at");
            ui.end_row();

            let l = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add_enabled(
                    !settings.new_seed_each_reply,
                    egui::DragValue::new(&mut p.seed).speed(1.0),
                )
                .labelled_by(l.id)
                .on_hover_text("Same seed, settings and conversation: same reply");
                if ui
                    .button("Random")
                    .on_hover_text("Pick a new random seed")
                    .clicked()
                {
                    p.seed = format::random_seed();
                }
            });
            ui.end_row();

            ui.label("");
            ui.checkbox(&mut settings.new_seed_each_reply, "New seed each reply")
                .on_hover_text(
                    "Draw a fresh seed for every reply (shown under the reply), so Regenerate \
                     gives a different answer",
                );
            ui.end_row();

            let l = ui.label("Max new tokens");
            let max = model.map_or(32_768, |m| m.context_length.max(1));
            ui.add(egui::DragValue::new(&mut p.max_new_tokens).range(1..=max))
                .labelled_by(l.id)
                .on_hover_text("The longest reply, in tokens");
            ui.end_row();
        });
}

fn preset_ui(ui: &mut egui::Ui, presets: &mut Presets, params: &mut SamplingParams) {
    let current = presets.list.iter().find(|p| p.matches(params));
    let selected_text = current.map_or("Custom", |p| p.name.as_str());
    let description = current.map(|p| p.description.clone());
    let mut chosen = None;
    ui.horizontal(|ui| {
        let label = ui.label("Preset");
        egui::ComboBox::from_id_salt("sampling_preset")
            .selected_text(selected_text)
            .width(160.0)
            .show_ui(ui, |ui| {
                for (i, p) in presets.list.iter().enumerate() {
                    let is_current = current.is_some_and(|c| c.name == p.name);
                    if ui
                        .selectable_label(is_current, &p.name)
                        .on_hover_text(&p.description)
                        .clicked()
                    {
                        chosen = Some(i);
                    }
                }
            })
            .response
            .labelled_by(label.id);
    });
    if let Some(d) = description.filter(|d| !d.is_empty()) {
        ui.add(egui::Label::new(weak(ui, &d)).wrap());
    }
    if let Some(preset) = chosen.and_then(|i| presets.list.get(i)) {
        match preset.apply(params) {
            Ok(p) => *params = p,
            Err(e) => presets.errors.push(e),
        }
    }
    match &presets.dir {
        None => {
            ui.add(
                egui::Label::new(weak(
                    ui,
                    "No presets folder found: set STUDIO_PRESETS to a folder with \
                     sampling/*.json files.",
                ))
                .wrap(),
            );
        }
        Some(dir) if presets.list.is_empty() && presets.errors.is_empty() => {
            ui.add(
                egui::Label::new(weak(
                    ui,
                    &format!("No presets in {}", dir.join("sampling").display()),
                ))
                .wrap(),
            );
        }
        Some(_) => {}
    }
    for e in &presets.errors {
        ui.add(egui::Label::new(RichText::new(e).small().color(ui.visuals().warn_fg_color)).wrap());
    }
}

/// The system-prompt gallery: choosing a preset replaces the prompt (which stays editable).
fn system_preset_ui(ui: &mut egui::Ui, presets: &Presets, prompt: &mut String) {
    if presets.system.is_empty() {
        return;
    }
    let current = presets
        .system
        .iter()
        .find(|p| p.prompt.trim() == prompt.trim());
    let selected_text = match current {
        Some(p) => p.name.as_str(),
        None if prompt.trim().is_empty() => "None",
        None => "Custom",
    };
    let mut chosen: Option<String> = None;
    ui.horizontal(|ui| {
        let label = ui.label("Gallery");
        egui::ComboBox::from_id_salt("system_preset")
            .selected_text(selected_text)
            .width(170.0)
            .show_ui(ui, |ui| {
                if ui
                    .selectable_label(prompt.trim().is_empty(), "None")
                    .on_hover_text("No system prompt")
                    .clicked()
                {
                    chosen = Some(String::new());
                }
                for p in &presets.system {
                    let is_current = current.is_some_and(|c| c.name == p.name);
                    if ui
                        .selectable_label(is_current, &p.name)
                        .on_hover_text(&p.description)
                        .clicked()
                    {
                        chosen = Some(p.prompt.clone());
                    }
                }
            })
            .response
            .labelled_by(label.id);
    });
    if let Some(d) = current
        .map(|p| p.description.as_str())
        .filter(|d| !d.is_empty())
    {
        ui.add(egui::Label::new(weak(ui, d)).wrap());
    }
    if let Some(text) = chosen {
        *prompt = text;
    }
}
