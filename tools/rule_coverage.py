"""Prints how often each rule fires in the differential machine (spec vs MLX backend).

PYTHONPATH=. python tools/rule_coverage.py [examples] [steps]     (default 200 x 50, the ci budget)
"""

import sys

from tests.property.coverage import REQUIRED, rule_counts
from tests.property.test_differential_machine import DifferentialMachine

examples = int(sys.argv[1]) if len(sys.argv) > 1 else 200
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
counts = rule_counts(DifferentialMachine, examples, steps)
width = max(map(len, counts))
print(f"differential machine, {examples} examples x {steps} steps (derandomized)")
for event in sorted(counts, key=lambda e: (not e.startswith("rule"), e)):
    flag = "  (required)" if event in REQUIRED else ""
    print(f"  {event:<{width}}  {counts[event]:>7}{flag}")
