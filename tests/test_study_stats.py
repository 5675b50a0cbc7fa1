"""The study's statistics (experiments/_stats.py): what a multi-seed table's verdicts rest on."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from _stats import mean_sd, paired_interval, t975, verdict  # noqa: E402


def test_paired_interval_matches_a_hand_computed_t_interval():
    # diffs 0.02, 0.04, 0.03: mean 0.03, sd 0.01, half-width 4.303 * 0.01 / sqrt(3) = 0.02484
    mean, low, high = paired_interval([0.72, 0.74, 0.73], [0.70, 0.70, 0.70])
    assert mean == pytest.approx(0.03)
    assert (low, high) == (pytest.approx(0.03 - 0.024844, abs=1e-5), pytest.approx(0.03 + 0.024844, abs=1e-5))
    assert verdict(low, high) == "better"


def test_pairing_removes_the_seed_effect_that_an_unpaired_view_would_keep():
    # a variant always 1 point below its reference, on seeds that differ by 10 points: clearly worse
    full = [0.60, 0.70, 0.80]
    ablated = [v - 0.01 for v in full]
    mean, low, high = paired_interval(ablated, full)
    assert mean == pytest.approx(-0.01) and high < 0 and verdict(low, high) == "worse"
    # a noisy difference straddling zero is no evidence either way
    assert verdict(*paired_interval([0.70, 0.66, 0.71], [0.69, 0.69, 0.69])[1:]) == "no evidence"


def test_small_samples_and_bad_input():
    assert t975(2) == 4.303 and t975(100) == 1.96
    assert mean_sd([0.5]) == (0.5, None)
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([0.5], [0.4])
    with pytest.raises(ValueError, match="degree of freedom"):
        t975(0)


def test_spearman_ranks_ties_and_permutation_p():
    from _stats import ranks, spearman, spearman_p

    assert ranks([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]
    # monotone but not linear: rank correlation 1; reversed: -1
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped pair among 5: rho = 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.9)
    # perfect agreement of 6 values: only the identity ordering reaches rho = 1, p = 1/720
    assert spearman_p(list(range(6)), list(range(6))) == pytest.approx(1 / 720)
    with pytest.raises(ValueError, match="at least 3"):
        spearman([1, 2], [1, 2])
    with pytest.raises(ValueError, match="vary"):
        spearman([1, 2, 3], [5, 5, 5])


def test_study_workers_never_share_a_run_nor_write_one_synthetic_folder_twice(tmp_path):
    import subprocess

    import shapes_study as study

    assert study._claim(tmp_path, "tau_0-s42", "tau0", ready=False)      # writes synthetic/tau0: a "w" claim
    assert not study._claim(tmp_path, "tau_0-s42", "tau0", ready=False)  # the same run: held
    assert not study._claim(tmp_path, "tau_0-s43", "tau0", ready=False)  # another seed would write the same folder
    assert not study._claim(tmp_path, "tau_0-s43", "tau0", ready=True)   # nor read it while it is written
    assert study._claim(tmp_path, "tau_2-s42", "tau2", ready=False)      # another folder
    assert study._claim(tmp_path, "real-s42", None, ready=True) and study._claim(tmp_path, "real-s43", None, ready=True)
    study._release(tmp_path, "tau_0-s42")
    assert study._claim(tmp_path, "tau_0-s43", "tau0", ready=True) and study._claim(tmp_path, "tau_0-s44", "tau0", ready=True)
    assert not study._claim(tmp_path, "tau_0-s45", "tau0", ready=False)  # readers hold it: no writer
    # a claim whose worker is gone is dropped
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "locks" / "tau_4-s42.lock").write_text(f"{dead.pid} tau4 w")
    assert study._claim(tmp_path, "tau_4-s42", "tau4", ready=False)


def test_folder_ready_counts_the_samples_a_variant_reads(tmp_path):
    import argparse

    import shapes_study as study

    args = argparse.Namespace(images=2)
    assert not study._folder_ready(tmp_path, "full", args)
    (tmp_path / "synthetic" / "base").mkdir(parents=True)
    (tmp_path / "synthetic" / "base" / "manifest.jsonl").write_text("{}\n{}\n")
    assert study._folder_ready(tmp_path, "full", args) and not study._folder_ready(tmp_path, "images_4x", args)


def test_a_study_folder_refuses_another_generator(tmp_path):
    import argparse
    import shutil

    import shapes_study as study
    from dsdiff.shapes_t2i.assets import SHAPES_T2I

    out = tmp_path / "study"
    args = argparse.Namespace(model=None, no_train=False, score_labels=False)
    study.check_study(out, args)
    assert json.loads((out / "study.json").read_text())["model"] == str(SHAPES_T2I)
    study.check_study(out, args)  # the same model: goes on
    other = tmp_path / "other"
    shutil.copytree(SHAPES_T2I, other)
    (other / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    with pytest.raises(SystemExit, match="holds a study of the generator"):
        study.check_study(out, argparse.Namespace(model=str(other), no_train=False, score_labels=False))
    with pytest.raises(SystemExit, match="not a diffusers pipeline folder"):
        study.check_study(tmp_path / "x", argparse.Namespace(model=str(tmp_path), no_train=False, score_labels=False))
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_the_table_names_the_command_that_reruns_it_and_pairs_self_training_with_none():
    import shlex

    import shapes_study as study

    argv = ["--images", "500", "--steps", "200", "--seeds", "3", "--model", "m", "--section", "st",
            "--variants", "full", "no_selftrain", "selftrain_teacher", "--score-labels", "--write-results"]
    args = study.build_parser().parse_args(argv)
    args.model_digest = "sha256:x"
    base = {"full": 0.68, "no_selftrain": 0.74, "selftrain_teacher": 0.76}
    results = {name: {seed: {"test/mIoU": v + 0.01 * k, "test/mIoU_tta": v + 0.04 + 0.01 * k + (0.01 if name == "selftrain_teacher" else 0)}
                      for k, seed in enumerate((42, 43, 44))}
               for name, v in base.items()}
    text = study.table(results, args)
    command = text.split("`python experiments/shapes_study.py ", 1)[1].split("`", 1)[0]
    assert vars(study.build_parser().parse_args(shlex.split(command))) == vars(study.build_parser().parse_args(argv))
    assert command.endswith(" --write-results")  # rerunning it remakes the shipped table, not a run folder's copy
    draft = study.build_parser().parse_args(argv[:-1])
    draft.model_digest = "sha256:x"
    assert "--write-results" not in study.table(results, draft)
    assert not study.build_parser().parse_args(shlex.split(study.table(results, draft).split(
        "`python experiments/shapes_study.py ", 1)[1].split("`", 1)[0])).write_results
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if " vs " in line}
    # every seed 2 points above none plain, 3 points above with TTA on both sides: a zero-width interval
    assert "| +2.0 [+2.0, +2.0] | better |" in rows["selftrain_teacher vs no_selftrain"]
    assert "| +3.0 [+3.0, +3.0] | better |" in rows["selftrain_teacher vs no_selftrain, both with TTA"]
    assert "| -6.0 [-6.0, -6.0] | worse |" in rows["full vs no_selftrain"]


def test_studies_write_the_shipped_results_only_when_asked(tmp_path, monkeypatch):
    import _results
    import shapes_pseudo_quality as pseudo

    shipped = Path(__file__).resolve().parents[1] / "experiments" / "results"
    assert _results.RESULTS_DIR.resolve() == shipped
    monkeypatch.chdir(tmp_path)
    run = _results.run_folder("shapes_attention", False)
    assert run.is_dir() and run.resolve().is_relative_to(tmp_path / "outputs" / "experiments" / "shapes_attention")
    assert _results.run_folder("shapes_study", False, tmp_path / "study") == tmp_path / "study"
    assert _results.run_folder("shapes_study", True, tmp_path / "study") == _results.RESULTS_DIR
    # the pseudo-label section names the command that remakes it where it is
    assert "`python experiments/shapes_pseudo_quality.py --out logs/s --write-results`" in pseudo.section([], Path("logs/s"), 0.1, True)
    assert "`python experiments/shapes_pseudo_quality.py --out logs/s` (" in pseudo.section([], Path("logs/s"), 0.1)
