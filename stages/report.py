"""The ``report`` stage: what a user reads at the end of a run.

Reads any number of upstream stages (it knows them by their manifest's stage type): pretrain
(loss/LR curves, and the model for the paper's Figure 7 and Figure 6), finetune (top-1 per
dataset), fewshot (k-shot accuracy per dataset, and the random-init baseline when measured), and
an ingest stage as ``data`` (images for attention distance and rollout). Writes ``report.md``,
a self-contained ``report.html`` (figures inlined), ``metrics.json`` and ``figures/*.png`` in its
stage folder, and convenience copies of the three documents at the run's root.

``metrics.json`` keys: ``pretrain.<stage>.{first_loss,final_loss,steps,params,images_per_s}``,
``finetune.<dataset>.top1``, ``fewshot.<dataset>.<k>shot`` (and ``..._std``),
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

__all__ = ["ReportParams", "QualityBar", "Report", "Doc", "collect_metrics", "check_quality", "headline_lines",
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


# Pure: metrics and checks ------------------------------------------------------------------------


def collect_metrics(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Flat report metrics from upstream manifests (``{stage: {"type": ..., "metrics": {...}}}``)."""
    out: dict[str, Any] = {}
    for stage, m in sorted(manifests.items()):
        kind, metrics = m["type"], m.get("metrics", {})
        if kind == "pretrain":
            for key in ("first_loss", "final_loss", "steps", "params", "images_per_s"):
                if key in metrics:
                    out[f"pretrain.{stage}.{key}"] = metrics[key]
        elif kind == "finetune":
            dataset = metrics.get("dataset", stage)
            out[f"finetune.{dataset}.top1"] = metrics.get("top1")
        elif kind == "fewshot":
            dataset = metrics.get("dataset", stage)
            for key, value in metrics.items():
                for tag, prefix in (("pretrained.", "fewshot"), ("random_init.", "fewshot_random_init")):
                    if key.startswith(tag) and "shot" in key and not key.endswith("skipped_shots"):
                        out[f"{prefix}.{dataset}.{key[len(tag):]}"] = value
    return out


def check_quality(metrics: dict[str, Any], bar: QualityBar) -> list[dict[str, Any]]:
    """One record per (bar, dataset): ``{"check", "dataset", "value", "minimum", "passed"}``."""
    checks: list[dict[str, Any]] = []

    def add(check: str, dataset: str, value: float | None, minimum: float) -> None:
        checks.append({"check": check, "dataset": dataset, "value": value, "minimum": minimum,
                       "passed": value is not None and value >= minimum})

    datasets = sorted({k.split(".")[1] for k in metrics if k.startswith(("finetune.", "fewshot."))})
    for ds in datasets:
        if bar.finetune_top1 is not None and f"finetune.{ds}.top1" in metrics:
            add("fine-tuned top-1", ds, metrics[f"finetune.{ds}.top1"], bar.finetune_top1)
        if bar.fewshot_10shot is not None and f"fewshot.{ds}.10shot" in metrics:
            add("10-shot accuracy", ds, metrics[f"fewshot.{ds}.10shot"], bar.fewshot_10shot)
        if bar.fewshot_1shot_gain is not None and f"fewshot.{ds}.1shot" in metrics:
            base = metrics.get(f"fewshot_random_init.{ds}.1shot")
            gain = None if base is None else metrics[f"fewshot.{ds}.1shot"] - base
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


def _history(inp: StageInput) -> list[dict[str, Any]]:
    if not inp.storage.exists("metrics.jsonl"):
        return []
    return [json.loads(line) for line in inp.storage.read_text("metrics.jsonl").splitlines() if line]


