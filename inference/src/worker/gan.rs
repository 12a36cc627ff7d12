//! The Latent Explorer's jobs: loading a StyleGAN2 network, PCA directions, projecting an
//! image and exporting an animation. (Its renders are not jobs: see [`crate::gan::render`].)

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::context::JobContext;
use super::{Event, lock};
use crate::diffusion::imaging::RgbImage;
use crate::error::{Error, Result};
use crate::gan::directions::Directions;
use crate::gan::latent as gan_latent;
use crate::gan::render::{
    GanAnimationOut, GanAnimationRequest, GanFrame, no_gan, path_noise, path_ws,
};
use crate::gan::{NumpyRandomState, StyleGan2};

/// [`super::JobKind::LoadGan`]: a StyleGAN2 safetensors file or NVIDIA network pickle;
/// DCGAN generators are refused with what to do instead.
pub(super) fn load_gan(ctx: &mut JobContext<'_>, path: &Path) -> Result<()> {
    let job = ctx.job;
    if crate::gan::dcgan::is_dcgan(path) {
        return Err(Error::InvalidParameter(format!(
            "{} is a DCGAN generator: the Latent Explorer steers StyleGAN2 networks (W \
             space, styles, noise), which DCGAN does not have. Render DCGAN images \
             with `studio gan --model {} --seed N --out FILE.png`.",
            path.display(),
            path.display()
        )));
    }
    ctx.progress(0.0, "reading the generator");
    let gan = StyleGan2::load(path, ctx.device)?;
    if ctx.gan.take().is_some() {
        ctx.send(Event::GanUnloaded { job });
    }
    let info = gan.info().clone();
    let layers = gan.layer_names();
    *ctx.gan = Some(Box::new(gan));
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    ctx.send(Event::GanLoaded {
        job,
        info,
        name,
        layers,
    });
    Ok(())
}

/// [`super::JobKind::UnloadGan`].
pub(super) fn unload_gan(ctx: &mut JobContext<'_>) {
    *ctx.gan = None;
    ctx.send(Event::GanUnloaded { job: ctx.job });
}

/// [`super::JobKind::ComputeGanDirections`].
pub(super) fn directions(
    ctx: &mut JobContext<'_>,
    samples: usize,
    components: usize,
    seed: u64,
) -> Result<()> {
    let Some(gan) = ctx.gan.as_deref() else {
        return Err(no_gan());
    };
    let Some(directions) = compute_directions(ctx, gan, samples, components, seed)? else {
        return Ok(()); // cancelled
    };
    ctx.send(Event::GanDirections {
        job: ctx.job,
        directions: Arc::new(directions),
    });
    Ok(())
}

/// [`super::JobKind::ProjectGan`].
pub(super) fn project(
    ctx: &mut JobContext<'_>,
    image: &RgbImage,
    steps: usize,
    vgg16: Option<PathBuf>,
) -> Result<()> {
    let Some(gan) = ctx.gan.as_deref() else {
        return Err(no_gan());
    };
    project_image(ctx, gan, image, steps, vgg16)
}

/// [`super::JobKind::ExportGanAnimation`].
pub(super) fn export(ctx: &mut JobContext<'_>, request: &GanAnimationRequest) -> Result<()> {
    let Some(gan) = ctx.gan.as_deref() else {
        return Err(no_gan());
    };
    export_animation(ctx, gan, request)
}

/// Latents mapped per batch while sampling W for PCA (cancel and progress between batches).
const PCA_BATCH: usize = 500;

/// [`Directions::compute`]'s sampling (the same seeded latents), in batches so it reports
/// progress and stops on cancel (`Ok(None)`).
fn compute_directions(
    ctx: &JobContext<'_>,
    gan: &StyleGan2,
    samples: usize,
    components: usize,
    seed: u64,
) -> Result<Option<Directions>> {
    let info = gan.info();
    let (z_dim, w_dim) = (info.z_dim, info.w_dim);
    if samples < 2 {
        return Err(Error::InvalidParameter(format!(
            "PCA needs at least 2 samples, got {samples}"
        )));
    }
    if components == 0 || components > w_dim {
        return Err(Error::InvalidParameter(format!(
            "{components} components asked for; choose 1 to {w_dim} (the W dimension)"
        )));
    }
    if z_dim == 0 {
        return Err(Error::InvalidParameter(
            "PCA directions need a network with a z input".into(),
        ));
    }
    #[allow(clippy::cast_possible_truncation)]
    let mut rng = NumpyRandomState::new((seed as u32) ^ ((seed >> 32) as u32));
    let mut data = Vec::with_capacity(samples * w_dim);
    let mut done = 0;
    while done < samples {
        if ctx.is_cancelled() {
            return Ok(None);
        }
        let b = PCA_BATCH.min(samples - done);
        #[allow(clippy::cast_possible_truncation)]
        let z: Vec<f32> = rng.randn(b * z_dim).into_iter().map(|v| v as f32).collect();
        let z = candle_core::Tensor::from_vec(z, (b, z_dim), gan.device())?;
        let w = gan
            .map(&z, None, 1.0, None)?
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        data.extend_from_slice(&w);
        done += b;
        #[allow(clippy::cast_precision_loss)]
        ctx.progress(
            0.9 * done as f32 / samples as f32,
            &format!("sampled {done} of {samples} latents"),
        );
    }
    ctx.progress(0.9, "principal components");
    let mut dirs = Directions::from_samples(&data, samples, w_dim, components)?;
    dirs.seed = seed;
    Ok(Some(dirs))
}

