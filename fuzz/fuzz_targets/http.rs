//! One connection's raw bytes through `studio serve`'s HTTP stack, access checks and
//! handlers (request parsing, template rendering and tokenizing), on a stand-in model that
//! refuses to generate. Seeds are real requests with `Host: 127.0.0.1:8080`.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use studio_app::serve::fuzzing::Harness;
use studio_app::serve::{Limits, ServeOptions};
use studio_inference::llm::chat::ChatFormat;
use studio_inference::llm::template::ChatTemplate;
use studio_inference::llm::text::Tokenizer;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let template = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).expect("template");
        Harness::new(
            Tokenizer::from_inner(studio_tests::train_tokenizer(300)),
            ChatFormat::Template(template),
            256,
            ServeOptions {
                api_key: None,
                limits: Limits {
                    max_body_bytes: 1 << 16,
                    header_timeout: Duration::from_millis(200),
                    body_timeout: Duration::from_millis(200),
                    write_timeout: Duration::from_millis(200),
                    ..Limits::default()
                },
                ..ServeOptions::default()
            },
        )
        .expect("harness")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let reply = harness().exchange(data);
    // Whatever came in, what goes out is HTTP (1.1, or 1.0 to a 1.0 request) or nothing.
    assert!(
        reply.is_empty() || reply.starts_with(b"HTTP/1.1 ") || reply.starts_with(b"HTTP/1.0 "),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
});
