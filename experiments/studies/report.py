"""The study report: one HTML page with every figure and the numbers, from a sweep's run folder.

Reads ``RUN_DIR/results.json`` (``experiments.studies.results.StudyResults``) and the per-SAE analysis
figures; draws the comparison figures (SAEBench metrics against k, cosine-similarity histograms)
and writes everything under ``RUN_DIR/report/`` atomically, so the folder can be copied anywhere.
Comparisons are against the study's ``baseline`` SAE; the paper's table sits beside its
``paper_reference`` SAE.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib.ticker
import numpy as np

from dictionary_learning_ext.errors import MissingFileError
from dictionary_learning_ext.io import write_bytes
from experiments.analyses.figures import plt, save_figure
from experiments.studies.results import SaeResult, StudyResults

Row = SaeResult


# --- metric lookup ----------------------------------------------------------------------------
def largest_threshold(rows: list[Row], eval_type: str, prefix: str, suffix: str = "") -> Optional[str]:
    """The metric name with the largest threshold present (e.g. scr_metric_threshold_10)."""
    names = {m for r in rows if eval_type in r.saebench for m in r.saebench[eval_type].metrics
             if m.startswith(prefix) and m.endswith(suffix)}
    if not names:
        return None
    return max(names, key=lambda m: int(m[len(prefix):len(m) - len(suffix)] if suffix else m[len(prefix):]))


def metric_columns(rows: list[Row]) -> list[tuple[str, str, Callable[[Row], float]]]:
    """(key, header, getter) for the headline table and the figures."""
    scr = largest_threshold(rows, "scr", "scr_metric_threshold_")
    tpp = largest_threshold(rows, "tpp", "tpp_threshold_", "_total_metric")
    cols: list[tuple[str, str, Callable[[Row], float]]] = [
        ("fve", "FVE (core explained variance)", lambda r: r.metric("core", "explained_variance")),
        ("l0", "L0", lambda r: r.metric("core", "l0")),
        ("frac_alive", "frac alive (ever ≠ 0)", lambda r: r.frac_alive),
        ("loss_recovered", "loss recovered (core CE score)", lambda r: r.metric("core", "ce_loss_score")),
        ("kl_score", "KL-div score", lambda r: r.metric("core", "kl_div_score")),
    ]
    if scr:
        cols.append(("scr", f"SCR (top {scr.rsplit('_', 1)[1]})", lambda r: r.metric("scr", scr)))
    if tpp:
        cols.append(("tpp", f"TPP (top {tpp.split('_')[2]})", lambda r: r.metric("tpp", tpp)))
    cols += [
        ("sp_top1", "sparse probing top-1", lambda r: r.metric("sparse_probing", "sae_top_1_test_accuracy")),
        ("sp_all", "sparse probing (all latents)", lambda r: r.metric("sparse_probing", "sae_test_accuracy")),
        ("absorption", "absorption (mean)", lambda r: r.metric("absorption", "mean_absorption_fraction_score")),
    ]
    # Drop columns no SAE has (an eval not in the preset).
    return [c for c in cols if any(not math.isnan(c[2](r)) for r in rows)]


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def by_label(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.label, []).append(r)
    return {label: sorted(rs, key=lambda r: r.k or 0) for label, rs in groups.items()}


# --- figures ------------------------------------------------------------------------------------
def _series(ax, rows: list[Row], getter: Callable[[Row], float], x: Callable[[Row], float] = lambda r: r.k,
            annotate_k: bool = False) -> None:
    for i, (label, rs) in enumerate(by_label(rows).items()):
        pts = [(x(r), getter(r), r.k) for r in rs if r.k is not None]
        pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
        if not pts:
            continue
        xs, ys, ks = zip(*pts)
        ax.plot(xs, ys, marker="os^Dv<>p*h"[i % 10], color=COLOURS[i % len(COLOURS)], label=label)
        if annotate_k:
            for xv, yv, k in pts:
                ax.annotate(f"k={k}", (xv, yv), textcoords="offset points", xytext=(4, -9), fontsize=7)


# tab10 and then two more, so up to 12 SAE labels never share a colour.
COLOURS = [*plt.cm.tab10.colors, "black", "goldenrod"]


def _legend(ax, rows: list[Row]) -> None:
    """Inside the axes for a few series; below them (not over the points) for many."""
    if len(by_label(rows)) > 4:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=7)
    else:
        ax.legend()


def _k_axis(ax, rows: list[Row]) -> None:
    ks = sorted({r.k for r in rows if r.k is not None})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (latents per token)")


def _panels_vs_k(rows: list[Row], panels: list[tuple[str, tuple[str, Callable[[Row], float]]]], path: Path) -> Path:
    """One panel per metric against k; sparse-probing panels get the LLM's own probe as a baseline."""
    tall = len(by_label(rows)) > 4  # room for the legend below
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.2 if tall else 3.6), squeeze=False)
    for ax, (key, (header, get)) in zip(axes[0], panels):
        _series(ax, rows, get)
        if key.startswith("sp_"):
            llm = [r.metric("sparse_probing", "llm_test_accuracy") for r in rows]
            if not all(math.isnan(v) for v in llm):
                ax.axhline(np.nanmean(llm), color="grey", ls="--", label="LLM residual probe")
        _k_axis(ax, rows)
        ax.set_ylabel(header)
        ax.set_title(header + " vs k")
        _legend(ax, rows)
    return save_figure(fig, path)


