"""The ``report`` stage: what a user reads at the end of a run.

Reads any number of upstream stages, knowing them by the typed records they publish
(:mod:`stages.records`): pretrain
(loss/LR curves, and the model for the paper's Figure 7 and Figure 6), finetune (top-1 per
dataset), fewshot (k-shot accuracy per dataset, and the random-init baseline when measured), and
an ingest stage as ``data`` (images for attention distance and rollout). Writes ``report.md``,
a self-contained ``report.html`` (figures inlined), ``metrics.json`` and ``figures/*.png`` in its
stage folder, and convenience copies of the three documents at the run's root.

``metrics.json`` keys: ``pretrain.<stage>.{first_loss,final_loss,steps,params,images_per_s}``,
``finetune.<dataset>.top1``, ``{pretrain.<stage>,finetune.<dataset>}.{goodput,wall_s}`` (goodput: compute /
wall), ``fewshot.<dataset>.<k>shot`` (and ``..._std``),
``fewshot_random_init.<dataset>.<k>shot``, and ``quality`` (each bar with its value and verdict).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.errors import VitpipeError
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageInput, StageParams
from pipeline.storage import open_storage
from stages.records import (
    FewshotResult,
    GoodputRecord,
    IngestResult,
    ReportResult,
    StageResult,
    TrainResult,
    handoff_of,
    read_result,
    result_of,
)
from stages.train.goodput import BUCKETS
from stages.train.timing import format_duration

__all__ = ["ReportParams", "QualityBar", "Report", "Doc", "RunResults", "gather_results", "flat_metrics",
           "check_quality", "headline_lines", "MeasuredStage", "training_goodput",
           "render_markdown", "render_html"]

log = logging.getLogger(__name__)


class QualityBar(StageParams):
    """Minimums the run is checked against (None: not checked). Recorded, never fatal unless ``enforce``."""

    finetune_top1: float | None = Field(default=None, ge=0, le=1)
    fewshot_10shot: float | None = Field(default=None, ge=0, le=1)
    fewshot_1shot_gain: float | None = Field(default=None, ge=-1, le=1,
                                             description="1-shot accuracy minus the random-init baseline's")
    enforce: bool = Field(default=False, description="fail the stage when a bar is missed")


class ReportParams(StageParams):
    title: str | None = None
    images: int = Field(default=4, ge=0, le=16, description="images shown with attention rollout (Figure 6)")
    distance_images: int = Field(default=32, ge=1, description="images averaged for mean attention distance")
    quality: QualityBar = Field(default_factory=QualityBar)


# Pure: results, metrics and checks -----------------------------------------------------------------


@dataclass
class RunResults:
    """The upstream records the report reads, by what they are."""

    pretrain: dict[str, TrainResult] = field(default_factory=dict)  # stage -> record
    finetune: dict[str, TrainResult] = field(default_factory=dict)  # dataset -> record
    fewshot: dict[str, FewshotResult] = field(default_factory=dict)  # dataset -> record


def gather_results(records: dict[str, StageResult | None]) -> RunResults:
    """Sort the inputs' records (``{stage: record}``) by kind; others (ingest, plugins) are not reported.

    Fine-tunes and few-shot evaluations are named by their dataset; two stages on the same dataset
    (an LR grid, say) are named ``dataset@stage`` instead, so neither hides the other.
    """
    results = RunResults()
    tuned = {stage: r for stage, r in records.items() if isinstance(r, TrainResult) and r.kind == "finetune"}
    few = {stage: r for stage, r in records.items() if isinstance(r, FewshotResult)}
    for stage, record in sorted(records.items()):
        if isinstance(record, TrainResult) and record.kind == "pretrain":
            results.pretrain[stage] = record
    for found, target in ((tuned, results.finetune), (few, results.fewshot)):
        datasets = [getattr(r, "dataset", None) or stage for stage, r in found.items()]
        for (stage, record), dataset in sorted(zip(found.items(), datasets)):
            target[dataset if datasets.count(dataset) == 1 else f"{dataset}@{stage}"] = record
    return results


def flat_metrics(results: RunResults) -> dict[str, Any]:
    """``metrics.json``: ``pretrain.<stage>.{first_loss,final_loss,steps,params,images_per_s}``,
    ``finetune.<dataset>.top1``, ``{pretrain.<stage>,finetune.<dataset>}.{goodput,wall_s}``,
    ``fewshot.<dataset>.<k>shot`` (and ``_std``), and
    ``fewshot_random_init.<dataset>.<k>shot`` (and ``_std``)."""
    out: dict[str, Any] = {}
    for stage, r in results.pretrain.items():
        for key in ("first_loss", "final_loss", "steps", "params", "images_per_s"):
            out[f"pretrain.{stage}.{key}"] = getattr(r, key)
    for dataset, r in results.finetune.items():
        out[f"finetune.{dataset}.top1"] = r.evaluation.top1 if r.evaluation else None
    for m in training_goodput(results):
        out[f"{m.key}.goodput"] = m.goodput.fraction
        out[f"{m.key}.wall_s"] = m.goodput.wall_s
    for dataset, r in results.fewshot.items():
        for tag, prefix in (("pretrained", "fewshot"), ("random_init", "fewshot_random_init")):
            for k, stats in r.accuracy.get(tag, {}).items():
                out[f"{prefix}.{dataset}.{k}shot"] = stats.mean
                out[f"{prefix}.{dataset}.{k}shot_std"] = stats.std
    return out


@dataclass(frozen=True)
class MeasuredStage:
    key: str  # metrics.json prefix: pretrain.<stage> or finetune.<dataset>
    label: str  # what a reader sees
    goodput: GoodputRecord


def training_goodput(results: RunResults) -> list[MeasuredStage]:
    """The training stages that recorded where their wall time went."""
    found = [MeasuredStage(f"pretrain.{stage}", stage, r.goodput) for stage, r in results.pretrain.items()
             if r.goodput is not None]
    return found + [MeasuredStage(f"finetune.{dataset}", f"finetune on {dataset}", r.goodput)
                    for dataset, r in results.finetune.items() if r.goodput is not None]


def _shot(r: FewshotResult, tag: str, k: int) -> float | None:
    stats = r.accuracy.get(tag, {}).get(k)
    return None if stats is None else stats.mean


def check_quality(results: RunResults, bar: QualityBar) -> list[dict[str, Any]]:
    """One record per (bar, dataset): ``{"check", "dataset", "value", "minimum", "passed"}``."""
    checks: list[dict[str, Any]] = []

    def add(check: str, dataset: str, value: float | None, minimum: float) -> None:
        checks.append({"check": check, "dataset": dataset, "value": value, "minimum": minimum,
                       "passed": value is not None and value >= minimum})

    for ds in sorted({*results.finetune, *results.fewshot}):
        tuned, few = results.finetune.get(ds), results.fewshot.get(ds)
        if bar.finetune_top1 is not None and tuned is not None:
            add("fine-tuned top-1", ds, tuned.evaluation.top1 if tuned.evaluation else None, bar.finetune_top1)
        if bar.fewshot_10shot is not None and few is not None and _shot(few, "pretrained", 10) is not None:
            add("10-shot accuracy", ds, _shot(few, "pretrained", 10), bar.fewshot_10shot)
        if bar.fewshot_1shot_gain is not None and few is not None and _shot(few, "pretrained", 1) is not None:
            base = _shot(few, "random_init", 1)
            gain = None if base is None else _shot(few, "pretrained", 1) - base  # type: ignore[operator]
            add("1-shot gain over random init", ds, gain, bar.fewshot_1shot_gain)
    return checks


# Pure: rendering ---------------------------------------------------------------------------------


@dataclass
class Doc:
    """A report as blocks, rendered to Markdown and to HTML from the same content."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def figure(self, rel: str, caption: str) -> None:
        self.blocks.append(("img", (rel, caption)))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def render_markdown(doc: Doc, figure_prefix: str = "") -> str:
    lines = [f"# {doc.title}", ""]
    for kind, body in doc.blocks:
        if kind == "h":
            lines += [f"## {body}", ""]
        elif kind == "p":
            lines += [body, ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in body] + [""]
        elif kind == "table":
            header, rows = body
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            rel, caption = body
            lines += [f"![{caption}]({figure_prefix}{rel})", f"*{caption}*", ""]
    return "\n".join(lines)


