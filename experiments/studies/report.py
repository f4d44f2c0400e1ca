"""The study report: one HTML page with every figure and the numbers, from a sweep's run folder.

Reads ``RUN_DIR/results.json`` (``experiments.studies.results.StudyResults``) and the per-SAE analysis
figures; every number is a mean over the study's seeds with its 95% interval, every comparison is
against the study's ``baseline`` SAE on the interval of the per-seed difference
(``experiments.studies.compare``); the paper's table sits beside its ``paper_reference`` SAE. Writes
everything under ``RUN_DIR/report/`` atomically, so the folder can be copied anywhere.
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
from experiments.studies import compare
from experiments.studies.results import SaeResult, StudyResults
from experiments.stats import LEVEL, mean_interval

Row = SaeResult


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def labels_in_order(results: StudyResults) -> list[str]:
    return list(dict.fromkeys(r.label for r in results.saes))


# --- figures ------------------------------------------------------------------------------------
# tab10 and then two more, so up to 12 SAE labels never share a colour.
COLOURS = [*plt.cm.tab10.colors, "black", "goldenrod"]
MARKERS = "os^Dv<>p*h"


def _series(ax, results: StudyResults, get: compare.Getter, x: Optional[compare.Getter] = None,
            annotate_k: bool = False) -> None:
    """One line per SAE label: the mean over seeds at each k, with its interval as error bars."""
    groups = results.groups()
    for i, label in enumerate(labels_in_order(results)):
        pts = []
        for (lab, k), rows in sorted(groups.items(), key=lambda g: g[0][1] or 0):
            if lab != label or k is None:
                continue
            y = mean_interval([get(r) for r in rows])
            xv = k if x is None else mean_interval([x(r) for r in rows]).mean
            if not (math.isnan(y.mean) or math.isnan(xv)):
                pts.append((xv, y, k))
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1].mean for p in pts]
        err = [0.0 if math.isnan(p[1].half_width) else p[1].half_width for p in pts]
        ax.errorbar(xs, ys, yerr=err, marker=MARKERS[i % len(MARKERS)], color=COLOURS[i % len(COLOURS)], label=label,
                    capsize=3)
        if annotate_k:
            for xv, yv, k in zip(xs, ys, (p[2] for p in pts)):
                ax.annotate(f"k={k}", (xv, yv), textcoords="offset points", xytext=(4, -9), fontsize=7)


def _legend(ax, results: StudyResults) -> None:
    """Inside the axes for a few series; below them (not over the points) for many."""
    if len(labels_in_order(results)) > 4:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=7)
    else:
        ax.legend()


def _k_axis(ax, results: StudyResults) -> None:
    ks = sorted({r.k for r in results.saes if r.k is not None})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (latents per token)")


def _tall(results: StudyResults) -> bool:
    return len(labels_in_order(results)) > 4  # room for the legend below


def _panels_vs_k(results: StudyResults, panels: list[compare.Metric], path: Path) -> Path:
    """One panel per metric against k; sparse-probing panels get the LLM's own probe as a baseline."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.2 if _tall(results) else 3.6), squeeze=False)
    for ax, m in zip(axes[0], panels):
        _series(ax, results, m.get)
        if m.key.startswith("sp_"):
            llm = [r.metric("sparse_probing", "llm_test_accuracy") for r in results.saes]
            if not all(math.isnan(v) for v in llm):
                ax.axhline(np.nanmean(llm), color="grey", ls="--", label="LLM residual probe")
        _k_axis(ax, results)
        ax.set_ylabel(m.header)
        ax.set_title(m.header + " vs k")
        _legend(ax, results)
    return save_figure(fig, path)


