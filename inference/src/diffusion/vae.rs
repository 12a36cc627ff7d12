//! The Stable Diffusion VAE (diffusers `AutoencoderKL` names), assembled from candle-transformers'
//! blocks. Unlike candle's own wrapper it encodes to the posterior *mean* (so img2img and
//! inpainting are reproducible from the seed alone) and applies the model's scaling factor.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
    UpDecoderBlock2D, UpDecoderBlock2DConfig,
};
use serde::Deserialize;

use crate::error::Result;

/// `vae/config.json`, the fields used.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// Latents the UNet sees are the VAE's times this (0.18215 for SD 1.x/2.x, 0.13025 SDXL).
    #[serde(default = "scale")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
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
    enc_conv_in: candle_nn::Conv2d,
    enc_down: Vec<DownEncoderBlock2D>,
    enc_mid: UNetMidBlock2D,
    enc_norm: candle_nn::GroupNorm,
    enc_conv_out: candle_nn::Conv2d,
    quant_conv: Option<candle_nn::Conv2d>,
    post_quant_conv: Option<candle_nn::Conv2d>,
    dec_conv_in: candle_nn::Conv2d,
    dec_mid: UNetMidBlock2D,
    dec_up: Vec<UpDecoderBlock2D>,
    dec_norm: candle_nn::GroupNorm,
    dec_conv_out: candle_nn::Conv2d,
    config: VaeConfig,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vae {
    pub fn new(vb: &VarBuilder, config: VaeConfig) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let lat = c.latent_channels;
        let pad1 = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.0,
            attn_num_head_channels: None,
            resnet_groups: Some(c.norm_num_groups),
            ..Default::default()
        };
        let enc = vb.pp("encoder");
        let enc_conv_in = candle_nn::conv2d(3, ch[0], 3, pad1, enc.pp("conv_in"))?;
        let enc_down = (0..n)
            .map(|i| {
                DownEncoderBlock2D::new(
                    enc.pp(format!("down_blocks.{i}")),
                    if i == 0 { ch[0] } else { ch[i - 1] },
                    ch[i],
                    DownEncoderBlock2DConfig {
                        num_layers: c.layers_per_block,
                        resnet_eps: 1e-6,
                        resnet_groups: c.norm_num_groups,
                        add_downsample: i + 1 < n,
                        downsample_padding: 0,
                        ..Default::default()
                    },
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let enc_mid = UNetMidBlock2D::new(enc.pp("mid_block"), ch[n - 1], None, mid_cfg)?;
        let enc_norm =
            candle_nn::group_norm(c.norm_num_groups, ch[n - 1], 1e-6, enc.pp("conv_norm_out"))?;
        let enc_conv_out = candle_nn::conv2d(ch[n - 1], 2 * lat, 3, pad1, enc.pp("conv_out"))?;
        let one = candle_nn::Conv2dConfig::default();
        let quant_conv = if c.use_quant_conv {
            Some(candle_nn::conv2d(
                2 * lat,
                2 * lat,
                1,
                one,
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        let post_quant_conv = if c.use_post_quant_conv {
            Some(candle_nn::conv2d(
                lat,
                lat,
                1,
                one,
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        let dec_conv_in = candle_nn::conv2d(lat, ch[n - 1], 3, pad1, dec.pp("conv_in"))?;
        let dec_mid = UNetMidBlock2D::new(dec.pp("mid_block"), ch[n - 1], None, mid_cfg)?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let dec_up = (0..n)
            .map(|i| {
                UpDecoderBlock2D::new(
                    dec.pp(format!("up_blocks.{i}")),
                    if i == 0 { rev[0] } else { rev[i - 1] },
                    rev[i],
                    UpDecoderBlock2DConfig {
                        num_layers: c.layers_per_block + 1,
                        resnet_eps: 1e-6,
                        resnet_groups: c.norm_num_groups,
                        add_upsample: i + 1 < n,
                        ..Default::default()
                    },
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dec_norm =
            candle_nn::group_norm(c.norm_num_groups, ch[0], 1e-6, dec.pp("conv_norm_out"))?;
        let dec_conv_out = candle_nn::conv2d(ch[0], 3, 3, pad1, dec.pp("conv_out"))?;
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
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Image `(b, 3, H, W)` in [-1, 1] → UNet-space latents `(b, 4, H/8, W/8)` (posterior mean
    /// times the scaling factor).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let mut xs = self.enc_conv_in.forward(image)?;
        for block in &self.enc_down {
            xs = block.forward(&xs)?;
        }
        let xs = self.enc_mid.forward(&xs, None)?;
        let xs = candle_nn::ops::silu(&self.enc_norm.forward(&xs)?)?;
        let mut moments = self.enc_conv_out.forward(&xs)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let mean = moments.narrow(1, 0, self.config.latent_channels)?;
        Ok((mean * self.config.scaling_factor)?)
    }

    /// UNet-space latents → image `(b, 3, H, W)` in [-1, 1] (not clamped).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = (latents / self.config.scaling_factor)?;
        if let Some(q) = &self.post_quant_conv {
            xs = q.forward(&xs)?;
        }
        let mut xs = self
            .dec_mid
            .forward(&self.dec_conv_in.forward(&xs)?, None)?;
        for block in &self.dec_up {
            xs = block.forward(&xs)?;
        }
        let xs = candle_nn::ops::silu(&self.dec_norm.forward(&xs)?)?;
        Ok(self.dec_conv_out.forward(&xs)?)
    }
}