def comparison_figures(rows: list[Row], out: Path) -> list[tuple[str, str]]:
    """The figures against k; returns (file, caption) for the ones that have data."""
    cols = {key: (header, get) for key, header, get in metric_columns(rows)}
    figs: list[tuple[str, str]] = []

    if "fve" in cols and "l0" in cols:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        _series(ax, rows, cols["fve"][1], x=cols["l0"][1], annotate_k=True)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("L0 (active latents per token, SAEBench core)")
        ax.set_ylabel("fraction of variance explained")
        ax.set_title("Sparsity–fidelity frontier (higher and further left is better)")
        _legend(ax, rows)
        figs.append((save_figure(fig, out / "pareto_fve_l0.png").name,
                     "FVE against L0 (SAEBench core), one point per k."))

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4 if len(by_label(rows)) > 4 else 3.8))
    _series(axes[0], rows, cols["frac_alive"][1])
    axes[0].set_ylim(-0.02, 1.05)
    axes[0].set_ylabel("fraction of latents alive")
    axes[0].set_title("Latents that ever fire on the analysis tokens")
    _series(axes[1], rows, lambda r: r.analysis.firing["unique_latents_in_window"])
    window = rows[0].analysis.firing["unique_window"]
    axes[1].set_ylabel("unique latents")
    axes[1].set_title(f"Unique latents firing over {window:,} activations")
    for ax in axes:
        _k_axis(ax, rows)
        _legend(ax, rows)
    figs.append((save_figure(fig, out / "alive_vs_k.png").name,
                 "Alive latents against k (signed-correct: a latent is alive if its code is ever non-zero)."))

    for keys, name, caption in (
        (("fve", "loss_recovered", "kl_score"), "core_vs_k.png",
         "SAEBench core: reconstruction and downstream-loss preservation against k."),
        (("scr", "tpp", "sp_top1", "sp_all"), "downstream_vs_k.png",
         "SAEBench SCR, TPP and sparse probing against k (higher is better)."),
    ):
        panels = [(key, cols[key]) for key in keys if key in cols]
        if panels:
            figs.append((_panels_vs_k(rows, panels, out / name).name, caption))

    ks = sorted({r.k for r in rows if r.k is not None})
    if ks:
        fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.2), squeeze=False, sharey=False)
        for ax, k in zip(axes[0], ks):
            for r in (r for r in rows if r.k == k):
                cos = r.analysis.cosine
                edges = np.asarray(cos["hist_edges"])
                counts = np.asarray(cos["hist_counts"], dtype=float)
                if counts.sum() == 0:
                    continue
                centres = (edges[:-1] + edges[1:]) / 2
                ax.plot(centres, counts / counts.sum() / np.diff(edges), label=f"{r.label} (mean {cos['mean']:.3f})")
            ax.set_yscale("log")
            ax.set_xlabel("cosine similarity of decoder directions")
            ax.set_ylabel("density (pairs of alive latents)")
            ax.set_title(f"k = {k}")
            ax.legend(fontsize=6)
        fig.suptitle("Pairwise cosine similarity of alive latents' decoder directions")
        fig.tight_layout()
        figs.append((save_figure(fig, out / "cosine_hist.png").name,
                     "Histograms of pairwise cosine similarity between the decoder directions of alive latents."))
    return figs


