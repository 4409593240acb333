"""Report pieces that are pure: metric collection, the quality bar, rendering."""

from __future__ import annotations

from PIL import Image

from stages.report import (
    Doc,
    QualityBar,
    check_quality,
    collect_metrics,
    headline_lines,
    render_html,
    render_markdown,
)

MANIFESTS = {
    "pretrain": {"type": "pretrain", "metrics": {"first_loss": 2.3, "final_loss": 0.5, "steps": 600}},
    "finetune": {"type": "finetune", "metrics": {"dataset": "digits", "top1": 0.95}},
    "fewshot": {"type": "fewshot", "metrics": {"dataset": "digits", "pretrained.1shot": 0.8, "pretrained.1shot_std": 0.02,
                                               "pretrained.10shot": 0.92, "random_init.1shot": 0.4,
                                               "pretrained.skipped_shots": {"25": "too few"}}},
    "ingest": {"type": "ingest", "metrics": {"samples": 1797}},
}


def test_collect_metrics_uses_the_documented_keys():
    m = collect_metrics(MANIFESTS)
    assert m["finetune.digits.top1"] == 0.95
    assert m["fewshot.digits.1shot"] == 0.8 and m["fewshot.digits.10shot"] == 0.92
    assert m["fewshot.digits.1shot_std"] == 0.02
    assert m["fewshot_random_init.digits.1shot"] == 0.4
    assert m["pretrain.pretrain.final_loss"] == 0.5
    assert not any("skipped" in k for k in m) and not any(k.startswith("ingest") for k in m)


def test_quality_bar_passes_and_fails():
    m = collect_metrics(MANIFESTS)
    checks = check_quality(m, QualityBar(finetune_top1=0.93, fewshot_10shot=0.95, fewshot_1shot_gain=0.3))
    verdict = {c["check"]: c["passed"] for c in checks}
    assert verdict == {"fine-tuned top-1": True, "10-shot accuracy": False, "1-shot gain over random init": True}
    gain = next(c for c in checks if c["check"].startswith("1-shot"))
    assert abs(gain["value"] - 0.4) < 1e-12
    # Without a baseline the gain cannot be shown, so the bar is missed rather than assumed.
    m.pop("fewshot_random_init.digits.1shot")
    assert not next(c for c in check_quality(m, QualityBar(fewshot_1shot_gain=0.3)))["passed"]
    assert check_quality(m, QualityBar()) == []


def test_headline_names_each_number():
    lines = headline_lines(collect_metrics(MANIFESTS), [])
    assert "fine-tuned top-1 on digits: 0.9500" in lines
    assert "1-shot accuracy on digits: 0.8000 (random init: 0.4000)" in lines


def test_markdown_and_self_contained_html(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "fig.png")
    doc = Doc("title <x>")
    doc.h("Section")
    doc.bullets(["a", "b"])
    doc.table(["k", "v"], [["top1", 0.91234567]])
    doc.figure("figures/fig.png", "a figure")
    md = render_markdown(doc, figure_prefix="stages/report/")
    assert "# title <x>" in md and "- a" in md and "| top1 | 0.9123 |" in md
    assert "](stages/report/figures/fig.png)" in md
    page = render_html(doc, tmp_path)
    assert "title &lt;x&gt;" in page and "data:image/png;base64," in page and "src='figures" not in page