def comparison_figures(results: StudyResults, out: Path) -> list[tuple[str, str]]:
    """The figures against k; returns (file, caption) for the ones that have data."""
    cols = {m.key: m for m in compare.metrics(results) if any(not math.isnan(m.get(r)) for r in results.saes)}
    n = len(results.seeds())
    bars = f" Points: mean over {n} seeds; bars: {LEVEL:.0%} t-interval." if n > 1 else ""
    figs: list[tuple[str, str]] = []

    if "fve" in cols and "l0" in cols:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        _series(ax, results, cols["fve"].get, x=cols["l0"].get, annotate_k=True)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("L0 (active latents per token, SAEBench core)")
        ax.set_ylabel("fraction of variance explained")
        ax.set_title("Sparsity–fidelity frontier (higher and further left is better)")
        _legend(ax, results)
        figs.append((save_figure(fig, out / "pareto_fve_l0.png").name,
                     "FVE against L0 (SAEBench core), one point per k." + bars))

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4 if _tall(results) else 3.8))
    _series(axes[0], results, cols["frac_alive"].get)
    axes[0].set_ylim(-0.02, 1.05)
    axes[0].set_ylabel("fraction of latents alive")
    axes[0].set_title("Latents that ever fire on the analysis tokens")
    _series(axes[1], results, lambda r: r.analysis.firing["unique_latents_in_window"])
    window = results.saes[0].analysis.firing["unique_window"]
    axes[1].set_ylim(bottom=0)
    axes[1].set_ylabel("unique latents")
    axes[1].set_title(f"Unique latents firing over {window:,} activations")
    for ax in axes:
        _k_axis(ax, results)
        _legend(ax, results)
    figs.append((save_figure(fig, out / "alive_vs_k.png").name,
                 "Alive latents against k (signed-correct: a latent is alive if its code is ever non-zero)." + bars))

    for keys, name, caption in (
        (("fve", "loss_recovered", "kl_score"), "core_vs_k.png",
         "SAEBench core: reconstruction and downstream-loss preservation against k."),
        (("scr", "tpp", "sp_top1", "sp_all"), "downstream_vs_k.png",
         "SAEBench SCR, TPP and sparse probing against k (higher is better)."),
    ):
        panels = [cols[key] for key in keys if key in cols]
        if panels:
            figs.append((_panels_vs_k(results, panels, out / name).name, caption + bars))

    first = [r for r in results.saes if r.seed == results.seeds()[0]]
    ks = sorted({r.k for r in first if r.k is not None})
    if ks:
        n_labels = len(labels_in_order(results))
        fig, axes = plt.subplots(1, len(ks), figsize=(3.8 * len(ks), 3.4 + 0.22 * n_labels), squeeze=False,
                                 sharey=True)
        for ax, k in zip(axes[0], ks):
            for i, r in enumerate(r for r in first if r.k == k):
                cos = r.analysis.cosine
                edges = np.asarray(cos["hist_edges"])
                counts = np.asarray(cos["hist_counts"], dtype=float)
                if counts.sum() == 0:
                    continue
                centres = (edges[:-1] + edges[1:]) / 2
                ax.plot(centres, counts / counts.sum() / np.diff(edges), color=COLOURS[i % len(COLOURS)],
                        label=f"{r.label}: mean {cos['mean']:+.4f}, sd {math.sqrt(cos['var']):.3f}")
            ax.set_yscale("log")
            ax.set_xlabel("cosine similarity of decoder directions")
            ax.set_title(f"k = {k}")
            # Below the axes, readable, never over the curves.
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
        axes[0][0].set_ylabel("density (pairs of alive latents)")
        fig.suptitle(f"Pairwise cosine similarity of alive latents' decoder directions (seed {results.seeds()[0]})")
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


def headline_cells(results: StudyResults) -> tuple[list[str], list[list[str]]]:
    """The headline table: header and rows, one per (SAE, k); a cell is the mean over seeds ± the interval's
    half-width, or the eval's status when no seed has a number."""
    cols = compare.metrics(results)
    summary, groups = compare.summary(results), results.groups()
    body = []
    for label, k in sorted(summary, key=lambda g: (g[1] or 0, labels_in_order(results).index(g[0]))):
        cells = [summary[(label, k)][m.key].format(m.digits, missing=compare.outcome_text(groups[(label, k)], m) or "–")
                 for m in cols]
        body.append([fmt(k), label, str(len(groups[(label, k)]))] + cells)
    return ["k", "SAE", "seeds"] + [m.header for m in cols], body