# --- HTML --------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}
figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}.tok{white-space:pre;font-family:monospace;font-size:12px}
.ex{margin:2px 0;padding:2px;border-bottom:1px solid #f0f0f0}details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
.broken{color:#b00;font-weight:bold}.note{color:#555;font-size:13px}
"""

# Marks images that fail to load (visible to a reader) and records the count on <html> for tests.
IMAGE_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) {
      bad++; var s = document.createElement('span'); s.className = 'broken';
      s.textContent = 'image failed to load: ' + imgs[i].getAttribute('src'); imgs[i].after(s);
    }
  }
  document.documentElement.setAttribute('data-images', imgs.length);
  document.documentElement.setAttribute('data-broken-images', bad);
});
"""


def table(header: Optional[list[str]], body: list[list[str]], left: int = 1) -> str:
    th = "".join(f"<th class='l'>{h}</th>" if i < left else f"<th>{h}</th>" for i, h in enumerate(header or []))
    trs = "".join("<tr>" + "".join(f"<td class='l'>{c}</td>" if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
                  + "</tr>" for row in body)
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{trs}</table>"


def figure(src: str, caption: str) -> str:
    return f"<figure><img src='{html.escape(src)}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"


def headline_table(rows: list[Row]) -> str:
    cols = metric_columns(rows)
    body = [[fmt(r.k), html.escape(r.label)] + [fmt(get(r)) for _, _, get in cols]
            for r in sorted(rows, key=lambda r: (r.k or 0, r.trainer))]
    return table(["k", "SAE"] + [h for _, h, _ in cols], body, left=2)


# The target for a VSAETopK against the baseline (TopK) at the same k.
TARGET = {"min_frac_alive": 0.95, "max_fve_gap": 0.01}


def target_rows(rows: list[Row], baseline: Optional[str]) -> list[dict[str, Any]]:
    """Per SAE label other than the baseline: the worst case over k of each target criterion against it."""
    cols = {key: get for key, _, get in metric_columns(rows)}
    base = {r.k: r for r in rows if r.label == baseline}
    out = []
    for label, rs in by_label(rows).items():
        rs = [r for r in rs if label != baseline and r.k in base]
        if not rs:
            continue
        def worst(key: str) -> float:
            if key not in cols:
                return math.nan
            return min(cols[key](r) - cols[key](base[r.k]) for r in rs)
        alive = min(cols["frac_alive"](r) for r in rs)
        fve_gap = -worst("fve")
        scr, tpp = worst("scr"), worst("tpp")
        ok = alive >= TARGET["min_frac_alive"] and fve_gap <= TARGET["max_fve_gap"] and all(
            math.isnan(v) or v >= 0 for v in (scr, tpp))
        out.append({"label": label, "ks": [r.k for r in rs], "min_frac_alive": alive, "max_fve_gap": fve_gap,
                    "min_scr_minus_topk": scr, "min_tpp_minus_topk": tpp, "target_met": ok})
    return out


def target_section(results: StudyResults) -> str:
    baseline = results.study.baseline
    body = [[html.escape(t["label"]), ", ".join(map(str, t["ks"])), fmt(t["min_frac_alive"]), fmt(t["max_fve_gap"]),
             fmt(t["min_scr_minus_topk"]), fmt(t["min_tpp_minus_topk"]), "yes" if t["target_met"] else "no"]
            for t in target_rows(results.saes, baseline)]
    if not body:
        return ""
    name = html.escape(str(baseline))
    return (f"<h2>Against {name}: the alive-latent target</h2><p class='note'>Worst case over k of each criterion: "
            f"frac alive ≥ {TARGET['min_frac_alive']}, FVE at most {TARGET['max_fve_gap']} below {name}'s at the same k, "
            f"SCR and TPP at least {name}'s (differences are SAE − {name}; '–' where the eval was not run).</p>"
            + table(["SAE", "k tested", "min frac alive", f"max FVE gap to {name}", f"min SCR − {name}",
                     f"min TPP − {name}", "target met"], body))


def headline_text(results: StudyResults) -> str:
    """The headline table as plain text, for the terminal."""
    from tabulate import tabulate

    rows = results.saes
    cols = metric_columns(rows)
    body = [[fmt(r.k), r.label] + [fmt(get(r)) for _, _, get in cols]
            for r in sorted(rows, key=lambda r: (r.k or 0, r.trainer))]
    return tabulate(body, headers=["k", "SAE"] + [h.split(" (")[0] for _, h, _ in cols], disable_numparse=True)


def paper_comparison(results: StudyResults) -> str:
    study = results.study
    if not study.paper_table or study.paper_reference is None:
        return ""
    base = results.baseline_at()
    reference = {r.k: r for r in results.saes if r.label == study.paper_reference}
    body = []
    for k in sorted(set(base) & set(reference)):
        pk = study.paper_k_equivalent.get(k, k)
        ref = study.paper_table.get(pk)
        if not ref:
            continue
        body.append([f"{k} (paper k={pk})",
                     fmt(base[k].metric("core", "explained_variance")), fmt(ref["topk_fve"]),
                     fmt(base[k].frac_alive), fmt(ref["topk_alive"]),
                     fmt(reference[k].metric("core", "explained_variance")), fmt(ref["vsae_fve"]),
                     fmt(reference[k].frac_alive), fmt(ref["vsae_alive"])])
    if not body:
        return ""
    return ("<h2>Against the paper's table</h2><p class='note'>The paper's SAEBench core numbers on gelu-1l "
            "(dict 2048) beside this run's TopK and paper-setting VSAETopK at the same k/dict ratio.</p>"
            + table(["k", "TopK FVE", "paper", "TopK alive", "paper", "VSAETopK FVE", "paper", "VSAETopK alive", "paper"],
                    body))


def token_html(tokens: list[str], acts: list[float], scale: float) -> str:
    spans = []
    for tok, a in zip(tokens, acts):
        alpha = min(1.0, abs(a) / scale) if scale > 0 else 0.0
        colour = f"rgba(255,120,0,{alpha:.2f})" if a >= 0 else f"rgba(0,120,255,{alpha:.2f})"
        text = html.escape(tok.replace("\n", "⏎"))
        spans.append(f"<span class='tok' style='background:{colour}' title='{a:.3f}'>{text}</span>")
    return "".join(spans)


def feature_pages_html(pages: list[dict[str, Any]], img_prefix: str) -> str:
    parts = []
    for page in pages:
        scale = page["max_abs_activation"]
        examples = "".join(f"<div class='ex'>{token_html(e['tokens'], e['acts'], scale)}</div>" for e in page["examples"])
        pos = ", ".join(f"{html.escape(repr(t))} {v:+.2f}" for t, v in page["logits_positive"])
        neg = ", ".join(f"{html.escape(repr(t))} {v:+.2f}" for t, v in page["logits_negative"])
        parts.append(
            f"<details><summary>latent {page['latent']}: fires on {page['utilisation']:.2%} of tokens, "
            f"max |act| {page['max_abs_activation']:.2f}</summary>"
            f"<p><b>Top-activating contexts</b> (orange = positive activation, intensity = |act| / max; hover for the value):</p>"
            f"{examples}<p><b>Top positive logit effects:</b> {pos}<br><b>Top negative logit effects:</b> {neg}</p>"
            + figure(f"{img_prefix}{page['histogram']}", f"Activation histogram of latent {page['latent']}")
            + "</details>"
        )
    return "".join(parts)


def per_sae_section(results: StudyResults, copy: Callable[[Path, str], str], run_dir: Path) -> str:
    parts = ["<h2>Per SAE: latent maps, cosine similarity, feature pages</h2>"]
    for r in results.saes:
        a = r.analysis
        title = r.label + (f" k={r.k}" if r.k is not None else "") + f" ({r.trainer})"
        src_dir = run_dir / "analyses" / r.trainer
        firing, cos = a.firing, a.cosine
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(table(
            ["alive", "unique in window", "L0 (analysis tokens)", "negative codes", "cos mean", "cos var", "|cos| max"],
            [[f"{firing['n_alive']}/{r.dict_size} ({firing['frac_alive']:.3f})",
              f"{firing['unique_latents_in_window']} / {firing['unique_window']:,} acts", fmt(firing["l0"], 1),
              fmt(firing["frac_negative_codes"]), fmt(cos["mean"], 4), fmt(cos["var"], 4), fmt(cos["max_abs"])]],
            left=0))
        for fig in a.figures:
            parts.append(figure(copy(src_dir / fig["file"], f"{r.trainer}_{fig['file']}"), fig["caption"]))
        if "skipped" in a.latent_map:
            parts.append(f"<p class='note'>No latent map: {html.escape(a.latent_map['skipped'])}</p>")
        for page in a.feature_pages:
            copy(src_dir / page["histogram"], f"{r.trainer}_{page['histogram']}")
        parts.append(feature_pages_html(a.feature_pages, f"{r.trainer}_"))
    return "".join(parts)


# Run options that say where files went or how the run was watched, not what was trained.
NOT_SETUP = ("save_dir", "checkpoint_every", "eval_batches", "wandb", "wandb_project")


def setup_section(results: StudyResults) -> str:
    study, run = results.study, results.study.run
    sb = results.saebench or {}
    options = "; ".join(f"{name} {', '.join(map(str, value)) if isinstance(value, tuple) else value}"
                        for name, value in vars(run).items() if name not in NOT_SETUP)
    dropped = "; ".join(f"{name} ({reason})" for eval_dropped in (sb.get("datasets_dropped") or {}).values()
                        for name, reason in eval_dropped.items())
    items = [
        ("study", f"{study.name}: {study.description}"),
        ("model / hook", f"{results.model} / {results.hook_name} (d_model {results.d_model})"),
        ("training run", f"{options} ({run.steps * run.batch_size:,} tokens per SAE)"),
        ("SAEBench", f"{', '.join(sb.get('evals') or [])} ({sb.get('profile')} profile"
                     + ("; offline stand-in datasets" if sb.get("standins") else "") + ")"
                     + (f"; datasets dropped: {dropped}" if dropped else "")),
        ("analyses", f"{study.analysis_contexts} held-out contexts × {run.ctx_len} tokens; {study.n_clusters} KMeans "
                     "clusters"),
        ("wall time", ", ".join(f"{k} {v:.0f} s" for k, v in results.wall_seconds.items() if v is not None)),
    ]
    return table(None, [[f"<b>{k}</b>", html.escape(v)] for k, v in items], left=2)


def digits_section(digits: dict[str, Any], copy: Callable[[Path, str], str], run_dir: Path) -> str:
    rows = digits.get("table") or digits.get("rows") or []
    parts = ["<h2>MP-SAE: the controlled digits study</h2>",
             f"<p class='note'>{html.escape(digits.get('description', ''))}</p>"]
    if rows:
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
        parts.append(table(keys, [[fmt(r.get(k)) for k in keys] for r in rows]))
    claim = digits.get("claim") or {}
    if claim.get("checked"):
        verdicts = [(k.replace("_", " "), v) for k, v in claim.items() if isinstance(v, bool) and k != "checked"]
        parts.append("<p><b>The paper's claims on this run:</b></p>" + table(
            ["claim", "holds here"], [[html.escape(k), {True: "yes", False: "no"}.get(v, "–")] for k, v in verdicts]))
    for fig in digits.get("figures", []):
        parts.append(figure(copy(run_dir / "digits" / fig["file"], f"digits_{fig['file']}"), fig.get("caption", fig["file"])))
    return "".join(parts)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    results = StudyResults.load(run_dir)
    rows = results.saes
    out = run_dir / "report"
    out.mkdir(exist_ok=True)

    def copy(src: Path, name: str) -> str:
        if not src.is_file():
            raise MissingFileError(f"{src} is missing: re-run the sweep's analyses (--force)")
        write_bytes(out / name, src.read_bytes())
        return name

    study = results.study
    body = [f"<h1>VSAE study: {html.escape(study.name)}</h1>", f"<p>{html.escape(study.description)}</p>"]
    if rows:
        figs = comparison_figures(rows, out)
        body += [
            "<h2>Headline</h2><p class='note'>SAEBench core (FVE, L0, CE/KL scores), this run's alive count over the "
            "analysis tokens, and SAEBench's downstream evals; one row per SAE.</p>",
            headline_table(rows),
            target_section(results),
            paper_comparison(results),
            "<h2>Setup</h2>", setup_section(results),
            "<h2>Against k</h2>", *[figure(f, c) for f, c in figs],
        ]
    if results.digits:
        body.append(digits_section(results.digits, copy, run_dir))
    if rows:
        body.append(per_sae_section(results, copy, run_dir))
        body.append("<h2>All numbers</h2><p class='note'>Everything above is in results.json next to this folder.</p>"
                    + all_numbers_table(rows))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>VSAE study: {html.escape(study.name)}</title>"
            f"<style>{CSS}</style><script>{IMAGE_CHECK_JS}</script></head><body>{''.join(body)}</body></html>")
    return write_bytes(out / "index.html", page.encode())


def all_numbers_table(rows: list[Row]) -> str:
    header = ["SAE", "k", "train FVE", "train L0", "train frac alive", "train loss recovered", "SAEBench core frac alive",
              "unique latents in window", "cos mean", "cos var"]
    body = []
    for r in rows:
        tm, a = r.train_metrics, r.analysis
        body.append([html.escape(f"{r.label} ({r.trainer})"), fmt(r.k),
                     fmt(tm.get("frac_variance_explained", math.nan)), fmt(tm.get("l0", math.nan), 1),
                     fmt(tm.get("frac_alive", math.nan)), fmt(tm.get("frac_recovered", math.nan)),
                     fmt(r.metric("core", "frac_alive")), fmt(a.firing["unique_latents_in_window"]),
                     fmt(a.cosine["mean"], 4), fmt(a.cosine["var"], 4)])
    return table(header, body)
