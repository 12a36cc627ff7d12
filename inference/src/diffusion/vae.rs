//! The Stable Diffusion VAE (diffusers `AutoencoderKL` names), built from Studio's
//! [`vae_blocks`](super::vae_blocks) so its memory stays bounded at any image size: every 3×3
//! convolution runs in bands of rows above a budget and the mid-block attention in chunks of
//! queries ([`MemoryBudget`]). Unlike candle's own wrapper it encodes to the posterior *mean* (so
//! img2img and inpainting are reproducible from the seed alone) and applies the model's scaling
//! factor.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::vae_blocks::{
    Conv3x3, DownEncoderBlock, MemoryBudget, Padding, UpDecoderBlock, VaeMidBlock,
};
use crate::error::Result;
use crate::nn::GroupNorm;

/// `vae/config.json`, the fields used.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    /// Channels of each encoder level from full resolution down (SD: 128, 256, 512, 512);
    /// the decoder runs them in reverse, and every level but the last halves the size.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (2 when absent); decoder blocks have one more.
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Channels of the latents (4 when absent).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Groups of every GroupNorm (32 when absent).
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// Latents the UNet sees are the VAE's times this (0.18215 for SD 1.x/2.x, 0.13025 SDXL).
    #[serde(default = "scale")]
    pub scaling_factor: f64,
    /// Whether a 1×1 `quant_conv` follows the encoder (true when absent).
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether a 1×1 `post_quant_conv` precedes the decoder (true when absent).
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn groups() -> usize {
    32
}
fn scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// How many times smaller than the image the latents are on a side: 2 for each level but
    /// the last (8 for SD's four levels, 4 for the LDM's `kl-f4` three).
    pub fn factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1).min(16)
    }

    /// The SD 1.x/2.x/SDXL VAE shape with the given scaling factor.
    pub fn sd(scaling_factor: f64) -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }

    /// Infers the shape from diffusers-named tensors.
    pub fn infer(
        names: &[&str],
        shape: &dyn Fn(&str) -> Option<Vec<usize>>,
        scaling_factor: f64,
    ) -> std::result::Result<Self, String> {
        let mut channels = Vec::new();
        while let Some(s) = shape(&format!(
            "encoder.down_blocks.{}.resnets.0.conv1.weight",
            channels.len()
        )) {
            channels.push(s[0]);
        }
        if channels.is_empty() {
            return Err("missing tensor `encoder.down_blocks.0.resnets.0.conv1.weight`".into());
        }
        let layers = names
            .iter()
            .filter_map(|n| n.strip_prefix("encoder.down_blocks.0.resnets."))
            .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(1, |m| m + 1);
        let latent =
            shape("decoder.conv_in.weight").ok_or("missing tensor `decoder.conv_in.weight`")?[1];
        Ok(Self {
            block_out_channels: channels,
            layers_per_block: layers,
            latent_channels: latent,
            norm_num_groups: 32,
            scaling_factor,
            use_quant_conv: shape("quant_conv.weight").is_some(),
            use_post_quant_conv: shape("post_quant_conv.weight").is_some(),
        })
    }
}