def outcome_notes(results: StudyResults) -> list[str]:
    """One line per eval that was not evaluable or failed somewhere: which SAEs, and SAEBench's reason."""
    notes = []
    for eval_type in results.study.evals:
        bad = [r for r in results.saes if eval_type not in r.saebench or r.saebench[eval_type].status != "ok"]
        if not bad:
            continue
        reasons = sorted({(r.saebench[eval_type].status if eval_type in r.saebench else "not run",
                           (r.saebench[eval_type].reason or "") if eval_type in r.saebench else "") for r in bad})
        for status, reason in reasons:
            who = "every SAE" if len(bad) == len(results.saes) else f"{len(bad)} of {len(results.saes)} SAEs"
            first = reason.strip().splitlines()[0] if reason.strip() else "no reason recorded"
            notes.append(f"{eval_type}: {status.replace('_', ' ')} for {who}: {first}")
    return notes


def headline_table(results: StudyResults) -> str:
    header, body = headline_cells(results)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in outcome_notes(results))
    return table(header, [[html.escape(c) for c in row] for row in body], left=2) + (f"<ul class='note'>{notes}</ul>" if notes else "")


def headline_text(results: StudyResults) -> str:
    """The headline table as plain text, for the terminal, with the evals that have no number and why."""
    from tabulate import tabulate

    header, body = headline_cells(results)
    return "\n".join([tabulate(body, headers=header, disable_numparse=True), *outcome_notes(results)])


def headline_markdown(results: StudyResults) -> str:
    """The headline table and the verdicts against the baseline as GitHub markdown (for a README or an issue)."""
    from tabulate import tabulate

    header, body = headline_cells(results)
    lines = [tabulate(body, headers=header, tablefmt="github", disable_numparse=True), ""]
    lines += [f"* {n}" for n in outcome_notes(results)]
    judgements = compare.judge(results)
    if judgements:
        lines += ["", f"Against {results.study.baseline} ({LEVEL:.0%} t-intervals over {len(results.seeds())} seeds; "
                      "per k: interval (verdict)):", ""]
        for label in labels_in_order(results):
            for c in compare.TARGET:
                own = [j for j in judgements if j.label == label and j.criterion == c]
                if own:
                    cells = "; ".join(f"k={j.k}: {j.interval.format()} ({j.verdict})" for j in own)
                    lines.append(f"* {label}, {c.name}: **{compare.overall(own)}** ({cells})")
    return "\n".join(lines)


def target_section(results: StudyResults) -> str:
    judgements = compare.judge(results)
    if not judgements:
        return ""
    base = html.escape(str(results.study.baseline))
    n = len(results.seeds())
    rows = []
    for label in labels_in_order(results):
        for c in compare.TARGET:
            own = [j for j in judgements if j.label == label and j.criterion == c]
            if own:
                cells = "; ".join(f"k={j.k}: {j.interval.format()} ({j.verdict})" for j in own)
                rows.append([html.escape(label), html.escape(c.name), html.escape(compare.overall(own)), cells])
    return (f"<h2>Against {base}: the target, decided on intervals</h2><p class='note'>Each criterion at every k, on the "
            f"{LEVEL:.0%} t-interval over {n} seeds of the SAE's value (frac alive) or of its per-seed difference to "
            f"{base} (the others; both trained on the same data for a seed). It holds when the whole interval is on "
            "the good side of the threshold, fails when the whole interval is on the bad side, and is "
            "<i>not distinguishable at this n</i> otherwise.</p>"
            + table(["SAE", "criterion", "over every k", "per k: interval (verdict)"], rows, left=4))


