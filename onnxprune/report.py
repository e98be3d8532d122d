"""The prune report in its formats, built from one :class:`~onnxprune.pipeline.PruneResult`.

``PruneResult.report()`` is the JSON report (stable keys, see README); :func:`markdown` renders the
same dict as Markdown (with a channels-kept plot beside it when matplotlib is installed);
:func:`validation_rows` are the before/after rows that the Markdown and the CLI's table share.
"""

from __future__ import annotations

from pathlib import Path

from .measure import plots


def validation_rows(v: dict | None) -> list[tuple]:
    """``(what, before, after, change)`` rows of a ``validation`` report entry (empty without one)."""
    if not v:
        return []
    rows = []
    pb, pa = v.get("perplexity_before"), v.get("perplexity_after")
    if pa:
        ratio = v.get("perplexity_ratio")
        rows.append(("perplexity", f"{pb['perplexity']:.4g}", f"{pa['perplexity']:.4g}",
                     "-" if ratio is None else f"{ratio:.3f}x"))
    b, a = v.get("accuracy_before"), v.get("accuracy_after")
    if a:
        rows.append(("top-1 accuracy", f"{100 * b['top1']:.2f}%", f"{100 * a['top1']:.2f}%",
                     f"{100 * (a['top1'] - b['top1']):+.2f} pt"))
    for name, f in (v.get("fidelity") or {}).items():
        if f.get("top1_agreement") is not None:
            rows.append((f"agreement ({name})", "100%", f"{100 * f['top1_agreement']:.2f}%", ""))
        rows.append((f"cosine ({name})", "1", f"{f['cosine']:.4f}", ""))
    if v.get("latency_ms_before"):
        rows.append(("latency p50", f"{v['latency_ms_before']:.2f} ms", f"{v['latency_ms_after']:.2f} ms",
                     f"{100 * v['latency_ratio']:.1f}%"))
    return rows


def markdown(result, md_path: str | Path | None = None) -> tuple[str, list[str]]:
    """The Markdown report of ``result`` and notes for the user. With ``md_path`` and matplotlib, the
    channels-kept plot is written beside it as ``<md stem>.channels.png`` and embedded."""
    rep = result.report()
    b, a = result.before, result.after
    lines = [f"# onnxprune report: {rep.get('model')}", "",
             f"criterion `{rep['criterion']}` (importance data: {rep['importance_data']}), "
             f"reconstruction `{rep.get('reconstruct_mode')}`, "
             + (f"channel counts in multiples of {rep['round_to']}, " if rep.get("round_to") else "")
             + f"verified: **{rep['verified']}**", "",
             "| | before | after | after/before |", "|---|---:|---:|---:|",
             f"| params | {b.params:,} | {a.params:,} | {a.params / max(b.params, 1):.3f} |",
             f"| MACs | {b.macs:,} | {a.macs:,} | {a.macs / max(b.macs, 1):.3f} |"]
    if rep.get("file_bytes_after"):
        lines.append(f"| file bytes | {rep['file_bytes_before']:,} | {rep['file_bytes_after']:,} | "
                     f"{rep['file_bytes_after'] / max(rep['file_bytes_before'], 1):.3f} |")
    for row in validation_rows(rep.get("validation")):
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    lines += ["", f"groups: {rep['groups_found']} found, {rep['groups_pruned']} pruned, "
                  f"{rep['groups_frozen']} frozen", "", "## Pruned groups", "",
              "| group | first layer | channels | removed |", "|---:|---|---:|---:|"]
    for g in rep["groups"]:
        lines.append(f"| {g['group']} | `{g['label']}` | {g['size']} | {len(g['removed_channels'])} |")
    notes: list[str] = []
    if md_path and rep["groups"]:
        png = Path(md_path).with_suffix(".channels.png")
        if plots.channels_kept(rep["groups"], png):
            lines += ["", f"![channels kept per group]({png.name})"]
        else:
            notes.append(plots.INSTALL_HINT)
    if rep["frozen"]:
        lines += ["", "## Frozen groups", "", "| group | first layer | channels | why |", "|---:|---|---:|---|"]
        for f in rep["frozen"]:
            lines.append(f"| {f['group']} | `{f['label']}` | {f['size']} | {'; '.join(f['reasons'][:2])} |")
    return "\n".join(lines) + "\n", notes