/// The autoencoder.
pub struct Vae {
    enc_conv_in: Conv3x3,
    enc_down: Vec<DownEncoderBlock>,
    enc_mid: VaeMidBlock,
    enc_norm: GroupNorm,
    enc_conv_out: Conv3x3,
    quant_conv: Option<crate::nn::Conv2d>,
    post_quant_conv: Option<crate::nn::Conv2d>,
    dec_conv_in: Conv3x3,
    dec_mid: VaeMidBlock,
    dec_up: Vec<UpDecoderBlock>,
    dec_norm: GroupNorm,
    dec_conv_out: Conv3x3,
    config: VaeConfig,
    budget: MemoryBudget,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Vae {
    /// Builds the VAE with `config`'s shape from diffusers-named weights (`encoder.*`,
    /// `decoder.*`, `quant_conv`, …), with the default [`MemoryBudget`].
    pub fn new(vb: &VarBuilder, config: VaeConfig) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let lat = c.latent_channels;
        let groups = c.norm_num_groups;
        let same = Padding::same(1);
        let conv3 = |vb: &VarBuilder, c_in, c_out| Conv3x3::load(vb, c_in, c_out, 1, same);
        let conv1 = |vb: VarBuilder, c| -> Result<crate::nn::Conv2d> {
            crate::nn::Conv2d::new(candle_nn::conv2d(
                c,
                c,
                1,
                candle_nn::Conv2dConfig::default(),
                vb,
            )?)
        };
        let enc = vb.pp("encoder");
        let enc_conv_in = conv3(&enc.pp("conv_in"), 3, ch[0])?;
        let enc_down = (0..n)
            .map(|i| {
                DownEncoderBlock::new(
                    &enc.pp(format!("down_blocks.{i}")),
                    if i == 0 { ch[0] } else { ch[i - 1] },
                    ch[i],
                    c.layers_per_block,
                    groups,
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let enc_mid = VaeMidBlock::new(&enc.pp("mid_block"), ch[n - 1], groups)?;
        let enc_norm = GroupNorm::load(&enc.pp("conv_norm_out"), groups, ch[n - 1], 1e-6)?;
        let enc_conv_out = conv3(&enc.pp("conv_out"), ch[n - 1], 2 * lat)?;
        let quant_conv = if c.use_quant_conv {
            Some(conv1(vb.pp("quant_conv"), 2 * lat)?)
        } else {
            None
        };
        let post_quant_conv = if c.use_post_quant_conv {
            Some(conv1(vb.pp("post_quant_conv"), lat)?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        let dec_conv_in = conv3(&dec.pp("conv_in"), lat, ch[n - 1])?;
        let dec_mid = VaeMidBlock::new(&dec.pp("mid_block"), ch[n - 1], groups)?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let dec_up = (0..n)
            .map(|i| {
                UpDecoderBlock::new(
                    &dec.pp(format!("up_blocks.{i}")),
                    if i == 0 { rev[0] } else { rev[i - 1] },
                    rev[i],
                    c.layers_per_block + 1,
                    groups,
                    i + 1 < n,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let dec_norm = GroupNorm::load(&dec.pp("conv_norm_out"), groups, ch[0], 1e-6)?;
        let dec_conv_out = conv3(&dec.pp("conv_out"), ch[0], 3)?;
        Ok(Self {
            enc_conv_in,
            enc_down,
            enc_mid,
            enc_norm,
            enc_conv_out,
            quant_conv,
            post_quant_conv,
            dec_conv_in,
            dec_mid,
            dec_up,
            dec_norm,
            dec_conv_out,
            config,
            budget: MemoryBudget::default(),
        })
    }

    /// The same VAE with other limits on its temporaries (the results do not change).
    #[must_use]
    pub fn with_memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// The limits on its temporaries.
    pub fn memory_budget(&self) -> MemoryBudget {
        self.budget
    }

    /// The shape it was built with.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Image `(b, 3, H, W)` in [-1, 1] → UNet-space latents `(b, 4, H/8, W/8)` (posterior mean
    /// times the scaling factor).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let budget = &self.budget;
        let mut xs = self.enc_conv_in.forward(image, budget.conv_bytes)?;
        for block in &self.enc_down {
            xs = block.forward(&xs, budget)?;
        }
        let xs = self.enc_mid.forward(&xs, budget)?;
        let mut moments =
            self.enc_conv_out
                .forward_normalized(&xs, &self.enc_norm, true, budget.conv_bytes)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let mean = moments.narrow(1, 0, self.config.latent_channels)?;
        Ok((mean * self.config.scaling_factor)?)
    }

    /// UNet-space latents → image `(b, 3, H, W)` in [-1, 1] (not clamped).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let budget = &self.budget;
        let mut xs = (latents / self.config.scaling_factor)?;
        if let Some(q) = &self.post_quant_conv {
            xs = q.forward(&xs)?;
        }
        let xs = self.dec_conv_in.forward(&xs, budget.conv_bytes)?;
        let mut xs = self.dec_mid.forward(&xs, budget)?;
        for block in &self.dec_up {
            xs = block.forward(&xs, budget)?;
        }
        self.dec_conv_out
            .forward_normalized(&xs, &self.dec_norm, true, budget.conv_bytes)
    }
}
