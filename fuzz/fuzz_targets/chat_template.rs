//! Chat templates as a model file could carry them (with the fuel and the output cap on):
//! the bytes up to the first NUL are the template, the rest a message's text.
#![no_main]

use studio_inference::llm::template::{ChatTemplate, TemplateMessage};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (source, content) = text.split_once('\0').unwrap_or((&text, "Hello"));
    let Ok(template) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) else {
        return;
    };
    let messages = [
        TemplateMessage::system("Be brief."),
        TemplateMessage::user(content),
        TemplateMessage::assistant(content),
        TemplateMessage::user(content),
    ];
    let _ = template.render(&messages, true);
    let _ = template.render(&messages[1..2], false);
});
