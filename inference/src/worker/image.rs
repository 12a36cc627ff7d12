//! The Stable Diffusion jobs: loading a model and generating images, with each step's preview
//! in the one-slot mailbox.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::context::{JobContext, progress_sender};
use super::{Event, GeneratedImageSource, PreviewFrame, lock};
use crate::diffusion::controlnet::{ControlNet, ControlSpec};
use crate::diffusion::imaging::RgbImage;
use crate::diffusion::model::{self as sd_model, ImageModelOptions};
use crate::diffusion::pipeline::{self, GeneratedImage, ImageRequest};
use crate::error::{Error, Result};
use crate::upscale;

/// [`super::JobKind::LoadImageModel`].
pub(super) fn load_image_model(
    ctx: &mut JobContext<'_>,
    path: &Path,
    options: &ImageModelOptions,
) -> Result<()> {
    let job = ctx.job;
    let mut progress = progress_sender(ctx.events, ctx.repaint, job);
    let model = sd_model::load(path, options, ctx.device, &mut progress)?;
    if ctx.image_model.take().is_some() {
        ctx.send(Event::ImageModelUnloaded { job });
    }
    let info = model.info.clone();
    *ctx.image_model = Some(Box::new(model));
    ctx.send(Event::ImageModelLoaded { job, info });
    Ok(())
}

/// [`super::JobKind::UnloadImageModel`].
pub(super) fn unload_image_model(ctx: &mut JobContext<'_>) {
    *ctx.image_model = None;
    ctx.send(Event::ImageModelUnloaded { job: ctx.job });
}

/// [`super::JobKind::GenerateImage`]: lossy progress per step, the step's preview in the
/// mailbox, each finished image as [`Event::ImageReady`]; cancel is checked every step.
pub(super) fn generate_image(
    ctx: &mut JobContext<'_>,
    mut request: ImageRequest,
    control: &[ControlSpec],
    refiner: Option<&Path>,
) -> Result<()> {
    if ctx.image_model.is_none() {
        return Err(Error::InvalidParameter(
            "no Stable Diffusion model is loaded: open one in the Canvas first".into(),
        ));
    }
    // Keep the ControlNets this generation uses, load the missing ones, drop the rest.
    ctx.controlnets
        .retain(|path, _| control.iter().any(|c| &c.model == path));
    for spec in control {
        let net = if let Some(net) = ctx.controlnets.get(&spec.model) {
            net.clone()
        } else {
            let net = Arc::new(ControlNet::load(&spec.model, ctx.device)?);
            ctx.controlnets.insert(spec.model.clone(), net.clone());
            net
        };
        request.control.push(spec.unit(net));
    }
    // The refiner: kept while asked for, loaded when another is, dropped when none is.
    match refiner {
        None => *ctx.refiner = None,
        Some(path) if ctx.refiner.as_ref().is_some_and(|(p, _)| p == path) => {}
        Some(path) => {
            *ctx.refiner = None;
            let mut progress = progress_sender(ctx.events, ctx.repaint, ctx.job);
            let model = sd_model::load(
                path,
                &ImageModelOptions::default(),
                ctx.device,
                &mut progress,
            )?;
            *ctx.refiner = Some((path.to_owned(), Box::new(model)));
        }
    }
    let refiner = ctx.refiner.as_ref().map(|(_, m)| m.as_ref());
    let request = &request;
    let Some(model) = ctx.image_model.as_deref() else {
        return Err(Error::InvalidParameter(
            "no Stable Diffusion model is loaded: open one in the Canvas first".into(),
        ));
    };
    let (job, cancel, events, repaint, previews) =
        (ctx.job, ctx.cancel, ctx.events, ctx.repaint, ctx.previews);
    let outcome = pipeline::generate_with_refiner(model, refiner, request, &mut |update| {
        if let Some(image) = update.preview {
            *lock(previews) = Some(PreviewFrame {
                job,
                image_index: update.image,
                step: update.step,
                steps: update.steps,
                image,
            });
        }
        // Lossy: a dropped progress event is superseded by the next step's.
        let _ = events.try_send(Event::ImageProgress {
            job,
            image: update.image,
            images: update.images,
            step: update.step,
            steps: update.steps,
        });
        repaint();
        if cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    for image in outcome.images {
        ctx.send(Event::ImageReady {
            job,
            image: Arc::new(image),
        });
    }
    Ok(())
}

/// [`super::JobKind::UpscaleImage`].
pub(super) fn upscale_image(
    ctx: &mut JobContext<'_>,
    image: &RgbImage,
    source: GeneratedImageSource,
    upscaler: &Path,
    scale: f64,
) -> Result<()> {
    let up = upscale::load(upscaler, ctx.device)?;
    let (job, cancel, events, repaint) = (ctx.job, ctx.cancel, ctx.events, ctx.repaint);
    let result = up.upscale_by(image, scale, TILE, &mut |done, total| {
        let _ = events.try_send(Event::ImageProgress {
            job,
            image: 0,
            images: 1,
            step: done,
            steps: total,
        });
        repaint();
        if cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    let Some(result) = result else {
        return Ok(());
    };
    let parameters = upscale::postprocess_parameters(source.parameters, &up.info().name, scale);
    ctx.send(Event::ImageReady {
        job,
        image: Arc::new(GeneratedImage {
            image: result,
            seed: source.seed,
            parameters,
        }),
    });
    Ok(())
}

/// Tile side for upscaling in the window (input pixels).
const TILE: usize = 192;
