"""How many generated inputs the fuzz tests run.

CI runs a small, fast budget. A long campaign sets ``COMPANION_FUZZ_EXAMPLES`` (for example
``1000000``); the Hypothesis property tests then run a hundredth of that (at least 100), since
each Hypothesis example costs far more than a seeded-generator input.
"""

from __future__ import annotations

import os

#: Seeded-generator inputs per property (gate, source URL); manifests get a tenth.
EXAMPLES = int(os.environ.get("COMPANION_FUZZ_EXAMPLES", "20000"))
#: Hypothesis examples per property test.
HYPOTHESIS_EXAMPLES = max(100, EXAMPLES // 100)
#: The seed of the generator batch; a failure message names the input index under it.
SEED = int(os.environ.get("COMPANION_FUZZ_SEED", "20261128"))
