"""The embedded quickstart end to end, shortened: the shipped teacher, a few steps, all outputs written."""
import json

from onestep.cli import main
from onestep.pipelines import OneStepPipeline


def test_quickstart_writes_pipeline_samples_and_metrics(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path), "--steps", "3", "--fid-samples", "64"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("teacher_fid", "student_fid", "teacher_nfe", "student_nfe", "images_per_s_teacher",
                "images_per_s_student", "fid_protocol", "wall_s"):
        assert key in metrics, key
    assert metrics["teacher_nfe"] == 50 and metrics["student_nfe"] == 1
    assert metrics["images_per_s_student"] > 10 * metrics["images_per_s_teacher"]
    assert "onestep-digits" in metrics["fid_protocol"] and "64 generated" in metrics["fid_protocol"]
    assert (tmp_path / "samples.png").stat().st_size > 1000
    pipe = OneStepPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.card["fid"] == metrics["student_fid"] and pipe.card["teacher_fid"] == metrics["teacher_fid"]
    assert "student FID" in capsys.readouterr().out
