"""The spec alone against the dense model: random operations over shared stems, every step checked.

Run longer with HYPOTHESIS_PROFILE=nightly. `make test` uses the ci profile (200 examples x 50 steps).
"""

from tests.property.harness import CacheMachine
from tests.property.model import SpecImpl


class SpecMachine(CacheMachine):
    impls = (SpecImpl,)


TestSpecMachine = SpecMachine.TestCase
