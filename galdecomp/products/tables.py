"""Plain tables: rows of dicts written as aligned text, Markdown or CSV."""
import csv
import io

__all__ = ["format_table"]


def _cell(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows, columns, fmt="text"):
    """Format rows (dicts) as a table.

    Parameters
    ----------
    rows : list of dict
    columns : list of str
        Keys to show, in order (also the header).
    fmt : {"text", "markdown", "csv"}

    Returns
    -------
    str
    """
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n"
