//! ControlNet parity with diffusers' `ControlNetModel` on tiny random-weight models (fixture
//! `tests/fixtures/controlnet`, made by `tools/make_controlnet_fixture.py` from the SD 1.x and
//! SDXL UNets of `sd_parity`): the residuals at a conditioning scale, in guess mode, and the
//! UNet's output with them added; the original (`control_model.…`) single-file naming; and
//! the pipeline running with a unit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use studio_inference::diffusion::controlnet::{ControlNet, ControlResiduals};
use studio_inference::diffusion::unet::{Unet, UnetConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max")
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = max_abs(&(got - want).expect("diff"));
    let scale = max_abs(want);
    println!("{what}: max abs diff {d:.3e} (scale {scale:.3})");
    assert!(scale > 0.05, "{what}: degenerate reference");
    assert!(d <= 1e-4 * scale, "{what}: {d:.3e} vs scale {scale:.3}");
}

struct Case {
    io: HashMap<String, Tensor>,
    unet_io: HashMap<String, Tensor>,
    unet: Unet,
}

fn case(name: &str) -> Case {
    let unet_dir = fixtures().join(format!("sd_parity/unet_{name}"));
    let config = UnetConfig::from_json(
        &std::fs::read_to_string(unet_dir.join("config.json")).expect("config"),
    )
    .expect("unet config");
    let weights = tensors(&unet_dir.join("diffusion_pytorch_model.safetensors"));
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    Case {
        io: tensors(&fixtures().join(format!("controlnet/{name}/io.safetensors"))),
        unet_io: tensors(&unet_dir.join("io.safetensors")),
        unet: Unet::new(&vb, config).expect("unet"),
    }
}

impl Case {
    fn get(&self, name: &str) -> &Tensor {
        self.io
            .get(name)
            .or_else(|| self.unet_io.get(name))
            .unwrap_or_else(|| panic!("io `{name}`"))
    }

    fn text_time(&self) -> Option<(&Tensor, &Tensor)> {
        self.unet_io
            .get("text_embeds")
            .map(|p| (p, self.get("time_ids")))
    }

    fn run(&self, net: &ControlNet, guess: bool) -> ControlResiduals {
        net.forward(
            self.get("sample"),
            500.0,
            self.get("context"),
            self.text_time(),
            self.get("cond"),
            0.7,
            guess,
        )
        .expect("controlnet forward")
    }

    fn check(&self, what: &str, net: &ControlNet) {
        for (guess, prefix) in [(false, ""), (true, "guess_")] {
            let r = self.run(net, guess);
            assert_eq!(r.down.len(), 4, "{what}: one residual per skip connection");
            for (i, d) in r.down.iter().enumerate() {
                assert_close(
                    &format!("{what} {prefix}down.{i}"),
                    d,
                    self.get(&format!("{prefix}down.{i}")),
                );
            }
            assert_close(
                &format!("{what} {prefix}mid"),
                &r.mid,
                self.get(&format!("{prefix}mid")),
            );
            let out = self
                .unet
                .forward_with_control(
                    self.get("sample"),
                    500.0,
                    self.get("context"),
                    self.text_time(),
                    Some(&r),
                )
                .expect("unet with control");
            assert_close(
                &format!("{what} {prefix}unet_out"),
                &out,
                self.get(&format!("{prefix}unet_out")),
            );
        }
    }
}

#[test]
fn sd1_controlnet_folder_matches_diffusers() {
    let c = case("sd1");
    let net = ControlNet::load(&fixtures().join("controlnet/sd1"), &Device::Cpu).expect("load");
    assert_eq!(net.config().embedding_channels, vec![4, 4, 8, 8]);
    c.check("sd1", &net);
}

#[test]
fn sdxl_controlnet_folder_matches_diffusers() {
    let c = case("sdxl");
    let net = ControlNet::load(&fixtures().join("controlnet/sdxl"), &Device::Cpu).expect("load");
    assert!(net.config().unet.text_time.is_some());
    c.check("sdxl", &net);
}

#[test]
fn an_original_single_file_matches_the_diffusers_folder() {
    // A released ControlNet file carries no config; the tiny fixture's 4-group norms need the
    // one beside it (as diffusers' `from_single_file(config=…)`), everything else is read
    // from the `control_model.…` names.
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("control_sd1_original.safetensors");
    std::fs::copy(
        fixtures().join("controlnet/control_sd1_original.safetensors"),
        &file,
    )
    .expect("copy");
    std::fs::copy(
        fixtures().join("controlnet/sd1/config.json"),
        tmp.path().join("config.json"),
    )
    .expect("copy config");
    let c = case("sd1");
    let net = ControlNet::load(&file, &Device::Cpu).expect("load the original names");
    c.check("original names", &net);

    // Without the config the shape comes from the tensors: the embedding widths and levels
    // are read right (only the group count, 32 in every released model, cannot be).
    std::fs::remove_file(tmp.path().join("config.json")).expect("rm");
    let err = ControlNet::load(&file, &Device::Cpu).expect_err("32 groups of 8 channels");
    assert!(err.to_string().contains("group"), "{err}");
}

