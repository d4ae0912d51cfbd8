"""Exit 0 if the candidate (U2QT2L8 at its own rule's count) beats the shipped kernel."""
import csv, sys
rows = {r["call"]: float(r["us"]) for r in csv.DictReader(open(sys.argv[1]))}
def rule(context, batch, tile):
    per_row = batch * 8 * (4 // tile)
    return max(1, min(-(-512 // per_row), context // 256, 256))
ok = True
for cell, limit in (("2048x1", 0.95), ("8192x1", 0.95), ("32768x1", 0.95), ("2048x4", 1.10), ("32768x16", 1.05)):
    c, b = map(int, cell.split("x"))
    shipped = next(v for k, v in rows.items() if k.startswith(cell + " U4QT4 ") and k.endswith("*"))
    cand_key = f"{cell} U2QT2L8 s{rule(c, b, 2)}"
    cand = next(v for k, v in rows.items() if k.rstrip("*") == cand_key)
    ratio = cand / shipped
    print(f"{cell}: shipped {shipped:.1f} candidate {cand:.1f} ratio {ratio:.2f} (limit {limit})")
    ok &= ratio <= limit
print("decision:", "apply" if ok else "keep")
sys.exit(0 if ok else 1)
