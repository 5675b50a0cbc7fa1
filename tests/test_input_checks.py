"""Bad inputs that used to pass silently: each fails naming the input, and the corrected rerun succeeds."""
import pytest

from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.testing.tiny_sd import save_tiny_pipeline
from dsdiff.utils.errors import SettingError

GEN_ARGS = ["generator.num_inference_steps=2", "generator.labels.cross_res=8", "generator.labels.self_res=16",
            "generator.labels.alpha=0.55", "generator.labels.beta=0.45", "prompts=default", "synthetic.image_format=png"]


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny32") / "pipeline", image_size=32)


def test_a_generation_that_keeps_nothing_fails_with_the_drop_reasons_and_the_folder_reruns(make_cfg, tiny32, tmp_path):
    from dsdiff.generate import generate

    out = tmp_path / "syn"

    def run(*extra):
        return generate(make_cfg(["+experiment=voc_deeplab", "trainer=cpu", "logger=csv", f"generator.model={tiny32}",
                                  "synthetic.num_images=2", f"synthetic.dir={out}", *GEN_ARGS, *extra]))

    with pytest.raises(SettingError, match="synthetic.max_dropped=2"):  # checked before anything is written
        run("synthetic.max_dropped=2")
    assert not out.exists()
    # alpha=beta=1: no pixel is ever foreground, so drop_empty drops every sample
    with pytest.raises(SettingError, match=r"kept 0 of 2 samples.*no_foreground: 2 of 2"):
        run("generator.labels.alpha=1.0", "generator.labels.beta=1.0", "synthetic.filters.drop_empty=true")
    assert not (out / "dataset.json").exists()  # reset: nothing refuses the corrected rerun
    summary = run("synthetic.filters.drop_empty=false")
    assert summary["samples"] == 2 and len(SyntheticDataset(out)) == 2