def render_html(doc: Doc, figures_dir: Path) -> str:
    """Self-contained HTML: every figure inlined as a data URI."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(doc.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             "img{max-width:100%}figcaption{color:#555;font-style:italic}</style></head><body>",
             f"<h1>{html.escape(doc.title)}</h1>"]
    for kind, body in doc.blocks:
        if kind == "h":
            parts.append(f"<h2>{html.escape(body)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(body)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in body) + "</ul>")
        elif kind == "table":
            header, rows = body
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        elif kind == "img":
            rel, caption = body
            data = base64.b64encode((figures_dir / Path(rel).name).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# The stage ----------------------------------------------------------------------------------------


def _plot_history(inp: StageInput, figdir: Path, doc: Doc, caption: str) -> None:
    from stages.eval import figures
    from stages.train.metrics import read_history

    history = read_history(inp.storage)
    if history:
        figures.plot_curves([r.to_json() for r in history], figdir / f"{inp.stage}-curves.png")
        doc.figure(f"figures/{inp.stage}-curves.png", f"{inp.stage}: {caption}")


def _model_figures(inp: StageInput, data: StageInput | None, settings: Any, p: ReportParams, figdir: Path,
                   doc: Doc) -> None:
    """Figure 7 (patch-embedding PCs, position-embedding similarity, attention distance) and Figure 6."""
    import torch

    from stages.data.evalset import iter_eval_batches
    from stages.data.transforms import to_model_input
    from stages.eval import figures, inspect
    from stages.model.handoff import read_handoff
    from stages.model.vit import ViT

    handoff = read_handoff(handoff_of(inp)[1], settings)
    cfg = handoff.config
    model = ViT(cfg)
    model.load_state_dict(handoff.state)
    model.eval()
    stage = inp.stage

    def attempt(title: str, fn: Any) -> None:
        try:
            fn()
        except (ValueError, RuntimeError, AttributeError) as err:  # e.g. a hybrid has no patch filters
            doc.p(f"{title}: not drawn ({' '.join(str(err).split())[:200]}).")
            log.warning("report: %s not drawn: %s", title, err)

    def components() -> None:
        figures.plot_patch_components(inspect.patch_embedding_components(model),
                                      figdir / f"{stage}-patch-components.png")
        doc.figure(f"figures/{stage}-patch-components.png",
                   "Principal components of the patch-embedding filters (paper Figure 7, left)")

    def similarity() -> None:
        figures.plot_position_similarity(inspect.position_embedding_similarity(model),
                                         figdir / f"{stage}-position-similarity.png")
        doc.figure(f"figures/{stage}-position-similarity.png",
                   "Cosine similarity of each position embedding with all others (paper Figure 7, centre)")

    attempt("patch-embedding components", components)
    attempt("position-embedding similarity", similarity)
    if data is None:
        doc.p("No data input: attention distance and rollout need images.")
        return
    ingested = read_result(data, IngestResult, "an ingest stage")
    split = "test" if "test" in ingested.splits else next(iter(ingested.splits), None)
    if split is None:
        return
    count = max(p.distance_images, p.images)
    shards = open_storage(ingested.shard_uri(data), settings)
    batch = next(iter(iter_eval_batches(shards, ingested.shards(split), count, cfg.image_size, ingested.classes)), None)
    if batch is None:
        return
    images = to_model_input(batch["image"])

    def distance() -> None:
        with torch.inference_mode():
            dist = inspect.mean_attention_distance(model, images[: p.distance_images])
        figures.plot_attention_distance(dist, cfg.patch_size, figdir / f"{stage}-attention-distance.png")
        doc.figure(f"figures/{stage}-attention-distance.png",
                   f"Mean attention distance per head against depth, over {len(images[: p.distance_images])} "
                   f"{split} images (paper Figure 7, right)")

    def rollout() -> None:
        shown = images[: p.images]
        with torch.inference_mode():
            maps = inspect.attention_rollout(model, shown)
        figures.plot_attention_rollout(shown, maps, figdir / f"{stage}-attention-rollout.png")
        doc.figure(f"figures/{stage}-attention-rollout.png",
                   "Attention rollout from the representation to the input (paper Figure 6)")

    attempt("attention distance", distance)
    if p.images:
        attempt("attention rollout", rollout)


@register_stage("report")
class Report(Stage):
    Params = ReportParams
    accepts_extra_inputs = True

    def run(self, ctx: StageContext) -> None:
        p: ReportParams = ctx.params  # type: ignore[assignment]
        if not ctx.inputs:
            raise VitpipeError("the report stage needs inputs (pretrain, finetune, fewshot, ingest stages)")
        records = {inp.stage: result_of(inp) for inp in ctx.inputs.values()}
        results = gather_results(records)
        metrics = flat_metrics(results)
        checks = check_quality(results, p.quality)
        data = next((i for i in ctx.inputs.values() if isinstance(records[i.stage], IngestResult)), None)
        trained = {kind: [i for i in ctx.inputs.values() if isinstance(r := records[i.stage], TrainResult)
                          and r.kind == kind] for kind in ("pretrain", "finetune")}

        doc = Doc(p.title or f"vitpipe report: {ctx.run_storage.uri}")
        headline = headline_lines(results, checks)
        doc.h("Headline")
        doc.bullets(headline)
        if checks:
            doc.h("Quality bar")
            doc.table(["check", "dataset", "value", "minimum", "verdict"],
                      [[c["check"], c["dataset"], c["value"], c["minimum"], "pass" if c["passed"] else "FAIL"]
                       for c in checks])
        with tempfile.TemporaryDirectory() as tmp:
            figdir = Path(tmp)
            for inp in trained["pretrain"]:
                r = results.pretrain[inp.stage]
                cfg = r.vit_config()
                doc.h(f"Pretraining ({inp.stage})")
                doc.p(f"ViT with width {cfg.width}, depth {cfg.depth}, {cfg.heads} heads, patch {cfg.patch_size} "
                      f"at {cfg.image_size} px: {r.params:,} parameters; {r.steps} steps, loss {r.first_loss} -> "
                      f"{r.final_loss}.")
                _plot_history(inp, figdir, doc, "training loss and learning rate")
                _model_figures(inp, data, ctx.run_storage_settings, p, figdir, doc)
            if trained["finetune"]:
                doc.h("Fine-tuning")
                rows = []
                for inp in trained["finetune"]:
                    r = records[inp.stage]
                    assert isinstance(r, TrainResult)
                    e = r.evaluation
                    rows.append([inp.stage, r.dataset, r.architecture.get("image_size"), r.steps,
                                 e.top1 if e else None, e.total if e else None, e.skipped if e else None])
                doc.table(["stage", "dataset", "resolution", "steps", "top-1", "evaluated", "skipped"], rows)
                for inp in trained["finetune"]:
                    _plot_history(inp, figdir, doc, "loss and learning rate")
            if results.fewshot:
                doc.h("Few-shot linear evaluation")
                doc.p("Closed-form regularised least squares from the frozen representation onto {-1, 1}^K "
                      "targets; mean ± std over random k-shot draws; regularisation chosen on held-out "
                      "training data.")
                rows = []
                for dataset, few in results.fewshot.items():
                    for k, stats in sorted(few.accuracy.get("pretrained", {}).items()):
                        base = few.accuracy.get("random_init", {}).get(k)
                        rows.append([dataset, k, f"{stats.mean:.4f} ± {stats.std:.4f}",
                                     "" if base is None else f"{base.mean:.4f} ± {base.std:.4f}"])
                doc.table(["dataset", "k", "pretrained", "random init"], rows)
            _goodput_section(results, figdir, doc)
            doc.h("Run")
            doc.p(f"Run directory: {ctx.run_storage.uri}. Stages: "
                  + ", ".join(f"{i.stage} ({i.manifest.type})" for i in ctx.inputs.values()) + ".")

            for png in sorted(figdir.glob("*.png")):
                ctx.out.upload_file(png, f"figures/{png.name}")
                ctx.add_output(f"figures/{png.name}")
            md = render_markdown(doc)
            page = render_html(doc, figdir)
        payload = json.dumps({**metrics, "quality": checks}, indent=2, sort_keys=True)
        ctx.write_text("report.md", md)
        ctx.write_text("report.html", page)
        ctx.write_text("metrics.json", payload)
        # Convenience copies at the run root (the committed ones are in this stage's folder).
        prefix = ctx.out.uri[len(ctx.run_storage.uri):].strip("/") + "/"
        ctx.run_storage.write_text("report.md", render_markdown(doc, figure_prefix=prefix))
        ctx.run_storage.write_text("report.html", page)
        ctx.run_storage.write_text("metrics.json", payload)
        passed = all(c["passed"] for c in checks) if checks else None
        if ctx.trackers is not None:
            _send_to_trackers(ctx, metrics, {"report.md": md, "report.html": page})
        ctx.result = ReportResult(metrics=metrics, quality_passed=passed)
        # For `vitpipe status` and the end of `vitpipe run` (people, not stages, read these).
        ctx.metrics.update({"headline": headline, "report": ctx.run_storage.uri_of("report.html")})
        missed = [c for c in checks if not c["passed"]]
        for c in missed:
            ctx.logger.warning("quality bar missed: %s on %s: %s < %s", c["check"], c["dataset"],
                               _cell(c["value"]), c["minimum"])
        if missed and p.quality.enforce:
            c = missed[0]
            raise VitpipeError(f"quality bar missed: {c['check']} on {c['dataset']}: {_cell(c['value'])} < "
                               f"{c['minimum']}")


def _goodput_section(results: RunResults, figdir: Path, doc: Doc) -> None:
    """Where each training stage's wall time went (``stages.train.goodput``)."""
    from stages.eval import figures

    measured = training_goodput(results)
    if not measured:
        return
    doc.h("Goodput")
    doc.p("Wall time of each training stage by what it was spent on; goodput is the share spent computing "
          "training steps. Start-up includes Ray Train's worker group, the process group and DeepSpeed's set-up.")
    doc.table(["stage", "wall", "goodput", *(b.replace("_", " ") for b in BUCKETS)],
              [[m.label, format_duration(m.goodput.wall_s), f"{m.goodput.fraction:.1%}",
                *(f"{m.goodput.buckets.get(b, 0.0):.1f}s" for b in BUCKETS)] for m in measured])
    figures.plot_goodput({m.label: m.goodput.buckets for m in measured}, figdir / "goodput.png")
    doc.figure("figures/goodput.png", "wall time per training stage, by bucket")


