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
