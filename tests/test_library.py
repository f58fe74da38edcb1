"""`kosmos_cli.transcribe`: the library call the command runs through, from inputs to page records."""

import pytest

import kosmos_cli
from tests.helpers.cli import FAST, jsonl, kosmos
from tests.helpers.images import write_image
from tests.helpers.pdfs import make_image_pdf


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    make_image_pdf(folder / "doc.pdf", 2)
    write_image(folder / "scan.png", (120, 90))
    return [folder, tmp_path / "missing.png"]


@pytest.mark.parametrize("device", ["cpu", "cpu,cpu"])
def test_the_records_are_the_commands(k25, inputs, device):
    """Every page in input order and the missing input as a failure record, field for field what
    `kosmos ocr -f jsonl` prints, on one device and on two worker processes."""
    records = [r.to_dict() for r in kosmos_cli.transcribe(inputs, "ocr", model=k25, device=device, max_new_tokens=8,
                                                         batch_size=2, dpi=72)]
    command = kosmos("ocr", *inputs, "--model", k25, "--device", device, "-b", "2", "--dpi", "72", "-f", "jsonl", *FAST)
    assert command.exit_code == 1  # the missing input
    assert records == jsonl(command.stdout)
    assert [(r["page"], r["error"] is None) for r in records] == [(0, False), (1, True), (2, True), (1, True)]
    assert all(r["confidence"] is not None for r in records if r["error"] is None)


def test_pages_and_a_model_that_cannot_do_the_task(k25, inputs):
    records = list(kosmos_cli.transcribe(inputs[:1], "md", model=k25, pages="2", max_new_tokens=4, dpi=72))
    # scan.png has no page 2: a failure record, as the command writes it
    assert [(r.source.rsplit("/", 1)[1], r.page, r.error is None) for r in records] == \
        [("doc.pdf", 2, True), ("scan.png", 0, False)]
    with pytest.raises(kosmos_cli.ModelUnusable, match="needs a kosmos-2 model") as caught:
        list(kosmos_cli.transcribe(inputs[:1], "ground", model=k25, max_new_tokens=4))
    assert caught.value.code == 2
