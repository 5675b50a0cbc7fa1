"""The DPM-Solver++ generator presets: only the sampler changes, and it keeps the model's noise schedule."""
import pytest
from omegaconf import OmegaConf

from dsdiff.data.classes import SHAPES_CLASSES


@pytest.mark.parametrize("base", ["shapes", "sd21"])
def test_dpm_preset_changes_only_the_sampler(make_cfg, base):
    plain = OmegaConf.to_container(make_cfg([f"generator={base}"]).generator)
    dpm = OmegaConf.to_container(make_cfg([f"generator={base}_dpm"]).generator)
    assert dpm.pop("scheduler") == "dpm-solver" and plain.pop("scheduler") is None
    assert dpm.pop("num_inference_steps") < plain.pop("num_inference_steps")
    assert dpm == plain


def test_dpm_sampler_on_the_shipped_model_keeps_its_schedule_and_labels_the_object():
    from dsdiff.diffusion import SyntheticGenerator
    from dsdiff.shapes_t2i.assets import SHAPES_T2I

    ddim = SyntheticGenerator.from_pretrained(SHAPES_T2I, SHAPES_CLASSES, device="cpu", cross_res=8, self_res=16)
    gen = SyntheticGenerator.from_pretrained(SHAPES_T2I, SHAPES_CLASSES, device="cpu", scheduler="dpm-solver",
                                             num_inference_steps=10, cross_res=8, self_res=16, tau=1)
    own, solver = ddim.pipe.scheduler.config, gen.pipe.scheduler.config
    assert type(gen.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert solver.algorithm_type == "dpmsolver++"
    for key in ("prediction_type", "timestep_spacing", "beta_schedule", "num_train_timesteps"):
        assert solver[key] == own[key], key  # a v-prediction model read as epsilon would draw noise
    ball = SHAPES_CLASSES.index("ball")
    [sample] = gen(["a ball"], [3])
    assert sample.metadata["scheduler"] == "DPMSolverMultistepScheduler" and sample.metadata["recorded_steps"] == 10
    assert set(sample.label.ravel().tolist()) <= {0, ball, 255}
    assert (sample.label == ball).mean() > 0.02, "the ball got pixels"