def _model_figures(inp: StageInput, data: StageInput | None, p: ReportParams, figdir: Path,
                   doc: Doc) -> None:
    """Figure 7 (patch-embedding PCs, position-embedding similarity, attention distance) and Figure 6."""
    import torch

    from stages.data.evalset import iter_eval_batches
    from stages.data.loader import shards_from_manifest
    from stages.eval import figures, inspect
    from stages.model.transfer import load_handoff
    from stages.model.vit import ViT

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("model.safetensors", "model_config.json"):
            inp.storage.download_file(name, Path(tmp) / name)
        cfg, state = load_handoff(tmp)
    model = ViT(cfg)
    model.load_state_dict(state)
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
    splits = data.manifest.metrics.get("splits", {})
    split = "test" if "test" in splits else next(iter(splits), None)
    if split is None:
        return
    count = max(p.distance_images, p.images)
    batch = next(iter(iter_eval_batches(data.storage, shards_from_manifest(data.manifest.metrics, split), count,
                                        cfg.image_size)), None)
    if batch is None:
        return
    images = batch["image"]

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
        from stages.eval import figures

        p: ReportParams = ctx.params  # type: ignore[assignment]
        by_type: dict[str, list[StageInput]] = {}
        for inp in ctx.inputs.values():
            by_type.setdefault(inp.manifest.type, []).append(inp)
        if not ctx.inputs:
            raise VitpipeError("the report stage needs inputs (pretrain, finetune, fewshot, ingest stages)")
        metrics = collect_metrics({i.stage: {"type": i.manifest.type, "metrics": i.manifest.metrics}
                                   for i in ctx.inputs.values()})
        checks = check_quality(metrics, p.quality)
        data = (by_type.get("ingest") or [None])[0]

        doc = Doc(p.title or f"vitpipe report: {ctx.run_storage.uri}")
        headline = headline_lines(metrics, checks)
        doc.h("Headline")
        doc.bullets(headline)
        if checks:
            doc.h("Quality bar")
            doc.table(["check", "dataset", "value", "minimum", "verdict"],
                      [[c["check"], c["dataset"], c["value"], c["minimum"], "pass" if c["passed"] else "FAIL"]
                       for c in checks])
        with tempfile.TemporaryDirectory() as tmp:
            figdir = Path(tmp)
            for inp in by_type.get("pretrain", []):
                doc.h(f"Pretraining ({inp.stage})")
                m = inp.manifest.metrics
                cfg = m.get("model_config", {})
                doc.p(f"ViT with width {cfg.get('width')}, depth {cfg.get('depth')}, {cfg.get('heads')} heads, "
                      f"patch {cfg.get('patch_size')} at {cfg.get('image_size')} px: {m.get('params', 0):,} "
                      f"parameters; {m.get('steps')} steps, loss {m.get('first_loss')} -> {m.get('final_loss')}.")
                history = _history(inp)
                if history:
                    figures.plot_curves(history, figdir / f"{inp.stage}-curves.png")
                    doc.figure(f"figures/{inp.stage}-curves.png", f"{inp.stage}: training loss and learning rate")
                _model_figures(inp, data, p, figdir, doc)
            finetunes = by_type.get("finetune", [])
            if finetunes:
                doc.h("Fine-tuning")
                doc.table(["stage", "dataset", "resolution", "steps", "top-1", "evaluated", "skipped"],
                          [[i.stage, i.manifest.metrics.get("dataset"),
                            i.manifest.metrics.get("model_config", {}).get("image_size"),
                            i.manifest.metrics.get("steps"), i.manifest.metrics.get("top1"),
                            i.manifest.metrics.get("eval", {}).get("total"),
                            i.manifest.metrics.get("eval", {}).get("skipped")] for i in finetunes])
                for inp in finetunes:
                    history = _history(inp)
                    if history:
                        figures.plot_curves(history, figdir / f"{inp.stage}-curves.png")
                        doc.figure(f"figures/{inp.stage}-curves.png", f"{inp.stage}: loss and learning rate")
            fewshots = by_type.get("fewshot", [])
            if fewshots:
                doc.h("Few-shot linear evaluation")
                doc.p("Closed-form regularised least squares from the frozen representation onto {-1, 1}^K "
                      "targets; mean ± std over random k-shot draws; regularisation chosen on held-out "
                      "training data.")
                rows = []
                for inp in fewshots:
                    m = inp.manifest.metrics
                    ks = sorted({int(k.split(".")[1].removesuffix("shot")) for k in m
                                 if k.startswith("pretrained.") and k.endswith("shot")})
                    for k in ks:
                        base = m.get(f"random_init.{k}shot")
                        rows.append([m.get("dataset"), k, f"{m[f'pretrained.{k}shot']:.4f} ± "
                                     f"{m.get(f'pretrained.{k}shot_std', 0):.4f}",
                                     "" if base is None else f"{base:.4f} ± {m.get(f'random_init.{k}shot_std', 0):.4f}"])
                doc.table(["dataset", "k", "pretrained", "random init"], rows)
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
        ctx.metrics.update({"headline": headline, "report": ctx.run_storage.uri_of("report.html"),
                            "quality_passed": all(c["passed"] for c in checks) if checks else None, **metrics})
        missed = [c for c in checks if not c["passed"]]
        for c in missed:
            ctx.logger.warning("quality bar missed: %s on %s: %s < %s", c["check"], c["dataset"],
                               _cell(c["value"]), c["minimum"])
        if missed and p.quality.enforce:
            c = missed[0]
            raise VitpipeError(f"quality bar missed: {c['check']} on {c['dataset']}: {_cell(c['value'])} < "
                               f"{c['minimum']}")


def headline_lines(metrics: dict[str, Any], checks: list[dict[str, Any]]) -> list[str]:
    """The few numbers printed at the end of a run."""
    lines = []
    for key, value in sorted(metrics.items()):
        if key.startswith("finetune.") and key.endswith(".top1") and value is not None:
            lines.append(f"fine-tuned top-1 on {key.split('.')[1]}: {value:.4f}")
    for key, value in sorted(metrics.items()):
        if key.startswith("fewshot.") and key.endswith("shot"):
            _, ds, k = key.split(".")
            base = metrics.get(f"fewshot_random_init.{ds}.{k}")
            extra = f" (random init: {base:.4f})" if base is not None else ""
            lines.append(f"{k.removesuffix('shot')}-shot accuracy on {ds}: {value:.4f}{extra}")
    if checks:
        passed = sum(c["passed"] for c in checks)
        lines.append(f"quality bar: {passed}/{len(checks)} checks passed")
    return lines
