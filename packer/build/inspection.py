"""Per-layer structure of a source checkpoint or a packed artifact: a table and a picture."""

from __future__ import annotations

from pathlib import Path

ATTN = ("query", "key", "value", "attn_out")
FFN = ("ffn_in", "ffn_out")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 1.0


def render_table(layers: list[dict], params: dict | None = None) -> str:
    """`layers` are pack.json layer entries (packer.build.pack.layer_report)."""
    header = "layer    heads     ffn dims  attn dens  ffn dens  kept dens  notes"
    lines = [header, "-" * len(header)]
    heads_b = heads_a = ffn_b = ffn_a = 0
    for entry in layers:
        h, f = entry["heads"], entry["ffn_dims"]
        heads_b, heads_a = heads_b + h["before"], heads_a + h["after"]
        ffn_b, ffn_a = ffn_b + f["before"], ffn_a + f["after"]
        density, kept = entry["density"], entry["kept_density"]
        notes = []
        if entry["uniform_attention_heads_kept"]:
            notes.append(f"uniform heads kept {entry['uniform_attention_heads_kept']}")
        folded_h = entry["removed_heads"]["value_zero_folded"]
        folded_f = entry["removed_ffn_dims"]["input_zero_folded"]
        if folded_h or folded_f:
            notes.append(f"folded into bias: {len(folded_h)} heads, {folded_f} ffn dims")
        kept_density = _mean(kept[p] for p in ATTN + FFN if p in kept)
        lines.append(
            f"{entry['layer']:>5}  {h['after']:>3}/{h['before']:<3}  {f['after']:>5}/{f['before']:<5}  "
            f"{_mean(density[p] for p in ATTN):>9.3f}  {_mean(density[p] for p in FFN):>8.3f}  "
            f"{kept_density:>9.3f}  {'; '.join(notes)}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'all':>5}  {heads_a:>3}/{heads_b:<3}  {ffn_a:>5}/{ffn_b:<5}")
    if params:
        lines.append(
            f"parameters: {params['before']:,} -> {params['after']:,} "
            f"({params['after'] / params['before']:.1%})"
        )
    return "\n".join(lines)


def plot_structure(layers: list[dict], file: str | Path, title: str = "") -> Path:
    """Heads kept per layer as a grid (like nn_pruning's density plots) and FFN dims kept as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(layers)
    heads = max(e["heads"]["before"] for e in layers)
    grid = np.zeros((heads, n))
    for e in layers:
        for h in e["kept_heads"]:
            grid[h, e["layer"]] = 1.0
        for h in e["uniform_attention_heads_kept"]:
            grid[h, e["layer"]] = 0.5
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, n * 0.45), 6.5), sharex=True)
    ax1.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_ylabel("head")
    ax1.set_yticks(range(0, heads, max(1, heads // 16)))
    ax1.set_title("attention heads kept (dark: kept, light: uniform attention, white: removed)", fontsize=9)
    kept = [e["ffn_dims"]["after"] for e in layers]
    total = [e["ffn_dims"]["before"] for e in layers]
    x = np.arange(n)
    ax2.bar(x, total, color="#dddddd", label="before")
    ax2.bar(x, kept, color="#2b8a3e", label="kept")
    ax2.set_ylabel("FFN dims")
    ax2.set_xlabel("layer")
    ax2.set_xticks(x)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return file