/// [`super::JobKind::ExportGanAnimation`]: a keyframe path rendered to a GIF (replaced only
/// when complete) or a PNG sequence.
fn export_animation(ctx: &JobContext<'_>, gan: &StyleGan2, r: &GanAnimationRequest) -> Result<()> {
    if r.keyframes.len() < 2 {
        return Err(Error::InvalidParameter(
            "an animation needs at least two keyframes".into(),
        ));
    }
    if r.frames < 2 {
        return Err(Error::InvalidParameter(format!(
            "an animation needs at least 2 frames, got {}",
            r.frames
        )));
    }
    // A GIF replaces its file only when complete: a cancel or an error leaves the old one.
    let mut file = match &r.out {
        GanAnimationOut::Gif(path) => Some((
            std::io::BufWriter::new(
                crate::sys::AtomicFile::create(path, false).map_err(|e| Error::io(path, e))?,
            ),
            path,
        )),
        GanAnimationOut::PngSequence(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            None
        }
    };
    let mut gif = match &mut file {
        Some((writer, _)) => Some(gan_latent::GifWriter::new(writer, r.fps)?),
        None => None,
    };
    let dirs = r.directions.as_deref();
    for i in 0..r.frames {
        if ctx.is_cancelled() {
            return Ok(());
        }
        #[allow(clippy::cast_precision_loss)]
        let t = i as f64 / (r.frames - 1) as f64;
        let ws = path_ws(gan, &r.keyframes, t, r.space, dirs)?;
        let image = match path_noise(gan, &r.keyframes, t)? {
            Some(buffers) => crate::diffusion::imaging::tensor_to_image(
                &gan.synthesize_with_noise(&ws, &buffers)?,
            )?,
            None => gan_latent::render(gan, &ws, r.noise)?,
        };
        match (&mut gif, &r.out) {
            (Some(g), _) => g.add_frame(&image)?,
            (None, GanAnimationOut::PngSequence(dir)) => {
                let text = format!("{}\nframe {}/{}", r.text, i + 1, r.frames);
                let bytes = crate::diffusion::imaging::encode_png(&image, Some(&text))?;
                let path = dir.join(format!("frame_{:04}.png", i + 1));
                crate::sys::write_atomic(&path, &bytes, false).map_err(|e| Error::io(&path, e))?;
            }
            (None, GanAnimationOut::Gif(_)) => {}
        }
        #[allow(clippy::cast_precision_loss)]
        ctx.progress(
            (i + 1) as f32 / r.frames as f32,
            &format!("frame {} of {}", i + 1, r.frames),
        );
    }
    // The encoder writes the GIF's trailer when dropped.
    drop(gif);
    if let Some((writer, path)) = file {
        writer
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?
            .commit()
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Streams reconstructions into the frame mailbox every this many steps.
const PROJECT_PREVIEW_EVERY: usize = 5;

/// [`super::JobKind::ProjectGan`]: the image cropped and resized to the network's, projected,
/// its reconstructions streamed into the frame mailbox.
fn project_image(
    ctx: &JobContext<'_>,
    gan: &StyleGan2,
    image: &RgbImage,
    steps: usize,
    vgg16: Option<PathBuf>,
) -> Result<()> {
    let res = gan.info().resolution;
    let res_u32 = u32::try_from(res)
        .map_err(|_| Error::InvalidParameter(format!("resolution {res} is too large")))?;
    let mut notes = Vec::new();
    let mut img = image.clone();
    if img.width != img.height {
        let side = img.width.min(img.height);
        img = img.crop((img.width - side) / 2, (img.height - side) / 2, side, side);
        notes.push(format!("cropped to the centre {side}×{side} square"));
    }
    if img.width != res_u32 {
        notes.push(format!("resized from {0}×{0} to {res}×{res}", img.width));
        img = img.resized(res_u32, res_u32);
    }
    if !notes.is_empty() {
        ctx.send(Event::Notice {
            job: ctx.job,
            message: format!("The image to project was {}.", notes.join(" and ")),
        });
    }
    let target = crate::diffusion::imaging::image_to_tensor(&img, gan.device())?;
    let config = crate::gan::project::ProjectConfig {
        steps: steps.max(1),
        preview_every: PROJECT_PREVIEW_EVERY,
        w_std_samples: 2000,
        loss: vgg16.map_or(crate::gan::project::LossKind::PixelMultiScale, |vgg16| {
            crate::gan::project::LossKind::Perceptual { vgg16 }
        }),
        ..crate::gan::project::ProjectConfig::default()
    };
    let total = config.steps;
    let mut last_loss = f32::NAN;
    let mut on_step = |step: usize, loss: f32, recon: Option<&candle_core::Tensor>| {
        last_loss = loss;
        if let Some(t) = recon
            && let Ok(img) = crate::diffusion::imaging::tensor_to_image(t)
        {
            *lock(&ctx.gan_slots.frame) = Some(GanFrame {
                id: 0,
                result: Ok(img),
                render_ms: 0.0,
                layer: None,
            });
        }
        #[allow(clippy::cast_precision_loss)]
        ctx.progress(
            (step + 1) as f32 / total as f32,
            &format!("step {} of {total}, loss {loss:.4}", step + 1),
        );
        if ctx.is_cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = crate::gan::project::project(gan, &target, &config, &mut on_step)?;
    let w = result
        .ws
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut noise = Vec::new();
    for buffer in &result.noise {
        noise.extend(
            buffer
                .to_device(&candle_core::Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    ctx.send(Event::GanProjected {
        job: ctx.job,
        w,
        noise: Arc::new(noise),
        loss: last_loss,
        note: (!notes.is_empty()).then(|| notes.join(" and ")),
    });
    Ok(())
}
