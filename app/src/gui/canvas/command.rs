//! What the Canvas asks for, and why it submits jobs, as data (inside `Command::Panel` and
//! `JobPurpose::Panel`): a leaf module, so the window's command and job lists can name them
//! without importing the panel.

use std::path::PathBuf;
use std::sync::Arc;

use studio_inference::diffusion::imaging::RgbImage;
use studio_inference::diffusion::model::ImageModelOptions;

use super::document::Side;

/// What the Canvas asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanvasCommand {
    /// Load a Stable Diffusion model (file or diffusers folder) with the options in Settings.
    LoadModel(PathBuf),
    UnloadModel,
    /// Choose a model with the file dialog (`folder`: a diffusers folder).
    OpenModelDialog {
        folder: bool,
    },
    Generate,
    /// Upscale the selected result (or the canvas image) with the chosen upscaler.
    Upscale,
    /// Choose the upscaler file with the file dialog.
    ChooseUpscalerDialog,
    /// Choose the SDXL refiner with the file dialog (`folder`: a diffusers folder).
    ChooseRefinerDialog {
        folder: bool,
    },
    /// Use this refiner model.
    SetRefiner(PathBuf),
    /// Use this upscaler file.
    SetUpscaler(PathBuf),
    /// Append `<lora:NAME:1>` to the prompt.
    AddLoraToPrompt(String),
    /// A ControlNet unit's controls.
    Control(super::control::ControlCommand),
    /// Cancel the running generation.
    Cancel,
    /// Fix the seed to this one.
    ReuseSeed(u64),
    /// A brush (or eraser) segment, in image pixels.
    Paint {
        from: [i32; 2],
        to: [i32; 2],
    },
    EndStroke,
    Undo,
    Redo,
    InvertMask,
    ClearMask,
    /// Empty the control layer (undoable).
    ClearControlLayer,
    /// Empty the canvas (undoable).
    ClearCanvas,
    /// A white image at the form's size, to sketch on (undoable).
    NewSketch,
    /// Grow the canvas for outpainting.
    Extend {
        side: Side,
        px: u32,
    },
    SelectStaged(usize),
    AcceptStaged,
    DiscardStaged,
    DiscardAllStaged,
    /// Open an image file as the image layer (drop, Send to Canvas, the dialog).
    OpenImage(PathBuf),
    OpenImageDialog,
    /// An image pasted from the clipboard becomes the image layer.
    PasteImage(Arc<RgbImage>),
    SaveImageDialog,
    /// Put a history image's parameters in the form.
    ReuseParameters(PathBuf),
    /// Restore the parameters offered when an image with parameters was opened.
    RestoreOffered(u64),
    /// Move a history image to the trash (Undo brings it back for a while).
    DeleteImage(PathBuf),
    UndoDeleteImage(PathBuf),
    /// Fit the canvas to the view.
    FitView,
}

/// Why the Canvas submitted a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanvasPurpose {
    /// Loading a Stable Diffusion model, with the options it was asked for.
    LoadImageModel(PathBuf, ImageModelOptions),
    UnloadImageModel,
    /// Generating images.
    GenerateImage,
    /// Upscaling an image.
    Upscale,
}