def _send_to_trackers(ctx: StageContext, metrics: dict[str, Any], documents: dict[str, str]) -> None:
    """The run's final numbers and the report into its MLflow / W&B runs. A tracker that fails costs
    a warning, not the report (everything is in the run directory either way)."""
    from pipeline.trackers import TrackerWriter

    assert ctx.trackers is not None
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:
        with tempfile.TemporaryDirectory() as tmp, TrackerWriter(ctx.trackers) as writer:
            writer.log_summary(numbers)
            for name, text in documents.items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
                writer.log_artifact(Path(tmp) / name)
    except Exception as err:  # noqa: BLE001 - MLflow's or W&B's failure, whatever its type
        ctx.logger.warning("the report did not reach the trackers: %s", " ".join(str(err).split())[:300])


def headline_lines(results: RunResults, checks: list[dict[str, Any]]) -> list[str]:
    """The few numbers printed at the end of a run."""
    lines = []
    for dataset, r in sorted(results.finetune.items()):
        if r.evaluation is not None and r.evaluation.top1 is not None:
            lines.append(f"fine-tuned top-1 on {dataset}: {r.evaluation.top1:.4f}")
    for dataset, r in sorted(results.fewshot.items()):
        for k, stats in sorted(r.accuracy.get("pretrained", {}).items()):
            base = _shot(r, "random_init", k)
            extra = f" (random init: {base:.4f})" if base is not None else ""
            lines.append(f"{k}-shot accuracy on {dataset}: {stats.mean:.4f}{extra}")
    goodput = training_goodput(results)
    if goodput:
        lines.append("training goodput: " + ", ".join(
            f"{m.label} {m.goodput.fraction:.0%} of {format_duration(m.goodput.wall_s)}" for m in goodput))
    if checks:
        passed = sum(c["passed"] for c in checks)
        lines.append(f"quality bar: {passed}/{len(checks)} checks passed")
    return lines
