from pathlib import Path
p = Path("pagedkv/mlx_backend/kernels/decode.py"); s = p.read_text()
old = "        while lanes < min(chunks, 32):\n"
assert old in s
s = s.replace(old, "        while lanes < min(-(-chunks // 2), 32):  # two 16-byte chunks per lane\n")
p.write_text(s)
print("applied: two chunks per lane")
