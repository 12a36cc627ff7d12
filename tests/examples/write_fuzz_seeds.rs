//! Writes the seed corpus of the fuzz targets in `fuzz/` (committed as `fuzz/corpus/`):
//!
//! ```text
//! cargo run -p studio-tests --example write_fuzz_seeds -- fuzz/corpus
//! ```
//!
//! Each seed is a small valid input the target's parser accepts (a tiny model's GGUF header and
//! safetensors, real configs, a latent `.npy`, a PNG with `parameters`, real chat templates,
//! HTTP requests for each route), so the fuzzer starts from deep inside the parsers.

use std::path::Path;

use serde_json::json;
use studio_inference::gan::npy::{NpyArray, encode};
use studio_inference::image_meta::{GenerationParameters, encode_png};
use studio_tests::gguf_writer::{GgufOptions, write_family_gguf};

/// At most this much of a file: libFuzzer works on small inputs. The GGUF seed is whole (a
/// cut file fails the reader's checks before its tokenizer is built).
const MAX_SEED: usize = 64 << 10;

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    let keep = if target == "gguf" {
        bytes.len()
    } else {
        bytes.len().min(MAX_SEED)
    };
    std::fs::write(dir.join(name), &bytes[..keep]).expect("seed");
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and message['role'] == 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}";

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".to_owned());
    let out = Path::new(&out);
    let tmp = tempfile::tempdir().expect("tmp");

    // GGUF and safetensors: a tiny Llama's files (the GGUF cut to its header and first data).
    let gguf = write_family_gguf(tmp.path(), "llama", 1, &GgufOptions::default());
    put(
        out,
        "gguf",
        "llama-tiny.gguf",
        &std::fs::read(gguf).expect("gguf"),
    );
    let weights = std::fs::read(tmp.path().join("model.safetensors")).expect("weights");
    put(out, "safetensors", "llama-tiny.safetensors", &weights);
    put(
        out,
        "shard_index",
        "index.json",
        json!({"metadata": {"total_size": 1}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}})
            .to_string()
            .as_bytes(),
    );
    put(
        out,
        "shard_index",
        "escape.json",
        br#"{"weight_map": {"a": "../../etc/passwd"}}"#,
    );

    // config.json: the first byte picks the family (gpt2, llama, mistral, qwen2, qwen3, phi3,
    // gemma2, gemma3_text), the rest is the config.
    for (i, model_type) in studio_tests::families::model_types().enumerate() {
        let dir = tmp.path().join(model_type);
        studio_tests::families::write_model(&dir, model_type, 1);
        let mut seed = vec![i as u8];
        seed.extend(std::fs::read(dir.join("config.json")).expect("config"));
        put(out, "config", &format!("{model_type}.json"), &seed);
    }

    // .npy: a z vector and a w batch.
    for (name, shape) in [("z.npy", vec![1, 8]), ("ws.npy", vec![1, 4, 8])] {
        let n = shape.iter().product::<usize>();
        let array = NpyArray {
            shape,
            data: (0..n).map(|i| i as f32 * 0.25 - 1.0).collect(),
        };
        put(out, "npy", name, &encode(&array).expect("npy"));
    }

    // A PNG with the SD web UI's `parameters`, and the text alone.
    let mut params = GenerationParameters::parse(
        "a castle on a hill, (detailed:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 4x4, Model: sd15",
    );
    params.set("Denoising strength", "0.6");
    let png = encode_png(4, 4, &[128; 64], &params).expect("png");
    put(out, "png_parameters", "parameters.png", &png);
    put(
        out,
        "png_parameters",
        "parameters.txt",
        params.to_text().as_bytes(),
    );

    // Chat templates (template, NUL, message text).
    for (name, template) in [("chatml", CHATML), ("llama3", LLAMA3), ("gemma", GEMMA)] {
        put(
            out,
            "chat_template",
            name,
            format!("{template}\0Hello there").as_bytes(),
        );
    }
    put(
        out,
        "chat_template",
        "loops",
        b"{% for i in range(3) %}{% for m in messages %}{{ m.content ~ i }}{% endfor %}{% endfor %}\0x",
    );

    // Tokenizers.
    put(
        out,
        "tokenizers",
        "prompt",
        "a (red:1.3) fox, [blurry], \u{e9}t\u{e9} \u{1f98a} BREAK night".as_bytes(),
    );

    // HTTP: each route, with the headers clients send.
    let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": true}).to_string();
    let completion =
        json!({"prompt": "Once upon", "max_tokens": 4, "temperature": 0.5, "stop": ["\n"]})
            .to_string();
    let request = |method: &str, path: &str, extra: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    put(
        out,
        "http",
        "models",
        request("GET", "/v1/models", "", "").as_bytes(),
    );
    put(
        out,
        "http",
        "health",
        request("GET", "/health", "", "").as_bytes(),
    );
    put(
        out,
        "http",
        "chat",
        request("POST", "/v1/chat/completions", "", &chat).as_bytes(),
    );
    put(
        out,
        "http",
        "completion",
        request(
            "POST",
            "/v1/completions",
            "Authorization: Bearer k\r\n",
            &completion,
        )
        .as_bytes(),
    );
    put(
        out,
        "http",
        "chunked",
        format!("POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{completion}\r\n0\r\n\r\n", completion.len()).as_bytes(),
    );
    put(
        out,
        "http",
        "preflight",
        b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: POST\r\n\r\n",
    );
    let pipelined = format!(
        "{}{}",
        request("GET", "/v1/models", "", ""),
        request("POST", "/v1/completions", "", &completion)
    );
    put(out, "http", "pipelined", pipelined.as_bytes());
}
