"""Issue 29, output lost or corrupted: no option's file replaces another's or an input, every
output path (each value of a sweep included) is checked before any work, --json's stdout holds
one JSON document whatever the model prints, and a sweep answers once (one JSON list, one CSV of
every value's rows)."""

from __future__ import annotations

import json
import textwrap

import pytest
from _cli import assert_refused, invoke
from click.testing import CliRunner

from dbprofile.cli import main
from dbprofile.results import RunResult

CHATTY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from dbprofile import ModelSpec

    print("chatter at import")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            for layer in self.layers:
                h = h + layer(h)
            print("chatter in forward")
            return self.head(h[:, 0])

    def batch(n, device):
        return {"inputs": torch.randn(n, 5, 4).to(device), "targets": torch.randint(0, 3, (n,)).to(device)}

    def loss(m, b):
        return nn.functional.cross_entropy(m(b["inputs"]), b["targets"])

    spec = ModelSpec(name="chatty", build=Net, batch=batch, loss=loss, layers="layers",
                     task="classification", num_classes=3)
    """
)


@pytest.fixture
def chatty(tmp_path):
    path = tmp_path / "chatty.py"
    path.write_text(CHATTY)
    return path


@pytest.fixture
def result_file(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(RunResult(model="m").to_json())
    return path


def test_csv_never_replaces_the_runs_json_or_its_report(tmp_path):
    out = tmp_path / "s.json"
    assert_refused(
        invoke("run", "vit-tiny", "-t", "e2e", "--fake", "-o", out, "--csv", out), "--csv", "would overwrite --out"
    )
    assert_refused(
        invoke("run", "vit-tiny", "-t", "e2e", "--fake", "-o", out, "--csv", tmp_path / "s.html"), "HTML report"
    )
    assert not list(tmp_path.iterdir())  # refused before anything was measured or written


def test_no_output_replaces_the_model_file(chatty):
    assert_refused(invoke("run", chatty, "-t", "e2e", "-o", chatty), "the model file")
    assert_refused(invoke("run", chatty, "-t", "e2e", "--csv", chatty), "the model file")
    assert_refused(invoke("plan", f"{chatty}:spec", "-t", "e2e", "--html", chatty), "the model file")
    assert "chatter" in chatty.read_text()


def test_report_and_compare_never_write_over_what_they_read(tmp_path, result_file):
    assert_refused(invoke("report", result_file, "--csv", result_file), "its own result file")
    assert_refused(invoke("report", result_file, "--csv", tmp_path / "q.html"), "--output")
    assert_refused(invoke("report", result_file, "-o", tmp_path / "p.html", "--csv", tmp_path / "p.html"), "--output")
    assert_refused(invoke("compare", result_file, "-o", tmp_path / "c.html", "--csv", result_file), "result file")
    assert_refused(invoke("compare", result_file, "-o", tmp_path / "c.html", "--csv", tmp_path / "c.html"), "--output")
    # A hard link is the same file under another name.
    (tmp_path / "link.csv").hardlink_to(result_file)
    assert_refused(invoke("report", result_file, "--csv", tmp_path / "link.csv"), "its own result file")
    assert RunResult.load(result_file).model == "m"


def test_plan_html_and_csv_are_different_files_checked_up_front(tmp_path):
    page = tmp_path / "p.html"
    assert_refused(invoke("plan", "gpt-tiny", "-t", "e2e", "-b", "1", "--html", page, "--csv", page), "--html")
    assert_refused(invoke("plan", "gpt-tiny", "-t", "e2e", "-b", "1", "--csv", "/proc/x.csv"), "--csv")
    assert not page.exists()


def test_csv_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    result = invoke("run", "vit-tiny", "-t", "e2e", "--fake", "-o", tmp_path / "r.json", "--csv", "/proc/x.csv")
    assert_refused(result, "--csv")
    assert "measured" not in result.output and not (tmp_path / "r.json").exists()


def test_a_missing_or_html_result_is_said_as_such(tmp_path, result_file):
    assert_refused(invoke("report", tmp_path / "rep.html"), "does not exist")
    assert_refused(invoke("report", tmp_path / "rep.json"), "does not exist")
    assert invoke("report", tmp_path).exit_code == 2  # click says it is a directory
    (tmp_path / "q.html").write_text("<html></html>")
    assert_refused(invoke("report", tmp_path / "q.html"), "report page")
    assert_refused(invoke("compare", result_file, tmp_path / "gone.json", "-o", tmp_path / "c.html"), "does not exist")


def test_a_model_that_prints_leaves_json_stdout_one_document(tmp_path, chatty):
    result = CliRunner().invoke(
        main, ["run", str(chatty), "-t", "e2e", "-b", "2", "--steps", "1", "--json", "-o", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "chatty"
    assert "chatter at import" in result.stderr and "chatter in forward" in result.stderr
    planned = CliRunner().invoke(main, ["plan", str(chatty), "-t", "e2e", "-b", "2", "--json"])
    assert json.loads(planned.stdout)["model"] == "chatty"


def test_a_sweep_answers_once_with_every_values_rows(tmp_path):
    csv = tmp_path / "sweep.csv"
    args = ["run", "gpt-tiny", "--seq-len", "8,16", "-t", "e2e", "-b", "1", "--fake", "--json", "--csv", str(csv)]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.stderr
    answers = json.loads(result.stdout)  # one document: the list of the sweep's runs
    assert [a["files"]["json"] for a in answers] == [str(tmp_path / f"s-seq_len-{n}.json") for n in (8, 16)]
    assert len(csv.read_text().strip().splitlines()) == 1 + 2  # the header and one row per value
    assert (tmp_path / "s-seq_len-sweep.html").exists()


def test_a_sweep_checks_every_values_paths_before_the_first_is_measured(tmp_path):
    (tmp_path / "s-seq_len-16.html").mkdir()  # the second value's report cannot be written
    result = invoke("run", "gpt-tiny", "--seq-len", "8,16", "-t", "e2e", "-b", "1", "--fake", "-o", tmp_path / "s.json")
    assert_refused(result, "s-seq_len-16.html")
    assert not (tmp_path / "s-seq_len-8.json").exists()
    (tmp_path / "p-seq_len-16.html").mkdir()
    assert_refused(
        invoke("plan", "gpt-tiny", "--seq-len", "8,16", "-t", "e2e", "-b", "1", "--html", tmp_path / "p.html")
    )
    assert not (tmp_path / "p-seq_len-8.html").exists()


def test_validate_never_writes_its_table_and_rows_over_one_another(tmp_path):
    assert_refused(invoke("validate", "--device", "cpu", "-o", tmp_path / "v.json"), "would overwrite --out")
    assert_refused(
        invoke("validate", "--device", "cpu", "-o", tmp_path / "v.md", "--csv", tmp_path / "v.json"), "--csv"
    )
    assert not list(tmp_path.iterdir())
