"""`pagedkv bench GROUP`: run a benchmark group, print a progress line per cell, an aligned table and
a CSV block, and write the CSV and a PNG plot to --out (default bench-results/). Everything about a
group (its run, columns and plot) is in its description in `groups.py`."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pagedkv.benchmarks.common import device_info
from pagedkv.benchmarks.groups import GROUPS, Group, Row


def cells(group: Group, rows: list[Row]) -> list[list]:
    """The rows as lists, in the order of the group's columns (a missing column raises)."""
    return [[r[column] for column in group.columns] for r in rows]


def table(header: list[str] | tuple[str, ...], rows: list[list]) -> str:
    cells = [list(header)]
    cells += [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def csv_text(group: Group, rows: list[Row], info: dict[str, str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["device", "mlx", *group.columns])
    for values in cells(group, rows):
        rounded = [round(v, 2) if isinstance(v, float) else v for v in values]
        writer.writerow([info.get("device_name"), info.get("mlx"), *rounded])
    return buffer.getvalue()


def plot(group: Group, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    group.plot(ax, rows)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    names = list(GROUPS) if args.group == "all" else [args.group]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info()
    print(
        f"pagedkv bench: {', '.join(names)} ({'full' if args.full else 'quick'}) on "
        f"{info.get('device')} ({info.get('device_name')}), MLX {info.get('mlx')}"
    )
    for name in names:
        group = GROUPS[name]
        print(f"\n== {name}", flush=True)
        rows = group.run(args)
        print(table(group.columns, cells(group, rows)))
        text = csv_text(group, rows, info)
        csv_path, png_path = out / f"{name}.csv", out / f"{name}.png"
        csv_path.write_text(text)
        plot(group, rows, png_path)
        print("\nCSV:\n" + text.rstrip())
        print(f"\nwrote {csv_path} and {png_path}")
    return 0
