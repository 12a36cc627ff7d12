//! The `parameters` text that Stable Diffusion tools write into their PNGs (the format of the
//! most used SD web UI, read by image browsers and model sites), written and read exactly:
//!
//! ```text
//! <positive prompt, may span lines>
//! Negative prompt: <negative prompt>          (line left out when empty)
//! Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b
//! ```
//!
//! Pairs are joined by `", "`; pairs without a value are left out; a value containing `,`, `:`
//! or a newline is written as a JSON string. A reader takes the last line as the parameters
//! when it holds three or more `Key: value` pairs.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The PNG text keyword holding the parameters.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// Generation parameters as stored in an image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationParameters {
    /// The positive prompt; may span several lines.
    pub prompt: String,
    /// The negative prompt, empty when there is none.
    pub negative_prompt: String,
    /// `Key: value` pairs in order (`Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, …),
    /// values unquoted.
    pub pairs: Vec<(String, String)>,
}

impl GenerationParameters {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` (replacing an existing value, else appending); an empty value removes it.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        if value.is_empty() {
            self.pairs.retain(|(k, _)| k != key);
        } else if let Some(p) = self.pairs.iter_mut().find(|(k, _)| k == key) {
            p.1 = value;
        } else {
            self.pairs.push((key.to_owned(), value));
        }
    }

    /// The `Steps` value, if present and a number.
    pub fn steps(&self) -> Option<u32> {
        self.get("Steps")?.trim().parse().ok()
    }

    /// The `Seed` value, if present and a number.
    pub fn seed(&self) -> Option<u64> {
        self.get("Seed")?.trim().parse().ok()
    }

    /// The `CFG scale` value, if present and a number.
    pub fn cfg_scale(&self) -> Option<f32> {
        self.get("CFG scale")?.trim().parse().ok()
    }

    /// `Size: WIDTHxHEIGHT`.
    pub fn size(&self) -> Option<(u32, u32)> {
        let (w, h) = self.get("Size")?.trim().split_once('x')?;
        Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
    }

    /// The text as written into the PNG `parameters` chunk.
    pub fn to_text(&self) -> String {
        let mut out = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            out.push_str("\nNegative prompt: ");
            out.push_str(&self.negative_prompt);
        }
        let line = self
            .pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
        if !line.is_empty() {
            out.push('\n');
            out.push_str(&line);
        }
        out
    }

    /// Reads the text of a `parameters` chunk (from Studio or another tool).
    pub fn parse(text: &str) -> Self {
        let text = text.trim_end_matches(['\n', '\r']);
        let mut lines: Vec<&str> = text.split('\n').collect();
        let mut pairs = Vec::new();
        if let Some(last) = lines.last() {
            let found = parse_pairs(last);
            if found.len() >= 3 {
                pairs = found;
                lines.pop();
            }
        }
        let mut prompt = Vec::new();
        let mut negative: Option<Vec<&str>> = None;
        for line in lines {
            if let Some(neg) = negative.as_mut() {
                neg.push(line);
            } else if let Some(rest) = line.strip_prefix("Negative prompt:") {
                negative = Some(vec![rest.strip_prefix(' ').unwrap_or(rest)]);
            } else {
                prompt.push(line);
            }
        }
        Self {
            prompt: prompt.join("\n").trim().to_owned(),
            negative_prompt: negative
                .map(|n| n.join("\n").trim().to_owned())
                .unwrap_or_default(),
            pairs,
        }
    }
}

/// Encodes 8-bit RGBA pixels as a PNG with `params` in its `parameters` text chunk (`tEXt` when
/// the text is Latin-1, else `iTXt`, as the web UI's imaging library does).
pub fn encode_png(
    width: u32,
    height: u32,
    rgba: &[u8],
    params: &GenerationParameters,
) -> Result<Vec<u8>> {
    if rgba.len() != width as usize * height as usize * 4 {
        return Err(Error::InvalidParameter(format!(
            "{} bytes of pixels for a {width}x{height} RGBA image",
            rgba.len()
        )));
    }
    let png_error = |e: &dyn std::fmt::Display| Error::InvalidParameter(format!("PNG: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let text = params.to_text();
        let added = if text.chars().all(|c| u32::from(c) < 256) {
            enc.add_text_chunk(PARAMETERS_KEYWORD.to_owned(), text)
        } else {
            enc.add_itxt_chunk(PARAMETERS_KEYWORD.to_owned(), text)
        };
        added.map_err(|e| png_error(&e))?;
        let mut writer = enc.write_header().map_err(|e| png_error(&e))?;
        writer.write_image_data(rgba).map_err(|e| png_error(&e))?;
        writer.finish().map_err(|e| png_error(&e))?;
    }
    Ok(out)
}

/// The generation parameters stored in a PNG (`parameters` in a `tEXt`, `zTXt` or `iTXt`
/// chunk, before or after the image data); `Ok(None)` for a PNG without them. The pixels are
/// not decoded, so a header claiming any size costs nothing.
pub fn png_parameters(bytes: &[u8]) -> Result<Option<GenerationParameters>> {
    Ok(png_parameters_text(bytes)?.map(|t| GenerationParameters::parse(&t)))
}

/// The raw `parameters` text of a PNG, read without decoding its pixels: the reader skips the
/// image data and reads the chunks after it (text may follow the pixels).
pub(crate) fn png_parameters_text(bytes: &[u8]) -> Result<Option<String>> {
    let not_png =
        |e: &dyn std::fmt::Display| Error::InvalidParameter(format!("not a readable PNG: {e}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_ignore_text_chunk(false);
    let mut reader = decoder.read_info().map_err(|e| not_png(&e))?;
    reader.finish().map_err(|e| not_png(&e))?;
    Ok(parameters_in(reader.info()))
}

/// The `parameters` text of a decoded PNG header (`tEXt`, `zTXt` or `iTXt`).
fn parameters_in(info: &png::Info<'_>) -> Option<String> {
    let find = |keyword: &str| keyword == PARAMETERS_KEYWORD;
    info.uncompressed_latin1_text
        .iter()
        .find(|c| find(&c.keyword))
        .map(|c| c.text.clone())
        .or_else(|| {
            info.compressed_latin1_text
                .iter()
                .find(|c| find(&c.keyword))
                .and_then(|c| c.get_text().ok())
        })
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|c| find(&c.keyword))
                .and_then(|c| c.get_text().ok())
        })
}

/// Quotes a value that would break the line's syntax, as JSON.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_owned())
    } else {
        value.to_owned()
    }
}

/// `Key: value, Key: "quoted, value", …` → pairs (keys start with a word character and may
/// hold spaces, `-` and `/`).
fn parse_pairs(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else {
            break;
        };
        let key = rest[..colon].trim();
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == ' ' || c == '-' || c == '/');
        if !valid_key {
            break;
        }
        let after = rest[colon + 1..].trim_start();
        let (value, remaining) = if after.starts_with('"') {
            match json_string_end(after) {
                Some(end) => {
                    let raw = &after[..end];
                    let value =
                        serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_owned());
                    (value, &after[end..])
                }
                None => (after.to_owned(), ""),
            }
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim_end().to_owned(), &after[end..])
        };
        out.push((key.to_owned(), value));
        rest = remaining.trim_start();
        match rest.strip_prefix(',') {
            Some(r) => rest = r.trim_start(),
            None => break,
        }
    }
    out
}

/// Byte index just past the closing quote of the JSON string `s` starts with.
fn json_string_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_quoted_values_and_multiline_prompts() {
        let mut p = GenerationParameters {
            prompt: "a lighthouse at dusk, (oil painting:1.2)\nwarm light".to_owned(),
            negative_prompt: "blurry, low quality".to_owned(),
            pairs: Vec::new(),
        };
        p.set("Steps", "20");
        p.set("Sampler", "DPM++ 2M");
        p.set("Schedule type", "Karras");
        p.set("CFG scale", "7");
        p.set("Seed", "965400086");
        p.set("Size", "512x768");
        p.set("Model", "my model: v2, final");
        p.set("Mask blur", "");
        p.set("Version", "studio-0.1");
        let text = p.to_text();
        assert_eq!(
            text,
            "a lighthouse at dusk, (oil painting:1.2)\nwarm light\nNegative prompt: blurry, low quality\n\
             Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, \
             Size: 512x768, Model: \"my model: v2, final\", Version: studio-0.1"
        );
        let back = GenerationParameters::parse(&text);
        assert_eq!(back, p);
        assert_eq!(back.size(), Some((512, 768)));
        assert_eq!(back.seed(), Some(965_400_086));
        assert_eq!(back.steps(), Some(20));
        assert_eq!(back.cfg_scale(), Some(7.0));
    }

    #[test]
    fn reads_a_sample_written_by_another_tool() {
        // As the most used SD web UI writes it (no negative prompt line, hash and extras).
        let text = "masterpiece, 1girl, looking at viewer\nSteps: 28, Sampler: Euler a, \
                    Schedule type: Automatic, CFG scale: 5.5, Seed: 1234, Size: 832x1216, \
                    Model hash: 45dee52b, Model: sdxl_base, Lora hashes: \"detail: 0a1b2c, \
                    style: 3d4e5f\", Version: v1.10.1";
        let p = GenerationParameters::parse(text);
        assert_eq!(p.prompt, "masterpiece, 1girl, looking at viewer");
        assert_eq!(p.negative_prompt, "");
        assert_eq!(p.get("Sampler"), Some("Euler a"));
        assert_eq!(p.get("Lora hashes"), Some("detail: 0a1b2c, style: 3d4e5f"));
        assert_eq!(p.get("Version"), Some("v1.10.1"));
        assert_eq!(p.cfg_scale(), Some(5.5));
        assert_eq!(p.size(), Some((832, 1216)));
    }

    #[test]
    fn a_last_line_with_fewer_than_three_pairs_is_prompt_text() {
        let p = GenerationParameters::parse("a cat\nstyle: watercolor, mood: calm");
        assert_eq!(p.prompt, "a cat\nstyle: watercolor, mood: calm");
        assert!(p.pairs.is_empty());
        let p = GenerationParameters::parse("");
        assert_eq!(p, GenerationParameters::default());
    }

    #[test]
    fn png_chunks_round_trip_in_latin1_and_utf8() {
        let pixels = vec![200u8; 4 * 3 * 2];
        for prompt in ["a cat, watercolor", "日本の灯台 🎨"] {
            let mut p = GenerationParameters {
                prompt: prompt.to_owned(),
                ..GenerationParameters::default()
            };
            p.set("Steps", "20");
            p.set("Seed", "7");
            p.set("Size", "3x2");
            let bytes = encode_png(3, 2, &pixels, &p).expect("encode");
            assert_eq!(png_parameters(&bytes).expect("read"), Some(p));
        }
        let plain =
            encode_png(1, 1, &[0, 0, 0, 255], &GenerationParameters::default()).expect("encode");
        // An empty parameters text still parses, to nothing.
        assert_eq!(
            png_parameters(&plain).expect("read"),
            Some(GenerationParameters::default())
        );
        assert!(png_parameters(b"GIF89a not a png").is_err());
        assert!(encode_png(2, 2, &[0; 4], &GenerationParameters::default()).is_err());
    }

    /// Found by the `png_parameters` fuzz target: a header claiming 4 × 4,160,749,315 pixels
    /// made the reader allocate 66 GB for pixels it did not need (and abort).
    #[test]
    fn a_huge_header_costs_nothing_to_read_parameters_from() {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in bytes {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let mut p = GenerationParameters {
            prompt: "a castle".to_owned(),
            ..GenerationParameters::default()
        };
        p.set("Steps", "20");
        p.set("Seed", "42");
        p.set("Size", "2x2");
        let mut bytes = encode_png(2, 2, &[9; 16], &p).expect("encode");
        // IHDR's data starts after the signature (8), length (4) and type (4).
        bytes[16..20].copy_from_slice(&4u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&0xF7FF_FF03u32.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        // The image data no longer matches the header; the text before it is still read.
        match png_parameters(&bytes) {
            Ok(found) => assert_eq!(found, Some(p)),
            Err(e) => assert!(e.to_string().contains("PNG"), "{e}"),
        }
    }

    #[test]
    fn multiline_negative_prompts_and_escapes_survive() {
        let mut p = GenerationParameters {
            prompt: "quote \"this\"".to_owned(),
            negative_prompt: "line one\nline two".to_owned(),
            pairs: Vec::new(),
        };
        p.set("Steps", "4");
        p.set("Note", "a \"quoted\", tricky\nvalue");
        p.set("Seed", "1");
        assert_eq!(GenerationParameters::parse(&p.to_text()), p);
    }
}