def sensitivity_section(results: StudyResults) -> str:
    rows = [[html.escape(s.metric.header), fmt(s.sd, 4), fmt(s.detectable, 4)] for s in compare.sensitivity(results)]
    if not rows or len(results.seeds()) < 2:
        return ""
    return ("<h2>What this study can tell apart</h2><p class='note'>Per metric: the median across SAEs of the "
            f"standard deviation over seeds of the difference to {html.escape(str(results.study.baseline))}, and the "
            f"smallest true difference a paired t-test over {len(results.seeds())} seeds detects at 95% (two-sided) "
            "with 80% power. Differences smaller than that are not evidence either way here.</p>"
            + table(["metric", "SD of the difference over seeds", "smallest detectable difference"], rows))


PROTOCOL_COLUMNS = (("lr", "lr"), ("warmup_steps", "LR warm-up (steps)"), ("decay_start", "LR decay from (step)"),
                    ("auxk_alpha", "auxK α"), ("dead_window_tokens", "dead window (tokens)"),
                    ("normalize_activations", "normalised activations"), ("autocast_dtype", "precision"),
                    ("steps", "steps"), ("batch_size", "batch"))


def protocol_section(results: StudyResults) -> str:
    """One row per SAE of the first seed: the protocol as its saved config.json records it."""
    first = [r for r in results.saes if r.seed == results.seeds()[0]]
    rows = []
    for r in first:
        p = r.protocol
        departures = ", ".join(f"{k} (protocol {v})" for k, v in p.get("departures", {}).items()) or "none"
        rows.append([html.escape(f"{r.label} k={r.k}" if r.k is not None else r.label)]
                    + ["–" if p.get(key) is None else html.escape(f"{p[key]:g}" if isinstance(p[key], float) else str(p[key]))
                       for key, _ in PROTOCOL_COLUMNS]
                    + [html.escape(departures)])
    return ("<h2>Training protocol</h2><p class='note'>As each SAE's saved config.json records it ('–': the "
            "architecture has no such setting). Every SAE of the study trains under one protocol; a variant that "
            "keeps its own value says so in the last column.</p>"
            + table(["SAE"] + [h for _, h in PROTOCOL_COLUMNS] + ["departs from the protocol"], rows))


def paper_comparison(results: StudyResults) -> str:
    study = results.study
    if not study.paper_table or study.paper_reference is None:
        return ""
    summary = compare.summary(results)
    body = []
    for k in sorted({k for (label, k) in summary if label == study.baseline and (study.paper_reference, k) in summary}):
        pk = study.paper_k_equivalent.get(k, k)
        ref = study.paper_table.get(pk)
        if not ref:
            continue
        base, own = summary[(study.baseline, k)], summary[(study.paper_reference, k)]
        body.append([f"{k} (paper k={pk})", base["fve"].format(), fmt(ref["topk_fve"]), base["frac_alive"].format(),
                     fmt(ref["topk_alive"]), own["fve"].format(), fmt(ref["vsae_fve"]), own["frac_alive"].format(),
                     fmt(ref["vsae_alive"])])
    if not body:
        return ""
    ref_name = html.escape(study.paper_reference)
    return ("<h2>Against the paper's table</h2><p class='note'>The paper's SAEBench core numbers on gelu-1l "
            f"(dict 2048) beside this study's {html.escape(str(study.baseline))} and {ref_name} at the same k/dict "
            "ratio (means over seeds ± interval). The paper's frac alive is SAEBench core's; ours is the fraction of "
            "latents that fire on the held-out analysis tokens.</p>"
            + table(["k", "TopK FVE", "paper", "TopK alive", "paper", f"{ref_name} FVE", "paper", f"{ref_name} alive",
                     "paper"], body))


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
    first = results.seeds()[0]
    parts = [f"<h2>Per SAE: latent maps, cosine similarity, feature pages (seed {first})</h2>"]
    for r in (r for r in results.saes if r.seed == first):
        a = r.analysis
        title = r.label + (f" k={r.k}" if r.k is not None else "") + f" ({r.path})"
        src_dir = run_dir / "analyses" / r.path
        firing, cos = a.firing, a.cosine
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(table(
            ["alive", "unique in window", "L0 (analysis tokens)", "negative codes", "cos mean", "cos var", "|cos| max"],
            [[f"{firing['n_alive']}/{r.dict_size} ({firing['frac_alive']:.3f})",
              f"{firing['unique_latents_in_window']} / {firing['unique_window']:,} acts", fmt(firing["l0"], 1),
              fmt(firing["frac_negative_codes"]), fmt(cos["mean"], 4), fmt(cos["var"], 4), fmt(cos["max_abs"])]],
            left=0))
        prefix = r.path.replace("/", "_") + "_"
        for fig in a.figures:
            parts.append(figure(copy(src_dir / fig["file"], prefix + fig["file"]), fig["caption"]))
        if "skipped" in a.latent_map:
            parts.append(f"<p class='note'>No latent map: {html.escape(a.latent_map['skipped'])}</p>")
        for page in a.feature_pages:
            copy(src_dir / page["histogram"], prefix + page["histogram"])
        parts.append(feature_pages_html(a.feature_pages, prefix))
    return "".join(parts)