#[test]
fn a_file_that_is_not_a_controlnet_is_named_so() {
    let err = ControlNet::load(
        &fixtures().join("sd_parity/unet_sd1/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .expect_err("a UNet is not a ControlNet");
    assert!(err.to_string().contains("not a ControlNet"), "{err}");
}

#[test]
fn residuals_of_two_units_add_up() {
    let c = case("sd1");
    let net =
        Arc::new(ControlNet::load(&fixtures().join("controlnet/sd1"), &Device::Cpu).expect("load"));
    let a = c.run(&net, false);
    let b = c.run(&net, true);
    let sum = a.add(&b).expect("add");
    let want = (&a.mid + &b.mid).expect("sum");
    assert_close("sum mid", &sum.mid, &want);
}

// ---- the pipeline with units ------------------------------------------------------------

mod pipeline {
    use std::ops::ControlFlow;
    use std::path::Path;
    use std::sync::Arc;

    use candle_core::Device;
    use studio_inference::diffusion::annotators::Preprocessor;
    use studio_inference::diffusion::controlnet::{ControlNet, ControlSpec, ControlUnit};
    use studio_inference::diffusion::imaging::RgbImage;
    use studio_inference::diffusion::model::{self, ImageModelOptions, SdModel};
    use studio_inference::diffusion::pipeline::{ImageRequest, generate};
    use studio_inference::diffusion::samplers::SamplerKind;
    use studio_tests::sd::{TinyKind, TinySd, write_tiny_controlnet, write_tiny_sd};

    struct Setup {
        _dir: tempfile::TempDir,
        model: SdModel,
        net: Arc<ControlNet>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tmp");
        let sd = dir.path().join("sd");
        write_tiny_sd(&sd, TinySd::new(TinyKind::Sd1));
        let cn = dir.path().join("cn");
        write_tiny_controlnet(&sd, &cn);
        let model = model::load(
            &sd,
            &ImageModelOptions::default(),
            &Device::Cpu,
            &mut |_, _| {},
        )
        .expect("load");
        let net = Arc::new(ControlNet::load(&cn, &Device::Cpu).expect("controlnet"));
        Setup {
            _dir: dir,
            model,
            net,
        }
    }

    /// A white square on black: an edge map.
    fn edges(w: u32, h: u32) -> RgbImage {
        let mut pixels = vec![0u8; (w * h * 3) as usize];
        for y in h / 4..h * 3 / 4 {
            for x in w / 4..w * 3 / 4 {
                if y == h / 4 || x == w / 4 || y + 1 == h * 3 / 4 || x + 1 == w * 3 / 4 {
                    let i = ((y * w + x) * 3) as usize;
                    pixels[i..i + 3].copy_from_slice(&[255, 255, 255]);
                }
            }
        }
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    fn request(control: Vec<ControlUnit>) -> ImageRequest {
        ImageRequest {
            steps: 4,
            seed: Some(5),
            width: 32,
            height: 32,
            sampler: SamplerKind::Euler,
            control,
            ..ImageRequest::new("a cat")
        }
    }

    fn pixels(m: &SdModel, req: &ImageRequest) -> Vec<u8> {
        let out = generate(m, req, &mut |_| ControlFlow::Continue(())).expect("generate");
        out.images[0].image.pixels.clone()
    }

    #[test]
    fn a_unit_guides_the_image_and_weight_zero_changes_nothing() {
        let s = setup();
        let plain = pixels(&s.model, &request(vec![]));
        let unit = ControlUnit::new(s.net.clone(), edges(32, 32));
        let guided = pixels(&s.model, &request(vec![unit.clone()]));
        assert_ne!(plain, guided, "the ControlNet changes the image");
        let zero = ControlUnit {
            weight: 0.0,
            ..unit.clone()
        };
        assert_eq!(plain, pixels(&s.model, &request(vec![zero])));
        // Active only in the second half: different from both.
        let late = ControlUnit {
            start: 0.5,
            ..unit.clone()
        };
        let late_px = pixels(&s.model, &request(vec![late]));
        assert_ne!(late_px, plain);
        assert_ne!(late_px, guided);
        // Guess mode and two units at once run, and differ.
        let guess = ControlUnit {
            guess_mode: true,
            ..unit.clone()
        };
        assert_ne!(pixels(&s.model, &request(vec![guess])), guided);
        let two = pixels(&s.model, &request(vec![unit.clone(), unit]));
        assert_ne!(two, guided);
    }

    #[test]
    fn a_control_image_of_another_size_is_resized_and_the_units_are_in_the_parameters() {
        let s = setup();
        let unit = ControlSpec {
            model: s.net.path().to_owned(),
            image: edges(48, 40),
            preprocessor: Preprocessor::None,
            weight: 0.8,
            start: 0.0,
            end: 0.75,
            guess_mode: false,
        }
        .unit(s.net.clone());
        let out = generate(&s.model, &request(vec![unit]), &mut |_| {
            ControlFlow::Continue(())
        })
        .expect("a 48x40 control image for a 32x32 image");
        let image = &out.images[0];
        assert_eq!((image.image.width, image.image.height), (32, 32));
        let text = image.parameters.get("ControlNet 0").expect("ControlNet 0");
        assert!(
            text.contains("Module: none")
                && text.contains("Model: cn")
                && text.contains("Weight: 0.8")
                && text.contains("Guidance End: 0.75"),
            "{text}"
        );
    }

    #[test]
    fn a_controlnet_for_another_base_model_is_refused_by_name() {
        let s = setup();
        let sdxl = Arc::new(
            ControlNet::load(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/controlnet/sdxl"),
                &Device::Cpu,
            )
            .expect("sdxl controlnet"),
        );
        let err = generate(
            &s.model,
            &request(vec![ControlUnit::new(sdxl, edges(32, 32))]),
            &mut |_| ControlFlow::Continue(()),
        )
        .expect_err("an SDXL ControlNet on an SD 1.x model");
        assert!(err.to_string().contains("another base model"), "{err}");
        let bad = ControlUnit {
            weight: 3.0,
            ..ControlUnit::new(s.net.clone(), edges(32, 32))
        };
        let err = generate(&s.model, &request(vec![bad]), &mut |_| {
            ControlFlow::Continue(())
        })
        .expect_err("weight 3");
        assert!(err.to_string().contains("weight"), "{err}");
    }
}