# Run options that say where files went or how the run was watched, not what was trained.
NOT_SETUP = ("save_dir", "seed", "checkpoint_every", "eval_batches", "wandb", "wandb_project")


def setup_section(results: StudyResults) -> str:
    study, run = results.study, results.study.run
    sb = results.saebench or {}
    options = "; ".join(f"{name} {', '.join(map(str, value)) if isinstance(value, tuple) else value}"
                        for name, value in vars(run).items() if name not in NOT_SETUP)
    dropped = "; ".join(f"{name} ({reason})" for eval_dropped in (sb.get("datasets_dropped") or {}).values()
                        for name, reason in eval_dropped.items())
    items = [
        ("study", f"{study.name}: {study.description}"),
        ("seeds", ", ".join(map(str, study.seeds))),
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


SYNTH_COLUMNS = (("sae_l0", "L0"), ("f1", "F1"), ("mcc", "MCC"), ("uniqueness", "uniqueness"),
                 ("explained_variance", "var. explained"), ("dead_latents", "dead latents"),
                 ("recall_parent", "recall: parents"), ("recall_child", "recall: children"),
                 ("recall_correlated", "recall: correlated"), ("recall_independent", "recall: independent"))


def synth_section(synth: dict[str, Any], copy: Callable[[Path, str], str], run_dir: Path) -> str:
    """The ground-truth study: its table (mean ± 95% half-width over seeds), the claims read off it, the
    published SynthSAEBench-16k numbers when the setup has them, and its figures."""

    def cell(iv: dict[str, Any]) -> str:
        if iv.get("mean") is None:
            return "–"
        return f"{iv['mean']:.3f}" + (f" ± {iv['half_width']:.3f}" if iv.get("half_width") is not None else "")

    n_seeds = len(synth["settings"]["seeds"])
    parts = ["<h2>Ground truth: synthetic data with known features</h2>",
             f"<p class='note'>{html.escape(synth.get('description', ''))}</p>",
             f"<p class='note'>Mean over {n_seeds} seeds ± the half-width of the 95% t-interval. A row whose L0 "
             "missed its target by more than 25% is not a matched point (last column).</p>"]
    rows = [[html.escape(e["sae"]), fmt(e["target_l0"]), *[cell(e[key]) for key, _ in SYNTH_COLUMNS],
             "yes" if e["on_target"] else "<b>no</b>"] for e in synth["table"]]
    parts.append(table(["SAE", "target L0", *[title for _, title in SYNTH_COLUMNS], "L0 on target"], rows))
    readings = [line for claim in synth["claims"].values() for line in claim.get("reading", [])]
    if readings:
        parts.append("<p><b>Read against the claims</b> (paired per seed, 95% t-intervals):</p><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in readings) + "</ul>")
    from experiments.synth.setups import get_setup

    # The published anchor, beside the run's own (another scale unless the run is synthsaebench16k itself).
    published = synth.get("published") or dict(get_setup("synthsaebench16k").published)
    for l0, by_sae in (published.get("by_l0") or {}).items():
        metrics = [m for m in ("f1", "mcc", "uniqueness", "explained_variance") if any(m in v for v in by_sae.values())]
        parts.append(f"<p class='note'>Published SynthSAEBench-16k at L0 {html.escape(str(l0))}, mean "
                     f"({html.escape(published.get('spread', 'spread'))}); 16,384 features in 768 dimensions, width "
                     f"4096, 200M samples. Source: {html.escape(published.get('source', ''))}.</p>"
                     + table(["SAE", *metrics], [[html.escape(sae), *[
                         f"{v[m][0]:.3f} ({v[m][1]:.3f})" if m in v else "–" for m in metrics]]
                         for sae, v in by_sae.items()]))
    for fig in synth.get("figures", []):
        parts.append(figure(copy(run_dir / "synth" / fig["file"], f"synth_{fig['file']}"), fig.get("caption", fig["file"])))
    return "".join(parts)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    results = StudyResults.load(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)

    def copy(src: Path, name: str) -> str:
        if not src.is_file():
            raise MissingFileError(f"{src} is missing: re-run the sweep's analyses (--force)")
        write_bytes(out / name, src.read_bytes())
        return name

    study = results.study
    body = [f"<h1>VSAE study: {html.escape(study.name)}</h1>", f"<p>{html.escape(study.description)}</p>"]
    if results.saes:
        figs = comparison_figures(results, out)
        n = len(results.seeds())
        body += [
            "<h2>Headline</h2><p class='note'>SAEBench core (FVE, L0, CE/KL scores), the fraction of latents that "
            "fire on the held-out analysis tokens, and SAEBench's downstream evals; one row per SAE and k, "
            + (f"mean over {n} seeds ± the half-width of the {LEVEL:.0%} t-interval.</p>" if n > 1 else "one seed.</p>"),
            headline_table(results),
            target_section(results),
            sensitivity_section(results),
            paper_comparison(results),
            protocol_section(results),
            "<h2>Setup</h2>", setup_section(results),
            "<h2>Against k</h2>", *[figure(f, c) for f, c in figs],
        ]
    if results.synth:
        body.append(synth_section(results.synth, copy, run_dir))
    if results.digits:
        body.append(digits_section(results.digits, copy, run_dir))
    if results.saes:
        body.append(per_sae_section(results, copy, run_dir))
        body.append("<h2>All numbers</h2><p class='note'>Every SAE and seed; everything above is in results.json "
                    "next to this folder. Three alive fractions count different tokens: the training buffer's evaluation "
                    "batches (dictionary_learning's evaluate), SAEBench core's own sample, and the held-out analysis "
                    "tokens; headlines and verdicts use the last.</p>" + all_numbers_table(results.saes))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>VSAE study: {html.escape(study.name)}</title>"
            f"<style>{CSS}</style><script>{IMAGE_CHECK_JS}</script></head><body>{''.join(body)}</body></html>")
    return write_bytes(out / "index.html", page.encode())


def all_numbers_table(rows: list[Row]) -> str:
    header = ["SAE", "k", "seed", "train FVE", "train L0", "frac alive (training buffer, eval batches)",
              "train loss recovered", "frac alive (SAEBench core's tokens)", "frac alive (analysis tokens)",
              "unique latents in window", "cos mean", "cos var"]
    body = []
    for r in rows:
        tm, a = r.train_metrics, r.analysis
        body.append([html.escape(f"{r.label} ({r.path})"), fmt(r.k), fmt(r.seed),
                     fmt(tm.get("frac_variance_explained", math.nan)), fmt(tm.get("l0", math.nan), 1),
                     fmt(tm.get("frac_alive", math.nan)), fmt(tm.get("frac_recovered", math.nan)),
                     fmt(r.metric("core", "frac_alive")), fmt(r.frac_alive), fmt(a.firing["unique_latents_in_window"]),
                     fmt(a.cosine["mean"], 4), fmt(a.cosine["var"], 4)])
    return table(header, body)
